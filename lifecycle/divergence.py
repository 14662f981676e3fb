"""Divergence detection: abort a run whose loss has blown up instead of burning compute on it.

Two exponential moving averages (EMAs) follow the training loss: a fast one (a window of ~5 updates) and a slow
one (~100 updates). While training is healthy the loss drifts down, so the fast EMA sits at or below the slow one.
When the loss jumps up and stays up, the fast EMA follows within a few steps while the slow one barely moves; once
``fast - slow > threshold`` (1.0 nat by default) the detector reports divergence. A non-finite loss or gradient
norm is reported at once, armed or not. Eval losses get their own pair, tuned for being much rarer and much less
noisy: the "fast" one is the latest eval itself, the slow one an EMA over the last few evals.

Call ``update`` every optimizer step (the EMA constants are per update; calling it only at the logging cadence
would make it fire ~100× later in steps). It returns ``None`` or a one-line reason.

What the run does with a reason (the policy lives in lifecycle/policy.py, not here):
- abort: log an ``event`` record with the reason, do NOT save (the current weights are the diverged ones), and
  exit with status 1, naming the newest checkpoint as the safe point to resume from (with a lower LR, say);
- the alternatives, stop (save, then exit) or rollback (reload the last checkpoint and continue, skipping the
  offending data), keep training on compute that is usually better spent on a fixed configuration.
"""

import math


class _DualEMA:
    """A fast and a slow EMA of one series; both start at the first value."""

    def __init__(self, fast_alpha: float, slow_alpha: float) -> None:
        self.fast_alpha, self.slow_alpha = fast_alpha, slow_alpha
        self.fast: float | None = None
        self.slow: float | None = None
        self.count = 0

    def update(self, value: float) -> None:
        if self.fast is None or self.slow is None:
            self.fast = self.slow = value
        else:
            self.fast += self.fast_alpha * (value - self.fast)
            self.slow += self.slow_alpha * (value - self.slow)
        self.count += 1

    @property
    def gap(self) -> float:
        return 0.0 if self.fast is None or self.slow is None else self.fast - self.slow

    def state_dict(self) -> dict:
        return {"fast": self.fast, "slow": self.slow, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.fast, self.slow, self.count = state["fast"], state["slow"], int(state["count"])


class DivergenceDetector:
    """Dual time-scale divergence detector for the training loss (per step) and the eval loss (per eval).

    With the defaults (fast 0.2, slow 0.01, threshold 1.0) a sustained jump of 2 nats fires about 4 steps after
    it and a jump of 1.5 nats after 6-7, while per-step noise of 0.1-0.2 nats moves the fast-slow gap by only
    ~0.05-0.1. For evals (fast 1.0, slow 0.3) a jump of 2 nats fires at the first eval after it (1.5 nats once the
    eval curve has flattened, as ``0.7 × (jump − lag of the slow EMA)`` must exceed the threshold); evals before
    ``warmup_steps`` (e.g. the one at step 0) are not fed in at all, since the loss still falls by nats per eval.

    Args:
        threshold: nats by which the fast EMA must exceed the slow one.
        fast_alpha / slow_alpha: per-update weights of the newest training loss in the two EMAs.
        warmup_steps: the gap test is armed only from this step on (early losses fall too fast for the slow EMA).
        eval_fast_alpha / eval_slow_alpha: the same for eval losses; the eval test also needs two evals first.
    """

    def __init__(
        self,
        threshold: float = 1.0,
        fast_alpha: float = 0.2,
        slow_alpha: float = 0.01,
        warmup_steps: int = 500,
        eval_fast_alpha: float = 1.0,
        eval_slow_alpha: float = 0.3,
    ) -> None:
        if not 0 < slow_alpha < fast_alpha <= 1:
            raise ValueError(f"need 0 < slow_alpha < fast_alpha <= 1, got slow {slow_alpha} and fast {fast_alpha}.")
        if not 0 < eval_slow_alpha < eval_fast_alpha <= 1:
            raise ValueError(
                f"need 0 < eval_slow_alpha < eval_fast_alpha <= 1, got {eval_slow_alpha} and {eval_fast_alpha}."
            )
        self.threshold = threshold
        self.warmup_steps = warmup_steps
        self.train = _DualEMA(fast_alpha, slow_alpha)
        self.eval = _DualEMA(eval_fast_alpha, eval_slow_alpha)

    def update(self, step: int, loss: float, grad_norm: float | None = None) -> str | None:
        """Feed one training step's loss (and grad norm); returns a reason string when the run has diverged."""
        loss = float(loss)
        if not math.isfinite(loss):
            return f"training loss is {loss} at step {step}"
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            return f"gradient norm is {float(grad_norm)} at step {step}"
        self.train.update(loss)
        if step >= self.warmup_steps and self.train.gap > self.threshold:
            return self._reason("training", step)
        return None

    def update_eval(self, step: int, loss: float) -> str | None:
        """Feed one evaluation's loss; returns a reason string when the eval loss has diverged."""
        loss = float(loss)
        if not math.isfinite(loss):
            return f"eval loss is {loss} at step {step}"
        if step < self.warmup_steps:
            return None
        self.eval.update(loss)
        if self.eval.count >= 2 and self.eval.gap > self.threshold:
            return self._reason("eval", step)
        return None

    def _reason(self, which: str, step: int) -> str:
        ema = self.train if which == "training" else self.eval
        return (
            f"{which} loss diverged at step {step}: fast EMA {ema.fast:.3f} is {ema.gap:.3f} nats above "
            f"slow EMA {ema.slow:.3f} (threshold {self.threshold})"
        )

    def state_dict(self) -> dict:
        """JSON-serialisable state, saved with each checkpoint so the EMAs survive a resume."""
        return {"train": self.train.state_dict(), "eval": self.eval.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.train.load_state_dict(state["train"])
        self.eval.load_state_dict(state["eval"])
