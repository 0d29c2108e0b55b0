#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true: a matrix of option sets (CREATE_FILES=1: the half with
# preallocation, backing and data files; see test-create-files.sh).  For each: create through the
# plugin and, before any write, check the image with qemu-img info
# (every field against the options given), qemu-img check, and byte for
# byte against `qemu-img create` with the same options where the
# layouts must agree; then run a seeded random qemu-io workload through
# the plugin and on a raw file, and compare; qemu-img check again.
source "${srcdir:-$(dirname "$0")}/functions.sh"
requires python3 du

info_py=${srcdir:-$(dirname "$0")}/create-info.py
d=$tmp/c
mkdir "$d"

# gen_ops FILE SIZE DISCARDS: seeded qemu-io commands, byte-granular.
gen_ops ()
{
    local f=$1 size=$2 discards=$3 i off len kind
    : > "$f"
    for (( i = 0; i < 30; i++ )); do
        rnd 100; kind=$R
        rnd_range 1 $(( 3 * 65536 )); len=$R
        [ "$len" -lt "$size" ] || len=$(( size / 2 ))
        rnd $(( size - len )); off=$R
        if [ "$kind" -lt 15 ]; then
            echo "write -z $off $len" >> "$f"
        elif [ "$kind" -lt $(( 15 + discards )) ]; then
            # Discards cover whole clusters of any size (up to 2M), or
            # the image may keep the data (trim is only advisory).
            off=$(( off / 2097152 * 2097152 )); len=2097152
            [ $(( off + len )) -le "$size" ] || continue
            echo "discard $off $len" >> "$f"
        else
            rnd_pattern
            echo "write -P $R $off $len" >> "$f"
        fi
    done
    rnd_pattern
    echo "write -P $R 0 $(( size < 4096 ? size : 4096 ))" >> "$f"
}

io_ok ()
{
    if grep -qiE 'error|failed|invalid' "$1"; then
        cat "$1" >&2
        fail "qemu-io reported an error ($2)"
    fi
}

# Backing files: a raw one and a qcow2 one with some data.
gen_bytes 4M random > "$d/seed.bin"
qemu-img create -q -f raw "$d/base.raw" 48M
dd if="$d/seed.bin" of="$d/base.raw" bs=1M seek=3 conv=notrunc status=none
mkimg "$d/base.qcow2" 40M
qio "$d/base.qcow2" <<EOF
write -P 0x5a 1M 3M
write -P 0x33 30M 100k
EOF

# name | size | plugin options | qemu-img -o options to compare with
#   ("-": layouts differ by design) | expected qemu-img info fields
#   beyond the defaults | discards in the workload (percent)
matrix=(
"default|64M||cluster_size=65536||10"
"v2|64M|compat=0.10|compat=0.10|compat=0.10 lazy-refcounts=absent extended-l2=absent corrupt=absent|10"
"c512|8M|cluster-size=512|cluster_size=512|cluster-size=512|10"
"c2M|64M|cluster-size=2M|cluster_size=2M|cluster-size=2097152|10"
"rc1|64M|refcount-bits=1|refcount_bits=1|refcount-bits=1|10"
"rc64-4k|32M|refcount-bits=64 cluster-size=4K|refcount_bits=64,cluster_size=4k|refcount-bits=64 cluster-size=4096|10"
"extl2|32M|extended-l2=true cluster-size=16K|extended_l2=on,cluster_size=16k|extended-l2=true cluster-size=16384|10"
"lazy-zstd|64M|lazy-refcounts=true compression-type=zstd|lazy_refcounts=on,compression_type=zstd|lazy-refcounts=true compression-type=zstd|10"
"odd-size|1000|compat=1.1|compat=1.1|virtual-size=1024|0"
"prealloc-meta|64M|preallocation=metadata|preallocation=metadata||10"
"prealloc-meta-extl2|48M|preallocation=metadata extended-l2=on|preallocation=metadata,extended_l2=on|extended-l2=true|10"
"prealloc-falloc|64M|preallocation=falloc|-||10"
"prealloc-full|16M|preallocation=full cluster-size=4k|-|cluster-size=4096|10"
"backing-raw|-|backing=$d/base.raw backing-format=raw|backing_file=$d/base.raw,backing_fmt=raw|virtual-size=50331648 backing-filename=$d/base.raw backing-filename-format=raw|0"
"backing-qcow2|64M|backing=$d/base.qcow2 backing-format=qcow2 compat=0.10|backing_file=$d/base.qcow2,backing_fmt=qcow2,compat=0.10|compat=0.10 lazy-refcounts=absent extended-l2=absent corrupt=absent backing-filename=$d/base.qcow2 backing-filename-format=qcow2|0"
"backing-prealloc-extl2|-|backing=$d/base.raw backing-format=raw preallocation=metadata extended-l2=true|backing_file=$d/base.raw,backing_fmt=raw,preallocation=metadata,extended_l2=on|virtual-size=50331648 extended-l2=true backing-filename=$d/base.raw backing-filename-format=raw|0"
"data-file|64M|data-file=$d/data-file.data|-|data-file=$d/data-file.data data-file-raw=false|10"
"data-file-raw|64M|data-file=$d/data-file-raw.data data-file-raw=true preallocation=falloc|-|data-file=$d/data-file-raw.data data-file-raw=true|0"
)

# Two halves, to keep each test short: the format options here, and
# preallocation, backing and data files in test-create-files.sh.
for row in "${matrix[@]}"; do
    IFS='|' read -r name size popts qopts expect discards <<< "$row"
    case $name in
        prealloc*|backing*|data-file*) files=1 ;;
        *) files=0 ;;
    esac
    [ "$files" = "${CREATE_FILES:-0}" ] || continue
    img=$d/$name.qcow2
    ref=$d/$name.raw
    echo "--- $name: $popts ${size:+size=$size}"
    sizearg=()
    [ "$size" = - ] || sizearg=(size="$size")

    # The reference starts as what the guest sees: the backing file's
    # data, or zeros.
    case $popts in
        *backing=*base.raw*) cp "$d/base.raw" "$ref" ;;
        *backing=*base.qcow2*) qemu-img convert -q -O raw "$d/base.qcow2" "$ref" ;;
        *) : > "$ref" ;;
    esac
    if [ "$size" != - ]; then
        truncate -s "$(to_bytes "$size")" "$ref"
    fi
    vsize=$(stat -c %s "$ref")
    if [ "$name" = odd-size ]; then vsize=1024; truncate -s 1024 "$ref"; fi
    gen_ops "$d/ops" "$vsize" "$discards"

    # shellcheck disable=SC2086
    run_plugin -w "$img" create=true "${sizearg[@]}" $popts -- \
        "cp '$img' '$d/before.qcow2' &&
         stat -c %b '$img' > '$d/blocks0' &&
         qemu-img info --output=json '$img' > '$d/info.json' &&
         qemu-img check '$img' > '$d/check0.out' &&
         qemu-io -f raw \"\$uri\" < '$d/ops' > '$d/io.out' 2>&1" ||
        fail "$name: create and workload through the plugin failed"
    io_ok "$d/io.out" "$name through the plugin"

    # qemu-img info of the new image, with the defaults of the issue.
    # shellcheck disable=SC2086
    python3 "$info_py" "$d/info.json" virtual-size="$vsize" \
        cluster-size=65536 compat=1.1 compression-type=zlib \
        lazy-refcounts=false refcount-bits=16 extended-l2=false \
        corrupt=false data-file=absent backing-filename=absent \
        encrypted=absent $expect ||
        fail "$name: qemu-img info does not match the options"

    # The same image from qemu-img create.
    if [ "$qopts" != - ]; then
        rm -f "$d/q.qcow2"
        qemu-img create -q -f qcow2 -o "$qopts" "$d/q.qcow2" \
            $([ "$size" = - ] || echo "$size")
        cmp "$d/q.qcow2" "$d/before.qcow2" ||
            fail "$name: differs from qemu-img create -o $qopts"
        echo "ok: $name is byte-identical to qemu-img create -o $qopts"
    fi

    qemu-io -f raw "$ref" < "$d/ops" > "$d/io-raw.out" 2>&1
    io_ok "$d/io-raw.out" "$name on the raw file"
    qemu-img check "$img" > "$d/check.out" 2>&1 || {
        cat "$d/check.out" >&2
        fail "$name: qemu-img check after the workload"
    }
    rm -f "$d/got.raw"
    qemu-img convert -q -O raw "$img" "$d/got.raw"
    if ! cmp -s "$ref" "$d/got.raw"; then
        show_diff "$ref" "$d/got.raw"
        fail "$name: the image differs from the raw file after the workload"
    fi
    echo "ok: $name: workload matches the raw file; qemu-img check clean"

    # Preallocation: qemu-img's sizes.
    case $popts in
        *preallocation=falloc*|*preallocation=full*)
            mode=${popts#*preallocation=}; mode=${mode%% *}
            rm -f "$d/q.qcow2" "$d/q.data"
            qo="preallocation=$mode"
            case $popts in *cluster-size=4k*) qo+=",cluster_size=4k" ;; esac
            case $popts in
                *data-file=*) qo+=",data_file=$d/q.data,data_file_raw=on" ;;
            esac
            qemu-img create -q -f qcow2 -o "$qo" "$d/q.qcow2" "$size"
            [ "$(stat -c %s "$d/q.qcow2")" = "$(stat -c %s "$d/before.qcow2")" ] ||
                fail "$name: file size $(stat -c %s "$d/before.qcow2"), qemu-img makes $(stat -c %s "$d/q.qcow2")"
            if [ -e "$d/q.data" ]; then
                [ "$(stat -c %s "$d/q.data")" = "$(stat -c %s "$d/$name.data")" ] ||
                    fail "$name: data file size differs from qemu-img's"
                used=$(( $(stat -c %b "$d/$name.data") * 512 ))
            else
                used=$(( $(cat "$d/blocks0") * 512 ))
            fi
            [ "$used" -ge "$vsize" ] ||
                fail "$name: only $used bytes allocated for $vsize of data"
            qemu-img map --output=json "$d/before.qcow2" > "$d/map.json"
            grep -q '"data": false' "$d/map.json" &&
                fail "$name: qemu-img map shows unallocated ranges"
            echo "ok: $name: preallocated like qemu-img ($used bytes in use)"
            ;;
    esac
    # qemu-img info after the workload: the options still hold.
    # shellcheck disable=SC2086
    python3 "$info_py" <(qemu-img info --output=json "$img") \
        virtual-size="$vsize" \
        cluster-size=65536 compat=1.1 compression-type=zlib \
        lazy-refcounts=false refcount-bits=16 extended-l2=false \
        corrupt=false data-file=absent backing-filename=absent \
        encrypted=absent $expect ||
        fail "$name: qemu-img info after the workload"
    # A raw data file stays the guest disk through every write (no
    # discards in this workload: they are advisory, and ignored there).
    case $popts in
        *data-file-raw=true*)
            cmp "$ref" "$d/$name.data" ||
                fail "$name: the raw data file is not the guest data"
            echo "ok: $name: the raw data file is the guest data"
            ;;
    esac
    rm -f "$ref" "$d/got.raw" "$d/before.qcow2" "$img"
done

# virt-v2v's output pipeline without qemu-img: create, serve, nbdcopy
# --flush a mixed disk into it (plain, preallocated, compressed).
if [ "${CREATE_FILES:-0}" = 1 ]; then
    mixed=$d/mixed.raw
    {
        gen_bytes 2M text
        gen_bytes 1M random
        head -c 1M /dev/zero
    } > "$mixed"
    truncate -s 6M "$mixed"             # and a hole at the end
    gen_bytes 512k text | dd of="$mixed" bs=1k seek=5000 conv=notrunc status=none
    for extra in "" "preallocation=falloc" "compress=true" \
                 "compress=true compression-type=zstd cluster-size=4k"; do
        img=$d/v2v.qcow2
        rm -f "$img"
        # shellcheck disable=SC2086
        run_plugin -w "$img" create=true size=6M $extra -- \
            "nbdcopy --flush '$mixed' \"\$uri\"" ||
            fail "v2v pipeline ($extra): nbdcopy into create=true failed"
        qemu-img compare -q -f raw -F qcow2 "$mixed" "$img" ||
            fail "v2v pipeline ($extra): qemu-img compare: not identical"
        qemu-img check "$img" > "$d/check.out" 2>&1 ||
            { cat "$d/check.out" >&2; fail "v2v pipeline ($extra): check"; }
        case $extra in
            *compress=true*)
                grep -qE ' [1-9][0-9.]*% compressed clusters' "$d/check.out" ||
                    { cat "$d/check.out" >&2; fail "v2v pipeline ($extra): nothing compressed"; } ;;
        esac
        echo "ok: v2v pipeline ($extra): identical, check clean"
    done
fi
