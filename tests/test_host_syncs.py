"""No host read of a device value on a training step that does not log: the loss and the grad norm stay on the
device until a boundary step (logging, evaluation, a scheduled save, the last step), where they are read at once.

Counted on a CUDA-free run of train.py as the calls that would make a GPU wait (`aten::_local_scalar_dense`, behind
`.item()`, `float()`, `bool()` of a tensor, and `aten::nonzero`), attributed to the optimizer update in progress.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train as train_script
from schedule.lr import InfiniteLR

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class DeviceReads(TorchDispatchMode):
    """Records, for each read, how many optimizer updates had been made."""

    def __init__(self, updates: list[int]) -> None:
        super().__init__()
        self.updates, self.reads = updates, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.reads.append(self.updates[0])
        return func(*args, **(kwargs or {}))


def test_no_device_read_on_a_step_that_does_not_log(tmp_path, monkeypatch):
    updates = [0]
    real_step = InfiniteLR.step

    def counted_step(self):
        updates[0] += 1
        real_step(self)

    monkeypatch.setattr(InfiniteLR, "step", counted_step)
    argv = ["--model", "tiny", "--dataset", "builtin", "--vocab-size", "512", "--tokenizer-docs", "300",
            "--max-length", "64", "--batch-size", "2", "--max-steps", "9", "--step-cadence", "0.06",
            "--attn-implementation", "eager", "--sample-tokens", "0", "--save-strategy", "no", "--init-model",
            "--output-dir", str(tmp_path / "run")]  # fmt: skip
    train_script.main([*argv, "--max-steps", "1"])  # the tokenizer is trained outside the counted run
    updates[0] = 0
    with DeviceReads(updates) as mode:
        code = train_script.main([*argv, "--tokenizer", str(tmp_path / "run" / "tokenizer"), "--output-dir",
                                  str(tmp_path / "counted")])  # fmt: skip
    assert code == 0
    # logging every 3 steps (100 x 0.06 / 2 sequences); evaluation only at steps 0 and 9; no scheduled save
    boundaries = {0, 3, 6, 9}
    per_update = {k: mode.reads.count(k) for k in range(10)}
    assert all(per_update[k] == 0 for k in range(10) if k not in boundaries), per_update
    assert all(per_update[k] > 0 for k in (3, 6, 9)), per_update  # the boundaries do read: the count is live
