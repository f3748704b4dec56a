#!/usr/bin/env bash
# Builds holdfast as a static glibc executable for x86_64 (default) or aarch64 and
# checks that it is one: the same file must run on any Linux host of that arch and,
# unchanged, as the entrypoint of the FROM-scratch echo image. A foreign-arch binary
# is also run under qemu-user (`--version`, and the echo task answering a POST).
# Prints the binary's path on stdout (last line).
#
# Usage: packaging/build-static.sh [--arch x86_64|aarch64]
# HOLDFAST_PROFILE=release (default: LTO, stripped) or dev (quick: what CI checks).
# aarch64 needs Debian's gcc-aarch64-linux-gnu (linker, C compiler for bundled SQLite)
# and `rustup target add aarch64-unknown-linux-gnu`; the check needs qemu-user-static.
set -euo pipefail

arch="$(uname -m)"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --arch) arch="${2:?--arch needs a value}"; shift 2 ;;
        --arch=*) arch="${1#--arch=}"; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "build-static: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$arch" in
    x86_64|amd64) arch=x86_64 ;;
    aarch64|arm64) arch=aarch64 ;;
    *) echo "build-static: unsupported arch $arch (x86_64 or aarch64)" >&2; exit 2 ;;
esac
target="$arch-unknown-linux-gnu"
profile="${HOLDFAST_PROFILE:-release}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ "$arch" == aarch64 ]]; then
    command -v aarch64-linux-gnu-gcc >/dev/null \
        || { echo "build-static: install gcc-aarch64-linux-gnu (apt)" >&2; exit 1; }
    rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target" >&2
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
    export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
    export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
fi
# .cargo/config.toml asks for +crt-static and RELR relocations on x86_64; RUSTFLAGS
# replaces (not adds to) those flags with the same ones, so the x86_64 build shares
# `cargo test`'s artifacts, and it applies to the target only (never to build scripts)
# because --target is given. aarch64 gets the same flags from here.
export RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs"
cargo build --profile "$profile" --locked --target "$target" --bin holdfast >&2

target_dir="$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
profile_dir="$profile"
[[ "$profile" == dev ]] && profile_dir=debug
binary="${target_dir:-$root/target}/$target/$profile_dir/holdfast"
[[ -x "$binary" ]] || { echo "build-static: no binary at $binary" >&2; exit 1; }

# A dynamic executable names its loader in a PT_INTERP program header; a static one has
# none. Use whichever inspector this machine has.
if command -v readelf >/dev/null; then
    if readelf --program-headers --wide "$binary" | grep -q 'INTERP'; then
        echo "build-static: $binary needs a dynamic loader (PT_INTERP present)" >&2
        exit 1
    fi
elif command -v file >/dev/null; then
    if ! file "$binary" | grep -Eq 'statically linked|static-pie linked'; then
        echo "build-static: $binary is not static: $(file -b "$binary")" >&2
        exit 1
    fi
fi

run=("$binary")
if [[ "$arch" != "$(uname -m)" ]]; then
    qemu="qemu-$arch-static"
    command -v "$qemu" >/dev/null || { echo "build-static: install qemu-user-static to check $arch" >&2; exit 1; }
    run=("$qemu" "$binary")
fi
"${run[@]}" --version >&2

# The echo task must answer: it is what every worker runs as its reference task.
port=$(( 20000 + RANDOM % 20000 ))
"${run[@]}" echo --listen "127.0.0.1:$port" --exit-after 60s >/dev/null 2>&1 &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null || true' EXIT
answer=""
for _ in $(seq 1 100); do
    answer="$(curl -s --max-time 2 -X POST "http://127.0.0.1:$port/" -d '{"Msg":"hello"}' 2>/dev/null || true)"
    [[ -n "$answer" ]] && break
    sleep 0.1
done
kill "$echo_pid" 2>/dev/null || true
wait "$echo_pid" 2>/dev/null || true
trap - EXIT
if [[ "$answer" != '{"Msg":"hello"}' ]]; then
    echo "build-static: the $arch echo task did not answer (got: $answer)" >&2
    exit 1
fi
echo "build-static: $arch $(stat -c %s "$binary") bytes, static, echo answers" >&2
echo "$binary"
