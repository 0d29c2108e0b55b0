#!/usr/bin/env bash
# Images and parameters that must be refused at open, cleanly (no
# crash, no hang) and with a message that says why and, where a file
# is at fault, names it: not qcow2 at all, qcow version 1, a bad
# version number, truncated headers, unknown incompatible features,
# missing file, a directory, no file= parameter, encrypted images
# (LUKS and legacy AES), backing formats other than raw and qcow2
# (recorded in the image or given as backing-format=), bad parameters.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"

# A valid image to derive broken ones from (checked to be served).
good=$tmp/good.qcow2
mkimg "$good" 8M
random_fill "$good" 8M n=10
compare_read "$good"

# patch FILE OFFSET HEXBYTES: overwrite bytes in place.
patch ()
{
    /usr/bin/python3 -c '
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2]))
    f.write(bytes.fromhex(sys.argv[3]))' "$@"
}

# Not qcow2: seeded junk, zeros, an empty file, a raw disk image.
gen_bytes 1048576 random > "$tmp/junk.img"
expect_refused "junk\.img.*(qcow2|magic)|(qcow2|magic).*junk\.img" "$tmp/junk.img"
head -c 1048576 /dev/zero > "$tmp/zeros.img"
expect_refused "zeros\.img" "$tmp/zeros.img"
: > "$tmp/empty.img"
expect_refused "empty\.img" "$tmp/empty.img"
qemu-img create -q -f raw "$tmp/disk.raw" 8M
expect_refused "disk\.raw" "$tmp/disk.raw"

# qcow version 1, and qcow2 headers with version 1, 4 and 0xffffffff.
qemu-img create -q -f qcow "$tmp/old.qcow" 8M
expect_refused "old\.qcow" "$tmp/old.qcow"
for v in 00000001 00000004 ffffffff; do
    cp "$good" "$tmp/ver$v.qcow2"
    patch "$tmp/ver$v.qcow2" 4 "$v"
    expect_refused "ver$v\.qcow2.*version|version.*ver$v" "$tmp/ver$v.qcow2"
done

# Truncated: only the first 40 bytes, and the header without the rest.
head -c 40 "$good" > "$tmp/trunc40.qcow2"
expect_refused "trunc40\.qcow2" "$tmp/trunc40.qcow2"
head -c 512 "$good" > "$tmp/trunc512.qcow2"
expect_refused "trunc512\.qcow2" "$tmp/trunc512.qcow2"

# An unknown incompatible feature bit (bit 40) must be refused.
cp "$good" "$tmp/feature.qcow2"
patch "$tmp/feature.qcow2" 72 0000010000000000
expect_refused "feature\.qcow2" "$tmp/feature.qcow2"

# Missing file, a directory, no file= at all.
expect_refused "no-such-file\.qcow2" "$tmp/no-such-file.qcow2"
expect_refused "${tmp##*/}" "$tmp"
expect_refused "file=|file" ""

# Encrypted images without password= are refused, naming the file.
retry qemu-img create -q -f qcow2 --object secret,id=sec0,data=s3cr3t \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 \
    "$tmp/luks.qcow2" 8M || fail "qemu-img create luks.qcow2 failed"
qemu-img info "$tmp/luks.qcow2" | grep -q 'encrypted: yes' ||
    fail "sanity: luks.qcow2 is not encrypted"
expect_refused "luks\.qcow2.*encrypt|encrypt.*luks\.qcow2" "$tmp/luks.qcow2"
if retry qemu-img create -q -f qcow2 --object secret,id=sec0,data=s3cr3t \
       -o encrypt.format=aes,encrypt.key-secret=sec0 "$tmp/aes.qcow2" 8M 2>/dev/null
then
    expect_refused "aes\.qcow2.*encrypt|encrypt.*aes\.qcow2" "$tmp/aes.qcow2"
else
    echo "note: this qemu-img cannot create AES-encrypted images; not tested"
fi
# ... even when only its backing file is encrypted.
mkimg "$tmp/over-luks.qcow2" 8M -b "$tmp/luks.qcow2" -F qcow2
expect_refused "luks\.qcow2" "$tmp/over-luks.qcow2"

# Backing formats other than raw and qcow2.
qemu-img create -q -f vmdk "$tmp/base.vmdk" 8M
mkimg "$tmp/over-vmdk.qcow2" 8M -b "$tmp/base.vmdk" -F vmdk
expect_refused "vmdk" "$tmp/over-vmdk.qcow2"
mkimg "$tmp/over-good.qcow2" 8M -b "$good" -F qcow2
expect_refused "backing-format|vmdk" "$tmp/over-good.qcow2" backing-format=vmdk
expect_refused "backing-format|qcow3" "$tmp/over-good.qcow2" backing-format=qcow3
expect_refused "backing-format|format" "$tmp/over-good.qcow2" backing-format=

# Bad parameter values and unknown parameters.
expect_refused "l2-cache-size|size" "$good" l2-cache-size=lots
expect_refused "nosuchparam" "$good" nosuchparam=1
