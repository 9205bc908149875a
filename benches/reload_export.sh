#!/usr/bin/env bash
# Parallel table export: `cdc-egress reload <table> --wait` against the reference
# `psql -c "COPY (… ctid range …) TO STDOUT (FORMAT csv)" | gzip -1` run with the same number of
# parallel pipelines over the same ctid ranges, on the same table, in one run. Prints both wall times
# and the ratio (reference time / cdc-egress time: above 1 means cdc-egress is faster).
#
#   bash benches/reload_export.sh              # defaults: 3,000,000 rows, parallelism 2
#   ROWS=5000000 PARALLELISM=2 bash benches/reload_export.sh
#   BENCH_PG_PORT=54329 bash benches/reload_export.sh   # the private server of deploy/local/services.sh
# Also times the same pipelines without compression (`COPY … TO STDOUT` into /dev/null): the ceiling of
# any export without gzip. Needs the local services (deploy/local/services.sh) and a release build (built
# if missing; BENCH_BIN=<path> runs that binary). The last lines are also written as JSON to
# benches/results/reload_export.json.
set -euo pipefail
export LC_ALL=C  # `times` and `printf` print numbers for `bc`: a decimal point
cd "$(dirname "$0")/.."
rows="${ROWS:-3000000}"
par="${PARALLELISM:-2}"
db="cdc_export_bench_$$"
work=$(mktemp -d)
bin=${BENCH_BIN:-${CARGO_TARGET_DIR:-target}/release/cdc-egress}
host=${BENCH_PG_HOST:-127.0.0.1}
port=${BENCH_PG_PORT:-5432}
case "$host" in 127.*|localhost|::1) ;; *) echo "BENCH_PG_HOST=$host is not a loopback address" >&2; exit 1 ;; esac
psql_() { psql -h "$host" -p "$port" -U postgres -v ON_ERROR_STOP=1 -qAt "$@"; }
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  psql_ -d postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE '${db}%'" >/dev/null 2>&1 || true
  psql_ -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  python3 benches/jetstream.py nats://127.0.0.1:4222 delete "EXPORT_BENCH_$$" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
[ -x "$bin" ] || cargo build --release --quiet
psql_ -d postgres -c "CREATE DATABASE $db"
psql_ -d "$db" -c "CREATE TABLE big (id bigint PRIMARY KEY, customer int, amount numeric(12,2), note text, created timestamptz)" \
      -c "INSERT INTO big SELECT g, g % 9973, (g % 100000) / 100.0, 'order note ' || md5(g::text), '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, $rows) g" \
      -c "VACUUM ANALYZE big" -c "CREATE PUBLICATION cdc_egress FOR TABLE big"
pages=$(psql_ -d "$db" -c "SELECT pg_relation_size('big') / current_setting('block_size')::int")
size=$(psql_ -d "$db" -c "SELECT pg_size_pretty(pg_relation_size('big'))")
echo "table: $rows rows, $pages pages ($size), parallelism $par"

# Reference: $par parallel COPY | gzip -1 pipelines over equal ctid ranges; then the same COPYs into
# /dev/null (no compression: the ceiling).
step=$(( (pages + par - 1) / par ))
copy_all() { # $1: gzip or null
  local k lo hi cond
  for k in $(seq 0 $((par - 1))); do
    lo=$((k * step)); hi=$(((k + 1) * step))
    cond="ctid >= '($lo,0)'::tid"; [ "$k" -lt $((par - 1)) ] && cond="$cond AND ctid < '($hi,0)'::tid"
    if [ "$1" = gzip ]; then
      ( psql -h "$host" -p "$port" -U postgres -d "$db" -qAt -c "COPY (SELECT * FROM big WHERE $cond) TO STDOUT (FORMAT csv)" | gzip -1 > "$work/ref-$k.csv.gz" ) &
    else
      psql -h "$host" -p "$port" -U postgres -d "$db" -qAt -c "COPY (SELECT * FROM big WHERE $cond) TO STDOUT (FORMAT csv)" >/dev/null &
    fi
  done
  wait
}
# CPU seconds (user + system) of a process, or of this shell's waited-for children.
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }
# (`times` runs in this shell, not in a command substitution's subshell, which has no children.)
children_cpu() {
  times >"$work/times"
  CHILDREN_CPU=$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub(/s$/, "", p[2]); t += p[1] * 60 + p[2] } printf "%.3f", t }' "$work/times")
}
children_cpu; cpu0=$CHILDREN_CPU
start=$(date +%s.%N)
copy_all gzip
ref=$(echo "$(date +%s.%N) - $start" | bc)
children_cpu; ref_cpu=$(echo "$CHILDREN_CPU - $cpu0" | bc)
ref_bytes=$(cat "$work"/ref-*.csv.gz | wc -c)
start=$(date +%s.%N)
copy_all null
plain=$(echo "$(date +%s.%N) - $start" | bc)

# cdc-egress: the daemon exports on request, through its marker, with reload.parallelism = $par.
export CDC_EGRESS_SOURCE_URL="postgres://postgres@$host:$port/$db"
export CDC_EGRESS_SOURCE_SLOT="${db}_slot" CDC_EGRESS_OUTPUT_URL="file://$work/out" CDC_EGRESS_RELOAD_INITIAL=false
export CDC_EGRESS_RELOAD_PARALLELISM="$par" CDC_EGRESS_NATS_STREAM="EXPORT_BENCH_$$" CDC_EGRESS_NATS_SUBJECT_PREFIX="exportbench$$"
export CDC_EGRESS_HTTP_LISTEN="" CDC_EGRESS_OUTPUT_SPOOL_DIR="$work/spool"
"$bin" run >"$work/daemon.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  [ "$(psql_ -d "$db" -c "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '${db}_slot' AND active")" = 1 ] && break
  sleep 0.1
done
start=$(date +%s.%N)
daemon_cpu0=$(proc_cpu "$pid")
"$bin" reload public.big --wait >/dev/null 2>"$work/reload.log"
egress=$(echo "$(date +%s.%N) - $start" | bc)
egress_cpu=$(echo "$(proc_cpu "$pid") - $daemon_cpu0" | bc)
read -r exported eg_bytes parts marker_s export_s <<<"$(psql_ -d "$db" -F ' ' -c "SELECT rows, bytes, parts, \
  round(extract(epoch FROM finished_at - requested_at), 3), round(extract(epoch FROM finished_at - started_at), 3) \
  FROM cdc_egress.reloads WHERE status = 'done'")"
[ "$exported" = "$rows" ] || { echo "cdc-egress exported $exported rows, expected $rows"; exit 1; }
printf 'COPY | gzip -1   %6.2f s  (%s bytes gz)\n' "$ref" "$ref_bytes"
printf 'cdc-egress       %6.2f s  (%s bytes gz, %s parts, request to done)\n' "$egress" "$eg_bytes" "$parts"
printf '  in the daemon   %6.2f s  from reading the marker, %.2f s from the start of the export\n' "$marker_s" "$export_s"
printf 'CPU              %6.2f s  cdc-egress (the daemon), %.2f s psql + gzip -1 (the servers'"'"' backends not counted)\n' "$egress_cpu" "$ref_cpu"
printf 'COPY > /dev/null %6.2f s  (no compression)\n' "$plain"
printf 'ratio            %.2fx  (COPY | gzip -1 time / cdc-egress time)\n' "$(echo "$ref / $egress" | bc -l)"
printf 'ratio to COPY    %.2fx  (COPY > /dev/null time / cdc-egress time)\n' "$(echo "$plain / $egress" | bc -l)"
mkdir -p benches/results
printf '{"rows": %s, "parallelism": %s, "copy_gzip_s": %.3f, "copy_null_s": %.3f, "egress_s": %.3f, "egress_from_marker_s": %.3f, "egress_export_s": %.3f, "egress_cpu_s": %.3f, "copy_gzip_cpu_s": %.3f, "ratio_gzip": %.3f, "ratio_null": %.3f}\n' \
  "$rows" "$par" "$ref" "$plain" "$egress" "$marker_s" "$export_s" "$egress_cpu" "$ref_cpu" "$(echo "$ref / $egress" | bc -l)" "$(echo "$plain / $egress" | bc -l)" \
  >benches/results/reload_export.json
