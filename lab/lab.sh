#!/usr/bin/env bash
# HA lab for wazuh-proxy: two load-balancer nodes (wazuh-proxy + keepalived sharing a VIP), two
# stand-in managers and a fleet of simulated agents, each in its own network namespace on one
# host, joined by a bridge. See lab/README.md.
#
#   lab/lab.sh up | down | status | smoke | chaos [--events N --seconds T]
#   lab/lab.sh scenario NAME     (proxy-kill keepalived-kill link-flap partition restart
#                                 upgrade manager-kill blackhole refusing-manager, or "all")
#
# Runs as root. Addresses come from 198.18.0.0/24 only (RFC 2544 benchmarking space); nothing is
# routed to the host's interfaces. Every process the lab starts has a pid file under $RUN and
# `down` kills only those. Knobs (environment): see the defaults below.
set -euo pipefail

LAB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$LAB/.." && pwd)
RUN=${WPLAB_RUN:-/tmp/wplab}
BIN=${WPLAB_BIN:-$ROOT/target/debug}
ADVERT=${WPLAB_ADVERT:-1}          # VRRP advert interval (s); below 1 needs VRRPv3 (used)
FALL=${WPLAB_FALL:-2}              # vrrp_script (1 s interval) failures before FAULT
FAST=${WPLAB_FAST:-0}              # 1: also a 100 ms external health check via track_file
FAST_MS=${WPLAB_FAST_MS:-100}      # its period
FAST_FALL=${WPLAB_FAST_FALL:-3}    # its failures before FAULT
AGENTS=${WPLAB_AGENTS:-20}
RATE=${WPLAB_RATE:-10}             # events per second per agent
RETRY=${WPLAB_RETRY:-1}            # agents' retry_interval (s); wazuh-agentd's default is 10
SEED=${WPLAB_SEED:-}
USER_TIMEOUT=${WPLAB_USER_TIMEOUT:-} # the proxies' manager_user_timeout (empty: its default, 10s)
REMOVED=666                        # the agent ID both managers refuse (a removed agent)

PREFIX=wplab
NODES=(lb1 lb2 m1 m2 agents)
declare -A ADDR=([lb1]=198.18.0.11 [lb2]=198.18.0.12 [m1]=198.18.0.21 [m2]=198.18.0.22 [agents]=198.18.0.31)
VIP=198.18.0.100
BR=$PREFIX-br

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf '!!! lab: %s\n' "$*" >&2
    exit 1
}
ns() { echo "$PREFIX-$1"; }
inns() {
    local n=$1
    shift
    ip netns exec "$(ns "$n")" "$@"
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }

# ---------------------------------------------------------------- prerequisites

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, keepalived)"; }

install_packages() {
    local missing=()
    command -v ip >/dev/null 2>&1 || missing+=(iproute2)
    command -v keepalived >/dev/null 2>&1 || [ -x /usr/sbin/keepalived ] || missing+=(keepalived)
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get"
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

binaries() {
    if [ -z "${WPLAB_BIN:-}" ] && [ "${WPLAB_NO_BUILD:-0}" != 1 ] && command -v cargo >/dev/null; then
        say "building wazuh-proxy and wazuh-fleet (debug)"
        (cd "$ROOT" && cargo build -q -p wazuh-proxy -p wazuh-proxy-benches --bin wazuh-proxy --bin wazuh-fleet)
    fi
    [ -x "$BIN/wazuh-proxy" ] || die "no $BIN/wazuh-proxy (build it, or set WPLAB_BIN)"
    [ -x "$BIN/wazuh-fleet" ] || die "no $BIN/wazuh-fleet (build it, or set WPLAB_BIN)"
}

# ---------------------------------------------------------------- processes

# start NAME NODE CMD...: runs CMD in NODE's namespace, in its own session, logging to
# $RUN/NAME.log, pid in $RUN/NAME.pid.
start() {
    local name=$1 node=$2
    shift 2
    ip netns exec "$(ns "$node")" setsid "$@" >>"$RUN/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
    # not a job of this shell: no "Killed" notices when the lab kills it on purpose
    disown $!
}

alive() {
    local pid
    [ -f "$RUN/$1.pid" ] && pid=$(cat "$RUN/$1.pid") && kill -0 "$pid" 2>/dev/null
}

# stop NAME [SIGNAL]: signals the process of a pid file and waits (at most 5 s) for it to exit.
stop() {
    local name=$1 sig=${2:-TERM} pid i
    [ -f "$RUN/$name.pid" ] || return 0
    pid=$(cat "$RUN/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill "-$sig" "$pid" 2>/dev/null || true
        for ((i = 0; i < 250; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.02
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.05
        fi
    fi
    rm -f "$RUN/$name.pid"
}

# waits (bounded) until a TCP port answers inside a namespace.
wait_port() {
    local node=$1 addr=$2 port=$3 i
    for ((i = 0; i < 100; i++)); do
        inns "$node" bash -c "exec 3<>/dev/tcp/$addr/$port" 2>/dev/null && return 0
        sleep 0.05
    done
    die "$addr:$port did not answer in $node within 5 s"
}

proxy_start() {
    local n=$1
    alive "proxy-$n" && return 0
    start "proxy-$n" "$n" "$BIN/wazuh-proxy" run --config "$RUN/proxy.toml" --upgrade-socket "$RUN/upgrade-$n.sock"
}

proxy_ready() { wait_port "$1" 127.0.0.1 9514; }

keepalived_start() {
    local n=$1
    alive "keepalived-$n" && return 0
    start "keepalived-$n" "$n" keepalived --dont-fork --log-console --log-detail \
        --use-file "$RUN/keepalived-$n.conf" --pid "$RUN/keepalived-$n.main.pid" \
        --vrrp_pid "$RUN/keepalived-$n.vrrp.pid" --checkers_pid "$RUN/keepalived-$n.chk.pid" --vrrp
}

fastcheck_start() {
    local n=$1
    [ "$FAST" = 1 ] || return 0
    alive "fastcheck-$n" && return 0
    start "fastcheck-$n" "$n" bash "$LAB/fastcheck.sh" "$BIN/wazuh-proxy" "$RUN/fast-$n.state" \
        "$FAST_MS" "$FAST_FALL"
}

managers_start() {
    local m
    for m in m1 m2; do
        alive "manager-$m" && continue
        # Agent $REMOVED was removed from both managers: they close its connections unanswered,
        # as remoted does ("(1408): Invalid ID"). Only the refusing-manager scenario runs it.
        start "manager-$m" "$m" "$BIN/wazuh-fleet" manager --listen "${ADDR[$m]}:1514" \
            --keys "$RUN/client.keys" --expect-loss --name "$m" --refuse-agent "$REMOVED"
    done
    wait_port m1 "${ADDR[m1]}" 1514
    wait_port m2 "${ADDR[m2]}" 1514
}

# who holds the VIP: prints lb1, lb2, "lb1 lb2" (split) or nothing.
vip_holder() {
    local n out=()
    for n in lb1 lb2; do
        ip -n "$(ns "$n")" -4 -o addr show dev eth0 2>/dev/null | grep -q " $VIP/" && out+=("$n")
    done
    echo "${out[*]:-}"
}

wait_vip() {
    local want=${1:-} i h
    for ((i = 0; i < 300; i++)); do
        h=$(vip_holder)
        if [ -n "$want" ]; then [ "$h" = "$want" ] && return 0; else [ "$h" = lb1 ] || [ "$h" = lb2 ] && return 0; fi
        sleep 0.05
    done
    die "VIP not held by ${want:-exactly one node} within 15 s (now: '${h}')"
}

other() { [ "$1" = lb1 ] && echo lb2 || echo lb1; }

# ---------------------------------------------------------------- up / down / status

write_configs() {
    local ut_line="# manager_user_timeout: the default (WPLAB_USER_TIMEOUT)"
    [ -z "$USER_TIMEOUT" ] || ut_line="manager_user_timeout = \"$USER_TIMEOUT\""
    cat >"$RUN/proxy.toml" <<EOF
# wazuh-proxy of both lab nodes: the same backends, so both send every agent to the same manager.
drain_timeout = "${WPLAB_DRAIN:-200ms}"
admin = "127.0.0.1:9514"

[[listener]]
name = "agents"
listen = "0.0.0.0:1514"
kind = "agent"
balance = "agent-id"
connect_timeout = "1s"
tcp_keepalive = "10s"
$ut_line
backends = [
  { address = "${ADDR[m1]}:1514", max_fails = 1, fail_timeout = "5s" },
  { address = "${ADDR[m2]}:1514", max_fails = 1, fail_timeout = "5s" },
]
EOF
    local n prio fast_decl="" fast_track=""
    for n in lb1 lb2; do
        [ "$n" = lb1 ] && prio=150 || prio=100
        if [ "$FAST" = 1 ]; then
            fast_decl="vrrp_track_file fast_$n {
    file \"$RUN/fast-$n.state\"
    weight 0
}"
            fast_track="    track_file {
        fast_$n
    }"
            [ -f "$RUN/fast-$n.state" ] || echo 1 >"$RUN/fast-$n.state"
        fi
        sed -e "s|@NODE@|$PREFIX-$n|; s|@BIN@|$BIN|; s|@FALL@|$FALL|; s|@PRIORITY@|$prio|" \
            -e "s|@ADVERT@|$ADVERT|; s|@VIP@|$VIP|" "$LAB/keepalived.conf.in" |
            awk -v d="$fast_decl" -v t="$fast_track" '/@FAST_DECL@/{print d; next} /@FAST_TRACK@/{print t; next} {print}' \
                >"$RUN/keepalived-$n.conf"
    done
    [ -f "$RUN/client.keys" ] || "$BIN/wazuh-fleet" keygen --agents "$AGENTS" --out "$RUN/client.keys" >/dev/null
    # The removed agent's own key (the managers' client.keys no longer has it).
    if [ ! -f "$RUN/removed.keys" ]; then
        "$BIN/wazuh-fleet" keygen --agents 1 --out "$RUN/removed.tmp" >/dev/null
        sed "s/^001 fleet-001 /$REMOVED removed-$REMOVED /" "$RUN/removed.tmp" >"$RUN/removed.keys"
        rm -f "$RUN/removed.tmp"
    fi
}

net_up() {
    ip netns list | grep -qw "$BR" || ip netns add "$BR"
    ip -n "$BR" link show br0 >/dev/null 2>&1 || ip -n "$BR" link add br0 type bridge
    # No STP, no forwarding delay: a port joins at once (the partition scenario re-attaches one).
    ip -n "$BR" link set br0 type bridge stp_state 0 forward_delay 0
    ip -n "$BR" link set lo up
    ip -n "$BR" link set br0 up
    local n
    for n in "${NODES[@]}"; do
        ip netns list | grep -qw "$(ns "$n")" || ip netns add "$(ns "$n")"
        if ! ip -n "$(ns "$n")" link show eth0 >/dev/null 2>&1; then
            ip -n "$BR" link del "v-$n" 2>/dev/null || true
            ip link add "wplab-$n" type veth peer name "v-$n" netns "$BR"
            ip link set "wplab-$n" netns "$(ns "$n")"
            ip -n "$(ns "$n")" link set "wplab-$n" name eth0
            ip -n "$(ns "$n")" addr add "${ADDR[$n]}/24" dev eth0
        fi
        ip -n "$BR" link set "v-$n" master br0
        ip -n "$BR" link set "v-$n" up
        ip -n "$(ns "$n")" link set lo up
        ip -n "$(ns "$n")" link set eth0 up
    done
}

# restarts what runs with a configuration that `write_configs` has just changed (a lab left up
# with other WPLAB_* settings would otherwise go on with the old ones, whatever `up` says).
restart_changed() {
    local n sum
    for n in lb1 lb2; do
        sum=$(cat "$RUN/keepalived-$n.conf" "$RUN/proxy.toml" | md5sum | cut -d' ' -f1)
        if [ -f "$RUN/settings-$n" ] && [ "$(cat "$RUN/settings-$n")" != "$sum" ] &&
            { alive "keepalived-$n" || alive "proxy-$n"; }; then
            say "$n: configuration changed since it started; restarting its proxy, keepalived and fast check"
            stop "keepalived-$n"
            stop "fastcheck-$n"
            stop "proxy-$n"
        fi
        echo "$sum" >"$RUN/settings-$n"
    done
}

cmd_up() {
    need_root
    install_packages
    binaries
    mkdir -p "$RUN"
    write_configs
    restart_changed
    net_up
    managers_start
    local n
    for n in lb1 lb2; do proxy_start "$n"; done
    for n in lb1 lb2; do proxy_ready "$n"; done
    for n in lb1 lb2; do
        fastcheck_start "$n"
        keepalived_start "$n"
    done
    wait_vip
    say "lab up: VIP $VIP on $(vip_holder) (advert ${ADVERT}s, vrrp_script fall $FALL x 1s$([ "$FAST" = 1 ] && echo ", fast check ${FAST_FALL} x ${FAST_MS}ms"))"
}

cmd_down() {
    local f n
    if [ -d "$RUN" ]; then
        for f in "$RUN"/*.pid; do
            [ -e "$f" ] || continue
            case $f in *.main.pid | *.vrrp.pid | *.chk.pid) continue ;; esac
            stop "$(basename "$f" .pid)"
        done
    fi
    for n in "${NODES[@]}" br; do
        [ "$n" = br ] && n=$BR || n=$(ns "$n")
        ip netns list | grep -qw "$n" && ip netns del "$n"
    done
    say "lab down"
}

cmd_status() {
    local n f
    for n in "${NODES[@]}"; do
        printf '%-8s netns %s\n' "$n" "$(ip netns list | grep -qw "$(ns "$n")" && echo present || echo absent)"
    done
    for f in "$RUN"/*.pid; do
        [ -e "$f" ] || continue
        case $f in *.main.pid | *.vrrp.pid | *.chk.pid) continue ;; esac
        n=$(basename "$f" .pid)
        printf '%-20s %s\n' "$n" "$(alive "$n" && echo "running (pid $(cat "$f"))" || echo stopped)"
    done
    echo "VIP $VIP held by: $(vip_holder)"
    for n in lb1 lb2; do
        alive "proxy-$n" && printf '%s: %s\n' "$n" "$(inns "$n" "$BIN/wazuh-proxy" health 2>&1 || true)"
    done
}

# ---------------------------------------------------------------- measurement

# Streams from the agents namespace for DUR seconds; agent log lines are timestamped (ms).
stream_start() {
    local tag=$1 dur=$2
    rm -f "$RUN/agents-$tag.log" "$RUN/agents-$tag.out"
    ip netns exec "$(ns agents)" "$BIN/wazuh-fleet" agents --target "$VIP:1514" \
        --agents "$AGENTS" --rate "$RATE" --duration "$dur" --keys "$RUN/client.keys" \
        --reconnect-interval "$RETRY" --max-retries 1000 --recv-timeout 2 --notify-time 10 \
        --drain 3 --log-lines 1000000 --expect-reconnects \
        2> >(while IFS= read -r l; do printf '%s %s\n' "$(now_ms)" "$l"; done >"$RUN/agents-$tag.log") \
        >"$RUN/agents-$tag.out" &
    STREAM_PID=$!
    # Arrival times per agent at the managers, read off the wire (the longest gap).
    local m
    rm -f "$RUN"/gap-*-"$tag".log
    if command -v python3 >/dev/null 2>&1; then
        for m in m1 m2; do
            start "gap-$m-$tag" "$m" python3 "$LAB/gapwatch.py" eth0 1514 "$((dur + 10))" "${ADDR[$m]}"
        done
    fi
}

# Waits for the stream, stops the managers (they print their counts), prints the numbers.
# Sets LOST DUP DISCONNECTS GAP_MS SENT RECEIVED for callers that assert.
stream_finish() {
    local tag=$1 rc=0 m
    wait "$STREAM_PID" || rc=$?
    for m in m1 m2; do stop "manager-$m" TERM; done
    for m in m1 m2; do stop "gap-$m-$tag" TERM; done
    sleep 0.2
    local line
    line=$(grep '^summary ' "$RUN/agents-$tag.out" || true)
    [ -n "$line" ] || die "no agent summary (exit $rc); see $RUN/agents-$tag.log"
    SENT=$(kv sent "$line")
    DISCONNECTS=$(kv lost_connections "$line")
    local recv=0 dup=0 reord=0 ml
    for m in m1 m2; do
        ml=$(grep '^manager-summary ' "$RUN/manager-$m.log" | tail -n 1)
        [ -n "$ml" ] || die "no summary from manager $m"
        recv=$((recv + $(kv events "$ml")))
        dup=$((dup + $(kv duplicated "$ml")))
        reord=$((reord + $(kv reordered "$ml")))
    done
    RECEIVED=$recv DUP=$dup REORD=$reord
    LOST=$((SENT - RECEIVED + DUP))
    # Longest gap: per agent, from "(1137) Lost connection" to the next "(4102) Connected".
    if ls "$RUN"/gap-*-"$tag".log >/dev/null 2>&1; then
        # From the wire: per agent, the longest time between two arrivals at either manager.
        # (The removed agent of refusing-manager is not part of the stream.)
        WIRE_GAP_MS=$(cat "$RUN"/gap-*-"$tag".log | awk -v r="$REMOVED" '$2 != r' | sort -k2,2 -k1,1n |
            awk '$2 == a { g = $1 - t; if (g > max) max = g } { a = $2; t = $1 } END { print max + 0 }')
    else
        WIRE_GAP_MS="n/a(no python3)"
    fi
    GAP_MS=$(awk '/\(1137\) Lost connection/ { sub(":", "", $3); lost[$3] = $1 }
        /\(4102\) Connected/ { sub(":", "", $3); if ($3 in lost) { g = $1 - lost[$3]; if (g > max) max = g; delete lost[$3] } }
        END { for (a in lost) open++; print (max + 0) (open ? "+" open "open" : "") }' "$RUN/agents-$tag.log")
    # frames that were in flight can only be those written in the interval before a loss was
    # seen: bound them by disconnects x (one second of events).
    INFLIGHT_BOUND=$((DISCONNECTS * RATE))
    printf '%-16s sent=%s received=%s lost=%s duplicated=%s reordered=%s longest_gap_ms=%s reconnect_gap_ms=%s failover_ms=%s agent_disconnects=%s vip=%s\n' \
        "$tag" "$SENT" "$RECEIVED" "$LOST" "$DUP" "$REORD" "$WIRE_GAP_MS" "$GAP_MS" "${FAILOVER_MS:--}" "$DISCONNECTS" "$(vip_holder | tr ' ' +)" |
        tee -a "$RUN/results.txt"
}

kv() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<" $2" | head -n 1; }

# GET on a node's admin API (its loopback); prints nothing when it does not answer.
admin_get() {
    if command -v curl >/dev/null 2>&1; then
        inns "$1" curl -s --max-time 2 "http://127.0.0.1:9514$2" 2>/dev/null || true
    else
        inns "$1" python3 -c 'import sys, urllib.request
sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:9514" + sys.argv[1], timeout=2).read().decode())' "$2" 2>/dev/null || true
    fi
}

# msum TEXT NAME [LABEL...]: the sum of metric NAME's samples in TEXT (/metrics) whose labels
# contain every LABEL (e.g. 'reason="agent_refused"').
msum() {
    local text=$1 name=$2
    shift 2
    awk -v n="$name" -v want="$*" 'BEGIN { k = split(want, w, " ") }
        { split($1, a, "{"); if (a[1] != n) next
          for (i = 1; i <= k; i++) if (!index($1, w[i])) next
          s += $NF }
        END { printf "%d", s }' <<<"$text"
}

# mdelta BEFORE AFTER NAME [LABEL...]: how much a counter grew between two /metrics texts.
mdelta() {
    local before=$1 after=$2
    shift 2
    echo $(($(msum "$after" "$@") - $(msum "$before" "$@")))
}

# 1 when the /metrics text TEXT reports backend ADDR available, else 0.
available() { msum "$1" wazuh_proxy_backend_state "backend=\"$2\"" 'state="available"'; }

FAILS=0
# check DESCRIPTION CONDITION: prints ok or FAIL and counts failures in FAILS.
check() {
    if eval "$2"; then echo "ok   $1"; else
        echo "FAIL $1"
        FAILS=$((FAILS + 1))
    fi
}

# Watches (every 20 ms, up to LIMIT s) until the VIP is on node TO only; prints ms since T0.
watch_vip() {
    local to=$1 t0=$2 limit=${3:-15} end
    end=$(($(now_ms) + limit * 1000))
    while [ "$(now_ms)" -lt "$end" ]; do
        if [ "$(vip_holder)" = "$to" ]; then
            echo $(($(now_ms) - t0))
            return 0
        fi
        sleep 0.02
    done
    echo "none"
}

# ---------------------------------------------------------------- scenarios

fresh() {
    # Every scenario starts from the same place: all up, managers with fresh counters.
    local n
    for n in lb1 lb2; do
        ip -n "$BR" link set "v-$n" master br0
        ip -n "$(ns "$n")" link set eth0 up
        proxy_start "$n"
        fastcheck_start "$n"
        keepalived_start "$n"
    done
    for n in m1 m2; do stop "manager-$n" TERM; done
    : >"$RUN/manager-m1.log"
    : >"$RUN/manager-m2.log"
    managers_start
    for n in lb1 lb2; do proxy_ready "$n"; done
    wait_vip
    sleep 1
}

scenario() {
    local name=$1 master backup t0 dur=14
    case $name in
        blackhole) scenario_blackhole; return ;;
        refusing-manager) scenario_refusing; return ;;
    esac
    fresh
    master=$(vip_holder)
    backup=$(other "$master")
    FAILOVER_MS=""
    say "scenario $name: VIP on $master; $AGENTS agents x $RATE ev/s for ${dur}s"
    stream_start "$name" "$dur"
    sleep 4
    t0=$(now_ms)
    case $name in
        proxy-kill)
            stop "proxy-$master" KILL
            FAILOVER_MS=$(watch_vip "$backup" "$t0")
            sleep 2
            proxy_start "$master"
            ;;
        keepalived-kill)
            stop "keepalived-$master" KILL
            FAILOVER_MS=$(watch_vip "$backup" "$t0")
            # A killed keepalived leaves the VIP configured on its node; note it, then restart.
            say "after the kill, VIP held by: $(vip_holder)"
            sleep 2
            keepalived_start "$master"
            ;;
        link-flap)
            ip -n "$(ns "$master")" link set eth0 down
            FAILOVER_MS=$(watch_vip "$backup" "$t0")
            sleep 2
            ip -n "$(ns "$master")" link set eth0 up
            ;;
        partition)
            ip -n "$BR" link set "v-$master" nomaster
            # Split brain: the cut-off node keeps its VIP; the failover is the other taking it.
            FAILOVER_MS=$(watch_vip_on "$backup" "$t0")
            sleep 2
            ip -n "$BR" link set "v-$master" master br0
            ;;
        restart)
            stop "proxy-$master" TERM
            proxy_start "$master"
            local restart_ms=$(($(now_ms) - t0))
            proxy_ready "$master"
            say "restart: old process gone and new one started in ${restart_ms} ms, admin up after $(($(now_ms) - t0)) ms"
            sleep 4
            [ "$(vip_holder)" = "$master" ] && FAILOVER_MS="VIP-stayed" || FAILOVER_MS="VIP-MOVED"
            ;;
        upgrade)
            # SIGUSR2: the running proxy starts its successor, hands it the listeners and every
            # agent session, and exits; agents keep their connections.
            local old
            old=$(cat "$RUN/proxy-$master.pid")
            kill -USR2 "$old"
            for ((i = 0; i < 1500; i++)); do
                kill -0 "$old" 2>/dev/null || break
                sleep 0.02
            done
            kill -0 "$old" 2>/dev/null && die "upgrade: the old process did not exit"
            local new
            new=$(grep -a "new process started" "$RUN/proxy-$master.log" | tail -n 1 | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
            [ -n "$new" ] && kill -0 "$new" 2>/dev/null || die "upgrade: no new process"
            echo "$new" >"$RUN/proxy-$master.pid"
            proxy_ready "$master"
            say "upgrade: old process $old handed over to $new in $(($(now_ms) - t0)) ms"
            sleep 4
            [ "$(vip_holder)" = "$master" ] && FAILOVER_MS="VIP-stayed" || FAILOVER_MS="VIP-MOVED"
            ;;
        manager-kill)
            stop manager-m1 TERM
            FAILOVER_MS="n/a"
            ;;
        *) die "unknown scenario $name" ;;
    esac
    stream_finish "$name"
    # the killed manager must come back for the next scenario
    managers_start
}

# VIP present on node TO (split brain allowed): ms since T0.
watch_vip_on() {
    local to=$1 t0=$2 end
    end=$(($(now_ms) + 15000))
    while [ "$(now_ms)" -lt "$end" ]; do
        if ip -n "$(ns "$to")" -4 -o addr show dev eth0 | grep -q " $VIP/"; then
            echo $(($(now_ms) - t0))
            return 0
        fi
        sleep 0.02
    done
    echo none
}

# ---------------------------------------------------------------- manager faults

# Waits (bounded, 15 s) until NODE's proxy shows both managers available: managers restarted by
# `fresh` come back into rotation only after their active checks pass (rise x interval), and
# until then every agent would go to the other one.
wait_managers_available() {
    local node=$1 i m
    for ((i = 0; i < 75; i++)); do
        m=$(admin_get "$node" /metrics)
        [ -n "$m" ] && [ "$(available "$m" "${ADDR[m1]}:1514")$(available "$m" "${ADDR[m2]}:1514")" = 11 ] && return 0
        sleep 0.2
    done
    die "$node: both managers not available within 15 s"
}

# Seconds in a "Ns" duration (the blackhole scenario's timeline); 10 (the default) otherwise.
user_timeout_s() {
    local t=${USER_TIMEOUT:-10s}
    [[ $t =~ ^([0-9]+)s$ ]] && echo "${BASH_REMATCH[1]}" || echo 10
}

# Manager m1's link goes down inside its namespace while agents stream through the VIP: no FIN,
# no RST, its TCP simply stops answering. The proxy must notice (manager_user_timeout), move
# m1's agents to m2 without disconnecting them, re-send what m1 never acknowledged, and take m1
# back once its link is up again (agents are rebalanced to it).
scenario_blackhole() {
    local master ut dur t0 t_up m m_before m_after i line victim=m1
    ut=$(user_timeout_s)
    dur=$((4 + ut + 22))
    fresh
    master=$(vip_holder)
    wait_managers_available "$master"
    FAILOVER_MS="n/a"
    say "scenario blackhole: VIP on $master; $AGENTS agents x $RATE ev/s for ${dur}s; $victim's link down 4 s in (manager_user_timeout ${USER_TIMEOUT:-10s (default)})"
    m_before=$(admin_get "$master" /metrics)
    stream_start blackhole "$dur"
    sleep 4
    t0=$(now_ms)
    ip -n "$(ns "$victim")" link set eth0 down
    # Wait (bounded) until the proxy marks m1 failed and holds no connection to it (its
    # agents have left), then leave the link down 2 s longer.
    local failed_ms=none left_ms=none
    for ((i = 0; i < (ut + 12) * 5; i++)); do
        m=$(admin_get "$master" /metrics)
        if [ -n "$m" ]; then
            [ "$failed_ms" = none ] && [ "$(available "$m" "${ADDR[$victim]}:1514")" = 0 ] &&
                failed_ms=$(($(now_ms) - t0))
            [ "$left_ms" = none ] &&
                [ "$(msum "$m" wazuh_proxy_backend_active_connections "backend=\"${ADDR[$victim]}:1514\"")" = 0 ] &&
                left_ms=$(($(now_ms) - t0))
            [ "$failed_ms" != none ] && [ "$left_ms" != none ] && break
        fi
        sleep 0.2
    done
    sleep 2
    t_up=$(now_ms)
    ip -n "$(ns "$victim")" link set eth0 up
    # Back in rotation: available again on the proxy.
    local back_ms=none end
    # (the stream ends at t0 - 4 s + dur)
    end=$((t0 + dur * 1000 - 4000 - 3000))
    while [ "$(now_ms)" -lt "$end" ]; do
        m=$(admin_get "$master" /metrics)
        if [ -n "$m" ] && [ "$(available "$m" "${ADDR[$victim]}:1514")" = 1 ]; then
            back_ms=$(($(now_ms) - t_up))
            break
        fi
        sleep 0.2
    done
    # Just before the stream ends: agents rebalanced back to m1 by then (rebalance_interval).
    while [ "$(now_ms)" -lt "$((t0 + dur * 1000 - 4000 - 1500))" ]; do sleep 0.1; done
    m_after=$(admin_get "$master" /metrics)
    local active_back
    active_back=$(msum "$m_after" wazuh_proxy_backend_active_connections "backend=\"${ADDR[$victim]}:1514\"")
    stream_finish blackhole
    # Time until each agent of m1 arrived at m2 after the cut, from the wire.
    local resume
    resume=$(awk -v t0="$t0" -v tu="$t_up" -v r="$REMOVED" '
        $1 !~ /^[0-9]+$/ || $2 == r { next }
        FILENAME ~ /gap-m1-/ && $1 < t0 && $1 >= t0 - 2000 { on[$2] = 1 }
        FILENAME ~ /gap-m2-/ && $1 >= t0 && $1 < tu && !($2 in first) { first[$2] = $1 - t0 }
        FILENAME ~ /gap-m1-/ && $1 >= tu { back[$2] = 1 }
        END { nb = 0; for (a in back) nb++
              printf "back %d\n", nb
              for (a in on) if (a in first) print "resumed " first[a]; else print "never 0" }' \
        "$RUN/gap-m1-blackhole.log" "$RUN/gap-m2-blackhole.log" |
        sort -k1,1 -k2,2n | awk '
        $1 == "back" { nb = $2 } $1 == "never" { never++; n++ } $1 == "resumed" { v[++k] = $2; n++ }
        END { printf "agents_on_m1=%d resumed_ms_max=%d resumed_ms_median=%d never_resumed=%d agents_back_on_m1_by_wire=%d",
                  n, v[k], v[int((k + 1) / 2)], never, nb }')
    RESENT=$(mdelta "$m_before" "$m_after" wazuh_proxy_frames_resent_total)
    AT_RISK=$(mdelta "$m_before" "$m_after" wazuh_proxy_frames_at_risk_total)
    FAILOVERS=$(mdelta "$m_before" "$m_after" wazuh_proxy_failovers_total)
    line="blackhole        user_timeout=${USER_TIMEOUT:-10s} $resume marked_failed_ms=$failed_ms left_m1_ms=$left_ms back_available_ms=$back_ms active_on_m1_at_end=$active_back frames_resent=$RESENT frames_at_risk=$AT_RISK failovers=$FAILOVERS moves=$(mdelta "$m_before" "$m_after" wazuh_proxy_moves_total) lost=$LOST duplicated=$DUP reordered=$REORD agent_disconnects=$DISCONNECTS"
    echo "$line" | tee -a "$RUN/results.txt"
    check "no agent disconnected (disconnects=$DISCONNECTS)" '[ "$DISCONNECTS" -eq 0 ]'
    check "nothing lost (lost=$LOST)" '[ "$LOST" -eq 0 ]'
    check "the proxy marked $victim failed while its link was down" '[ "$failed_ms" != none ]'
    check "$victim came back into rotation once its link was up" '[ "$back_ms" != none ]'
    check "every agent of $victim resumed on the other manager ($resume)" '[[ "$resume" == *never_resumed=0* ]] && [[ "$resume" != agents_on_m1=0* ]]'
}

# Both managers refuse agent $REMOVED (removed, but still running and reconnecting every
# second) while the other agents stream: the node must stay healthy (keepalived keeps the VIP),
# both managers available, the other agents untouched; the removed agent is closed after a
# bounded number of tries and then kept away by the proxy itself, with backoff.
scenario_refusing() {
    local master dur=${1:-${WPLAB_REFUSING_SECONDS:-30}} bound_mode=${2:-check} t0 m_before m_after i now h m line n
    # New proxies: each run starts with no memory of agent $REMOVED (its backoff).
    for n in lb1 lb2; do stop "proxy-$n"; done
    fresh
    master=$(vip_holder)
    wait_managers_available "$master"
    FAILOVER_MS="n/a"
    say "scenario refusing-manager: VIP on $master; $AGENTS agents x $RATE ev/s for ${dur}s; both managers refuse agent $REMOVED, which reconnects every ${RETRY}s"
    m_before=$(admin_get "$master" /metrics)
    stream_start refusing-manager "$dur"
    sleep 3
    t0=$(now_ms)
    rm -f "$RUN/removed-agent.log" "$RUN/removed-agent.out"
    ip netns exec "$(ns agents)" "$BIN/wazuh-fleet" agents --target "$VIP:1514" \
        --agents 1 --rate 1 --duration "$((dur - 6))" --keys "$RUN/removed.keys" \
        --reconnect-interval "$RETRY" --max-retries 1000000 --recv-timeout 10 --drain 1 \
        --log-lines 1000000 --expect-reconnects \
        2> >(while IFS= read -r l; do printf '%s %s\n' "$(now_ms)" "$l"; done >"$RUN/removed-agent.log") \
        >"$RUN/removed-agent.out" &
    local removed_pid=$!
    # Every 0.5 s (bounded by the run): the node's health verdict, and from its metrics both
    # managers' state and the refusal counters.
    local samples=0 unhealthy=0 unavailable=0 noanswer=0
    : >"$RUN/refusing-timeline.txt"
    local end=$((t0 + (dur - 5) * 1000))
    for ((i = 0; i < (dur - 4) * 2 && $(now_ms) < end; i++)); do
        inns "$master" "$BIN/wazuh-proxy" health --timeout 400ms >/dev/null 2>&1 && h=ok || h=FAIL
        m=$(admin_get "$master" /metrics)
        now=$(($(now_ms) - t0))
        samples=$((samples + 1))
        [ "$h" = ok ] || unhealthy=$((unhealthy + 1))
        if [ -z "$m" ]; then
            noanswer=$((noanswer + 1))
        elif [ "$(available "$m" "${ADDR[m1]}:1514")$(available "$m" "${ADDR[m2]}:1514")" != 11 ]; then
            unavailable=$((unavailable + 1))
        fi
        printf '%s health=%s m1=%s m2=%s manager_refusals=%s agent_refused=%s agent_backoff=%s kept_away=%s\n' \
            "$now" "$h" "$(available "$m" "${ADDR[m1]}:1514")" "$(available "$m" "${ADDR[m2]}:1514")" \
            "$(msum "$m" wazuh_proxy_manager_refusals_total)" \
            "$(msum "$m" wazuh_proxy_rejected_total 'reason="agent_refused"')" \
            "$(msum "$m" wazuh_proxy_rejected_total 'reason="agent_backoff"')" \
            "$(msum "$m" wazuh_proxy_agents_kept_away)" >>"$RUN/refusing-timeline.txt"
        sleep 0.5
    done
    wait "$removed_pid" || true
    m_after=$(admin_get "$master" /metrics)
    stream_finish refusing-manager
    local attempts refusals=0 ml
    attempts=$(kv failed_attempts "$(grep '^summary ' "$RUN/removed-agent.out" || true)")
    for m in m1 m2; do
        ml=$(grep '^manager-summary ' "$RUN/manager-$m.log" | tail -n 1)
        refusals=$((refusals + $(kv refusals "$ml")))
    done
    # How fast the managers' refusals grew: in the removed agent's first 6 s, and its last 6 s.
    local first last
    first=$(awk -v base="$(msum "$m_before" wazuh_proxy_manager_refusals_total)" \
        '$1 <= 6000 { v = $5 } END { sub("manager_refusals=", "", v); print v - base }' "$RUN/refusing-timeline.txt")
    last=$(awk -v e="$(((dur - 6 - 6) * 1000))" '$1 <= e { a = $5 } { b = $5 } END { sub("manager_refusals=", "", a); sub("manager_refusals=", "", b); print b - a }' "$RUN/refusing-timeline.txt")
    REFUSED=$(mdelta "$m_before" "$m_after" wazuh_proxy_rejected_total 'reason="agent_refused"')
    BACKOFF=$(mdelta "$m_before" "$m_after" wazuh_proxy_rejected_total 'reason="agent_backoff"')
    # Refusals per connection of the removed agent that reached the managers: each such
    # connection ends given up (agent_refused), except perhaps one still trying at the end.
    # (Single refusals are logged at debug only, so the metrics are what is counted.)
    local m_refusals per_conn per_conn_max
    m_refusals=$(mdelta "$m_before" "$m_after" wazuh_proxy_manager_refusals_total)
    per_conn_max=$(((m_refusals + REFUSED) / (REFUSED + 1)))
    per_conn="about $per_conn_max on average over $((REFUSED + 1)) connection(s), $m_refusals refusals"
    local kept_max
    kept_max=$(awk '{ v = $8; sub("kept_away=", "", v); if (v + 0 > m) m = v + 0 } END { print m + 0 }' "$RUN/refusing-timeline.txt")
    line="refusing-manager removed_agent_attempts=${attempts:-?} manager_refusals=$(mdelta "$m_before" "$m_after" wazuh_proxy_manager_refusals_total) managers_counted_refusals=$refusals refusals_first_6s=$first refusals_last_6s=$last refusals_per_connection_max=${per_conn_max:-0} agent_refused=$REFUSED agent_backoff=$BACKOFF kept_away_max=$kept_max health_samples=$samples unhealthy=$unhealthy samples_without_both_managers=$unavailable metrics_unanswered=$noanswer others_lost=$LOST others_duplicated=$DUP others_longest_gap_ms=$WIRE_GAP_MS others_disconnects=$DISCONNECTS"
    echo "$line" | tee -a "$RUN/results.txt"
    check "the node stayed healthy throughout ($unhealthy of $samples checks failed)" '[ "$unhealthy" -eq 0 ]'
    check "both managers stayed available ($unavailable of $samples samples without both)" '[ "$unavailable" -eq 0 ]'
    check "the other agents were not disconnected (disconnects=$DISCONNECTS)" '[ "$DISCONNECTS" -eq 0 ]'
    check "the other agents lost nothing (lost=$LOST)" '[ "$LOST" -eq 0 ]'
    check "the removed agent was refused everywhere and closed (agent_refused=$REFUSED)" '[ "$REFUSED" -ge 1 ]'
    check "its reconnections were answered by the proxy (agent_backoff=$BACKOFF)" '[ "$BACKOFF" -ge 1 ]'
    # The documented bound: each manager at most 3 times per connection of the agent. (Smoke
    # reports it without failing: the paced rebalance can move a connection between two
    # refusals, and a move starts its tally again.)
    local bound="connections of the removed agent were refused at most 3 x 2 times each ($per_conn)"
    if [ "$bound_mode" = check ]; then
        check "$bound" '[ "$m_refusals" -le $((6 * (REFUSED + 1))) ]'
    else
        echo "info $bound: $([ "$m_refusals" -le $((6 * (REFUSED + 1))) ] && echo held || echo NOT held)"
    fi
}

SCENARIOS=(proxy-kill keepalived-kill link-flap partition restart upgrade manager-kill blackhole refusing-manager)

cmd_scenario() {
    local name=${1:?scenario NAME (or all)}
    cmd_up
    if [ "$name" = all ]; then
        local s
        for s in "${SCENARIOS[@]}"; do scenario "$s"; done
    else
        scenario "$name"
    fi
}

cmd_chaos() {
    local events=20 seconds=120
    while [ $# -gt 0 ]; do
        case $1 in
            --events) events=$2; shift 2 ;;
            --seconds) seconds=$2; shift 2 ;;
            *) die "chaos: unknown option $1" ;;
        esac
    done
    [ "$events" -ge 1 ] && [ "$seconds" -ge 10 ] || die "chaos: need --events >= 1 and --seconds >= 10"
    cmd_up
    fresh
    [ -n "$SEED" ] && RANDOM=$SEED
    local gap_ms=$(((seconds - 6) * 1000 / events)) i n deadline moves=0 before after
    say "chaos: $events stop/start events over ${seconds}s (one every ~${gap_ms} ms, jittered)"
    FAILOVER_MS=""
    stream_start chaos "$seconds"
    sleep 3
    deadline=$(($(now_ms) + (seconds - 3) * 1000))
    for ((i = 1; i <= events; i++)); do
        [ "$(now_ms)" -lt "$deadline" ] || break
        n=$([ $((RANDOM % 2)) = 0 ] && echo lb1 || echo lb2)
        before=$(vip_holder)
        if alive "proxy-$n"; then
            # Never stop the last proxy standing: that is an outage, not a failover.
            if alive "proxy-$(other "$n")"; then
                stop "proxy-$n" KILL
                echo "$(now_ms) event $i: killed proxy on $n (VIP was on $before)" >>"$RUN/chaos-events.log"
            else
                proxy_start "$n"
                echo "$(now_ms) event $i: started proxy on $n" >>"$RUN/chaos-events.log"
            fi
        else
            proxy_start "$n"
            echo "$(now_ms) event $i: started proxy on $n" >>"$RUN/chaos-events.log"
        fi
        sleep "$(awk -v g="$gap_ms" -v r="$RANDOM" 'BEGIN { printf "%.2f", g * (0.5 + r / 32767) / 1000 }')"
        after=$(vip_holder)
        [ "$before" != "$after" ] && moves=$((moves + 1))
    done
    say "chaos: VIP moved $moves times"
    FAILOVER_MS="moves:$moves"
    stream_finish chaos
    managers_start
    proxy_start lb1
    proxy_start lb2
}

# CI: behaviour only (never timings): a stream, a proxy kill, a restart; then a removed agent
# refused by both managers (refusing-manager, shortened).
cmd_smoke() {
    cmd_up
    fresh
    local master backup
    FAILS=0
    master=$(vip_holder)
    backup=$(other "$master")
    say "smoke: stream through $VIP (on $master), kill its proxy, then restart the new master's"
    stream_start smoke 24
    sleep 4
    stop "proxy-$master" KILL
    wait_vip "$backup"
    say "smoke: VIP moved to $backup"
    sleep 3
    proxy_start "$master"
    proxy_ready "$master"
    sleep 4
    stop "proxy-$backup" TERM
    proxy_start "$backup"
    proxy_ready "$backup"
    sleep 6
    local holder
    holder=$(vip_holder)
    stream_finish smoke
    check "the VIP moved off the killed node (to $backup) and is held by one node at the end (now: $holder)" '[ "$holder" = lb1 ] || [ "$holder" = lb2 ]'
    # Whether a restart keeps the VIP depends on timing (fall x interval against the restart's
    # duration), which CI does not assert.
    [ "$holder" = "$backup" ] && echo "info the VIP stayed on $backup over its proxy's restart" ||
        echo "info the VIP moved back to $holder during $backup's proxy restart (restart slower than fall x interval)"
    check "events arrived (received=$RECEIVED)" '[ "$RECEIVED" -gt 0 ]'
    check "every agent came back: no connection left open-ended (gap=$GAP_MS)" '[[ "$GAP_MS" != *open* ]]'
    check "agents were disconnected by the kill (disconnects=$DISCONNECTS)" '[ "$DISCONNECTS" -ge 1 ]'
    check "lost=$LOST is within in-flight bound $INFLIGHT_BOUND (disconnects x 1 s of events)" '[ "$LOST" -ge 0 ] && [ "$LOST" -le "$INFLIGHT_BOUND" ]'
    check "no duplicates (duplicated=$DUP)" '[ "$DUP" -eq 0 ]'
    local tail_ok
    tail_ok=$(tail -n 40 "$RUN/agents-smoke.log" | grep -c 'no connection to' || true)
    check "no agent ended the run without a connection" '[ "$tail_ok" -eq 0 ]'
    # A removed agent that keeps reconnecting: the node stays healthy, nothing else is touched.
    say "smoke: both managers refuse agent $REMOVED while the others stream"
    scenario_refusing 20 info
    [ "$FAILS" -eq 0 ] || die "smoke: $FAILS check(s) failed; logs in $RUN"
    say "smoke passed"
}

# ---------------------------------------------------------------- main

main() {
    local cmd=${1:-}
    [ $# -gt 0 ] && shift
    case $cmd in
        up) cmd_up ;;
        down) cmd_down ;;
        status) cmd_status ;;
        scenario) need_root && cmd_scenario "$@" ;;
        chaos) need_root && cmd_chaos "$@" ;;
        smoke)
            need_root
            trap 'cmd_down' EXIT
            cmd_smoke
            ;;
        *) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
}

main "$@"
