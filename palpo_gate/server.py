"""Old import path of the running gate, kept for existing imports.

The gate lives in :mod:`generation` (the Gate, reload), :mod:`listeners`
(sockets, the aiohttp connection handler) and :mod:`tls` (certificates).
"""

from .generation import Gate, cert_sets, ssl_contexts
from .listeners import (
    C_PARSER,
    LISTEN_BACKLOG,
    GateServer,
    _HeadTimeoutProtocol,
    bind_socket,
    serve_metrics,
    systemd_sockets,
)

__all__ = ["C_PARSER", "LISTEN_BACKLOG", "Gate", "GateServer", "_HeadTimeoutProtocol",
           "bind_socket", "cert_sets", "serve_metrics", "ssl_contexts", "systemd_sockets"]
