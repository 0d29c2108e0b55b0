#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# create=true refusals: an existing file (left unchanged), bad sizes,
# incompatible options (qemu-img's refusals), creation-only options
# without create=true, unwritable or missing directories, and a write
# failure in the middle of creation.  Each gets a clear error, and no
# file is created, changed or left behind.
source "${srcdir:-$(dirname "$0")}/functions.sh"

w=$tmp/work
mkdir "$w"
echo "not an image" > "$w/exist.qcow2"
mkimg "$w/image.qcow2" 1M
echo "data" > "$w/exist.data"
qemu-img create -q -f raw "$w/base.raw" 1M
listing ()
{
    (cd "$w" && ls -A && sha256sum -- *)
}
before=$(listing)

# refuse PATTERN ARGS...: refused with a message matching PATTERN,
# and the directory exactly as it was.
refuse ()
{
    local pat=$1
    shift
    expect_refused "$pat" "" "$@"
    [ "$(listing)" = "$before" ] || {
        diff <(echo "$before") <(listing) >&2 || true
        fail "refusing $* changed the directory"
    }
}

new=$w/new.qcow2
c=(file="$new" create=true)

# Existing files are never replaced.
refuse 'already exists' file="$w/exist.qcow2" create=true size=1M
refuse 'already exists' file="$w/image.qcow2" create=true size=1M
refuse 'data file .*already exists' "${c[@]}" size=1M data-file="$w/exist.data"

# Sizes.
refuse 'size= is required' "${c[@]}"
refuse 'size' "${c[@]}" size=abc
refuse 'size' "${c[@]}" size=-1M
refuse 'too large' "${c[@]}" size=1E cluster-size=512
refuse 'cluster-size must be a power of two' "${c[@]}" size=1M cluster-size=3000
refuse 'cluster-size must be a power of two' "${c[@]}" size=1M cluster-size=4M
refuse 'cluster-size must be a power of two' "${c[@]}" size=1M cluster-size=256
refuse 'refcount-bits must be a power of two' "${c[@]}" size=1M refcount-bits=3
refuse 'refcount-bits must be a power of two' "${c[@]}" size=1M refcount-bits=128
refuse 'refcount-bits' "${c[@]}" size=1M refcount-bits=0

# Incompatible combinations, as qemu-img refuses them.
refuse 'extended-l2 needs a cluster-size of at least 16K' \
    "${c[@]}" size=1M extended-l2=true cluster-size=8K
for opt in lazy-refcounts=true extended-l2=true refcount-bits=8 \
           compression-type=zstd data-file="$w/new.data"; do
    refuse 'needs compat=1.1' "${c[@]}" size=1M compat=0.10 "$opt"
done
refuse 'data-file-raw=true needs data-file' "${c[@]}" size=1M data-file-raw=true
refuse 'backing file and data-file-raw=true cannot be used together' \
    "${c[@]}" size=1M data-file="$w/new.data" data-file-raw=true \
    backing="$w/base.raw" backing-format=raw
refuse 'backing file and preallocation= can only be used together with extended-l2=true' \
    "${c[@]}" backing="$w/base.raw" backing-format=raw preallocation=metadata
refuse 'needs backing-format' "${c[@]}" backing="$w/base.raw"
refuse 'backing file .*(No such file|not a qcow2)' "${c[@]}" \
    backing="$w/missing.raw" backing-format=raw
refuse 'not a qcow2 image' "${c[@]}" backing="$w/base.raw" backing-format=qcow2
refuse 'backing=none cannot be used' "${c[@]}" size=1M backing=none
refuse 'snapshot= cannot be used' "${c[@]}" size=1M snapshot=1
refuse 'not one of' "${c[@]}" size=1M compression-type=lz4
refuse 'not one of' "${c[@]}" size=1M preallocation=sparse
refuse 'not one of' "${c[@]}" size=1M compat=1.0
refuse 'not one of' "${c[@]}" size=1M encrypt-format=twofish password=x
refuse 'encrypt-format= needs password=' "${c[@]}" size=1M encrypt-format=aes
refuse 'apply only to encrypt-format=luks' "${c[@]}" size=1M \
    encrypt-format=aes encrypt-cipher-alg=aes-256 password=x
refuse 'not one of' "${c[@]}" size=1M encrypt-format=luks \
    encrypt-cipher-alg=rot13 password=x
refuse 'not one of' "${c[@]}" size=1M encrypt-format=luks \
    encrypt-ivgen-hash-alg=crc32 password=x
# Refused only when the new image is opened (after creation): the
# image and its data file are removed again.
refuse 'compress=true cannot be used with an encrypted image' \
    "${c[@]}" size=1M encrypt-format=aes password=x compress=true
refuse 'compress=true cannot be used with an external data file' \
    "${c[@]}" size=1M data-file="$w/new.data" compress=true

# Creation options without create=true.
for opt in size=1M cluster-size=4K compat=0.10 refcount-bits=16 \
           extended-l2=true compression-type=zstd lazy-refcounts=true \
           preallocation=full data-file-raw=true encrypt-format=aes \
           encrypt-iter-time=10; do
    refuse "$(echo "${opt%%=*}" | sed 's/-/./g')= is only valid with create=true" \
        file="$w/image.qcow2" "$opt"
done
refuse 'is only valid with create=true' file="$w/image.qcow2" create=false size=1M

# The filter parses the same options but cannot create its plugin's
# export; its messages carry its prefix.
if [ -n "${FILTER:-}" ] && [ -f "$FILTER" ]; then
    for args in "qcow2-create=true qcow2-size=1M|qcow2-create=true: the filter does not create images" \
                "qcow2-size=1M|qcow2-size= is only valid with qcow2-create=true"; do
        r=0
        # shellcheck disable=SC2086
        nbdkit -U - -r file "$w/image.qcow2" --filter="$FILTER" ${args%%|*} \
            --run 'nbdinfo --size "$uri"' > "$tmp/filter.log" 2>&1 || r=$?
        [ $r -ne 0 ] && grep -q -- "${args#*|}" "$tmp/filter.log" ||
            { cat "$tmp/filter.log" >&2; fail "filter: ${args%%|*} not refused"; }
        [ "$(listing)" = "$before" ] || fail "the filter changed the directory"
        echo "ok: filter refused ${args%%|*}: $(head -1 "$tmp/filter.log")"
    done
fi

# Directories: missing, not a directory, read-only.
refuse 'No such file' file="$w/missing/new.qcow2" create=true size=1M
refuse 'Not a directory' file="$w/exist.data/new.qcow2" create=true size=1M
refuse 'does not name a file' file="$w/" create=true size=1M
ro=$tmp/ro
mkdir "$ro"
if mount -t tmpfs -o ro,size=1M tmpfs "$ro" 2>/dev/null ||
   mount --bind -o ro "$w" "$ro" 2>/dev/null; then
    cleanup_fn umount "$ro"
    rolist=$(ls -A "$ro")
    expect_refused 'cannot create a temporary file.*Read-only' "" \
        file="$ro/new.qcow2" create=true size=1M
    [ "$(ls -A "$ro")" = "$rolist" ] || fail "read-only directory changed"
    umount "$ro"
else
    echo "note: cannot mount here; read-only directory case skipped"
fi

# A write failing in the middle of creation (the file size limit, as
# a full disk would) leaves nothing behind: neither the image, nor the
# data file, nor a temporary file.
# The limits (KiB) fall in the header, the refcount table, the L1
# table, the preallocated data and the data file.
for case in "1|" "100|" "190|" "4096|" "100|data-file=$w/new.data" \
            "4096|data-file=$w/new.data"; do
    lim=${case%%|*} extra=${case#*|}
    r=0
    (
        trap '' XFSZ
        ulimit -f "$lim"
        # shellcheck disable=SC2086
        exec nbdkit -U - -r "$PLUGIN" "${c[@]}" size=64M \
            preallocation=full $extra --run 'nbdinfo --size "$uri"'
    ) > "$tmp/xfsz.log" 2>&1 || r=$?
    [ $r -ne 0 ] || fail "creation beyond the file size limit succeeded"
    grep -qi 'File too large' "$tmp/xfsz.log" ||
        { cat "$tmp/xfsz.log" >&2; fail "no clear error for the failed write"; }
    [ "$(listing)" = "$before" ] || {
        diff <(echo "$before") <(listing) >&2 || true
        fail "a failed creation left files behind ($lim KiB, $extra)"
    }
    echo "ok: failed write during creation ($lim KiB, $extra): $(grep -i -m1 'File too large' "$tmp/xfsz.log")"
done

# Killed in the middle of creating: FILE never exists half-made (a
# hidden temporary file may stay behind).
k=$tmp/kill
mkdir "$k"
nbdkit -f -U "$k/sock" "$PLUGIN" file="$k/new.qcow2" create=true size=512M \
    preallocation=full > "$k/log" 2>&1 &
kpid=$!
for _ in $(seq 100); do
    ls -A "$k" | grep -q '^\.new\.qcow2\.' && break
    sleep 0.01
done
kill -9 "$kpid"
wait "$kpid" 2>/dev/null || true
[ ! -e "$k/new.qcow2" ] || fail "kill -9 during creation left $k/new.qcow2"
echo "ok: killed during creation: no new.qcow2 ($(ls -A "$k" | tr '\n' ' '))"
rm -rf "$k"

# A full disk, if a small tmpfs can be mounted.
full=$tmp/full
mkdir "$full"
if mount -t tmpfs -o size=1M tmpfs "$full" 2>/dev/null; then
    cleanup_fn umount "$full"
    expect_refused 'No space left' "" file="$full/new.qcow2" create=true \
        size=64M preallocation=full
    [ -z "$(ls -A "$full")" ] || { ls -la "$full" >&2; fail "ENOSPC left files"; }
    umount "$full"
fi

# And the same options succeed where they should (the test can fail).
nbdkit -U - "$PLUGIN" "${c[@]}" size=1M --run 'nbdinfo --size "$uri"' \
    > "$tmp/ok.log" 2>&1 || { cat "$tmp/ok.log" >&2; fail "plain create failed"; }
[ "$(cat "$tmp/ok.log")" = 1048576 ] || fail "new image has the wrong size"
echo "ok: all refusals clean"
