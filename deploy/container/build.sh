#!/usr/bin/env bash
# Builds the cdc-egress container image offline, FROM scratch:
#   1. cargo build --release (skipped when CDC_EGRESS_BIN names an existing binary),
#      plus the small exec health probe in deploy/container/healthcheck;
#   2. stages the build context in target/container/: rootfs/ with the binaries, every shared library
#      `ldd` lists and the dynamic loader, the CA bundle, /etc/passwd, /etc/group, /etc/nsswitch.conf
#      and /tmp; state/ for /var/lib/cdc-egress (owned by the service user, uid 10001);
#   3. runs `podman build` (or `buildah build`) with --pull=never: no base image, no network.
#
# Environment:
#   IMAGE          image name (default localhost/cdc-egress:<version>; also tagged :latest)
#   ENGINE         podman or buildah (default: whichever is installed, podman first)
#   CDC_EGRESS_BIN use this binary instead of building one (must be built on this OS: its libraries
#                  are copied from here)
#   CA_BUNDLE      PEM bundle to install (default /etc/ssl/certs/ca-certificates.crt, Debian's
#                  ca-certificates package)
#   STRIP          1 (default) strips debug info from the copied binary; 0 keeps it
# Prints the image name, id and size at the end. Linux only (ldd, ELF).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
log() { printf '[build] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
IMAGE=${IMAGE:-localhost/cdc-egress:$version}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
STRIP=${STRIP:-1}
APP_UID=10001

if [ -z "${ENGINE:-}" ]; then
  if command -v podman >/dev/null 2>&1; then ENGINE=podman
  elif command -v buildah >/dev/null 2>&1; then ENGINE=buildah
  else die "neither podman nor buildah is installed (Debian: apt-get install podman buildah)"; fi
fi

# --- 1. binaries --------------------------------------------------------------------------------
if [ -n "${CDC_EGRESS_BIN:-}" ]; then
  [ -x "$CDC_EGRESS_BIN" ] || die "CDC_EGRESS_BIN=$CDC_EGRESS_BIN is not an executable file"
  bin=$CDC_EGRESS_BIN
  log "using $bin"
else
  log "cargo build --release --locked"
  (cd "$root" && cargo build --release --locked)
  bin="${CARGO_TARGET_DIR:-$root/target}/release/cdc-egress"
fi
log "building the health probe"
cargo build --release --quiet --manifest-path "$here/healthcheck/Cargo.toml" \
  --target-dir "$root/target/healthcheck"
probe="$root/target/healthcheck/release/healthcheck"

# --- 2. build context ---------------------------------------------------------------------------
ctx="$root/target/container"
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/etc/cdc-egress" "$ctx/rootfs/tmp" "$ctx/state/spool"
cp "$here/Containerfile" "$ctx/Containerfile"

if [ "$STRIP" = 1 ] && command -v strip >/dev/null 2>&1; then
  strip --strip-debug -o "$ctx/rootfs/cdc-egress" "$bin"
else
  cp "$bin" "$ctx/rootfs/cdc-egress"
fi
cp "$probe" "$ctx/rootfs/healthcheck"
chmod 0755 "$ctx/rootfs/cdc-egress" "$ctx/rootfs/healthcheck"

# Every library ldd resolves (as "name => /path (addr)") and the loader (a bare absolute path), at
# the path the binary will look for it; symlinks are copied as the files they point to.
libs() {
  local out
  out=$(ldd "$1") || die "ldd $1 failed (a static binary needs no libraries: remove this step)"
  if grep -q 'not found' <<<"$out"; then die "ldd $1: $(grep 'not found' <<<"$out")"; fi
  awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out"
}
for lib in $( (libs "$bin"; libs "$probe") | sort -u); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
  log "library $lib"
done
interp=$(readelf -l "$bin" 2>/dev/null | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
if [ -n "$interp" ] && [ ! -e "$ctx/rootfs$interp" ]; then
  mkdir -p "$ctx/rootfs$(dirname "$interp")"
  cp -L "$interp" "$ctx/rootfs$interp"
  log "loader $interp"
fi

[ -s "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE (Debian: apt-get install ca-certificates, or set CA_BUNDLE)"
cp -L "$CA_BUNDLE" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"

cat >"$ctx/rootfs/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/sbin/nologin
cdc-egress:x:$APP_UID:$APP_UID:cdc-egress:/var/lib/cdc-egress:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
PASSWD
cat >"$ctx/rootfs/etc/group" <<GROUP
root:x:0:
cdc-egress:x:$APP_UID:
nogroup:x:65534:
GROUP
# glibc (2.34+) has the files and dns NSS modules built in; this only makes the order explicit.
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$ctx/rootfs/etc/nsswitch.conf"
chmod 1777 "$ctx/rootfs/tmp"
chmod 0755 "$ctx/rootfs/etc/cdc-egress" "$ctx/state" "$ctx/state/spool"

# --- 3. image -----------------------------------------------------------------------------------
revision=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
labels=(--label "org.opencontainers.image.version=$version"
        --label "org.opencontainers.image.revision=$revision")
log "$ENGINE build -t $IMAGE (offline, FROM scratch)"
case "$ENGINE" in
  podman)  podman build --pull=never --network=none --format=oci "${labels[@]}" \
             -f "$ctx/Containerfile" -t "$IMAGE" "$ctx" ;;
  buildah) buildah build --pull=never --network=none --format=oci "${labels[@]}" \
             -f "$ctx/Containerfile" -t "$IMAGE" "$ctx" ;;
  *) die "ENGINE must be podman or buildah, not $ENGINE" ;;
esac
"$ENGINE" tag "$IMAGE" "${IMAGE%:*}:latest"

size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null || echo '?')
id=$("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || echo '?')
log "built $IMAGE (id ${id:0:12}, ${size} bytes)"
echo "$IMAGE"
