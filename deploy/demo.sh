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
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step="starting the local services"
pid=""
bin="${CARGO_TARGET_DIR:-$root/target}/release/cdc-egress"
# On every exit: stop the daemon, drop the demo slot (a slot nobody reads retains WAL forever), and
# say which step failed.
finish() {
  local rc=$?
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  if [ -z "${DEMO_KEEP_SLOT:-}" ] && [ -n "${pg_url:-}" ]; then
    psql "$pg_url" -Atqc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cdc_egress_demo' AND NOT active" >/dev/null 2>&1 || true
  fi
  if [ "$rc" != 0 ]; then
    printf '\n\033[1;31mdemo failed while %s (exit %s)\033[0m\n' "$step" "$rc" >&2
    [ -f "$demo/cdc-egress.log" ] && { echo "last lines of demo/cdc-egress.log:" >&2; tail -n 15 "$demo/cdc-egress.log" >&2; }
  fi
  exit "$rc"
}
trap finish EXIT

pg_url=$(bash deploy/local/services.sh --pg-url)
db_url="${pg_url%/*}/$db"
psql_() { psql "$1" -v ON_ERROR_STOP=1 -q "${@:2}"; }
q() { psql "$db_url" -Atqc "$1"; }
step="building cdc-egress (cargo build --release)"
say "building cdc-egress (release)"
cargo build --release --quiet

step="creating the sample database $db"
say "sample database $db"
rm -rf "$demo" && mkdir -p "$demo"
psql_ "$pg_url" -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cdc_egress_demo'" >/dev/null
psql_ "$pg_url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
psql_ "$db_url" <<'SQL'
CREATE TABLE customers (id bigint PRIMARY KEY, name text NOT NULL, email text, created_at timestamptz DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers, amount numeric(12,2), status text, note text);
CREATE PUBLICATION cdc_egress FOR ALL TABLES;
SQL
cat > "$demo/cdc-egress.yml" <<YML
source:
  url: $db_url
  slot: cdc_egress_demo
  name: shop
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

# The demo's stream outlives its database: release the subjects a previous demo (possibly on
# another server) claimed, so this run can claim it (README "Running several daemons").
"$bin" --config "$demo/cdc-egress.yml" release-owner --yes >/dev/null

step="starting cdc-egress run"
say "running cdc-egress (log: demo/cdc-egress.log, metrics: http://127.0.0.1:9187/metrics)"
"$bin" --config "$demo/cdc-egress.yml" run >"$demo/cdc-egress.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  [ "$(q "select count(*) from pg_replication_slots where slot_name='cdc_egress_demo'")" = 1 ] && break
  kill -0 "$pid" 2>/dev/null || { echo "cdc-egress run exited early" >&2; exit 1; }
  sleep 0.2
done

step="running the sample workload"
say "sample workload for ${seconds}s: inserts, updates, deletes, multi-table transactions, one schema change"
end=$((SECONDS + seconds)); i=0
while [ $SECONDS -lt $end ]; do
  i=$((i + 1))
  psql_ "$db_url" <<SQL
BEGIN;
INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com' FROM generate_series($i * 100, $i * 100 + 99) g;
INSERT INTO orders (customer_id, amount, status, note)
  SELECT g, (g % 97) * 1.5, 'new', CASE WHEN g % 5 = 0 THEN 'fragile, "handle" with care' END FROM generate_series($i * 100, $i * 100 + 99) g;
COMMIT;
UPDATE orders SET status = 'shipped' WHERE id % 3 = 0 AND status = 'new';
DELETE FROM orders WHERE id % 11 = 0;
SQL
  if [ "$i" = 3 ]; then
    # A schema change whose default fills the existing rows: a DDL record, and a reload of orders at
    # that position (README "Schema changes").
    psql_ "$db_url" -c "ALTER TABLE orders ADD COLUMN priority integer NOT NULL DEFAULT 1"
  fi
  sleep 1
done
target=$(q "select pg_current_wal_lsn()")
step="waiting for cdc-egress to confirm $target"
say "waiting until cdc-egress has confirmed $target"
ok=f
for _ in $(seq 1 300); do
  ok=$(q "select confirmed_flush_lsn >= '$target' and not exists (select 1 from cdc_egress.reloads
          where status in ('requested', 'running')) from pg_replication_slots where slot_name='cdc_egress_demo'")
  [ "$ok" = t ] && break
  sleep 0.5
done
[ "$ok" = t ] || { echo "cdc-egress did not confirm $target within 150 s" >&2; exit 1; }
step="verifying the files against the source"
say "cdc-egress verify: each table rebuilt from the files alone, compared with the source row by row"
"$bin" --config "$demo/cdc-egress.yml" verify || { echo "cdc-egress verify found differences" >&2; exit 1; }
step="loading the files into another database with cdc-egress apply"
say "cdc-egress apply --into the database ${db}_copy (the reference loader; run it again and it applies nothing twice)"
psql_ "$pg_url" -c "DROP DATABASE IF EXISTS ${db}_copy WITH (FORCE)" -c "CREATE DATABASE ${db}_copy"
"$bin" --config "$demo/cdc-egress.yml" apply --into "${pg_url%/*}/${db}_copy"
psql "${pg_url%/*}/${db}_copy" -c "SELECT (SELECT count(*) FROM orders) AS orders, (SELECT count(*) FROM customers) AS customers"
step="stopping cdc-egress"
kill -TERM "$pid"; wait "$pid" || { echo "cdc-egress run exited with an error" >&2; exit 1; }
pid=""

step="showing the results"
say "files (a batch directory is complete when its manifest.json exists)"
find "$demo/out" -type f | sed "s|$root/||" | sort | sed -n 1,20p
first=$(find "$demo/out" -name data.csv.gz | sort | sed -n 1p)
[ -n "$first" ] || { echo "no data.csv.gz was written under demo/out" >&2; exit 1; }
say "first lines of $(basename "$(dirname "$first")")/data.csv.gz"
# Read the whole file (no early-closing pipe: under pipefail `gzip | head` fails with SIGPIPE).
gzip -dc "$first" | sed -n 1,5p
say "its schema.yml (excerpt)"
head -24 "$(dirname "$first")/schema.yml"
ddl=$(find "$demo/out" -name ddl.yml | sort | sed -n 1p)
if [ -n "$ddl" ]; then
  say "the schema change's record: $(dirname "${ddl#"$demo"/}")/ddl.yml (its one-line fields)"
  grep -E '^[a-z_]+: [^ ]' "$ddl" || true
fi
say "registry file log (cdc_egress.files)"
psql "$db_url" -c "SELECT id, table_name, kind, row_count, byte_size, first_commit_lsn, last_commit_lsn, notified_stream_seq FROM cdc_egress.files ORDER BY id LIMIT 10"
say "cdc-egress status"
"$bin" --config "$demo/cdc-egress.yml" status
say "newest JetStream notices (stream CDC_EGRESS_DEMO, subjects demo.shop.batch.<schema>.<table>)"
"$bin" --config "$demo/cdc-egress.yml" notices --limit 2
if [ -z "${DEMO_KEEP_SLOT:-}" ]; then
  # A slot nobody reads retains WAL forever: drop it (DEMO_KEEP_SLOT=1 keeps it to run the daemon again).
  "$bin" --config "$demo/cdc-egress.yml" drop-slot --yes
fi
say "done: everything is in ./demo (config, log, out/); run it again with: ${bin#"$root"/} --config demo/cdc-egress.yml run"
