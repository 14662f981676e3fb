"""Convert a training checkpoint into the Hugging Face folder a finished run writes as `final/`.

    python export.py output_models/run/checkpoints/checkpoint-6000 output_models/run/hf-6000
    python export.py CHECKPOINT OUT --tokenizer path/to/tokenizer   # when the run's tokenizer/ is gone

A checkpoint of any layout converts (one process, DDP, a K-stage pipeline, FSDP): its model-<k>.safetensors parts
(FSDP: the shards in model/) are merged by parameter name (lifecycle.checkpoint.load_checkpoint, the loader a
resume uses) and written by models.hf.export_hf, the function train.py writes `final/` with, so converting the
last checkpoint of a run gives the same folder as its `final/`. A checkpoint that verifies but whose contents a run
cannot have written (lifecycle.checkpoint.run_contents) is damaged. The tokenizer is the run's own copy in
`<output-dir>/tokenizer/` (for older runs that kept none: the run's `--tokenizer`, else the `--init-from`
model's), checked against the one the checkpoint records.

Bad input (not a checkpoint, a damaged one, an existing non-empty OUT, no tokenizer, or another tokenizer than the
run trained with) prints one line and exits 2, with nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from data.tokenizer import load_tokenizer, tokenizer_hash
from lifecycle.checkpoint import load_checkpoint, run_contents, verify
from lifecycle.outdir import publish_dir
from models.card import RunSummary
from models.config import ModelConfig
from models.hf import export_hf
from models.model import Transformer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message}; see python export.py --help\n")


def _tokenizer_spec(checkpoint: Path, trainer: dict, override: str | None) -> str:
    """The tokenizer the run trained with: its own `tokenizer/`, else what it was given (runs that kept no copy)."""
    if override:
        return override
    own = checkpoint.parent.parent / "tokenizer"
    if (own / "tokenizer.json").is_file():
        return str(own)
    args = trainer.get("args", {})
    if args.get("tokenizer"):
        return args["tokenizer"]
    if args.get("init_from") and (Path(args["init_from"]) / "tokenizer.json").is_file():
        return args["init_from"]
    raise ValueError(f"no tokenizer found for {checkpoint} (looked for {own}); pass --tokenizer")


def convert(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | None = None) -> Path:
    """Write the Hugging Face folder of `checkpoint` to `out_dir`; ValueError for bad input (nothing written)."""
    path, out = Path(checkpoint), Path(out_dir)
    weights = any(path.glob("model-*.safetensors")) or any((path / "model").glob("*.safetensors"))
    if not (path / "trainer_state.json").is_file() or not weights:
        raise ValueError(
            f"{path} is not a checkpoint of train.py (expected trainer_state.json and model-<k>.safetensors, or "
            "FSDP's model/ shards, "
            "as in output_models/<run>/checkpoints/checkpoint-<step>)"
        )
    problem = verify(path, run_contents)
    if problem is not None:
        raise ValueError(f"{path} is damaged ({problem}); convert another checkpoint")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty folder; choose a new output folder")
    trainer = json.loads((path / "trainer_state.json").read_text())
    cfg = ModelConfig.from_dict(trainer["model_config"])
    state = load_checkpoint(path, rank=0)["model_state"]
    with torch.device("meta"):
        expected = set(Transformer(cfg).state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match its model config (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    spec = _tokenizer_spec(path, trainer, tokenizer)
    tok = load_tokenizer(spec)
    trained_with = trainer.get("tokenizer_hash")  # recorded by checkpoints since the tokenizer check on resume
    if trained_with and tokenizer_hash(tok) != trained_with:
        raise ValueError(f"the tokenizer {spec} is not the one {path} was trained with; pass that one with --tokenizer")
    summary = RunSummary.from_trainer_state(trainer)
    with publish_dir(out) as folder:  # OUT appears complete or not at all
        export_hf(state, cfg, folder, tokenizer=tok, max_length=summary.max_length, summary=summary)
    return out


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python export.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder: <output-dir>/checkpoints/checkpoint-<step>")
    p.add_argument("out_dir", help="the Hugging Face folder to write (must not exist, or be empty)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, folder or Hub name (default: the run's own)")
    args = p.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out_dir, args.tokenizer)
    except (ValueError, KeyError, OSError) as e:
        message = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"Hugging Face model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
