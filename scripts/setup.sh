#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with the library (bn_jax),
# the lab (bn_lab, lab/) and the test dependencies, both editable.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e . -e "./lab[test]"

# Debian packages that some studies read in place: installed here only as
# root with apt-get; otherwise one line says what to install. Never fails
# setup. Usage: debian_packages "what needs them" FILE... -- PACKAGE...
# (installed unless every FILE exists).
debian_packages() {
  local purpose=$1 missing=0
  shift
  while [ "$1" != "--" ]; do
    [ -f "$1" ] || missing=1
    shift
  done
  shift
  [ "$missing" -eq 1 ] || return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
    } || echo "setup.sh: could not install $* with apt-get; $purpose" \
              "needs them: apt-get install $*"
  else
    echo "setup.sh: $purpose needs Debian's $*: apt-get install $* (as root)"
  fi
}

# The char-LM study's corpus (bn_lab.text.load_fortunes), read in place from
# /usr/share/games/fortunes.
debian_packages "the char-LM study" /usr/share/games/fortunes/computers \
  -- fortunes
# --config.dataset=fashion_mnist (bn_lab.data), from
# /usr/share/datasets/fashion-mnist.
debian_packages "fashion_mnist" \
  /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
  -- dataset-fashion-mnist
# The fonts of --config.dataset=printed_digits (bn_lab.synthetic), read from
# /usr/share/fonts.
debian_packages "printed_digits" \
  /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf \
  /usr/share/fonts/truetype/dejavu/DejaVuSerifCondensed.ttf \
  /usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf \
  /usr/share/fonts/truetype/freefont/FreeSans.ttf \
  /usr/share/fonts/opentype/urw-base35/NimbusSans-Regular.otf \
  -- fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 \
     fonts-freefont-ttf fonts-urw-base35
