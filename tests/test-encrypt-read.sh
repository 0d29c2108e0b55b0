#!/usr/bin/env bash
# Encrypted images, reading: a covering matrix of LUKS ciphers, modes,
# IV generators and hashes, legacy AES, v2 and v3, 4 KiB and 64 KiB
# clusters, each compared with what qemu-img reads with the secret.
# Then the refusals: a wrong or missing password (file untouched) and
# crafted LUKS headers (bad magic, stripes, key-material offsets, key
# size, huge iteration counts), each refused fast with a clear error.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
. "${srcdir:-${0%/*}}/encrypt-lib.sh"
requires python3

size=$((8*1024*1024))
it=encrypt.iter-time=10

# name | -o options | extra create args
# A covering set: every cipher family, mode, IV generator and hash
# appears at least once (test-encrypt-write.sh adds more).
matrix=(
  "luks-default|encrypt.format=luks,$it|"
  "aes128-cbc-essiv-sha1-4k|encrypt.format=luks,$it,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1,cluster_size=4096|"
  "aes192-xts-sha224-v2|encrypt.format=luks,$it,encrypt.cipher-alg=aes-192,encrypt.hash-alg=sha224,compat=0.10|"
  "twofish128-ctr-plain-ripemd160|encrypt.format=luks,$it,encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=ctr,encrypt.ivgen-alg=plain,encrypt.hash-alg=ripemd160|"
  "serpent256-ecb-sha384-4k|encrypt.format=luks,$it,encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=ecb,encrypt.hash-alg=sha384,cluster_size=4096|"
  "cast5-cbc-plain64-sha512|encrypt.format=luks,$it,encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha512|"
  "legacy-aes-v3|encrypt.format=aes|"
  "legacy-aes-v2-4k|encrypt.format=aes,compat=0.10,cluster_size=4096|"
)

# qemu-img spends about a second of CPU calibrating PBKDF2 for each
# LUKS image: make them two at a time.
pids=()
for m in "${matrix[@]}"; do
    IFS='|' read -r name o extra <<< "$m"
    ( mkenc "$tmp/$name.qcow2" "$size" "$o" ) > "$tmp/$name.log" 2>&1 &
    pids+=($!)
    if [ ${#pids[@]} -ge 2 ]; then
        wait "${pids[0]}" || { cat "$tmp"/*.log; fail "qemu-img create failed"; }
        pids=("${pids[@]:1}")
    fi
done
for p in "${pids[@]}"; do
    wait "$p" || { cat "$tmp"/*.log; fail "qemu-img create failed"; }
done

n=0
for m in "${matrix[@]}"; do
    IFS='|' read -r name o extra <<< "$m"
    img=$tmp/$name.qcow2
    n=$(( n + 1 ))
    {
        rnd_pattern; echo "write -P $R 0 1M"
        rnd_pattern; echo "write -P $R 3000 70001"
        echo "write -z 200000 5000"
        rnd_pattern; echo "write -P $R $(( size - 4096 )) 4096"
        rnd_pattern; echo "write -P $R 5000000 777"
    } | eqio "$(iopts "$img")"
    eraw "$(iopts "$img")" "$tmp/exp.raw"
    plugin_read "$img" "$tmp/got.raw" password=+"$tmp/pw"
    cmp "$tmp/exp.raw" "$tmp/got.raw" || fail "$name: content differs"
    # Unaligned reads decrypt whole sectors and copy out the middle.
    [ $(( n % 3 )) -eq 1 ] || { echo "$name: ok"; continue; }
    nbdkit -U - "$PLUGIN" file="$img" password=+"$tmp/pw" --run \
        "qemu-io -f raw \"\$uri\" -c 'read -v 2999 37' -c 'read -v 1048570 700'" \
        > "$tmp/got.txt" || fail "$name: unaligned read failed"
    qemu-io "${SEC[@]}" --image-opts "$(iopts "$img")" \
        -c 'read -v 2999 37' -c 'read -v 1048570 700' > "$tmp/exp.txt"
    diff <(grep '^0' "$tmp/exp.txt") <(grep '^0' "$tmp/got.txt") ||
        fail "$name: unaligned read differs"
    echo "$name: ok"
done

# ---- an internal snapshot of a LUKS image, served read-only ----
img=$tmp/aes128-cbc-essiv-sha1-4k.qcow2
retry qemu-img snapshot "${SEC[@]}" --image-opts "$(iopts "$img")" -c s1 ||
    fail "qemu-img snapshot failed"
rnd_pattern; echo "write -P $R 0 100000" | eqio "$(iopts "$img")"
retry qemu-img convert "${SEC[@]}" --image-opts "$(iopts "$img")" \
    -l snapshot.name=s1 -O raw "$tmp/exp.raw" || fail "convert -l s1 failed"
plugin_read "$img" "$tmp/got.raw" password=+"$tmp/pw" snapshot=s1
cmp "$tmp/exp.raw" "$tmp/got.raw" || fail "snapshot of a LUKS image differs"
echo "snapshot: ok"

# ---- the filter (qcow2-password=) over nbdkit's file plugin ----
if [ -n "${FILTER:-}" ] && [ -f "$FILTER" ]; then
    img=$tmp/luks-default.qcow2
    eraw "$(iopts "$img")" "$tmp/exp.raw"
    nbdkit -U - --filter="$FILTER" file "$img" qcow2-password=+"$tmp/pw" \
        --run "nbdcopy \"\$uri\" $tmp/got.raw" || fail "filter read failed"
    cmp "$tmp/exp.raw" "$tmp/got.raw" || fail "filter: content differs"
    echo "filter: ok"
fi

# ---- refusals: the file is never modified ----
img=$tmp/luks-default.qcow2
cp "$img" "$tmp/before"
out=$(nbdkit -U - "$PLUGIN" file="$img" password=+"$tmp/pw2" --run true 2>&1) &&
    fail "wrong password accepted"
echo "$out" | grep -q "invalid password" || fail "wrong password: '$out'"
echo "$out" | grep -q "luks-default.qcow2" || fail "error does not name the file: '$out'"
out=$(nbdkit -U - "$PLUGIN" file="$img" --run true 2>&1) &&
    fail "missing password accepted"
echo "$out" | grep -q "password=" || fail "missing password: '$out'"
cmp "$img" "$tmp/before" || fail "a failed start modified the file"
# Legacy AES has no check: a wrong password reads garbage.
img=$tmp/legacy-aes-v3.qcow2
eraw "$(iopts "$img")" "$tmp/exp.raw"
plugin_read "$img" "$tmp/got.raw" password=+"$tmp/pw2"
cmp -s "$tmp/exp.raw" "$tmp/got.raw" && fail "legacy AES: wrong password read the plaintext"
nbdkit -U - "$PLUGIN" file="$img" --run true 2>&1 | grep -q "password=" ||
    fail "legacy AES: no error naming password="

# ---- crafted LUKS headers ----
# patch IMG FIELD VALUE: find the LUKS header by its magic and write a
# big-endian value (FIELD: magic, keybytes, stripes0, kmo0, iter0,
# iterall, mkiter, cipher).
patch ()
{
    python3 - "$@" <<'PY'
import struct, sys
path, field, value = sys.argv[1], sys.argv[2], sys.argv[3]
d = bytearray(open(path, 'rb').read())
h = d.find(b'LUKS\xba\xbe')
assert h > 0
def u32(off, v): d[h+off:h+off+4] = struct.pack('>I', v)
v = int(value, 0) if field != 'cipher' else 0
if field == 'magic': d[h] = ord('X')
elif field == 'keybytes': u32(108, v)
elif field == 'stripes0': u32(208 + 44, v)
elif field == 'kmo0': u32(208 + 40, v)
elif field == 'iter0': u32(208 + 4, v)
elif field == 'iterall':
    for i in range(8): u32(208 + 48*i + 4, v)
elif field == 'mkiter': u32(164, v)
elif field == 'payload': u32(104, v)
elif field == 'cipher': d[h+8:h+40] = value.encode().ljust(32, b'\0')
else:
    # The full-disk-encryption extension (offset u64, length u64).
    e = d.find(b'\x05\x37\xbe\x77', 72, 65536)
    assert e > 0
    off, ln = struct.unpack('>QQ', d[e+8:e+24])
    if field == 'extoff': off += int(value, 0)
    elif field == 'extlen': ln = int(value, 0)
    elif field == 'extl1': off = struct.unpack('>Q', d[40:48])[0]
    elif field == 'noext': d[e:e+4] = b'\0\0\0\0'
    d[e+8:e+24] = struct.pack('>QQ', off, ln) if field != 'noext' else d[e+8:e+24]
open(path, 'wb').write(d)
PY
}
crafted=(
  "magic 0|bad magic"
  "keybytes 1000|invalid key size"
  "keybytes 16|"
  "stripes0 1|stripes"
  "stripes0 0xffffffff|stripes"
  "kmo0 0xffffffff|outside the LUKS area"
  "kmo0 0|outside the LUKS area"
  "kmo0 512|overlap"
  "iter0 0xffffffff|out of range"
  "iterall 0|out of range"
  "mkiter 0xffffffff|out of range"
  "cipher blowfish|unsupported cipher"
  "payload 8|overlaps the payload"
  "extoff 512|misaligned"
  "extlen 0x100000000|too large"
  "extlen 100|only 100 bytes"
  "extl1 0|overlaps"
  "noext 0|without a full-disk-encryption header extension"
)
for c in "${crafted[@]}"; do
    IFS='|' read -r field expect <<< "$c"
    cp "$tmp/luks-default.qcow2" "$tmp/bad.qcow2"
    patch "$tmp/bad.qcow2" $field
    cp "$tmp/bad.qcow2" "$tmp/before"
    start=$(date +%s)
    out=$(timeout 20 nbdkit -U - "$PLUGIN" file="$tmp/bad.qcow2" \
          password=+"$tmp/pw" --run true 2>&1) &&
        fail "crafted header ($field) accepted"
    [ $(( $(date +%s) - start )) -le 5 ] || fail "crafted header ($field) took too long"
    [ -z "$expect" ] || echo "$out" | grep -q "$expect" ||
        fail "crafted header ($field): '$out'"
    echo "$out" | grep -q "bad.qcow2" || fail "error does not name the file: '$out'"
    cmp "$tmp/bad.qcow2" "$tmp/before" || fail "crafted header ($field) modified the file"
    echo "crafted $field: $out"
done
