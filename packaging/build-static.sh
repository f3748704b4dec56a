#!/usr/bin/env bash
# Builds the release holdfast binary as a static glibc executable and checks that it is
# one: the same file must run on any Linux host and, unchanged, as the entrypoint of the
# FROM-scratch echo image (`holdfast image echo`). Prints the binary's path on stdout.
set -euo pipefail

target=x86_64-unknown-linux-gnu
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# .cargo/config.toml already asks for +crt-static on this target; saying it here as well
# keeps the script right when run with a config that does not (e.g. CARGO_HOME overrides).
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static"
cargo build --release --locked --target "$target" --bin holdfast >&2

target_dir="$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
binary="${target_dir:-$root/target}/$target/release/holdfast"
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
else
    if ldd "$binary" >/dev/null 2>&1; then
        echo "build-static: ldd lists shared libraries for $binary" >&2
        exit 1
    fi
fi
"$binary" --version >&2
echo "$binary"
