"""What a run says to the user: one rank-0 print helper and the one-line bad-input error, for every package.

On the ground floor (it imports nothing of the project), so models, data and every tool can use it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

_printer: Callable[[str], None] | None = None  # a live display that draws its own lines (monitor.Progress)


class UsageError(ValueError):
    """Bad input: reported in one line with exit code 2."""


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


def say(text: str, *, err: bool = False) -> None:
    """The one way a run prints: on the main process only, above the live progress display when one is shown."""
    if not is_main_process():
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
