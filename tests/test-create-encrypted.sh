#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true with encryption: AES and LUKS images made by the plugin,
# written through it with a seeded workload, then opened by qemu with
# the secret: qemu-img info (the encryption parameters given),
# qemu-img check, and the guest data against the same workload on a
# raw file.
source "${srcdir:-$(dirname "$0")}/functions.sh"
requires python3

info_py=${srcdir:-$(dirname "$0")}/create-info.py
d=$tmp/c
mkdir "$d"
pw=secret123
printf %s "$pw" > "$d/pw"
size=16777216

# qemu_retry CMD ARGS...: qemu with LUKS and a low iter-time can fail
# now and then under load.
qemu_retry ()
{
    local try
    for try in 1 2 3; do
        "$@" && return 0
        echo "attempt $try failed; retrying" >&2
        sleep 1
    done
    return 1
}

# name | plugin options | expected qemu-img info fields
rows=(
"aes|encrypt-format=aes|encrypt-format=aes"
"aes-v2|encrypt-format=aes compat=0.10|encrypt-format=aes compat=0.10"
"luks|encrypt-format=luks encrypt-iter-time=10|encrypt-format=luks encrypt-cipher-alg=aes-256 encrypt-cipher-mode=xts encrypt-ivgen-alg=plain64 encrypt-hash-alg=sha256"
"luks-cbc-essiv|encrypt-format=luks encrypt-cipher-alg=aes-128 encrypt-cipher-mode=cbc encrypt-ivgen-alg=essiv encrypt-ivgen-hash-alg=sha256 encrypt-hash-alg=sha1 encrypt-iter-time=10 cluster-size=4k|encrypt-format=luks encrypt-cipher-alg=aes-128 encrypt-cipher-mode=cbc encrypt-ivgen-alg=essiv encrypt-ivgen-hash-alg=sha256 encrypt-hash-alg=sha1 cluster-size=4096"
)

for row in "${rows[@]}"; do
    IFS='|' read -r name popts expect <<< "$row"
    echo "--- $name: $popts"
    img=$d/$name.qcow2
    ref=$d/$name.raw
    truncate -s "$size" "$ref"
    ops=$d/ops
    : > "$ops"
    for (( i = 0; i < 20; i++ )); do
        rnd_range 1 200000; len=$R
        rnd $(( size - len )); off=$R
        rnd 100
        if [ "$R" -lt 20 ]; then
            echo "write -z $off $len" >> "$ops"
        else
            rnd_pattern
            echo "write -P $R $off $len" >> "$ops"
        fi
    done
    echo "write -P 0x61 4096 8192" >> "$ops"

    # shellcheck disable=SC2086
    run_plugin -w "$img" create=true size="$size" password=+"$d/pw" $popts -- \
        "cp '$img' '$d/before.qcow2' &&
         qemu-io -f raw \"\$uri\" < '$ops' > '$d/io.out' 2>&1" ||
        fail "$name: create and workload through the plugin failed"
    grep -qiE 'error|failed' "$d/io.out" && { cat "$d/io.out" >&2; fail "$name: qemu-io"; }
    qemu-io -f raw "$ref" < "$ops" > /dev/null

    # Legacy AES has nothing random: qemu-img makes the same bytes.
    case $name in
        aes*)
            rm -f "$d/q.qcow2"
            qo=encrypt.format=aes,encrypt.key-secret=s0
            case $popts in *compat=0.10*) qo+=,compat=0.10 ;; esac
            qemu-img create -q -f qcow2 --object "secret,id=s0,file=$d/pw" \
                -o "$qo" "$d/q.qcow2" "$size"
            cmp "$d/q.qcow2" "$d/before.qcow2" ||
                fail "$name: differs from qemu-img create -o $qo"
            echo "ok: $name is byte-identical to qemu-img create -o $qo" ;;
    esac
    # shellcheck disable=SC2086
    python3 "$info_py" <(qemu-img info --output=json "$img") \
        virtual-size="$size" encrypted=true compat=1.1 $expect ||
        fail "$name: qemu-img info"
    iopts=(--object "secret,id=s0,file=$d/pw" --image-opts
           "driver=qcow2,file.filename=$img,encrypt.key-secret=s0")
    qemu_retry qemu-img check "${iopts[@]}" > "$d/check.out" 2>&1 ||
        { cat "$d/check.out" >&2; fail "$name: qemu-img check"; }
    rm -f "$d/got.raw"
    qemu_retry qemu-img convert -O raw "${iopts[@]}" "$d/got.raw" ||
        fail "$name: qemu-img convert with the secret"
    cmp "$ref" "$d/got.raw" || fail "$name: qemu reads other data than was written"
    # The data is encrypted: the plaintext pattern is not in the file.
    if grep -q aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa "$img"; then
        fail "$name: plaintext in the file"
    fi
    echo "ok: $name: qemu reads the workload with the secret; check clean"
    rm -f "$img" "$ref" "$d/got.raw"
done

# Encryption needs password=.
expect_refused 'needs password' "" file="$d/nopw.qcow2" create=true \
    size=1M encrypt-format=luks
[ ! -e "$d/nopw.qcow2" ] || fail "a refused creation left a file"
