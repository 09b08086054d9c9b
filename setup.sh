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

fashion=/usr/share/datasets/fashion-mnist
if [ ! -f "$fashion/train-images-idx3-ubyte.gz" ] && command -v apt-get >/dev/null; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    echo "setup: installing Debian's dataset-fashion-mnist into $fashion" >&2
    $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
        || echo "setup: could not install dataset-fashion-mnist (no apt rights?); the demo will say where it looked" >&2
fi

# The glyphs dataset renders the fonts of these Debian packages (refilled.data.glyphs).
fonts="fonts-dejavu-core fonts-freefont-ttf fonts-liberation2 fonts-urw-base35 fonts-noto-core"
if [ ! -d /usr/share/fonts/truetype/noto ] || [ ! -d /usr/share/fonts/opentype/urw-base35 ] \
    || [ ! -d /usr/share/fonts/truetype/liberation2 ] || [ ! -d /usr/share/fonts/truetype/freefont ] \
    || [ ! -d /usr/share/fonts/truetype/dejavu ]; then
    if command -v apt-get >/dev/null; then
        sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
        echo "setup: installing the font packages of the glyphs dataset: $fonts" >&2
        $sudo apt-get install -y -qq $fonts >/dev/null 2>&1 \
            || { $sudo apt-get update -qq >/dev/null 2>&1 && $sudo apt-get install -y -qq $fonts >/dev/null 2>&1; } \
            || echo "setup: could not install $fonts (no apt rights?); the glyphs dataset will name what is missing" >&2
    fi
fi

case "$mode" in
    demo) exec .venv/bin/refilled demo "$@" ;;
    test) exec .venv/bin/python -m pytest -q "$@" ;;
    *) echo "usage: bash setup.sh demo|test [args...]" >&2; exit 2 ;;
esac
