"""Language-modelling metrics from per-token log-likelihoods: loss, perplexity and bits per byte.

Kept in this repository and loaded by path, so nothing is fetched from the Hub:

    metric = evaluate.load("metrics/bits_per_byte")
    metric.compute(nats=[2.1, 0.3, 1.2], num_bytes=[4, 1, 0])

Each row is one scored token: `nats` = -log p(token | context) and `num_bytes` = the UTF-8 bytes of text the token
stands for (0 for special tokens such as EOS).

    loss          = mean nats over every scored token (the training loss)
    perplexity    = exp(loss)
    bits_per_byte = sum of nats over tokens that stand for text / (ln 2 x their bytes)

Bits per byte does not depend on the tokenizer: it is the code length of the text itself, so models with different
vocabularies compare. Special tokens stand for no text and are left out of both sums, as nanochat's val_bpb does and
as lm-evaluation-harness's bits_per_byte does (it never scores an end-of-text token).
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Loss, perplexity and tokenizer-independent bits per byte from per-token negative log-likelihoods."
_KWARGS = """
Args:
    nats (list of float): -log p of each scored token, natural log.
    num_bytes (list of int): UTF-8 bytes of text each scored token stands for; 0 for special tokens.
Returns:
    loss (float), perplexity (float), bits_per_byte (float), tokens (int), bytes (int).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class BitsPerByte(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"nats": datasets.Value("float64"), "num_bytes": datasets.Value("int64")}),
        )

    def _compute(self, nats, num_bytes):
        if not nats:
            raise ValueError("no scored tokens: loss and bits per byte are undefined")
        text_nats = sum(n for n, b in zip(nats, num_bytes, strict=True) if b > 0)
        total_bytes = sum(num_bytes)
        loss = sum(nats) / len(nats)
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": text_nats / (math.log(2) * total_bytes) if total_bytes else math.nan,
            "tokens": len(nats),
            "bytes": total_bytes,
        }
