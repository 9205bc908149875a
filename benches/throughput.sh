#!/usr/bin/env bash
# Throughput benchmark: cdc-egress against pg_recvlogical on the same logical-decoding workload.
#
#   bash benches/throughput.sh            (from the repository root)
#
# What it does, in order (details and the meaning of each figure: benches/README.md):
#   1. cargo build --release (skip with BENCH_SKIP_BUILD=1)
#   2. a fresh database cdc_bench_<pid>: 10 tables, a publication FOR ALL TABLES, and two pgoutput
#      slots created *before* any row is written, so both consumers decode exactly the same WAL
#   3. the workload: bulk INSERT ... SELECT generate_series in transactions of varied sizes, bulk
#      UPDATEs and DELETEs, then pgbench small transactions; its change count comes from the server's
#      command tags and pgbench, and is cross-checked against pg_stat_user_tables
#   4. target = pg_current_wal_lsn() after the workload
#   5. pg_recvlogical drains slot 1 (timed until the slot's confirmed_flush_lsn >= target)
#   6. cdc-egress run drains slot 2 (timed until received LSN >= target, and until the slot's
#      confirmed_flush_lsn >= target); peak RSS from /proc/<pid>/status VmHWM
#   7. correctness: rows registered in cdc_egress.files (and per-op counts) must equal the workload,
#      and the JetStream stream must hold one notice per registered file; a mismatch fails the run
#   8. a table on stdout, the same as JSON in benches/results/last.json
# The consumers run one after the other, never concurrently. Everything created is removed on exit,
# also on failure or Ctrl-C (BENCH_KEEP=1 keeps the database, slots, stream and work directory).
#
# Knobs (environment): BENCH_ROWS_PER_TABLE (120000), BENCH_PGBENCH_TXNS (10000), BENCH_INTERVAL_S (10),
# BENCH_TIMEOUT_S per consumer (600), BENCH_PG_HOST/PORT/USER (127.0.0.1/5432/postgres),
# BENCH_NATS_URL (nats://127.0.0.1:4222), BENCH_PGBIN (newest /usr/lib/postgresql/*/bin),
# BENCH_SKIP_BUILD, BENCH_KEEP, BENCH_PG_SSLMODE (both consumers' libpq sslmode), BENCH_PERF=1 (system-wide `perf record` during each drain, saved in
# benches/results/, with a per-thread CPU summary), BENCH_CHANGE_EVENTS=1 (nats.change_events: one
# JetStream message per change, acks awaited before the LSN moves; the check then also requires one
# message per change on <prefix>.*.change.>; BENCH_CHANGE_EVENTS=grouped: nats.change_events: grouped,
# one message per run of a transaction's changes of one table on <prefix>.*.changes.>, checked to be
# between 1 and one per change). All addresses must be loopback.

set -Eeuo pipefail
shopt -s inherit_errexit

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

ROWS=${BENCH_ROWS_PER_TABLE:-120000}
PGBENCH_TXNS=${BENCH_PGBENCH_TXNS:-10000}
INTERVAL_S=${BENCH_INTERVAL_S:-10}
TIMEOUT_S=${BENCH_TIMEOUT_S:-600}
server_knobs
NTABLES=10

ID=$$
DB=cdc_bench_$ID
PUB=cdc_bench_$ID
SLOT_REF=cdc_bench_${ID}_recvlogical
SLOT_CDC=cdc_bench_${ID}_egress
STREAM=CDC_BENCH_$ID
PREFIX=cdc_bench_$ID
WORK=
RECV_PID=
RECV_JOB=
DAEMON_PID=
DAEMON_JOB=
PQ_PID=
PERF_PID=

trap 'log "error in line $LINENO: $BASH_COMMAND"' ERR
is_loopback "$PG_HOST" || die "BENCH_PG_HOST=$PG_HOST is not a loopback address"
is_loopback "$NATS_URL" || die "BENCH_NATS_URL=$NATS_URL is not a loopback address"
[[ -x $PGBIN/pg_recvlogical && -x $PGBIN/psql && -x $PGBIN/pgbench ]] ||
    die "pg_recvlogical/psql/pgbench not found in '$PGBIN' (set BENCH_PGBIN)"

PSQL=("$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")
# The replication connections of both consumers (and cdc-egress's catalog and registry connections)
# go over TCP to PG_HOST, or with BENCH_PG_SOCKET=<directory> over the server's unix socket in that
# directory (same port number); the bench's own psql session stays on TCP.
PG_SOCKET=${BENCH_PG_SOCKET:-}
if [[ -n $PG_SOCKET ]]; then
    [[ -S $PG_SOCKET/.s.PGSQL.$PG_PORT ]] || die "BENCH_PG_SOCKET: no socket $PG_SOCKET/.s.PGSQL.$PG_PORT"
    REPL_HOST=$PG_SOCKET
    TRANSPORT="unix socket $PG_SOCKET/.s.PGSQL.$PG_PORT"
    EGRESS_URL_HOST="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$PG_SOCKET")"
else
    REPL_HOST=$PG_HOST
    TRANSPORT="tcp $PG_HOST:$PG_PORT"
    EGRESS_URL_HOST=$PG_HOST
fi
# BENCH_PG_SSLMODE=<libpq sslmode> sets the TLS mode of both consumers' connections (PGSSLMODE, so
# also for the bench's own psql and pgbench sessions; ?sslmode= for cdc-egress); by default all use
# libpq's `prefer`.
URL_QUERY=
if [[ -n ${BENCH_PG_SSLMODE:-} ]]; then
    export PGSSLMODE=$BENCH_PG_SSLMODE
    URL_QUERY="?sslmode=$BENCH_PG_SSLMODE"
fi

# ------------------------------------------------------------------------------------------------
# Clean-up: runs on every exit. Only touches what this run created (names carry our pid).

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    for pid in $RECV_PID $DAEMON_PID $RECV_JOB $DAEMON_JOB $PERF_PID "${STAT_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
    done
    stop_scrapers
    stop_poller
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "BENCH_KEEP=1: leaving database $DB, slots $SLOT_REF/$SLOT_CDC, stream $STREAM, $WORK"
        exit "$rc"
    fi
    drop_created "'$SLOT_REF','$SLOT_CDC'"
    exit "$rc"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# ------------------------------------------------------------------------------------------------
# Helpers of this benchmark (the shared ones are in benches/lib.sh).

# Optional profile of the whole machine while one consumer drains (BENCH_PERF=1): which processes and
# threads used the CPU, including whatever else runs on a shared machine.
perf_start() { # name
    [[ ${BENCH_PERF:-0} == 1 ]] || return 0
    mkdir -p "$ROOT/benches/results"
    rm -f "$ROOT/benches/results/perf-$1.data" "$ROOT/benches/results/perf-$1.data.old"
    perf record -q -F 499 -a -o "$ROOT/benches/results/perf-$1.data" >"$WORK/perf-$1.log" 2>&1 &
    PERF_PID=$!
    sleep 0.5
}
# ... and, per process, counts of the system calls and scheduler events that show how data moves
# between the walsender and the consumer (perf stat on syscall tracepoints, cheap).
PERF_EVENTS='task-clock,context-switches,cpu-migrations'
for e in read recvfrom readv write sendto writev futex epoll_wait epoll_pwait ppoll poll select pselect6; do
    PERF_EVENTS+=,syscalls:sys_enter_$e
done
STAT_PIDS=()
perf_stat() { # name pid
    [[ ${BENCH_PERF:-0} == 1 ]] || return 0
    perf stat -x, -e "$PERF_EVENTS" -p "$2" -o "$ROOT/benches/results/perf-stat-$1.csv" >/dev/null 2>&1 &
    STAT_PIDS+=($!)
}
perf_stat_stop() {
    local p
    for p in "${STAT_PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    STAT_PIDS=()
}
# launch NAME LOG CMD...: starts CMD in the background, under `perf stat` (which follows every thread
# it creates) when BENCH_PERF=1; sets JOB (what to wait for) and PID (the command's own process).
launch() {
    local name=$1 logf=$2
    shift 2
    if [[ ${BENCH_PERF:-0} == 1 ]]; then
        perf stat -x, -e "$PERF_EVENTS" -o "$ROOT/benches/results/perf-stat-$name.csv" -- "$@" >"$logf" 2>&1 &
        JOB=$!
        PID=
        for _ in $(seq 400); do
            { read -r PID _ <"/proc/$JOB/task/$JOB/children"; } 2>/dev/null || true
            [[ -n $PID ]] && break
            sleep 0.005
        done
        [[ -n $PID ]] || die "cannot find the process perf stat started"
    else
        "$@" >"$logf" 2>&1 &
        JOB=$!
        PID=$!
    fi
}
perf_stop() { # name
    perf_stat_stop
    [[ -n $PERF_PID ]] || return 0
    kill -INT "$PERF_PID"
    wait "$PERF_PID" || true
    PERF_PID=
    perf report -i "$ROOT/benches/results/perf-$1.data" --stdio --sort pid 2>/dev/null |
        grep -E '^ +[0-9]' | head -n 12 >"$ROOT/benches/results/perf-$1.threads.txt" || true
    perf report -i "$ROOT/benches/results/perf-$1.data" --stdio --sort comm,dso,sym 2>/dev/null |
        grep -E '^ +[0-9]' | head -n 60 >"$ROOT/benches/results/perf-$1.symbols.txt" || true
    log "perf ($1): benches/results/perf-$1.{data,threads.txt,symbols.txt}"
}

# Is the slot's confirmed_flush_lsn at or past the target? Also records the walsender's pid.
slot_done() {
    q "SELECT coalesce(confirmed_flush_lsn >= '$TARGET', false)::text || ' ' || coalesce(active_pid, 0)
       FROM pg_replication_slots WHERE slot_name = '$1';"
    [[ $REPLY =~ ^(true|false)\ ([0-9]+)$ ]] || die "unexpected poll reply: $REPLY"
    local done=${BASH_REMATCH[1]} pid=${BASH_REMATCH[2]}
    if [[ $pid != 0 && -z $WALSENDER_PID ]]; then
        WALSENDER_PID=$pid
        q "SELECT coalesce((SELECT CASE WHEN ssl THEN version || ' ' || cipher ELSE 'no' END
                            FROM pg_stat_ssl WHERE pid = $pid), 'unknown');"
        WALSENDER_SSL=$REPLY
    fi
    [[ $done == true ]]
}

# ------------------------------------------------------------------------------------------------
# 1. Build.

build_release

# ------------------------------------------------------------------------------------------------
# 2. Database, tables, publication, slots.

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cdc-bench.XXXXXX")
mkfifo "$WORK/nap"
exec {NAP_FD}<>"$WORK/nap"
python3 "$ROOT/benches/jetstream.py" "$NATS_URL" info "$STREAM" >/dev/null ||
    die "NATS at $NATS_URL does not answer JetStream requests"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "database $DB, work dir $WORK (load average $LOAD_START)"
admin "CREATE DATABASE $DB"
make_table_names
{
    tables_ddl
    echo "CREATE PUBLICATION $PUB FOR ALL TABLES;"
} | "${PSQL[@]}" -d "$DB" -q

# A checkpoint first, so that the share of full-page images in the workload's WAL does not depend on
# where the server's checkpoint cycle happens to be.
admin "CHECKPOINT"
# Both slots exist before the first row is written: they decode exactly the same WAL.
START_LSN=$(sql "SELECT lsn FROM pg_create_logical_replication_slot('$SLOT_REF', 'pgoutput')")
sql "SELECT pg_create_logical_replication_slot('$SLOT_CDC', 'pgoutput')" >/dev/null

# ------------------------------------------------------------------------------------------------
# 3. Workload. Counts come from the server's command tags; transactions are counted as we go.

GEN_START=$(now)
log "workload: $NTABLES tables x $ROWS rows bulk, updates, deletes, $PGBENCH_TXNS pgbench transactions"
run_workload

# 4. The target: WAL end after the workload.
TARGET=$(sql "SELECT pg_current_wal_lsn()")
TARGET_NUM=$(lsn_num "$TARGET")
WAL_BYTES=$((TARGET_NUM - $(lsn_num "$START_LSN")))
GEN_S=$(elapsed "$GEN_START" "$(now)")

check_workload
log "workload done in ${GEN_S}s: $(commas $CHANGES) changes (I $INS / U $UPD / D $DEL) in $(commas $TXNS) transactions," \
    "$(calc '%.1f' "$WAL_BYTES / 1048576") MiB of WAL, target $TARGET"

start_poller

# ------------------------------------------------------------------------------------------------
# 5. Reference: pg_recvlogical. -E stops it once it has written everything up to the target (it sends
#    its final flush position before exiting); -s 1 / -F 1 keep its feedback at most 1 s behind anyway.

log "pg_recvlogical: draining $SLOT_REF"
WALSENDER_PID=
WALSENDER_SSL=
perf_start recvlogical
tick; T0_US=$NOW_US
launch recvlogical "$WORK/recvlogical.log" \
    "$PGBIN/pg_recvlogical" -d "host=$REPL_HOST port=$PG_PORT user=$PG_USER dbname=$DB" \
    --slot="$SLOT_REF" --start -f /dev/null -o proto_version=1 -o "publication_names=$PUB" \
    -F 1 -s 1 -E "$TARGET" --no-loop
RECV_PID=$PID
RECV_JOB=$JOB
WS_STAT=
while :; do
    tick
    [[ -z $WALSENDER_PID ]] || sample ref_ws "$WALSENDER_PID"
    sample ref "$RECV_PID"
    slot_done "$SLOT_REF" && break
    [[ -n $WS_STAT || -z $WALSENDER_PID ]] || { perf_stat walsender-recvlogical "$WALSENDER_PID"; WS_STAT=1; }
    if ! kill -0 "$RECV_PID" 2>/dev/null && ! slot_done "$SLOT_REF"; then
        cat "$WORK/recvlogical.log" >&2
        die "pg_recvlogical exited before confirming $TARGET"
    fi
    ((NOW_US - T0_US < TIMEOUT_S * 1000000)) || die "pg_recvlogical: timeout"
    nap
done
REF_S=$(calc '%.3f' "($NOW_US - $T0_US) / 1e6")
REF_SSL=${WALSENDER_SSL:-unknown}
wait "$RECV_JOB" || { cat "$WORK/recvlogical.log" >&2; die "pg_recvlogical failed"; }
RECV_PID=
RECV_JOB=
perf_stop recvlogical
log "pg_recvlogical: ${REF_S}s"

# ------------------------------------------------------------------------------------------------
# 6. cdc-egress. The registry schema is installed first (a one-time step, not timed; its WAL lies
#    after the target).

HTTP_PORT=$(free_port)
EGRESS_ENV=(
    CDC_EGRESS_SOURCE_URL="postgres://$PG_USER@$EGRESS_URL_HOST:$PG_PORT/$DB$URL_QUERY"
    CDC_EGRESS_SOURCE_SLOT="$SLOT_CDC"
    CDC_EGRESS_SOURCE_PUBLICATION="$PUB"
    CDC_EGRESS_BATCH_INTERVAL="${INTERVAL_S}s"
    CDC_EGRESS_OUTPUT_URL="file://$WORK/out"
    CDC_EGRESS_OUTPUT_SPOOL_DIR="$WORK/spool"
    CDC_EGRESS_NATS_URL="$NATS_URL"
    CDC_EGRESS_NATS_STREAM="$STREAM"
    CDC_EGRESS_NATS_SUBJECT_PREFIX="$PREFIX"
    CDC_EGRESS_HTTP_LISTEN="127.0.0.1:$HTTP_PORT"
    CDC_EGRESS_LOG_LEVEL=info
)
CHANGE_EVENTS=false
case ${BENCH_CHANGE_EVENTS:-0} in
0) ;;
1) CHANGE_EVENTS=true ;;
grouped) CHANGE_EVENTS=grouped ;;
*) die "BENCH_CHANGE_EVENTS must be 0, 1 or grouped, not ${BENCH_CHANGE_EVENTS}" ;;
esac
EGRESS_ENV+=(CDC_EGRESS_NATS_CHANGE_EVENTS=$CHANGE_EVENTS)
# BENCH_EGRESS_ENV: extra VAR=value words for the daemon's environment (experiments).
read -r -a EXTRA_ENV <<<"${BENCH_EGRESS_ENV:-}"
EGRESS_ENV+=("${EXTRA_ENV[@]}")
egress_unset
egress() { (cd "$WORK" && env "${UNSET[@]}" "${EGRESS_ENV[@]}" "$BIN" "$@"); }
mkdir -p "$WORK/out"
egress migrate >"$WORK/migrate.log" 2>&1 || { cat "$WORK/migrate.log" >&2; die "cdc-egress migrate"; }

log "cdc-egress: draining $SLOT_CDC (batch.interval ${INTERVAL_S}s)"
WALSENDER_PID=
WALSENDER_SSL=
RECV_US=
ACK_US=
EG_CPU_AT_RECV_NS=0
RSS_SERIES=
PEAK_ANON_KB=0
PEAK_FILE_KB=0
FIRST_US=
PAGE_KB=$(($(getconf PAGESIZE) / 1024))
RECV_MESSAGES=0
start_scraper eg "$HTTP_PORT"
sample poller0 "$$"
sample scraper0 "${SCRAPER_PID[eg]}"
# The broker's CPU while cdc-egress runs: read only when exactly one nats-server runs on this machine
# (then it is the one the bench publishes to; BENCH_NATS_URL is loopback only).
mapfile -t NATS_PIDS < <(pgrep -x nats-server || true)
NATS_PID=
((${#NATS_PIDS[@]} != 1)) || { NATS_PID=${NATS_PIDS[0]}; sample nats0 "$NATS_PID"; }
perf_start egress
tick; T0_US=$NOW_US
launch egress "$WORK/egress.log" env -C "$WORK" "${UNSET[@]}" "${EGRESS_ENV[@]}" "$BIN" run
DAEMON_PID=$PID
DAEMON_JOB=$JOB
WS_STAT=
while :; do
    tick
    [[ -n $WS_STAT || -z $WALSENDER_PID ]] || { perf_stat walsender-egress "$WALSENDER_PID"; WS_STAT=1; }
    sample eg "$DAEMON_PID"
    if { read -r _ rss shared _ <"/proc/$DAEMON_PID/statm"; } 2>/dev/null; then
        RSS_SERIES+="$(((NOW_US - T0_US) / 1000)) $((rss * PAGE_KB)) $(((rss - shared) * PAGE_KB)) ${MESSAGES:-0}"$'\n'
        if (((rss - shared) * PAGE_KB > PEAK_ANON_KB)); then PEAK_ANON_KB=$(((rss - shared) * PAGE_KB)); fi
        if ((shared * PAGE_KB > PEAK_FILE_KB)); then PEAK_FILE_KB=$((shared * PAGE_KB)); fi
    fi
    if [[ -z $RECV_US ]] && scrape eg && [[ -z $FIRST_US ]] && ((MESSAGES > 0)); then FIRST_US=$NOW_US; fi
    if [[ -z $RECV_US && -n $RECEIVED_LSN ]] && ((RECEIVED_LSN >= TARGET_NUM)); then
        RECV_US=$NOW_US
        EG_CPU_AT_RECV_NS=${CPU_NS[eg]:-0}
        RECV_MESSAGES=$MESSAGES
    fi
    if [[ -z $ACK_US ]] && slot_done "$SLOT_CDC"; then ACK_US=$NOW_US; fi
    [[ -n $RECV_US && -n $ACK_US ]] && break
    [[ -z $WALSENDER_PID ]] || sample eg_ws "$WALSENDER_PID"
    kill -0 "$DAEMON_PID" 2>/dev/null || { tail -n 30 "$WORK/egress.log" >&2; die "cdc-egress exited"; }
    ((NOW_US - T0_US < TIMEOUT_S * 1000000)) ||
        { tail -n 30 "$WORK/egress.log" >&2; die "cdc-egress: timeout (received: ${RECV_US:+yes})"; }
    nap
done
PEAK_RSS_KB=$(awk '/^VmHWM:/ { print $2 }' "/proc/$DAEMON_PID/status")
sample eg "$DAEMON_PID"
[[ -z $WALSENDER_PID ]] || sample eg_ws "$WALSENDER_PID"
sample poller1 "$$"
sample scraper1 "${SCRAPER_PID[eg]}"
[[ -z $NATS_PID ]] || sample nats1 "$NATS_PID"
NATS_CPU=null
[[ -z ${CPU_NS[nats1]:-} || -z ${CPU_NS[nats0]:-} ]] ||
    NATS_CPU=$(calc '%.2f' "(${CPU_NS[nats1]} - ${CPU_NS[nats0]}) / 1e9")
POLL_CPU=$(calc '%.2f' "(${CPU_NS[poller1]:-0} - ${CPU_NS[poller0]:-0} + ${CPU_NS[scraper1]:-0} - ${CPU_NS[scraper0]:-0}) / 1e9")
curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" >"$WORK/metrics.txt" || die "cannot read cdc-egress metrics"
perf_stop egress
kill -TERM "$DAEMON_PID"
wait "$DAEMON_JOB" || die "cdc-egress exited with status $? after SIGTERM"
DAEMON_PID=
DAEMON_JOB=
EG_SSL=${WALSENDER_SSL:-unknown}
RECV_S=$(calc '%.3f' "($RECV_US - $T0_US) / 1e6")
FIRST_S=$(calc '%.3f' "(${FIRST_US:-$RECV_US} - $T0_US) / 1e6")
ACK_S=$(calc '%.3f' "($ACK_US - $T0_US) / 1e6")
log "cdc-egress: received ${RECV_S}s, confirmed ${ACK_S}s"

# Seal wait: batches seal at the first wall-clock multiple of the interval after they open, so once
# everything is received the open batches wait for the next multiple. The ack followed the last seal,
# which was at the last multiple before the ack.
SEAL_WAIT_S=$(awk -v r="$RECV_US" -v a="$ACK_US" -v i="$INTERVAL_S" \
    'BEGIN { b = int(a / 1e6 / i) * i; w = b - r / 1e6; printf "%.3f", (w > 0 ? w : 0) }')

# ------------------------------------------------------------------------------------------------
# 7. Correctness: what cdc-egress registered and notified must equal the workload.

read -r FILES REG_ROWS REG_I REG_U REG_D REG_GZ REG_CSV < <(sql "
    SELECT count(*), coalesce(sum(row_count), 0), coalesce(sum((ops->>'insert')::bigint), 0),
           coalesce(sum((ops->>'update')::bigint), 0), coalesce(sum((ops->>'delete')::bigint), 0),
           coalesce(sum(byte_size), 0), coalesce(sum(csv_bytes), 0)
    FROM cdc_egress.files WHERE kind = 'streaming' AND table_schema = 'public'" | tr '|' ' ')
# The stream holds the notices and one owner record on <prefix>.<source>.owner (README "Running several daemons").
NOTICES=$(python3 "$ROOT/benches/jetstream.py" "$NATS_URL" info "$STREAM")
[[ $NOTICES =~ ^[0-9]+$ ]] && NOTICES=$((NOTICES - 1))
PROBLEMS=()
EVENTS=0
if [[ $CHANGE_EVENTS == true ]]; then
    # Change events share the stream: one per change, none duplicated.
    EVENTS=$(python3 "$ROOT/benches/jetstream.py" "$NATS_URL" count "$STREAM" "$PREFIX.*.change.>")
    [[ $EVENTS == "$CHANGES" ]] || PROBLEMS+=("change events $EVENTS != workload changes $CHANGES")
    [[ $NOTICES =~ ^[0-9]+$ && $EVENTS =~ ^[0-9]+$ ]] && NOTICES=$((NOTICES - EVENTS))
elif [[ $CHANGE_EVENTS == grouped ]]; then
    # Grouped change events: at least one message, at most one per change (every change exactly
    # once is what tests/failures.rs checks, row by row); none on the per-change subjects.
    EVENTS=$(python3 "$ROOT/benches/jetstream.py" "$NATS_URL" count "$STREAM" "$PREFIX.*.changes.>")
    SINGLE=$(python3 "$ROOT/benches/jetstream.py" "$NATS_URL" count "$STREAM" "$PREFIX.*.change.>")
    [[ $EVENTS =~ ^[0-9]+$ ]] && ((EVENTS >= 1 && EVENTS <= CHANGES)) ||
        PROBLEMS+=("grouped change events $EVENTS not between 1 and the workload's $CHANGES changes")
    [[ $SINGLE == 0 ]] || PROBLEMS+=("$SINGLE per-change events in grouped mode")
    [[ $NOTICES =~ ^[0-9]+$ && $EVENTS =~ ^[0-9]+$ ]] && NOTICES=$((NOTICES - EVENTS))
fi
[[ $REG_ROWS == "$CHANGES" ]] || PROBLEMS+=("registered rows $REG_ROWS != workload changes $CHANGES")
[[ "$REG_I $REG_U $REG_D" == "$INS $UPD $DEL" ]] ||
    PROBLEMS+=("registered I/U/D $REG_I/$REG_U/$REG_D != workload $INS/$UPD/$DEL")
[[ $NOTICES == "$FILES" ]] || PROBLEMS+=("JetStream notices $NOTICES != registered files $FILES")
CHECK=ok
((${#PROBLEMS[@]} == 0)) || CHECK=$(IFS=';'; printf '%s' "${PROBLEMS[*]}")
[[ $NOTICES =~ ^[0-9]+$ ]] || NOTICES=-1
WARNINGS=$(grep -cE ' (WARN|ERROR) ' "$WORK/egress.log" || true)

# ------------------------------------------------------------------------------------------------
# 8. Report.

rate() { calc '%.0f' "$CHANGES / $1"; }
ratio() { calc '%.2f' "$REF_S / $1"; }
REF_RATE=$(rate "$REF_S")
RECV_RATE=$(rate "$RECV_S")
ACK_RATE=$(rate "$ACK_S")
ACK_NOWAIT_S=$(calc '%.3f' "$ACK_S - $SEAL_WAIT_S")
PEAK_RSS_MIB=$(calc '%.1f' "$PEAK_RSS_KB / 1024")
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
PG_VERSION=$(admin "SHOW server_version")
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
REF_CPU=$(cpu_s ref)
REF_WS_CPU=$(cpu_s ref_ws)
EG_CPU=$(cpu_s eg)
EG_CPU_AT_RECV=$(calc '%.2f' "$EG_CPU_AT_RECV_NS / 1e9")
EG_WS_CPU=$(cpu_s eg_ws)

{
    printf '%-18s %s (%d tables; I %s / U %s / D %s; %s transactions; %s MiB WAL)\n' changes \
        "$(commas $CHANGES)" $NTABLES "$(commas $INS)" "$(commas $UPD)" "$(commas $DEL)" \
        "$(commas $TXNS)" "$(calc '%.1f' "$WAL_BYTES / 1048576")"
    printf '%-18s %7.2f s  %9s changes/s\n' pg_recvlogical "$REF_S" "$(commas "$REF_RATE")"
    printf '%-18s %7.2f s  %9s changes/s  (%sx)  until the daemon had received the target LSN (first message after %.2f s)\n' \
        "cdc-egress recv" "$RECV_S" "$(commas "$RECV_RATE")" "$(ratio "$RECV_S")" "$FIRST_S"
    printf '%-18s %7.2f s  %9s changes/s  (%sx)  until the slot confirmed it; %.2f s of it waiting for the %ss seal deadline\n' \
        "cdc-egress acked" "$ACK_S" "$(commas "$ACK_RATE")" "$(ratio "$ACK_S")" "$SEAL_WAIT_S" "$INTERVAL_S"
    printf '%-18s %7.2f s  (%sx)  acked minus that wait\n' "cdc-egress acked*" "$ACK_NOWAIT_S" "$(ratio "$ACK_NOWAIT_S")"
    printf '%-18s %s MiB (VmHWM of cdc-egress); largest in the samples: %s MiB file-backed (code), %s MiB the rest\n' \
        "peak RSS" "$PEAK_RSS_MIB" "$(calc '%.1f' "$PEAK_FILE_KB / 1024")" "$(calc '%.1f' "$PEAK_ANON_KB / 1024")"
    printf '%-18s walsender %s s + pg_recvlogical %s s | walsender %s s + cdc-egress %s s (%s s at recv)\n' \
        "cpu" "$REF_WS_CPU" "$REF_CPU" "$EG_WS_CPU" "$EG_CPU" "$EG_CPU_AT_RECV"
    [[ $NATS_CPU == null ]] ||
        printf '%-18s %s s while cdc-egress ran (%s us per change)\n' "cpu nats-server" "$NATS_CPU" \
            "$(calc '%.2f' "$NATS_CPU * 1e6 / $CHANGES")"
    printf '%-18s walsender %s + pg_recvlogical %s | walsender %s + cdc-egress %s\n' "ctx switches" \
        "$(commas "${SLICES[ref_ws]:-0}")" "$(commas "${SLICES[ref]:-0}")" "$(commas "${SLICES[eg_ws]:-0}")" "$(commas "${SLICES[eg]:-0}")"
    printf '%-18s %s; pg_recvlogical %s, cdc-egress %s\n' "transport (TLS)" \
        "$TRANSPORT" "$REF_SSL" "$EG_SSL"
    printf '%-18s %s (%s files, %s rows registered, %s notices, %s change events, %s MiB gz / %s MiB csv; %s warnings in log)\n' \
        "check" "$CHECK" "$FILES" "$(commas "$REG_ROWS")" "$NOTICES" "$(commas "$EVENTS")" "$(calc '%.1f' "$REG_GZ / 1048576")" \
        "$(calc '%.1f' "$REG_CSV / 1048576")" "$WARNINGS"
    printf '%-18s %s cores, load %s -> %s, PostgreSQL %s, cdc-egress %s\n' machine "$(nproc)" \
        "$LOAD_START" "$LOAD_END" "$PG_VERSION" "$GIT_REV"
} | tee "$WORK/table.txt"

mkdir -p "$ROOT/benches/results"
{
    echo "# cdc-egress resident set size while draining: ms since start, RSS KiB, of it not file-backed KiB, pgoutput messages received"
    printf '%s' "$RSS_SERIES"
} >"$ROOT/benches/results/last-rss.txt"
cat >"$ROOT/benches/results/last.json" <<JSON
{
  "finished_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "git_rev": "$GIT_REV",
  "transport": "$TRANSPORT",
  "machine": { "cores": $(nproc), "load_before": "$LOAD_START", "load_after": "$LOAD_END", "postgres": "$PG_VERSION" },
  "workload": {
    "tables": $NTABLES, "rows_per_table_bulk": $ROWS, "pgbench_transactions": $PGB_DONE,
    "changes": $CHANGES, "inserts": $INS, "updates": $UPD, "deletes": $DEL,
    "transactions": $TXNS, "wal_bytes": $WAL_BYTES, "start_lsn": "$START_LSN", "target_lsn": "$TARGET",
    "generation_s": $GEN_S
  },
  "pg_recvlogical": { "seconds": $REF_S, "changes_per_s": $REF_RATE, "cpu_s": $REF_CPU, "walsender_cpu_s": $REF_WS_CPU,
                      "context_switches": ${SLICES[ref]:-0}, "walsender_context_switches": ${SLICES[ref_ws]:-0}, "ssl": "$REF_SSL" },
  "cdc_egress": {
    "batch_interval_s": $INTERVAL_S, "change_events": $([[ $CHANGE_EVENTS == grouped ]] && echo '"grouped"' || echo "$CHANGE_EVENTS"),
    "first_message_s": $FIRST_S,
    "received": { "seconds": $RECV_S, "changes_per_s": $RECV_RATE, "ratio": $(ratio "$RECV_S") },
    "acked": { "seconds": $ACK_S, "changes_per_s": $ACK_RATE, "ratio": $(ratio "$ACK_S"),
               "seal_wait_s": $SEAL_WAIT_S, "seconds_without_seal_wait": $ACK_NOWAIT_S },
    "peak_rss_kib": $PEAK_RSS_KB, "peak_rss_anon_kib": $PEAK_ANON_KB, "peak_rss_file_kib": $PEAK_FILE_KB, "cpu_s": $EG_CPU, "cpu_s_at_received": $EG_CPU_AT_RECV,
    "messages_received_at_target": $RECV_MESSAGES, "poller_cpu_s": $POLL_CPU,
    "walsender_cpu_s": $EG_WS_CPU, "nats_server_cpu_s": $NATS_CPU, "context_switches": ${SLICES[eg]:-0},
    "walsender_context_switches": ${SLICES[eg_ws]:-0}, "ssl": "$EG_SSL", "log_warnings": $WARNINGS
  },
  "check": {
    "result": "$CHECK", "files": $FILES, "registered_rows": $REG_ROWS, "registered_inserts": $REG_I,
    "registered_updates": $REG_U, "registered_deletes": $REG_D, "notices": $NOTICES, "change_events": $EVENTS,
    "gz_bytes": $REG_GZ, "csv_bytes": $REG_CSV
  }
}
JSON
log "wrote benches/results/last.json"
[[ $CHECK == ok ]] || die "correctness check: $CHECK"
