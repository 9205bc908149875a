#!/usr/bin/env bash
# Every row of issue 10 in one table: runs the other benchmarks one after the other, keeps each one's
# JSON, and prints the medians.
#
#   BENCH_PG_PORT=54329 bash benches/all.sh                 (from the repository root; full: ~12 minutes)
#   BENCH_QUICK=1 BENCH_PG_PORT=54329 bash benches/all.sh   (quick: ~3 minutes, smaller workloads, 1 run)
#
# Rows (details of each benchmark in benches/README.md):
#   tcp        throughput.sh over TCP, files + notices            BENCH_RUNS runs (3; quick 1)
#   unix       throughput.sh over the unix socket (BENCH_PG_SOCKET, default: the server's
#              unix_socket_directories), files + notices          BENCH_RUNS runs
#   events     throughput.sh over TCP with nats.change_events      BENCH_RUNS runs
#   grouped    throughput.sh over TCP with nats.change_events: grouped   BENCH_RUNS runs
#   latency    event_latency.sh, p50 / p99 commit -> JetStream ack at BENCH_LAT_TPS x BENCH_LAT_ROWS
#   tables     many_tables.sh with 5,000 tables (BENCH_MANY_TABLES), peak RSS with all batches open
#   reload     reload_export.sh against `COPY | gzip -1` and `COPY > /dev/null`
# BENCH_ROWS selects rows (e.g. "tcp unix"); rows not selected keep the results of their last run in
# benches/results/all/ and still show in the table. Ratios are pg_recvlogical's time / cdc-egress's time,
# within one run; the table shows the median over the runs and, in brackets, the range. The build is
# done once (BENCH_SKIP_BUILD=1 / BENCH_BIN as in throughput.sh). Each benchmark cleans up after itself.
# The table goes to stdout and benches/results/all.txt, the raw JSON to benches/results/all/.

set -Eeuo pipefail
shopt -s inherit_errexit

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
server_knobs
PSQL=("$PGBIN/psql" -X -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER")

QUICK=${BENCH_QUICK:-0}
ROWS_SEL=${BENCH_ROWS:-tcp unix events grouped latency tables reload}
if [[ $QUICK == 1 ]]; then
    RUNS=${BENCH_RUNS:-1}
    : "${BENCH_ROWS_PER_TABLE:=40000}" "${BENCH_PGBENCH_TXNS:=4000}" "${BENCH_INTERVAL_S:=2}"
    : "${BENCH_LAT_SECONDS:=10}" "${BENCH_MANY_TABLES:=5000}" "${RELOAD_ROWS:=1000000}"
else
    RUNS=${BENCH_RUNS:-3}
    : "${BENCH_ROWS_PER_TABLE:=120000}" "${BENCH_PGBENCH_TXNS:=10000}" "${BENCH_INTERVAL_S:=2}"
    : "${BENCH_LAT_SECONDS:=30}" "${BENCH_MANY_TABLES:=5000}" "${RELOAD_ROWS:=3000000}"
fi
export BENCH_ROWS_PER_TABLE BENCH_PGBENCH_TXNS BENCH_LAT_SECONDS
OUT=$ROOT/benches/results/all
mkdir -p "$OUT"

GIVEN_BIN=${BENCH_BIN:-}
build_release
export BENCH_BIN=$BIN
SOCKET=${BENCH_PG_SOCKET:-$(admin "SELECT split_part(current_setting('unix_socket_directories'), ',', 1)")}
START=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

want() { [[ " $ROWS_SEL " == *" $1 "* ]]; }

# The results of the selected rows are replaced; the others keep those of their last run (so a row
# can be run again alone and the table still shows all of them).
for row in tcp unix events grouped latency tables reload; do
    if want "$row"; then rm -f "$OUT/$row"[.-]*; fi
done

# throughput.sh runs, alternating the paths so that the machine's mood of the hour hits all of them.
for run in $(seq 1 "$RUNS"); do
    for path in tcp unix events grouped; do
        want "$path" || continue
        log "all: $path, run $run of $RUNS"
        env_args=(BENCH_INTERVAL_S="$BENCH_INTERVAL_S")
        [[ $path == unix ]] && env_args+=(BENCH_PG_SOCKET="$SOCKET")
        [[ $path == events ]] && env_args+=(BENCH_CHANGE_EVENTS=1)
        [[ $path == grouped ]] && env_args+=(BENCH_CHANGE_EVENTS=grouped)
        env "${env_args[@]}" bash "$ROOT/benches/throughput.sh" >"$OUT/$path-$run.txt" 2>"$OUT/$path-$run.log" ||
            log "all: $path run $run failed (see $OUT/$path-$run.log)"
        [[ -f $ROOT/benches/results/last.json ]] && mv "$ROOT/benches/results/last.json" "$OUT/$path-$run.json"
    done
done
if want latency; then
    log "all: event latency"
    env BENCH_INTERVAL_S="$BENCH_INTERVAL_S" bash "$ROOT/benches/event_latency.sh" >"$OUT/latency.txt" 2>"$OUT/latency.log" ||
        log "all: event latency failed (see $OUT/latency.log)"
    [[ -f $ROOT/benches/results/last-latency.json ]] && mv "$ROOT/benches/results/last-latency.json" "$OUT/latency.json"
fi
if want tables; then
    log "all: $BENCH_MANY_TABLES tables"
    # An hour's batch.interval: a seal deadline inside the drain would seal batches before all are
    # open (many_tables.sh then waits for its timeout), and with 300 s that happens one run in ten.
    env BENCH_TABLES="$BENCH_MANY_TABLES" BENCH_SEAL=0 BENCH_INTERVAL_S=3600 BENCH_TIMEOUT_S=600 bash "$ROOT/benches/many_tables.sh" >"$OUT/tables.txt" 2>"$OUT/tables.log" ||
        log "all: many tables failed (see $OUT/tables.log)"
    [[ -f $ROOT/benches/results/many_tables.json ]] && mv "$ROOT/benches/results/many_tables.json" "$OUT/tables.json"
fi
if want reload; then
    log "all: reload export"
    env ROWS="$RELOAD_ROWS" bash "$ROOT/benches/reload_export.sh" >"$OUT/reload.txt" 2>"$OUT/reload.log" ||
        log "all: reload export failed (see $OUT/reload.log)"
    [[ -f $ROOT/benches/results/reload_export.json ]] && mv "$ROOT/benches/results/reload_export.json" "$OUT/reload.json"
fi

GIT_REV=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z $GIVEN_BIN ]] || GIT_REV="binary $GIVEN_BIN (tree at $GIT_REV)"
MACHINE="$(nproc) cores ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)), $(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM"
python3 - "$OUT" "$START" "$MACHINE" "$LOAD_START" "$(cut -d' ' -f1-3 /proc/loadavg)" "$GIT_REV" "$QUICK" \
    "$(admin "SHOW server_version")" <<'PY' | tee "$ROOT/benches/results/all.txt"
import glob, json, os, statistics, sys

out, start, machine, load0, load1, rev, quick, pg = sys.argv[1:9]

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def med(xs, fmt="%.2f"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = fmt % statistics.median(xs)
    return m if len(xs) == 1 else "%s (%s-%s)" % (m, fmt % min(xs), fmt % max(xs))

rows = []
split = []
broker = []
for path, label in (("tcp", "TCP, files + notices"), ("unix", "unix socket, files + notices"),
                    ("events", "TCP, change events"), ("grouped", "TCP, grouped change events")):
    runs = [load(p) for p in sorted(glob.glob(os.path.join(out, path + "-*.json")))]
    runs = [r for r in runs if r]
    if not runs:
        continue
    ok = sum(1 for r in runs if r["check"]["result"] == "ok")
    eg = [r["cdc_egress"] for r in runs]
    changes = runs[0]["workload"]["changes"]
    rows.append((label,
                 med([r["pg_recvlogical"]["changes_per_s"] / 1000 for r in runs], "%.0f") + "K",
                 med([e["received"]["ratio"] for e in eg]) + "x",
                 med([r["pg_recvlogical"]["seconds"] / e["acked"]["seconds_without_seal_wait"] for r, e in zip(runs, eg)]) + "x",
                 med([e["cpu_s_at_received"] * 1e6 / changes for e in eg], "%.2f"),
                 med([e["peak_rss_kib"] / 1024 for e in eg], "%.1f"),
                 "%d/%d ok, %s changes" % (ok, len(runs), format(changes, ","))))
    if path in ("events", "grouped") and any(e.get("nats_server_cpu_s") is not None for e in eg):
        broker.append("%s %s" % (path, med([e["nats_server_cpu_s"] * 1e6 / changes
                                            for e in eg if e.get("nats_server_cpu_s") is not None], "%.2f")))
    if all("peak_rss_file_kib" in e for e in eg):
        split.append("%s %s + %s" % (path, med([e["peak_rss_file_kib"] / 1024 for e in eg], "%.1f"),
                                     med([e["peak_rss_anon_kib"] / 1024 for e in eg], "%.1f")))
print("issue 10 benchmarks, %s, %s; PostgreSQL %s; cdc-egress %s; load %s -> %s%s" % (
    start, machine, pg, rev, load0, load1, " (quick mode)" if quick == "1" else ""))
hdr = ("row", "pg_recvlogical", "recv ratio", "acked* ratio", "CPU us/change", "peak RSS MiB", "check")
fmt = "| %-30s | %-16s | %-20s | %-20s | %-18s | %-18s | %s |"
print(fmt % hdr)
print("|" + "|".join("-" * (w + 2) for w in (30, 16, 20, 20, 18, 18, 20)) + "|")
for r in rows:
    print(fmt % r)
lat = load(os.path.join(out, "latency.json"))
if lat:
    l = lat["latency"]
    print(fmt % ("change-event latency", "%d x %d/s" % (lat["target_tps"], lat["rows_per_txn"]),
                 "p50 %.1f ms" % l["p50_ms"], "p99 %.1f ms" % l["p99_ms"],
                 "%.2f" % (lat["cdc_egress_cpu_s"] * 1e6 / max(lat["changes"], 1)), "-",
                 "%s events, max %.0f ms" % (format(l["events"], ","), l["max_ms"])))
tab = load(os.path.join(out, "tables.json"))
if tab:
    for t in tab["runs"]:
        sealed = ("sealed: peak %.1f MiB, %s" % (t["sealed_peak_rss_kib"] / 1024, t["check"])
                  if t["check"] != "skipped" else "peak with all open; not sealed")
        print(fmt % ("%s tables, open batches" % format(t["tables"], ","), "-", "-", "-", "-",
                     "%.1f" % (t["open_peak_rss_kib"] / 1024), sealed))
rl = load(os.path.join(out, "reload.json"))
if rl:
    print(fmt % ("reload, parallelism %d" % rl["parallelism"], "%s rows" % format(rl["rows"], ","),
                 "%.2fx vs COPY|gzip -1" % rl["ratio_gzip"], "%.2fx vs COPY>null" % rl["ratio_null"], "-", "-",
                 "%.2f s (gzip %.2f s, null %.2f s)" % (rl["egress_s"], rl["copy_gzip_s"], rl["copy_null_s"])))
if broker:
    print("nats-server CPU per change while cdc-egress ran, us: " + "; ".join(broker))
if split:
    print("peak RSS, largest in the samples, MiB: file-backed (code) + the rest (heap, stacks): " + "; ".join(split))
print("ratios: pg_recvlogical time / cdc-egress time in the same run (recv: until the daemon received the "
      "target LSN; acked*: until the slot confirmed it, minus the wait for the seal deadline); median (range)")
PY
