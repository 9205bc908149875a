#!/usr/bin/env bash
# Checks the container image and the deployment examples as far as this machine allows (no base
# images, no running containers): builds the image if missing (build.sh), exports its root file
# system, and checks
#   - the image config (entrypoint, cmd, numeric non-root user, port 9187);
#   - the root file system (binary, libraries resolve inside it, CA bundle, passwd, /tmp, spool
#     owner, no shell);
#   - `chroot <rootfs> /cdc-egress --help` / `--version`, also as uid 10001, and exit code 2 for a
#     configuration error;
#   - the /healthcheck probe against a loopback HTTP server (200 → 0, 503 → 1, closed port → 1);
#   - that the compose, Kubernetes, example and systemd files parse, and that each cdc-egress config
#     in them is accepted by the binary (exit 1 "cannot connect", not exit 2 "configuration");
#   - with VERIFY_SMOKE=1 (default when PostgreSQL answers on 127.0.0.1:5432 as postgres without a
#     password): the image's binary under chroot, as uid 10001, end to end against a scratch
#     database and role (created and dropped again): compose's init script, migrate, run with a
#     file:// output, /readyz, a batch with manifest.json, SIGTERM → exit 0, drop-slot.
# Prints one line per check; exits 1 if any failed. Needs root (chroot), podman or buildah, python3
# with PyYAML. Environment: IMAGE, ENGINE (as for build.sh), VERIFY_SMOKE=0|1.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
IMAGE=${IMAGE:-localhost/cdc-egress:$version}
if [ -z "${ENGINE:-}" ]; then
  if command -v podman >/dev/null 2>&1; then ENGINE=podman; else ENGINE=buildah; fi
fi
export IMAGE ENGINE

failures=0
CHROOT=$(command -v chroot)
ok()  { printf 'ok    %s\n' "$*"; }
bad() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@" >/dev/null 2>&1; then ok "$what"; else bad "$what"; fi; }

[ "$(id -u)" = 0 ] || { echo "verify.sh needs root (chroot)"; exit 1; }
python3 -c 'import yaml' 2>/dev/null || { echo "verify.sh needs python3 with PyYAML (apt-get install python3-yaml)"; exit 1; }

work=$(mktemp -d /tmp/cdc-egress-verify.XXXXXX)
rootfs="$work/rootfs"
cleanup_cmds=()
cleanup() {
  local i
  for ((i = ${#cleanup_cmds[@]} - 1; i >= 0; i--)); do eval "${cleanup_cmds[$i]}" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# --- image ----------------------------------------------------------------------------------------
if ! "$ENGINE" image exists "$IMAGE" 2>/dev/null && ! "$ENGINE" inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "image $IMAGE not found: building it"
  bash "$here/build.sh" >/dev/null || { bad "build.sh"; exit 1; }
fi
ok "image $IMAGE exists ($ENGINE)"

if [ "$ENGINE" = podman ]; then
  podman image inspect "$IMAGE" >"$work/inspect.json"
  size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
else
  buildah inspect --type image "$IMAGE" >"$work/inspect.json"
  size='?'
fi
python3 - "$work/inspect.json" >"$work/config.txt" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d = d[0] if isinstance(d, list) else d
c = d.get("Config") or d.get("OCIv1", {}).get("config", {})
print("user=%s" % c.get("User"))
print("entrypoint=%s" % json.dumps(c.get("Entrypoint")))
print("cmd=%s" % json.dumps(c.get("Cmd")))
print("ports=%s" % ",".join(sorted((c.get("ExposedPorts") or {}).keys())))
PY
grep -qx 'user=10001:10001' "$work/config.txt" && ok "image user is 10001:10001 (numeric, non-root)" || bad "image user: $(grep user= "$work/config.txt")"
grep -qx 'entrypoint=\["/cdc-egress"\]' "$work/config.txt" && ok 'image entrypoint ["/cdc-egress"]' || bad "entrypoint: $(grep entrypoint= "$work/config.txt")"
grep -qx 'cmd=\["run", "--config", "/etc/cdc-egress/cdc-egress.yml"\]' "$work/config.txt" && ok 'image cmd ["run", "--config", "/etc/cdc-egress/cdc-egress.yml"]' || bad "cmd: $(grep cmd= "$work/config.txt")"
grep -qx 'ports=9187/tcp' "$work/config.txt" && ok "image exposes 9187/tcp" || bad "ports: $(grep ports= "$work/config.txt")"
ok "image size: $size bytes"

# --- root file system ------------------------------------------------------------------------------
mkdir -p "$rootfs"
if [ "$ENGINE" = podman ]; then
  cid=$(podman create "$IMAGE") || { bad "podman create"; exit 1; }
  cleanup_cmds+=("podman rm -f $cid")
  podman export "$cid" | tar --numeric-owner -C "$rootfs" -xf - || { bad "podman export"; exit 1; }
else
  ctr=$(buildah from --pull-never "$IMAGE") || { bad "buildah from"; exit 1; }
  cleanup_cmds+=("buildah rm $ctr")
  mnt=$(buildah mount "$ctr") || { bad "buildah mount"; exit 1; }
  cp -a "$mnt/." "$rootfs/"; buildah umount "$ctr" >/dev/null
fi
ok "exported the image's root file system ($(du -sh "$rootfs" | cut -f1), $(find "$rootfs" -type f | wc -l) files)"
echo "      files: $(cd "$rootfs" && find . -type f | sed 's|^\.||' | sort | tr '\n' ' ')"

check "/cdc-egress is an executable" test -x "$rootfs/cdc-egress"
check "/healthcheck is an executable" test -x "$rootfs/healthcheck"
check "no shell in the image (/bin/sh absent)" test ! -e "$rootfs/bin/sh"
interp=$(readelf -l "$rootfs/cdc-egress" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
check "dynamic loader $interp present" test -x "$rootfs$interp"
for b in cdc-egress healthcheck; do
  out=$(chroot "$rootfs" "$interp" --list "/$b" 2>&1)
  if [ $? = 0 ] && ! grep -q 'not found' <<<"$out"; then
    ok "every library of /$b resolves inside the image: $(awk '$2 == "=>" {printf "%s ", $3}' <<<"$out")"
  else
    bad "libraries of /$b inside the image: $out"
  fi
done
ncert=$(grep -c 'BEGIN CERTIFICATE' "$rootfs/etc/ssl/certs/ca-certificates.crt" 2>/dev/null || echo 0)
[ "$ncert" -gt 0 ] && ok "CA bundle /etc/ssl/certs/ca-certificates.crt with $ncert certificates" || bad "CA bundle missing"
check "/etc/passwd has cdc-egress with uid 10001" grep -q '^cdc-egress:x:10001:10001:' "$rootfs/etc/passwd"
[ "$(stat -c %a "$rootfs/tmp")" = 1777 ] && ok "/tmp is 1777" || bad "/tmp mode $(stat -c %a "$rootfs/tmp")"
[ "$(stat -c %u:%g "$rootfs/var/lib/cdc-egress/spool")" = 10001:10001 ] && ok "/var/lib/cdc-egress/spool owned by 10001:10001" \
  || bad "/var/lib/cdc-egress/spool owner $(stat -c %u:%g "$rootfs/var/lib/cdc-egress/spool")"

# --- the binary under chroot ----------------------------------------------------------------------------
out=$(chroot "$rootfs" /cdc-egress --help 2>&1); rc=$?
if [ $rc = 0 ] && grep -q '^Usage: cdc-egress' <<<"$out"; then ok "chroot rootfs /cdc-egress --help → exit 0, '$(head -n1 <<<"$out" | cut -c1-60)…'"; else bad "--help (exit $rc): $out"; fi
out=$(chroot "$rootfs" /cdc-egress --version 2>&1); rc=$?
if [ $rc = 0 ] && [ "$out" = "cdc-egress $version" ]; then ok "chroot rootfs /cdc-egress --version → '$out'"; else bad "--version (exit $rc): $out"; fi
out=$(chroot --userspec=10001:10001 "$rootfs" /cdc-egress --version 2>&1); rc=$?
[ $rc = 0 ] && ok "as uid 10001: /cdc-egress --version → '$out'" || bad "as uid 10001 (exit $rc): $out"
out=$(chroot --userspec=10001:10001 "$rootfs" /cdc-egress run --config /etc/cdc-egress/missing.yml 2>&1); rc=$?
[ $rc = 2 ] && ok "a configuration error exits 2 ('$out')" || bad "missing config: exit $rc (want 2): $out"

# --- the health probe -----------------------------------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 - "$port" >/dev/null 2>&1 <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/healthz" else 503
        self.send_response(code); self.end_headers(); self.wfile.write(b"ok\n" if code == 200 else b"not ready\n")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
srv=$!; cleanup_cmds+=("kill $srv")
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
chroot "$rootfs" /healthcheck "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && ok "/healthcheck: 200 → exit 0" || bad "/healthcheck on 200"
chroot "$rootfs" /healthcheck "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && bad "/healthcheck on 503 exited 0" || ok "/healthcheck: 503 → exit 1"
kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null
chroot "$rootfs" /healthcheck "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && bad "/healthcheck on a closed port exited 0" || ok "/healthcheck: closed port → exit 1"

# --- deployment files -----------------------------------------------------------------------------
deploy="$root/deploy"
python3 - "$deploy" "$work" <<'PY' || failures=$((failures + 1))
import sys, yaml, os
deploy, work = sys.argv[1], sys.argv[2]
bad = 0
def ok(m): print("ok    " + m)
def fail(m):
    global bad; bad += 1; print("FAIL  " + m)

c = yaml.safe_load(open(f"{deploy}/compose/compose.yml"))
ok(f"compose/compose.yml parses: services {', '.join(c['services'])}")
for name, s in c["services"].items():
    for p in s.get("ports", []):
        (ok if str(p).startswith("127.0.0.1:") else fail)(f"compose {name} port {p} bound to 127.0.0.1")
e = c["services"]["cdc-egress"]
(ok if "/healthz" in " ".join(e["healthcheck"]["test"]) else fail)("compose cdc-egress health check uses /healthz")
grace = e.get("stop_grace_period", "10s")
(ok if int(grace.rstrip("s")) > 30 else fail)(f"compose cdc-egress stop_grace_period {grace} > 30s")
for sec in c.get("secrets", {}).values():
    (ok if sec["file"].startswith("./secrets/") else fail)(f"compose secret file {sec['file']} (generated by init-secrets.sh, git-ignored)")
pg = " ".join(c["services"]["postgres"]["command"])
(ok if "wal_level=logical" in pg else fail)("compose postgres runs with wal_level=logical")
cfg = yaml.safe_load(open(f"{deploy}/compose/cdc-egress.yml"))
(ok if "@" in cfg["source"]["url"] and ":" not in cfg["source"]["url"].split("//")[1].split("@")[0] else fail)("compose cdc-egress.yml: source.url names a user and has no password")

docs = {}
for f in sorted(os.listdir(f"{deploy}/kubernetes")):
    if f.endswith(".yaml"):
        ds = [d for d in yaml.safe_load_all(open(f"{deploy}/kubernetes/{f}")) if d]
        for d in ds: docs[d["kind"]] = d
        ok(f"kubernetes/{f} parses: {', '.join(d['kind'] for d in ds)}")
k = yaml.safe_load(open(f"{deploy}/kubernetes/kustomization.yaml"))
missing = [r for r in k["resources"] if not os.path.exists(f"{deploy}/kubernetes/{r}")]
(fail if missing else ok)(f"kustomization resources exist {missing or ''}")
dep = docs["Deployment"]; spec = dep["spec"]["template"]["spec"]; ctr = spec["containers"][0]
(ok if dep["spec"]["replicas"] == 1 else fail)("Deployment replicas: 1")
(ok if spec["terminationGracePeriodSeconds"] > 30 else fail)(f"terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} > 30")
(ok if ctr["livenessProbe"]["httpGet"]["path"] == "/healthz" else fail)("livenessProbe /healthz")
(ok if ctr["readinessProbe"]["httpGet"]["path"] == "/readyz" else fail)("readinessProbe /readyz")
(ok if ctr["ports"][0]["containerPort"] == 9187 else fail)("containerPort 9187")
(ok if spec["securityContext"]["runAsNonRoot"] and ctr["securityContext"]["readOnlyRootFilesystem"] else fail)("runAsNonRoot and readOnlyRootFilesystem")
(ok if "resources" in ctr and ctr["resources"].get("requests") else fail)("resources set")
kcfg_text = docs["ConfigMap"]["data"]["cdc-egress.yml"]
kcfg = yaml.safe_load(kcfg_text)
spool = kcfg["output"]["spool_dir"]
vols = {v["name"]: v for v in spec["volumes"]}
mount = [m for m in ctr["volumeMounts"] if m["mountPath"] == spool]
(ok if mount and "emptyDir" in vols[mount[0]["name"]] else fail)(f"output.spool_dir {spool} is an emptyDir mount")
(ok if kcfg["http"]["listen"].endswith(":9187") else fail)("ConfigMap http.listen on 9187")
(ok if docs["Secret"]["type"] == "Opaque" and any(m["mountPath"].startswith("/etc/cdc-egress/secrets") for m in ctr["volumeMounts"]) else fail)("Secret mounted as files under /etc/cdc-egress/secrets")
open(f"{work}/k8s-config.yml", "w").write(kcfg_text)
ex = yaml.safe_load(open(f"{deploy}/cdc-egress.example.yml"))
ok(f"cdc-egress.example.yml parses: sections {', '.join(ex)}")
sys.exit(1 if bad else 0)
PY

# Each config, read by the real binary (as in the container: uid 10001, config at the usual path).
# Secrets as the deployments pass them; hosts do not resolve here, so a good config ends in exit 1
# (cannot connect), a bad one in exit 2 (configuration error).
try_config() { # name file [VAR=value...]
  local name=$1 file=$2; shift 2
  install -m 0644 "$file" "$rootfs/etc/cdc-egress/cdc-egress.yml"
  out=$(env -i "$@" timeout 60 "$CHROOT" --userspec=10001:10001 "$rootfs" /cdc-egress status --config /etc/cdc-egress/cdc-egress.yml 2>&1); rc=$?
  if [ $rc = 1 ]; then ok "$name accepted by cdc-egress (status → exit 1: $(tail -n1 <<<"$out" | cut -c1-90))"
  else bad "$name: status exit $rc (want 1): $out"; fi
}
try_config "compose/cdc-egress.yml" "$deploy/compose/cdc-egress.yml" \
  CDC_EGRESS_SOURCE_URL='postgres://cdc_egress:pw@postgres:5432/app?sslmode=disable' \
  CDC_EGRESS_OUTPUT_OPTIONS_AWS_ACCESS_KEY_ID=k CDC_EGRESS_OUTPUT_OPTIONS_AWS_SECRET_ACCESS_KEY=s
try_config "kubernetes ConfigMap cdc-egress.yml" "$work/k8s-config.yml" \
  CDC_EGRESS_SOURCE_URL='postgres://cdc_egress:pw@postgres.database.svc:5432/app?sslmode=require' \
  CDC_EGRESS_OUTPUT_OPTIONS_AWS_ACCESS_KEY_ID=k CDC_EGRESS_OUTPUT_OPTIONS_AWS_SECRET_ACCESS_KEY=s
try_config "cdc-egress.example.yml" "$deploy/cdc-egress.example.yml" \
  CDC_EGRESS_SOURCE_URL='postgres://cdc_egress:pw@db.internal:5432/app?sslmode=require'
rm -f "$rootfs/etc/cdc-egress/cdc-egress.yml"

if command -v systemd-analyze >/dev/null 2>&1; then
  sed "s|/usr/local/bin/cdc-egress|$rootfs/cdc-egress|g" "$deploy/systemd/cdc-egress.service" >"$work/cdc-egress.service"
  out=$(systemd-analyze verify "$work/cdc-egress.service" 2>&1); rc=$?
  [ $rc = 0 ] && ok "systemd-analyze verify cdc-egress.service${out:+ ($out)}" || bad "systemd-analyze verify: $out"
fi
grep -q '^RestartPreventExitStatus=2' "$deploy/systemd/cdc-egress.service" && ok "systemd: no restart after exit 2" || bad "systemd: RestartPreventExitStatus=2 missing"
stop=$(sed -n 's/^TimeoutStopSec=//p' "$deploy/systemd/cdc-egress.service")
[ "${stop:-0}" -gt 30 ] && ok "systemd: TimeoutStopSec=$stop > 30" || bad "systemd: TimeoutStopSec=$stop"

# --- smoke test against the local PostgreSQL ----------------------------------------------------------
pg_ok() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc "select 1" >/dev/null 2>&1; }
smoke=${VERIFY_SMOKE:-auto}
if [ "$smoke" = auto ]; then if command -v psql >/dev/null && pg_ok; then smoke=1; else smoke=0; fi; fi
if [ "$smoke" = 1 ]; then
  . "$here/smoke.sh"
else
  echo "skip  smoke test (VERIFY_SMOKE=1 and PostgreSQL on 127.0.0.1:5432 needed)"
fi

echo
if [ "$failures" = 0 ]; then echo "verify.sh: all checks passed"; exit 0; fi
echo "verify.sh: $failures check(s) failed"; exit 1
