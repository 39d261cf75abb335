"""Hypothesis profiles of the property tests.

``ci`` (loaded unless another profile was chosen) keeps the example count
modest; ``thorough`` runs many more: ``pytest --hypothesis-profile thorough``.
Registered on import; for ``--hypothesis-profile`` to find them they must be
registered before pytest configures Hypothesis: import this module from
``conftest.py``, or load it as a plugin
(``PYTHONPATH=tests pytest -p hypothesis_profiles --hypothesis-profile thorough``).
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=3000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

if settings.get_current_profile_name() == "default":
    settings.load_profile("ci")
