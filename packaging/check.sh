#!/usr/bin/env bash
# Packaging checks that .ci/run runs after the test suite (README "Install"): the .deb
# installs with dpkg, `holdfast --version` runs, the units verify in place, and a purge
# leaves nothing behind; the aarch64 binary runs under qemu (`--version`, echo); the
# tarballs carry checksums that install.sh checks, refusing a corrupted one.
#
# It installs the .deb system-wide and always purges it again (trap), so run it only
# where no holdfast package is installed. Built with HOLDFAST_PROFILE=dev by default:
# the x86_64 binary is the one `cargo test` already built, and no LTO build is needed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export HOLDFAST_PROFILE="${HOLDFAST_PROFILE:-dev}"
say() { echo "packaging-check: $*" >&2; }
t0=$(date +%s)

if dpkg -s holdfast >/dev/null 2>&1; then
    say "a holdfast package is already installed here; refusing to touch it"
    exit 1
fi

deb="$(packaging/build-deb.sh | tail -n1)"
say "built $deb ($(stat -c %s "$deb") bytes)"
purge() { dpkg --purge holdfast >/dev/null 2>&1 || true; }
trap purge EXIT
dpkg -i "$deb" >&2
/usr/bin/holdfast --version >&2
getent passwd holdfast >/dev/null || { say "postinst did not create the holdfast user"; exit 1; }
[[ "$(stat -c '%U:%G %a' /etc/holdfast/holdfast.toml)" == "root:holdfast 640" ]] \
    || { say "config file owner/mode: $(stat -c '%U:%G %a' /etc/holdfast/holdfast.toml)"; exit 1; }
if grep -Eq '^[[:space:]]*bootstrap[[:space:]]*=' /etc/holdfast/holdfast.toml; then
    say "the packaged config must not bootstrap a cluster"; exit 1
fi
systemd-analyze verify /lib/systemd/system/holdfast-manager.service /lib/systemd/system/holdfast-worker.service
dpkg --purge holdfast >&2
trap - EXIT
for left in /usr/bin/holdfast /etc/holdfast /var/lib/holdfast /lib/systemd/system/holdfast-manager.service; do
    [[ ! -e "$left" ]] || { say "purge left $left behind"; exit 1; }
done
! getent passwd holdfast >/dev/null || { say "purge left the holdfast user behind"; exit 1; }
say ".deb: install, --version, verify, purge OK"

# Tarballs for both arches: build-static.sh runs the aarch64 binary under qemu.
mapfile -t tarballs < <(packaging/dist.sh x86_64 aarch64)
for t in "${tarballs[@]}"; do
    (cd "$(dirname "$t")" && sha256sum --check --status "$(basename "$t").sha256")
    listing="$(tar -tzf "$t")"
    grep -q '/holdfast$' <<<"$listing" || { say "$t has no binary"; exit 1; }
done
say "tarballs: ${tarballs[*]}"

# install.sh refuses a corrupted tarball before installing anything.
x86="$(printf '%s\n' "${tarballs[@]}" | grep -- '-x86_64.tar.gz$')"
before="$(stat -c '%Y %s' /usr/local/bin/holdfast 2>/dev/null || echo absent)"
bad="$(mktemp -d)"
cp "$x86" "$x86.sha256" "$bad/"
printf 'tampered' >> "$bad/$(basename "$x86")"
if out="$(packaging/install.sh --tarball "$bad/$(basename "$x86")" --role worker --join 127.0.0.1:7701 </dev/null 2>&1)"; then
    say "install.sh accepted a corrupted tarball"; exit 1
fi
grep -q "checksum mismatch" <<<"$out" || { say "install.sh failed for another reason: $out"; exit 1; }
[[ "$(stat -c '%Y %s' /usr/local/bin/holdfast 2>/dev/null || echo absent)" == "$before" ]] \
    || { say "install.sh installed something anyway"; exit 1; }
rm -rf "$bad"
say "install.sh refuses a corrupted tarball"
say "all packaging checks passed in $(( $(date +%s) - t0 )) s"
