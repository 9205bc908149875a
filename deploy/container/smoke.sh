# Sourced by verify.sh (VERIFY_SMOKE=1): the image's binary, under chroot as uid 10001, end to end
# against the local PostgreSQL on 127.0.0.1:5432, in a scratch database with its own role and slot
# (all dropped again). NATS is left out (nats.url empty) so nothing stays behind on the server.
# Uses verify.sh's rootfs, work, ok, bad, cleanup_cmds, CHROOT.

smoke_id="cdc_egress_verify_$$"
smoke_pw=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
psql_su() { psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -Atq "$@"; }
printf '%s' "$smoke_pw" >"$work/pw"

psql_su -d postgres -c "CREATE DATABASE $smoke_id" || bad "smoke: create database"
cleanup_cmds+=("psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'DROP ROLE IF EXISTS $smoke_id'")
cleanup_cmds+=("psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'DROP DATABASE IF EXISTS $smoke_id WITH (FORCE)'")
cleanup_cmds+=("psql -h 127.0.0.1 -U postgres -d postgres -Atqc \"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$smoke_id' AND NOT active\"")

if out=$(PGHOST=127.0.0.1 POSTGRES_USER=postgres POSTGRES_DB=$smoke_id CDC_EGRESS_DB_USER=$smoke_id \
         CDC_EGRESS_DB_PASSWORD_FILE="$work/pw" bash "$root/deploy/compose/initdb/10-cdc-egress.sh" 2>&1); then
  ok "smoke: compose's initdb/10-cdc-egress.sh ran ($(tail -n1 <<<"$out"))"
else
  bad "smoke: initdb script: $out"
fi

smoke_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$rootfs/etc/cdc-egress/cdc-egress.yml" <<YML
source:
  url: postgres://$smoke_id@127.0.0.1:5432/$smoke_id?sslmode=disable
  publication: cdc_egress
  slot: $smoke_id
output:
  url: file:///var/lib/cdc-egress/out
  spool_dir: /var/lib/cdc-egress/spool
batch:
  interval: 2s
nats:
  url: ""
http:
  listen: 127.0.0.1:$smoke_port
log:
  format: json
YML
user_url="postgres://$smoke_id:$smoke_pw@127.0.0.1:5432/$smoke_id?sslmode=disable"
run_image() { env -i HOSTNAME=verify "$@"; }

out=$(run_image CDC_EGRESS_SOURCE_URL="postgres://postgres@127.0.0.1:5432/$smoke_id?sslmode=disable" \
      CDC_EGRESS_REGISTRY_URL="$user_url" \
      "$CHROOT" --userspec=10001:10001 "$rootfs" /cdc-egress migrate --config /etc/cdc-egress/cdc-egress.yml 2>&1); rc=$?
if [ $rc = 0 ] && grep -q 'event trigger .* installed' <<<"$out"; then
  ok "smoke: migrate (registry as the role, trigger as superuser): $(tr '\n' ' ' <<<"$out" | cut -c1-120)"
else
  bad "smoke: migrate exit $rc: $out"
fi

# Not through run_image: env and chroot exec, so $! is the daemon itself (SIGTERM must reach it).
env -i HOSTNAME=verify CDC_EGRESS_SOURCE_URL="$user_url" \
  "$CHROOT" --userspec=10001:10001 "$rootfs" /cdc-egress run --config /etc/cdc-egress/cdc-egress.yml \
  >"$work/run.log" 2>&1 &
daemon=$!
cleanup_cmds+=("kill -9 $daemon && sleep 2")
ready=0
for _ in $(seq 120); do
  if "$CHROOT" "$rootfs" /healthcheck "http://127.0.0.1:$smoke_port/readyz" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$daemon" 2>/dev/null || break
  sleep 0.5
done
[ $ready = 1 ] && ok "smoke: run is ready (/readyz 200 through /healthcheck)" || bad "smoke: not ready: $(tail -n5 "$work/run.log")"

psql_su -d "$smoke_id" -c "INSERT INTO public.orders (customer, amount) SELECT 'smoke ' || g, g FROM generate_series(1, 10) g" \
  || bad "smoke: insert"
out_dir="$rootfs/var/lib/cdc-egress/out"
batch=""
for _ in $(seq 60); do
  batch=$(find "$out_dir" -path '*/public/orders/streaming/*' -name manifest.json 2>/dev/null | head -n1)
  [ -n "$batch" ] && break
  sleep 0.5
done
if [ -n "$batch" ]; then
  rows=$(gzip -dc "$(dirname "$batch")/data.csv.gz" | tail -n +2 | wc -l)
  ok "smoke: streaming batch ${batch#"$out_dir"/} ($rows rows)"
else
  bad "smoke: no streaming batch: $(tail -n5 "$work/run.log")"
fi
reload=$(find "$out_dir" -path '*/public/orders/reload/*' -name manifest.json 2>/dev/null | head -n1)
[ -n "$reload" ] && ok "smoke: initial export ${reload#"$out_dir"/}" || bad "smoke: no initial export"
owner=$(stat -c %u "$out_dir" 2>/dev/null)
[ "$owner" = 10001 ] && ok "smoke: output written as uid 10001" || bad "smoke: output owner $owner"

t0=$(date +%s)
kill -TERM "$daemon" 2>/dev/null
wait "$daemon"; rc=$?
took=$(( $(date +%s) - t0 ))
[ $rc = 0 ] && ok "smoke: SIGTERM → exit 0 after ${took}s" || bad "smoke: SIGTERM → exit $rc: $(tail -n5 "$work/run.log")"

out=$(run_image CDC_EGRESS_SOURCE_URL="$user_url" "$CHROOT" --userspec=10001:10001 "$rootfs" \
      /cdc-egress drop-slot --yes --config /etc/cdc-egress/cdc-egress.yml 2>&1); rc=$?
[ $rc = 0 ] && ok "smoke: drop-slot → '$out'" || bad "smoke: drop-slot exit $rc: $out"
rm -f "$rootfs/etc/cdc-egress/cdc-egress.yml"
