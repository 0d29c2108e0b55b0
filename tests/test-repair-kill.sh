#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# kill -9 under heavy writes, then repair on reopen.
#  - Lazy refcounts, five rounds on one image: each round writes a
#    known pattern and flushes it, then fio writes and trims elsewhere
#    until the server is killed.  The next round's server (repair=auto,
#    the default) rebuilds the refcounts at its first write.  Every
#    flushed pattern must read back, and after a clean shutdown
#    qemu-img check must find no errors and no leaks.
#  - Without lazy refcounts: the killed image may leak; repair=all
#    must leave none.
source "${srcdir:-$(dirname "$0")}/repair-lib.sh"
requires fio
pick_seed
RANDOM=$seed

# fio_until_killed: random writes and trims above 32M from two
# connections, until the server dies after a random 1-3 s.
fio_until_killed () {
  fio --output=/dev/null --ioengine=nbd --uri="$uri" --iodepth=16 \
      --offset=32m --size=224m --time_based --runtime=30 \
      --randseed=$((seed + $1)) \
      --name=w --rw=randwrite --bsrange=4k-256k --numjobs=2 --fsync=16 \
      --name=t --rw=randtrim --bsrange=64k-1m --numjobs=1 \
      >/dev/null 2>&1 &
  local fio_pid=$!
  sleep "$((1 + RANDOM % 2)).$((RANDOM % 10))"
  kill_server
  wait "$fio_pid" 2>/dev/null || true
}

pattern () { echo $((0x10 + $1)); }

verify_patterns () {           # verify_patterns URI-or-file ROUNDS [-f raw]
  local target=$1 n=$2 r; shift 2
  for r in $(seq 1 "$n"); do
    qemu-io "$@" -c "read -P $(pattern "$r") $((r * 2))M 1M" "$target" \
      > read.out 2>&1 || { cat read.out; fail "round $r's flushed data is lost"; }
    grep -q "Pattern verification failed" read.out &&
      fail "round $r's flushed data is wrong"
  done
  return 0
}

img=k.qcow2
qemu-img create -q -f qcow2 -o lazy_refcounts=on "$img" 256M
for round in 1 2 3 4 5; do
  : > "$scratch/nbdkit.log"
  start_server "$img"
  qemu-io -f raw -c "write -P $(pattern $round) $((round * 2))M 1M" \
          -c flush "$uri" >/dev/null
  if [ "$round" -gt 1 ]; then
    grep -q "rebuilding its refcounts" "$scratch/nbdkit.log" ||
      fail "round $round: the dirty image was not repaired"
  fi
  fio_until_killed "$round"
  eval "$($patch info "$img")"
  [ $((incompat & 1)) -eq 1 ] || fail "sanity: round $round left no dirty bit"
  # qemu reads it as it is (read-only: no repair).
  verify_patterns "$img" "$round" -r -U
  echo "round $round: killed under writes; file $(stat -c %s "$img") bytes;" \
       "qemu-img check: $(qemu_counts "$img") (leaks corruptions)"
done
start_server "$img"
verify_patterns "$uri" 5 -f raw
qemu-io -f raw -c "write -P 0x99 20M 64k" "$uri" >/dev/null
verify_patterns "$uri" 5 -f raw
stop_server
grep -q "rebuilding its refcounts" "$scratch/nbdkit.log" ||
  fail "final: no repair logged"
check_clean "$img" || fail "not clean after the repair and a clean shutdown"
verify_patterns "$img" 5
echo "ok: five kills with lazy refcounts: repaired, flushed data intact, no errors, no leaks"

# Without lazy refcounts: leaks at most, then none with repair=all.
img=n.qcow2
qemu-img create -q -f qcow2 "$img" 256M
for round in 1 2; do
  : > "$scratch/nbdkit.log"
  start_server "$img" repair=all
  qemu-io -f raw -c "write -P $(pattern $round) $((round * 2))M 1M" \
          -c flush "$uri" >/dev/null
  fio_until_killed "$round"
  check_clean "$img" leaks-ok || fail "round $round: errors after kill -9"
  echo "round $round (no lazy refcounts): $(qemu_counts "$img") (leaks corruptions)"
done
start_server "$img" repair=all
qemu-io -f raw -c "write -P 0x99 20M 64k" "$uri" >/dev/null
stop_server
check_clean "$img" || fail "repair=all left leaks or errors"
verify_patterns "$img" 2
echo "ok: kill -9 without lazy refcounts, then repair=all: no leaks"
