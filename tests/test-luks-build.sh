#!/usr/bin/env bash
# q2_luks_build_header (for image creation), checked by qemu: take a
# qemu-img-made LUKS image, overwrite its LUKS area with a header built
# for a new password (and, in one case, another cipher of the same key
# size), then qemu-img/qemu-io must open it with the new password and
# read back what was written through them and through the plugin.
# cryptsetup luksDump, where installed, must accept the header too.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
. "${srcdir:-${0%/*}}/functions.sh"
. "${srcdir:-${0%/*}}/encrypt-lib.sh"
build=${top_builddir:-.}/tests/luks-build
[ -x "$build" ] || fail "$build not built"

size=$((4*1024*1024))
it=encrypt.iter-time=10
# name | qemu-img options | builder args (cipher mode ivgen ivhash hash)
cases=(
  "default|encrypt.format=luks,$it|- - - - -"
  "serpent-cbc|encrypt.format=luks,$it,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,cluster_size=4096|serpent-128 cbc plain64 - ripemd160"
  "twofish-essiv|encrypt.format=luks,$it,encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,compat=0.10|twofish-256 cbc essiv sha256 sha1"
)
for cs in "${cases[@]}"; do
    IFS='|' read -r name o args <<< "$cs"
    img=$tmp/$name.qcow2
    mkenc "$img" "$size" "$o"
    "$build" "$img" "$(cat "$tmp/pw2")" $args || fail "$name: builder failed"
    if command -v cryptsetup >/dev/null; then
        python3 -c "
import sys; d = open(sys.argv[1], 'rb').read(); h = d.find(b'LUKS\xba\xbe')
open(sys.argv[2], 'wb').write(d[h:h + 2*1024*1024])" "$img" "$tmp/hdr"
        cryptsetup luksDump "$tmp/hdr" > /dev/null || fail "$name: cryptsetup rejects the header"
        # cryptsetup's own key-slot code must unlock it with the new
        # password, and only with it.
        printf %s "$(cat "$tmp/pw2")" > "$tmp/key"
        # Ciphers the kernel's user-space crypto API lacks need
        # device-mapper, which a container may not have: note, skip.
        if cryptsetup open --test-passphrase --key-file "$tmp/key" \
               "$tmp/hdr" 2> "$tmp/cs.err"; then
            printf %s "$(cat "$tmp/pw2")x" > "$tmp/key"
            cryptsetup open --test-passphrase --key-file "$tmp/key" \
                "$tmp/hdr" 2>/dev/null &&
                fail "$name: cryptsetup unlocks with a wrong password"
            echo "$name: cryptsetup unlocks the header"
        elif grep -q device-mapper "$tmp/cs.err"; then
            echo "note: $name: cryptsetup needs device-mapper here: $(cat "$tmp/cs.err")"
        else
            cat "$tmp/cs.err" >&2
            fail "$name: cryptsetup cannot unlock the header"
        fi
    fi
    qemu-img info "$img" > "$tmp/info"
    case $args in serpent*) grep -q 'cipher alg: serpent-128' "$tmp/info" ||
        { cat "$tmp/info"; fail "$name: qemu-img info does not show serpent"; } ;; esac
    # The old password no longer opens it; the new one does.
    qemu-img convert "${SEC[@]}" --image-opts "$(iopts "$img" s0)" -O raw \
        "$tmp/x" 2>/dev/null && fail "$name: the old password still works"
    make_ops "$tmp/ops" "$size" 15
    eqio "$(iopts "$img" s1)" < "$tmp/ops"
    rm -f "$tmp/ref.raw"; truncate -s "$size" "$tmp/ref.raw"
    qio "$tmp/ref.raw" raw < "$tmp/ops"
    eraw "$(iopts "$img" s1)" "$tmp/got.raw"
    cmp "$tmp/ref.raw" "$tmp/got.raw" || fail "$name: qemu reads back other data"
    echeck "$(iopts "$img" s1)"
    plugin_read "$img" "$tmp/plugin.raw" password=+"$tmp/pw2"
    cmp "$tmp/ref.raw" "$tmp/plugin.raw" || fail "$name: the plugin reads other data"
    echo "$name: ok"
done
