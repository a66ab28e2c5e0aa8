# oauth2-mail-proxy in a container, for example as a sidecar beside the mail client.
# See docs/container.md.   Build:  docker build -t oauth2-mail-proxy .   (or: buildah bud ...)
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mailproxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin mailproxy \
 && install -d -m 0755 /config \
 && install -d -o 10001 -g 10001 -m 0700 /tokens

# The package with its PostgreSQL driver (docs/scale-out.md), installed with pip into its own virtual
# environment (no build tools kept).
COPY pyproject.toml README.md LICENSE /src/
COPY proxy /src/proxy
RUN python3 -m venv /opt/oauth2-mail-proxy \
 && /opt/oauth2-mail-proxy/bin/pip install --no-cache-dir --disable-pip-version-check "/src[postgresql]" \
 && rm -rf /src

# Settings the container fixes; any PROXY_<SECTION>_<KEY> overrides the config file the same way.
ENV PATH=/opt/oauth2-mail-proxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PROXY_CONFIG=/config/config.yaml \
    PROXY_TOKENS_PATH=/tokens \
    PROXY_ADMIN_LISTEN=127.0.0.1:9090 \
    PROXY_LOG_FORMAT=json

USER 10001:10001
# /config: config.yaml (and certs/), read-only is fine. /tokens: the encrypted token store.
VOLUME ["/config", "/tokens"]
# IMAP, SMTP, IMAPS, SMTPS (when configured), admin HTTP (/healthz, /readyz, /metrics)
EXPOSE 1143 1587 1993 1465 9090
HEALTHCHECK --interval=30s --timeout=10s --start-period=15s --retries=3 CMD ["proxy", "health"]
STOPSIGNAL SIGTERM
CMD ["proxy", "serve"]
