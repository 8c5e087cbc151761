# One image for every role:
#   sentpipe ingress        (default; HTTP 8080, metrics 9100)
#   sentpipe worker         (Faust web 6066, metrics 9101)
#   sentpipe topics ensure  /  sentpipe db migrate   (one-shot, before the others start)
# Build from the repository root: docker build -t sentpipe .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
# A compiler is needed only for a dependency that has no wheel for this platform; it stays in this stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
# The rocksdb extra is built in so the worker can switch to SENTPIPE_TABLE_STORE=rocksdb:// without
# another image.
RUN pip wheel --wheel-dir /wheels ".[rocksdb]" \
 && python -m venv /opt/sentpipe \
 && /opt/sentpipe/bin/pip install --no-index --find-links /wheels "sentpipe[rocksdb]"

FROM ${PYTHON_IMAGE}
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
EXPOSE 8080 9100 6066 9101
# Meaningful for the ingress role only; compose overrides it for the others, Kubernetes ignores it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["sentpipe"]
CMD ["ingress"]
