"""What compiling costs and whether it holds: the first step's compile time and recompiles during training.

`Transformer.compile_loss_path` compiles the model's loss path; `CompileWatch` wraps each training step and reads
TorchDynamo's own counters (`torch._dynamo.utils.counters["stats"]["unique_graphs"]`, the graphs compiled so far in
this process). Step 1 compiles the training graph (the first evaluation compiled the no-grad one); a graph compiled
during a later step means something varies that should not (a shape, a dtype, a Python value the block reads), and
every such step pays a full compile again, so the run warns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from torch._dynamo.utils import counters


def compiled_graphs() -> int:
    """Graphs TorchDynamo has compiled in this process so far."""
    return int(counters["stats"]["unique_graphs"])


class CompileWatch:
    """Wrap each training step: reports step 1's time (the compile) and warns about any graph compiled after step 2.

    `report(text, err=False)` prints (train.py passes its `say`). Disabled, it only runs the step.
    """

    def __init__(self, report: Callable[..., None], enabled: bool = True) -> None:
        self.report, self.enabled = report, enabled
        self.first_step_s: float | None = None
        self.recompiles = 0  # graphs compiled during steps after step 2

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        before, start = compiled_graphs(), time.perf_counter()
        yield
        seconds, new = time.perf_counter() - start, compiled_graphs() - before
        if self.first_step_s is None:
            self.first_step_s = seconds
            self.report(
                f"compile: first step {seconds:.1f}s, {compiled_graphs()} graphs compiled (evaluation included)"
            )
        elif step > 2 and new:
            self.recompiles += new
            self.report(
                f"warning: compile: {new} graph(s) recompiled during step {step} ({self.recompiles} since step 2); "
                "rerun with TORCH_LOGS=recompiles to see which guard failed",
                err=True,
            )
