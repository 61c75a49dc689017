#!/usr/bin/env bash
# One-step setup on a fresh Debian/Ubuntu machine: Python packages, the fonts for the Fonts dataset, Chromium for the
# browser test. Safe to run again. Usage: bash setup.sh [--no-apt]
set -euo pipefail
cd "$(dirname "$0")"
apt=1
for a in "$@"; do
  case "$a" in
    --no-apt) apt=0 ;;
    *) echo "setup.sh: unknown option $a (known: --no-apt)" >&2; exit 2 ;;
  esac
done
if [ "$apt" = 1 ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  pkgs=$(grep -v '^#' fonts/debian-font-packages.txt | grep -v '^$' | tr '\n' ' ')
  echo "setup.sh: installing Debian packages (fonts for the Fonts dataset, chromium for the browser test)"
  $sudo apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $pkgs chromium >/dev/null
  # npm fetches visdom's browser files below; a Node.js from NodeSource already ships its own npm
  command -v npm >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends npm >/dev/null
fi
echo "setup.sh: installing Python packages"
# PIP_CONSTRAINT also reaches pip's isolated build environments (visdom's sdist needs setuptools<70 to build).
PIP_CONSTRAINT="$PWD/constraints.txt" python3 -m pip install -q -r requirements.txt
echo "setup.sh: installing visdom's browser files (python -m visdom.server then starts offline)"
python3 visdom_static.py
python3 -c "import torch, torchvision; print('setup.sh: torch', torch.__version__, 'torchvision', torchvision.__version__)"
