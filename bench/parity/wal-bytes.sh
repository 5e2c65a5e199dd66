#!/bin/bash
# wal-bytes.sh DAEMON N: the daemon on a fresh state directory (127.0.0.1, ports chosen by
# the system), `strace -f` on it while `DAEMON simulate --devices N` registers, then the
# number of pwrite64 calls and bytes (the WAL and its checkpoints) and the fsync calls.
# Issue 24 (docs/PERFORMANCE.md, "time-ordered registration ids"). Needs strace.
set -u
D=$(readlink -f "$1"); N=$2; S=$(mktemp -d /tmp/wal-bytes.XXXX)
trap 'rm -rf "$S"' EXIT
cat > "$S/c.toml" <<T
[rest]
listen = ["127.0.0.1:0"]
[coap]
listen = ["127.0.0.1:0"]
[state]
dir = "$S"
T
"$D" run -c "$S/c.toml" --ready-file "$S/ready" > "$S/log" 2>&1 &
P=$!
for _ in $(seq 100); do [ -f "$S/ready" ] && break; sleep 0.1; done
COAP=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['coap'][0])" "$S/ready")
strace -f -p "$P" -e trace=pwrite64,fdatasync,fsync -o "$S/strace" -qq 2>/dev/null &
SP=$!; sleep 0.5
timeout 120 "$D" simulate --devices "$N" --server "$COAP" --lifetime 86400 > "$S/sim.log" 2>&1 &
SIM=$!
for _ in $(seq 1200); do grep -q "devices registered (" "$S/sim.log" && break; sleep 0.1; done
kill "$SP"; sleep 0.3
kill -INT "$SIM"; sleep 1; kill "$P"; wait "$P" 2>/dev/null
grep "devices registered (" "$S/sim.log"
awk '/pwrite64\(/ { n++; match($0, /= [0-9]+/); s += substr($0, RSTART+2, RLENGTH-2) }
     /fsync\(|fdatasync\(/ { f++ }
     END { print "pwrite64 calls:", n, "bytes:", s, "fsync calls:", f }' "$S/strace"
