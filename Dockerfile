# syntax=docker/dockerfile:1
# The Reactor operator image: Python 3.11, git, and the pinned opencode binary.
#   make image                      (docker build -t reactor:0.1.0 .)
#   docker buildx build --platform linux/amd64,linux/arm64 -t <registry>/reactor:0.1.0 --push .
# Layers, least to most often changed: OS packages | opencode | Python deps | reactor.
# OPENCODE_VERSION must equal OPENCODE_VERSION in operator/reactor/__init__.py (a test checks it).
ARG OPENCODE_VERSION=1.18.33

# --- opencode: the native binary of the npm package, nothing else of node ---------------
FROM node:22-bookworm-slim AS opencode
ARG OPENCODE_VERSION
ARG TARGETARCH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/opencode
# opencode-ai's postinstall only picks the platform package for the build machine's CPU;
# install that platform package directly (glibc build; AVX2 on x64) and take its binary.
RUN case "${TARGETARCH:-amd64}" in \
      amd64) arch=x64 ;; \
      arm64) arch=arm64 ;; \
      *) echo "unsupported architecture: ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && npm install --no-audit --no-fund --ignore-scripts --loglevel=error "opencode-linux-${arch}@${OPENCODE_VERSION}" \
 && install -m 0755 "node_modules/opencode-linux-${arch}/bin/opencode" /usr/local/bin/opencode \
 && test "$(HOME=/tmp /usr/local/bin/opencode --version)" = "${OPENCODE_VERSION}" \
 && mkdir -p /opt/opencode-seed \
 && printf '{"dependencies": {"@opencode-ai/plugin": "%s"}}\n' "${OPENCODE_VERSION}" > /opt/opencode-seed/package.json \
 && npm install --prefix /opt/opencode-seed --no-audit --no-fund --loglevel=error

# --- Python: dependencies first (cached until pyproject.toml changes), then the wheel ---
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --requirement requirements.txt
COPY README.md ./
COPY operator/ operator/
RUN /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- runtime --------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
ARG OPENCODE_VERSION
LABEL org.opencontainers.image.title="reactor" \
      org.opencontainers.image.description="Kubernetes operator running AI coding agents (OpenCode cells) with Test-Commit-Revert" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.reactor.opencode-version="${OPENCODE_VERSION}" \
      dev.reactor.contents="reactor operator wheel (no dev tools), opencode ${OPENCODE_VERSION} + plugin seed, git, openssh-client, ripgrep, tini"
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# git (worktrees, commits, pushes), ssh (ssh:// repositories), ripgrep (OpenCode's search
# tool; otherwise each cell would download it), tini (PID 1: forwards SIGTERM, reaps
# orphans). Versions pinned to the Debian 12 release line, patch updates allowed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      git=1:2.39.* \
      openssh-client=1:9.2p1-* \
      ripgrep=13.0.* \
      tini=0.19.* \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 reactor \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/reactor --shell /usr/sbin/nologin reactor \
 && install -d -o 10001 -g 10001 /var/lib/reactor
COPY --from=opencode /usr/local/bin/opencode /usr/local/bin/opencode
# OpenCode's plugin package, linked read-only into every cell's config dir.
COPY --from=opencode /opt/opencode-seed /opt/opencode-seed
COPY --from=build /opt/venv /opt/venv
# COPY, not RUN --mount=from=build: buildah/podman (4.3) reuse a RUN's cached layer when only
# the mounted stage changed, and would ship the previous wheel. The wheel is ~100 KB.
COPY --from=build /dist/ /tmp/dist/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/reactor-*.whl \
 && rm -rf /tmp/dist \
 && /opt/venv/bin/reactor --version
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/reactor \
    REACTOR_OPENCODE_BIN=/usr/local/bin/opencode \
    REACTOR_WORK_DIR=/var/lib/reactor/work \
    REACTOR_OPENCODE_SEED=/opt/opencode-seed
USER 10001:10001
WORKDIR /var/lib/reactor
EXPOSE 8080
ENTRYPOINT ["/usr/bin/tini", "--", "reactor"]
CMD ["operator"]
