# palpo_gate as a container: non-root, config at /etc/palpo-gate/config.toml.
FROM python:3.11-slim

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin palpo-gate \
    && mkdir -p /etc/palpo-gate

WORKDIR /src
COPY pyproject.toml README.md ./
COPY palpo_gate ./palpo_gate
RUN pip install --no-cache-dir . && rm -rf /src

USER palpo-gate
EXPOSE 8008 8448
# /health is answered by the gate itself on every listener and never logged.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys,urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8008/health', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["palpo-gate"]
CMD ["--config", "/etc/palpo-gate/config.toml"]
