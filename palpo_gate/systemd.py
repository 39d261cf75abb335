"""What systemd and the gate say to each other (docs/DESIGN.md section 6), without libsystemd.

This module owns three environment contracts of the service manager, each
written against its man page and libsystemd's ``sd-daemon.c``:

- ``NOTIFY_SOCKET`` (sd_notify(3)): one datagram of newline-separated
  ``KEY=VALUE`` assignments (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
  ``WATCHDOG=1``, ``STATUS=…``) to an AF_UNIX SOCK_DGRAM address; a leading
  ``@`` names the abstract namespace.
- ``WATCHDOG_USEC`` / ``WATCHDOG_PID`` (sd_watchdog_enabled(3)): how often the
  main process must send ``WATCHDOG=1``.
- ``LISTEN_PID`` / ``LISTEN_FDS`` / ``LISTEN_FDNAMES``
  (sd_listen_fds_with_names(3)): listening sockets passed at fd 3, 4, …

It must not import aiohttp, read the gate's config or decide *when* to
notify: the process (:mod:`process`, :mod:`supervisor`) does that. A notification is advice to the
service manager, so :func:`notify` never raises into the run loop; outside
systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("palpo_gate.systemd")

# -- sd_notify(3) --------------------------------------------------------------------

READY = "READY=1"
STOPPING = "STOPPING=1"
WATCHDOG = "WATCHDOG=1"

#: How long one notification may wait for room in the receiver's queue. An
#: AF_UNIX datagram send blocks while the receiver's queue is full; PID 1
#: drains its queue quickly, and a stalled service manager must not stall the
#: event loop for longer than this.
NOTIFY_SEND_TIMEOUT = 1.0


def notify_address(value: str) -> str | None:
    """The AF_UNIX address named by a ``NOTIFY_SOCKET`` value, or None.

    sd_notify(3): "/path" is a file system socket, "@name" a socket in the
    abstract namespace (the "@" stands for the leading NUL byte). systemd
    ≥ 254 may also hand out "vsock:CID:PORT" (a service manager outside a VM);
    the gate does not run there, so that and anything else is None.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def notify(state: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Send *state* to the service manager; True if the datagram was sent.

    False, without an exception, when ``NOTIFY_SOCKET`` is unset (not run by
    systemd, or ``Type=`` is not ``notify``), names an address this module
    does not speak, or the send fails (logged at debug level).

    A fresh socket per call, as libsystemd does: nothing is cached, so nothing
    goes stale across fork(), and at one notification every few seconds a
    socket() call costs nothing. Being sent is not being accepted: with
    ``NotifyAccess=main`` a message from a worker process is dropped by
    systemd (with a warning in the journal), so only the main process should
    call this.
    """
    value = env.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = notify_address(value)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r is not an AF_UNIX address; %r not sent", value, state)
        return False
    try:
        data = state.encode("utf-8")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(NOTIFY_SEND_TIMEOUT)
            sock.sendto(data, address)
    except (OSError, UnicodeError) as exc:
        log.debug("sd_notify %r to NOTIFY_SOCKET=%r failed: %s", state, value, exc)
        return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock of ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def reloading_message() -> str:
    """``RELOADING=1`` with the ``MONOTONIC_USEC=`` systemd pairs it with.

    Under ``Type=notify-reload`` (systemd ≥ 253) the timestamp tells systemd
    that this reload began after the signal it sent; from 257 on, a reload
    without it never completes. Older versions ignore the field. Send
    ``READY=1`` when the reload is done, whether it succeeded or not.
    """
    return f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}"


def status_message(text: str) -> str:
    """``STATUS=text`` on one line: a newline in *text* would start another
    assignment (``READY=1`` smuggled in through an error message)."""
    return "STATUS=" + " ".join(text.splitlines())


# -- sd_watchdog_enabled(3) ----------------------------------------------------------

_UINT = re.compile(r"[0-9]+")
_USEC_INFINITY = 2**64 - 1  # "no timeout" in systemd's usec_t


def _uint(text: str) -> int | None:
    """A decimal as systemd writes it: ASCII digits only (no sign, no blanks)."""
    return int(text) if _UINT.fullmatch(text) else None


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between two ``WATCHDOG=1``, or None when no watchdog is armed.

    ``WATCHDOG_USEC`` is the deadline (``WatchdogSec=``); sd_watchdog_enabled(3)
    advises sending at half of it. The watchdog is for this process only if
    ``WATCHDOG_PID`` is unset or names it (a forked worker inherits the
    variables but is not the one systemd watches). A value that is not a
    positive finite microsecond count is treated as no watchdog.
    """
    usec = _uint(env.get("WATCHDOG_USEC", ""))
    if usec is None or usec == 0 or usec >= _USEC_INFINITY:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid is not None and _uint(pid) != os.getpid():
        return None
    return usec / 2 / 1_000_000


# -- sd_listen_fds_with_names(3) -----------------------------------------------------

SD_LISTEN_FDS_START = 3
#: sd_listen_fds_with_names(3)'s name for every fd when LISTEN_FDNAMES is unset.
#: (systemd itself always sets it: FileDescriptorName= defaults to the socket
#: unit's name, e.g. "palpo-gate-client.socket".)
UNKNOWN_FD_NAME = "unknown"
#: Unset after reading, as sd_listen_fds(unset_environment=1) does, so that a
#: process started later does not take them for its own. (LISTEN_PIDFDID, a
#: pidfd identity check newer systemd adds, is not checked, only removed.)
LISTEN_VARS = ("LISTEN_PID", "LISTEN_PIDFDID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _listen_count(env: Mapping[str, str]) -> int:
    """How many fds were passed to this process; 0 when none or not for us."""
    pid = env.get("LISTEN_PID")
    if pid is None:
        return 0
    if _uint(pid) != os.getpid():
        return 0  # for another process (we are a child that inherited them)
    count = _uint(env.get("LISTEN_FDS", ""))
    if count is None or count == 0:
        log.warning("LISTEN_PID is this process but LISTEN_FDS=%r is not a positive "
                    "count; ignoring socket activation", env.get("LISTEN_FDS"))
        return 0
    return count


def _fd_names(env: Mapping[str, str], count: int) -> list[str]:
    raw = env.get("LISTEN_FDNAMES")
    if raw is None:
        return [UNKNOWN_FD_NAME] * count
    names = raw.split(":")
    if len(names) != count:
        # libsystemd fails with EINVAL here; naming what we can is more useful
        # to an operator than refusing every passed socket.
        log.warning("LISTEN_FDNAMES=%r names %d fds but LISTEN_FDS=%d; the rest are %r",
                    raw, len(names), count, UNKNOWN_FD_NAME)
    names = (names + [UNKNOWN_FD_NAME] * count)[:count]
    return [name or UNKNOWN_FD_NAME for name in names]


def listen_fds(env: MutableMapping[str, str] = os.environ,
               unset_env: bool = True) -> dict[str, list[socket.socket]]:
    """The sockets systemd passed to this process, by ``FileDescriptorName=``.

    Socket activation: when ``LISTEN_PID`` is this process, fds 3 …
    3 + ``LISTEN_FDS`` - 1 are open and named, in order, by the ``:``-separated
    ``LISTEN_FDNAMES`` (a missing or empty name is ``"unknown"``). ``{}`` when
    nothing was passed to this process.

    The result maps each name to a list, in fd order: systemd lets several fds
    share a name (one ``.socket`` unit with two ``ListenStream=`` lines gives
    both its ``FileDescriptorName=``), and none may be lost. Each is a
    ``socket.socket(fileno=fd)``, whose family, type and protocol the kernel
    reports; the caller owns them (closing one closes the fd). An fd that is
    not a socket (``ListenFIFO=``, say) is left open, logged and skipped.

    The fds are left as systemd passed them, inheritable. A forked worker
    inherits them whatever the flag (FD_CLOEXEC only acts on exec), and
    ``subprocess`` closes them in a child unless listed in ``pass_fds``; the
    flag matters only to a worker or upgraded binary that re-execs itself,
    which needs them open. (libsystemd sets FD_CLOEXEC instead.)

    With *unset_env*, ``LISTEN_*`` are removed from *env* (``os.environ``:
    also from the C environment children see) whatever the outcome, so that
    a process started later does not take them for its own.
    """
    try:
        count = _listen_count(env)
        names = _fd_names(env, count) if count else []
    finally:
        if unset_env:
            for var in LISTEN_VARS:
                env.pop(var, None)
    out: dict[str, list[socket.socket]] = {}
    for i, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("passed fd %d (%r) is not a usable socket: %s", fd, name, exc)
            continue
        out.setdefault(name, []).append(sock)
    return out
