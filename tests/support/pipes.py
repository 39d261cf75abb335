"""An OS pipe for tests of what the gate writes to a descriptor."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def os_pipe() -> Iterator[tuple[int, int]]:
    """(read end, write end) of a new pipe, both closed afterwards (if the
    test has not closed them already)."""
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)
