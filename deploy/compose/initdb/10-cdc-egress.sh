#!/usr/bin/env bash
# PostgreSQL init script (the postgres image runs it once, on an empty data directory, as the
# superuser): a replication role for cdc-egress that creates (and so owns) its registry schema, a
# sample table, and the publication. Reads the role's password from a secret file, never from the compose file.
#
# Inputs (environment): POSTGRES_USER, POSTGRES_DB (set by the postgres image),
#   CDC_EGRESS_DB_USER (default cdc_egress), CDC_EGRESS_DB_PASSWORD_FILE (required).
# deploy/container/verify.sh also runs this script against a scratch database (PGHOST set).
set -euo pipefail

role=${CDC_EGRESS_DB_USER:-cdc_egress}
pw_file=${CDC_EGRESS_DB_PASSWORD_FILE:?CDC_EGRESS_DB_PASSWORD_FILE must name the password file}
password=$(cat "$pw_file")

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v role="$role" -v password="$password" <<'SQL'
-- Streaming needs REPLICATION; exports need SELECT on the published tables; the registry schema
-- is created by the role itself (`CREATE SCHEMA IF NOT EXISTS` needs CREATE on the database, also
-- when the schema exists). Superuser is only needed once, by `cdc-egress migrate` (the
-- reload-marker event trigger); the compose file runs that as the postgres user.
CREATE ROLE :"role" LOGIN REPLICATION PASSWORD :'password';
GRANT CONNECT, CREATE ON DATABASE :"DBNAME" TO :"role";
GRANT USAGE ON SCHEMA public TO :"role";
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO :"role";

-- Sample data, so the stack has something to stream. Replace with your own schema.
CREATE TABLE public.orders (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer   text NOT NULL,
    amount     numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO public.orders (customer, amount)
SELECT 'customer ' || g, g * 1.5 FROM generate_series(1, 100) AS g;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"role";

CREATE PUBLICATION cdc_egress FOR ALL TABLES;
SQL
echo "cdc-egress: role $role, table public.orders, publication cdc_egress created"
