#!/usr/bin/env bash
# Installs a static holdfast binary and its systemd units on this machine.
# Usage: packaging/install.sh [path/to/holdfast]   (default: build it with build-static.sh)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-}"
if [ -z "$bin" ]; then
    bin="$("$here/build-static.sh" | tail -n1)"
fi
install -m 0755 "$bin" /usr/local/bin/holdfast
install -d -m 0755 /etc/holdfast /var/lib/holdfast
install -m 0644 "$here/../systemd/holdfast-manager.service" /etc/systemd/system/
install -m 0644 "$here/../systemd/holdfast-worker.service" /etc/systemd/system/
[ -f /etc/holdfast/manager.env ] || printf 'HOLDFAST_NODE_ID=%s\nHOLDFAST_BOOTSTRAP=true\n' "$(hostname)" > /etc/holdfast/manager.env
[ -f /etc/holdfast/worker.env ] || printf 'HOLDFAST_NODE_ID=%s\nHOLDFAST_JOIN=127.0.0.1:7701\n' "$(hostname)" > /etc/holdfast/worker.env
systemctl daemon-reload
echo "installed /usr/local/bin/holdfast; edit /etc/holdfast/*.env, then:"
echo "  systemctl enable --now holdfast-manager holdfast-worker"
