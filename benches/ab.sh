#!/usr/bin/env bash
# Cost per relayed event of two or more wazuh-proxy builds, side by side, rounds interleaved:
# proxy CPU (user and system, nanoseconds per event), system calls and context switches per
# 1,000 events, under the same flat-out fleet (proxy on CPU 0, fleet and managers on CPU 1).
#
#   benches/ab.sh LABEL=BINARY[,CONFIG] [LABEL=BINARY[,CONFIG] ...]
#   e.g. benches/ab.sh old=/tmp/old/wazuh-proxy new=target/release/wazuh-proxy
#   A CONFIG file (TOML) replaces the default command line; it must listen on 127.0.0.1:15730
#   with the managers 127.0.0.1:15731 and 127.0.0.1:15732 as backends (admin = "none").
#
# Environment: AGENTS (100), SIZE (event bytes, 256), SECS (per run, 4), ROUNDS (3),
# FLEET (wazuh-fleet binary; default target/release/wazuh-fleet). Needs perf (linux-perf) for
# the system-call count. Every run is bounded by SECS plus the fleet's drain; everything
# started here is stopped on exit. Unlike benches/compare.sh it measures cost, not capacity:
# use it to compare two builds of the proxy, not the proxy with nginx.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
AGENTS=${AGENTS:-100}; SIZE=${SIZE:-256}; SECS=${SECS:-4}; ROUNDS=${ROUNDS:-3}
FLEET=${FLEET:-$ROOT/target/release/wazuh-fleet}
[ $# -ge 1 ] || { sed -n 2,14p "$0"; exit 2; }
[ -x "$FLEET" ] || { echo "ab.sh: $FLEET missing (cargo build --release -p wazuh-proxy-benches)" >&2; exit 1; }
command -v perf >/dev/null || { echo "ab.sh: perf is missing (apt-get install linux-perf)" >&2; exit 1; }
W=$(mktemp -d /tmp/wazuh-ab.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
"$FLEET" keygen --agents "$AGENTS" --out "$W/keys" >/dev/null
M1=127.0.0.1:15731; M2=127.0.0.1:15732; L=127.0.0.1:15730
wait_listen() { for _ in $(seq 100); do ss -ltn | grep -q ":$1 " && return 0; sleep 0.05; done; echo "ab.sh: nothing on $1" >&2; exit 1; }
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
for r in $(seq "$ROUNDS"); do
    for spec in "$@"; do
        label=${spec%%=*}; bin=${spec#*=}; config=""
        case "$bin" in *,*) config=${bin#*,}; bin=${bin%%,*} ;; esac
        PIDS=()
        taskset -c 1 "$FLEET" manager --listen $M1 --keys "$W/keys" --name m1 --sample 16 > /dev/null 2>&1 & PIDS+=($!)
        taskset -c 1 "$FLEET" manager --listen $M2 --keys "$W/keys" --name m2 --sample 16 > /dev/null 2>&1 & PIDS+=($!)
        wait_listen 15731; wait_listen 15732
        if [ -n "$config" ]; then
            RUST_LOG=warn taskset -c 0 "$bin" run --config "$config" 2>"$W/proxy.err" &
        else
            RUST_LOG=warn taskset -c 0 "$bin" run --listen $L --backend $M1 --backend $M2 --balance agent-id --admin none 2>"$W/proxy.err" &
        fi
        pp=$!; PIDS+=($pp)
        wait_listen 15730
        perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pp" -o "$W/perf.txt" & ps=$!
        read -r u0 s0 < <(ticks "$pp")
        out=$(taskset -c 1 nice -n 19 "$FLEET" agents --target $L --keys "$W/keys" --agents "$AGENTS" \
            --event-size "$SIZE" --flat-out --duration "$SECS" --drain 20 --ramp 256 2>/dev/null | tail -n 1)
        read -r u1 s1 < <(ticks "$pp")
        kill -INT "$ps"; wait "$ps" 2>/dev/null || true
        for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
        wait "${PIDS[@]}" 2>/dev/null || true
        sent=$(printf '%s\n' "$out" | tr ' ' '\n' | sed -n 's/^sent=//p')
        sc=$(awk -F, '/raw_syscalls/ {print $1}' "$W/perf.txt"); cs=$(awk -F, '/context-switches/ {print $1}' "$W/perf.txt")
        awk -v l="$label" -v r="$r" -v n="${sent:-0}" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$HZ" -v sc="${sc:-0}" -v cs="${cs:-0}" 'BEGIN {
            if (n == 0) { printf "%s round %d: no events (see the fleet)\n", l, r; exit }
            printf "%-8s round %d: events %d  ns/event user %.0f system %.0f total %.0f  syscalls/1k %.1f  switches/1k %.2f\n",
                l, r, n, u * 1e9 / hz / n, s * 1e9 / hz / n, (u + s) * 1e9 / hz / n, sc * 1000 / n, cs * 1000 / n }'
    done
done
