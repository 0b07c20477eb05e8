#!/usr/bin/env bash
# Entry point of the stack's MLflow image: renders the basic-auth settings from the environment
# (the users' database URL holds a password, so it is not baked into the image), then runs
# `mlflow server --backend-store-uri $MLFLOW_BACKEND_STORE_URI <arguments>`.
# The admin user is created on first start from MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD.
set -euo pipefail

missing=()
for name in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
  [ -n "${!name:-}" ] || missing+=("${name}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "error: ${missing[*]} not set: copy .env.example to .env and fill it in (docs/stack.md)" >&2
  exit 78
fi

mkdir -p "$(dirname "${MLFLOW_AUTH_CONFIG_PATH}")"
(
  umask 077
  python -c 'import os, string, sys; sys.stdout.write(string.Template(open(sys.argv[1]).read()).substitute(os.environ))' \
    "${MLFLOW_AUTH_TEMPLATE:-/opt/mlflow/basic_auth.ini.template}" > "${MLFLOW_AUTH_CONFIG_PATH}"
)

exec mlflow server --backend-store-uri "${MLFLOW_BACKEND_STORE_URI}" "$@"
