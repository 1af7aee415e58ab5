#!/usr/bin/env bash
# Instructions pharox executes per plain-HTTP keep-alive request (or, with MODE=tunnel-rate,
# per tunnel: CONNECT, echo, close), counted with callgrind: a figure that does not move with
# the machine's noise, for A/B of changes to the relay.
#
#   apt-get install -y valgrind
#   cargo build --release
#   PHAROX_BIN=target/release/pharox benches/http-instructions.sh
#   PHAROX_BIN=/tmp/pharox-before OUT=/tmp/before benches/http-instructions.sh   # keep profiles
#   MODE=tunnel-rate PHAROX_BIN=target/release/pharox benches/http-instructions.sh
#   FLOOR_BIN=target/release/examples/floor-relay benches/http-instructions.sh   # the floor
#
# It starts the shared fleet's origin and upstreams (../shared/bench, see its README), runs
# pharox under callgrind twice (3 000 then 9 000 requests from 8 keep-alive connections of
# the shared load generator) and prints the difference per request, so that start-up and
# shutdown cancel out; one-time set-up inside `OnceCell`s (clock calibration, which runs for
# a set time) is left out of both. pharox and the load generator are pinned as in the shared
# fleet (peers.env): how many requests one wake-up of pharox finds depends on it, and it
# moves the total by some ±10 % between runs of one build (tokio's wake-ups, readiness polls
# and epoll turns). For plain HTTP it also prints the relay's own figure: the inclusive count
# of the connection's request loop (`Relay::run`), which repeats within 0.1 % and is the one to
# A/B a change to the relay with. `callgrind_annotate OUT.9000.cg` shows where it goes.
# With FLOOR_BIN (cargo build --release --example floor-relay) it counts the floor relay
# instead (benches/floor-relay.rs: parse each head once, forward it unchanged), the client
# carrying the upstream's credentials as through HAProxy.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${FLOOR_BIN:-}" ]; then
    : "${PHAROX_BIN:?set PHAROX_BIN to a pharox binary (cargo build --release), or FLOOR_BIN}"
fi
: "${OUT:=${TMPDIR:-/tmp}/pharox-http-instructions}"
MODE=${MODE:-http-rps}
case $MODE in
http-rps) UNIT=request ;;
tunnel-rate) UNIT=tunnel ;;
*) echo "MODE must be http-rps or tunnel-rate" >&2; exit 2 ;;
esac
BENCH=${BENCH:-../shared/bench}
# shellcheck source=/dev/null
source "$BENCH/peers/peers.env"
RUNP="$BENCH/peers/run-peers.sh"
LOAD="$BENCH_TARGET_DIR/release/proxybench"
CONFIG="$OUT.toml"
ADDR=127.0.0.1:18206

cargo build --release -q --manifest-path "$BENCH/proxybench/Cargo.toml" --target-dir "$BENCH_TARGET_DIR"
PEERS="" "$RUNP" start >&2
trap '"$RUNP" stop >&2 || true' EXIT

{
    printf 'listen = "%s"\n\n[admin]\nlisten = "127.0.0.1:18296"\n\n' "$ADDR"
    printf '[[consumers]]\nname = "bench"\npassword = "bench"\npools = ["chain"]\n\n'
    printf '[[pools]]\nname = "chain"\nselector = "round_robin"\n\n'
    for u in $UPSTREAMS; do
        printf '[[pools.proxies]]\nurl = "http://%s@%s"\n\n' "$UPSTREAM_AUTH" "$u"
    done
} > "$CONFIG"

total() { callgrind_annotate "$1" | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'; }
relay() {
    callgrind_annotate --inclusive=yes "$1" |
        awk '/:pharox::proxy::forward::Relay::run::\{\{closure\}\} \[/ { gsub(",", "", $1); if ($1 > m) m = $1 } END { print m + 0 }'
}
setup() {
    callgrind_annotate --inclusive=yes "$1" |
        awk '!/=>/ && /OnceCell<T>::initialize/ { gsub(",", "", $1); if ($1 > m) m = $1 } END { print m + 0 }'
}

if [ -n "${FLOOR_BIN:-}" ]; then
    # shellcheck disable=SC2086 # one argument per upstream
    SERVE=("$FLOOR_BIN" "$ADDR" $UPSTREAMS)
    AUTH=$UPSTREAM_AUTH
else
    SERVE=("$PHAROX_BIN" serve --config "$CONFIG")
    AUTH=bench-pool-chain:bench
fi

for n in 3000 9000; do
    env $(compgen -e | grep '^PHAROX_' | sed 's/^/-u /') RUST_LOG=warn taskset -c "$PROXY_CPU" \
        valgrind --tool=callgrind --callgrind-out-file="$OUT.$n.cg" \
        "${SERVE[@]}" 2> "$OUT.$n.log" &
    pid=$!
    until (echo > "/dev/tcp/${ADDR%:*}/${ADDR#*:}") 2> /dev/null; do sleep 0.2; done
    taskset -c "$LOADGEN_CPU" "$LOAD" load "$MODE" --proxy "$ADDR" --proxy-auth "$AUTH" \
        -c 8 --count "$n" --duration 120 --warmup 0 > /dev/null
    kill -INT "$pid"
    wait "$pid"
done

a=$(($(total "$OUT.3000.cg") - $(setup "$OUT.3000.cg")))
b=$(($(total "$OUT.9000.cg") - $(setup "$OUT.9000.cg")))
echo "instructions per $UNIT: $(((b - a) / 6000))"
if [ -z "${FLOOR_BIN:-}" ] && [ "$MODE" = http-rps ]; then
    echo "of which the relay's request loop: $((($(relay "$OUT.9000.cg") - $(relay "$OUT.3000.cg")) / 6000))"
fi
