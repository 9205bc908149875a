#!/usr/bin/env bash
# The whole product on local defaults, end to end: starts PostgreSQL and NATS (installing them if
# needed), creates a sample database with a publication, runs `cdc-egress run` while a sample workload
# changes rows, then shows the files, the registry and the JetStream notices it produced.
#
#   bash deploy/demo.sh            # everything lands in ./demo/
#   DEMO_SECONDS=60 bash deploy/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
demo="$root/demo"
db=cdc_egress_demo
seconds="${DEMO_SECONDS:-20}"
psql_() { psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q "$@"; }
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

bash deploy/local/services.sh
say "building cdc-egress (release)"
cargo build --release --quiet
bin="$root/target/release/cdc-egress"

say "sample database $db"
rm -rf "$demo" && mkdir -p "$demo"
psql_ -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cdc_egress_demo'" >/dev/null
psql_ -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
psql_ -d "$db" <<'SQL'
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text, created_at timestamptz DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers, amount numeric(12,2), status text, note text);
CREATE PUBLICATION cdc_egress FOR ALL TABLES;
SQL
cat > "$demo/cdc-egress.yml" <<YML
source:
  url: postgres://postgres@127.0.0.1:5432/$db
  slot: cdc_egress_demo
batch:
  interval: 5s
output:
  url: file://$demo/out
nats:
  url: nats://127.0.0.1:4222
  stream: CDC_EGRESS_DEMO
  subject_prefix: demo
http:
  listen: 127.0.0.1:9187
YML
"$bin" --config "$demo/cdc-egress.yml" drop-slot >/dev/null || true

say "running cdc-egress (log: demo/cdc-egress.log, metrics: http://127.0.0.1:9187/metrics)"
"$bin" --config "$demo/cdc-egress.yml" run >"$demo/cdc-egress.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  [ "$(psql -h 127.0.0.1 -U postgres -d $db -Atqc "select count(*) from pg_replication_slots where slot_name='cdc_egress_demo'")" = 1 ] && break
  sleep 0.2
done

say "sample workload for ${seconds}s: inserts, updates, deletes, multi-table transactions"
end=$((SECONDS + seconds)); i=0
while [ $SECONDS -lt $end ]; do
  i=$((i + 1))
  psql_ -d "$db" <<SQL
BEGIN;
INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com' FROM generate_series($i * 100, $i * 100 + 99) g;
INSERT INTO orders (customer_id, amount, status, note)
  SELECT g, (g % 97) * 1.5, 'new', CASE WHEN g % 5 = 0 THEN 'fragile, "handle" with care' END FROM generate_series($i * 100, $i * 100 + 99) g;
COMMIT;
UPDATE orders SET status = 'shipped' WHERE id % 3 = 0 AND status = 'new';
DELETE FROM orders WHERE id % 11 = 0;
SQL
  sleep 1
done
target=$(psql -h 127.0.0.1 -U postgres -d $db -Atqc "select pg_current_wal_lsn()")
say "waiting until cdc-egress has confirmed $target"
for _ in $(seq 1 300); do
  ok=$(psql -h 127.0.0.1 -U postgres -d $db -Atqc "select confirmed_flush_lsn >= '$target' from pg_replication_slots where slot_name='cdc_egress_demo'")
  [ "$ok" = t ] && break
  sleep 0.5
done
kill -TERM $pid; wait $pid || true; trap - EXIT

say "files (a batch directory is complete when its manifest.json exists)"
find "$demo/out" -type f | sed "s|$root/||" | sort | head -20
first=$(find "$demo/out" -name data.csv.gz | sort | head -1)
say "first lines of $(basename "$(dirname "$first")")/data.csv.gz"
gzip -dc "$first" | head -5
say "its schema.yml (excerpt)"
head -24 "$(dirname "$first")/schema.yml"
say "registry file log (cdc_egress.files)"
psql -h 127.0.0.1 -U postgres -d $db -c "SELECT id, table_name, row_count, byte_size, first_commit_lsn, last_commit_lsn, notified_stream_seq FROM cdc_egress.files ORDER BY id LIMIT 10"
say "cdc-egress status"
"$bin" --config "$demo/cdc-egress.yml" status
say "newest JetStream notices (stream CDC_EGRESS_DEMO, subjects demo.batch.<schema>.<table>)"
"$bin" --config "$demo/cdc-egress.yml" notices --limit 2
if [ -z "${DEMO_KEEP_SLOT:-}" ]; then
  # A slot nobody reads retains WAL forever: drop it (DEMO_KEEP_SLOT=1 keeps it to run the daemon again).
  "$bin" --config "$demo/cdc-egress.yml" drop-slot
fi
say "done: everything is in ./demo (config, log, out/); run it again with: target/release/cdc-egress --config demo/cdc-egress.yml run"
