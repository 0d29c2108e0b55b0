# SPDX-License-Identifier: BSD-3-Clause
# Helpers for the encryption tests (sourced after functions.sh).  qemu
# is the oracle: images are made, read and checked by qemu-img/qemu-io
# with the secret, and compared with what the plugin serves.

printf %s 'correct horse' > "$tmp/pw"
printf %s 'battery staple' > "$tmp/pw2"
SEC=(--object "secret,id=s0,file=$tmp/pw" --object "secret,id=s1,file=$tmp/pw2")

# mkenc IMG SIZE OPTS [qemu-img create args...]: an encrypted image with
# the first password (secret s0).  OPTS is extra -o text (may be empty).
mkenc ()
{
    local img=$1 size=$2 o=$3
    shift 3
    retry qemu-img create -q -f qcow2 "${SEC[@]}" \
        -o "encrypt.key-secret=s0${o:+,$o}" "$@" "$img" "$size" ||
        fail "qemu-img create $img ($o) failed"
}

# iopts IMG [SECRET]: --image-opts text for an encrypted image.
iopts ()
{
    echo "driver=qcow2,file.filename=$1,encrypt.key-secret=${2:-s0}"
}

# eqio IMGOPTS < commands: qemu-io on an encrypted image.
eqio ()
{
    local out
    out=$(retry qemu-io "${SEC[@]}" --image-opts "$1" 2>&1) || {
        echo "$out" >&2; fail "qemu-io on $1 failed"; }
    if echo "$out" | grep -qiE 'error|failed|invalid|not supported'; then
        echo "$out" >&2; fail "qemu-io on $1 reported an error"
    fi
}

# eraw IMGOPTS OUT: what qemu reads from an encrypted image.
eraw ()
{
    retry qemu-img convert "${SEC[@]}" --image-opts "$1" -O raw "$2" ||
        fail "qemu-img convert $1 failed"
}

# echeck IMGOPTS: qemu-img check finds neither errors nor leaks.
echeck ()
{
    local r=0
    retry qemu-img check "${SEC[@]}" --image-opts "$1" > "$tmp/check.out" 2>&1 || r=$?
    [ "$r" -eq 0 ] || { cat "$tmp/check.out" >&2; fail "qemu-img check $1 exited $r"; }
}

# plugin_read IMG OUT [params...]: the plugin's view through nbdcopy.
plugin_read ()
{
    local img=$1 out=$2
    shift 2
    nbdkit -U - "$PLUGIN" "file=$img" "$@" --run "nbdcopy \"\$uri\" $out" ||
        fail "reading $img through the plugin failed"
}

# make_ops FILE SIZE N [discard]: a seeded qemu-io workload with
# unaligned writes, write -z (some unaligned) and, if asked, discards.
make_ops ()
{
    local f=$1 size=$2 n=$3 disc=${4:-} i off len
    : > "$f"
    for (( i = 0; i < n; i++ )); do
        rnd 10
        case $R in
            0|1) rnd $(( size - 300000 )); off=$R; rnd 300000; len=$(( R + 1 ))
                 echo "write -z $off $len" >> "$f" ;;
            2) if [ -n "$disc" ]; then
                   rnd $(( size / 65536 - 4 )); off=$(( R * 65536 ))
                   echo "discard $off 131072" >> "$f"
               else
                   rnd $(( size - 1000 )); off=$R; rnd 999; len=$(( R + 1 ))
                   rnd_pattern; echo "write -P $R $off $len" >> "$f"
               fi ;;
            3|4) rnd $(( size - 1000 )); off=$R; rnd 999; len=$(( R + 1 ))
                 rnd_pattern; echo "write -P $R $off $len" >> "$f" ;;
            *) rnd $(( size / 512 - 600 )); off=$(( R * 512 ))
               rnd 600; len=$(( (R + 1) * 512 ))
               rnd_pattern; echo "write -P $R $off $len" >> "$f" ;;
        esac
    done
}

# nbd_qio URI < commands: qemu-io on an NBD export.
nbd_qio ()
{
    local out
    out=$(qemu-io -f raw "$1" 2>&1) || { echo "$out" >&2; fail "qemu-io on $1 failed"; }
    if echo "$out" | grep -qiE 'error|failed|invalid|not supported'; then
        echo "$out" >&2; fail "qemu-io on $1 reported an error"
    fi
}
