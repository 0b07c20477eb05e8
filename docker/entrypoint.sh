#!/usr/bin/env bash
# Entry point of the stack's Airflow images.
#   init        check the secrets, migrate the metadata database, write the admin's password
#               for the Simple auth manager (run once per `docker compose up` by airflow-init)
#   <anything>  run `airflow <anything>` (api-server, scheduler, celery worker, ...)
set -euo pipefail

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
  exit 0
fi

exec airflow "$@"
