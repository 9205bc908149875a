#!/usr/bin/env bash
# Change-event latency: commit -> JetStream ack, at a steady rate, with nats.change_events on.
#
#   bash benches/event_latency.sh            (from the repository root)
#
# What it does:
#   1. cargo build --release (skip with BENCH_SKIP_BUILD=1)
#   2. a fresh database cdc_lat_<pid>: one table of the throughput benchmark's shape, a publication, a
#      pgoutput slot; cdc-egress run with nats.change_events: true, started and streaming before the load
#   3. pgbench -R: BENCH_LAT_TPS transactions/s (1000) of BENCH_LAT_ROWS single-statement inserted rows
#      (10) each, i.e. 10,000 changes/s, for BENCH_LAT_SECONDS (30)
#   4. waits until the slot confirms the WAL end, then reads every change event of the stream
#      (benches/event_latency.py) and computes, per event, its JetStream timestamp (the time the server
#      stored it, just before its PubAck) minus the commit_ts of its payload (the commit's timestamp)
#   5. prints p50 / p90 / p99 / p99.9 / max, pgbench's achieved rate and late transactions, and the
#      daemon's CPU; the same as JSON in benches/results/last-latency.json
# Both timestamps come from the same machine's clock. Everything created is removed on exit
# (BENCH_KEEP=1 keeps it). Knobs also: BENCH_PG_HOST/PORT/USER, BENCH_NATS_URL, BENCH_PGBIN,
# BENCH_INTERVAL_S (batch.interval, 10). All addresses must be loopback.

set -Eeuo pipefail
shopt -s inherit_errexit

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

TPS=${BENCH_LAT_TPS:-1000}
ROWS_PER_TXN=${BENCH_LAT_ROWS:-10}
SECONDS_RUN=${BENCH_LAT_SECONDS:-30}
INTERVAL_S=${BENCH_INTERVAL_S:-10}
server_knobs

ID=$$
DB=cdc_lat_$ID
PUB=cdc_lat_$ID
SLOT=cdc_lat_${ID}_egress
STREAM=CDC_LAT_$ID
PREFIX=cdc_lat_$ID
WORK=
DAEMON_PID=

trap 'log "error in line $LINENO: $BASH_COMMAND"' ERR
is_loopback "$PG_HOST" || die "BENCH_PG_HOST=$PG_HOST is not a loopback address"
is_loopback "$NATS_URL" || die "BENCH_NATS_URL=$NATS_URL is not a loopback address"
[[ -x $PGBIN/psql && -x $PGBIN/pgbench ]] || die "psql/pgbench not found in '$PGBIN' (set BENCH_PGBIN)"
PSQL=("$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID"
    fi
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "BENCH_KEEP=1: leaving database $DB, slot $SLOT, stream $STREAM, $WORK"
        exit "$rc"
    fi
    drop_created "'$SLOT'"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

build_release
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cdc-lat.XXXXXX")
python3 "$ROOT/benches/jetstream.py" "$NATS_URL" info "$STREAM" >/dev/null ||
    die "NATS at $NATS_URL does not answer JetStream requests"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
admin "CREATE DATABASE $DB"
NTABLES=1
make_table_names
{
    tables_ddl
    echo "CREATE PUBLICATION $PUB FOR ALL TABLES;"
} | "${PSQL[@]}" -d "$DB" -q
sql "SELECT pg_create_logical_replication_slot('$SLOT', 'pgoutput')" >/dev/null

HTTP_PORT=$(free_port)
EGRESS_ENV=(
    CDC_EGRESS_SOURCE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB"
    CDC_EGRESS_SOURCE_SLOT="$SLOT"
    CDC_EGRESS_SOURCE_PUBLICATION="$PUB"
    CDC_EGRESS_BATCH_INTERVAL="${INTERVAL_S}s"
    CDC_EGRESS_OUTPUT_URL="file://$WORK/out"
    CDC_EGRESS_OUTPUT_SPOOL_DIR="$WORK/spool"
    CDC_EGRESS_NATS_URL="$NATS_URL"
    CDC_EGRESS_NATS_STREAM="$STREAM"
    CDC_EGRESS_NATS_SUBJECT_PREFIX="$PREFIX"
    CDC_EGRESS_NATS_CHANGE_EVENTS=true
    CDC_EGRESS_HTTP_LISTEN="127.0.0.1:$HTTP_PORT"
    CDC_EGRESS_LOG_LEVEL=info
)
egress_unset
mkdir -p "$WORK/out"
env -C "$WORK" "${UNSET[@]}" "${EGRESS_ENV[@]}" "$BIN" migrate >"$WORK/migrate.log" 2>&1 ||
    { cat "$WORK/migrate.log" >&2; die "cdc-egress migrate"; }
env -C "$WORK" "${UNSET[@]}" "${EGRESS_ENV[@]}" "$BIN" run >"$WORK/egress.log" 2>&1 &
DAEMON_PID=$!
# Streaming: the slot is active (and a first commit has gone through, so the stream exists).
for _ in $(seq 300); do
    [[ $(sql "SELECT active FROM pg_replication_slots WHERE slot_name = '$SLOT'") == t ]] && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/egress.log" >&2; die "cdc-egress exited"; }
    sleep 0.1
done
sql "SELECT 1" >/dev/null
sleep 2

# Ids from a sequence; one statement per transaction inserts ROWS_PER_TXN rows.
cat >"$WORK/txn.sql" <<SQL
INSERT INTO t1 (id, customer_id, status, amount, quantity, note, created_at)
SELECT g, g % 100000, 'new', 1.5, 1, 'order note ' || md5(g::text), now()
FROM (SELECT nextval('bench_ids') AS g FROM generate_series(1, $ROWS_PER_TXN)) s;
SQL
read -r _ _ CPU0 _ < <(awk '{ print $1, $2, $14 + $15, $0 }' "/proc/$DAEMON_PID/stat")
log "load: $TPS transactions/s x $ROWS_PER_TXN rows for ${SECONDS_RUN}s (change events on)"
"$PGBIN/pgbench" -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -n -c 4 -j 2 -R "$TPS" -T "$SECONDS_RUN" \
    -f "$WORK/txn.sql" "$DB" >"$WORK/pgbench.log" 2>&1 || { cat "$WORK/pgbench.log" >&2; die pgbench; }
TARGET=$(sql "SELECT pg_current_wal_lsn()")
for _ in $(seq 600); do
    [[ $(sql "SELECT confirmed_flush_lsn >= '$TARGET' FROM pg_replication_slots WHERE slot_name = '$SLOT'") == t ]] && break
    sleep 0.1
done
read -r _ _ CPU1 _ < <(awk '{ print $1, $2, $14 + $15, $0 }' "/proc/$DAEMON_PID/stat")
CHANGES=$(sql "SELECT count(*) FROM t1")
TPS_DONE=$(awk '/^tps = / { printf "%.0f", $3 }' "$WORK/pgbench.log")
LATE=$(awk '/schedule lag/ { print; exit }' "$WORK/pgbench.log")
RESULT=$(python3 "$ROOT/benches/event_latency.py" "$NATS_URL" "$STREAM" "$PREFIX.*.change.>")
EVENTS=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["events"])' "$RESULT")
[[ $EVENTS == "$CHANGES" ]] || die "change events $EVENTS != rows inserted $CHANGES"
HZ=$(getconf CLK_TCK)
EG_CPU=$(calc '%.2f' "($CPU1 - $CPU0) / $HZ")
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
mkdir -p "$ROOT/benches/results"
cat >"$ROOT/benches/results/last-latency.json" <<JSON
{ "finished_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "git_rev": "$GIT_REV", "cores": $(nproc),
  "load_before": "$LOAD_START", "load_after": "$(cut -d' ' -f1-3 /proc/loadavg)",
  "target_tps": $TPS, "rows_per_txn": $ROWS_PER_TXN, "seconds": $SECONDS_RUN, "pgbench_tps": ${TPS_DONE:-0},
  "changes": $CHANGES, "cdc_egress_cpu_s": $EG_CPU, "latency": $RESULT }
JSON
printf '%-12s %s changes in %ss (%s tx/s x %s rows; pgbench: %s tx/s; %s)\n' load "$(commas "$CHANGES")" \
    "$SECONDS_RUN" "$TPS" "$ROWS_PER_TXN" "${TPS_DONE:-?}" "${LATE:-no schedule lag line}"
python3 - "$RESULT" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print("%-12s p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, p99.9 %.1f ms, max %.1f ms (%d events, %d commits)" % (
    "latency", r["p50_ms"], r["p90_ms"], r["p99_ms"], r["p999_ms"], r["max_ms"], r["events"], r["commits"]))
print("%-12s %s" % ("worst/second", " ".join("%.0f" % v for v in r["worst_ms_by_second"])))
PY
printf '%-12s cdc-egress %s s CPU during the load; %s cores, load %s, cdc-egress %s\n' cpu "$EG_CPU" "$(nproc)" \
    "$LOAD_START" "$GIT_REV"
