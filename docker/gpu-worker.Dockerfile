# syntax=docker/dockerfile:1
# The stack's GPU training worker: the Airflow image's layout with the project's `gpu` extra
# (tensorflow[and-cuda]: CUDA and cuDNN come as pip wheels pinned in uv.lock, so a plain Python
# base image is enough; the NVIDIA Container Toolkit injects the driver at run time).
# Serves the Celery queue `gpu` (train_model). Build from the repository root:
#   docker compose --profile gpu build (or docker build -f docker/gpu-worker.Dockerfile .)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    AIRFLOW_HOME=/opt/airflow \
    PATH=/opt/wbc/.venv/bin:$PATH \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=uv /uv /usr/local/bin/uv

RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow \
    && mkdir -p /opt/airflow/logs /opt/airflow/wbc /data/work /data/wbc /data/classify-images \
    && chown -R airflow:0 /opt/airflow /data

WORKDIR /opt/wbc
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra gpu --no-install-project
COPY wbc_tasks ./wbc_tasks
COPY dags ./dags
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra gpu --no-editable

COPY stack/plugins/ /opt/airflow/plugins/
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/wbc-airflow-entrypoint

USER 50000
ENTRYPOINT ["wbc-airflow-entrypoint"]
CMD ["celery", "worker", "--queues", "gpu", "--concurrency", "1", "--celery-hostname", "gpu@%h"]
