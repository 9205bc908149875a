#!/usr/bin/env bash
# Scale-out benchmark: two daemons on two slots (the tables split in halves) against one daemon on one
# slot, on the same logical-decoding workload, in one run.
#
#   BENCH_PG_PORT=54329 bash benches/scale_out.sh      (from the repository root)
#
# What it does, in order (details and the meaning of each figure: benches/README.md):
#   1. cargo build --release (skip with BENCH_SKIP_BUILD=1)
#   2. a fresh database cdc_scale_<pid>: NTABLES tables split in halves a and b; publications pub_all
#      (every table), pub_a (half a), pub_b (half b); pgoutput slots `one` (pub_all), `a`, `b` (and
#      `solo`, see 7.) created *before* any row is written, so every consumer decodes the same WAL
#   3. the workload of throughput.sh (benches/lib.sh), spread evenly over both halves; its per-half
#      change counts come from pg_stat_user_tables, its total also from the command tags
#   4. target = pg_current_wal_lsn() after the workload
#   5. ONE daemon on slot `one` (pub_all; registry schema, output directory and stream of its own):
#      T1 = from its start until its slot's confirmed_flush_lsn >= target
#   6. TWO daemons at once on slots `a` and `b` (pub_a, pub_b), sharing ONE registry schema, ONE output
#      URL and ONE stream and subject prefix, each under its own source name (= its slot name):
#      T2 = from the start of both until the later of the two slots' confirmed_flush_lsn >= target
#   7. (unless BENCH_SOLO=0) daemon `a`'s work alone: a fourth slot on pub_a, drained by one daemon
#      with nothing else running: Ta, what each of the two would take without CPU contention
#      (BENCH_ORDER sets the order of the phases; by default one, solo, pair)
#   8. correctness: rows registered per source = the workload's changes on its half (per operation,
#      and only its own tables), notices on <prefix>.<source>.batch.> = its registered files, and the
#      one-slot run registered every change; a mismatch fails the run
#   9. a table on stdout, the same as JSON in benches/results/scale_out.json
# Everything created is removed on exit, also on failure or Ctrl-C (BENCH_KEEP=1 keeps the database,
# slots, streams and work directory). Never touches the server's configuration.
#
# Knobs (environment): BENCH_ROWS_PER_TABLE (60000), BENCH_PGBENCH_TXNS (4000), BENCH_TABLES (10, even),
# BENCH_INTERVAL_S (2), BENCH_TIMEOUT_S per phase (600), BENCH_SOLO (1), BENCH_ORDER (one,solo,pair),
# BENCH_PG_HOST/PORT/USER (127.0.0.1/5432/postgres), BENCH_NATS_URL (nats://127.0.0.1:4222),
# BENCH_PGBIN (newest /usr/lib/postgresql/*/bin), BENCH_SKIP_BUILD, BENCH_KEEP. Loopback addresses only.

set -Eeuo pipefail
shopt -s inherit_errexit

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

ROWS=${BENCH_ROWS_PER_TABLE:-60000}
PGBENCH_TXNS=${BENCH_PGBENCH_TXNS:-4000}
NTABLES=${BENCH_TABLES:-10}
INTERVAL_S=${BENCH_INTERVAL_S:-2}
TIMEOUT_S=${BENCH_TIMEOUT_S:-600}
if [[ ${BENCH_SOLO:-1} == 0 ]]; then ORDER=${BENCH_ORDER:-one,pair}; else ORDER=${BENCH_ORDER:-one,solo,pair}; fi
server_knobs

ID=$$
DB=cdc_scale_$ID
# Slot names are cluster-wide: they carry our pid. The source names are the slot names (the default).
declare -A D_SLOT=([one]=cdc_scale_${ID}_one [a]=cdc_scale_${ID}_a [b]=cdc_scale_${ID}_b [solo]=cdc_scale_${ID}_solo)
declare -A D_PUB=([one]=pub_all [a]=pub_a [b]=pub_b [solo]=pub_a)
# One daemon: a registry schema, output directory, stream and subject prefix of its own. Two daemons:
# one of each, shared. The solo daemon (pub_a alone): its own again.
declare -A D_SCHEMA=([one]=cdc_egress_one [a]=cdc_egress [b]=cdc_egress [solo]=cdc_egress_solo)
declare -A D_STREAM=([one]=CDC_SCALE_${ID}_ONE [a]=CDC_SCALE_$ID [b]=CDC_SCALE_$ID [solo]=CDC_SCALE_${ID}_SOLO)
declare -A D_PREFIX=([one]=cdc_scale_${ID}_one [a]=cdc_scale_$ID [b]=cdc_scale_$ID [solo]=cdc_scale_${ID}_solo)
declare -A D_OUT=([one]=out-one [a]=out-pair [b]=out-pair [solo]=out-solo)
declare -A D_PORT=() D_PID=() WS_PID=() RECV_US=() ACK_US=() PEAK_RSS_KB=() CPU_AT_RECV_NS=() WARN=()
WORK=
PQ_PID=
OWNED=0 # set once we know that no database, slot or stream of our names existed before

trap 'log "error in line $LINENO: $BASH_COMMAND"' ERR
is_loopback "$PG_HOST" || die "BENCH_PG_HOST=$PG_HOST is not a loopback address"
is_loopback "$NATS_URL" || die "BENCH_NATS_URL=$NATS_URL is not a loopback address"
[[ -x $PGBIN/psql && -x $PGBIN/pgbench ]] || die "psql/pgbench not found in '$PGBIN' (set BENCH_PGBIN)"
if ! [[ $NTABLES =~ ^[1-9][0-9]?$ ]] || ((NTABLES % 2)); then
    die "BENCH_TABLES=$NTABLES: an even number from 2 to 98"
fi
IFS=, read -r -a PHASES <<<"$ORDER"
case " $(printf '%s\n' "${PHASES[@]}" | sort | tr '\n' ' ')" in
    " one pair " | " one pair solo ") ;;
    *) die "BENCH_ORDER=$ORDER: one and pair, and optionally solo, each once, separated by commas" ;;
esac
KEYS=(one a b)                  # the daemons of this run
OWNERS=(one a)                  # ... those with a registry schema, stream and output directory of their own
if [[ ,$ORDER, == *,solo,* ]]; then KEYS+=(solo); OWNERS+=(solo); fi
[[ $INTERVAL_S =~ ^[1-9][0-9]*$ ]] || die "BENCH_INTERVAL_S=$INTERVAL_S: whole seconds"

PSQL=("$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")

# ------------------------------------------------------------------------------------------------
# Clean-up: runs on every exit. Only touches what this run created (names carry our pid).

cleanup() {
    local rc=$? pid k
    set +e
    trap - EXIT INT TERM
    for k in "${!D_PID[@]}"; do
        pid=${D_PID[$k]}
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        fi
    done
    stop_scrapers
    stop_poller
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "BENCH_KEEP=1: leaving database $DB, slots ${D_SLOT[*]}, streams of ${D_PREFIX[*]}, $WORK"
        exit "$rc"
    fi
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    ((OWNED)) || exit "$rc"
    drop_slots "'${D_SLOT[one]}','${D_SLOT[a]}','${D_SLOT[b]}','${D_SLOT[solo]}'"
    admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 ||
        log "WARNING: could not drop database $DB"
    for k in "${OWNERS[@]}"; do
        python3 "$ROOT/benches/jetstream.py" "$NATS_URL" delete "${D_STREAM[$k]}" >/dev/null 2>&1 ||
            log "WARNING: could not delete JetStream stream ${D_STREAM[$k]}"
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# ------------------------------------------------------------------------------------------------
# 1. Build.

build_release

# ------------------------------------------------------------------------------------------------
# 2. Database, tables, publications, slots.

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cdc-scale.XXXXXX")
mkfifo "$WORK/nap"
exec {NAP_FD}<>"$WORK/nap"
# Names carry our pid; anything of those names is a leftover (BENCH_KEEP=1) of an earlier run that
# had the same pid: refuse, and leave it alone.
for k in "${OWNERS[@]}"; do
    state=$(python3 "$ROOT/benches/jetstream.py" "$NATS_URL" info "${D_STREAM[$k]}") ||
        die "NATS at $NATS_URL does not answer JetStream requests"
    [[ $state == absent ]] || die "JetStream stream ${D_STREAM[$k]} exists already (an earlier run's?)"
done
[[ $(admin "SELECT count(*) FROM pg_database WHERE datname = '$DB'") == 0 ]] ||
    die "database $DB exists already (an earlier run's?)"
[[ $(admin "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '${DB}\_%'") == 0 ]] ||
    die "replication slots ${DB}_* exist already (an earlier run's?)"
OWNED=1

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "database $DB, work dir $WORK (load average $LOAD_START)"
admin "CREATE DATABASE $DB"
make_table_names
HALF_A=("${TABLES[@]:0:NTABLES/2}")
HALF_B=("${TABLES[@]:NTABLES/2}")
list() { local IFS=,; printf '%s' "$*"; }
{
    tables_ddl
    # Explicit table lists, not FOR ALL TABLES: the registries live in this database too.
    echo "CREATE PUBLICATION pub_all FOR TABLE $(list "${TABLES[@]}");"
    echo "CREATE PUBLICATION pub_a FOR TABLE $(list "${HALF_A[@]}");"
    echo "CREATE PUBLICATION pub_b FOR TABLE $(list "${HALF_B[@]}");"
} | "${PSQL[@]}" -d "$DB" -q

# A checkpoint first, so that the share of full-page images in the workload's WAL does not depend on
# where the server's checkpoint cycle happens to be.
admin "CHECKPOINT"
# Every slot exists before the first row is written: they decode exactly the same WAL.
START_LSN=$(sql "SELECT lsn FROM pg_create_logical_replication_slot('${D_SLOT[one]}', 'pgoutput')")
for k in "${KEYS[@]:1}"; do
    sql "SELECT pg_create_logical_replication_slot('${D_SLOT[$k]}', 'pgoutput')" >/dev/null
done

# ------------------------------------------------------------------------------------------------
# 3. Workload (the generators of throughput.sh: every transaction of the bulk phase spans all tables
#    or is repeated for each table, pgbench picks a table at random).

GEN_START=$(now)
log "workload: $NTABLES tables x $ROWS rows bulk, updates, deletes, $PGBENCH_TXNS pgbench transactions"
run_workload

# 4. The target: WAL end after the workload.
TARGET=$(sql "SELECT pg_current_wal_lsn()")
TARGET_NUM=$(lsn_num "$TARGET")
WAL_BYTES=$((TARGET_NUM - $(lsn_num "$START_LSN")))
GEN_S=$(elapsed "$GEN_START" "$(now)")
check_workload
# The changes of each half, from the server's statistics (their sum was just checked against the
# command tags).
half_changes() { # tables... -> "inserts updates deletes"
    sql "SELECT coalesce(sum(n_tup_ins), 0), coalesce(sum(n_tup_upd), 0), coalesce(sum(n_tup_del), 0)
         FROM pg_stat_user_tables WHERE schemaname = 'public'
         AND relname IN ($(printf "'%s'," "$@" | sed 's/,$//'))" | tr '|' ' '
}
declare -A W_INS=() W_UPD=() W_DEL=() W_CHANGES=()
read -r "W_INS[a]" "W_UPD[a]" "W_DEL[a]" < <(half_changes "${HALF_A[@]}")
read -r "W_INS[b]" "W_UPD[b]" "W_DEL[b]" < <(half_changes "${HALF_B[@]}")
W_INS[one]=$INS W_UPD[one]=$UPD W_DEL[one]=$DEL
W_INS[solo]=${W_INS[a]} W_UPD[solo]=${W_UPD[a]} W_DEL[solo]=${W_DEL[a]}
for k in one a b solo; do W_CHANGES[$k]=$((W_INS[$k] + W_UPD[$k] + W_DEL[$k])); done
((W_CHANGES[a] + W_CHANGES[b] == CHANGES)) ||
    die "the halves' changes ${W_CHANGES[a]} + ${W_CHANGES[b]} != $CHANGES"
log "workload done in ${GEN_S}s: $(commas $CHANGES) changes (a $(commas "${W_CHANGES[a]}"), b $(commas "${W_CHANGES[b]}"))" \
    "in $(commas $TXNS) transactions, $(calc '%.1f' "$WAL_BYTES / 1048576") MiB of WAL, target $TARGET"
# Dirty buffers of the workload are written now, not by the checkpointer during the first phase.
admin "CHECKPOINT"

# ------------------------------------------------------------------------------------------------
# The daemons. Configuration through the environment; a registry schema is installed with
# `cdc-egress migrate` before its first daemon runs (a one-time step, not timed; its WAL lies after
# the target). The slots exist, so no initial export would run anyway; reload.initial=false says so.

egress_unset
daemon_env() { # key -> EGRESS_ENV
    EGRESS_ENV=(
        CDC_EGRESS_SOURCE_URL="postgres://$PG_USER@$PG_HOST:$PG_PORT/$DB"
        CDC_EGRESS_SOURCE_SLOT="${D_SLOT[$1]}"
        CDC_EGRESS_SOURCE_PUBLICATION="${D_PUB[$1]}"
        CDC_EGRESS_REGISTRY_SCHEMA="${D_SCHEMA[$1]}"
        CDC_EGRESS_BATCH_INTERVAL="${INTERVAL_S}s"
        CDC_EGRESS_OUTPUT_URL="file://$WORK/${D_OUT[$1]}"
        CDC_EGRESS_OUTPUT_SPOOL_DIR="$WORK/spool"
        CDC_EGRESS_NATS_URL="$NATS_URL"
        CDC_EGRESS_NATS_STREAM="${D_STREAM[$1]}"
        CDC_EGRESS_NATS_SUBJECT_PREFIX="${D_PREFIX[$1]}"
        CDC_EGRESS_HTTP_LISTEN="127.0.0.1:${D_PORT[$1]}"
        CDC_EGRESS_RELOAD_INITIAL=false
        CDC_EGRESS_LOG_LEVEL=info
    )
}
for k in "${KEYS[@]}"; do D_PORT[$k]=$(free_port); done
for k in "${OWNERS[@]}"; do
    mkdir -p "$WORK/${D_OUT[$k]}"
    daemon_env "$k"
    env -C "$WORK" "${UNSET[@]}" "${EGRESS_ENV[@]}" "$BIN" migrate >"$WORK/migrate-$k.log" 2>&1 ||
        { cat "$WORK/migrate-$k.log" >&2; die "cdc-egress migrate (${D_SCHEMA[$k]})"; }
done

start_poller

# drain KEY...: starts one daemon per key at the same time and polls every 50 ms until each has
# received the target (its cdc_egress_received_lsn metric) and its slot has confirmed it; then stops
# them. Sets PHASE_S (start of the first to the later confirmation), RECV_US/ACK_US per key (since the
# start), PEAK_RSS_KB, CPU samples d_<key> (daemon) and ws_<key> (its walsender), and adds the CPU
# time of the polling (this shell and the scrapers) to POLL_NS.
POLL_NS=0
drain() {
    local k t0 all pid reply
    for k; do start_scraper "$k" "${D_PORT[$k]}"; done
    sample poll0 "$$"
    POLL_NS=$((POLL_NS - ${CPU_NS[poll0]:-0}))
    for k; do sample "scraper0_$k" "${SCRAPER_PID[$k]}"; POLL_NS=$((POLL_NS - ${CPU_NS[scraper0_$k]:-0})); done
    tick; t0=$NOW_US
    for k; do
        daemon_env "$k"
        env -C "$WORK" "${UNSET[@]}" "${EGRESS_ENV[@]}" "$BIN" run >"$WORK/$k.log" 2>&1 &
        D_PID[$k]=$!
    done
    while :; do
        tick
        all=1
        for k; do
            pid=${D_PID[$k]}
            sample "d_$k" "$pid"
            [[ -z ${WS_PID[$k]:-} ]] || sample "ws_$k" "${WS_PID[$k]}"
            if [[ -z ${RECV_US[$k]:-} ]] && scrape "$k" && ((RECEIVED_LSN >= TARGET_NUM)); then
                RECV_US[$k]=$((NOW_US - t0))
                CPU_AT_RECV_NS[$k]=${CPU_NS[d_$k]:-0}
            fi
            if [[ -z ${ACK_US[$k]:-} ]]; then
                q "SELECT coalesce(confirmed_flush_lsn >= '$TARGET', false)::text || ' ' || coalesce(active_pid, 0)
                   FROM pg_replication_slots WHERE slot_name = '${D_SLOT[$k]}';"
                reply=$REPLY
                [[ $reply =~ ^(true|false)\ ([0-9]+)$ ]] || die "unexpected poll reply: $reply"
                [[ ${BASH_REMATCH[2]} == 0 || -n ${WS_PID[$k]:-} ]] || WS_PID[$k]=${BASH_REMATCH[2]}
                [[ ${BASH_REMATCH[1]} == false ]] || ACK_US[$k]=$((NOW_US - t0))
            fi
            [[ -n ${RECV_US[$k]:-} && -n ${ACK_US[$k]:-} ]] || all=0
            kill -0 "$pid" 2>/dev/null || { tail -n 30 "$WORK/$k.log" >&2; die "cdc-egress ($k) exited"; }
        done
        ((all)) && break
        ((NOW_US - t0 < TIMEOUT_S * 1000000)) || {
            for k; do tail -n 10 "$WORK/$k.log" >&2; done
            die "timeout after ${TIMEOUT_S}s"
        }
        nap
    done
    PHASE_S=0
    for k; do
        PEAK_RSS_KB[$k]=$(awk '/^VmHWM:/ { print $2 }' "/proc/${D_PID[$k]}/status")
        sample "d_$k" "${D_PID[$k]}"
        [[ -z ${WS_PID[$k]:-} ]] || sample "ws_$k" "${WS_PID[$k]}"
        PHASE_S=$(calc '%.3f' "(${ACK_US[$k]} > $PHASE_S * 1e6 ? ${ACK_US[$k]} / 1e6 : $PHASE_S)")
    done
    sample poll1 "$$"
    POLL_NS=$((POLL_NS + ${CPU_NS[poll1]:-0}))
    for k; do sample "scraper1_$k" "${SCRAPER_PID[$k]}"; POLL_NS=$((POLL_NS + ${CPU_NS[scraper1_$k]:-0})); done
    stop_scrapers
    for k; do kill -TERM "${D_PID[$k]}"; done
    for k; do
        wait "${D_PID[$k]}" || die "cdc-egress ($k) exited with status $? after SIGTERM"
        D_PID[$k]=
        WARN[$k]=$(grep -cE ' (WARN|ERROR) ' "$WORK/$k.log" || true)
    done
}

# ------------------------------------------------------------------------------------------------
# 5., 6. and 7. The phases.

T1_S='' T2_S='' TA_S=''
for phase in "${PHASES[@]}"; do
    if [[ $phase == solo ]]; then
        log "half a alone: draining ${D_SLOT[solo]} (pub_a)"
        drain solo
        TA_S=$PHASE_S
        log "half a alone: ${TA_S}s"
    elif [[ $phase == one ]]; then
        log "one daemon: draining ${D_SLOT[one]} (pub_all, batch.interval ${INTERVAL_S}s)"
        drain one
        T1_S=$PHASE_S
        log "one daemon: ${T1_S}s"
    else
        log "two daemons: draining ${D_SLOT[a]} (pub_a) and ${D_SLOT[b]} (pub_b) at once"
        drain a b
        T2_S=$PHASE_S
        log "two daemons: ${T2_S}s"
    fi
done

# ------------------------------------------------------------------------------------------------
# 8. Correctness: what each source registered and notified must equal the workload of its tables.

declare -A R_FILES=() R_ROWS=() R_INS=() R_UPD=() R_DEL=() R_FOREIGN=() R_OTHER=() R_GZ=() NOTICES=()
PROBLEMS=()
for k in "${KEYS[@]}"; do
    case $k in
        one) own=("${TABLES[@]}") ;;
        a | solo) own=("${HALF_A[@]}") ;;
        b) own=("${HALF_B[@]}") ;;
    esac
    read -r "R_FILES[$k]" "R_ROWS[$k]" "R_INS[$k]" "R_UPD[$k]" "R_DEL[$k]" "R_FOREIGN[$k]" "R_OTHER[$k]" \
        "R_GZ[$k]" < <(sql "
        SELECT count(*) FILTER (WHERE kind = 'streaming'),
               coalesce(sum(row_count) FILTER (WHERE kind = 'streaming'), 0),
               coalesce(sum((ops->>'insert')::bigint) FILTER (WHERE kind = 'streaming'), 0),
               coalesce(sum((ops->>'update')::bigint) FILTER (WHERE kind = 'streaming'), 0),
               coalesce(sum((ops->>'delete')::bigint) FILTER (WHERE kind = 'streaming'), 0),
               count(*) FILTER (WHERE NOT (table_schema = 'public' AND table_name = ANY ('{$(list "${own[@]}")}'))),
               count(*) FILTER (WHERE kind <> 'streaming'),
               coalesce(sum(byte_size), 0)
        FROM ${D_SCHEMA[$k]}.files WHERE source = '${D_SLOT[$k]}'" | tr '|' ' ')
    NOTICES[$k]=$(python3 "$ROOT/benches/jetstream.py" "$NATS_URL" count "${D_STREAM[$k]}" \
        "${D_PREFIX[$k]}.${D_SLOT[$k]}.batch.>")
    [[ ${NOTICES[$k]} =~ ^[0-9]+$ ]] || { PROBLEMS+=("$k: notices: ${NOTICES[$k]}"); NOTICES[$k]=-1; }
    [[ ${R_ROWS[$k]} == "${W_CHANGES[$k]}" ]] ||
        PROBLEMS+=("$k: registered rows ${R_ROWS[$k]} != workload changes ${W_CHANGES[$k]}")
    [[ "${R_INS[$k]} ${R_UPD[$k]} ${R_DEL[$k]}" == "${W_INS[$k]} ${W_UPD[$k]} ${W_DEL[$k]}" ]] ||
        PROBLEMS+=("$k: registered I/U/D ${R_INS[$k]}/${R_UPD[$k]}/${R_DEL[$k]} != workload ${W_INS[$k]}/${W_UPD[$k]}/${W_DEL[$k]}")
    [[ ${R_FOREIGN[$k]} == 0 ]] || PROBLEMS+=("$k: ${R_FOREIGN[$k]} files of tables outside its publication")
    [[ ${R_OTHER[$k]} == 0 ]] || PROBLEMS+=("$k: ${R_OTHER[$k]} files that are not streaming batches")
    [[ ${NOTICES[$k]} == "${R_FILES[$k]}" ]] ||
        PROBLEMS+=("$k: notices ${NOTICES[$k]} != registered files ${R_FILES[$k]}")
done
CHECK=ok
((${#PROBLEMS[@]} == 0)) || CHECK=$(IFS=';'; printf '%s' "${PROBLEMS[*]}")

# ------------------------------------------------------------------------------------------------
# 9. Report.

ms() { calc '%.2f' "${1:-0} / 1e6"; }
rate() { calc '%.0f' "$1 / $2"; }
mib() { calc '%.1f' "${1:-0} / 1024"; }
sum_s() { # CPU labels... -> their sum in seconds
    local l ns=0
    for l; do ns=$((ns + ${CPU_NS[$l]:-0})); done
    calc '%.2f' "$ns / 1e9"
}
RECV1_S=$(ms "${RECV_US[one]}")
RECV2_S=$(ms "$((RECV_US[a] > RECV_US[b] ? RECV_US[a] : RECV_US[b]))")
T1_RATE=$(rate "$CHANGES" "$T1_S")
T2_RATE=$(rate "$CHANGES" "$T2_S")
SCALE=$(calc '%.2f' "$T1_S / $T2_S")
SCALE_RECV=$(calc '%.2f' "$RECV1_S / $RECV2_S")
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
PG_VERSION=$(admin "SHOW server_version")
GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
CPU_ONE=$(sum_s ws_one d_one)
CPU_PAIR=$(sum_s ws_a d_a ws_b d_b)
WS_PAIR=$(sum_s ws_a ws_b)
D_PAIR=$(sum_s d_a d_b)
if [[ -n $TA_S ]]; then
    RECVA_S=$(ms "${RECV_US[solo]}")
    TA_RATE=$(rate "${W_CHANGES[solo]}" "$TA_S")
    SCALE_IDEAL=$(calc '%.2f' "$T1_S / $TA_S")
    CPU_SOLO=$(sum_s ws_solo d_solo)
fi
kc() { commas "$((${SLICES[$1]:-0} / 1000))"; } # thousands of context switches

{
    printf '%-15s %s (%d tables; I %s / U %s / D %s; %s transactions; %s MiB WAL)\n' changes \
        "$(commas $CHANGES)" "$NTABLES" "$(commas $INS)" "$(commas $UPD)" "$(commas $DEL)" \
        "$(commas $TXNS)" "$(calc '%.1f' "$WAL_BYTES / 1048576")"
    printf '%-15s a %s (%s..%s), b %s (%s..%s)\n' halves "$(commas "${W_CHANGES[a]}")" "${HALF_A[0]}" \
        "${HALF_A[-1]}" "$(commas "${W_CHANGES[b]}")" "${HALF_B[0]}" "${HALF_B[-1]}"
    printf '%-15s T1 %6.2f s  %9s changes/s           received %.2f s\n' "one slot" "$T1_S" \
        "$(commas "$T1_RATE")" "$RECV1_S"
    printf '%-15s T2 %6.2f s  %9s changes/s combined  received %.2f s (a %.2f s, acked %.2f s; b %.2f s, acked %.2f s)\n' \
        "two slots" "$T2_S" "$(commas "$T2_RATE")" "$RECV2_S" "$(ms "${RECV_US[a]}")" "$(ms "${ACK_US[a]}")" \
        "$(ms "${RECV_US[b]}")" "$(ms "${ACK_US[b]}")"
    printf '%-15s %sx  T1/T2 (until received: %sx)\n' scale-out "$SCALE" "$SCALE_RECV"
    if [[ -n $TA_S ]]; then
        printf '%-15s Ta %6.2f s  %9s changes/s           received %.2f s; T1/Ta %sx: two slots with no CPU contention\n' \
            "half a alone" "$TA_S" "$(commas "$TA_RATE")" "$RECVA_S" "$SCALE_IDEAL"
    fi
    printf '%-15s one %s MiB | two: a %s, b %s MiB%s (VmHWM)\n' "peak RSS" "$(mib "${PEAK_RSS_KB[one]}")" \
        "$(mib "${PEAK_RSS_KB[a]}")" "$(mib "${PEAK_RSS_KB[b]}")" \
        "${TA_S:+ | a alone $(mib "${PEAK_RSS_KB[solo]:-0}") MiB}"
    printf '%-15s one: walsender %s + daemon %s = %s s | two: walsenders %s + %s, daemons %s + %s = %s s%s\n' \
        "cpu" "$(cpu_s ws_one)" "$(cpu_s d_one)" "$CPU_ONE" "$(cpu_s ws_a)" "$(cpu_s ws_b)" "$(cpu_s d_a)" \
        "$(cpu_s d_b)" "$CPU_PAIR" "${TA_S:+ | a alone: $(cpu_s ws_solo) + $(cpu_s d_solo) = ${CPU_SOLO:-} s}"
    printf '%-15s one: walsender %sk, daemon %sk | two: walsenders %sk + %sk, daemons %sk + %sk%s\n' \
        "ctx switches" "$(kc ws_one)" "$(kc d_one)" "$(kc ws_a)" "$(kc ws_b)" "$(kc d_a)" "$(kc d_b)" \
        "${TA_S:+ | a alone: $(kc ws_solo)k + $(kc d_solo)k}"
    printf '%-15s %s (files / rows / notices: one %s / %s / %s; a %s / %s / %s; b %s / %s / %s%s; log warnings %s)\n' \
        check "$CHECK" "${R_FILES[one]}" "$(commas "${R_ROWS[one]}")" "${NOTICES[one]}" "${R_FILES[a]}" \
        "$(commas "${R_ROWS[a]}")" "${NOTICES[a]}" "${R_FILES[b]}" "$(commas "${R_ROWS[b]}")" "${NOTICES[b]}" \
        "${TA_S:+; a alone ${R_FILES[solo]:-} / $(commas "${R_ROWS[solo]:-0}") / ${NOTICES[solo]:-}}" \
        "$((WARN[one] + WARN[a] + WARN[b] + ${WARN[solo]:-0}))"
    printf '%-15s %s cores, load %s -> %s, PostgreSQL %s, cdc-egress %s, phases %s, batch.interval %ss\n' \
        machine "$(nproc)" "$LOAD_START" "$LOAD_END" "$PG_VERSION" "$GIT_REV" "$ORDER" "$INTERVAL_S"
} | tee "$WORK/table.txt"

src_json() { # key
    local k=$1
    printf '{ "slot": "%s", "publication": "%s", "registry_schema": "%s", "subject_prefix": "%s", ' \
        "${D_SLOT[$k]}" "${D_PUB[$k]}" "${D_SCHEMA[$k]}" "${D_PREFIX[$k]}"
    printf '"received_s": %s, "acked_s": %s, "peak_rss_kib": %s, "cpu_s": %s, "cpu_s_at_received": %s, ' \
        "$(ms "${RECV_US[$k]}")" "$(ms "${ACK_US[$k]}")" "${PEAK_RSS_KB[$k]:-0}" "$(cpu_s "d_$k")" \
        "$(calc '%.2f' "${CPU_AT_RECV_NS[$k]:-0} / 1e9")"
    printf '"walsender_cpu_s": %s, "context_switches": %s, "walsender_context_switches": %s, ' \
        "$(cpu_s "ws_$k")" "${SLICES[d_$k]:-0}" "${SLICES[ws_$k]:-0}"
    printf '"changes": %s, "registered_files": %s, "registered_rows": %s, "registered_inserts": %s, ' \
        "${W_CHANGES[$k]}" "${R_FILES[$k]}" "${R_ROWS[$k]}" "${R_INS[$k]}"
    printf '"registered_updates": %s, "registered_deletes": %s, "gz_bytes": %s, "notices": %s, "log_warnings": %s }' \
        "${R_UPD[$k]}" "${R_DEL[$k]}" "${R_GZ[$k]}" "${NOTICES[$k]}" "${WARN[$k]:-0}"
}
SOLO_JSON=
[[ -z $TA_S ]] || SOLO_JSON=$',\n    "solo": '"$(src_json solo)"
mkdir -p "$ROOT/benches/results"
cat >"$ROOT/benches/results/scale_out.json" <<JSON
{
  "finished_at": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "git_rev": "$GIT_REV",
  "machine": { "cores": $(nproc), "load_before": "$LOAD_START", "load_after": "$LOAD_END", "postgres": "$PG_VERSION" },
  "workload": {
    "tables": $NTABLES, "rows_per_table_bulk": $ROWS, "pgbench_transactions": $PGB_DONE,
    "changes": $CHANGES, "inserts": $INS, "updates": $UPD, "deletes": $DEL,
    "changes_a": ${W_CHANGES[a]}, "changes_b": ${W_CHANGES[b]},
    "transactions": $TXNS, "wal_bytes": $WAL_BYTES, "start_lsn": "$START_LSN", "target_lsn": "$TARGET",
    "generation_s": $GEN_S
  },
  "batch_interval_s": $INTERVAL_S,
  "order": "$ORDER",
  "one_slot": { "seconds": $T1_S, "changes_per_s": $T1_RATE, "received_s": $RECV1_S, "cpu_s": $CPU_ONE },
  "two_slots": { "seconds": $T2_S, "changes_per_s": $T2_RATE, "received_s": $RECV2_S, "cpu_s": $CPU_PAIR,
                 "walsenders_cpu_s": $WS_PAIR, "daemons_cpu_s": $D_PAIR },
  "scale_out": $SCALE,
  "scale_out_received": $SCALE_RECV,
  "half_a_alone": $(if [[ -n $TA_S ]]; then
      printf '{ "seconds": %s, "changes_per_s": %s, "received_s": %s, "cpu_s": %s, "scale_out_without_contention": %s }' \
          "$TA_S" "$TA_RATE" "$RECVA_S" "$CPU_SOLO" "$SCALE_IDEAL"
  else printf null; fi),
  "poller_cpu_s": $(calc '%.2f' "$POLL_NS / 1e9"),
  "sources": {
    "one": $(src_json one),
    "a": $(src_json a),
    "b": $(src_json b)$SOLO_JSON
  },
  "check": "$CHECK"
}
JSON
log "wrote benches/results/scale_out.json"
[[ $CHECK == ok ]] || die "correctness check: $CHECK"
