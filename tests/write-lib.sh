# SPDX-License-Identifier: BSD-3-Clause
# Helpers for the write tests: a scratch directory and a background
# nbdkit whose log is kept, started and stopped explicitly.

set -euo pipefail
export PATH=${QCOW2_SANITIZER_BIN:+$QCOW2_SANITIZER_BIN:}/usr/bin:$PATH
: "${PLUGIN:?PLUGIN must name the built plugin}"

requires () {
  for c in "$@"; do
    command -v "$c" >/dev/null || { echo "$0: missing $c: skipped"; exit 77; }
  done
}

scratch=$(mktemp -d -t "$(basename "$0" .sh)-XXXXXX")
srv_pid=
cleanup () {
  [ -n "$srv_pid" ] && kill -9 "$srv_pid" 2>/dev/null || true
  if [ "${KEEP:-}" ]; then echo "kept $scratch"; else rm -rf "$scratch"; fi
}
trap cleanup EXIT

# start_server IMAGE [ARGS...]: serve on $scratch/sock, set $uri.
# QCOW2_MODE=filter serves through nbdkit-qcow2-filter.so ($FILTER) over
# the file plugin, with the qcow2- prefix on ARGS; since the plugin's
# export cannot grow, the image is first given room (sparse): at least
# twice its virtual size plus 64M.
start_server () {
  local img=$1; shift
  local serve=("$PLUGIN" "file=$img" "$@")
  if [ "${QCOW2_MODE:-plugin}" = filter ]; then
    local a vsize
    serve=(--filter="$FILTER" file "file=$img")
    for a in "$@"; do serve+=("qcow2-$a"); done
    vsize=$(qemu-img info --output=json "$img" |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')
    truncate -s ">$(( 2 * vsize + (64 << 20) ))" "$img"
  fi
  rm -f "$scratch/sock" "$scratch/pid"
  nbdkit -f -U "$scratch/sock" -P "$scratch/pid" "${serve[@]}" \
    2>>"$scratch/nbdkit.log" &
  srv_pid=$!
  for _ in $(seq 200); do
    [ -S "$scratch/sock" ] && [ -s "$scratch/pid" ] && break
    kill -0 "$srv_pid" 2>/dev/null || { cat "$scratch/nbdkit.log"; return 1; }
    sleep 0.05
  done
  uri="nbd+unix:///?socket=$scratch/sock"
}

# stop_server: a clean shutdown, which must succeed.
stop_server () {
  kill -TERM "$srv_pid"
  wait "$srv_pid" || { echo "nbdkit exited with $?"; cat "$scratch/nbdkit.log"; return 1; }
  srv_pid=
}

kill_server () {
  kill -9 "$srv_pid" 2>/dev/null || true
  wait "$srv_pid" 2>/dev/null || true
  srv_pid=
}

# check_clean IMAGE [leaks-ok]: qemu-img check finds no errors (and no
# leaks unless the second argument is given).
check_clean () {
  local r=0
  qemu-img check "$1" > "$scratch/check.out" 2>&1 || r=$?
  if [ "$r" -eq 0 ] || { [ "${2:-}" = leaks-ok ] && [ "$r" -eq 3 ]; }; then
    return 0
  fi
  echo "qemu-img check $1 exited $r:"; tail -30 "$scratch/check.out"
  return 1
}

pick_seed () {
  seed=${SEED:-$(( $(date +%s) % 100000 ))}
  echo "seed=$seed (rerun with SEED=$seed)"
}
