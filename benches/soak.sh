#!/usr/bin/env bash
# Soak: hold many idle tunnels through one pharox process, then close them, and report what
# each tunnel cost (RSS) and whether every descriptor came back.
#
#   cargo build --release
#   PHAROX_BIN=target/release/pharox benches/soak.sh            # 10 000 tunnels
#   TUNNELS=20000 ROUNDS=3 PHAROX_BIN=target/release/pharox benches/soak.sh
#
# It uses the shared load generator and fleet (../shared/bench: origin, upstreams, pharox
# on fixed loopback ports; see its README). Each round opens TUNNELS tunnels (each verified
# by an echo), holds them, closes them, and prints one JSON line from the load generator
# plus a summary line: RSS per held tunnel, descriptors before / held / after, and the
# pool's live leases after the close (must be 0). Rounds after the first show whether
# memory or descriptors creep.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PHAROX_BIN:?set PHAROX_BIN to a pharox binary (cargo build --release)}"
: "${TUNNELS:=10000}"
: "${ROUNDS:=2}"
: "${HOLD:=10}"
BENCH=${BENCH:-../shared/bench}
export PHAROX_BIN PEERS=pharox
# shellcheck source=/dev/null
source "$BENCH/peers/peers.env"
RUNP="$BENCH/peers/run-peers.sh"
BIN="$BENCH_TARGET_DIR/release/proxybench"

cargo build --release -q --manifest-path "$BENCH/proxybench/Cargo.toml" --target-dir "$BENCH_TARGET_DIR"
"$RUNP" start >&2
trap '"$RUNP" stop >&2 || true' EXIT
PID=$("$RUNP" pid pharox)
ulimit -n "$(ulimit -Hn)"

fds() { ls "/proc/$1/fd" | wc -l; }
leased() {
    curl -s "http://$BENCH_PHAROX_ADMIN_ADDR/api/v1/pools/chain" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["total_leases"])'
}

start_fds=$(fds "$PID")
for round in $(seq 1 "$ROUNDS"); do
    out=$(taskset -c "$LOADGEN_CPU" "$BIN" load idle-tunnels --proxy "$BENCH_PHAROX_ADDR" \
        --proxy-auth "$BENCH_PHAROX_AUTH" --origin "$ORIGIN_ADDR" -c 64 \
        --count "$TUNNELS" --duration 120 --hold "$HOLD" --pid "$PID" --label "pharox-soak-$round")
    echo "$out"
    # Closed tunnels release their leases as their connections end; give them a moment.
    for _ in $(seq 1 50); do [[ $(leased) == 0 ]] && break; sleep 0.1; done
    echo "$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.readline())
p = r.get("proc", {})
print(json.dumps({
    "round": int(sys.argv[1]),
    "tunnels_held": r.get("alive_after_hold"),
    "errors": r.get("error_total"),
    "rss_bytes_per_tunnel": r.get("rss_bytes_per_tunnel"),
    "rss_kb_after_close": p.get("rss_kb_after_close"),
    "fds_start": int(sys.argv[2]),
    "fds_held": p.get("fds_held"),
    "fds_after_close": int(sys.argv[3]),
    "leased_after_close": int(sys.argv[4]),
}))' "$round" "$start_fds" "$(fds "$PID")" "$(leased)"
done
