#!/usr/bin/env bash
# Build a CPU-only pycaffe (Caffe's Python module) from the PyPI sdist
# brocolli-caffe==9.0.2 and make `import caffe` work in a given Python venv.
#
# Usage:  scripts/build_pycaffe.sh [PYTHON] [PREFIX] [--force] [--check] [--no-check]
#   PYTHON  target interpreter           (default: <repo>/.venv/bin/python)
#   PREFIX  build/install prefix          (default: <repo>/.cache/pycaffe)
#   --force     ignore the stamps and rebuild from a clean source/build tree
#   --check     on a cache hit, also run the full smoke test (incl. onnx/torch co-import)
#   --no-check  skip the smoke test entirely
# Env:    PYCAFFE_JOBS (default: nproc), PYCAFFE_SKIP_APT=1 (never call apt-get)
#
# Idempotent and cached: if PREFIX/stamp matches (sdist version + sha256 of this
# script + python version + numpy major), it only (re)writes the .pth file in
# the venv, runs a quick import check and exits. Debian/x86_64 only. See
# scripts/pycaffe.md for notes, the proto facts and the layer list.
set -euo pipefail

SDIST_NAME=brocolli-caffe
SDIST_VERSION=9.0.2
SDIST_SHA256=c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a
APT_PKGS=(libboost-python-dev libboost-system-dev libboost-thread-dev
          libboost-filesystem-dev libboost-regex-dev libprotobuf-dev
          protobuf-compiler libgoogle-glog-dev libgflags-dev libopenblas-dev
          libhdf5-dev)
HDF5_INC=/usr/include/hdf5/serial
HDF5_LIB=/usr/lib/x86_64-linux-gnu/hdf5/serial
MULTIARCH_LIB=/usr/lib/x86_64-linux-gnu

log()  { printf '[build_pycaffe] %s\n' "$*"; }
die()  { printf '[build_pycaffe] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'rc=$?; printf "[build_pycaffe] ERROR: failed (exit %s) at line %s: %s\n" "$rc" "$LINENO" "$BASH_COMMAND" >&2' ERR

SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)"

FORCE=0; CHECK=auto; POS=()
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --check) CHECK=full ;;
    --no-check) CHECK=none ;;
    -h|--help) sed -n '2,16p' "$SCRIPT_PATH"; exit 0 ;;
    -*) die "unknown option: $a" ;;
    *) POS+=("$a") ;;
  esac
done
PY="${POS[0]:-$REPO/.venv/bin/python}"
PREFIX="${POS[1]:-$REPO/.cache/pycaffe}"
JOBS="${PYCAFFE_JOBS:-$(nproc)}"

[ -x "$PY" ] || die "python interpreter not found/executable: $PY"
mkdir -p "$PREFIX"
PREFIX="$(cd "$PREFIX" && pwd)"

# One build at a time per prefix.
exec 9>"$PREFIX/.lock"
if ! flock -n 9; then log "another build holds $PREFIX/.lock; waiting..."; flock 9; fi

# ---- target interpreter facts -------------------------------------------------
PYINFO="$("$PY" - <<'EOF'
import sys, sysconfig
print("%d.%d.%d" % sys.version_info[:3])
print("%d%d" % sys.version_info[:2])
print(sysconfig.get_paths()["include"])
print(sysconfig.get_paths()["purelib"])
try:
    import numpy
    print(numpy.get_include()); print(numpy.__version__.split(".")[0])
except Exception:
    print(""); print("")
EOF
)" || die "could not query $PY"
mapfile -t _I <<<"$PYINFO"
PYVER="${_I[0]:-}"; PYXY="${_I[1]:-}"; PYINC="${_I[2]:-}"; SITE="${_I[3]:-}"; NPINC="${_I[4]:-}"; NPMAJ="${_I[5]:-}"
[ -n "$SITE" ] || die "could not query $PY"
[ -n "$NPINC" ] || die "numpy is not importable from $PY (install numpy into the venv first)"
[ -f "$PYINC/Python.h" ] || die "Python.h not found in $PYINC (need Python development headers)"
log "python: $PY ($PYVER), site-packages: $SITE, numpy major: $NPMAJ"
log "prefix: $PREFIX"

SCRIPT_SHA="$(sha256sum "$SCRIPT_PATH" | cut -d' ' -f1)"
KEY="$SDIST_NAME==$SDIST_VERSION script=$SCRIPT_SHA python=$PYVER numpy=$NPMAJ"
STAMP="$PREFIX/stamp"
PYDIR="$PREFIX/python"                # goes on sys.path via the .pth file
PTH="$SITE/pycaffe.pth"

link_pth() {
  if [ -f "$PTH" ] && [ "$(cat "$PTH")" = "$PYDIR" ]; then
    log ".pth already in place: $PTH -> $PYDIR"
  else
    printf '%s\n' "$PYDIR" > "$PTH"
    log "wrote $PTH -> $PYDIR"
  fi
}

smoke_test() {  # $1 = quick|full
  log "smoke test ($1)"
  local tmp; tmp="$(mktemp -d)"
  cat > "$tmp/pool.prototxt" <<'EOF'
name: "pool_ceil_check"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 1 dim: 4 dim: 4 } } }
layer { name: "pool_floor" type: "Pooling" bottom: "data" top: "pool_floor"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 ceil_mode: false } }
layer { name: "pool_default" type: "Pooling" bottom: "data" top: "pool_default"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
EOF
  local rc=0 order
  for order in caffe-first others-first; do
  [ "$1" = full ] || [ "$order" = caffe-first ] || continue
  GLOG_minloglevel=2 "$PY" - "$tmp/pool.prototxt" "$1" "$order" <<'EOF' || rc=$?
import sys
import numpy as np
others = ("onnx", "onnxruntime", "torch") if sys.argv[2] == "full" else ()
found = []
def import_others():
    for m in others:
        try:
            __import__(m); found.append(m)
        except ImportError:
            print("note: %s not installed, skipped in co-import check" % m)
if sys.argv[3] == "others-first":
    import_others()
import caffe
if sys.argv[3] == "caffe-first":
    import_others()
print("[%s]" % sys.argv[3])
print("caffe:", caffe.__file__, "version", caffe.__version__)
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TEST)
net.blobs["data"].data[...] = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
out = net.forward()
f, d = out["pool_floor"], out["pool_default"]
print("pool ceil_mode:false ->", f.shape, f.reshape(f.shape[2:]).tolist())
print("pool default(ceil)   ->", d.shape)
assert f.shape == (1, 1, 2, 2), f.shape
assert d.shape == (1, 1, 3, 3), d.shape
if sys.argv[2] == "full":
    import google.protobuf
    from caffe.proto import caffe_pb2
    p = caffe_pb2.NetParameter(); p.layer.add(type="Pooling").pooling_param.ceil_mode = False
    assert caffe_pb2.NetParameter.FromString(p.SerializeToString()).layer[0].pooling_param.ceil_mode is False
    if "onnx" in found:
        import onnx
        onnx.ModelProto.FromString(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString())
    if "torch" in found:
        import torch
        t = torch.nn.functional.max_pool2d(torch.from_numpy(net.blobs["data"].data.copy()), 3, 2, 1)
        assert np.allclose(t.numpy(), f), (t, f)
    print("co-import OK with", found, "protobuf", google.protobuf.__version__)
print("SMOKE TEST OK")
EOF
  done
  rm -rf "$tmp"
  [ "$rc" = 0 ] || printf '[build_pycaffe] ERROR: smoke test failed (exit %s)\n' "$rc" >&2
  return "$rc"
}

# ---- cache hit? -------------------------------------------------------------------
if [ "$FORCE" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] \
   && [ -e "$PYDIR/caffe/_caffe.so" ] && [ -f "$PYDIR/caffe/proto/caffe_pb2.py" ]; then
  log "cache hit ($KEY)"
  link_pth
  case "$CHECK" in
    none) ;;
    full) smoke_test full ;;
    *) "$PY" -c 'import caffe' || die "cached pycaffe does not import; rerun with --force"
       log "import caffe OK" ;;
  esac
  log "done (cached)"
  exit 0
fi
log "no matching build (want: $KEY); building"

# ---- system packages ------------------------------------------------------------
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
for t in cmake:cmake make:make g++:g++; do
  command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  [ "${PYCAFFE_SKIP_APT:-0}" = 1 ] && die "missing Debian packages: ${missing[*]} (PYCAFFE_SKIP_APT=1)"
  SUDO=(); [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"; SUDO=(sudo); }
  log "installing Debian packages: ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  log "Debian packages already installed"
fi
BOOST_PY="boost_python$PYXY"
[ -e "$MULTIARCH_LIB/lib$BOOST_PY.so" ] \
  || die "lib$BOOST_PY.so not found in $MULTIARCH_LIB: Debian's Boost.Python has no build for Python $PYVER"
[ -d "$HDF5_INC" ] && [ -d "$HDF5_LIB" ] || die "serial HDF5 dirs not found ($HDF5_INC, $HDF5_LIB)"

# ---- sdist ------------------------------------------------------------------------
DIST="$PREFIX/dist"; TARBALL="$DIST/$SDIST_NAME-$SDIST_VERSION.tar.gz"
mkdir -p "$DIST"
if ! { [ -f "$TARBALL" ] && echo "$SDIST_SHA256  $TARBALL" | sha256sum -c --quiet - 2>/dev/null; }; then
  rm -f "$TARBALL"
  log "downloading $SDIST_NAME==$SDIST_VERSION sdist from PyPI"
  "$PY" -m pip download --no-deps --no-binary :all: --disable-pip-version-check -q \
      "$SDIST_NAME==$SDIST_VERSION" -d "$DIST"
  [ -f "$TARBALL" ] || die "pip download did not produce $TARBALL"
  echo "$SDIST_SHA256  $TARBALL" | sha256sum -c --quiet - || die "sha256 mismatch for $TARBALL"
fi
log "sdist: $TARBALL (sha256 ok)"

# ---- source tree: extracted + patched. It and the build dir are reused while
#      SRC_KEY (sdist, python, numpy, text of the patch block below) matches, so an
#      interrupted build resumes and script edits outside the patch block only cost
#      an incremental make (cmake itself rebuilds/relinks on changed flags). ---------
SRC="$PREFIX/src"; BUILD="$PREFIX/build"; BLOG="$PREFIX/build.log"
PATCH_SHA="$(sed -n '/^# >>> patches/,/^# <<< patches/p' "$SCRIPT_PATH" | sha256sum | cut -d' ' -f1)"
SRC_KEY="$SDIST_NAME==$SDIST_VERSION patches=$PATCH_SHA python=$PYVER numpy=$NPMAJ"
# >>> patches
if [ "$FORCE" = 1 ] || [ ! -f "$SRC/.key" ] || [ "$(cat "$SRC/.key")" != "$SRC_KEY" ]; then
  log "extracting + patching source into $SRC (clean build dir)"
  rm -rf "$SRC" "$BUILD"
  mkdir -p "$SRC"
  tar -xzf "$TARBALL" -C "$SRC" --strip-components=1
  # (1) Debian names Boost.Python per Python version (libboost_python311.so)
  sed -i "s/-lboost_python /-l$BOOST_PY /" "$SRC/python/CMakeLists.txt"
  grep -q -- "-l$BOOST_PY " "$SRC/python/CMakeLists.txt" || die "patch 1 (boost_python) did not apply"
  # (2) net.cpp includes a gtest header it never uses
  sed -i '/#include "caffe\/test\/test_caffe_main.hpp"/d' "$SRC/src/caffe/net.cpp"
  ! grep -q 'test_caffe_main.hpp' "$SRC/src/caffe/net.cpp" || die "patch 2 (net.cpp) did not apply"
  # (3) Python side: make `six`, scikit-image and scipy optional (only caffe.io's
  #     image helpers need the latter two); stale py3.8 bytecode removed.
  rm -rf "$SRC/python/caffe/__pycache__" "$SRC/python/caffe/proto/caffe_pb2.py"
  cat > "$SRC/python/caffe/_six_shim.py" <<'EOF'
"""Minimal stand-in for `six` (added by scripts/build_pycaffe.sh)."""
def iteritems(d, **kw): return iter(d.items(**kw))
def itervalues(d, **kw): return iter(d.values(**kw))
def iterkeys(d, **kw): return iter(d.keys(**kw))
next = next
string_types = (str,)
integer_types = (int,)
EOF
  "$PY" - "$SRC/python/caffe" <<'EOF'
import sys, pathlib
d = pathlib.Path(sys.argv[1])
six_fallback = ("try:\n    import six\nexcept ImportError:  # patched by build_pycaffe.sh\n"
                "    from . import _six_shim as six\n")
for name in ("pycaffe.py", "net_spec.py"):
    p = d / name; t = p.read_text()
    assert t.count("\nimport six\n") == 1, name
    p.write_text(t.replace("\nimport six\n", "\n" + six_fallback, 1))
p = d / "io.py"; t = p.read_text()
old = "import skimage.io\nfrom scipy.ndimage import zoom\n"
assert old in t, "io.py"
new = '''class _Missing(object):  # patched by build_pycaffe.sh: optional deps
    def __init__(self, what): self._what = what
    def __getattr__(self, name): raise ImportError("caffe.io needs " + self._what)
    def __call__(self, *a, **k): raise ImportError("caffe.io needs " + self._what)
try:
    import skimage.io
    import skimage.transform
except ImportError:
    skimage = _Missing("scikit-image (pip install scikit-image)")
try:
    from scipy.ndimage import zoom
except ImportError:
    zoom = _Missing("scipy (pip install scipy)")
'''
p.write_text(t.replace(old, new, 1))
EOF
  printf '%s\n' "$SRC_KEY" > "$SRC/.key"
else
  log "reusing patched source $SRC and build dir $BUILD (incremental)"
fi
# <<< patches

# ---- configure + build ------------------------------------------------------------
[ -f "$BUILD/CMakeCache.txt" ] || : > "$BLOG"    # fresh build dir -> fresh log
mkdir -p "$BUILD"
CXXFLAGS_EXTRA="-I$PYINC -I$NPINC -I$HDF5_INC -Wno-deprecated-declarations"
LDFLAGS_EXTRA="-L$HDF5_LIB -Wl,-rpath,$HDF5_LIB"
log "configuring (cmake) in $BUILD; full log: $BLOG"
{
  echo "=== $(date -Is) cmake"
  cmake -S "$SRC" -B "$BUILD" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCPU_ONLY=ON -DUSE_OPENCV=OFF -DUSE_LEVELDB=OFF -DUSE_LMDB=OFF -DUSE_CUDNN=OFF -DUSE_NCCL=OFF \
    -DBUILD_python=ON -DBUILD_python_layer=OFF -DBUILD_docs=OFF \
    -DANACONDA_HOME="$PREFIX/no-anaconda" -DCMAKE_SKIP_RPATH=ON \
    -DCMAKE_CXX_FLAGS="$CXXFLAGS_EXTRA" \
    -DCMAKE_SHARED_LINKER_FLAGS="$LDFLAGS_EXTRA" \
    -DCMAKE_MODULE_LINKER_FLAGS="$LDFLAGS_EXTRA"
} >>"$BLOG" 2>&1 || { tail -n 40 "$BLOG" >&2; die "cmake configure failed (see $BLOG)"; }

log "compiling with make -j$JOBS (progress below; from scratch ~3 min wall / ~5 CPU-min on a 2-core box)"
t0=$SECONDS
set +e
echo "=== $(date -Is) make -j$JOBS pycaffe" >>"$BLOG"
make -C "$BUILD" -j"$JOBS" pycaffe 2>&1 | tee -a "$BLOG" \
  | awk '/^\[ *[0-9]+%\]/ { print "  " $0; fflush() }'
mrc=${PIPESTATUS[0]}
set -e
if [ "$mrc" != 0 ]; then
  grep -n -m 20 -E 'error|Error' "$BLOG" >&2 || true
  tail -n 30 "$BLOG" >&2
  die "make failed (exit $mrc); full log: $BLOG"
fi
log "compiled in $((SECONDS - t0)) s"

# ---- install into PREFIX/python (atomic swap) ----------------------------------------
SO="$BUILD/lib/_caffe.so"
[ -f "$SO" ] || SO="$(find "$BUILD" -name '_caffe.so' -type f | head -n1)"
[ -n "$SO" ] && [ -f "$SO" ] || die "_caffe.so not found under $BUILD"
PB2="$BUILD/include/caffe/proto/caffe_pb2.py"
[ -f "$PB2" ] || die "generated caffe_pb2.py not found at $PB2"
if ldd "$SO" | grep -q 'not found'; then ldd "$SO" >&2; die "_caffe.so has unresolved libraries"; fi
RUNPATH="$(readelf -d "$SO" | sed -n 's/.*R\(UN\)\{0,1\}PATH.*\[\(.*\)\]/\2/p')"
case ":$RUNPATH:" in
  *::*|*"$BUILD"*|*"$SRC"*) die "_caffe.so has an unexpected RUNPATH '$RUNPATH'" ;;
esac
log "_caffe.so RUNPATH: ${RUNPATH:-<none>}"

NEW="$PREFIX/python.new"
rm -rf "$NEW"; mkdir -p "$NEW"
cp -a "$SRC/python/caffe" "$NEW/caffe"
rm -rf "$NEW/caffe/test" "$NEW/caffe/_caffe.cpp" "$NEW/caffe/__pycache__"
rm -f "$NEW/caffe/_caffe.so"            # symlink into the build tree made by cmake
cp "$SO" "$NEW/caffe/_caffe.so"
mkdir -p "$NEW/caffe/proto"; touch "$NEW/caffe/proto/__init__.py"
cp "$PB2" "$NEW/caffe/proto/caffe_pb2.py"
cp "$SRC/src/caffe/proto/caffe.proto" "$NEW/caffe/proto/caffe.proto"   # reference copy
rm -rf "$PYDIR.old"; [ -d "$PYDIR" ] && mv "$PYDIR" "$PYDIR.old"
mv "$NEW" "$PYDIR"; rm -rf "$PYDIR.old"
log "installed pycaffe into $PYDIR"

link_pth
[ "$CHECK" = none ] || smoke_test full
printf '%s\n' "$KEY" > "$STAMP"
log "done: built and installed ($KEY)"
