# SPDX-License-Identifier: BSD-3-Clause
# Helpers for the NBD backing tests; sourced after functions.sh.

requires nbdinfo

# start_backing SOCK ARGS...: an nbdkit backing server on a Unix socket,
# in the background (pid in SOCK.pid), killed at exit.
start_backing ()
{
    local sock=$1 pidf=$1.pid
    shift
    rm -f "$sock" "$pidf"
    nbdkit -U "$sock" -P "$pidf" "$@" || fail "nbdkit $* did not start"
    local i
    for (( i = 0; i < 100; i++ )); do
        [ -s "$pidf" ] && break
        sleep 0.1
    done
    [ -s "$pidf" ] || fail "nbdkit $* wrote no pid file"
    cleanup_fn kill "$(cat "$pidf")"
}

# stop_backing SOCK: kill the backing server (SIGKILL: it dies with
# clients connected) and wait until it is gone.
stop_backing ()
{
    local pid i
    pid=$(cat "$1.pid")
    kill -9 "$pid" 2>/dev/null || true
    for (( i = 0; i < 100; i++ )); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    fail "backing server $pid did not exit"
}

# start_plugin SOCK [-w] IMG ARGS...: the plugin in the foreground
# mode, backgrounded by us; sets plugin_pid, log in SOCK.log.
start_plugin ()
{
    local sock=$1 ro=-r
    shift
    if [ "$1" = -w ]; then ro=; shift; fi
    local img=$1
    shift
    rm -f "$sock"
    nbdkit -f $ro -U "$sock" "$PLUGIN" file="$img" "$@" 2>"$sock.log" &
    plugin_pid=$!
    cleanup_fn kill "$plugin_pid"
    local i
    for (( i = 0; i < 200; i++ )); do
        [ -S "$sock" ] && return 0
        kill -0 "$plugin_pid" 2>/dev/null || { cat "$sock.log" >&2; fail "plugin did not start"; }
        sleep 0.05
    done
    fail "plugin did not start listening"
}

# stop_plugin SOCK: clean shutdown, which must succeed.
stop_plugin ()
{
    kill -TERM "$plugin_pid"
    wait "$plugin_pid" || { cat "$1.log" >&2; fail "plugin exited with status $?"; }
}
