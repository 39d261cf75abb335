# palpo_gate as a container (docs/DESIGN.md section 6): non-root, config at
# /etc/palpo-gate/config.toml, HEALTHCHECK on /health. The sidecar setup next
# to Palpo is contrib/docker-compose.yml; its example config is
# contrib/docker/palpo-gate.toml.
#
#   docker build -t palpo-gate .
#   docker run -v ./palpo-gate.toml:/etc/palpo-gate/config.toml:ro \
#              -v ./tls:/etc/palpo-gate/tls:ro -p 443:8008 -p 8448:8448 palpo-gate
#
# Listen on ports above 1023 inside the container (8008, 8448) and publish them
# as 443 / 8448: the gate runs without privileges or capabilities.
FROM python:3.11-slim

LABEL org.opencontainers.image.title="palpo-gate" \
      org.opencontainers.image.description="A Matrix-correct reverse proxy for the Palpo homeserver" \
      org.opencontainers.image.licenses="Apache-2.0"

# PYTHONUNBUFFERED: access lines (stdout) and logs (stderr) reach
# `docker logs` as they are written.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric UID/GID: an orchestrator can verify "not root" (Kubernetes
# runAsNonRoot), and the TLS key on the host can be made readable to 10001.
# /var/lib/palpo-gate/acme is acme.state_dir for automatic HTTPS: a volume
# mounted there starts out owned by 10001 (contrib/docker-compose.acme.yml).
RUN groupadd --system --gid 10001 palpo-gate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin palpo-gate \
    && mkdir -p /etc/palpo-gate/tls \
    && install -d -m 0700 -o 10001 -g 10001 /var/lib/palpo-gate /var/lib/palpo-gate/acme

# Binary wheels exist for every dependency (aiohttp with its C parser, which
# the gate insists on, uvloop, httptools): no compiler in the image.
COPY pyproject.toml README.md /src/
COPY palpo_gate /src/palpo_gate
RUN pip install /src && rm -rf /src \
    && python -c "import aiohttp.http_parser as p; assert p.HttpRequestParser is p.HttpRequestParserC"

# The health check reads the gate's config and asks its first listener, so no
# port is hard-coded here (contrib/docker/healthcheck.py).
COPY contrib/docker/healthcheck.py /usr/local/lib/palpo-gate/healthcheck.py

USER 10001:10001
# 8080: plain HTTP for the ACME http-01 check (contrib/docker-compose.acme.yml).
EXPOSE 8008 8448 8080
# /health is answered by the gate on every listener and never logged.
# If you pass another --config to the gate, pass the same to the check.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/lib/palpo-gate/healthcheck.py", "--config", "/etc/palpo-gate/config.toml"]
# SIGTERM (docker stop) drains in-flight requests for [server] drain_timeout
# (10 s): give `docker stop -t` / compose stop_grace_period a little more.
STOPSIGNAL SIGTERM
ENTRYPOINT ["palpo-gate"]
CMD ["--config", "/etc/palpo-gate/config.toml"]
