"""Prepare the next batches on a background thread while the accelerator trains on the current one.

Tokenization (Rust, releases the GIL) and packing then overlap with the training step. Each batch travels with the
stream state *after* it, so ``state_dict()`` describes exactly the batches the trainer has consumed, not the ones
prepared ahead: resume stays exact.
"""

from __future__ import annotations

import queue
import threading


class Prefetcher:
    """Iterator over ``stream`` that keeps up to ``depth`` batches ready; drop-in for the stream in the loop.

    pin: hand out batches in page-locked host memory (for a CUDA device), pinned on this thread.

    NOTE: only for streams whose ``__next__`` does no collective communication (the default sharded mode): a
    dispatched stream broadcasts from rank 0 and must run on the main thread, in step with the other ranks.
    """

    def __init__(self, stream, depth: int = 2, pin: bool = False):
        self.stream, self.pin = stream, pin
        self._state, self.current_stage, self.epoch = stream.state_dict(), stream.current_stage, stream.epoch
        self._counts = stream.source_counts()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="data-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                stream = self.stream
                batch = next(stream)
                if self.pin:  # page-locked, so the copy to the GPU runs asynchronously (non_blocking)
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                item = (batch, stream.state_dict(), stream.current_stage, stream.epoch, stream.source_counts())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in the training thread at the next batch
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._state, self.current_stage, self.epoch, self._counts = item
        return batch

    def source_counts(self) -> dict[str, dict[str, int]]:
        """The stream's per-source counts as of the last batch handed out."""
        return self._counts

    def state_dict(self) -> dict:
        """The position after the last batch handed out (the prepared-ahead ones are not counted)."""
        return self._state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
