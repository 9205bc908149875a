#!/usr/bin/env bash
# Memory benchmark: the daemon's peak RSS while many tables hold an open batch each (issue 10).
#
#   BENCH_PG_PORT=54329 bash benches/many_tables.sh            (from the repository root)
#   BENCH_SKIP_BUILD=1 BENCH_TABLES="500 5000" BENCH_PG_PORT=54329 bash benches/many_tables.sh
#
# For each table count N of BENCH_TABLES (default "500 5000"), in order (details: benches/README.md):
#   1. cargo build --release, once (skip with BENCH_SKIP_BUILD=1)
#   2. a fresh database cdc_many_<pid>_<N>: N small tables, a publication FOR ALL TABLES, a pgoutput
#      slot, then ONE row inserted into each table, one transaction per table (before the daemon
#      starts, so that it reads them all in one go, within one batch window)
#   3. cdc-egress run with batch.interval BENCH_INTERVAL_S (300 s): every table opens one batch of one
#      row, and all N stay open until the next wall-clock multiple of the interval
#   4. "open": BENCH_SETTLE_S (3 s) after the daemon has received every row and reports N pending
#      batches: VmHWM (peak RSS) and VmRSS from /proc/<pid>/status
#   5. "sealed" (unless BENCH_SEAL=0): waits for the seal deadline (0 to BENCH_INTERVAL_S seconds) and
#      until the slot's confirmed_flush_lsn reaches the target, i.e. every batch was sealed, uploaded,
#      registered and notified; VmHWM again, so the peak includes the seal of N batches at once
#   6. correctness (with the seal): N streaming files registered, N rows, one notice per file
# A table on stdout, the same as JSON in benches/results/many_tables.json. Everything created is
# removed on exit, also on failure or Ctrl-C (BENCH_KEEP=1 keeps database, slot, stream, work dir).
#
# Knobs (environment): BENCH_TABLES ("500 5000"), BENCH_INTERVAL_S (300), BENCH_SEAL (1),
# BENCH_SETTLE_S (3), BENCH_TIMEOUT_S per phase (900), BENCH_PG_HOST/PORT/USER
# (127.0.0.1/5432/postgres), BENCH_NATS_URL (nats://127.0.0.1:4222), BENCH_PGBIN (newest
# /usr/lib/postgresql/*/bin), BENCH_SKIP_BUILD, BENCH_KEEP. Loopback addresses only; the server must
# have wal_level=logical (deploy/local/services.sh --pg-url prints one that has).

set -Eeuo pipefail
shopt -s inherit_errexit

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

COUNTS=${BENCH_TABLES:-500 5000}
INTERVAL_S=${BENCH_INTERVAL_S:-300}
SEAL=${BENCH_SEAL:-1}
SETTLE_S=${BENCH_SETTLE_S:-3}
TIMEOUT_S=${BENCH_TIMEOUT_S:-900}
server_knobs

ID=$$
DB=
SLOT=
STREAM=
WORK=
DAEMON_PID=
PQ_PID=

trap 'log "error in line $LINENO: $BASH_COMMAND"' ERR
is_loopback "$PG_HOST" || die "BENCH_PG_HOST=$PG_HOST is not a loopback address"
is_loopback "$NATS_URL" || die "BENCH_NATS_URL=$NATS_URL is not a loopback address"
[[ -x $PGBIN/psql ]] || die "psql not found in '$PGBIN' (set BENCH_PGBIN)"
for n in $COUNTS; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "BENCH_TABLES: '$n' is not a table count"; done
PSQL=("$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")

# Clean-up of one table count's run (and, on exit, of the one in progress). Only what it created.
teardown() {
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        for _ in $(seq 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID"
    fi
    DAEMON_PID=
    stop_scrapers
    stop_poller
    PQ_PID=
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        [[ -z $DB ]] || log "BENCH_KEEP=1: leaving database $DB, slot $SLOT, stream $STREAM, $WORK"
        return 0
    fi
    [[ -z $SLOT ]] || drop_slots "'$SLOT'"
    [[ -z $DB ]] || admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 ||
        log "WARNING: could not drop database $DB"
    [[ -z $STREAM ]] || python3 "$ROOT/benches/jetstream.py" "$NATS_URL" delete "$STREAM" >/dev/null 2>&1 ||
        log "WARNING: could not delete JetStream stream $STREAM"
    if [[ -n $WORK && -d $WORK ]]; then rm -rf "$WORK"; fi
    DB='' SLOT='' STREAM='' WORK=''
    return 0
}
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    # A failed run keeps the daemon's log and last metrics (the work directory is removed).
    if ((rc != 0)) && [[ -n $WORK && -f $WORK/egress.log ]]; then
        mkdir -p "$ROOT/benches/results"
        cp "$WORK/egress.log" "$ROOT/benches/results/many_tables-failed.log"
        [[ -z ${HTTP_PORT:-} ]] || curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" \
            >"$ROOT/benches/results/many_tables-failed.metrics" 2>/dev/null
        log "kept the daemon's log in benches/results/many_tables-failed.log"
    fi
    teardown
    exit "$rc"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# since START SECONDS: has SECONDS passed since the $(now) value START?
since() { awk -v a="$1" -v b="$EPOCHREALTIME" -v s="$2" 'BEGIN { exit !(b - a >= s) }'; }
alive() { kill -0 "$DAEMON_PID" 2>/dev/null || { tail -n 30 "$WORK/egress.log" >&2; die "cdc-egress exited"; }; }
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
mib() { calc '%.1f' "$1 / 1024"; }

build_release
python3 "$ROOT/benches/jetstream.py" "$NATS_URL" info "CDC_MANY_PROBE_$ID" >/dev/null ||
    die "NATS at $NATS_URL does not answer JetStream requests"
PG_VERSION=$(admin "SHOW server_version")
[[ $(admin "SHOW wal_level") == logical ]] ||
    die "the server on $PG_HOST:$PG_PORT has no wal_level=logical (see deploy/local/services.sh --pg-url)"

RESULTS=()
ROWS_OUT=()
for N in $COUNTS; do
    DB=cdc_many_${ID}_$N
    SLOT=cdc_many_${ID}_$N
    STREAM=CDC_MANY_${ID}_$N
    PREFIX=cdc_many_${ID}_$N
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/cdc-many.XXXXXX")
    LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
    log "$N tables: database $DB, work dir $WORK"
    admin "CREATE DATABASE $DB"
    # Tables in groups of 500 per transaction (one transaction for all would need N * 3 locks).
    awk -v n="$N" 'BEGIN {
        for (i = 1; i <= n; i++) {
            if (i % 500 == 1) print "BEGIN;"
            printf "CREATE TABLE r%05d (id bigint PRIMARY KEY, name text NOT NULL, qty integer, at timestamptz);\n", i
            if (i % 500 == 0 || i == n) print "COMMIT;"
        }
        print "CREATE PUBLICATION pub FOR ALL TABLES;"
    }' >"$WORK/ddl.sql"
    "${PSQL[@]}" -d "$DB" -q -f "$WORK/ddl.sql" >/dev/null || die "create tables"
    sql "SELECT pg_create_logical_replication_slot('$SLOT', 'pgoutput')" >/dev/null
    awk -v n="$N" 'BEGIN {
        print "SET synchronous_commit = off;"
        for (i = 1; i <= n; i++)
            printf "INSERT INTO r%05d VALUES (%d, '\''row of table %d'\'', %d, now());\n", i, i, i, i % 97
    }' >"$WORK/rows.sql"
    "${PSQL[@]}" -d "$DB" -q -f "$WORK/rows.sql" >/dev/null || die "insert rows"
    TARGET=$(sql "SELECT pg_current_wal_lsn()")
    TARGET_NUM=$(lsn_num "$TARGET")

    HTTP_PORT=$(free_port)
    EGRESS_ENV=(
        CDC_EGRESS_SOURCE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB"
        CDC_EGRESS_SOURCE_SLOT="$SLOT"
        CDC_EGRESS_SOURCE_PUBLICATION=pub
        CDC_EGRESS_BATCH_INTERVAL="${INTERVAL_S}s"
        CDC_EGRESS_OUTPUT_URL="file://$WORK/out"
        CDC_EGRESS_OUTPUT_SPOOL_DIR="$WORK/spool"
        CDC_EGRESS_NATS_URL="$NATS_URL"
        CDC_EGRESS_NATS_STREAM="$STREAM"
        CDC_EGRESS_NATS_SUBJECT_PREFIX="$PREFIX"
        CDC_EGRESS_HTTP_LISTEN="127.0.0.1:$HTTP_PORT"
        CDC_EGRESS_RELOAD_INITIAL=false
        CDC_EGRESS_LOG_LEVEL=info
    )
    egress_unset
    mkdir -p "$WORK/out"
    env -C "$WORK" "${UNSET[@]}" "${EGRESS_ENV[@]}" "$BIN" migrate >"$WORK/migrate.log" 2>&1 ||
        { cat "$WORK/migrate.log" >&2; die "cdc-egress migrate"; }
    start_poller
    T0=$(now)
    env -C "$WORK" "${UNSET[@]}" "${EGRESS_ENV[@]}" "$BIN" run >"$WORK/egress.log" 2>&1 &
    DAEMON_PID=$!
    start_scraper eg "$HTTP_PORT" cdc_egress_received_lsn cdc_egress_pending_batches

    # 4. Open: all rows received and N batches pending, then SETTLE_S more.
    MAX_PENDING=0 RECV_AT=
    while :; do
        alive
        scrape_raw eg
        if [[ $REPLY =~ ^([0-9]+)\ ([0-9]+)$ ]]; then
            if ((BASH_REMATCH[2] > MAX_PENDING)); then MAX_PENDING=${BASH_REMATCH[2]}; fi
            if [[ -z $RECV_AT ]] && ((BASH_REMATCH[1] >= TARGET_NUM && BASH_REMATCH[2] >= N)); then
                RECV_AT=$(now)
            fi
        fi
        if [[ -n $RECV_AT ]] && since "$RECV_AT" "$SETTLE_S"; then break; fi
        ! since "$T0" "$TIMEOUT_S" ||
            die "$N tables: timeout before every batch was open (pending ${REPLY#* }, max $MAX_PENDING)"
        sleep 0.25
    done
    OPEN_HWM=$(status_kb "$DAEMON_PID" VmHWM)
    OPEN_RSS=$(status_kb "$DAEMON_PID" VmRSS)
    OPEN_S=$(elapsed "$T0" "$RECV_AT")
    SPOOL_FILES=$(find "$WORK/spool" -type f | wc -l)
    FDS=$(find "/proc/$DAEMON_PID/fd" -mindepth 1 | wc -l)
    log "$N tables open after ${OPEN_S}s: peak RSS $(mib "$OPEN_HWM") MiB, RSS $(mib "$OPEN_RSS") MiB," \
        "$SPOOL_FILES named spool files, $FDS open descriptors"

    SEAL_HWM=0 SEAL_S=0 CHECK=skipped FILES=0 REG_ROWS=0 NOTICES=0
    if [[ $SEAL == 1 ]]; then
        log "$N tables: waiting for the seal deadline (up to ${INTERVAL_S}s)"
        while :; do
            alive
            q "SELECT coalesce(confirmed_flush_lsn >= '$TARGET', false) FROM pg_replication_slots WHERE slot_name = '$SLOT';"
            [[ $REPLY == t ]] && break
            ! since "$T0" "$TIMEOUT_S" ||
                die "$N tables: timeout before the slot confirmed the target"
            sleep 0.5
        done
        SEAL_HWM=$(status_kb "$DAEMON_PID" VmHWM)
        SEAL_S=$(elapsed "$T0" "$(now)")
        read -r FILES REG_ROWS < <(sql "SELECT count(*), coalesce(sum(row_count), 0) FROM cdc_egress.files
                                        WHERE kind = 'streaming' AND table_schema = 'public'" | tr '|' ' ')
        NOTICES=$(python3 "$ROOT/benches/jetstream.py" "$NATS_URL" info "$STREAM")
        if [[ $NOTICES =~ ^[0-9]+$ ]]; then NOTICES=$((NOTICES - 1)); fi # minus the owner record
        CHECK=ok
        [[ $FILES == "$N" && $REG_ROWS == "$N" && $NOTICES == "$N" ]] ||
            CHECK="files $FILES, rows $REG_ROWS, notices $NOTICES (want $N each)"
        log "$N tables sealed after ${SEAL_S}s: peak RSS $(mib "$SEAL_HWM") MiB; check: $CHECK"
    fi
    WARNINGS=$(grep -cE ' (WARN|ERROR) ' "$WORK/egress.log" || true)
    LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
    ROWS_OUT+=("$(printf '%-8s %10s %10s %12s %8s %7s %s' "$(commas "$N")" "$(mib "$OPEN_HWM")" \
        "$(mib "$OPEN_RSS")" "$([[ $SEAL == 1 ]] && mib "$SEAL_HWM" || echo -)" "$MAX_PENDING" "$FDS" "$CHECK")")
    RESULTS+=("{ \"tables\": $N, \"open_s\": $OPEN_S, \"open_peak_rss_kib\": $OPEN_HWM, \"open_rss_kib\": $OPEN_RSS,
    \"sealed_s\": $SEAL_S, \"sealed_peak_rss_kib\": $SEAL_HWM, \"max_pending_batches\": $MAX_PENDING,
    \"named_spool_files_open\": $SPOOL_FILES, \"open_fds\": $FDS, \"files\": $FILES, \"rows\": $REG_ROWS,
    \"notices\": $NOTICES, \"check\": \"$CHECK\", \"log_warnings\": $WARNINGS,
    \"load_before\": \"$LOAD_START\", \"load_after\": \"$LOAD_END\" }")
    [[ $CHECK == ok || $CHECK == skipped ]] || die "$N tables: $CHECK"
    teardown
done

GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
{
    printf 'peak RSS (VmHWM, MiB) with one open batch of one row per table; batch.interval %ss\n' "$INTERVAL_S"
    printf '%-8s %10s %10s %12s %8s %7s %s\n' tables "peak open" "RSS open" "peak sealed" pending fds check
    printf '%s\n' "${ROWS_OUT[@]}"
    printf 'machine  %s cores, PostgreSQL %s, cdc-egress %s\n' "$(nproc)" "$PG_VERSION" "$GIT_REV"
}
mkdir -p "$ROOT/benches/results"
{
    printf '{ "date": "%s", "cores": %s, "postgres": "%s", "cdc_egress": "%s", "batch_interval_s": %s,\n  "runs": [\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(nproc)" "$PG_VERSION" "$GIT_REV" "$INTERVAL_S"
    (IFS=,; printf '%s\n' "${RESULTS[*]}")
    printf '  ]\n}\n'
} >"$ROOT/benches/results/many_tables.json"
log "wrote benches/results/many_tables.json"
