"""Fixtures shared by the tests: a recording upstream, TLS material, and the
Hypothesis profiles. The helpers live in the ``support`` package (tests/ is on
sys.path: pyproject's ``pythonpath``); this file holds only fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trustme
from hypothesis import HealthCheck, settings
from support.recorder import Recorder, recorder
from support.tls import write_tls_files

# Property tests: a modest example count in CI (the default), a larger one on
# demand with ``--hypothesis-profile=thorough``.
settings.register_profile("ci", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=10000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture
async def up() -> AsyncIterator[Recorder]:
    """A recording upstream on a loopback TCP port."""
    async with recorder() as rec:
        yield rec


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two certificates: "default" for localhost/127.0.0.1, "other" for other.test."""
    return write_tls_files(ca, tmp_path_factory.mktemp("tls"))
