"""Evaluate a language model: held-out loss, perplexity and bits per byte, and zero-shot multiple choice.

A model is a Hugging Face folder (a run's final/, or any transformers causal LM) or one of our checkpoints
(output_models/<run>/checkpoints/checkpoint-<step>):

    python eval.py output_models/deepone-162m/final --dataset smollm --json
    python eval.py output_models/demo/checkpoints/checkpoint-300 --dataset builtin
    python eval.py final --dataset valid.txt --split all                 # a text kept apart from training
    python eval.py final --multiple-choice hellaswag_val.jsonl --json    # context, choices, label records

Language modelling: each document is scored as training sees it, `[BOS] doc [EOS]`, in windows of at most
--max-length tokens (a longer document's later windows keep as much preceding text as fits, as
lm-evaluation-harness's rolling log-likelihood does). Bits per byte = nats of the tokens that stand for text /
(ln 2 x UTF-8 bytes of that text): independent of the tokenizer, so runs with different vocabularies compare.

Multiple choice: each choice is scored by its log-likelihood given the context, divided by the choice's length in
bytes (lm-evaluation-harness's acc_norm); `accuracy` uses that, `accuracy_unnormalized` the raw sum.

The metrics are `evaluate` modules kept in metrics/ and loaded by path: nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

import data
import models
from console import Ticker, UsageError, bad_input
from lifecycle.checkpoint import load_checkpoint, run_contents, verify

ROOT = Path(__file__).resolve().parent
METRICS = ROOT / "metrics"
CONTEXT_KEYS = ("context", "ctx", "question", "query", "premise", "prompt")
CHOICE_KEYS = ("choices", "endings", "options")
LABEL_KEYS = ("label", "answer", "gold", "answerKey")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see python eval.py --help\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("model", help="a Hugging Face model folder or a checkpoint-<step> folder of a run")
    g = p.add_argument_group("language modelling")
    g.add_argument("--dataset", default=None, help="documents to score: any train.py --dataset spec")
    g.add_argument(
        "--split", default="heldout", choices=["heldout", "all"], help="held-out documents only, or every one"
    )
    g.add_argument("--max-docs", type=int, default=1000, help="documents scored at most")
    g.add_argument("--text-column", default="text", help="field holding each document in file and Hub sources")
    g = p.add_argument_group("multiple choice")
    g.add_argument("--multiple-choice", default=None, help="a .jsonl/.json/.parquet file or OWNER/NAME[/SUBSET]")
    g.add_argument("--mc-split", default="validation", help="split of a Hub multiple-choice dataset")
    g.add_argument("--mc-limit", type=int, default=0, help="examples scored at most (0 = all)")
    g = p.add_argument_group("model")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or file (None: the model's own)")
    g.add_argument("--max-length", type=int, default=None, help="tokens per window (None: the trained length)")
    g.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    g.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--trust-remote-code", action="store_true", help="let transformers run a folder's own code")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


# -----------------------------------------------------------------------------
# Loading a model: an HF folder or a checkpoint


class LM:
    """A causal LM behind one call: `logits(input_ids (B, T), lengths) -> (B, T, V)` float32 logits."""

    def __init__(self, forward, tokenizer, max_length: int, device: torch.device, name: str):
        self.forward, self.tokenizer, self.max_length, self.device = forward, tokenizer, max_length, device
        self.name = name
        self.bos, self.eos = data.bos_eos_ids(tokenizer)
        self.byte_lengths = data.token_byte_lengths(tokenizer)

    def encode(self, texts: list[str]) -> list[list[int]]:
        # the backend directly: the same ids, without transformers' warning about texts longer than the model's
        # context (documents are cut into windows here)
        return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


def load_model(args: argparse.Namespace) -> LM:
    path = Path(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") else None
    if (path / "config.json").is_file():
        return _load_hf(path, args, device, dtype)
    if (path / "trainer_state.json").is_file() or (path / "COMPLETE").is_file():
        return _load_checkpoint(path, args, device, dtype)
    raise UsageError(
        f"{path} is neither a Hugging Face model folder (config.json) nor a checkpoint folder (trainer_state.json); "
        "pass e.g. output_models/<run>/final or output_models/<run>/checkpoints/checkpoint-<step>"
    )


def _load_hf(path: Path, args, device: torch.device, dtype) -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = (
            data.load_tokenizer(args.tokenizer)
            if args.tokenizer
            else AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=args.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - a bad config.json (a list, wrong field types) or truncated weights
        why = " ".join(line.strip() for line in str(e).strip().splitlines()) or type(e).__name__
        raise UsageError(f"cannot load {path} with transformers: {why}") from None
    _check_fits(path, len(tokenizer), model.get_input_embeddings().num_embeddings, args.max_length,
                getattr(model.config, "max_position_embeddings", None))  # fmt: skip
    model.to(device).eval()
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{path} has no fast tokenizer (tokenizer.json); bits per byte needs one")
    limit = getattr(tokenizer, "model_max_length", None) or 0
    trained = limit if 0 < limit < 1_000_000 else getattr(model.config, "max_position_embeddings", None) or 2048

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask).logits.float()

    return LM(forward, tokenizer, args.max_length or trained, device, str(path))


def _check_fits(path: Path, tokens: int, embedded: int, max_length: int | None, positions: int | None) -> None:
    """Refuse a tokenizer with ids the model does not embed, and windows longer than its positions."""
    if tokens > embedded:
        raise UsageError(
            f"the tokenizer has {tokens:,} tokens but {path} embeds only {embedded:,}; pass the model's own tokenizer"
        )
    if max_length is not None and positions and max_length > positions:
        raise UsageError(f"--max-length {max_length:,} is longer than the {positions:,} positions of {path}")


def _load_checkpoint(path: Path, args, device: torch.device, dtype) -> LM:
    problem = verify(path, run_contents)
    if problem is not None:
        raise UsageError(f"{path} is not a complete checkpoint ({problem}); pick another checkpoint-<step> folder")
    saved = load_checkpoint(path, rank=0)
    trainer = saved["trainer_state"]
    cfg = models.ModelConfig.from_dict(trainer["model_config"])
    model = models.Transformer(cfg)
    model.load_state_dict(saved["model_state"])
    model.to(device=device, dtype=dtype or torch.float32).eval()
    train_args = trainer.get("args", {})
    # The run's tokenizer: --tokenizer here, else the one it was given, its own trained one, or its --init-from's.
    own = path.parent.parent / "tokenizer"
    candidates = [args.tokenizer, train_args.get("tokenizer"), own, train_args.get("init_from")]
    spec = next((c for c in candidates if c and Path(c).exists()), None)
    if spec is None:
        raise UsageError(f"cannot find the tokenizer of {path}; pass --tokenizer (the run's tokenizer folder)")
    tokenizer = data.load_tokenizer(spec)
    _check_fits(path, len(tokenizer), cfg.vocab_size, args.max_length, cfg.max_position_embeddings)

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(ids)  # causal, right-padded: padding never reaches the positions that are scored

    return LM(forward, tokenizer, args.max_length or train_args.get("max_length") or 2048, device, str(path))


# -----------------------------------------------------------------------------
# Scoring: -log p of chosen target tokens, batched


@torch.no_grad()
def score(lm: LM, requests: list[tuple[list[int], int]], batch_size: int) -> list[np.ndarray]:
    """For each (tokens, first), the nats of tokens[first + 1:] each given every token before it in `tokens`.

    `tokens` is at most max_length + 1 long. Requests are batched by length (right padding; causal attention keeps
    the padding out of every scored position) and the results returned in request order.
    """
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out: list[np.ndarray] = [np.empty(0)] * len(requests)
    with Ticker("scoring", total=len(requests), unit="windows") as tick:
        for start in range(0, len(order), batch_size):
            _score_batch(lm, requests, order, start, batch_size, out)
            tick.advance(min(batch_size, len(order) - start))
    return out


def _score_batch(lm: LM, requests: list, order: list[int], start: int, batch_size: int, out: list) -> None:
    """Score requests order[start : start + batch_size] (one padded forward) into `out`."""
    batch = [requests[i] for i in order[start : start + batch_size]]
    width = max(len(tokens) - 1 for tokens, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, (tokens, _) in enumerate(batch):
        ids[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        mask[row, : len(tokens) - 1] = 1
    logits = lm.forward(ids.to(lm.device), mask.to(lm.device))  # (B, T, V)
    for row, (tokens, first) in enumerate(batch):
        logp = torch.log_softmax(logits[row, first : len(tokens) - 1].double(), dim=-1)  # (n, V)
        targets = torch.tensor(tokens[first + 1 :], device=logp.device)
        out[order[start + row]] = (-logp.gather(1, targets[:, None])[:, 0]).cpu().numpy()


def windows(tokens: list[int], max_length: int) -> list[tuple[list[int], int]]:
    """Requests scoring tokens[1:] in windows of at most max_length inputs.

    Window k scores targets [k*T, (k+1)*T) and reads the T tokens before its last target: the first window starts at
    the document, later ones carry as much preceding text as fits (lm-evaluation-harness's rolling windows).
    """
    n, out = len(tokens) - 1, []
    for start in range(0, n, max_length):
        end = min(start + max_length, n)
        context = max(0, end - max_length)
        out.append((tokens[context : end + 1], start - context))
    return out


def evaluate_lm(lm: LM, texts: list[str], batch_size: int) -> dict:
    import evaluate

    docs = [[lm.bos, *ids, lm.eos] for ids in lm.encode(texts)]
    requests, owner = [], []
    for d, tokens in enumerate(docs):
        for request in windows(tokens, lm.max_length):
            requests.append(request)
            owner.append(d)
    nats = score(lm, requests, batch_size)
    metric = evaluate.load(str(METRICS / "bits_per_byte"), keep_in_memory=True)
    per_doc: list[list[np.ndarray]] = [[] for _ in docs]
    for d, values in zip(owner, nats, strict=True):
        per_doc[d].append(values)
    for tokens, parts in zip(docs, per_doc, strict=True):
        metric.add_batch(nats=np.concatenate(parts).tolist(), num_bytes=lm.byte_lengths[tokens[1:]].tolist())
    return {**metric.compute(), "documents": len(docs)}


# -----------------------------------------------------------------------------
# Multiple choice


def load_choices(spec: str, split: str, limit: int) -> list[dict]:
    """Records {context, choices, label} from a local file or a Hub dataset (HellaSwag, ARC and similar fields)."""
    import datasets

    path = Path(spec).expanduser()
    if path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "json" if path.suffix in (".jsonl", ".json") else None
        if kind is None:
            raise UsageError(f"--multiple-choice {spec}: use a .jsonl, .json or .parquet file")
        if path.stat().st_size == 0:
            raise UsageError(f"--multiple-choice {spec} is empty")
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own report of a bad file: ours follows
        try:
            rows = datasets.load_dataset(kind, data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as e:  # not JSON lines / parquet, mixed field types
            cause = e.__cause__ or e.__context__ or e
            raise UsageError(
                f"--multiple-choice {spec} cannot be read as {kind} ({str(cause).splitlines()[0]})"
            ) from None
        finally:
            datasets.logging.set_verbosity(verbosity)
    elif spec.startswith(("/", ".", "~")) or path.suffix in (".jsonl", ".json", ".parquet"):
        raise UsageError(f"--multiple-choice {spec} does not exist")
    else:
        parts = spec.split("/")
        repo, subset = "/".join(parts[:2]), (parts[2] if len(parts) > 2 else None)
        try:
            rows = datasets.load_dataset(repo, subset, split=split)
        except Exception as e:  # offline, unknown repo, split or config
            raise UsageError(f"cannot load {spec} ({type(e).__name__}); pass a local .jsonl file instead") from None
    records = []
    for i, row in enumerate(rows):
        if limit and i >= limit:
            break
        records.append(_mc_record(row, i, spec))
    if not records:
        raise UsageError(f"--multiple-choice {spec} holds no examples")
    return records


def _mc_record(row: dict, i: int, spec: str) -> dict:
    def field(keys):
        key = next((k for k in keys if row.get(k) is not None), None)  # files mixing schemas hold None fields
        if key is None:
            raise UsageError(f"{spec} example {i} has none of the fields {', '.join(keys)} (fields: {', '.join(row)})")
        return row[key]

    context, choices, label = field(CONTEXT_KEYS), field(CHOICE_KEYS), field(LABEL_KEYS)
    names = None
    if isinstance(choices, dict):  # ARC: {"text": [...], "label": ["A", "B", ...]}
        names, choices = choices.get("label"), choices.get("text")
    if not isinstance(context, str):
        raise UsageError(f"{spec} example {i}: the context must be a string, not {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise UsageError(f"{spec} example {i}: the choices must be a list of at least two non-empty strings")
    if isinstance(label, bool):  # a bool is an int to Python, not a choice's index
        raise UsageError(f"{spec} example {i}: label {label!r} is not a choice's index or letter")
    if isinstance(label, str) and names and label in names:
        label = names.index(label)
    elif isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    elif isinstance(label, str) and len(label) == 1 and label.isalpha():
        label = ord(label.upper()) - ord("A")
    if not isinstance(label, int) or not 0 <= label < len(choices):
        raise UsageError(f"{spec} example {i}: label {label!r} does not pick one of its {len(choices)} choices")
    return {"context": context, "choices": choices, "label": label}


def evaluate_choices(lm: LM, records: list[dict], batch_size: int) -> dict:
    import evaluate

    requests, spans = [], []
    for rec in records:
        context = [lm.bos, *lm.encode([rec["context"]])[0]]
        for choice in rec["choices"]:
            full = [lm.bos, *lm.encode([rec["context"] + " " + choice])[0]]
            # The choice's tokens: those after the context's own, unless merging changed them; then encode it alone.
            cont = full[len(context) :] if full[: len(context)] == context else lm.encode([" " + choice])[0]
            tokens = (context + cont)[-(lm.max_length + 1) :]  # a long context loses its start, never the choice
            requests.append((tokens, max(0, len(tokens) - 1 - len(cont))))
            spans.append(len(choice.encode("utf-8")) or 1)
    loglik = np.array([-nats.sum() for nats in score(lm, requests, batch_size)])
    predictions, raw, k = [], [], 0
    for rec in records:
        n = len(rec["choices"])
        ll = loglik[k : k + n]
        predictions.append(int(np.argmax(ll / np.array(spans[k : k + n]))))
        raw.append(int(np.argmax(ll)))
        k += n
    accuracy = evaluate.load(str(METRICS / "accuracy"), keep_in_memory=True)
    references = [rec["label"] for rec in records]
    return {
        "accuracy": accuracy.compute(predictions=predictions, references=references)["accuracy"],
        "accuracy_unnormalized": accuracy.compute(predictions=raw, references=references)["accuracy"],
        "examples": len(records),
    }


# -----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    for name in ("dataset", "multiple_choice"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise UsageError(f"--{name.replace('_', '-')} is empty; name a dataset or a file")
    if args.dataset is None and args.multiple_choice is None:
        raise UsageError("nothing to evaluate: pass --dataset SPEC (language modelling) and/or --multiple-choice FILE")
    for name in ("max_docs", "batch_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.mc_limit < 0:
        raise UsageError(f"--mc-limit must be 0 (every example) or a positive number of examples, got {args.mc_limit}")
    if args.max_length is not None and args.max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {args.max_length}")
    with bad_input():
        mix = data.parse_mix(args.dataset, text_column=args.text_column) if args.dataset else None
        records = load_choices(args.multiple_choice, args.mc_split, args.mc_limit) if args.multiple_choice else None
        lm = load_model(args)
        result = {"model": lm.name, "max_length": lm.max_length}
        if mix is not None:
            with Ticker("reading documents", unit="read") as tick:
                texts = data.document_texts(mix, args.max_docs, held_out=args.split == "heldout", tick=tick.advance)
            if not texts:
                raise UsageError(
                    f"{args.dataset} has no held-out documents (training holds out {mix.eval_fraction:.1%} of them by "
                    "a hash of the text); pass --split all to score a text kept apart from training"
                )
            result |= {"dataset": args.dataset, "split": args.split, **evaluate_lm(lm, texts, args.batch_size)}
        if records is not None:
            result |= {"multiple_choice": args.multiple_choice, **evaluate_choices(lm, records, args.batch_size)}
    return result


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")  # the metric modules are local files
    args = build_parser().parse_args(argv)
    import datasets
    import transformers

    datasets.disable_progress_bars()  # stderr carries only errors
    transformers.utils.logging.disable_progress_bar()
    try:
        result = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}))
    else:
        for key, value in result.items():
            print(f"{key:>22}  {value:.6g}" if isinstance(value, float) else f"{key:>22}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
