"""Old import path of the process lifecycle, kept for existing imports.

The life of one process is :mod:`process`; the supervisor of workers is
:mod:`supervisor`.
"""

from .process import Process, start_fd_watch, start_watchdog

__all__ = ["Process", "start_fd_watch", "start_watchdog"]
