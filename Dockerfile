# syntax=docker/dockerfile:1
# proxyd container image: node daemon (DaemonSet), sidecar, or its own iptables init container.
#   docker build -t proxyd:0.1.0 .
#   docker run --rm -v /srv/proxyd:/etc/proxyd:ro -p 15001:15001 proxyd:0.1.0
# Config is read from /etc/proxyd/proxyd.yaml and policy from /etc/proxyd/policy/ (mount them
# read-only; mount a directory, not single files, so edits and ConfigMap updates are seen).
# Imported policy (admin API, policy.state_dir) lives in /var/lib/proxyd. Policy changes through
# the admin API need admin.socket (/run/proxyd/admin.sock; mount a volume there to share it) or
# admin.token_file (a mounted secret); over TCP only reads are open. See docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# The C compiler builds proxyd's native data path (proxyd/_native_src/*.c) into the wheel; it stays in
# this stage: the runtime stage gets the built wheel and no compiler.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml setup.py README.md ./
COPY proxyd ./proxyd
# Wheels for proxyd and every dependency; the runtime stage installs them without network.
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
# iptables: the same image runs `proxyd iptables --apply` as the init container (nft backend by
# default; PROXYD_IPTABLES_MODE=legacy for hosts still on iptables-legacy). Not version-pinned on
# purpose: the base tag fixes the Debian release and its security updates are wanted.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid: Kubernetes runAsUser and the iptables --uid-owner exclusion refer to it.
RUN groupadd --system --gid 10001 proxyd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/proxyd --no-create-home \
       --shell /usr/sbin/nologin proxyd \
    && mkdir -p /etc/proxyd/policy /var/lib/proxyd /run/proxyd \
    && chown 10001:10001 /var/lib/proxyd /run/proxyd
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels /wheels/proxyd-*.whl \
    && rm -rf /wheels
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/proxyd
# 15001: the example listener; 9901: admin (/healthz, /readyz, /metrics, GET /v1/...: reads only).
EXPOSE 15001 9901
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]
# Exec form: proxyd is PID 1 and receives SIGTERM (drain) and SIGHUP (config and policy reload) itself.
ENTRYPOINT ["proxyd"]
CMD ["run", "--config", "/etc/proxyd/proxyd.yaml"]
