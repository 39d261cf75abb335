"""palpo_gate: a Matrix-correct reverse proxy in front of the Palpo homeserver.

The design in brief:

- ``config``    parses the TOML file once into frozen records (docs/DESIGN.md section 7);
                unknown keys and bad values are errors naming their key path.
- ``routing``   decides what to do with a request on a *normalised* copy of its
                path; the raw target is what gets forwarded, byte for byte.
- ``headers``   the header rules of both directions (hop-by-hop, X-Forwarded-*,
                Host, request id), on raw byte pairs.
- ``wellknown`` the delegation documents and CORS headers, built at load.
- ``errors``    the error funnel: failures → status codes, Matrix JSON bodies.
- ``upstream``  a keep-alive pool of HTTP/1.1 connections to Palpo (TCP or UNIX)
                that writes the request head itself and parses responses with
                httptools.
- ``proxy``     the request handler: the IO shell around the pure core,
                streaming bodies both ways.
- ``tls``       SSL contexts with SNI, built at load.
- ``listeners`` listening sockets, aiohttp's low-level server per listener,
                connection limits.
- ``generation`` one config's runtime, reload and graceful stop.
- ``process``   the life of one process: signals, reload, systemd.
- ``supervisor`` ``server.workers`` processes sharing the listeners.
- ``compat``    every use of aiohttp's internals, in one place.
- ``accesslog`` one line per request.
- ``logpipe``   stdout and stderr written without ever blocking the event loop.
- ``cli``       ``palpo-gate [check] [--config PATH]``.

routing, headers, config and wellknown know nothing of sockets and are tested
with tables; the rest is tested over real sockets.
"""

__version__ = "0.1.0"
