"""palpo_gate against nginx, its own floor (bare aiohttp) and no proxy at all, in one command.

    python bench/run.py            # full run (~12-15 min): 5 rounds, 8,000 long-polls
    python bench/run.py --quick    # < 3 min: 3 rounds of 3 s, 1,000 long-polls
    python bench/run.py --smoke    # < 30 s: 1 round of 1 s, 50 long-polls (CI)
    python bench/run.py --rounds 0 --instructions 2000   # instructions per request only

What it does, in order:

1. makes sure nginx, wrk, openssl and taskset exist (apt-get installs them if
   not, unless --no-install) and that matplotlib imports (pip installs
   bench/requirements.txt if not);
2. in a temp dir: a self-signed certificate (openssl req), a 16 MiB media
   file, and two upstreams pinned to CPU 0: nginx serving a ~240-byte JSON
   /versions answer and the media file (bench/nginx_upstream.conf.tmpl), and
   bench/slow_upstream.py for held /sync long-polls and uploads;
3. rounds of the arms in a fixed interleaved order (direct, nginx, bare, gate,
   direct, ...); ``bare`` is bench/bare_server.py, aiohttp's web.Server answering
   from memory (small GETs and idle RSS only). A proxy arm runs its proxy
   pinned to CPU 1 (taskset), everything else stays on CPU 0, so the figures
   are per proxy core. The
   proxy is started once against the fast upstream (small GET, TLS small GET,
   download) and once against the slow one (idle RSS, long-polls, upload);
4. with --instructions N: the bare server and the gate under callgrind, N small
   GETs each (bench/instructions.py);
5. medians over rounds, per-round ratios to nginx and gate / bare, the targets
   table, and bench/results/<name>.json, .md and .png.

CPU per request is the robust figure on a shared machine: utime+stime of the
proxy's processes (from /proc/PID/stat, master and workers) over a wrk run,
divided by the requests wrk completed; req/s moves with whatever else the
machine runs, CPU seconds per request hardly do.
"""

from __future__ import annotations

import sys

from palpo_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
