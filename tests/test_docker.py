"""The container (docs/DESIGN.md section 6). No Docker engine runs here, so these tests
read the Dockerfile and the compose example, then run what the image runs:
the ENTRYPOINT + CMD and the HEALTHCHECK command as the Dockerfile spells
them, on this checkout, with only the config path, ports and certificates
swapped for test ones."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import posixpath
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from support.net import free_port
from support.notify import notify_socket

from palpo_gate import config as configmod

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "contrib" / "docker-compose.yml"
EXAMPLE = ROOT / "contrib" / "docker" / "palpo-gate.toml"
IMAGE_CONFIG = "/etc/palpo-gate/config.toml"
IMAGE_CERT = "/etc/palpo-gate/tls/fullchain.pem"
IMAGE_KEY = "/etc/palpo-gate/tls/privkey.pem"


# ---------------------------------------------------------------------------
# A small Dockerfile reader


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def read_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined; comment lines dropped
    (also inside a continuation, as Docker does)."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


class Dockerfile:
    def __init__(self, path: pathlib.Path) -> None:
        self.instructions = read_dockerfile(path.read_text())

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in the Dockerfile"
        return found[-1]

    @property
    def final_stage(self) -> list[Instruction]:
        starts = [n for n, i in enumerate(self.instructions) if i.keyword == "FROM"]
        return self.instructions[starts[-1]:]

    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """(--options, the exec-form command) of the last HEALTHCHECK."""
        args = self.last("HEALTHCHECK")
        options: dict[str, str] = {}
        rest = args
        while rest.startswith("--"):
            opt, _, rest = rest.partition(" ")
            name, _, value = opt[2:].partition("=")
            options[name] = value
            rest = rest.lstrip()
        keyword, _, command = rest.partition(" ")
        assert keyword.upper() == "CMD", "HEALTHCHECK must be CMD [...] (exec form)"
        return options, exec_form(command.strip())

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                key, eq, value = item.partition("=")
                assert eq, f"ENV {args!r}: use the KEY=value form"
                env[key] = value
        return env

    def copied_files(self) -> dict[str, pathlib.Path]:
        """Image path → file of this checkout, for every COPY of a single file."""
        out: dict[str, pathlib.Path] = {}
        for args in self.all("COPY"):
            parts = [p for p in args.split() if not p.startswith("--")]
            *sources, dest = parts
            for src in sources:
                local = ROOT / src
                if local.is_file():
                    target = (posixpath.join(dest, posixpath.basename(src))
                              if dest.endswith("/") else dest)
                    out[target] = local
        return out


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE)


def test_reader_joins_continuations_and_skips_comments() -> None:
    text = ("FROM a\n# c\nRUN x \\\n    # inside\n    && y\nCMD [\"a\", \"b\"]\n"
            "HEALTHCHECK --interval=1s CMD [\"true\"]\n")
    got = read_dockerfile(text)
    assert got == [Instruction("FROM", "a"), Instruction("RUN", "x && y"),
                   Instruction("CMD", '["a", "b"]'),
                   Instruction("HEALTHCHECK", '--interval=1s CMD ["true"]')]


# ---------------------------------------------------------------------------
# What the Dockerfile says


def test_base_image_is_python_311_slim(dockerfile: Dockerfile) -> None:
    image = dockerfile.last("FROM").split()[0]
    name, _, tag = image.partition(":")
    assert name in ("python", "docker.io/library/python")
    assert tag == "3.11-slim" or tag.startswith("3.11-slim-"), tag


def test_runs_as_a_user_that_is_not_root(dockerfile: Dockerfile) -> None:
    stage = dockerfile.final_stage
    users = [n for n, i in enumerate(stage) if i.keyword == "USER"]
    assert users, "no USER: the gate would run as root"
    user = stage[users[-1]].args.split(":")
    assert user[0] not in ("root", "0", "")
    if len(user) > 1:
        assert user[1] not in ("root", "0", "")
    entry = next(n for n, i in enumerate(stage) if i.keyword == "ENTRYPOINT")
    assert users[-1] < entry
    # A numeric UID must be one the image creates, so files and logs name it.
    if user[0].isdigit():
        assert any(f"--uid {user[0]}" in i.args for i in stage if i.keyword == "RUN")


def test_exposes_the_listener_ports(dockerfile: Dockerfile) -> None:
    ports = {p.split("/")[0] for args in dockerfile.all("EXPOSE") for p in args.split()}
    assert {"8008", "8448"} <= ports


def test_entrypoint_and_cmd(dockerfile: Dockerfile) -> None:
    assert exec_form(dockerfile.last("ENTRYPOINT")) == ["palpo-gate"]
    assert exec_form(dockerfile.last("CMD")) == ["--config", IMAGE_CONFIG]
    # "palpo-gate" is the console script of this package.
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["palpo-gate"] == "palpo_gate.cli:main"


def test_healthcheck_reads_the_config_instead_of_a_port(dockerfile: Dockerfile) -> None:
    options, command = dockerfile.healthcheck()
    assert IMAGE_CONFIG in command
    assert not any(p in arg for arg in command for p in (":8008", ":8448", ":443"))
    assert {"interval", "timeout", "retries"} <= set(options)
    # Its script is copied into the image from this checkout.
    script = next(a for a in command if a.endswith(".py"))
    assert script in dockerfile.copied_files()


def test_config_directory_and_package_install(dockerfile: Dockerfile) -> None:
    runs = " ".join(dockerfile.all("RUN"))
    assert "/etc/palpo-gate" in runs
    assert "pip install" in runs


# ---------------------------------------------------------------------------
# The compose example


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")  # PyYAML comes with matrix-synapse (test extra)
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _port_pairs(service: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for p in service.get("ports", []):
        host, _, container = str(p).rpartition(":")
        pairs.append((host, container.split("/")[0]))
    return pairs


def test_compose_is_well_formed(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert isinstance(services, dict) and services
    declared = set(compose.get("networks") or {})
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, name
        assert set(svc.get("networks", [])) <= declared, name
        deps = svc.get("depends_on", [])
        assert set(deps) <= set(services), name


def test_compose_sidecar_setup(compose: dict[str, Any], dockerfile: Dockerfile) -> None:
    services = compose["services"]
    palpo, gate = services["palpo"], services["palpo-gate"]
    assert palpo["image"] == "ghcr.io/palpo-im/palpo:latest"
    assert "ports" not in palpo, "Palpo must be reachable on the compose network only"
    assert "8008" in [str(p) for p in palpo.get("expose", [])]
    assert any(str(v).split(":")[1].startswith("/var/palpo") for v in palpo["volumes"])

    build = gate["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
    assert "palpo" in gate["depends_on"]
    volumes = [str(v) for v in gate["volumes"]]
    assert f"./palpo-gate.toml:{IMAGE_CONFIG}:ro" in volumes
    cert_mounts = [v.split(":")[1] for v in volumes if v.endswith(":ro")]
    assert any(IMAGE_CERT.startswith(m + "/") for m in cert_mounts)
    assert any(IMAGE_KEY.startswith(m + "/") for m in cert_mounts)

    # The published ports lead to the example config's listeners, which the
    # image exposes: host 443 → 8008 (client), host 8448 → 8448 (federation).
    pairs = _port_pairs(gate)
    assert ("443", "8008") in pairs and ("8448", "8448") in pairs
    example = tomllib.loads(EXAMPLE.read_text())
    binds = {str(configmod.parse_bind(lst["bind"]).port) for lst in example["listeners"]}
    exposed = {p for args in dockerfile.all("EXPOSE") for p in args.split()}
    assert {c for _, c in pairs} == binds <= exposed


def test_example_config_is_valid_but_for_its_certificate_files() -> None:
    text = EXAMPLE.read_text()
    doc = tomllib.loads(text)
    assert doc["upstream"]["url"] == "http://palpo:8008"  # the compose service name
    assert [lst["bind"] for lst in doc["listeners"]] == ["0.0.0.0:8008", "0.0.0.0:8448"]
    with pytest.raises(configmod.ConfigError) as info:
        configmod.loads(text, str(EXAMPLE))
    for err in info.value.errors:  # only the certificates, absent here, are missing
        assert ".tls.cert:" in err or ".tls.key:" in err, err
        assert "/etc/palpo-gate/tls/" in err, err


ACME_COMPOSE = ROOT / "contrib" / "docker-compose.acme.yml"
ACME_EXAMPLE = ROOT / "contrib" / "docker" / "palpo-gate.acme.toml"


def test_compose_acme_variant(compose: dict[str, Any], dockerfile: Dockerfile,
                              tmp_path: pathlib.Path) -> None:
    """The override for automatic HTTPS: port 80 for the CA, its own config
    mounted where the base one was, state_dir on a volume the image owns."""
    import yaml

    override = yaml.safe_load(ACME_COMPOSE.read_text())
    gate = override["services"]["palpo-gate"]
    assert set(override["services"]) <= set(compose["services"])
    volumes = [str(v) for v in gate["volumes"]]
    assert f"./palpo-gate.acme.toml:{IMAGE_CONFIG}:ro" in volumes
    named = {v.split(":")[0]: v.split(":")[1] for v in volumes if not v.startswith(".")}
    assert set(named) <= set(override["volumes"])

    text = ACME_EXAMPLE.read_text()
    doc = tomllib.loads(text)
    assert doc["upstream"]["url"] == "http://palpo:8008"
    state_dir = doc["acme"]["state_dir"]
    assert state_dir in named.values()
    # The image creates it for UID 10001, so a new volume there starts out theirs.
    assert any(state_dir in i.args and "10001" in i.args and "0700" in i.args
               for i in dockerfile.final_stage if i.keyword == "RUN")
    cfg = configmod.loads(text.replace(state_dir, str(tmp_path / "acme")), str(ACME_EXAMPLE))
    assert cfg.acme is not None and cfg.acme.challenge == "http-01"
    pairs = _port_pairs(gate) + _port_pairs(compose["services"]["palpo-gate"])
    assert ("80", "8080") in pairs and ("443", "8008") in pairs and ("8448", "8448") in pairs
    binds = {str(lst.bind.port) for lst in cfg.listeners}
    exposed = {p for args in dockerfile.all("EXPOSE") for p in args.split()}
    assert {c for _, c in pairs} == binds <= exposed
    assert {str(lst.bind.port) for lst in cfg.listeners if lst.tls is None} == {"8080"}


# ---------------------------------------------------------------------------
# Running what the image runs


def image_argv(dockerfile: Dockerfile, config_path: str) -> list[str]:
    """ENTRYPOINT + CMD as the container runs them, on this checkout.

    ``palpo-gate`` is the console script ``palpo_gate.cli:main``; it is run
    the way pip's wrapper runs it, with this interpreter (a ``palpo-gate``
    on PATH may belong to another install)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    argv = exec_form(dockerfile.last("ENTRYPOINT")) + exec_form(dockerfile.last("CMD"))
    module, _, func = scripts[argv[0]].partition(":")
    wrapper = [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]
    return wrapper + [config_path if a == IMAGE_CONFIG else a for a in argv[1:]]


def healthcheck_argv(dockerfile: Dockerfile, config_path: str) -> list[str]:
    _, command = dockerfile.healthcheck()
    files = dockerfile.copied_files()
    argv = []
    for arg in command:
        if arg == IMAGE_CONFIG:
            arg = config_path
        elif arg in files:
            arg = str(files[arg])
        argv.append(arg)
    assert argv[0] in ("python", "python3", "/usr/local/bin/python")
    return [sys.executable, *argv[1:]]


def image_env(dockerfile: Dockerfile) -> dict[str, str]:
    return {**os.environ, **dockerfile.env(), "PYTHONPATH": str(ROOT)}


def test_config_path_is_the_only_substitution(dockerfile: Dockerfile) -> None:
    argv = image_argv(dockerfile, "/tmp/x.toml")
    assert argv[-2:] == ["--config", "/tmp/x.toml"]
    hc = healthcheck_argv(dockerfile, "/tmp/x.toml")
    assert "/tmp/x.toml" in hc and IMAGE_CONFIG not in hc
    assert pathlib.Path(hc[1]) == ROOT / "contrib" / "docker" / "healthcheck.py"


def example_for_test(tls_files: dict[str, str], *, strict_sni: bool = False
                     ) -> tuple[str, int]:
    """The example config on loopback: free ports, trustme certificates, an
    upstream address on loopback (nothing needs to answer there)."""
    text = EXAMPLE.read_text()
    client_port, federation_port, upstream_port = free_port(), free_port(), free_port()
    swaps = {
        '"0.0.0.0:8008"': f'"127.0.0.1:{client_port}"',
        '"0.0.0.0:8448"': f'"127.0.0.1:{federation_port}"',
        '"http://palpo:8008"': f'"http://127.0.0.1:{upstream_port}"',
        f'"{IMAGE_CERT}"': json.dumps(tls_files["default_cert"]),
        f'"{IMAGE_KEY}"': json.dumps(tls_files["default_key"]),
    }
    for old, new in swaps.items():
        assert old in text, f"the example config no longer has {old}"
        text = text.replace(old, new)
    if strict_sni:
        text = text.replace("[listeners.tls]\n", "[listeners.tls]\nstrict_sni = true\n")
        assert "strict_sni = true" in text
    return text, client_port


@pytest.fixture
def workdir() -> Iterator[pathlib.Path]:
    with tempfile.TemporaryDirectory(prefix="pgd-", dir="/tmp") as d:  # short: UNIX paths
        yield pathlib.Path(d)


class ImageProcess:
    """The gate started as the container starts it; output to files."""

    def __init__(self, argv: list[str], env: dict[str, str], workdir: pathlib.Path) -> None:
        self.stdout = workdir / "stdout"
        self.stderr = workdir / "stderr"
        # Ready is the READY=1 the gate sends to systemd, not a log line.
        self._notify = contextlib.ExitStack()
        self.notify = self._notify.enter_context(notify_socket(workdir))
        env = {**env, "NOTIFY_SOCKET": self.notify.path}
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=ROOT)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(d.has("READY=1") for d in self.notify.datagrams()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("gate did not start:\n" + self.stderr.read_text())
            time.sleep(0.05)

    def stop(self) -> int:
        with self._notify:
            return self._stop()

    def _stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def run_healthcheck(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("strict_sni", [False, True], ids=["sni", "strict-sni"])
def test_image_runs_and_reports_healthy_then_unhealthy(
        dockerfile: Dockerfile, tls_files: dict[str, str], workdir: pathlib.Path,
        strict_sni: bool) -> None:
    text, client_port = example_for_test(tls_files, strict_sni=strict_sni)
    config_path = workdir / "config.toml"
    config_path.write_text(text)
    env = image_env(dockerfile)
    hc = healthcheck_argv(dockerfile, str(config_path))

    gate = ImageProcess(image_argv(dockerfile, str(config_path)), env, workdir)
    try:
        gate.wait_ready()
        result = run_healthcheck(hc, env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"https://127.0.0.1:{client_port}/health answered 200" in result.stdout
    finally:
        assert gate.stop() == 0, gate.stderr.read_text()
    result = run_healthcheck(hc, env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unhealthy" in result.stdout
    # /health is never logged: the check leaves no access line.
    assert gate.stdout.read_text() == ""


def test_check_command_accepts_the_example_with_certificates(
        dockerfile: Dockerfile, tls_files: dict[str, str], workdir: pathlib.Path) -> None:
    """`docker compose run --rm palpo-gate check --config …`, as the example's header says."""
    text, _ = example_for_test(tls_files)
    config_path = workdir / "config.toml"
    config_path.write_text(text)
    argv = image_argv(dockerfile, str(config_path))
    wrapper = argv[: len(argv) - 2]
    result = subprocess.run([*wrapper, "check", "--config", str(config_path)],
                            env=image_env(dockerfile), cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stderr


# ---------------------------------------------------------------------------
# The health check script on its own


def load_healthcheck(dockerfile: Dockerfile) -> ModuleType:
    _, command = dockerfile.healthcheck()
    path = dockerfile.copied_files()[next(a for a in command if a.endswith(".py"))]
    spec = importlib.util.spec_from_file_location("palpo_gate_healthcheck", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def healthcheck(dockerfile: Dockerfile) -> ModuleType:
    return load_healthcheck(dockerfile)


LISTENERS = [
    # (listeners TOML, expected target as text)
    ('bind = "0.0.0.0:8008"', "http://127.0.0.1:8008"),
    ('bind = "[::]:8448"', "http://[::1]:8448"),
    ('bind = "127.0.0.2:9000"', "http://127.0.0.2:9000"),
    ('bind = "localhost:9001"', "http://localhost:9001"),
    ('bind = "unix:/run/palpo-gate/gate.sock"', "http+unix:/run/palpo-gate/gate.sock"),
]


@pytest.mark.parametrize(("bind", "expected"), LISTENERS)
def test_target_of_one_listener(healthcheck: ModuleType, bind: str, expected: str) -> None:
    cfg = configmod.loads(f'[[listeners]]\nname = "a"\n{bind}\n')
    assert str(healthcheck.target(cfg)) == expected


def test_target_prefers_the_first_tcp_listener(healthcheck: ModuleType,
                                               tls_files: dict[str, str]) -> None:
    cfg = configmod.loads(f"""
[[listeners]]
name = "sock"
bind = "unix:/run/gate.sock"
[[listeners]]
name = "activated"
bind = "systemd:gate"
[[listeners]]
name = "tls"
bind = "0.0.0.0:8448"
[listeners.tls]
cert = {json.dumps(tls_files["default_cert"])}
key = {json.dumps(tls_files["default_key"])}
strict_sni = true
[[listeners]]
name = "plain"
bind = "0.0.0.0:8008"
""")
    t = healthcheck.target(cfg)
    assert (t.listener, str(t), t.tls, t.server_name) == (
        "tls", "https://127.0.0.1:8448", True, "localhost")
    only_activated = configmod.loads('[[listeners]]\nname = "a"\nbind = "systemd:gate"\n')
    assert healthcheck.target(only_activated) is None


SNI = [
    ({"localhost", "127.0.0.1", "matrix.test"}, "localhost"),
    ({"*.example.com"}, "healthcheck.example.com"),
    ({"*.example.com", "example.com"}, "example.com"),
    ({"127.0.0.1", "::1"}, None),
    (set(), None),
]


@pytest.mark.parametrize(("names", "expected"), SNI)
def test_sni_name(healthcheck: ModuleType, names: set[str], expected: str | None) -> None:
    assert healthcheck.sni_name(names) == expected


def test_healthcheck_over_a_unix_listener(dockerfile: Dockerfile,
                                          workdir: pathlib.Path) -> None:
    sock = workdir / "gate.sock"
    config_path = workdir / "config.toml"
    config_path.write_text(f"""
[upstream]
url = "http://127.0.0.1:{free_port()}"
[log]
level = "info"
access = "plain"
[[listeners]]
name = "local"
bind = "unix:{sock}"
""")
    env = image_env(dockerfile)
    hc = healthcheck_argv(dockerfile, str(config_path))
    gate = ImageProcess(image_argv(dockerfile, str(config_path)), env, workdir)
    try:
        gate.wait_ready()
        result = run_healthcheck(hc, env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"http+unix:{sock}/health answered 200" in result.stdout
    finally:
        gate.stop()
    assert run_healthcheck(hc, env).returncode == 1


def test_healthcheck_with_a_bad_config_is_unhealthy(dockerfile: Dockerfile,
                                                    workdir: pathlib.Path) -> None:
    config_path = workdir / "config.toml"
    config_path.write_text("[listeners\n")
    result = run_healthcheck(healthcheck_argv(dockerfile, str(config_path)),
                             image_env(dockerfile))
    assert result.returncode == 1
    assert "does not load" in result.stdout
