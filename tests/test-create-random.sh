#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true against qemu-img create on seeded random option sets,
# valid and invalid: the plugin must accept exactly what qemu-img
# accepts, and then make an image that qemu-img info describes the same
# way, of the same file size, that qemu-img check finds clean (and, for
# most sets, byte for byte the same file).
source "${srcdir:-$(dirname "$0")}/functions.sh"
requires python3

d=$tmp/r
mkdir "$d"
qemu-img create -q -f raw "$d/base.raw" 20M

pick ()
{
    local -a a=("$@")
    rnd ${#a[@]}
    P=${a[R]}
}

N=${CREATE_RANDOM_N:-60}
same=0 refused=0
for (( i = 0; i < N; i++ )); do
    opts=()
    pick 512 1024 4096 8192 16384 16384 65536 65536 65536 131072 2097152 3000
    opts+=("cluster-size=$P")
    pick 1.1 1.1 1.1 1.1 0.10; opts+=("compat=$P")
    pick 16 16 16 16 1 2 4 8 32 64 64 3; opts+=("refcount-bits=$P")
    pick off off off on; [ "$P" = on ] && opts+=("extended-l2=on")
    pick off off off on; [ "$P" = on ] && opts+=("lazy-refcounts=on")
    pick zlib zlib zstd; opts+=("compression-type=$P")
    pick off off off metadata metadata falloc full; opts+=("preallocation=$P")
    prealloc=$P
    pick 0 1000 1048576 16777216 104857600 1073741824
    size=$P
    case $prealloc in falloc|full) [ "$size" -le 16777216 ] || size=16777216 ;; esac
    pick none none none raw; [ "$P" = raw ] && opts+=("backing=$d/base.raw" "backing-format=raw")

    qobj=()
    pick none none none none aes
    if [ "$P" = aes ]; then
        opts+=("encrypt-format=aes" "password=pw$i")
        qobj=(--object "secret,id=s0,data=pw$i")
    fi

    qo=''
    for w in "${opts[@]}"; do
        k=${w%%=*} v=${w#*=}
        case $k in
            password) k=encrypt.key-secret v=s0 ;;
            encrypt-format) k=encrypt.format ;;
            backing) k=backing_file ;;
            backing-format) k=backing_fmt ;;
        esac
        case $k in encrypt.*) ;; *) k=${k//-/_} ;; esac
        qo+=${qo:+,}$k=$v
    done
    echo "--- $i: size=$size ${opts[*]}"
    rm -f "$d/p.qcow2" "$d/q.qcow2"
    qr=0
    qemu-img create -q -f qcow2 "${qobj[@]}" -o "$qo" "$d/q.qcow2" "$size" > "$d/q.log" 2>&1 || qr=$?
    pr=0
    nbdkit -U - -r "$PLUGIN" file="$d/p.qcow2" create=true size="$size" "${opts[@]}" \
        --run 'nbdinfo --size "$uri" >/dev/null' > "$d/p.log" 2>&1 || pr=$?
    if [ $qr -ne 0 ]; then
        [ $pr -ne 0 ] || { cat "$d/q.log"; fail "$i: qemu-img refuses this, the plugin accepted it"; }
        [ ! -e "$d/p.qcow2" ] || fail "$i: refused, but the file was made"
        echo "ok: both refuse: qemu-img: $(head -1 "$d/q.log" | cut -c1-100); plugin: $(grep -m1 error "$d/p.log" | cut -c1-100)"
        refused=$(( refused + 1 ))
        continue
    fi
    [ $pr -eq 0 ] || { cat "$d/p.log" >&2; fail "$i: qemu-img accepts this, the plugin refused it"; }
    for f in p q; do
        qemu-img info --output=json "$d/$f.qcow2" |
            python3 -c 'import json,sys
j = json.load(sys.stdin)
for k in ("filename", "actual-size"):
    j.pop(k, None)
print(json.dumps(j, indent=1, sort_keys=True))' > "$d/$f.info"
    done
    diff -u "$d/q.info" "$d/p.info" || fail "$i: qemu-img info differs (- qemu-img create, + plugin)"
    chk=("$d/p.qcow2")
    [ ${#qobj[@]} -eq 0 ] || chk=("${qobj[@]}" --image-opts
        "driver=qcow2,file.filename=$d/p.qcow2,encrypt.key-secret=s0")
    qemu-img check "${chk[@]}" > "$d/check.out" 2>&1 ||
        { cat "$d/check.out" >&2; fail "$i: qemu-img check"; }
    ps=$(stat -c %s "$d/p.qcow2") qs=$(stat -c %s "$d/q.qcow2")
    # qemu-img sometimes outgrows its first refcount table and moves it
    # (preallocation, or small clusters); we size ours up front, so then
    # the layouts differ.  Otherwise the file size must be qemu-img's.
    moved=$(python3 -c 'import struct, sys
h = open(sys.argv[1], "rb").read(64)
cs = 1 << struct.unpack(">I", h[20:24])[0]
print(int(struct.unpack(">Q", h[48:56])[0] != cs))' "$d/q.qcow2")
    if [ "$moved" = 1 ]; then
        echo "ok: same info as qemu-img create, check clean (qemu-img moved its refcount table; sizes $ps and $qs)"
        continue
    fi
    [ "$ps" = "$qs" ] || fail "$i: file size $ps, qemu-img makes $qs"
    if cmp -s "$d/p.qcow2" "$d/q.qcow2"; then
        same=$(( same + 1 ))
        echo "ok: same as qemu-img create, byte for byte"
    else
        echo "ok: same info and file size as qemu-img create, check clean (layout differs)"
    fi
done
echo "ok: $N option sets: $refused refused by both, $same byte-identical"
