"""Training progress on the console: a live ``rich`` bar in a terminal, plain log lines everywhere else."""

import time

from rich.console import Console
from rich.progress import BarColumn, TextColumn
from rich.progress import Progress as RichProgress

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
            self._live = RichProgress(
                TextColumn("[bold]step {task.fields[step]}"),
                BarColumn(),
                TextColumn("{task.fields[tokens]}  eta {task.fields[eta]}"),
                TextColumn("{task.fields[metrics]}"),
                console=self.console,
                refresh_per_second=2,
            )
            self._task = self._live.add_task(
                "train", total=max(total_tokens, 1), step=f"{start_step}/{total_steps}", tokens="", eta="?", metrics=""
            )
            self._live.start()
        if enabled:
            print_through(self.print)

    def _describe(self, step: int, tokens: int, metrics: dict) -> tuple[str, str, str]:
        loss = metrics.get("loss")
        if loss is not None:
            self.loss_ema = loss if self.loss_ema is None else self.loss_ema + self.ema_alpha * (loss - self.loss_ema)
        start_step, start_time = self._start
        eta = "?"
        if step > start_step:
            eta = format_duration((self.total_steps - step) * (time.perf_counter() - start_time) / (step - start_step))
        fraction = tokens / self.total_tokens if self.total_tokens else 0.0
        token_text = f"{human(tokens)}/{human(self.total_tokens)} tok ({fraction:.1%})"
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.4f} (ema {self.loss_ema:.4f})")
        if metrics.get("lr") is not None:
            parts.append(f"lr {metrics['lr']:.2e}")
        if metrics.get("grad_norm") is not None:
            parts.append(f"gnorm {metrics['grad_norm']:.3f}")
        if metrics.get("tokens_per_s") is not None:
            parts.append(f"{human(metrics['tokens_per_s'])} tok/s")
        if metrics.get("mfu") is not None:
            parts.append(f"mfu {metrics['mfu']:.1%}")
        if metrics.get("peak_mem_bytes") is not None:
            parts.append(f"mem {metrics['peak_mem_bytes'] / 2**30:.2f}GiB")
        return token_text, eta, " | ".join(parts)

    def update(self, step: int, tokens: int, metrics: dict) -> None:
        if not self.enabled:
            return
        token_text, eta, metric_text = self._describe(step, tokens, metrics)
        if self._live is not None:
            self._live.update(
                self._task,
                completed=tokens,
                step=f"{step}/{self.total_steps}",
                tokens=token_text,
                eta=eta,
                metrics=metric_text,
            )
        else:
            self.print(f"step {step}/{self.total_steps} | {token_text} | eta {eta} | {metric_text}")

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
