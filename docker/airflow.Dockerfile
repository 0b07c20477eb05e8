# syntax=docker/dockerfile:1
# The stack's Airflow image (api-server, scheduler, dag-processor, triggerer, CPU worker):
# Python 3.11 with Airflow, the project and every dependency installed from uv.lock — the same
# lock CI tests — with the `cpu` extra (TensorFlow without CUDA).
# Build from the repository root: docker compose build (or docker build -f docker/airflow.Dockerfile .)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE}
ARG WBC_EXTRA=cpu
ENV PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    AIRFLOW_HOME=/opt/airflow \
    PATH=/opt/wbc/.venv/bin:$PATH
COPY --from=uv /uv /usr/local/bin/uv

# uid 50000 / gid 0 as in Airflow's images. Folders that named volumes mount over are created
# here, owned by airflow, so new volumes start out writable for it.
RUN useradd --uid 50000 --gid 0 --home-dir /opt/airflow --create-home airflow \
    && mkdir -p /opt/airflow/logs /opt/airflow/auth /opt/airflow/wbc /data/work /data/wbc /data/classify-images \
    && chown -R airflow:0 /opt/airflow /data

WORKDIR /opt/wbc
# Dependencies first (cached while only the project's code changes), then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra "${WBC_EXTRA}" --no-install-project
COPY wbc_tasks ./wbc_tasks
COPY dags ./dags
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra "${WBC_EXTRA}" --no-editable

# The worker host-name callable (stack.toml [worker_settings]); Airflow puts plugins on sys.path.
COPY stack/plugins/ /opt/airflow/plugins/
COPY --chmod=755 docker/entrypoint.sh /usr/local/bin/wbc-airflow-entrypoint

USER 50000
ENTRYPOINT ["wbc-airflow-entrypoint"]
CMD ["version"]
