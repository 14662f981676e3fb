"""Training progress on the console: a live ``rich`` bar in a terminal, plain log lines everywhere else."""

import time

from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.progress import TextColumn

from console import print_through, stop_printing_through
from console import say as say  # re-exported: the rank-0 print of every package lives in console.py


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (SI prefixes, 3 significant digits)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{prefix}{unit}"
    return f"{n:.3g}{unit}"


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s'."""
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Step / token-budget progress with the latest training metrics.

    ``update`` is called at the logging cadence with the step, tokens seen so far and the logged metrics (any of
    ``loss, lr, grad_norm, tokens_per_s, mfu, peak_mem_bytes``). In a terminal it drives a live display and
    ``print`` writes above it; otherwise (CI, a file, a pipe) each ``update`` prints one plain line.
    The ETA is the remaining steps times the mean step time since this process started.
    """

    def __init__(
        self,
        total_steps: int,
        total_tokens: int,
        *,
        enabled: bool = True,
        start_step: int = 0,
        console: Console | None = None,
        ema_alpha: float = 0.1,
    ) -> None:
        self.total_steps, self.total_tokens = total_steps, total_tokens
        self.enabled = enabled
        self.console = console or Console()
        self.ema_alpha = ema_alpha
        self.loss_ema: float | None = None
        self._start = (start_step, time.perf_counter())
        self._live: RichProgress | None = None
        if enabled and self.console.is_terminal:
            # One line fitted to the terminal's width at each update (fit_line): rich's own columns would truncate
            # the step and the ETA first on a narrow terminal.
            line = TextColumn("{task.fields[line]}", markup=False)
            self._live = RichProgress(line, console=self.console, refresh_per_second=2)
            first = f"step {start_step}/{total_steps}"
            self._task = self._live.add_task("train", total=max(total_tokens, 1), line=first)
            self._live.start()
        if enabled:
            print_through(self.print)

    def _fields(self, step: int, tokens: int, metrics: dict) -> dict[str, str]:
        loss = metrics.get("loss")
        if loss is not None:
            self.loss_ema = loss if self.loss_ema is None else self.loss_ema + self.ema_alpha * (loss - self.loss_ema)
        start_step, start_time = self._start
        eta = "?"
        if step > start_step:
            eta = format_duration((self.total_steps - step) * (time.perf_counter() - start_time) / (step - start_step))
        fraction = tokens / self.total_tokens if self.total_tokens else 0.0
        fields = {
            "step": f"step {step}/{self.total_steps}",
            "fraction": f"{fraction:.1%}",
            "tokens": f"{human(tokens)}/{human(self.total_tokens)} tok",
            "eta": f"eta {eta}",
        }
        if loss is not None:
            fields |= {"loss": f"loss {loss:.4f}", "ema": f"(ema {self.loss_ema:.4f})"}
        if metrics.get("lr") is not None:
            fields["lr"] = f"lr {metrics['lr']:.2e}"
        if metrics.get("grad_norm") is not None:
            fields["gnorm"] = f"gnorm {metrics['grad_norm']:.3f}"
        if metrics.get("tokens_per_s") is not None:
            fields["speed"] = f"{human(metrics['tokens_per_s'])} tok/s"
        if metrics.get("mfu") is not None:
            fields["mfu"] = f"mfu {metrics['mfu']:.1%}"
        if metrics.get("peak_mem_bytes") is not None:
            fields["mem"] = f"mem {metrics['peak_mem_bytes'] / 2**30:.2f}GiB"
        return fields

    def update(self, step: int, tokens: int, metrics: dict) -> None:
        if not self.enabled:
            return
        f = self._fields(step, tokens, metrics)
        if self._live is not None:
            fraction = tokens / self.total_tokens if self.total_tokens else 0.0
            self._live.update(self._task, completed=tokens, line=fit_line(f, fraction, self.console.width - 1))
            return
        token_text = f"{f['tokens']} ({f['fraction']})"
        metric_text = " | ".join(
            " ".join(f[k] for k in group if k in f)
            for group in (("loss", "ema"), ("lr",), ("gnorm",), ("speed",), ("mfu",), ("mem",))
            if group[0] in f
        )
        self.print(f"{f['step']} | {token_text} | {f['eta']} | {metric_text}")

    def print(self, msg: str) -> None:
        """Print a line above the live display (or plainly when there is none)."""
        if not self.enabled:
            return
        if self._live is not None:
            self._live.console.print(msg, markup=False, highlight=False)
        else:
            # NOTE: plain print, not Console.print, which would wrap long lines at 80 columns in non-terminals.
            print(msg, file=self.console.file, flush=True)

    def close(self) -> None:
        stop_printing_through(self.print)
        if self._live is not None:
            self._live.stop()
            self._live = None


# What a narrow terminal keeps: the step, the fraction done, the ETA and the loss always; then, while they fit, the
# bar, the tokens, the loss EMA, the LR, the grad norm, throughput, MFU and memory.
ESSENTIAL = ("step", "fraction", "eta", "loss")
OPTIONAL = ("bar", "tokens", "ema", "lr", "gnorm", "speed", "mfu", "mem")
ORDER = ("step", "bar", "fraction", "tokens", "eta", "loss", "ema", "lr", "gnorm", "speed", "mfu", "mem")
BAR_WIDTH = (10, 30)  # a bar narrower than 10 cells says nothing; wider than 30 it only takes room


def fit_line(fields: dict[str, str], fraction: float, width: int) -> str:
    """The progress line for a terminal of `width` columns: every essential field, and optional ones in order of
    importance while the line still fits (the bar takes what is left, between 10 and 30 cells)."""
    shown = [k for k in ESSENTIAL if k in fields]

    def length(keys) -> int:
        return sum(len(fields[k]) for k in keys if k != "bar") + len(keys) - 1

    for key in OPTIONAL:
        if key == "bar":
            if width - length(shown) - 1 >= BAR_WIDTH[0]:
                shown.append("bar")
        elif key in fields and length([*shown, key]) + (BAR_WIDTH[0] if "bar" in shown else 0) <= width:
            shown.append(key)
    bar = ""
    if "bar" in shown:
        cells = max(BAR_WIDTH[0], min(BAR_WIDTH[1], width - length(shown) - 1))
        done = round(cells * min(max(fraction, 0.0), 1.0))
        bar = "━" * done + "─" * (cells - done)
    return " ".join(bar if k == "bar" else fields[k] for k in ORDER if k in shown)
