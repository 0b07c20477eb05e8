#!/usr/bin/env bash
# Creates the stack's other databases next to POSTGRES_DB (the official postgres image runs this
# once, on an empty data volume): MLflow's tracking store, MLflow's users, the predictions table.
# Names come from WBC_EXTRA_DATABASES (docker-compose.yml; the list is stack/stack.toml's).
set -euo pipefail
for db in ${WBC_EXTRA_DATABASES:-}; do
  echo "creating database ${db}"
  psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" \
    -c "CREATE DATABASE \"${db}\" OWNER \"${POSTGRES_USER}\";"
done
