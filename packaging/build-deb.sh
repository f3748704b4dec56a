#!/usr/bin/env bash
# Builds the holdfast .deb with cargo-deb (metadata: [package.metadata.deb] in
# Cargo.toml): the static binary as /usr/bin/holdfast, both systemd units, an example
# /etc/holdfast/holdfast.toml, and maintainer scripts (packaging/debian/) that create
# the `holdfast` user, never bootstrap a cluster, and remove everything on purge.
# Prints the .deb's path on stdout (last line).
#
# Usage: packaging/build-deb.sh [--arch x86_64|aarch64]
# HOLDFAST_PROFILE=release (default) or dev, as for build-static.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

arch_args=()
arch="$(uname -m)"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --arch) arch="${2:?--arch needs a value}"; arch_args=(--arch "$arch"); shift 2 ;;
        --arch=*) arch="${1#--arch=}"; arch_args=(--arch "$arch"); shift ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$arch" in
    x86_64|amd64) target=x86_64-unknown-linux-gnu ;;
    aarch64|arm64) target=aarch64-unknown-linux-gnu ;;
    *) echo "build-deb: unsupported arch $arch" >&2; exit 2 ;;
esac

if ! command -v cargo-deb >/dev/null 2>&1; then
    echo "build-deb: installing cargo-deb" >&2
    cargo install cargo-deb --locked >&2
fi

# The binary comes from build-static.sh, which also proves it static and working.
"$root/packaging/build-static.sh" "${arch_args[@]}" >/dev/null
profile="${HOLDFAST_PROFILE:-release}"
out_dir="$root/target/debian"
mkdir -p "$out_dir"
# A dev build is for checks: compress fast rather than small.
fast=()
[[ "$profile" == dev ]] && fast=(--fast)
deb="$(cargo deb --no-build --locked --quiet "${fast[@]}" --profile "$profile" --target "$target" \
    --output "$out_dir" | tail -n1)"
[[ -f "$deb" ]] || { echo "build-deb: cargo-deb made no package ($deb)" >&2; exit 1; }
echo "build-deb: $(stat -c %s "$deb") bytes" >&2
echo "$deb"
