#!/usr/bin/env bash
# Writes random credentials for deploy/compose/compose.yml into deploy/compose/secrets/ (kept out
# of git). Existing files are kept, so running it again changes nothing. The directory is 0700; the
# files are 0644 because compose bind-mounts them into containers that run as other uids
# (postgres 999, cdc-egress 10001) and cannot read a 0600 file owned by you.
set -euo pipefail
cd "$(dirname "$0")"
umask 022
mkdir -p secrets
chmod 0700 secrets

rand() { head -c 18 /dev/urandom | base64 | tr -d '/+='; }
put() { [ -s "secrets/$1" ] || { printf '%s' "$2" >"secrets/$1"; echo "wrote secrets/$1"; }; }

put postgres_password "$(rand)"
put cdc_egress_db_password "$(rand)"
put minio_root_user "cdc-egress-admin"
put minio_root_password "$(rand)"

pg_super=$(cat secrets/postgres_password)
pg_cdc=$(cat secrets/cdc_egress_db_password)
s3_user=$(cat secrets/minio_root_user)
s3_pw=$(cat secrets/minio_root_password)

# The daemon: its own role for source and registry, S3 keys for the output.
# (Local stack only: it reuses the MinIO root credentials; give it a bucket-scoped user elsewhere.)
put cdc-egress.env "CDC_EGRESS_SOURCE_URL=postgres://cdc_egress:${pg_cdc}@postgres:5432/app?sslmode=disable
CDC_EGRESS_OUTPUT_OPTIONS_AWS_ACCESS_KEY_ID=${s3_user}
CDC_EGRESS_OUTPUT_OPTIONS_AWS_SECRET_ACCESS_KEY=${s3_pw}
"
# The one-shot `migrate`: the registry as cdc_egress (which owns it), the source as the superuser,
# which the reload-marker event trigger needs.
put migrate.env "CDC_EGRESS_SOURCE_URL=postgres://postgres:${pg_super}@postgres:5432/app?sslmode=disable
CDC_EGRESS_REGISTRY_URL=postgres://cdc_egress:${pg_cdc}@postgres:5432/app?sslmode=disable
"
chmod 0600 secrets/cdc-egress.env secrets/migrate.env   # read by compose itself, not mounted
