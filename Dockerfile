# One image for every role:
#   sentpipe ingress        (default; HTTP 8080, metrics 9100)
#   sentpipe worker         (metrics, /livez and /readyz on 9101; Faust's web server is off)
#   sentpipe topics ensure  /  sentpipe db migrate   (one-shot, before the others start)
# Build from the repository root: docker build -t sentpipe .
#
# Reproducible: the dependencies come from requirements.lock (exact versions with sha256 hashes, generated
# from pyproject.toml, see deploy/README.md "The image"), installed in a layer of their own before the
# source is copied, so a source change rebuilds only the last layers. The base is pinned by digest, so the
# same Dockerfile always builds on the same bytes: the multi-platform index of python:3.11-slim-bookworm
# (Python 3.11.16 on Debian bookworm, built 2026-08-25), as docker-library/repo-info records it. To move to
# a newer base, read the tag's current digest (`docker buildx imagetools inspect python:3.11-slim-bookworm`)
# and replace it here, or pass one for a single build:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> -t sentpipe .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

FROM ${PYTHON_IMAGE} AS builder
# A compiler is needed only for a dependency that has no wheel for this platform; it stays in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first, exactly as locked: every file is checked against its hash, nothing unlisted is
# installed (--no-deps), and the build backend (setuptools) comes from the lock too. The rocksdb extra is
# in the lock so the worker can switch to SENTPIPE_TABLE_STORE=rocksdb:// without another image.
COPY requirements.lock ./
RUN python -m venv /opt/sentpipe \
 && /opt/sentpipe/bin/pip install --require-hashes --no-deps -r requirements.lock
# Then the project itself, built with the locked setuptools and nothing from the network.
COPY . .
RUN /opt/sentpipe/bin/pip install --no-deps --no-build-isolation --no-index . \
 && /opt/sentpipe/bin/pip check

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sentpipe" \
      org.opencontainers.image.description="Sent webhooks into Kafka, deduplicated, routed and projected into PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# SENTPIPE_DATA_DIR: the worker's Faust data dir (RocksDB tables live there); a volume in Kubernetes.
ENV PATH=/opt/sentpipe/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SENTPIPE_DATA_DIR=/var/lib/sentpipe
# A fixed numeric uid lets Kubernetes verify runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 sentpipe \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/sentpipe --no-create-home \
      --shell /usr/sbin/nologin sentpipe \
 && install -d -o 10001 -g 10001 /var/lib/sentpipe /var/lib/sentpipe/spool
COPY --from=builder /opt/sentpipe /opt/sentpipe
WORKDIR /var/lib/sentpipe
USER 10001:10001
EXPOSE 8080 9100 9101
# Meaningful for the ingress role only; compose overrides it for the others, Kubernetes ignores it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["sentpipe"]
CMD ["ingress"]
