#!/usr/bin/env bash
# Entry point of the stack's Airflow images.
#   init        check the secrets, migrate the metadata database, write the admin's password
#               for the Simple auth manager (run once per `docker compose up` by airflow-init)
#   check-weights
#               say whether the VGG16 ImageNet weights (WBC_VGG16_WEIGHTS) are there; exit 3 if not
#               (init runs it and warns, but goes on: a stack that only classifies needs none)
#   <anything>  run `airflow <anything>` (api-server, scheduler, celery worker, ...)
set -euo pipefail

check_weights() {
  python - <<'PY'
import sys

from wbc_tasks.core.settings import get_settings
from wbc_tasks.training.model import MissingWeightsError, vgg16_weights_file

try:
    path = vgg16_weights_file(get_settings())
except MissingWeightsError as exc:
    bar = "!" * 100
    print(
        f"{bar}\nWARNING: WBC_VGG16_WEIGHTS: the VGG16 ImageNet weights are missing, so every training run "
        f"with weights=imagenet (the default) will fail at its first step.\n{exc}\n"
        "In the docker-compose stack: put the file into the host folder WBC_HOST_WEIGHTS_DIR (.env), "
        "which is mounted read-only at /data/weights, and keep WBC_VGG16_WEIGHTS naming it "
        "(docs/stack.md, 'ImageNet weights'). Classification needs no weights.\n" + bar,
        file=sys.stderr, flush=True,
    )
    sys.exit(3)
print(f"VGG16 ImageNet weights: {path} (WBC_VGG16_WEIGHTS)", flush=True)
PY
}

if [ "${1:-}" = "check-weights" ]; then
  check_weights
  exit $?
fi

require() {
  local missing=() name
  for name in "$@"; do
    [ -n "${!name:-}" ] || missing+=("$name")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "error: ${missing[*]} not set: copy .env.example to .env and fill it in (docs/stack.md)" >&2
    exit 78
  fi
}

if [ "${1:-}" = "init" ]; then
  require AIRFLOW_ADMIN_USERNAME AIRFLOW_ADMIN_PASSWORD AIRFLOW__CORE__FERNET_KEY \
    AIRFLOW__API_AUTH__JWT_SECRET AIRFLOW__API__SECRET_KEY AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE
  if [ "${AIRFLOW_ADMIN_PASSWORD}" = "admin" ] || [ "${#AIRFLOW_ADMIN_PASSWORD}" -lt 12 ]; then
    echo "error: AIRFLOW_ADMIN_PASSWORD is too weak: use 12+ characters (e.g. openssl rand -hex 16)" >&2
    exit 78
  fi
  airflow db migrate
  # The Simple auth manager reads users from [core] simple_auth_manager_users and their
  # passwords from this file; it only generates (and logs) a password for users missing here.
  passwords_file="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE}"
  mkdir -p "$(dirname "${passwords_file}")"
  (
    umask 077
    python -c 'import json, os, sys; json.dump({os.environ["AIRFLOW_ADMIN_USERNAME"]: os.environ["AIRFLOW_ADMIN_PASSWORD"]}, sys.stdout)' \
      > "${passwords_file}"
  )
  echo "airflow-init: database migrated; admin user '${AIRFLOW_ADMIN_USERNAME}' set from .env"
  check_weights || echo "airflow-init: starting without the VGG16 ImageNet weights (see the warning above)"
  exit 0
fi

exec airflow "$@"
