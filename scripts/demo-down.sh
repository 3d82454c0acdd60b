#!/usr/bin/env bash
# `make demo-down`: stops everything `make demo` started and removes .demo/.
set -uo pipefail
cd "$(dirname "$0")/.."
DEMO="$PWD/.demo"
[ -d "$DEMO" ] || { echo "no demo to stop"; exit 0; }
stop() { # name: SIGTERM, wait up to 15 s, then SIGKILL
  local f="$DEMO/$1.pid"; [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"; echo "stopped $1"
}
stop agent            # stops its nfs-ganesha too
if [ -f "$DEMO/agent/ganesha/ganesha.pid" ]; then
  kill -KILL "$(cat "$DEMO/agent/ganesha/ganesha.pid")" 2>/dev/null || true
fi
stop controller
stop etcd
if [ -d "$DEMO/pool" ]; then
  ./target/debug/cobalt-agent pool destroy --image "$DEMO/pool.img" --mount "$DEMO/pool" 2>/dev/null \
    || { umount -R "$DEMO/pool" 2>/dev/null; rm -f "$DEMO/pool.img"; }
fi
grep -q " $DEMO/" /proc/mounts && umount -R -l $(grep " $DEMO/" /proc/mounts | awk '{print $2}') 2>/dev/null
rm -rf "$DEMO"
echo "demo removed"
