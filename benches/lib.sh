# shellcheck shell=bash disable=SC2034,SC2153,SC2154
# Shell functions shared by benches/throughput.sh and benches/scale_out.sh. Sourced, not run.
#
# The functions read the caller's globals when they are called, and set globals for the caller
# (SC2034/SC2153/SC2154 are off for that reason):
# ROOT, WORK, DB, PSQL (psql command as an array), PGBIN, PG_HOST/PG_PORT/PG_USER, NAP_FD, and for the
# workload ROWS, PGBENCH_TXNS, TABLES, NTABLES. What they set is said at each one.

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

is_loopback() {
    local h=$1
    h=${h#*://}; h=${h##*@}; h=${h%%/*}
    if [[ $h == \[* ]]; then h=${h#[}; h=${h%%]*}; else h=${h%%:*}; fi
    [[ $h == localhost || $h == ::1 || $h == 127.* ]]
}

# The servers and tools of a benchmark, from the environment (BENCH_PG_HOST/PORT/USER, BENCH_NATS_URL,
# BENCH_PGBIN) or their defaults. Sets PG_HOST, PG_PORT, PG_USER, NATS_URL, PGBIN.
server_knobs() {
    PG_HOST=${BENCH_PG_HOST:-127.0.0.1}
    PG_PORT=${BENCH_PG_PORT:-5432}
    PG_USER=${BENCH_PG_USER:-postgres}
    NATS_URL=${BENCH_NATS_URL:-nats://127.0.0.1:4222}
    # shellcheck disable=SC2012
    PGBIN=${BENCH_PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}
}

admin() { "${PSQL[@]}" -d postgres -Atq -c "$1"; }
sql() { "${PSQL[@]}" -d "$DB" -Atq -c "$1"; }

# A free TCP port on 127.0.0.1 (for a daemon's metrics endpoint).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# drop_slots "'name1','name2'": terminates whoever reads these slots and drops them; retries for 10 s.
# For the clean-up traps: never fails, warns when a slot is left.
drop_slots() {
    local slots=$1 left=1
    for _ in $(seq 50); do
        admin "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
               WHERE slot_name IN ($slots) AND active_pid IS NOT NULL" >/dev/null 2>&1
        admin "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
               WHERE slot_name IN ($slots) AND NOT active" >/dev/null 2>&1
        left=$(admin "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ($slots)" 2>/dev/null)
        [[ $left == 0 ]] && break
        sleep 0.2
    done
    [[ $left == 0 ]] || log "WARNING: could not drop slots $slots: drop them by hand"
}

# drop_created "'slot1','slot2'": the end of a clean-up trap: drops the slots, the database DB, the
# JetStream stream STREAM and the work directory WORK. Never fails; warns about what is left.
drop_created() {
    drop_slots "$1"
    admin "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 ||
        log "WARNING: could not drop database $DB"
    python3 "$ROOT/benches/jetstream.py" "$NATS_URL" delete "$STREAM" >/dev/null 2>&1 ||
        log "WARNING: could not delete JetStream stream $STREAM"
    [[ -z $WORK || ! -d $WORK ]] || rm -rf "$WORK"
    return 0
}

# cargo build --release (unless BENCH_SKIP_BUILD=1); sets BIN, the binary in the build directory cargo
# uses (CARGO_TARGET_DIR when set, like the demo). BENCH_BIN=<path> runs that binary instead and builds
# nothing (to compare two builds, e.g. copies of before and after, on the same server and hour).
build_release() {
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/cdc-egress
    if [[ -n ${BENCH_BIN:-} ]]; then
        BIN=$BENCH_BIN
    elif [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        log "cargo build --release (5+ minutes from cold on 2 cores; log in target/bench-build.log)"
        mkdir -p "$ROOT/target"
        timeout "${BENCH_BUILD_TIMEOUT_S:-3600}" cargo build --release >"$ROOT/target/bench-build.log" 2>&1 ||
            { tail -n 30 "$ROOT/target/bench-build.log" >&2; die "cargo build --release"; }
    fi
    [[ -x $BIN ]] || die "$BIN missing (build first or unset BENCH_SKIP_BUILD)"
}

# Sets UNSET to `-u VAR` for every CDC_EGRESS_* variable of our environment, for `env`: a daemon sees
# only the configuration the benchmark gives it.
egress_unset() {
    local v
    UNSET=()
    for v in $(compgen -e); do [[ $v == CDC_EGRESS_* ]] && UNSET+=(-u "$v"); done
    return 0
}

# ------------------------------------------------------------------------------------------------
# Timing and sampling. The polling loops fork nothing per iteration (the machine may have only 2
# cores): the clock is $EPOCHREALTIME in microseconds, CPU times are read from /proc into variables,
# sleeping is a read with a timeout on a FIFO nobody writes to (NAP_FD).

now() { printf '%s' "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
calc() { awk "BEGIN { printf \"$1\", $2 }"; }
commas() {
    local n=$1 s=
    while ((${#n} > 3)); do s=",${n: -3}$s"; n=${n:0:${#n}-3}; done
    printf '%s%s' "$n" "$s"
}
lsn_num() { local hi=${1%/*} lo=${1#*/}; printf '%d' $(((16#$hi << 32) + 16#$lo)); }
NOW_US=0
tick() { local t=$EPOCHREALTIME; NOW_US=$((10#${t/./})); }
# sample LABEL PID: CPU time in ns (all threads) into CPU_NS[LABEL] and the number of times its
# threads were switched in into SLICES[LABEL] (~ context switches), from /proc/<pid>/task/*/schedstat:
# one short line per thread, cheap enough to read every iteration. Left unchanged when the process is
# gone, so the values are the last ones seen before it exited.
declare -A CPU_NS=() SLICES=()
sample() {
    local task a _b c cpu=0 n=0
    for task in /proc/"$2"/task/*; do
        { read -r a _b c <"$task/schedstat"; } 2>/dev/null || return 0
        cpu=$((cpu + a))
        n=$((n + c))
    done
    ((cpu > 0)) || return 0
    CPU_NS[$1]=$cpu
    SLICES[$1]=$n
}
cpu_s() { calc '%.2f' "${CPU_NS[$1]:-0} / 1e9"; }
# Signals: the scripts trap INT and TERM with `on_signal STATUS`, which exits (and so runs the EXIT
# trap, the clean-up). Not while nap waits, though: a trap runs inside the `read -t`, and bash 5.2
# keeps read's timeout armed meanwhile and jumps back into the read when it fires, in the middle of
# the clean-up ("stack smashing detected", no clean-up). So a signal during nap is only noted, and nap
# exits once its read has returned.
NAPPING='' PENDING_EXIT=''
on_signal() { if [[ -n $NAPPING ]]; then PENDING_EXIT=$1; else exit "$1"; fi; }
nap() {
    NAPPING=1
    read -r -t 0.05 -u "$NAP_FD" _ || true
    NAPPING=''
    [[ -z $PENDING_EXIT ]] || exit "$PENDING_EXIT"
}

# One persistent psql session for polling (a new psql per poll would cost more than the poll).
# Sets PQ_PID; stop_poller ends it.
start_poller() {
    coproc PQ { trap - ERR; "${PSQL[@]}" -d "$DB" -Atq 2>&1; }
    exec {PQ_IN}>&"${PQ[1]}" {PQ_OUT}<&"${PQ[0]}"
}
q() { printf '%s\n' "$1" >&"$PQ_IN"; IFS= read -r REPLY <&"$PQ_OUT"; }
stop_poller() {
    [[ -n ${PQ_PID:-} ]] || return 0
    # (the braces: `exec ... 2>/dev/null` alone would send the rest of the clean-up's messages there)
    { exec {PQ_IN}>&-; } 2>/dev/null
    kill "$PQ_PID" 2>/dev/null
    return 0
}

# A daemon's metrics, through one long-lived scraper per daemon (benches/metrics.py), FIFOs rather
# than a second coproc, which bash does not support well.
declare -A SCRAPER_PID=() SCRAPER_IN=() SCRAPER_OUT=()
# start_scraper NAME PORT [METRIC...]: the metrics default to the two `scrape` reads; with others,
# read them with `scrape_raw`.
start_scraper() {
    local in out name=$1 port=$2
    shift 2
    (($#)) || set -- cdc_egress_received_lsn cdc_egress_messages_received_total
    mkfifo "$WORK/scrape-$name.in" "$WORK/scrape-$name.out"
    python3 -u "$ROOT/benches/metrics.py" "$port" "$@" \
        <"$WORK/scrape-$name.in" >"$WORK/scrape-$name.out" &
    SCRAPER_PID[$name]=$!
    exec {in}>"$WORK/scrape-$name.in" {out}<"$WORK/scrape-$name.out"
    SCRAPER_IN[$name]=$in
    SCRAPER_OUT[$name]=$out
    scrape_raw "$name" # waits until python is up, so its start-up is not inside the timed run
}
scrape_raw() { # name -> REPLY: the values of the scraper's metrics, space-separated, or "down"
    printf '\n' >&"${SCRAPER_IN[$1]}"
    IFS= read -r REPLY <&"${SCRAPER_OUT[$1]}"
}
scrape() { # name -> RECEIVED_LSN, MESSAGES (empty when the endpoint is not up yet)
    scrape_raw "$1"
    RECEIVED_LSN='' MESSAGES=''
    [[ $REPLY =~ ^([0-9]+)\ ([0-9]+)$ ]] || return 1
    RECEIVED_LSN=${BASH_REMATCH[1]}
    MESSAGES=${BASH_REMATCH[2]}
}
stop_scrapers() {
    local name fd
    for name in "${!SCRAPER_PID[@]}"; do
        fd=${SCRAPER_IN[$name]}
        { exec {fd}>&-; } 2>/dev/null
        fd=${SCRAPER_OUT[$name]}
        { exec {fd}<&-; } 2>/dev/null
        kill "${SCRAPER_PID[$name]}" 2>/dev/null || true
        wait "${SCRAPER_PID[$name]}" 2>/dev/null || true
        unset "SCRAPER_PID[$name]"
    done
    return 0
}

# ------------------------------------------------------------------------------------------------
# The workload (benches/README.md, throughput.sh step 3). Tables t01..t<NTABLES> shaped like an
# orders table.

make_table_names() { # -> TABLES
    local i
    TABLES=()
    for i in $(seq -w 1 "$NTABLES"); do TABLES+=("t$i"); done
}
# No autovacuum on the bench tables: it would work on the freshly loaded tables during the drains,
# on the same CPUs (measured: 1.4 CPU-seconds in one throughput run), and favour whichever consumer
# it happened to miss.
tables_ddl() { # prints the CREATE statements of TABLES and of the pgbench id sequence
    local t
    for t in "${TABLES[@]}"; do
        cat <<SQL
CREATE TABLE $t (
    id          bigint PRIMARY KEY,
    customer_id integer NOT NULL,
    status      text NOT NULL,
    amount      numeric(12,2),
    quantity    integer,
    note        text,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz
) WITH (autovacuum_enabled = false);
SQL
    done
    echo "CREATE SEQUENCE bench_ids START 1000000000;"
}

insert_rows() { # table first last
    printf "INSERT INTO %s (id, customer_id, status, amount, quantity, note, created_at)
SELECT g, (g * 7919) %% 100000, (ARRAY['new','paid','shipped','delivered','returned'])[1 + g %% 5],
       round((g %% 100000) * 1.37, 2), 1 + g %% 9, 'order note ' || md5(g::text) || ' #' || (g %% 997),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1.000123 second'
FROM generate_series(%d, %d) g;\n" "$1" "$2" "$3"
}
gen_bulk() {
    # Inserts: chunk sizes cycle through 20000..1 rows per table; even chunks are one transaction
    # over all tables (up to 200,000 changes), odd chunks one transaction per table.
    local pattern=(20000 5000 1000 200 50 10 1 1) next=1 i=0 size last t
    while ((next <= ROWS)); do
        size=${pattern[i % ${#pattern[@]}]}
        ((size > ROWS - next + 1)) && size=$((ROWS - next + 1))
        last=$((next + size - 1))
        if ((i % 2 == 0)); then
            echo "BEGIN;"
            for t in "${TABLES[@]}"; do insert_rows "$t" "$next" "$last"; done
            echo "COMMIT;"
            TXNS=$((TXNS + 1))
        else
            for t in "${TABLES[@]}"; do insert_rows "$t" "$next" "$last"; done
            TXNS=$((TXNS + NTABLES))
        fi
        next=$((last + 1))
        i=$((i + 1))
    done
    # Updates of every fifth row (id % 5 = 2), id ranges of varied width, one transaction per range
    # over all tables.
    local widths=(25000 5000 500 50) lo=1 hi
    i=0
    while ((lo <= ROWS)); do
        hi=$((lo + widths[i % ${#widths[@]}] - 1))
        echo "BEGIN;"
        for t in "${TABLES[@]}"; do
            echo "UPDATE $t SET status = 'updated', amount = amount + 1,
                  updated_at = timestamptz '2024-06-01 00:00:00+00' + id * interval '1 millisecond'
                  WHERE id BETWEEN $lo AND $hi AND id % 5 = 2;"
        done
        echo "COMMIT;"
        TXNS=$((TXNS + 1))
        lo=$((hi + 1))
        i=$((i + 1))
    done
}
gen_deletes() {
    # Deletes of every twentieth row of the lower half, 10,000 ids per single-table transaction.
    local lo hi t
    for ((lo = 1; lo <= ROWS / 2; lo += 10000)); do
        hi=$((lo + 9999))
        for t in "${TABLES[@]}"; do
            echo "DELETE FROM $t WHERE id BETWEEN $lo AND $hi AND id % 20 = 0;"
            TXNS=$((TXNS + 1))
        done
    done
}
tally() { # psql output with command tags -> "inserts updates deletes"
    awk '$1 == "INSERT" { i += $3 } $1 == "UPDATE" { u += $2 } $1 == "DELETE" { d += $2 }
         END { printf "%d %d %d\n", i, u, d }'
}
run_sql_file() { # file -> "inserts updates deletes" from the command tags
    "${PSQL[@]}" -d "$DB" -f "$1" >"$1.out" || die "psql -f $1"
    tally <"$1.out"
}

# run_workload: the bulk inserts and updates, pgbench's small transactions, then the deletes. Counts
# come from the server's command tags and pgbench; transactions are counted as they are generated.
# Sets INS, UPD, DEL, CHANGES, TXNS and PGB_DONE.
run_workload() {
    TXNS=0
    # (plain redirections, not $(...): the generators count TXNS in this shell)
    gen_bulk >"$WORK/bulk.sql"
    gen_deletes >"$WORK/deletes.sql"
    read -r INS UPD DEL < <(run_sql_file "$WORK/bulk.sql")
    [[ -n $INS ]] || die "bulk workload"

    # pgbench: small transactions (one insert + one update of an existing, never-deleted row), spread
    # over the tables by one equally weighted script per table.
    local t pgb_args=() pgb_out d2
    for t in "${TABLES[@]}"; do
        cat >"$WORK/pgbench_$t.sql" <<SQL
\\set k random(0, $((ROWS / 5 - 1)))
BEGIN;
INSERT INTO $t (id, customer_id, status, amount, quantity, note, created_at)
    VALUES (nextval('bench_ids'), :k % 100000, 'new', 9.99, 1, 'pgbench order ' || md5(:k::text), now());
UPDATE $t SET quantity = quantity + 1, status = 'touched', updated_at = now() WHERE id = :k * 5 + 3;
END;
SQL
        pgb_args+=(-f "$WORK/pgbench_$t.sql")
    done
    pgb_out=$("$PGBIN/pgbench" -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -n -M prepared -c 2 -j 2 \
        -t $((PGBENCH_TXNS / 2)) "${pgb_args[@]}" "$DB" 2>&1) || { echo "$pgb_out" >&2; die "pgbench"; }
    [[ $pgb_out =~ transactions\ actually\ processed:\ ([0-9]+)/([0-9]+) ]] ||
        { echo "$pgb_out" >&2; die "pgbench output"; }
    [[ ${BASH_REMATCH[1]} == "${BASH_REMATCH[2]}" ]] ||
        die "pgbench processed ${BASH_REMATCH[1]} of ${BASH_REMATCH[2]}"
    PGB_DONE=${BASH_REMATCH[1]}
    INS=$((INS + PGB_DONE))
    UPD=$((UPD + PGB_DONE))
    TXNS=$((TXNS + PGB_DONE))

    read -r _ _ d2 < <(run_sql_file "$WORK/deletes.sql")
    [[ -n $d2 ]] || die "delete workload"
    DEL=$((DEL + d2))
    CHANGES=$((INS + UPD + DEL))
}

# Cross-checks the workload count with the server's statistics (flushed when each session ended).
check_workload() {
    local si su sd
    read -r si su sd < <(sql "SELECT sum(n_tup_ins), sum(n_tup_upd), sum(n_tup_del) FROM pg_stat_user_tables
                              WHERE schemaname = 'public'" | tr '|' ' ')
    [[ "$si $su $sd" == "$INS $UPD $DEL" ]] ||
        die "workload count mismatch: command tags/pgbench say I/U/D $INS/$UPD/$DEL, pg_stat_user_tables says $si/$su/$sd"
}
