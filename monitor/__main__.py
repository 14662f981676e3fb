"""``python -m monitor``: summarise, plot and compare training runs, start TensorBoard, control running jobs.

    python -m monitor summary output_models/llama-360m              # table of final/best losses, throughput
    python -m monitor plot output_models/llama-360m --loss-curves   # loss (and LR) vs tokens -> PNG
    python -m monitor compare output_models/a output_models/b -o ab.png
    python -m monitor tb output_models                              # TensorBoard on http://127.0.0.1:6006
    python -m monitor control list | save JOB | stop JOB | abort JOB

RUN is an output directory (its newest run), a run directory (``<output>/runs/<timestamp>``) or a
``trainer_logs.jsonl`` file.
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from console import ArgumentParser
from lifecycle import control
from lifecycle.checks import bounded
from monitor.logs import read_logs, resolve_log_file
from monitor.progress import format_duration, human


def _label(log_file: Path) -> str:
    """'<output dir>/<run>' for the standard layout, else the file's folder name."""
    run_dir = log_file.parent
    if run_dir.parent.name == "runs":
        return f"{run_dir.parent.parent.name}/{run_dir.name}"
    return run_dir.name or str(log_file)


def _series(records: list[dict], record_type: str, key: str) -> tuple[list[float], list[float]]:
    """(x, y) for one field of one record type; x is tokens when logged, else the step."""
    xs, ys = [], []
    for r in records:
        if r.get("type") == record_type and isinstance(r.get(key), int | float):
            xs.append(r["tokens"] if isinstance(r.get("tokens"), int | float) else r["step"])
            ys.append(r[key])
    return xs, ys


def _x_label(records: list[dict]) -> str:
    return "tokens" if any("tokens" in r for r in records if r.get("type") == "train") else "step"


def _smooth(values: list[float]) -> list[float]:
    """Centred moving average over ~1/50 of the curve: no lag, unlike an EMA (short curves are left as they are)."""
    half = len(values) // 100
    if half == 0:
        return list(values)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _load(run: str) -> tuple[Path, list[dict]]:
    log_file = resolve_log_file(run)
    records = read_logs(log_file)
    if not any(r.get("type") in ("train", "eval") for r in records):
        raise ValueError(f"{log_file} has no train or eval records yet.")
    return log_file, records


def summarize(records: list[dict]) -> dict:
    """Final/best losses, progress and throughput of one run's records."""
    train = [r for r in records if r.get("type") == "train" and isinstance(r.get("loss"), int | float)]
    evals = [r for r in records if r.get("type") == "eval" and isinstance(r.get("loss"), int | float)]
    steps = max((r["step"] for r in records if r.get("type") in ("train", "eval")), default=0)
    times = [r["time"] for r in records if isinstance(r.get("time"), int | float)]
    speeds = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), int | float)]
    mfus = [r["mfu"] for r in train if isinstance(r.get("mfu"), int | float)]
    best_eval = min(evals, key=lambda r: r["loss"], default=None)
    return {
        "steps": steps,
        "tokens": max((r.get("tokens") or 0 for r in train + evals), default=0),
        "final_train_loss": train[-1]["loss"] if train else None,
        "best_train_loss": min(r["loss"] for r in train) if train else None,
        "final_eval_loss": evals[-1]["loss"] if evals else None,
        "best_eval_loss": best_eval["loss"] if best_eval else None,
        "best_eval_step": best_eval["step"] if best_eval else None,
        "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "mean_mfu": sum(mfus) / len(mfus) if mfus else None,
        "wall_time_s": max(times) - min(times) if times else None,
    }


OUTPUT_ROOT = "output_models"  # where train.py puts a run without --output-dir


def newest_run() -> str:
    """The trainer_logs.jsonl written last under OUTPUT_ROOT, for commands given no RUN (said on stderr)."""
    logs = [p for p in Path(OUTPUT_ROOT).glob("*/runs/*/trainer_logs.jsonl") if p.is_file()]
    if not logs:
        raise ValueError(f"no runs under {OUTPUT_ROOT}/ (run from the repository folder, or pass RUN)")
    newest = max(logs, key=lambda p: p.stat().st_mtime)
    print(f"the newest run: {newest.parent}", file=sys.stderr)
    return str(newest)


def _open_image(path: Path) -> None:
    """Show a PNG in the desktop's viewer, where there is one."""
    viewer = next((shutil.which(v) for v in ("xdg-open", "open") if shutil.which(v)), None)
    if viewer is None:
        print(f"no image viewer found (xdg-open, open); the plot is {path}", file=sys.stderr)
        return
    subprocess.Popen([viewer, str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cmd_summary(args: argparse.Namespace) -> int:
    args.runs = args.runs or [newest_run()]
    table = Table(title="training runs")
    for column in (
        "run",
        "steps",
        "tokens",
        "train loss\nfinal / best",
        "eval loss\nfinal / best (step)",
        "tokens/s\nmean",
        "MFU\nmean",
        "wall time",
    ):
        table.add_column(column, justify="left" if column == "run" else "right")
    loaded = [_load(run) for run in args.runs]  # every RUN is checked before anything is printed

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for log_file, records in loaded:
        s = summarize(records)
        best_eval = "-" if s["best_eval_loss"] is None else f"{s['best_eval_loss']:.4f} ({s['best_eval_step']})"
        table.add_row(
            _label(log_file),
            str(s["steps"]),
            human(s["tokens"]),
            f"{num(s['final_train_loss'], '.4f')} / {num(s['best_train_loss'], '.4f')}",
            f"{num(s['final_eval_loss'], '.4f')} / {best_eval}",
            "-" if s["mean_tokens_per_s"] is None else human(s["mean_tokens_per_s"]),
            num(s["mean_mfu"], ".1%"),
            "-" if s["wall_time_s"] is None else format_duration(s["wall_time_s"]),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or file gets the whole table instead of 80-column wrapping
    console.print(table)
    return 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> Path:
    """Write the figure to `out` (a folder: `name` in it); a path that cannot be written is one line (ValueError)."""
    out = Path(out)
    if out.is_dir():
        out = out / name
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120, bbox_inches="tight")
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e}; choose another -o/--output") from None
    print(f"wrote {out}")
    return out


def cmd_plot(args: argparse.Namespace) -> int:
    log_file, records = _load(args.run or newest_run())
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    x, y = _series(records, "train", "loss")
    if x:
        ax.plot(x, y, color="tab:blue", alpha=0.3, linewidth=0.8, label="train loss")
        ax.plot(x, _smooth(y), color="tab:blue", linewidth=1.6, label="train loss (smoothed)")
    x, y = _series(records, "eval", "loss")
    if x:
        ax.plot(x, y, color="tab:orange", marker="o", markersize=4, linewidth=1.6, label="eval loss")
    ax.set_xlabel(_x_label(records))
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    x, y = _series(records, "train", "lr")
    if x:
        lr_ax = ax.twinx()
        lr_ax.plot(x, y, color="tab:gray", linestyle="--", linewidth=1.0, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        more_handles, more_labels = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(_label(log_file))
    written = _save(fig, args.output or log_file.parent, "loss_curves.png")
    plt.close(fig)
    if args.open:
        _open_image(written)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    loaded = [_load(run) for run in args.runs]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (log_file, records) in enumerate(loaded):
        color, label = colors[i % len(colors)], _label(log_file)
        x, y = _series(records, "train", "loss")
        if x:
            ax.plot(x, _smooth(y), color=color, linewidth=1.6, label=f"{label} train (smoothed)")
        x, y = _series(records, "eval", "loss")
        if x:
            ax.plot(x, y, color=color, linestyle="--", marker="o", markersize=4, label=f"{label} eval")
    ax.set_xlabel(_x_label(loaded[0][1]))
    ax.set_ylabel("loss (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("loss curves")
    _save(fig, args.output or Path("."), "loss_compare.png")
    plt.close(fig)
    return 0


def tensorboard_command(logdir: Path, port: int, bind_all: bool) -> list[str]:
    """The TensorBoard command line: localhost only unless ``bind_all``."""
    host = ["--bind_all"] if bind_all else ["--host", "127.0.0.1"]
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port), *host]


def cmd_tb(args: argparse.Namespace) -> int:
    if not args.output_dir.is_dir():
        raise ValueError(f"{args.output_dir} is not a directory; pass the folder holding your runs.")
    try:
        return subprocess.call(tensorboard_command(args.output_dir, args.port, args.bind_all))
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m monitor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    newest = f"default: the newest run under {OUTPUT_ROOT}/"
    p = sub.add_parser("summary", help="table of final/best losses, tokens, throughput, wall time")
    p.add_argument("runs", nargs="*", metavar="RUN", help=f"output dir, run dir or trainer_logs.jsonl ({newest})")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("plot", help="PNG of train/eval loss and LR vs tokens")
    p.add_argument("run", nargs="?", metavar="RUN", help=f"output dir, run dir or trainer_logs.jsonl ({newest})")
    p.add_argument("--loss-curves", action="store_true", help="loss curves (the default and only plot for now)")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: <run dir>/loss_curves.png)")
    p.add_argument("-e", "--open", action="store_true", help="open the PNG in the desktop's image viewer")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("compare", help="PNG of several runs' loss curves overlaid")
    p.add_argument("runs", nargs="+", metavar="RUN", help="output dirs, run dirs or trainer_logs.jsonl files")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: ./loss_compare.png)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("tb", help="start TensorBoard over an output folder")
    p.add_argument("output_dir", nargs="?", type=Path, default=Path(OUTPUT_ROOT), help=f"default: {OUTPUT_ROOT}")
    p.add_argument("--all", action="store_true", help=f"every run under {OUTPUT_ROOT}/ (the default)")
    p.add_argument("--port", type=bounded(int, 1, 65535), default=6006, help="port (default: 6006)")
    p.add_argument("--bind-all", action="store_true", help="listen on all interfaces, not only 127.0.0.1")
    p.set_defaults(func=cmd_tb)

    p = sub.add_parser("control", help="list running jobs; save / stop / abort one", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER, help="see `python -m monitor control --help`")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["control"]:
        return control.main(argv[1:], prog="python -m monitor control")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
