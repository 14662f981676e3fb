"""What a run says to the user: one rank-0 print helper and the one-line bad-input error, for every package.

On the ground floor (it imports nothing of the project), so models, data and every tool can use it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable

_printer: Callable[[str], None] | None = None  # a live display that draws its own lines (monitor.Progress)


class UsageError(ValueError):
    """Bad input: reported in one line with exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit code 2), like every other bad input; its subcommands too."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


@contextlib.contextmanager
def bad_input():
    """ValueError/FileNotFoundError from reading user-supplied things (data, tokenizer, configs) is bad input."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None


def is_main_process() -> bool:
    """Rank 0, or no launcher at all (every launcher we support sets RANK before the script starts)."""
    return int(os.environ.get("RANK", "0")) == 0


def is_node_main() -> bool:
    """The first process on its machine (every launcher we support sets LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def say(text: str, *, err: bool = False, every_node: bool = False) -> None:
    """The one way a run prints: on the main process only (`every_node`: on each machine's first process, for what
    must reach every node's terminal, such as why the run ended), above the live progress display when one is shown."""
    if not (is_node_main() if every_node else is_main_process()):
        return
    if _printer is not None and not err:
        _printer(text)
    else:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)


def print_through(printer: Callable[[str], None] | None) -> None:
    """Route `say` through a live display's own printer (None: print plainly again)."""
    global _printer
    _printer = printer


def stop_printing_through(printer: Callable[[str], None]) -> None:
    """Undo `print_through(printer)`, if that printer is still the one in use."""
    global _printer
    if _printer == printer:
        _printer = None


class Ticker:
    """Progress of a long phase on stderr: a live bar on a terminal, else one plain line every `every` seconds (and
    none for a phase shorter than that), so logs of batch jobs show it too. Use as a context manager.

        with Ticker("scoring", total=len(windows), unit="windows") as tick:
            for batch in batches:
                ...
                tick.advance(len(batch))
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "", every: float = 30.0, stream=None):
        import time

        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream = stream or sys.stderr
        self.done, self._clock, self._bar = 0, time.monotonic, None
        self._last = self._clock()
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(file=self.stream), transient=True)
            self._task = self._bar.add_task(f"{label} ({unit})" if unit else label, total=total)

    def __enter__(self) -> Ticker:
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self._clock() - self._last >= self.every:
            self._last = self._clock()
            of = f"/{self.total:,}" if self.total is not None else ""
            print(f"{self.label}: {self.done:,}{of} {self.unit}".rstrip(), file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
