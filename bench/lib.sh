# shellcheck shell=bash disable=SC2034 # sourced: the variables it sets are used by its callers
# Shared by the scripts in bench/: temporary files, servers on free ports of 127.0.0.1, and
# small numeric helpers. Source it after `cd` to the repository root; it sets TARGET, SF,
# TMP, OUT and a trap that stops every process put in PIDS. Binaries are looked for where
# cargo put them: $CARGO_TARGET_DIR when set, else target/.

TARGET=${CARGO_TARGET_DIR:-target}
SF=$TARGET/release/sockframe
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

# ZeroMQ beside sockframe (issue 17): the peer in bench/zmq-peer (its own crate, so that the
# library never depends on ZeroMQ), built only when libzmq is installed.
# zmq_setup: builds it and sets ZQ to its path, or sets ZQ empty and ZMQ_SKIPPED to why not.
zmq_setup() {
    ZQ="" ZMQ_SKIPPED=""
    if ! command -v pkg-config >/dev/null; then
        ZMQ_SKIPPED="pkg-config is not installed (Debian: apt-get install libzmq3-dev pkg-config)"
    elif ! pkg-config --exists libzmq; then
        ZMQ_SKIPPED="libzmq is not installed (Debian: apt-get install libzmq3-dev pkg-config)"
    elif ! cargo build --release --quiet --manifest-path bench/zmq-peer/Cargo.toml --target-dir "$TARGET"; then
        ZMQ_SKIPPED="bench/zmq-peer did not build (cargo's errors above)"
    else
        ZQ=$TARGET/release/zmq-peer
    fi
}

# run_zmq SCENARIO KIND KEY ZMQ-BENCH-ARGS...: one run of the ZeroMQ peer (KIND: sink for
# PULL, echo for REP) under its own load generator; sets RESULT to the value of KEY.
run_zmq() {
    local scenario=$1 kind=$2 key=$3 json
    shift 3
    start_server "$ZQ" "$kind" 127.0.0.1:0
    if ! json=$("$ZQ" bench "$SERVER_ADDR" --json --duration "$DURATION" --warmup "$WARMUP" "$@" 2>"$TMP/bench.err"); then
        echo "$scenario: zmq-peer bench failed:" >&2
        cat "$TMP/bench.err" >&2
        exit 1
    fi
    stop_server
    echo "{\"scenario\":\"$scenario\",\"server\":\"zeromq\",\"result\":$json}" >>"$OUT"
    RESULT=$(field "$json" "$key")
}

# zmq_row NAME METRIC SOCKFRAME ZEROMQ TARGET: a row of the ZeroMQ table; TARGET is ">= 7"
# or "<= 0.75", the ratio sockframe / ZeroMQ it must reach.
zmq_row() {
    awk -v n="$1" -v m="$2" -v a="$3" -v b="$4" -v t="$5" -v fa="$(fmt "$3")" -v fb="$(fmt "$4")" 'BEGIN {
        r = a / b
        split(t, p, " ")
        met = (p[1] == ">=") ? (r >= p[2]) : (r <= p[2])
        printf "| %s | %s | %s | %s | %.2f× | %s %s× | %s |\n", n, m, fa, fb, r, (p[1] == ">=" ? "≥" : "≤"), p[2], (met ? "met" : "not met")
    }'
}
