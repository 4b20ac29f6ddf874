#!/usr/bin/env bash
# Sub-second health check for keepalived's track_file: keepalived runs vrrp_script at whole
# seconds only. Asks `wazuh-proxy health` every PERIOD_MS and writes 0 (healthy) or 1 (fault)
# to STATE_FILE once FALL checks in a row failed; one success writes 0 again.
#   fastcheck.sh WAZUH_PROXY STATE_FILE PERIOD_MS FALL
set -euo pipefail
bin=$1 state=$2 period_ms=$3 fall=$4
period=$(awk -v p="$period_ms" 'BEGIN { printf "%.3f", p / 1000 }')
timeout="$((period_ms * 8 / 10))ms"
fails=0 last=""
write() {
    if [ "$1" != "$last" ]; then
        echo "$1" >"$state"
        last=$1
        echo "$(date +%T.%3N) state $1"
    fi
}
# Ends with its lab (SIGTERM from lab.sh down); bounded anyway to one day.
end=$((SECONDS + 86400))
while [ "$SECONDS" -lt "$end" ]; do
    if "$bin" health --timeout "$timeout" >/dev/null 2>&1; then
        fails=0
        write 0
    else
        fails=$((fails + 1))
        [ "$fails" -ge "$fall" ] && write 1
    fi
    sleep "$period"
done
