#!/usr/bin/env bash
# Set up this checkout on a fresh machine and run the demo or the tests.
#   bash setup.sh demo   # .venv + the project + Fashion-MNIST (Debian package), then `refilled demo`
#   bash setup.sh test   # .venv + the project and its test extras, then the test suite
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, a CPU build here; on a GPU
# machine use e.g. TORCH_SPEC=torch to let pip choose a CUDA build).
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-test}
shift || true
python=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    "${TORCH_SPEC:-torch==2.13.0}" -e ".[test]"

# Best effort: install Debian packages the data needs; say so when it cannot (no apt, no rights).
apt_install() {
    command -v apt-get >/dev/null || return 0
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    echo "setup: installing Debian's $*" >&2
    $sudo apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq "$@" >/dev/null 2>&1; } \
        || echo "setup: could not install $* (no apt rights?); refilled will say what is missing" >&2
}

# Fashion-MNIST for the demo, and the fonts the glyphs dataset renders (refilled.data.glyphs).
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || apt_install dataset-fashion-mnist
for dir in truetype/dejavu truetype/freefont truetype/liberation2 opentype/urw-base35 truetype/noto; do
    if [ ! -d "/usr/share/fonts/$dir" ]; then
        apt_install fonts-dejavu-core fonts-freefont-ttf fonts-liberation2 fonts-urw-base35 fonts-noto-core
        break
    fi
done

case "$mode" in
    demo) exec .venv/bin/refilled demo "$@" ;;
    test) exec .venv/bin/python -m pytest -q "$@" ;;
    *) echo "usage: bash setup.sh demo|test [args...]" >&2; exit 2 ;;
esac
