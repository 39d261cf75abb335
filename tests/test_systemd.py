"""palpo_gate.systemd against real sockets and real processes, and the unit
files in contrib/systemd against systemd's own parser and the hardening the
gate promises (docs/DESIGN.md section 6)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.notify import notify_socket

from palpo_gate import config as configmod
from palpo_gate import systemd

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"
SERVICE = UNITS / "palpo-gate.service"
SOCKETS = {"client": UNITS / "palpo-gate-client.socket",
           "federation": UNITS / "palpo-gate-federation.socket"}


# -- notify ---------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
@pytest.mark.parametrize("state", [
    "READY=1",
    "RELOADING=1\nMONOTONIC_USEC=123",
    "STOPPING=1",
    "WATCHDOG=1",
    "STATUS=draining 3 connections, ünïcode ✓",
])
def test_notify_sends_one_exact_datagram(tmp_path: Path, abstract: bool, state: str) -> None:
    with notify_socket(tmp_path, abstract=abstract) as ns:
        assert ns.path.startswith("@" if abstract else "/")
        assert systemd.notify(state, env={"NOTIFY_SOCKET": ns.path}) is True
        got = ns.wait_for(state, timeout=5)
        assert got.text == state
        assert got.pid == os.getpid()
        assert ns.messages() == [state]


def test_notify_keeps_order(tmp_path: Path) -> None:
    sequence = ["READY=1", systemd.reloading_message(), "READY=1", "STOPPING=1"]
    with notify_socket(tmp_path) as ns:
        for state in sequence:
            assert systemd.notify(state, env={"NOTIFY_SOCKET": ns.path})
        ns.wait_for("READY=1")
        ns.wait_for("RELOADING=1")
        ns.wait_for("READY=1")  # the second one
        ns.wait_for("STOPPING=1")
        assert ns.messages() == sequence


def test_notify_reads_os_environ_by_default(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with notify_socket(tmp_path) as ns:
        monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
        assert systemd.notify("READY=1")
        ns.wait_for("READY=1")


def test_notify_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False


@pytest.mark.parametrize("value", [
    "/nonexistent/palpo-gate/notify",          # no such path
    "@palpo-test-nobody-listens-here-7f3a",    # no such abstract name
    "/" + "x" * 200,                           # longer than sun_path
    "relative/notify",                         # not an AF_UNIX address
    "vsock:2:1234",                            # systemd >= 254, not spoken here
    "@",                                       # an empty abstract name
])
def test_notify_failure_is_false_not_an_exception(
        value: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="palpo_gate.systemd"):
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": value}) is False
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert caplog.records  # the reason is there for whoever turns debug on


def test_notify_to_a_stream_socket_fails_quietly(tmp_path: Path) -> None:
    path = str(tmp_path / "stream.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen()
        assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": path}) is False


def test_notify_works_in_a_forked_child(tmp_path: Path) -> None:
    """No state survives fork(): a worker's notification comes from the worker."""
    with notify_socket(tmp_path) as ns:
        env = {"NOTIFY_SOCKET": ns.path}
        assert systemd.notify("STATUS=parent", env=env)
        with warnings.catch_warnings():
            # Python >= 3.12 warns about fork() next to the collector thread; the
            # child only sends one datagram and exits.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0 if systemd.notify("STATUS=child", env=env) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ns.wait_for("STATUS=parent").pid == os.getpid()
        assert ns.wait_for("STATUS=child").pid == pid


@pytest.mark.parametrize(("address", "expected"), [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@/org/freedesktop/systemd1/notify", "\0/org/freedesktop/systemd1/notify"),
    ("@x", "\0x"),
    ("@", None),
    ("", None),
    ("run/notify", None),
    ("vsock:2:1234", None),
])
def test_notify_address(address: str, expected: str | None) -> None:
    assert systemd.notify_address(address) == expected


def test_status_message_stays_one_assignment() -> None:
    assert systemd.status_message("serving") == "STATUS=serving"
    assert systemd.status_message("bad config\nREADY=1") == "STATUS=bad config READY=1"


# -- RELOADING=1 / MONOTONIC_USEC ----------------------------------------------------


def test_reloading_message_carries_monotonic_usec() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = systemd.reloading_message()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    m = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=([0-9]+)", message)
    assert m is not None, message
    assert before <= int(m.group(1)) <= after


def test_monotonic_usec_is_the_monotonic_clock() -> None:
    now = time.monotonic() * 1_000_000
    assert isinstance(systemd.monotonic_usec(), int)
    assert abs(systemd.monotonic_usec() - now) < 1_000_000


# -- watchdog ------------------------------------------------------------------------

ME = str(os.getpid())


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ME}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),        # a parent's watchdog
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
    ({"WATCHDOG_USEC": "1"}, 0.0000005),
    ({"WATCHDOG_USEC": "0"}, None),                                    # disabled
    ({"WATCHDOG_USEC": str(2**64 - 1)}, None),                         # infinity
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "30s"}, None),
    ({"WATCHDOG_USEC": " 300"}, None),
    ({"WATCHDOG_PID": ME}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env) == expected


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", ME)
    assert systemd.watchdog_interval() == 2.0


# -- listen_fds: what needs no passed fd ----------------------------------------------


@pytest.mark.parametrize("env", [
    {},
    {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"},   # another process's
    {"LISTEN_PID": "x", "LISTEN_FDS": "2"},
    {"LISTEN_PID": ME, "LISTEN_FDS": "0"},
    {"LISTEN_PID": ME, "LISTEN_FDS": "-1"},
    {"LISTEN_PID": ME, "LISTEN_FDS": "two"},
    {"LISTEN_PID": ME},
    {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"},
], ids=["unset", "other-pid", "bad-pid", "zero", "negative", "bad-count", "no-count",
        "no-pid"])
def test_listen_fds_not_activated(env: dict[str, str]) -> None:
    """Nothing for this process: {} and no fd touched; the variables go anyway."""
    env = dict(env, PATH="/bin")
    assert systemd.listen_fds(env) == {}
    assert env == {"PATH": "/bin"}


def test_listen_fds_keeps_env_when_asked() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "client"}
    assert systemd.listen_fds(env, unset_env=False) == {}
    assert env == {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "client"}


# -- listen_fds: fds passed to a real process ------------------------------------------

#: Runs in a child whose fds 3 and up are what systemd would pass; prints what
#: listen_fds() made of them.
CHILD = textwrap.dedent("""
    import json, os, socket, sys
    from palpo_gate import systemd

    found = systemd.listen_fds()
    out = {"names": list(found), "env": {k: os.environ.get(k) for k in systemd.LISTEN_VARS},
           "socks": {}}
    for name, socks in found.items():
        out["socks"][name] = [{
            "fd": s.fileno(), "family": s.family.name, "type": s.type.name,
            "sockname": s.getsockname(),
            "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1,
            "inheritable": s.get_inheritable(),
        } for s in socks]
    accept = os.environ.get("TEST_ACCEPT_ON")
    if accept:  # a passed socket is the real thing: accept what the test queued
        web = found[accept][0]
        web.settimeout(5)
        conn, _peer = web.accept()
        out["accepted"] = conn.recv(16).decode()
        conn.close()
    print(json.dumps(out))
""")

#: What systemd does between fork() and exec(): move the sockets to 3, 4, …,
#: set LISTEN_PID to the process's own pid (exec keeps it), then exec.
LAUNCHER = textwrap.dedent("""
    import fcntl, os, sys
    fds = [int(a) for a in sys.argv[1].split(",")]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way first
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)  # dup2 makes the new fd inheritable
    pid = sys.argv[2]
    if pid == "self":
        pid = str(os.getpid())
    os.environ["LISTEN_PID"] = pid
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
""")


def run_activated(fds: list[int], env: dict[str, str], pid: str = "self") -> dict:
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith("LISTEN_") and k != "NOTIFY_SOCKET"}
    child_env.update(env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), child_env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, ",".join(map(str, fds)), pid, CHILD],
        pass_fds=fds, env=child_env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    result: dict = json.loads(proc.stdout)
    result["stderr"] = proc.stderr
    return result


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "u.sock"))
    sock.listen(8)
    yield sock
    sock.close()


def test_listen_fds_passed_sockets(tcp_listener: socket.socket,
                                   unix_listener: socket.socket, tmp_path: Path) -> None:
    # Queued before the child starts: only the child accepts on this socket.
    client = socket.create_connection(tcp_listener.getsockname(), timeout=5)
    client.sendall(b"hello")
    try:
        out = run_activated([tcp_listener.fileno(), unix_listener.fileno()],
                            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "web:unix",
                             "TEST_ACCEPT_ON": "web"})
    finally:
        client.close()
    assert out["names"] == ["web", "unix"]
    [web] = out["socks"]["web"]
    [unix] = out["socks"]["unix"]
    assert web == {"fd": 3, "family": "AF_INET", "type": "SOCK_STREAM",
                   "sockname": list(tcp_listener.getsockname()), "listening": True,
                   "inheritable": True}
    assert unix == {"fd": 4, "family": "AF_UNIX", "type": "SOCK_STREAM",
                    "sockname": str(tmp_path / "u.sock"), "listening": True,
                    "inheritable": True}
    assert out["accepted"] == "hello"
    assert out["env"] == dict.fromkeys(systemd.LISTEN_VARS)  # all removed


@pytest.mark.parametrize(("names", "expected"), [
    ("same:same", {"same": [3, 4]}),           # systemd allows a shared name
    (None, {"unknown": [3, 4]}),               # LISTEN_FDNAMES unset
    ("web", {"web": [3], "unknown": [4]}),     # fewer names than fds
    ("web::", {"web": [3], "unknown": [4]}),   # an empty name, and one too many
])
def test_listen_fds_names(tcp_listener: socket.socket, unix_listener: socket.socket,
                          names: str | None, expected: dict[str, list[int]]) -> None:
    env = {"LISTEN_FDS": "2"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    out = run_activated([tcp_listener.fileno(), unix_listener.fileno()], env)
    assert {n: [s["fd"] for s in socks] for n, socks in out["socks"].items()} == expected
    assert list(out["socks"]) == list(expected)  # fd order
    assert ("LISTEN_FDNAMES" in out["stderr"]) == (names in ("web", "web::"))


def test_listen_fds_skips_what_is_not_a_socket(tcp_listener: socket.socket) -> None:
    r, w = os.pipe()
    try:
        out = run_activated([tcp_listener.fileno(), r],
                            {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "sock:fifo"})
    finally:
        os.close(r)
        os.close(w)
    assert out["names"] == ["sock"]
    assert "fd 4" in out["stderr"] and "'fifo'" in out["stderr"]


def test_listen_fds_for_another_pid(tcp_listener: socket.socket) -> None:
    out = run_activated([tcp_listener.fileno()],
                        {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"}, pid="1")
    assert out["names"] == []
    assert out["env"] == dict.fromkeys(systemd.LISTEN_VARS)


# -- the unit files ------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd.syntax(7), the part unit files use: [Section], Key=value, every
    value of a repeated key in order, '#' / ';' comments, '\\' continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not Key=value"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def last(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    return unit[section][key][-1]


def test_service_unit_hardening() -> None:
    unit = parse_unit(SERVICE)
    svc = unit["Service"]

    def value(key: str) -> str:
        assert key in svc, f"{key}= missing from [Service]"
        return svc[key][-1]

    assert value("Type") == "notify"
    assert value("NotifyAccess") in ("main", "all")
    assert value("ExecStart").split()[1:] == ["--config", "/etc/palpo-gate/config.toml"]
    assert svc["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert value("KillSignal") == "SIGTERM"
    assert value("WatchdogSec") == "30"
    assert value("TimeoutStopSec") == "30"
    assert value("Restart") == "on-failure"
    assert value("NoNewPrivileges") == "yes"
    assert value("ProtectSystem") == "strict"
    assert value("ProtectHome") == "yes"
    assert value("PrivateTmp") == "yes"
    assert value("PrivateDevices") == "yes"
    for key in ("ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "ProtectClock", "ProtectHostname",
                "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID",
                "LockPersonality"):
        assert value(key) == "yes", key
    assert set(value("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert value("CapabilityBoundingSet") == ""
    assert value("AmbientCapabilities") == ""
    assert value("DynamicUser") == "yes" or value("User")
    assert value("SystemCallArchitectures") == "native"
    assert svc["SystemCallFilter"][0] == "@system-service"
    assert value("RuntimeDirectory") == "palpo-gate"
    # acme.state_dir's default, /var/lib/palpo-gate/acme, is writable and kept.
    assert value("StateDirectory") == "palpo-gate"
    assert value("StateDirectoryMode") == "0700"
    assert value("UMask") == "0077"
    assert value("LimitNOFILE") == "65536"
    assert "network-online.target" in value_list(unit["Unit"], "After")
    assert "network-online.target" in value_list(unit["Unit"], "Wants")
    # Socket activation is opt-in (a drop-in): the plain unit must start alone.
    assert "Requires" not in unit["Unit"]


def value_list(section: dict[str, list[str]], key: str) -> list[str]:
    return [word for value in section.get(key, []) for word in value.split()]


def test_stop_timeout_covers_the_default_drain() -> None:
    drain = configmod.loads('[upstream]\nurl = "http://127.0.0.1:8008"\n').server.drain_timeout
    assert float(last(parse_unit(SERVICE), "Service", "TimeoutStopSec")) > drain


def test_restart_skips_a_config_error() -> None:
    from palpo_gate.cli import EXIT_CONFIG

    assert last(parse_unit(SERVICE), "Service", "RestartPreventExitStatus") == str(EXIT_CONFIG)


@pytest.mark.parametrize("name", sorted(SOCKETS))
def test_socket_units(name: str) -> None:
    unit = parse_unit(SOCKETS[name])
    sock = unit["Socket"]
    assert sock["FileDescriptorName"] == [name]
    assert sock["Service"] == ["palpo-gate.service"]
    assert sock["ListenStream"] == [{"client": "443", "federation": "8448"}[name]]
    assert sock["BindIPv6Only"] == ["both"]
    assert unit["Install"]["WantedBy"] == ["sockets.target"]
    # What the config writes to pick it is a valid bind.
    assert configmod.parse_bind(f"systemd:{name}") == configmod.Bind("systemd", path=name)


def test_readme_names_what_the_units_name() -> None:
    readme = (UNITS / "README.md").read_text()
    for name, path in SOCKETS.items():
        assert f'bind = "systemd:{name}"' in readme
        assert path.name in readme
    assert "LoadCredential=" in readme and "SupplementaryGroups=" in readme


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd): "
                    "the unit files were not checked by systemd's parser")
    # verify insists that ExecStart's program exists: point it at a stand-in.
    fake = tmp_path / "palpo-gate"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    names = [SERVICE.name, *(p.name for p in SOCKETS.values())]
    for name in names:
        text = (UNITS / name).read_text().replace("/usr/bin/palpo-gate", str(fake))
        (tmp_path / name).write_text(text)
    proc = subprocess.run([tool, "verify", "--man=no", *names], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    # verify exits 0 on an unknown key or a bad value ("…, ignoring"): any
    # line about our units is a failure.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "palpo-gate" in line or str(tmp_path) in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr
