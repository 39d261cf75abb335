#!/usr/bin/env bash
# Install what bench/run.py needs (run.py does the same by itself when a tool is
# missing, unless it is given --no-install):
#   Debian packages: nginx wrk openssl util-linux (taskset), valgrind (for
#   --instructions), linux-perf (optional: perf stat where the host has counters)
#   Python packages: bench/requirements.txt (matplotlib), into the Python that
#   runs the benchmark ($PYTHON, default python3), which must also have
#   palpo_gate's own dependencies (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

missing=()
for tool in nginx wrk openssl taskset valgrind; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    pkgs=()
    for tool in "${missing[@]}"; do
        case "$tool" in
            taskset) pkgs+=(util-linux) ;;
            *) pkgs+=("$tool") ;;
        esac
    done
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q "${pkgs[@]}"
fi
if ! command -v perf >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-perf || true
fi
"$PYTHON" -m pip install -q -r bench/requirements.txt
