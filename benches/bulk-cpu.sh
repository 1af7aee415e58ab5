#!/usr/bin/env bash
# CPU per GB through a tunnel, split into the proxy's own user and kernel time and what the
# rest of the chain (the shared fleet's origin and upstreams, on the proxy's CPU) spent for
# the same bytes, for one or more pharox builds and HAProxy, taking turns.
#
#   apt-get install -y haproxy
#   cargo build --release
#   PHAROX_BIN=target/release/pharox benches/bulk-cpu.sh
#   PHAROX_BIN="/tmp/a/pharox /tmp/b/pharox" ROUNDS=5 benches/bulk-cpu.sh   # A/B two builds
#
# It starts the shared fleet (../shared/bench, see its README) with HAProxy, then each
# pharox binary on a port of its own (the same pool as the shared script: round robin over
# the four upstreams), and per round runs the shared load generator's tunnel-throughput
# (32 tunnels, DURATION seconds, no warm-up) through each proxy in turn. Per run it prints
# MB/s, then ms of CPU per GB: the proxy's user and kernel time (`/proc/PID/stat`), their
# sum, the neighbours' (origin and upstreams) and the chain's total. On loopback a send runs
# the receiver's TCP processing in the sender's context, so a change that moves work between
# the proxy and its neighbours shows in the split and not in the proxy's figure alone.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PHAROX_BIN:?set PHAROX_BIN to one or more pharox binaries (cargo build --release)}"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
BENCH=${BENCH:-../shared/bench}
# shellcheck source=/dev/null
source "$BENCH/peers/peers.env"
RUNP="$BENCH/peers/run-peers.sh"
LOAD="$BENCH_TARGET_DIR/release/proxybench"
OUT=${OUT:-${TMPDIR:-/tmp}/pharox-bulk-cpu}
TCK=$(getconf CLK_TCK)

cargo build --release -q --manifest-path "$BENCH/proxybench/Cargo.toml" --target-dir "$BENCH_TARGET_DIR"
PEERS=haproxy "$RUNP" start >&2
PIDS=()
stop() {
    for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
    "$RUNP" stop >&2 || true
}
trap stop EXIT

# One pharox per binary, on 18230, 18231, …
NAMES=() ADDRS=() PROCS=()
i=0
for bin in $PHAROX_BIN; do
    addr=127.0.0.1:$((18230 + i))
    {
        printf 'listen = "%s"\n\n[admin]\nlisten = "127.0.0.1:%d"\n\n' "$addr" $((18330 + i))
        printf '[[consumers]]\nname = "bench"\npassword = "bench"\npools = ["chain"]\n\n'
        printf '[[pools]]\nname = "chain"\nselector = "round_robin"\n\n'
        for u in $UPSTREAMS; do
            printf '[[pools.proxies]]\nurl = "http://%s@%s"\n\n' "$UPSTREAM_AUTH" "$u"
        done
    } > "$OUT.$i.toml"
    env $(compgen -e | grep '^PHAROX_' | sed 's/^/-u /') RUST_LOG=warn taskset -c "$PROXY_CPU" \
        "$bin" serve --config "$OUT.$i.toml" > "$OUT.$i.log" 2>&1 &
    PIDS+=($!)
    until (echo > "/dev/tcp/${addr%:*}/${addr#*:}") 2> /dev/null; do sleep 0.2; done
    NAMES+=("pharox$i") ADDRS+=("$addr|bench-pool-chain:bench") PROCS+=("${PIDS[-1]}")
    i=$((i + 1))
done
NAMES+=(haproxy) ADDRS+=("$HAPROXY_ADDR|$UPSTREAM_AUTH") PROCS+=("$("$RUNP" pid haproxy)")
NEIGHBOURS=$(for n in origin upstream1 upstream2 upstream3 upstream4; do "$RUNP" pid "$n"; done)

ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }
neighbour_ticks() {
    for p in $NEIGHBOURS; do awk '{ print $14 + $15 }' "/proc/$p/stat"; done | awk '{ s += $1 } END { print s }'
}

echo "# proxy MB/s | ms of CPU per GB: proxy user + kernel = proxy | neighbours | chain"
for r in $(seq "$ROUNDS"); do
    for k in "${!NAMES[@]}"; do
        addr=${ADDRS[$k]%%|*} auth=${ADDRS[$k]#*|} pid=${PROCS[$k]}
        read -r u0 s0 < <(ticks "$pid")
        n0=$(neighbour_ticks)
        bytes=$(taskset -c "$LOADGEN_CPU" "$LOAD" load tunnel-throughput --proxy "$addr" \
            --proxy-auth "$auth" -c 32 --duration "$DURATION" --warmup 0 |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes"])')
        read -r u1 s1 < <(ticks "$pid")
        n1=$(neighbour_ticks)
        python3 - "$r" "${NAMES[$k]}" "$bytes" "$DURATION" "$TCK" "$u0" "$s0" "$u1" "$s1" "$n0" "$n1" << 'EOF'
import sys
r, name, b, d, tck, u0, s0, u1, s1, n0, n1 = sys.argv[1:]
gb = int(b) / 1e9
ms = lambda t: int(t) / int(tck) * 1e3 / gb
u, s, n = ms(int(u1) - int(u0)), ms(int(s1) - int(s0)), ms(int(n1) - int(n0))
print(f"{r} {name:8} {int(b) / 1e6 / float(d):7.0f} MB/s | {u:4.0f} + {s:4.0f} = {u + s:4.0f} | {n:4.0f} | {u + s + n:5.0f}")
EOF
    done
done
