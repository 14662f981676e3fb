"""Data for pretraining: sources and mixes, tokenizers, packing, the resumable sharded stream, and a token cache.

    mix = parse_mix("smollm")                     # or "builtin", paths, weighted mixes, curriculum stages
    tokenizer = resolve_tokenizer(None, mix, run_dir, vocab_size=32768)
    stream = PackedStream(mix, tokenizer, max_length=4096, batch_size=4, rank=rank, world_size=world, seed=42)
    batch = next(stream)                          # input_ids, labels, position_ids, doc_ids: int64 (4, 4096)
    state = stream.state_dict()                   # JSON; stream.load_state_dict(state) resumes exactly
    held_out = eval_batches(mix, tokenizer, 4096, 4, num_batches=8, rank=rank, world_size=world)
    texts = document_texts(mix, max_docs=1000)     # the held-out documents themselves (eval.py)
    byte_lengths = token_byte_lengths(tokenizer)  # UTF-8 bytes per token id, for bits per byte

See mix.py for the `--dataset` syntax (`describe_mix()` prints it), packing.py for the batch format, stream.py for
sharding/dispatch and resume, prepare.py for the token cache (cache.py reads it), builtin.py for the offline
corpus.
"""

import warnings

from .files import DataError, check_local_files
from .mix import Mix, SourceSpec, Stage, describe_mix, parse_mix
from .packing import IGNORE_INDEX, pack_rows
from .prefetch import Prefetcher
from .sources import document_texts
from .stream import PackedStream, eval_batches, rank_rows
from .tokenizer import (
    bos_eos_ids,
    load_tokenizer,
    resolve_tokenizer,
    save_tokenizer,
    token_byte_lengths,
    train_tokenizer,
)

__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "Mix",
    "PackedStream",
    "Prefetcher",
    "SourceSpec",
    "Stage",
    "bos_eos_ids",
    "check_local_files",
    "describe_mix",
    "document_texts",
    "eval_batches",
    "load_tokenizer",
    "pack_rows",
    "parse_mix",
    "rank_rows",
    "resolve_tokenizer",
    "save_tokenizer",
    "token_byte_lengths",
    "train_tokenizer",
]

# NOTE: `python -m data.tokenizer` runs a module this package has already imported; runpy warns about that, after
# this file ran (harmless here: the module defines functions and its main only runs as __main__).
warnings.filterwarnings("ignore", message=r"'data\.\w+' found in sys\.modules after import of package 'data'")
