#!/usr/bin/env bash
# Installs holdfast from a release tarball (or a binary you built) as systemd units.
#
#   sudo ./holdfast-<version>-<arch>/install.sh --role worker --node-id w1 --join 10.0.0.1:7701
#   sudo ./install.sh --role manager --node-id m1 --bootstrap      # the FIRST manager only
#   sudo ./install.sh --role manager --node-id m2 --join 10.0.0.1:7701
#   sudo packaging/install.sh --binary target/.../holdfast --role worker ...   # from source
#
# Options: --role manager|worker|both, --node-id NAME, --join ADDR[,ADDR...],
# --bootstrap, --advertise HOST, --tarball FILE, --binary FILE, --start.
# Without --role (or --join/--bootstrap for a manager) it asks, when run on a terminal.
# It verifies the tarball against its .sha256 before installing anything, refuses a
# binary of another CPU architecture, and never starts a new cluster unless told to
# with --bootstrap (or "yes" to the question).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { echo "install: $*" >&2; exit 1; }

role="" node_id="" join="" bootstrap="" advertise="" tarball="" binary="" start=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --role) role="${2:?}"; shift 2 ;;
        --node-id) node_id="${2:?}"; shift 2 ;;
        --join) join="${2:?}"; shift 2 ;;
        --bootstrap) bootstrap=yes; shift ;;
        --advertise) advertise="${2:?}"; shift 2 ;;
        --tarball) tarball="${2:?}"; shift 2 ;;
        --binary) binary="${2:?}"; shift 2 ;;
        --start) start=yes; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[[ "$(id -u)" -eq 0 ]] || die "run as root (it installs units and creates a system user)"
case "$(uname -m)" in
    x86_64|amd64) arch=x86_64 ;;
    aarch64|arm64) arch=aarch64 ;;
    *) die "unsupported CPU architecture $(uname -m) (x86_64 and aarch64 are built)" ;;
esac
command -v systemctl >/dev/null || die "systemd is required"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [[ -z "$binary" ]]; then
    # By default: the tarball this script was unpacked from, next to its directory.
    [[ -n "$tarball" ]] || tarball="$(dirname "$here")/$(basename "$here").tar.gz"
    if [[ ! -f "$tarball" && -x "$here/build-static.sh" ]]; then
        echo "install: no tarball; building from source with build-static.sh" >&2
        binary="$("$here/build-static.sh" | tail -n1)"
    fi
fi
if [[ -z "$binary" ]]; then
    [[ -f "$tarball" ]] || die "no tarball at $tarball (pass --tarball FILE or --binary FILE)"
    [[ -f "$tarball.sha256" ]] || die "no checksum file $tarball.sha256 next to the tarball"
    case "$(basename "$tarball")" in
        *-"$arch".tar.gz) ;;
        *) die "$(basename "$tarball") is not for this machine's architecture ($arch)" ;;
    esac
    (cd "$(dirname "$tarball")" && sha256sum --check --status "$(basename "$tarball").sha256") \
        || die "checksum mismatch for $tarball: not installing"
    tar -xzf "$tarball" -C "$work"
    src="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)"
    binary="$src/holdfast"
    units="$src/systemd"
    example="$src/holdfast.toml"
else
    echo "install: installing $binary as given (no checksum: not from a release tarball)" >&2
    units="$here/../systemd"
    example="$here/holdfast.toml"
fi
[[ -x "$binary" ]] || die "no executable at $binary"
# A binary for another CPU cannot run here: check before replacing anything.
"$binary" --version >/dev/null 2>&1 || die "$binary does not run on this $arch machine"

ask() { # ask VAR "question" — only on a terminal
    [[ -t 0 ]] || die "$2: pass it as a flag (not a terminal, cannot ask)"
    read -r -p "$2 " "$1"
}
if [[ -z "$role" ]]; then
    ask role "Role of this host (manager, worker or both)?"
fi
case "$role" in manager|worker|both) ;; *) die "--role must be manager, worker or both" ;; esac
[[ -n "$node_id" ]] || node_id="$(hostname -s)"
if [[ "$role" != worker && -z "$bootstrap" && -z "$join" ]]; then
    ask answer "Is this the FIRST manager of a NEW cluster? (yes/no)"
    if [[ "$answer" == yes ]]; then bootstrap=yes; else ask join "Cluster address of an existing manager (host:7701)?"; fi
fi
[[ "$role" != worker || -n "$join" ]] || ask join "Cluster address(es) of the managers (host:7701[,host:7701])?"
[[ -n "$bootstrap" && -n "$join" ]] && die "--bootstrap starts a new cluster; --join joins one: pick one"

install -m 0755 "$binary" /usr/local/bin/holdfast
getent group holdfast >/dev/null || groupadd --system holdfast
getent passwd holdfast >/dev/null \
    || useradd --system --gid holdfast --home-dir /var/lib/holdfast --no-create-home --shell /usr/sbin/nologin holdfast
for u in holdfast-manager holdfast-worker; do
    sed 's#/usr/bin/holdfast#/usr/local/bin/holdfast#' "$units/$u.service" > "/etc/systemd/system/$u.service"
    chmod 0644 "/etc/systemd/system/$u.service"
done
install -d -m 0750 -g holdfast /etc/holdfast
config=/etc/holdfast/holdfast.toml
if [[ -f "$config" ]]; then
    echo "install: keeping the existing $config" >&2
else
    {
        echo "# Written by install.sh; keys are the long flags of holdfast agent (see the example below)."
        echo "node-id = \"$node_id\""
        [[ -n "$advertise" ]] && echo "advertise = \"$advertise\""
        [[ -n "$bootstrap" ]] && echo "bootstrap = true"
        if [[ -n "$join" ]]; then
            printf 'join = [%s]\n' "$(echo "$join" | sed 's/[^,][^,]*/"&"/g; s/,/, /g')"
        fi
        echo
        sed 's/^/# /; s/^# # /# /' "$example"
    } > "$config"
    chgrp holdfast "$config"
    chmod 0640 "$config"
fi
systemctl daemon-reload
units_to_run=()
[[ "$role" == worker ]] || units_to_run+=(holdfast-manager)
[[ "$role" == manager ]] || units_to_run+=(holdfast-worker)
if [[ -n "$start" ]]; then
    systemctl enable --now "${units_to_run[@]}"
fi
echo "installed /usr/local/bin/holdfast ($(/usr/local/bin/holdfast --version)); settings in $config"
[[ -n "$start" ]] || echo "start with: systemctl enable --now ${units_to_run[*]}"
