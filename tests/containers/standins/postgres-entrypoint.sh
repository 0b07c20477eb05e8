#!/usr/bin/env bash
# The official postgres image's entry-point contract, for the Debian stand-in:
# as root, own PGDATA and re-exec as postgres; on an empty PGDATA, initdb with POSTGRES_USER /
# POSTGRES_PASSWORD, create POSTGRES_DB, run /docker-entrypoint-initdb.d/* (executable *.sh run,
# others sourced; *.sql through psql) on a server listening on the socket only, then stop it and
# exec the real server listening on every interface.
set -Eeo pipefail

if [ "${1:-}" = "postgres" ] && [ "$(id -u)" = "0" ]; then
  mkdir -p "${PGDATA}"
  chown -R postgres:postgres "${PGDATA}"
  chmod 700 "${PGDATA}"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "${1:-}" = "postgres" ] && [ ! -s "${PGDATA}/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "error: database is uninitialised and POSTGRES_PASSWORD is not set" >&2
    exit 1
  fi
  export POSTGRES_USER="${POSTGRES_USER:-postgres}"
  export POSTGRES_DB="${POSTGRES_DB:-${POSTGRES_USER}}"
  initdb --username="${POSTGRES_USER}" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD}") \
    --auth-local=trust --auth-host=scram-sha-256 -D "${PGDATA}"
  printf "\nhost all all all scram-sha-256\n" >> "${PGDATA}/pg_hba.conf"
  printf "\nlisten_addresses = '*'\n" >> "${PGDATA}/postgresql.conf"
  pg_ctl -D "${PGDATA}" -o "-c listen_addresses=''" -w start
  export PGUSER="${POSTGRES_USER}" PGPASSWORD="${POSTGRES_PASSWORD}"
  if [ "${POSTGRES_DB}" != "postgres" ]; then
    psql -v ON_ERROR_STOP=1 --no-psqlrc --dbname postgres -c "CREATE DATABASE \"${POSTGRES_DB}\";"
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "${f}" in
      *.sh)
        if [ -x "${f}" ]; then echo "running ${f}"; "${f}"; else echo "sourcing ${f}"; . "${f}"; fi ;;
      *.sql) echo "running ${f}"; psql -v ON_ERROR_STOP=1 --no-psqlrc --dbname "${POSTGRES_DB}" -f "${f}" ;;
      *) if [ -e "${f}" ]; then echo "ignoring ${f}"; fi ;;
    esac
  done
  unset PGPASSWORD
  pg_ctl -D "${PGDATA}" -m fast -w stop
  echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
