# syntax=docker/dockerfile:1
# The stack's Airflow image: api-server, scheduler, dag-processor, triggerer and the Celery
# workers. Python 3.11 with Airflow, the project and every dependency installed from uv.lock — the
# same lock CI tests — with one extra, the build argument WBC_EXTRA:
#   cpu (default)  TensorFlow without CUDA: every service of a CPU-only stack
#   gpu            tensorflow[and-cuda]: the GPU worker (CUDA and cuDNN come as pip wheels pinned in
#                  uv.lock, so a plain Python base image is enough; the NVIDIA Container Toolkit
#                  injects the driver at run time)
# Build from the repository root: docker compose build (both images), or
#   docker build -f docker/airflow.Dockerfile -t wbc-airflow .
#   docker build -f docker/airflow.Dockerfile --build-arg WBC_EXTRA=gpu -t wbc-airflow-gpu .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE}
ARG WBC_EXTRA=cpu
# TF_FORCE_GPU_ALLOW_GROWTH and NVIDIA_DRIVER_CAPABILITIES matter only where a GPU is handed in.
ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    AIRFLOW_HOME=/opt/airflow \
    PATH=/opt/wbc/.venv/bin:$PATH \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=uv /uv /usr/local/bin/uv

# uid 50000 / gid 0 as in Airflow's images. Folders that named volumes mount over are created
# here, owned by airflow, so new volumes start out writable for it.
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow \
    && mkdir -p /opt/airflow/logs /opt/airflow/auth /opt/airflow/wbc /data/work /data/wbc /data/classify-images /data/weights \
    && chown -R airflow:0 /opt/airflow /data

WORKDIR /opt/wbc
# Dependencies first (cached while only the project's code changes), then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra "${WBC_EXTRA}" --no-install-project
COPY wbc_tasks ./wbc_tasks
COPY wbc_airflow ./wbc_airflow
COPY dags ./dags
# --reinstall-package: uv keys its cached wheel of a local project on pyproject.toml alone, so with
# the cache mount a rebuild after a code change would install the previous build's code.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra "${WBC_EXTRA}" --no-editable --reinstall-package wbc-pipeline

# The worker host-name callable (stack.toml [worker_settings]); Airflow puts plugins on sys.path.
COPY stack/plugins/ /opt/airflow/plugins/
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/wbc-airflow-entrypoint

USER 50000
ENTRYPOINT ["wbc-airflow-entrypoint"]
CMD ["version"]
