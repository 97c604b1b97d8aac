#!/usr/bin/env bash
# Run pytest with smoe-gguf's native code (the gate and its pager, the read pool) built with a sanitizer:
#   scripts/sanitized_pytest.sh address|thread OUT_DIR PYTHON [pytest arguments...]
# The package is overlaid in OUT_DIR/py: its Python files are links to the real ones, its
# extensions are compiled there with -fsanitize=..., and the sanitizer's runtime is preloaded
# into the interpreter (uninstrumented itself). Any report fails the run.
set -euo pipefail
if [ "$(uname -s)" != Linux ]; then
    echo "sanitized_pytest.sh: Linux only (it preloads the sanitizer runtime with LD_PRELOAD); skipped"
    exit 0
fi
san=$1 out=$(realpath -m "$2") python=$(realpath -s "$3")
shift 3
cc=${CC:-cc}
root=$(cd "$(dirname "$0")/.." && pwd)
overlay=$out/py-$san
rm -rf "$overlay"
mkdir -p "$overlay/smoe_gguf"
for f in "$root"/smoe_gguf/*; do
    case $(basename "$f") in
        __pycache__ | *.so | *.c) ;;
        *) ln -s "$f" "$overlay/smoe_gguf/" ;;
    esac
done
include=$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
suffix=$("$python" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
case $san in
    address) flags="-fsanitize=address,undefined -fno-sanitize-recover=all" runtime=libasan.so
             export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ;;
    thread)  flags="-fsanitize=thread" runtime=libtsan.so
             # llama.cpp's uninstrumented threads are suppressed (the file says why)
             export TSAN_OPTIONS=halt_on_error=1:report_signal_unsafe=0:suppressions=$root/tests/native/tsan-llama.supp ;;
    *) echo "sanitizer must be address or thread, not $san" >&2; exit 2 ;;
esac
# each extension's sources, as pyproject.toml lists them
for ext in "_gatecb:_gatecb.c _pager.c _speculate.c _memo.c _xslot_buft.c" "_readpool:_readpool.c"; do
    name=${ext%%:*} srcs=()
    for c in ${ext#*:}; do srcs+=("$root/smoe_gguf/$c"); done
    # shellcheck disable=SC2086
    "$cc" -shared -fPIC -g -O1 -fno-omit-frame-pointer -pthread $flags -I"$include" \
        -o "$overlay/smoe_gguf/$name$suffix" "${srcs[@]}" -ldl -lm
done
preload=$("$cc" -print-file-name=$runtime)
# Run from the overlay: python puts its working directory first on sys.path, so the checkout
# must not be it. --import-mode=append: the tests package is found after the overlay.
args=()
for a in "$@"; do
    # a path of the checkout (a test file, or a test in it) is made absolute; other words (the
    # value of -k) are passed as they are
    if [[ $a != -* && $a != /* && -e "$root/${a%%::*}" ]]; then args+=("$root/$a"); else args+=("$a"); fi
done
cd "$overlay"
PYTHONPATH="$overlay" LD_PRELOAD="$preload" "$python" -c \
    "import smoe_gguf._readpool as r, smoe_gguf._gatecb as g; assert r.__file__.startswith('$overlay') and g.__file__.startswith('$overlay'), (r.__file__, g.__file__)"
PYTHONPATH="$overlay" LD_PRELOAD="$preload" "$python" -m pytest -q -p no:cacheprovider --import-mode=append \
    --rootdir "$root" -c "$root/pyproject.toml" "${args[@]}"
