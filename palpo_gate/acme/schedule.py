"""When to renew a certificate, and when to try again after a failure.

Pure: times in, times out (seconds since the epoch); no clock, no IO. The
rules, each there so that the gate never talks to its CA in a loop:

- A certificate is due ``renew_before`` before it expires, or at the time the
  CA's renewal information names (RFC 9773 section 4.2: a point chosen
  uniformly at random in its suggested window, chosen by the caller). But at
  most two thirds of its lifetime before expiry: with ``renew_before`` longer
  than the lifetime (30 days against a 6-day certificate) every new
  certificate would be due at once. Nor, without renewal information, before
  a third of the time from when it was obtained to its expiry has passed
  (a CA that backdates ``notBefore`` far).
- After a failed attempt the next one waits :data:`FIRST_RETRY`, doubling
  per failure up to :data:`MAX_RETRY`; never less than the CA's
  ``Retry-After`` (RFC 8555 section 6.6: rate limits; RFC 9773 section 4.3);
  and, while a certificate still serves, no more than a tenth of the time it
  has left (a renewal that fails for days is retried more often as expiry
  nears), but never sooner than :data:`MIN_RETRY`.
"""

from __future__ import annotations

from typing import Final

#: The first wait after a failure, in seconds; it doubles per failure.
FIRST_RETRY: Final = 60.0
#: The longest wait between two attempts (a CA down for days).
MAX_RETRY: Final = 6 * 3600.0
#: The shortest wait between two attempts, whatever else says.
MIN_RETRY: Final = 5.0
#: A certificate is due at most this share of its lifetime before expiry.
MAX_RENEW_SHARE: Final = 2 / 3


def due(not_before: float, not_after: float, renew_before: float,
        ari_time: float | None = None, obtained: float | None = None) -> float:
    """When a certificate valid from *not_before* to *not_after*, obtained at
    *obtained* (if known), is to be renewed."""
    if ari_time is not None:
        return ari_time
    lifetime = max(not_after - not_before, 0.0)
    when = not_after - min(renew_before, lifetime * MAX_RENEW_SHARE)
    if obtained is not None:
        when = max(when, obtained + (not_after - obtained) * (1 - MAX_RENEW_SHARE))
    return when


def retry_delay(failures: int, *, retry_after: float | None = None,
                remaining: float | None = None) -> float:
    """Seconds to wait after the *failures*-th failed attempt in a row.

    *retry_after*: seconds the CA asked to wait, if it did; *remaining*:
    seconds the serving certificate has left, None when only a temporary
    certificate serves.
    """
    delay = min(FIRST_RETRY * 2.0 ** max(failures - 1, 0), MAX_RETRY)
    if remaining is not None:
        delay = min(delay, max(remaining / 10, 0.0))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return max(delay, MIN_RETRY)
