# Shared by the scripts in bench/: temporary files, servers on free ports of 127.0.0.1, and
# small numeric helpers. Source it after `cd` to the repository root; it sets SF, TMP, OUT
# and a trap that stops every process put in PIDS.

SF=target/release/sockframe
TMP=$(mktemp -d)
OUT=${OUT:-$TMP/results.jsonl}
: >"$OUT"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ $OUT != "$TMP"/* ]]; then rm -rf "$TMP"; fi
}
trap cleanup EXIT

# start_server CMD... : starts a server on a free port; sets SERVER_PID and SERVER_ADDR.
start_server() {
    local log=$TMP/server.err addr=""
    # Emptied first: the server's redirection happens in the background, and until then an
    # old log would give the previous server's address.
    : >"$log"
    "$@" >/dev/null 2>"$log" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 100); do
        addr=$(sed -n 's/^listening on //p' "$log")
        [[ -n $addr ]] && break
        sleep 0.1
    done
    if [[ -z $addr ]]; then
        echo "server did not start: $*" >&2
        cat "$log" >&2
        exit 1
    fi
    SERVER_ADDR=$addr
}

stop_server() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
}

# field JSON KEY: a number from a one-line JSON object.
field() {
    sed -n "s/.*\"$2\":\([-0-9.e+]*\).*/\1/p" <<<"$1"
}

# median VALUES...
median() {
    printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'
}

# fmt NUMBER: 1.23 M, 45.6 k, 7.8 (or – unchanged).
fmt() {
    [[ $1 == "–" ]] && { echo "–"; return; }
    awk -v x="$1" 'BEGIN {
        if (x >= 1e6) printf "%.2f M", x / 1e6;
        else if (x >= 1e4) printf "%.1f k", x / 1e3;
        else printf "%.1f", x }'
}

# machine: one line saying what this machine is.
machine() {
    echo "$(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
}
