#!/usr/bin/env bash
# `make demo`: Cobalt's main job end to end on this machine, as root.
# etcd, a loopback BTRFS pool, a controller, an agent with nfs-ganesha; applies
# examples/volume.yaml, waits until Ready, then writes and reads a file over NFS.
# Everything lives under .demo/ and is removed by `make demo-down`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="$PWD/.demo"
BIN="$PWD/target/debug"
ETCD_PORT=23790 PEER_PORT=23800 API_PORT=7420 AGENT_PORT=7421 NFS_PORT=20490
export COBALT_SERVER="http://127.0.0.1:$API_PORT"

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
fail() { echo "demo failed: $*" >&2; echo "logs are in $DEMO/*.log; clean up with: make demo-down" >&2; exit 1; }
wait_for() { # what, seconds, command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  fail "timed out after ${secs}s waiting for $what"
}
start() { # name, command...
  local name=$1; shift
  setsid "$@" >"$DEMO/$name.log" 2>&1 < /dev/null &
  echo $! > "$DEMO/$name.pid"
}

[ "$(id -u)" = 0 ] || fail "run as root (it mounts a loopback filesystem)"
if [ -f "$DEMO/etcd.pid" ]; then fail "a demo is already running; stop it with: make demo-down"; fi
mkdir -p "$DEMO"

say "building cobalt-controller, cobalt-agent, cobaltctl"
cargo build -q --bins

say "starting etcd on 127.0.0.1:$ETCD_PORT"
start etcd etcd --name demo --data-dir "$DEMO/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "demo=http://127.0.0.1:$PEER_PORT"
wait_for etcd 30 etcdctl --endpoints "http://127.0.0.1:$ETCD_PORT" endpoint health

say "creating an 8 GiB (sparse) loopback BTRFS pool at $DEMO/pool"
"$BIN/cobalt-agent" pool create --image "$DEMO/pool.img" --size 8Gi --mount "$DEMO/pool"

say "starting the controller (API on $COBALT_SERVER, scheduler)"
start controller "$BIN/cobalt-controller" --etcd-endpoints "http://127.0.0.1:$ETCD_PORT" --listen "127.0.0.1:$API_PORT" --name demo-controller
wait_for "the API" 30 curl -sf "$COBALT_SERVER/readyz"

say "starting the agent for machine demo-node (disk=ssd) with nfs-ganesha on port $NFS_PORT"
start agent "$BIN/cobalt-agent" --etcd-endpoints "http://127.0.0.1:$ETCD_PORT" --machine demo-node \
  --address 127.0.0.1 --labels disk=ssd --pool "$DEMO/pool" --state-dir "$DEMO/agent" \
  --exporter ganesha --export-port "$NFS_PORT" --listen "127.0.0.1:$AGENT_PORT"
wait_for "the machine to be Ready" 30 sh -c "'$BIN/cobaltctl' get machine demo-node | grep -q ' Ready '"

say "cobaltctl apply -f examples/volume.yaml"
"$BIN/cobaltctl" apply -f examples/volume.yaml
say "cobaltctl wait volume/media-site-42 --for=condition=Ready"
"$BIN/cobaltctl" wait volume/media-site-42 --for=condition=Ready --timeout=120s
"$BIN/cobaltctl" get volumes -o wide

URL="nfs://127.0.0.1/media-site-42/hello.txt?version=4&nfsport=$NFS_PORT"
say "writing and reading a file over NFS: $URL"
echo "hello from cobalt, $(date -u +%FT%TZ)" > "$DEMO/hello.txt"
wait_for "the export" 30 nfs-cp "$DEMO/hello.txt" "$URL"
echo "read back over NFS:"
nfs-cat "$URL"

cat <<MSG

Cobalt is running: etcd, a controller, an agent for machine demo-node with nfs-ganesha,
and volume media-site-42 (1Gi, zstd) exported over NFSv4 on port $NFS_PORT.

Live dashboard (machines, volumes, moves and drains; updates itself):
  $COBALT_SERVER/ui

Try next:
  export COBALT_SERVER=$COBALT_SERVER
  $BIN/cobaltctl events
  $BIN/cobaltctl get machines -o wide
  $BIN/cobaltctl describe volume media-site-42
  $BIN/cobaltctl get volumes -w           # then, in another shell, edit examples/volume.yaml
  $BIN/cobaltctl apply -f examples/clone.yaml
  nfs-ls 'nfs://127.0.0.1/media-site-42?version=4&nfsport=$NFS_PORT'

Logs: $DEMO/{etcd,controller,agent}.log
Stop and remove everything: make demo-down
MSG
