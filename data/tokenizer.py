"""Tokenizers: load one (file, folder or Hub name), train a byte-level BPE one, and find its BOS/EOS ids.

Every tokenizer is returned as a `transformers.PreTrainedTokenizerFast`, so `save_pretrained(folder)` writes files
that `AutoTokenizer.from_pretrained(folder)` loads; packing calls the Rust tokenizer underneath directly
(`tokenizer.backend_tokenizer.encode_batch_fast`). The vocabulary size is `len(tokenizer)`.

BOS/EOS rule (`bos_eos_ids`): the tokenizer's declared `bos_token`/`eos_token` when it has them (tokenizer_config.json),
otherwise the first special token found in these lists:
    BOS: <|bos|>, <s>, <bos>, <|begin_of_text|>, <|startoftext|>, <|endoftext|>
    EOS: <|eos|>, </s>, <eos>, <|end_of_text|>, <|endoftext|>
Tokenizers trained here have <|bos|> = 0 and <|eos|> = 1. The SmolLM2 tokenizer has only <|endoftext|> (id 0), which
then serves as both, so documents are packed as <|endoftext|> text <|endoftext|>.

Command line:
    python -m data.tokenizer train --dataset SPEC --vocab-size 32768 --output DIR [--max-docs N]
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from console import Ticker

from .mix import Mix, parse_mix
from .order import SourceCursor, is_eval, stream_key
from .sources import open_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS = "<|bos|>", "<|eos|>"
_BOS_CANDIDATES = (BOS, "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>")
DEFAULT_VOCAB_SIZE = 32768
DEFAULT_TOKENIZER_DOCS = 20_000


def load_tokenizer(spec: str | Path) -> "PreTrainedTokenizerFast":
    """Load a tokenizer from a tokenizer.json file, a folder holding one, or a Hub name (needs network)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(
                f"the folder {path} has no tokenizer.json; point --tokenizer at a folder saved by this "
                "project or by transformers (a fast tokenizer)"
            )
        with _reading_tokenizer(path / "tokenizer.json"):
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    elif path.is_file():
        with _reading_tokenizer(path):
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif path.exists():
        raise ValueError(f"tokenizer {spec} is neither a file nor a folder")
    elif str(spec).startswith(("/", ".", "~")) or str(spec).endswith(".json"):
        raise ValueError(f"tokenizer {spec} does not exist; pass a tokenizer.json, a folder holding one, or a Hub name")
    else:
        import tokenizers

        try:
            backend = tokenizers.Tokenizer.from_pretrained(str(spec))
        except Exception as e:  # offline, unknown repo, no tokenizer.json in it
            raise ValueError(
                f"cannot load the tokenizer {spec} from the Hugging Face Hub ({type(e).__name__}); "
                "without network access pass a local tokenizer.json or folder, or leave --tokenizer "
                "out to train one on the data"
            ) from None
        tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    return _with_bos_eos(tok)


@contextlib.contextmanager
def _reading_tokenizer(path: Path):
    """Whatever the Rust tokenizer or transformers raise for a damaged file becomes one ValueError naming it."""
    try:
        yield
    except Exception as e:  # tokenizers raises a bare Exception for invalid JSON; transformers raises others
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ValueError(f"tokenizer {path} cannot be read (not a valid tokenizer.json: {detail})") from None


def bos_eos_ids(tokenizer: "PreTrainedTokenizerFast") -> tuple[int, int]:
    """(BOS id, EOS id) following the rule in the module docstring. Raises ValueError when none is found."""
    bos = _declared_id(tokenizer, "bos") if tokenizer.bos_token else None
    eos = _declared_id(tokenizer, "eos") if tokenizer.eos_token else None
    vocab = tokenizer.get_vocab()
    if bos is None:
        bos = next((vocab[t] for t in _BOS_CANDIDATES if t in vocab), None)
    if eos is None:
        eos = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
    if bos is None or eos is None:
        raise ValueError(
            "the tokenizer has no recognisable BOS/EOS special token (looked for "
            f"{', '.join(_BOS_CANDIDATES)} / {', '.join(_EOS_CANDIDATES)}); add one or train a tokenizer"
        )
    return bos, eos


# Above this share of unknown tokens on the data a tokenizer does not fit it: refused; above UNKNOWN_WARN, a warning.
UNKNOWN_REFUSE, UNKNOWN_WARN = 0.5, 0.01


def unknown_token_rate(tokenizer: "PreTrainedTokenizerFast", texts: list[str]) -> float | None:
    """Share of the tokens of `texts` that are the tokenizer's unknown token (None: it has none, as byte-level BPE,
    which can encode any text, or no tokens at all)."""
    unk = tokenizer.unk_token_id
    if not isinstance(unk, int) or not texts:
        return None
    encoded = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    total = sum(len(e.ids) for e in encoded)
    return sum(e.ids.count(unk) for e in encoded) / total if total else None


def check_fits(tokenizer: "PreTrainedTokenizerFast", mix: Mix, name: str, warn, docs: int = 200) -> None:
    """Refuse (ValueError) a tokenizer that maps more than half of the data's tokens to its unknown token; warn
    above 1%. Reads `docs` documents, and only for tokenizers that have an unknown token."""
    if not isinstance(tokenizer.unk_token_id, int) or mix.cache_dir:
        return
    rate = unknown_token_rate(tokenizer, list(sample_texts(mix, docs)))
    if rate is None or rate <= UNKNOWN_WARN:
        return
    what = f"the tokenizer {name} maps {rate:.0%} of the data's tokens to its unknown token {tokenizer.unk_token!r}"
    if rate > UNKNOWN_REFUSE:
        raise ValueError(f"{what}: it does not fit this data; pass a tokenizer made for it, or none to train one")
    warn(f"warning: {what} (measured on {docs} documents); the model cannot tell those apart")


def tokenizer_hash(tokenizer: "PreTrainedTokenizerFast") -> str:
    """A short digest of what decides the token ids: vocabulary, merges, normalizer, pre-tokenizer and BOS/EOS."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    for key in ("truncation", "padding", "post_processor", "decoder"):
        spec.pop(key, None)  # packing never pads, truncates or adds special tokens through the tokenizer
    spec["bos_eos"] = bos_eos_ids(tokenizer)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for, as an int64 array of `len(tokenizer)` entries.

    Special tokens (BOS, EOS, padding...) stand for no text and count 0 bytes, so summing the table over the targets
    of `[BOS] doc [EOS]` gives the byte length of `doc`: the denominator of bits per byte, which compares models
    with different tokenizers. Byte-level BPE vocabularies (GPT-2, SmolLM2, the ones trained here) spell each byte
    as one printable character; SentencePiece-style ones spell bytes as `<0xAB>` and spaces as `▁`; added tokens
    that are not special are plain text.
    """
    import tokenizers

    backend = tokenizer.backend_tokenizer
    alphabet = set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("decoder"))
    added = backend.get_added_tokens_decoder()
    table = np.zeros(max(len(tokenizer), backend.get_vocab_size(with_added_tokens=True)), dtype=np.int64)
    for token, idx in backend.get_vocab(with_added_tokens=True).items():
        if idx in added:
            table[idx] = 0 if added[idx].special else len(token.encode("utf-8"))
        elif byte_level and set(token) <= alphabet:
            table[idx] = len(token)  # one character per byte
        elif _BYTE_TOKEN.fullmatch(token):
            table[idx] = 1
        else:
            table[idx] = len(token.replace("\u2581", " ").encode("utf-8"))
    for idx in getattr(tokenizer, "all_special_ids", []):
        table[idx] = 0
    return table


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *, min_frequency: int = 2, show_progress: bool = False
) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer with `<|bos|>` (id 0) and `<|eos|>` (id 1) on an iterable of documents.

    Digits are split one by one (as in the SmolLM2 and Llama-3 tokenizers), which helps small models with numbers.
    With little text the vocabulary can come out smaller than `vocab_size`; use `len(tokenizer)`.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"vocab size {vocab_size} is too small: byte-level BPE needs 256 byte tokens plus BOS/EOS")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)


def save_tokenizer(tokenizer: "PreTrainedTokenizerFast", folder: str | Path) -> Path:
    """Save so that `AutoTokenizer.from_pretrained(folder)` and `load_tokenizer(folder)` both load it.

    Written to a temporary sibling folder and renamed, so a crash never leaves a half-written tokenizer behind.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    config_path = tmp / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    # NOTE: transformers 5 records its internal class name, which transformers 4 cannot load; both load this one.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def resolve_tokenizer(
    tokenizer_spec: str | None,
    mix: Mix,
    run_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_docs: int = DEFAULT_TOKENIZER_DOCS,
    log: Callable[[str], None] = print,
) -> "PreTrainedTokenizerFast":
    """The tokenizer a run uses, in this order:

    1. `tokenizer_spec` (`--tokenizer`) when given;
    2. `run_dir/tokenizer/` when it exists (a resumed run never re-trains);
    3. the tokenizer stored with a token cache when the mix reads one;
    4. a new one trained on up to `max_docs` training documents of the mix, saved to `run_dir/tokenizer/`.
    In multi-process runs call it on the main process first, then on the others (they load what it saved).
    """
    run_dir = Path(run_dir)
    saved = run_dir / "tokenizer"
    if tokenizer_spec:
        return load_tokenizer(tokenizer_spec)
    if (saved / "tokenizer.json").is_file():
        return load_tokenizer(saved)
    if mix.cache_dir:
        tok = load_tokenizer(Path(mix.cache_dir) / "tokenizer")
    else:
        log(f"training a {vocab_size}-token BPE tokenizer on up to {max_docs:,} documents of {mix.spec} ...")
        with Ticker("tokenizer training", total=max_docs, unit="documents read") as tick:
            tok = train_tokenizer(_counted(sample_texts(mix, max_docs), tick), vocab_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tok, saved)
    log(f"tokenizer: {len(tok):,} tokens, saved to {saved}")
    return tok


def _counted(texts: Iterable[str], tick) -> Iterator[str]:
    for text in texts:
        tick.advance()
        yield text


def sample_texts(mix: Mix, max_docs: int) -> Iterator[str]:
    """Up to `max_docs` training documents, taken in turn from every source of every stage (held-out ones skipped).

    Local sources are read in a shuffled order, streams from their start; a source stops contributing after one pass.
    """
    if mix.cache_dir:
        raise ValueError(f"{mix.cache_dir} is a token cache and holds no text; train a tokenizer on the original data")
    cursors = [SourceCursor(open_source(spec), stream_key("tokenizer", i)) for i, spec in enumerate(mix.sources)]
    taken = 0
    while taken < max_docs and cursors:
        for cursor in list(cursors):
            texts, hashes = cursor.take(1)
            if cursor.epoch > 0:
                cursors.remove(cursor)
            if not is_eval(hashes, mix.eval_fraction)[0]:
                yield texts[0]
                taken += 1
                if taken == max_docs:
                    return


# -----------------------------------------------------------------------------
# Helpers


def _declared_id(tokenizer: "PreTrainedTokenizerFast", which: str) -> int | None:
    token_id = getattr(tokenizer, f"{which}_token_id")
    return token_id if isinstance(token_id, int) else None


def _with_bos_eos(tok: "PreTrainedTokenizerFast") -> "PreTrainedTokenizerFast":
    """Record the BOS/EOS the rule picks on the wrapper, so a saved copy declares them."""
    bos, eos = bos_eos_ids(tok)
    tok.bos_token = tok.convert_ids_to_tokens(bos)
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    return tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE tokenizer on a dataset mix")
    t.add_argument("--dataset", default="builtin", help="dataset mix to read (see data/mix.py); default builtin")
    t.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="vocabulary size including BOS/EOS")
    t.add_argument("--max-docs", type=int, default=DEFAULT_TOKENIZER_DOCS, help="training documents to read")
    t.add_argument("--output", required=True, help="folder to write tokenizer.json and tokenizer_config.json into")
    args = p.parse_args(argv)
    try:
        mix = parse_mix(args.dataset)
        tok = train_tokenizer(sample_texts(mix, args.max_docs), args.vocab_size, show_progress=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_tokenizer(tok, args.output)
    bos, eos = bos_eos_ids(tok)
    print(f"saved a {len(tok):,}-token tokenizer to {args.output} (BOS {bos}, EOS {eos})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
