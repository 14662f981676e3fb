"""A start's tokenizer, staged: written beside the run's own and moved into `tokenizer/` only once the start is valid,
so a refused start never replaces the tokenizer a run's checkpoints were trained with."""

from __future__ import annotations

import shutil
from pathlib import Path

import data
from console import bad_input, say
from data.tokenizer import check_fits, tokenizer_hash
from lifecycle.outdir import publish_dir


def build_tokenizer(run, is_main: bool, barrier):
    """--tokenizer, else the run's own `tokenizer/` (never for --init-model), else one trained from the data.

    The main process decides; a tokenizer that differs from the run's saved one is staged beside it, the other
    processes load it from there, and `publish_tokenizer` moves it into `tokenizer/` only once the whole start has
    been validated, so a refused start never replaces the tokenizer a run's checkpoints were trained with.
    """
    saved, staging = run.output_dir / "tokenizer", run.output_dir / STAGING
    staged = staging / "tokenizer"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        with bad_input():
            if run.tokenizer:
                tok = data.load_tokenizer(run.tokenizer)
                check_fits(tok, run.mix, run.tokenizer, warn=lambda m: say(m, err=True))
            elif (saved / "tokenizer.json").is_file() and not run.args.init_model:
                tok = data.load_tokenizer(saved)
            else:  # trained (or taken from a token cache) and saved into the staging folder
                tok = data.resolve_tokenizer(
                    None, run.mix, staging, vocab_size=run.args.vocab_size, max_docs=run.args.tokenizer_docs, log=say
                )
            if not staged.is_dir() and not _same_tokenizer(tok, saved):
                data.save_tokenizer(tok, staged)
    barrier()
    if is_main:
        return tok
    with bad_input():
        return data.load_tokenizer(run.tokenizer or (staged if staged.is_dir() else saved))


STAGING = ".tmp-start"  # what a start writes before it is known to be valid


def _same_tokenizer(tok, folder: Path) -> bool:
    if not (folder / "tokenizer.json").is_file():
        return False
    try:
        return tokenizer_hash(data.load_tokenizer(folder)) == tokenizer_hash(tok)
    except (ValueError, OSError):
        return False


def staged_tokenizer(output_dir: Path) -> bool:
    """True when this start trained or brought a tokenizer that `publish_tokenizer` will move into place."""
    return (output_dir / STAGING / "tokenizer").is_dir()


def publish_tokenizer(output_dir: Path) -> None:
    """Move a staged tokenizer into `tokenizer/` (atomically); call on the main process once the start is valid."""
    staged = output_dir / STAGING / "tokenizer"
    if staged.is_dir():
        with publish_dir(output_dir / "tokenizer") as folder:
            shutil.copytree(staged, folder, dirs_exist_ok=True)
    shutil.rmtree(output_dir / STAGING, ignore_errors=True)
