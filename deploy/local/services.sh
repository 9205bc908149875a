#!/usr/bin/env bash
# Makes sure the local services the demo and the tests need are running, idempotently:
#   PostgreSQL on 127.0.0.1:5432 with wal_level=logical, NATS with JetStream on 127.0.0.1:4222, and
#   (with --s3) an S3-compatible test server (moto) on 127.0.0.1:5000.
# Installs missing pieces from Debian packages / PyPI. Loopback only. Safe to run any number of times.
set -euo pipefail

want_s3=0
[ "${1:-}" = "--s3" ] && want_s3=1

log() { printf '[services] %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- 3<&-; }
as_postgres() { if [ "$(id -u)" = 0 ]; then su postgres -c "$*"; else sh -c "$*"; fi; }
apt_install() {
  if [ "$(id -u)" != 0 ]; then log "need root to apt-get install $*"; exit 1; fi
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.2; done
  log "nothing listens on 127.0.0.1:$1 after 20 s"; return 1
}

# --- PostgreSQL -----------------------------------------------------------------------------------
if ! command -v pg_lsclusters >/dev/null 2>&1 && ! port_open 5432; then
  log "installing PostgreSQL"
  apt_install postgresql
fi
if ! port_open 5432; then
  cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
  log "starting PostgreSQL cluster $cluster"
  # shellcheck disable=SC2086
  pg_ctlcluster --skip-systemctl-redirect $cluster start || true
  wait_port 5432
fi
psql_() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc "$1"; }
if ! psql_ "select 1" >/dev/null 2>&1; then
  log "cannot connect to PostgreSQL as postgres on 127.0.0.1 without a password;"
  log "add 'host all all 127.0.0.1/32 trust' to pg_hba.conf or set CDC_EGRESS_TEST_PG_URL"
  exit 1
fi
if [ "$(psql_ "show wal_level")" != "logical" ]; then
  log "setting wal_level = logical and restarting PostgreSQL"
  psql_ "ALTER SYSTEM SET wal_level = logical" >/dev/null
  cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
  # shellcheck disable=SC2086
  pg_ctlcluster --skip-systemctl-redirect $cluster restart
  wait_port 5432
  for _ in $(seq 1 50); do psql_ "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
fi
# Tests run many sessions at once; make sure there is room for their slots and senders.
slots=$(psql_ "show max_replication_slots")
if [ "$slots" -lt 40 ]; then
  log "raising max_replication_slots / max_wal_senders to 64 and restarting PostgreSQL"
  psql_ "ALTER SYSTEM SET max_replication_slots = 64" >/dev/null
  psql_ "ALTER SYSTEM SET max_wal_senders = 64" >/dev/null
  cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
  # shellcheck disable=SC2086
  pg_ctlcluster --skip-systemctl-redirect $cluster restart
  wait_port 5432
  for _ in $(seq 1 50); do psql_ "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
fi
log "PostgreSQL ready (wal_level=logical)"

# --- NATS with JetStream --------------------------------------------------------------------------
if ! port_open 4222; then
  if ! command -v nats-server >/dev/null 2>&1; then
    log "installing nats-server"
    apt_install nats-server
  fi
  mkdir -p /var/lib/nats-server 2>/dev/null || true
  sd=/var/lib/nats-server; [ -w "$sd" ] || sd="${TMPDIR:-/tmp}/nats-js"
  log "starting nats-server with JetStream"
  nohup nats-server -a 127.0.0.1 -p 4222 -js -sd "$sd" >"${TMPDIR:-/tmp}/cdc-egress-nats.log" 2>&1 &
  wait_port 4222
fi
log "NATS ready"

# --- S3-compatible server (tests only) -----------------------------------------------------------
if [ "$want_s3" = 1 ]; then
  venv="${CDC_EGRESS_VENV:-$HOME/.cache/cdc-egress/venv}"
  # DuckDB, to prove the files load losslessly into it (tests/duckdb_load.rs).
  if ! "$venv/bin/python" -c 'import duckdb' >/dev/null 2>&1; then
    log "installing duckdb (Python) into $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q duckdb
  fi
  if ! port_open 5000; then
    if [ ! -x "$venv/bin/moto_server" ]; then
      log "installing moto (S3-compatible test server) into $venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install -q 'moto[server]'
    fi
    log "starting moto_server on 127.0.0.1:5000"
    nohup "$venv/bin/moto_server" -H 127.0.0.1 -p 5000 >"${TMPDIR:-/tmp}/cdc-egress-moto.log" 2>&1 &
    wait_port 5000
  fi
  log "S3 test server ready on 127.0.0.1:5000"
fi
