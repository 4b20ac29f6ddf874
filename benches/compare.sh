#!/usr/bin/env bash
# Compares wazuh-proxy with nginx (stream) and HAProxy (mode tcp) on the same agent workloads,
# plus a direct run without any proxy, on loopback only.
#
#   benches/compare.sh [--quick] [--rounds N] [--out FILE] [--no-install] [--no-build]
#                      [--only throughput|latency|echo|idle|storm|churn]
#
# Layout: the proxy under test is pinned to CPU 0 (taskset -c 0); the simulated agents
# (wazuh-fleet) and the two stand-in managers behind the proxy share CPU 1. Each workload runs
# through every proxy in turn, round after round (A/B/C/D, A/B/C/D...), so that drifting
# background load hits them alike; medians over the rounds are reported with the ratio
# wazuh-proxy / nginx.
#
# Workloads (full / --quick):
#   throughput   100 and 1000 agents x 256 B and 4 KB events, flat out, 8 s / 3 s each
#   latency      100 agents x 10 events/s, 256 B, event -> manager echo round trip
#                p50/p99/p99.9, 8 s / 4 s measured after a 1 s warm-up
#   echo         the same round trip with 1000 agents x 10 events/s (10,000 events/s), 10 s / 6 s
#                measured after a 1 s warm-up
#                Round trips of events sent in the warm-up (agents still connecting, the
#                load's core saturated by handshakes) are reported apart: "p99 µs in the
#                warm-up".
#   idle memory  10,000 / 2,000 idle agents (fewer if `ulimit -n` cannot give a proxy two
#                descriptors per agent) that connected and sent their startup: the proxy's
#                VmRSS growth per connected agent 2 s and 30 s after the last one connected;
#                full mode also tries 50,000 agents (one round) when descriptors allow
#   storm        10,000 / 2,000 agents handshaking at the same instant: time until the last
#                startup is acknowledged, and connections per second
#   churn        32 workers each connecting as an agent, sending the startup, waiting for its
#                ACK and closing, over and over for 8 s / 4 s (agents from 8 loopback
#                addresses): new connections per second and proxy CPU per new agent
#
# Tables show the median over the rounds with min-max beside it; each workload is marked
# busy(N) when N compiler processes ran during one of its runs, else quiet.
#
# Every load loop is bounded in time and everything started here is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
ROUNDS=""
OUT=""
INSTALL=1
BUILD=1
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        --only) ONLY=$2; shift ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

if [ "$QUICK" = 1 ]; then
    ROUNDS=${ROUNDS:-1}; TP_SECS=3; LAT_SECS=4; ECHO_SECS=6; CHURN_SECS=4
    IDLE_AGENTS=2000; STORM_AGENTS=2000; BIG_IDLE=0
else
    ROUNDS=${ROUNDS:-3}; TP_SECS=8; LAT_SECS=8; ECHO_SECS=10; CHURN_SECS=8
    IDLE_AGENTS=10000; STORM_AGENTS=10000; BIG_IDLE=50000
fi
# Seconds at the start of the round-trip shapes whose events are reported apart: the agents'
# connection ramp saturates the load's core (handshakes sealed by the fleet, opened by the
# managers), and the events sent meanwhile measure that, not the relay.
RTT_WARMUP=1
# The second idle memory reading, in seconds after the last agent connected.
IDLE_LATE=30
# Agents the churn workers take turns with (each comes back after the other 62 of its worker).
CHURN_AGENTS=2000
CHURN_WORKERS=32
# KINDS (environment) limits the peers, e.g. KINDS="wazuh nginx" while iterating on one;
# RT_PRIO=N runs the proxy, the managers and the agents of the round-trip shapes (latency,
# echo) under SCHED_FIFO priority N, so that other work on the machine (a build) cannot
# preempt them: tails become comparable on a shared machine. Flat-out shapes never run so.
RT_PRIO=${RT_PRIO:-}
RT=()
# WAZUH_ARGS adds arguments to `wazuh-proxy run`, e.g. WAZUH_ARGS="--batch-window 0s";
# the kind "wazuh-alt" runs another build, WAZUH_ALT_BIN, the same way (A/B of two builds).
KINDS=${KINDS:-"wazuh nginx haproxy direct"}
# PORTS (environment) moves the listener and the two managers, e.g. PORTS="16140 16601 16602"
# when another run uses the defaults on the same machine.
read -r LISTEN_PORT M1_PORT M2_PORT <<< "${PORTS:-15140 15601 15602}"
M1=127.0.0.1:$M1_PORT
M2=127.0.0.1:$M2_PORT
NGINX_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so

WORK=$(mktemp -d /tmp/wazuh-compare.XXXXXX)
RESULTS=$WORK/results.tsv
OUT=${OUT:-$WORK/results.md}
: > "$RESULTS"
PIDS=()

want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=()
    [ -n "${SOMAXCONN_OLD:-}" ] && echo "$SOMAXCONN_OLD" > /proc/sys/net/core/somaxconn 2>/dev/null
    [ -n "${SYN_BACKLOG_OLD:-}" ] && echo "$SYN_BACKLOG_OLD" > /proc/sys/net/ipv4/tcp_max_syn_backlog 2>/dev/null
    true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Tools

if [ "$INSTALL" = 1 ]; then
    if ! command -v nginx >/dev/null || [ ! -f "$NGINX_MODULE" ] || ! command -v haproxy >/dev/null; then
        log "installing nginx, libnginx-mod-stream and haproxy"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y nginx libnginx-mod-stream haproxy
    fi
fi
for tool in nginx haproxy taskset ss python3; do
    command -v "$tool" >/dev/null || { echo "compare.sh: $tool is missing" >&2; exit 1; }
done
[ -f "$NGINX_MODULE" ] || { echo "compare.sh: $NGINX_MODULE is missing (libnginx-mod-stream)" >&2; exit 1; }

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$BUILD" = 1 ]; then
    log "building wazuh-proxy and wazuh-fleet (release)"
    (cd "$ROOT" && cargo build --release -p wazuh-proxy --bin wazuh-proxy -p wazuh-proxy-benches --bin wazuh-fleet)
fi
PROXY_BIN=$TARGET_DIR/release/wazuh-proxy
FLEET_BIN=$TARGET_DIR/release/wazuh-fleet
[ -x "$PROXY_BIN" ] && [ -x "$FLEET_BIN" ] || { echo "compare.sh: binaries missing under $TARGET_DIR/release" >&2; exit 1; }

# Descriptors: each idle agent costs one in the fleet, two in the proxy, one in a manager.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
# The ephemeral port range is left alone: widened below 15140 it lets a client socket take
# the proxy's or a manager's port and the next bind fails. TIME_WAIT ports are reused quickly
# so that storms after storms still find free ports.
echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse 2>/dev/null || true
# A listen backlog is capped by somaxconn (4096 by default): with it, a storm of 10,000 SYNs
# overflows every listener and the storm measures the 1 s SYN retransmission instead of the
# proxy. All three proxies (and the managers) ask for a 65535 backlog.
SOMAXCONN_OLD=$(cat /proc/sys/net/core/somaxconn)
SYN_BACKLOG_OLD=$(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)
echo 65535 > /proc/sys/net/core/somaxconn 2>/dev/null || true
echo 65535 > /proc/sys/net/ipv4/tcp_max_syn_backlog 2>/dev/null || true
log "nofile=$NOFILE ports=$(tr '\t' ' ' < /proc/sys/net/ipv4/ip_local_port_range) somaxconn=$(cat /proc/sys/net/core/somaxconn) (was $SOMAXCONN_OLD) syn_backlog=$(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)"

# A proxy holds two descriptors per agent (agent side and manager side).
MAX_AGENTS=$(( (NOFILE - 200) / 2 ))
if [ "$IDLE_AGENTS" -gt "$MAX_AGENTS" ]; then
    log "ulimit -n $NOFILE (cannot be raised here) caps agents through a proxy at $MAX_AGENTS"
    IDLE_AGENTS=$MAX_AGENTS
fi
[ "$STORM_AGENTS" -gt "$MAX_AGENTS" ] && STORM_AGENTS=$MAX_AGENTS
PROXY_MAXCONN=$(( MAX_AGENTS + 50 ))

KEYS=$WORK/client.keys
"$FLEET_BIN" keygen --agents $(( BIG_IDLE > IDLE_AGENTS ? BIG_IDLE : IDLE_AGENTS )) --out "$KEYS" >/dev/null

# ---------------------------------------------------------------------------------------------
# Proxies

write_configs() {
    cat > "$WORK/nginx.conf" <<EOF
load_module $NGINX_MODULE;
daemon off;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections $(( NOFILE - 50 )); multi_accept on; }
stream {
    upstream managers {
        hash \$remote_addr consistent;
        server $M1;
        server $M2;
    }
    server {
        listen 127.0.0.1:$LISTEN_PORT backlog=65535;
        proxy_pass managers;
        proxy_timeout 10m;
    }
}
EOF
    cat > "$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $PROXY_MAXCONN
    log stderr format raw local0 warning
defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    maxconn $PROXY_MAXCONN
frontend agents
    bind 127.0.0.1:$LISTEN_PORT backlog 65535
    default_backend managers
backend managers
    balance source
    server m1 $M1
    server m2 $M2
EOF
}

wait_listen() {
    local port=$1
    for _ in $(seq 100); do
        ss -ltnH "sport = :$port" | grep -q . && return 0
        sleep 0.05
    done
    echo "compare.sh: nothing listens on port $port" >&2
    return 1
}

# start_proxy KIND: sets PROXY_PID (the process whose memory is measured) and TARGET.
start_proxy() {
    local kind=$1
    PROXY_PID=""
    PROXY_MAIN=""
    case "$kind" in
        wazuh|wazuh-alt)
            local bin=$PROXY_BIN
            [ "$kind" = wazuh-alt ] && bin=${WAZUH_ALT_BIN:?WAZUH_ALT_BIN names the other build}
            # No admin API: a benchmark does not need it, and its port may be taken on a shared machine.
            RUST_LOG=warn "${RT[@]}" taskset -c 0 "$bin" run --listen 127.0.0.1:$LISTEN_PORT \
                --backend $M1 --backend $M2 --balance agent-id --admin none ${WAZUH_ARGS:-} 2>>"$WORK/wazuh-proxy.log" &
            PROXY_MAIN=$!; PROXY_PID=$PROXY_MAIN ;;
        nginx)
            "${RT[@]}" taskset -c 0 nginx -c "$WORK/nginx.conf" -p "$WORK" 2>>"$WORK/nginx.log" &
            PROXY_MAIN=$! ;;
        haproxy)
            "${RT[@]}" taskset -c 0 haproxy -f "$WORK/haproxy.cfg" -db 2>>"$WORK/haproxy.log" &
            PROXY_MAIN=$!; PROXY_PID=$PROXY_MAIN ;;
        direct)
            TARGET=$M1; return 0 ;;
    esac
    PIDS+=("$PROXY_MAIN")
    TARGET=127.0.0.1:$LISTEN_PORT
    wait_listen $LISTEN_PORT
    if [ "$kind" = nginx ]; then
        # The worker does the work (and holds the memory), not the master.
        for _ in $(seq 50); do
            PROXY_PID=$(pgrep -P "$PROXY_MAIN" | head -1 || true)
            [ -n "$PROXY_PID" ] && break
            sleep 0.05
        done
    fi
}

stop_proxy() {
    [ -n "${PROXY_MAIN:-}" ] && stop_pid "$PROXY_MAIN"
    PIDS=("${PIDS[@]/$PROXY_MAIN}")
    PROXY_MAIN=""
    # Let closing connections leave the port before the next run binds it.
    for _ in $(seq 50); do ss -ltnH "sport = :$LISTEN_PORT" | grep -q . || break; sleep 0.1; done
}

MANAGER_PIDS=()
start_managers() {
    local i=0 addr
    MANAGER_PIDS=()
    for addr in $M1 $M2; do
        i=$((i + 1))
        "${RT[@]}" taskset -c 1 "$FLEET_BIN" manager --listen "$addr" --keys "$KEYS" --name "m$i" "$@" \
            > "$WORK/manager-$i.out" 2>>"$WORK/manager-$i.err" &
        MANAGER_PIDS+=($!)
        PIDS+=($!)
    done
    wait_listen "$M1_PORT"
    wait_listen "$M2_PORT"
}

# stop_managers: prints the two summary lines.
stop_managers() {
    local pid
    for pid in "${MANAGER_PIDS[@]}"; do stop_pid "$pid"; PIDS=("${PIDS[@]/$pid}"); done
    grep -h '^manager-summary' "$WORK/manager-1.out" "$WORK/manager-2.out" || true
}

field() { # field KEY LINE...
    local key=$1; shift
    printf '%s\n' "$@" | grep -o "\b$key=[^ ]*" | head -1 | cut -d= -f2
}
sum_field() { # sum_field KEY: sums KEY over stdin lines
    grep -o "\b$1=[^ ]*" | cut -d= -f2 | awk '{s+=$1} END {print s+0}'
}

record() { # record WORKLOAD KIND ROUND METRIC VALUE
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(cut -d' ' -f1 /proc/loadavg)" >> "$RESULTS"
}

CLK_TCK=$(getconf CLK_TCK)
proc_cpu() { # utime + stime of a process in clock ticks (0 without a process)
    [ -n "$1" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
    sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'
}

busy_note() {
    local n
    n=$(pgrep -c -x 'rustc|cargo|cc1|ld' 2>/dev/null || true)
    local rt=""
    [ ${#RT[@]} -gt 0 ] && rt=",fifo"
    [ "${n:-0}" -gt 0 ] && echo "busy($n)$rt" || echo "quiet$rt"
}

# run_case WORKLOAD KIND ROUND -- manager args -- fleet args
run_case() {
    local workload=$1 kind=$2 round=$3; shift 3
    local margs=() fargs=()
    RT=()
    case "$workload" in
        latency_*|echo_*) [ -n "$RT_PRIO" ] && RT=(chrt -f "$RT_PRIO") ;;
    esac
    shift # --
    while [ $# -gt 0 ] && [ "$1" != -- ]; do margs+=("$1"); shift; done
    shift # --
    fargs=("$@")
    start_managers "${margs[@]}"
    if ! start_proxy "$kind"; then
        stop_proxy
        stop_managers > /dev/null
        echo "$workload $kind round=$round: the proxy did not start (see $WORK/$kind.log)" >> "$WORK/runs.log"
        LAST_OUT="" LAST_MSUM="" LAST_RC=99 LAST_BUSY=$(busy_note)
        return 0
    fi
    local busy out rc=0
    busy=$(busy_note)
    local f=()
    for a in "${fargs[@]}"; do f+=("${a//@PID@/${PROXY_PID:-0}}"); done
    local cpu0 cpu1
    cpu0=$(proc_cpu "${PROXY_PID:-}")
    out=$("${RT[@]}" taskset -c 1 nice -n "${FLEET_NICE:-0}" "$FLEET_BIN" "${f[0]}" --target "$TARGET" --keys "$KEYS" "${f[@]:1}" 2>>"$WORK/fleet.err") || rc=$?
    cpu1=$(proc_cpu "${PROXY_PID:-}")
    # CPU seconds the proxy used during the run (user + system).
    LAST_CPU=$(awk -v a="$cpu0" -v b="$cpu1" -v t="$CLK_TCK" 'BEGIN { printf "%.3f", (b - a) / t }')
    stop_proxy
    local msum
    msum=$(stop_managers)
    echo "$workload $kind round=$round rc=$rc $busy | $out" >> "$WORK/runs.log"
    printf '%s\n' "$msum" | sed "s/^/    /" >> "$WORK/runs.log"
    LAST_OUT=$out
    LAST_MSUM=$msum
    LAST_RC=$rc
    LAST_BUSY=$busy
}

# ---------------------------------------------------------------------------------------------
# Workloads

write_configs
log "work dir $WORK; rounds=$ROUNDS quick=$QUICK; load average $(cut -d' ' -f1-3 /proc/loadavg)"
START=$(date +%s)

want throughput && for agents in 100 1000; do
    for size in 256 4096; do
        w="throughput_${agents}x${size}"
        for round in $(seq "$ROUNDS"); do
            for kind in $KINDS; do
                # The agents yield CPU 1 to the managers (nice): otherwise a proxy that
                # absorbs data quickly lets the agents starve the managers of CPU 1, and the
                # run measures the scheduler rather than the path.
                FLEET_NICE=19 run_case "$w" "$kind" "$round" -- --sample 16 -- \
                    agents --agents $agents --event-size $size --flat-out --duration $TP_SECS \
                    --drain 20 --ramp 256
                sent_frames=$(field frames "$LAST_OUT")
                got_frames=$(printf '%s\n' "$LAST_MSUM" | sum_field frames)
                record "$w" "$kind" "$round" events_per_s "$(field events_per_s "$LAST_OUT")"
                record "$w" "$kind" "$round" mb_per_s "$(field mb_per_s "$LAST_OUT")"
                record "$w" "$kind" "$round" missing_frames "$(( ${sent_frames:-0} - ${got_frames:-0} ))"
                record "$w" "$kind" "$round" busy "$LAST_BUSY"
                record "$w" "$kind" "$round" fairness "$(awk -v a="$(field agent_events_min "$LAST_OUT")" \
                    -v m="$(field agent_events_median "$LAST_OUT")" 'BEGIN { if (m > 0) printf "%.2f", a / m }')"
                record "$w" "$kind" "$round" elapsed_s "$(field elapsed_s "$LAST_OUT")"
                if [ "$kind" != direct ]; then
                    elapsed=$(field elapsed_s "$LAST_OUT")
                    record "$w" "$kind" "$round" proxy_cpu_pct \
                        "$(awk -v c="$LAST_CPU" -v e="${elapsed:-0}" 'BEGIN { if (e > 0) printf "%.1f", 100 * c / e }')"
                    record "$w" "$kind" "$round" events_per_cpu_s \
                        "$(awk -v c="$LAST_CPU" -v n="$(field sent "$LAST_OUT")" 'BEGIN { if (c > 0) printf "%.0f", n / c }')"
                fi
                log "$w $kind round $round: $(field events_per_s "$LAST_OUT") ev/s $(field mb_per_s "$LAST_OUT") MB/s, frames sent $sent_frames received $got_frames, rc=$LAST_RC $LAST_BUSY"
            done
        done
    done
done

latency_case() { # latency_case WORKLOAD AGENTS SECONDS
    local w=$1 agents=$2 secs=$3
    for round in $(seq "$ROUNDS"); do
        for kind in $KINDS; do
            run_case "$w" "$kind" "$round" -- --echo -- \
                latency --agents "$agents" --rate 10 --event-size 256 --ramp 256 \
                --duration $((secs + RTT_WARMUP)) --warmup "$RTT_WARMUP"
            [ "$LAST_RC" = 99 ] && continue
            record "$w" "$kind" "$round" rtt_p50_us "$(field rtt_p50_us "$LAST_OUT")"
            record "$w" "$kind" "$round" rtt_p99_us "$(field rtt_p99_us "$LAST_OUT")"
            record "$w" "$kind" "$round" rtt_p999_us "$(field rtt_p999_us "$LAST_OUT")"
            record "$w" "$kind" "$round" warmup_rtt_p99_us "$(field warmup_rtt_p99_us "$LAST_OUT")"
            record "$w" "$kind" "$round" lost "$(printf '%s\n' "$LAST_MSUM" | sum_field lost)"
            record "$w" "$kind" "$round" busy "$LAST_BUSY"
            [ "$kind" != direct ] && record "$w" "$kind" "$round" proxy_cpu_pct \
                "$(awk -v c="$LAST_CPU" -v e="$((secs + RTT_WARMUP))" 'BEGIN { printf "%.1f", 100 * c / e }')"
            log "$w $kind round $round: p50 $(field rtt_p50_us "$LAST_OUT") us p99 $(field rtt_p99_us "$LAST_OUT") us p99.9 $(field rtt_p999_us "$LAST_OUT") us rc=$LAST_RC $LAST_BUSY"
        done
    done
}
want latency && latency_case latency_100x10eps 100 "$LAT_SECS"
want echo && latency_case echo_1000x10eps 1000 "$ECHO_SECS"

idle_case() { # idle_case AGENTS ROUNDS SOURCES
    local n=$1 rounds=$2 sources=$3 w="idle_${1}"
    for round in $(seq "$rounds"); do
        for kind in $KINDS; do
            [ "$kind" = direct ] && continue
            # Long enough for the ramp, the reading at 2 s and the one at $IDLE_LATE s.
            run_case "$w" "$kind" "$round" -- -- \
                idle --agents "$n" --duration $(( IDLE_LATE + 6 + n / 2000 )) --ramp 512 \
                --rss-pid @PID@ --rss-late "$IDLE_LATE" --source-ips "$sources" --recv-timeout 20
            [ "$LAST_RC" = 99 ] && continue
            record "$w" "$kind" "$round" rss_per_agent_bytes "$(field rss_per_agent_bytes "$LAST_OUT")"
            record "$w" "$kind" "$round" rss_late_per_agent_bytes "$(field rss_late_per_agent_bytes "$LAST_OUT")"
            record "$w" "$kind" "$round" busy "$LAST_BUSY"
            record "$w" "$kind" "$round" connected "$(field connected "$LAST_OUT")"
            record "$w" "$kind" "$round" rss_before_kb "$(field rss_before_kb "$LAST_OUT")"
            log "$w $kind round $round: $(field rss_per_agent_bytes "$LAST_OUT") B/agent at 2 s, $(field rss_late_per_agent_bytes "$LAST_OUT") at ${IDLE_LATE} s, connected $(field connected "$LAST_OUT")/$n, rc=$LAST_RC $LAST_BUSY"
        done
    done
}
want idle && idle_case "$IDLE_AGENTS" "$ROUNDS" 0

w=storm_${STORM_AGENTS}
want storm && for round in $(seq "$ROUNDS"); do
    for kind in $KINDS; do
        run_case "$w" "$kind" "$round" -- -- \
            connect-storm --agents "$STORM_AGENTS" --ramp 0 --duration 30 --reconnect-interval 1 \
            --recv-timeout 20
        record "$w" "$kind" "$round" all_acked_ms "$(field all_acked_ms "$LAST_OUT")"
        record "$w" "$kind" "$round" conns_per_s "$(field conns_per_s "$LAST_OUT")"
        record "$w" "$kind" "$round" acked "$(field acked "$LAST_OUT")"
        record "$w" "$kind" "$round" busy "$LAST_BUSY"
        if [ "$kind" != direct ]; then
            record "$w" "$kind" "$round" proxy_cpu_us_per_conn \
                "$(awk -v c="$LAST_CPU" -v n="$STORM_AGENTS" 'BEGIN { printf "%.0f", 1e6 * c / n }')"
        fi
        log "$w $kind round $round: all acked in $(field all_acked_ms "$LAST_OUT") ms ($(field acked "$LAST_OUT") acked), rc=$LAST_RC $LAST_BUSY"
    done
done

w=churn_${CHURN_WORKERS}w
want churn && for round in $(seq "$ROUNDS"); do
    for kind in $KINDS; do
        # 8 source addresses: the proxy's default per-source limit (10,000 new connections/s)
        # and one address's ephemeral ports must not be what is measured.
        run_case "$w" "$kind" "$round" -- -- \
            churn --agents "$CHURN_AGENTS" --workers "$CHURN_WORKERS" --duration "$CHURN_SECS" \
            --source-ips 8 --recv-timeout 5 --drain 5
        [ "$LAST_RC" = 99 ] && continue
        conns=$(field conns "$LAST_OUT")
        record "$w" "$kind" "$round" conns_per_s "$(field conns_per_s "$LAST_OUT")"
        record "$w" "$kind" "$round" handshake_p50_us "$(field handshake_p50_us "$LAST_OUT")"
        record "$w" "$kind" "$round" handshake_p99_us "$(field handshake_p99_us "$LAST_OUT")"
        record "$w" "$kind" "$round" failed_attempts "$(field failed_attempts "$LAST_OUT")"
        record "$w" "$kind" "$round" busy "$LAST_BUSY"
        if [ "$kind" != direct ]; then
            record "$w" "$kind" "$round" proxy_cpu_us_per_conn \
                "$(awk -v c="$LAST_CPU" -v n="${conns:-0}" 'BEGIN { if (n > 0) printf "%.1f", 1e6 * c / n }')"
            record "$w" "$kind" "$round" proxy_cpu_pct \
                "$(awk -v c="$LAST_CPU" -v e="$(field elapsed_s "$LAST_OUT")" 'BEGIN { if (e > 0) printf "%.1f", 100 * c / e }')"
        fi
        log "$w $kind round $round: $(field conns_per_s "$LAST_OUT") conn/s, $conns conns, failed $(field failed_attempts "$LAST_OUT"), proxy CPU ${LAST_CPU}s, rc=$LAST_RC $LAST_BUSY"
    done
done

if [ "$BIG_IDLE" -gt 0 ] && want idle; then
    # 50,000 agents from one source address would exhaust its ephemeral ports towards one
    # listener: spread them over 8 loopback addresses. Each proxy needs 2 descriptors per agent.
    if [ "$MAX_AGENTS" -ge "$BIG_IDLE" ]; then
        idle_case "$BIG_IDLE" 1 8
    else
        log "skipping $BIG_IDLE idle agents: ulimit -n is $NOFILE, enough for $MAX_AGENTS through a proxy"
        echo "skipped idle_$BIG_IDLE: ulimit -n $NOFILE" >> "$WORK/runs.log"
    fi
fi

END=$(date +%s)
log "workloads took $(( END - START )) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------------------------
# Medians and ratios

python3 - "$RESULTS" "$OUT" "$QUICK" "$ROUNDS" "$(( END - START ))" <<'EOF'
import sys, statistics, collections
path, out, quick, rounds, secs = sys.argv[1:6]
rows = collections.defaultdict(list)
busy = collections.defaultdict(list)
loads = []
for line in open(path):
    w, kind, rnd, metric, value, load = line.rstrip("\n").split("\t")
    loads.append(float(load))
    if metric == "busy":
        busy[w].append(value)
        continue
    try:
        rows[(w, metric, kind)].append(float(value))
    except ValueError:
        pass
shown = [
    ("events_per_s", "events/s", True), ("mb_per_s", "MB/s", True),
    ("proxy_cpu_pct", "proxy CPU % of its core", False),
    ("events_per_cpu_s", "events per proxy CPU-second", True),
    ("elapsed_s", "seconds incl. drain", None),
    ("fairness", "slowest agent / median agent", True),
    ("missing_frames", "frames sent - received", None),
    ("rtt_p50_us", "p50 µs", False), ("rtt_p99_us", "p99 µs", False),
    ("rtt_p999_us", "p99.9 µs", False),
    ("warmup_rtt_p99_us", "p99 µs in the warm-up", False),
    ("lost", "events lost", None),
    ("rss_per_agent_bytes", "RSS bytes / idle agent at 2 s", False),
    ("rss_late_per_agent_bytes", "RSS bytes / idle agent at 30 s", False),
    ("rss_before_kb", "proxy RSS before, kB", False), ("connected", "agents connected", None),
    ("all_acked_ms", "ms until all acked", False),
    ("proxy_cpu_us_per_conn", "proxy CPU µs per new agent", False), ("conns_per_s", "connections/s", True),
    ("handshake_p50_us", "connect-to-ACK p50 µs", False),
    ("handshake_p99_us", "connect-to-ACK p99 µs", False),
    ("failed_attempts", "failed attempts", None),
]
kinds = ["wazuh", "nginx", "haproxy", "direct"]
alt = any(k == "wazuh-alt" for (_, _, k) in rows)
workloads = []
for (w, _, _) in rows:
    if w not in workloads:
        workloads.append(w)
lines = ["| workload | metric | wazuh-proxy | nginx | HAProxy | direct | wazuh / nginx | wazuh / HAProxy | machine |"
         + (" wazuh-alt | alt / nginx |" if alt else ""),
         "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |" + (" ---: | ---: |" if alt else "")]
def num(v):
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"
def fmt(v):
    # Median, with min-max over the rounds when there was more than one.
    if not v: return "n/a"
    m = num(statistics.median(v))
    if len(v) > 1 and min(v) != max(v):
        m += f" ({num(min(v))}–{num(max(v))})"
    return m
def marker(w):
    if not busy.get(w): return "?"
    rt = ",fifo" if any(x.endswith(",fifo") for x in busy[w]) else ""
    b = [x.removesuffix(",fifo") for x in busy[w]]
    b = [x for x in b if x != "quiet"]
    return (max(b, key=lambda x: int(x[5:-1])) if b else "quiet") + rt
for w in workloads:
    for metric, label, _ in shown:
        vals = {k: rows.get((w, metric, k)) for k in kinds}
        if not any(vals.values()) and not rows.get((w, metric, "wazuh-alt")): continue
        med = {k: (statistics.median(v) if v else None) for k, v in vals.items()}
        def ratio(a, b):
            if a is None or b in (None, 0): return "n/a"
            return f"{a / b:.2f}"
        lines.append(f"| {w} | {label} | " + " | ".join(fmt(vals[k]) for k in kinds)
                     + f" | {ratio(med['wazuh'], med['nginx'])} | {ratio(med['wazuh'], med['haproxy'])} | {marker(w)} |"
                     + (f" {fmt(rows.get((w, metric, 'wazuh-alt')))} | "
                        f"{ratio(statistics.median(rows[(w, metric, 'wazuh-alt')]) if rows.get((w, metric, 'wazuh-alt')) else None, med['nginx'])} |" if alt else ""))
noisy = sorted(w for w, v in busy.items() if any(x.removesuffix(",fifo") != "quiet" for x in v))
fifo = sorted(w for w, v in busy.items() if any(x.endswith(",fifo") for x in v))
text = "\n".join(lines)
text += (f"\n\nMedians over {rounds} round(s) (min–max in brackets; {'quick' if quick == '1' else 'full'} mode), "
         f"{secs} s of workloads; load average during runs {min(loads):.2f}..{max(loads):.2f}.\n")
if fifo:
    text += "Run under SCHED_FIFO (RT_PRIO): " + ", ".join(fifo) + ".\n"
if noisy:
    text += "Compilers were running during some runs of: " + ", ".join(noisy) + " (busy machine: indicative only).\n"
open(out, "w").write(text)
print(text)
EOF
log "results: $OUT; per-run lines: $WORK/runs.log"
