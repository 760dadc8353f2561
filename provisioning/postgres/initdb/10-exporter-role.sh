#!/bin/sh
# Run by the official postgres image on first start (docker-entrypoint-initdb.d).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v exporter_password="$EXPORTER_DB_PASSWORD" -v owner="$POSTGRES_USER" \
  -f /docker-entrypoint-initdb.d/exporter-role.sql.in
