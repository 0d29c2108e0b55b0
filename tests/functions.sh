# nbdkit-qcow2 test helpers.  Sourced by every tests/test-*.sh.
# SPDX-License-Identifier: BSD-3-Clause
#
# Environment (set by tests/Makefile.am.inc, or by hand):
#   PLUGIN    path of nbdkit-qcow2-plugin.so (required)
#   SEED      seed for the randomised content (optional; printed)
#   KEEP=1    keep the temporary directory for inspection
#
# Conventions: exit 0 pass, 77 skip, anything else fail.  Every
# expected value comes from qemu (qemu-img convert, qemu-nbd) or is
# built by the test itself, never from the plugin.

set -e
set -u

export LC_ALL=C
# Debian's python3 carries the nbd module; nbdsh needs it.
PATH=${QCOW2_SANITIZER_BIN:+$QCOW2_SANITIZER_BIN:}/usr/bin:/usr/sbin:$PATH
export PATH

progname=${0##*/}

fail ()
{
    echo "$progname: FAIL: $*" >&2
    exit 1
}

skip ()
{
    echo "$progname: SKIP: $*" >&2
    exit 77
}

# requires CMD...: skip the test unless every command exists.
# retry CMD...: qemu-img and qemu-io with LUKS fail now and then under
# load ("Unable to get accurate CPU usage", from the iteration-time
# calibration); run such commands again, and fail on any other error.
retry ()
{
    local i err
    err=$(mktemp)
    for i in 1 2 3 4 5 6 7 8; do
        if "$@" 2>"$err"; then rm -f "$err"; return 0; fi
        grep -q 'accurate CPU usage' "$err" || break
    done
    cat "$err" >&2
    rm -f "$err"
    return 1
}

requires ()
{
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || skip "$c not installed"
    done
}

requires_nbd_python ()
{
    requires nbdsh python3
    /usr/bin/python3 -c 'import nbd' 2>/dev/null ||
        skip "python3 nbd module not installed"
}

: "${PLUGIN:?PLUGIN must be set to the path of nbdkit-qcow2-plugin.so}"
# A missing plugin is a build failure, not a reason to skip.
test -f "$PLUGIN" || fail "plugin $PLUGIN does not exist (build it first)"

requires nbdkit qemu-img qemu-io nbdcopy cmp

# Plugin or filter.  QCOW2_MODE=filter serves every image through
# nbdkit-qcow2-filter.so ($FILTER) over nbdkit's file plugin instead of
# through the plugin, with the qcow2- prefix on its parameters, so that
# the same tests check both front ends.
QCOW2_MODE=${QCOW2_MODE:-plugin}
case $QCOW2_MODE in
    plugin) ;;
    filter)
        : "${FILTER:?FILTER must be set to the path of nbdkit-qcow2-filter.so}"
        test -f "$FILTER" || fail "filter $FILTER does not exist (build it first)"
        echo "$progname: serving through the filter" ;;
    *) fail "QCOW2_MODE must be plugin or filter, not '$QCOW2_MODE'" ;;
esac

# ---------------------------------------------------------------------
# Temporary directory and clean-up.

tmp=$(mktemp -d "${TMPDIR:-/tmp}/nbdkit-qcow2-test.XXXXXX")
_cleanup_cmds=()

# cleanup_fn CMD ARGS...: run at exit (last registered, first run).
cleanup_fn ()
{
    _cleanup_cmds+=("$(printf '%q ' "$@")")
}

_run_cleanup ()
{
    local status=$? i
    set +e
    for (( i = ${#_cleanup_cmds[@]} - 1; i >= 0; i-- )); do
        eval "${_cleanup_cmds[i]}" >/dev/null 2>&1
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "$progname: kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
    exit $status
}
trap _run_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------
# Seeded pseudo-random numbers.  The generator is a 64-bit LCG in bash
# arithmetic (which wraps modulo 2^64), so the same SEED gives the same
# images on every machine.

if [ -z "${SEED:-}" ]; then
    SEED=$(( ( $(date +%s) * 32768 + RANDOM ) % 1000000000 ))
fi
case $SEED in
    *[!0-9]*|'') fail "SEED must be a non-negative integer, got '$SEED'" ;;
esac
echo "$progname: seed=$SEED (rerun with SEED=$SEED to reproduce)"
_rng=$(( SEED * 2654435761 + 1 ))

# rnd N: set R to a pseudo-random integer in [0, N).
rnd ()
{
    _rng=$(( _rng * 6364136223846793005 + 1442695040888963407 ))
    R=$(( ((_rng >> 33) & 0x7fffffff) % $1 ))
}

# rnd_range LO HI: set R in [LO, HI].
rnd_range ()
{
    rnd $(( $2 - $1 + 1 ))
    R=$(( R + $1 ))
}

# rnd_pattern: set R to a non-zero byte value (so written data is
# distinguishable from zeros).
rnd_pattern ()
{
    rnd 255
    R=$(( R + 1 ))
}

# ---------------------------------------------------------------------
# Image helpers.

# qio IMG [FMT]: run qemu-io commands read from stdin on IMG.
qio ()
{
    local img=$1 fmt=${2:-qcow2} out
    out=$(qemu-io -f "$fmt" "$img" 2>&1) || {
        echo "$out" >&2
        fail "qemu-io on $img failed"
    }
    if echo "$out" | grep -qiE 'error|failed|invalid|not supported'; then
        echo "$out" >&2
        fail "qemu-io on $img reported an error"
    fi
}

# mkimg IMG SIZE [qemu-img create options...]: make a qcow2 image.
mkimg ()
{
    local img=$1 size=$2
    shift 2
    qemu-img create -q -f qcow2 "$@" "$img" "$size"
}

# to_bytes SIZE: print SIZE (with an optional k/K, M, G suffix) in bytes.
to_bytes ()
{
    case $1 in
        *[kK]) echo $(( ${1%[kK]} * 1024 )) ;;
        *M) echo $(( ${1%M} * 1024 * 1024 )) ;;
        *G) echo $(( ${1%G} * 1024 * 1024 * 1024 )) ;;
        *[!0-9]*|'') fail "bad size '$1'" ;;
        *) echo "$1" ;;
    esac
}

# random_fill IMG SIZE [key=value...]: make and apply a seeded list of
# qemu-io commands to IMG (format qcow2 unless fmt= says otherwise).
#   n=COUNT       number of operations (default 40)
#   maxlen=BYTES  longest write (default 1M)
#   align=BYTES   offsets and lengths are multiples of this (default 512;
#                 1 gives byte-granular writes)
#   zeroes=PCT    percentage of operations that are write -z (default 15)
#   discards=PCT  percentage that are discard (default 10)
#   lo=BYTES hi=BYTES  restrict offsets to [lo, hi) (default whole image)
#   fmt=FMT       image format for qemu-io
# The commands are saved in $tmp/ops.<basename>.txt for debugging.
random_fill ()
{
    local img=$1 size
    size=$(to_bytes "$2")
    shift 2
    local n=40 maxlen=$((1024*1024)) align=512 zeroes=15 discards=10
    local lo=0 hi=$size fmt=qcow2 kv
    for kv in "$@"; do
        case $kv in
            n=*) n=${kv#n=} ;;
            maxlen=*) maxlen=$(to_bytes "${kv#maxlen=}") ;;
            align=*) align=$(to_bytes "${kv#align=}") ;;
            zeroes=*) zeroes=${kv#zeroes=} ;;
            discards=*) discards=${kv#discards=} ;;
            lo=*) lo=$(to_bytes "${kv#lo=}") ;;
            hi=*) hi=$(to_bytes "${kv#hi=}") ;;
            fmt=*) fmt=${kv#fmt=} ;;
            *) fail "random_fill: bad option $kv" ;;
        esac
    done
    local ops=$tmp/ops.${img##*/}.txt i off len units kind
    local span=$(( (hi - lo) / align ))
    local maxunits=$(( maxlen / align ))
    [ "$maxunits" -ge 1 ] || maxunits=1
    : > "$ops"
    for (( i = 0; i < n; i++ )); do
        rnd_range 1 "$maxunits"; units=$R
        [ "$units" -le "$span" ] || units=$span
        rnd $(( span - units + 1 )); off=$(( lo + R * align ))
        len=$(( units * align ))
        rnd 100; kind=$R
        if [ "$kind" -lt "$zeroes" ]; then
            echo "write -z $off $len" >> "$ops"
        elif [ "$kind" -lt $(( zeroes + discards )) ]; then
            echo "discard $off $len" >> "$ops"
        else
            rnd_pattern
            echo "write -P $R $off $len" >> "$ops"
        fi
    done
    # Always end with at least one data write so that the image is
    # never all zeros.
    rnd_pattern
    echo "write -P $R $lo $(( align < 4096 && hi - lo >= 4096 ? 4096 : align ))" >> "$ops"
    qio "$img" "$fmt" < "$ops"
}

# ref_raw IMG OUT [qemu-img convert options...]: expected guest data.
ref_raw ()
{
    local img=$1 out=$2
    shift 2
    rm -f "$out"
    qemu-img convert -q "$@" -O raw "$img" "$out" ||
        fail "qemu-img convert of $img failed"
}

# assert_nonzero FILE: a reference made of zeros would let a broken
# plugin pass, so refuse it.
assert_nonzero ()
{
    local f=$1 size
    size=$(stat -c %s "$f")
    [ "$size" -gt 0 ] || fail "sanity: $f is empty"
    if cmp -s -n "$size" "$f" /dev/zero; then
        fail "sanity: reference $f is all zeros; the test would prove nothing"
    fi
}

_plugin_seq=0

# _image_names IMG: print the backing file and the external data file
# that IMG names (absolute; empty lines if none), as qemu-img sees them.
_image_names ()
{
    qemu-img info --output=json "$1" 2>/dev/null |
        /usr/bin/python3 -c '
import json, os, sys
try:
    i = json.load(sys.stdin)
except ValueError:
    i = {}
d = os.path.dirname(os.path.abspath(sys.argv[1]))
b = i.get("full-backing-filename") or i.get("backing-filename") or ""
f = i.get("format-specific", {}).get("data", {}).get("data-file") or ""
print(os.path.join(d, b) if b else "")
print(os.path.join(d, f) if f else "")' "$1" || true
}

# serve_args IMG [plugin args...]: set SERVE to the nbdkit arguments
# that serve IMG with those parameters (IMG may be empty: no file=).
# In filter mode the parameters get the qcow2- prefix, and since the
# filter follows no file an image names, the backing and data files
# qemu-img finds are passed explicitly unless the arguments name them.
serve_args ()
{
    local img=$1 a have_backing=0 have_data=0
    shift
    if [ "$QCOW2_MODE" = plugin ]; then
        SERVE=("$PLUGIN")
        [ -z "$img" ] || SERVE+=(file="$img")
        SERVE+=("$@")
        return
    fi
    SERVE=(--filter="$FILTER" file)
    [ -z "$img" ] || SERVE+=(file="$img")
    for a in "$@"; do
        case $a in
            -*|file=*) SERVE+=("$a") ;;
            backing=*) have_backing=1; SERVE+=("qcow2-$a") ;;
            data-file=*) have_data=1; SERVE+=("qcow2-$a") ;;
            *) SERVE+=("qcow2-$a") ;;
        esac
    done
    if [ -n "$img" ] && [ -f "$img" ]; then
        local names b d
        names=$(_image_names "$img")
        b=$(echo "$names" | sed -n 1p)
        d=$(echo "$names" | sed -n 2p)
        [ "$have_backing" = 1 ] || [ -z "$b" ] || SERVE+=(qcow2-backing="$b")
        [ "$have_data" = 1 ] || [ -z "$d" ] || SERVE+=(qcow2-data-file="$d")
    fi
}

# run_plugin [-w] IMG [plugin args...] -- COMMAND: serve IMG through the
# plugin (read-only unless -w) and run COMMAND (with $uri) against it.
# nbdkit's stderr is saved in $tmp/nbdkit.N.log and shown on failure.
run_plugin ()
{
    local ro=-r
    if [ "$1" = -w ]; then ro=; shift; fi
    local img=$1
    shift
    local args=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do args+=("$1"); shift; done
    [ "${1:-}" = -- ] || fail "run_plugin: missing -- COMMAND"
    shift
    _plugin_seq=$(( _plugin_seq + 1 ))
    local log=$tmp/nbdkit.$_plugin_seq.log r=0
    serve_args "$img" "${args[@]}"
    timeout 600 nbdkit -U - $ro "${SERVE[@]}" \
        --run "$*" 2>"$log" || r=$?
    if [ $r -ne 0 ]; then
        echo "--- nbdkit ${ro} ${SERVE[*]} --run '$*' exited $r; stderr:" >&2
        cat "$log" >&2
        return $r
    fi
}

# show_diff EXPECTED GOT: describe the first difference.
show_diff ()
{
    local exp=$1 got=$2 line byte off start
    line=$(cmp "$exp" "$got" 2>&1 | head -1) || true
    echo "$line" >&2
    case $line in
        *"differ: byte "*|*"differ: char "*)
            byte=${line#*differ: }
            byte=${byte#* }
            byte=${byte%%,*}
            off=$(( byte - 1 ))
            start=$(( off / 16 * 16 ))
            printf 'first difference at guest offset %d (0x%x)\n' "$off" "$off" >&2
            echo "expected (qemu):" >&2
            od -A d -t x1 -j "$start" -N 32 "$exp" >&2
            echo "got (plugin):" >&2
            od -A d -t x1 -j "$start" -N 32 "$got" >&2
            ;;
    esac
}

# compare_read [--expect RAW] [--allow-zero] [-w] IMG [plugin args...]:
# copy IMG through the plugin with nbdcopy and compare with RAW (by
# default: qemu-img convert -O raw IMG).  When plugin args change what
# the guest sees (backing=, data-file=, snapshot=), pass --expect with
# a reference built independently.
compare_read ()
{
    local expect= allow_zero=0 w=
    while [ $# -gt 0 ]; do
        case $1 in
            --expect) expect=$2; shift 2 ;;
            --allow-zero) allow_zero=1; shift ;;
            -w) w=-w; shift ;;
            *) break ;;
        esac
    done
    local img=$1
    shift
    _plugin_seq=$(( _plugin_seq + 1 ))
    local n=$_plugin_seq
    if [ -z "$expect" ]; then
        [ $# -eq 0 ] ||
            fail "compare_read: plugin args '$*' need an explicit --expect"
        expect=$tmp/expect.$n.raw
        ref_raw "$img" "$expect"
    fi
    [ "$allow_zero" = 1 ] || assert_nonzero "$expect"
    local out=$tmp/got.$n.raw
    rm -f "$out"
    run_plugin $w "$img" "$@" -- nbdcopy '"$uri"' "$out" ||
        fail "compare_read: serving ${img##*/} $* failed"
    local es gs
    es=$(stat -c %s "$expect")
    gs=$(stat -c %s "$out")
    if [ "$es" != "$gs" ]; then
        fail "compare_read ${img##*/} $*: size $gs, expected $es"
    fi
    if ! cmp -s "$expect" "$out"; then
        show_diff "$expect" "$out"
        fail "compare_read ${img##*/} $*: contents differ from qemu"
    fi
    echo "ok: read ${img##*/} $*"
    rm -f "$out"
    case $expect in "$tmp"/expect.*) rm -f "$expect" ;; esac
}

# normalise_map < nbdinfo --map output: one "offset length type" line
# per run, adjacent runs of the same type merged.
normalise_map ()
{
    awk '
        NF >= 3 && $1 ~ /^[0-9]+$/ {
            if (have && $3 == t && $1 == o + l) { l += $2; next }
            if (have) print o, l, t
            o = $1; l = $2; t = $3; have = 1
        }
        END { if (have) print o, l, t }
    '
}

# qemu_map IMG OUT [qemu-nbd options...]: the map qemu-nbd gives for
# IMG (opened read-only as qcow2 unless options say otherwise).
qemu_map ()
{
    local img=$1 out=$2
    shift 2
    requires qemu-nbd nbdinfo
    _plugin_seq=$(( _plugin_seq + 1 ))
    local sock=$tmp/qnbd.$_plugin_seq.sock pidf=$tmp/qnbd.$_plugin_seq.pid
    local fmtopt=(-f qcow2)
    case " $* " in *" --image-opts "*|*" -f "*) fmtopt=() ;; esac
    qemu-nbd -r "${fmtopt[@]}" "$@" --persistent --fork \
        --pid-file="$pidf" --socket="$sock" "$img" ||
        fail "qemu-nbd could not serve $img"
    local pid
    pid=$(cat "$pidf")
    cleanup_fn kill "$pid"
    nbdinfo --map "nbd+unix:///?socket=$sock" | normalise_map > "$out" ||
        { kill "$pid"; fail "nbdinfo --map against qemu-nbd failed"; }
    kill "$pid"
}

# plugin_map IMG OUT [plugin args...]
plugin_map ()
{
    local img=$1 out=$2
    shift 2
    requires nbdinfo
    run_plugin "$img" "$@" -- nbdinfo --map '"$uri"' \> "$out.raw" ||
        fail "nbdinfo --map through the plugin failed"
    normalise_map < "$out.raw" > "$out"
}

# hole_only < normalised map: keep only the HOLE bit, re-merge.
hole_only ()
{
    awk '{ print $1, $2, $3 % 2 }' | normalise_map
}

# check_zero_runs MAP RAW: every run MAP marks ZERO (type bit 2) must
# read as zeros in RAW.  An independent check of the plugin's map.
check_zero_runs ()
{
    local map=$1 raw=$2 off len type
    while read -r off len type; do
        if [ $(( type & 2 )) -ne 0 ]; then
            cmp -s -n "$len" -i "$off:0" "$raw" /dev/zero ||
                fail "map says [$off, +$len) reads as zeros, but the data there is not zero"
        fi
    done < "$map"
}

# compare_map [--ref IMG2] [--qemu-opts "OPTS"] [--allow-uniform]
#             [--hole-only] IMG [plugin args...]:
# compare the extents the plugin reports for IMG with what qemu-nbd
# reports for IMG2 (default IMG itself).  Unless --allow-uniform, the
# qemu map must have at least two runs, so that the comparison can
# distinguish data from holes.  --hole-only compares only the HOLE bit
# (the ZERO bit is an optional hint that qemu also derives from holes
# in the host file), and instead checks that every run the plugin
# calls ZERO really reads as zeros.
compare_map ()
{
    local ref= qopts= uniform=0 holeonly=0
    while [ $# -gt 0 ]; do
        case $1 in
            --ref) ref=$2; shift 2 ;;
            --qemu-opts) qopts=$2; shift 2 ;;
            --allow-uniform) uniform=1; shift ;;
            --hole-only) holeonly=1; shift ;;
            *) break ;;
        esac
    done
    local img=$1
    shift
    [ -n "$ref" ] || ref=$img
    _plugin_seq=$(( _plugin_seq + 1 ))
    local n=$_plugin_seq
    # shellcheck disable=SC2086
    qemu_map "$ref" "$tmp/map.qemu.$n" $qopts
    plugin_map "$img" "$tmp/map.plugin.$n" "$@"
    if [ "$holeonly" = 1 ]; then
        ref_raw "$ref" "$tmp/map.raw.$n" $qopts
        check_zero_runs "$tmp/map.plugin.$n" "$tmp/map.raw.$n"
        rm -f "$tmp/map.raw.$n"
        hole_only < "$tmp/map.qemu.$n" > "$tmp/map.qemu.$n.h"
        hole_only < "$tmp/map.plugin.$n" > "$tmp/map.plugin.$n.h"
        mv "$tmp/map.qemu.$n.h" "$tmp/map.qemu.$n"
        mv "$tmp/map.plugin.$n.h" "$tmp/map.plugin.$n"
    fi
    if [ "$uniform" = 0 ] && [ "$(wc -l < "$tmp/map.qemu.$n")" -lt 2 ]; then
        cat "$tmp/map.qemu.$n" >&2
        fail "sanity: qemu map of ${ref##*/} has a single run; test proves nothing"
    fi
    if ! diff -u "$tmp/map.qemu.$n" "$tmp/map.plugin.$n" > "$tmp/map.diff.$n"; then
        echo "--- map differs (- qemu-nbd, + plugin), offset length type:" >&2
        head -40 "$tmp/map.diff.$n" >&2
        fail "compare_map ${img##*/} $*: extents differ from qemu-nbd"
    fi
    echo "ok: map ${img##*/} $* ($(wc -l < "$tmp/map.qemu.$n") runs)"
}

# expect_refused PATTERN IMG [plugin args...]: serving must fail
# cleanly (no crash) with a message matching the extended regexp
# PATTERN (case-insensitive).
expect_refused ()
{
    local pat=$1 img=$2
    shift 2
    _plugin_seq=$(( _plugin_seq + 1 ))
    local log=$tmp/refused.$_plugin_seq.log r=0
    serve_args "$img" "$@"
    timeout 120 nbdkit -U - -r "${SERVE[@]}" \
        --run 'nbdinfo --size "$uri"' >"$log" 2>&1 || r=$?
    if [ $r -eq 0 ]; then
        cat "$log" >&2
        fail "expected refusal of $* (matching '$pat'), but it was served"
    fi
    if [ $r -ge 124 ]; then
        cat "$log" >&2
        fail "refusing $* ended with status $r (timeout or crash?)"
    fi
    if ! grep -qiE -- "$pat" "$log"; then
        cat "$log" >&2
        fail "refusal of $* did not mention '$pat'"
    fi
    echo "ok: refused $* ($(grep -iE -m1 -- "$pat" "$log"))"
}

# sha IMG: checksum of a file.
sha ()
{
    sha256sum "$1" | cut -d' ' -f1
}

# gen_bytes LEN [KIND] > FILE: LEN seeded pseudo-random bytes.
# KIND: random (incompressible, default), text (compressible words).
gen_bytes ()
{
    local len
    len=$(to_bytes "$1")
    rnd 2147483647
    /usr/bin/python3 - "$len" "${2:-random}" "$R" <<'PYEOF'
import random, sys
n, kind, seed = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
r = random.Random(seed)
out = sys.stdout.buffer
if kind == "random":
    out.write(r.randbytes(n))
else:
    words = [b"qcow2", b"cluster", b"refcount", b"backing", b"snapshot",
             b"l2", b"table", b"nbd", b"zlib", b"zstd", b"\n", b"0123"]
    out.write(b" ".join(r.choices(words, k=n // 3 + 1))[:n])
PYEOF
}

# strip_backing_format IMG: make IMG record a backing file without a
# backing format (qemu-img refuses to create such images nowadays) by
# renaming the backing-format header extension to an unknown type,
# which readers ignore.
strip_backing_format ()
{
    /usr/bin/python3 - "$1" <<'PYEOF' || fail "could not strip the backing format of $1"
import struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    hdr = f.read(4096)
    magic, version = struct.unpack(">II", hdr[:8])
    assert magic == 0x514649fb, "not qcow2"
    if version == 2:
        off = 72
    else:
        off = struct.unpack(">I", hdr[100:104])[0]
    while off + 8 <= len(hdr):
        etype, elen = struct.unpack(">II", hdr[off:off + 8])
        if etype == 0:
            break
        if etype == 0xE2792ACA:
            f.seek(off)
            f.write(struct.pack(">I", 0x7e57ab1e))
            sys.exit(0)
        off += 8 + (elen + 7) // 8 * 8
    sys.exit("no backing format extension found")
PYEOF
}

# assert_compressed IMG: sanity check that qemu-img map shows data with
# no host offset (which is how it presents compressed clusters).
assert_compressed ()
{
    qemu-img map --output=json "$1" |
        grep '"data": true' | grep -vq '"offset"' ||
        fail "sanity: $1 has no compressed clusters"
}

# compare_read_sparse IMG [plugin args...]: for big sparse images.
# Compare the plugin's export with qemu-nbd's: every range qemu calls
# data in full, holes by seeded sampling (see compare-sparse.py).
compare_read_sparse ()
{
    local img=$1
    shift
    requires qemu-nbd
    requires_nbd_python
    _plugin_seq=$(( _plugin_seq + 1 ))
    local sock=$tmp/qnbd.$_plugin_seq.sock pidf=$tmp/qnbd.$_plugin_seq.pid pid
    qemu-nbd -r -f qcow2 --persistent --fork --pid-file="$pidf" \
        --socket="$sock" "$img" || fail "qemu-nbd could not serve $img"
    pid=$(cat "$pidf")
    cleanup_fn kill "$pid"
    rnd 1000000000
    run_plugin "$img" "$@" -- /usr/bin/python3 "$srcdir/compare-sparse.py" \
        "nbd+unix:///?socket=$sock" '"$uri"' "$R" ||
        { kill "$pid"; fail "compare_read_sparse ${img##*/} $*: differs from qemu"; }
    kill "$pid"
    echo "ok: sparse read ${img##*/} $*"
}
