#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with the library (bn_jax),
# the lab (bn_lab, lab/) and the test dependencies, both editable.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e . -e "./lab[test]"

# The char-LM study's corpus, Debian's fortunes (bn_lab.text.load_fortunes),
# read in place from /usr/share/games/fortunes. Installed here only as root
# with apt-get; otherwise one line says what to install. Never fails setup.
if [ ! -f /usr/share/games/fortunes/computers ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -q >/dev/null &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q fortunes >/dev/null
    } || echo "setup.sh: could not install fortunes with apt-get; the" \
              "char-LM study needs it: apt-get install fortunes"
  else
    echo "setup.sh: the char-LM study needs Debian's fortunes: apt-get" \
         "install fortunes (as root)"
  fi
fi
