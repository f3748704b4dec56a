#!/usr/bin/env bash
# Makes the release tarballs: holdfast-<version>-<arch>.tar.gz per arch, each with the
# static binary, the systemd units, the example config, install.sh and README.md, and
# a holdfast-<version>-<arch>.tar.gz.sha256 beside it (`sha256sum -c` format).
# Prints each tarball's path on stdout.
#
# Usage: packaging/dist.sh [ARCH...]   (default: x86_64 aarch64)
# HOLDFAST_PROFILE=release (default) or dev, as for build-static.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
archs=("$@")
[[ ${#archs[@]} -gt 0 ]] || archs=(x86_64 aarch64)
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
out="$root/target/dist"
mkdir -p "$out"
for arch in "${archs[@]}"; do
    binary="$("$root/packaging/build-static.sh" --arch "$arch" | tail -n1)"
    name="holdfast-$version-$arch"
    stage="$(mktemp -d)"
    mkdir -p "$stage/$name/systemd"
    install -m 0755 "$binary" "$stage/$name/holdfast"
    install -m 0644 systemd/holdfast-manager.service systemd/holdfast-worker.service "$stage/$name/systemd/"
    install -m 0644 packaging/holdfast.toml README.md "$stage/$name/"
    install -m 0755 packaging/install.sh "$stage/$name/install.sh"
    # Reproducible: fixed owner, order and times.
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@${SOURCE_DATE_EPOCH:-0}" \
        -C "$stage" -czf "$out/$name.tar.gz" "$name"
    rm -rf "$stage"
    (cd "$out" && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
    echo "$out/$name.tar.gz"
done
