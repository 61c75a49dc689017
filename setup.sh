#!/usr/bin/env bash
# One-step setup on a fresh Debian/Ubuntu machine: the Debian packages (fonts for the Fonts dataset, Chromium for the
# browser test, npm), then the Python packages into a virtual environment, then visdom's browser files. Safe to run
# again; a second run only checks.
#
# The environment is the active one (VIRTUAL_ENV, else conda's CONDA_PREFIX), else .venv/ here, made with
# `python3 -m venv` (Debian's and Ubuntu's own python3 refuse `pip install` outside one, PEP 668). Either way
# .venv/bin/python runs it afterwards: for an active environment .venv is a link to it, so the README's commands are
# the same on every machine.
#
# Usage: bash setup.sh [--no-apt] [--no-dev] [--print-env]
#   --no-apt     no apt-get: install the fonts of fonts/debian-font-packages.txt (and python3-venv) yourself
#   --no-dev     only requirements.txt (running), not requirements-dev.txt (tests, lint, browser checks)
#   --print-env  print the environment it would use and what it would do to .venv, then stop (changes nothing)
set -euo pipefail
cd "$(dirname "$0")"
apt=1 dev=1 print_env=0
for a in "$@"; do
  case "$a" in
    --no-apt) apt=0 ;;
    --no-dev) dev=0 ;;
    --print-env) print_env=1 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option $a (known: --no-apt, --no-dev, --print-env)" >&2; exit 2 ;;
  esac
done
die() { echo "setup.sh: $*" >&2; exit 2; }

# Choose the environment. dotvenv says what .venv becomes: keep (it is the environment), link (to the active one),
# create (a new venv made by python3).
if [ -n "${VIRTUAL_ENV:-}" ]; then
  env_dir=$VIRTUAL_ENV kind=virtualenv var=VIRTUAL_ENV
elif [ -n "${CONDA_PREFIX:-}" ]; then
  env_dir=$CONDA_PREFIX kind=conda var=CONDA_PREFIX
else
  env_dir="" kind=venv var=""
fi
if [ -n "$env_dir" ]; then
  [ -x "$env_dir/bin/python" ] || die "$var=$env_dir is set but $env_dir/bin/python does not exist: activate a working \
environment, or unset $var (deactivate) to use .venv/ here"
  env_dir=$(cd "$env_dir" && pwd -P)
  if [ -L .venv ] || [ ! -e .venv ]; then
    if [ "$(readlink .venv 2>/dev/null || true)" = "$env_dir" ]; then dotvenv=keep; else dotvenv=link; fi
  elif [ "$(cd .venv && pwd -P)" = "$env_dir" ]; then
    dotvenv=keep  # the active environment is .venv itself
  else
    die "$var=$env_dir is active but .venv/ here is another environment, and the README's commands run \
.venv/bin/python. Deactivate (deactivate, or conda deactivate) to install into .venv/, or remove .venv/ \
(rm -r .venv) so that setup.sh makes .venv a link to $env_dir"
  fi
elif [ -L .venv ] && [ -x .venv/bin/python ]; then
  env_dir=$(cd .venv && pwd -P) kind=linked dotvenv=keep  # linked by an earlier run with that environment active
else
  env_dir=$PWD/.venv
  if [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then dotvenv=keep; else dotvenv=create; fi
fi
if [ "$print_env" = 1 ]; then
  printf 'env=%s\nkind=%s\npython=%s\ndotvenv=%s\n' "$env_dir" "$kind" "$env_dir/bin/python" "$dotvenv"
  exit 0
fi

# python3 -m venv needs ensurepip, which Debian and Ubuntu ship in python3-venv.
need_venv=0
if [ "$dotvenv" = create ]; then
  command -v python3 >/dev/null 2>&1 || die "no python3 in PATH to create .venv/ with: install Python 3 (apt-get install python3)"
  python3 -c 'import ensurepip, venv' 2>/dev/null || need_venv=1
fi

if [ "$apt" = 1 ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  pkgs="$(grep -v '^#' fonts/debian-font-packages.txt | grep -v '^$' | tr '\n' ' ') chromium"
  # npm fetches visdom's browser files below; a Node.js from NodeSource already ships its own npm
  command -v npm >/dev/null 2>&1 || pkgs="$pkgs npm"
  [ "$need_venv" = 0 ] || pkgs="$pkgs python3-venv"
  # shellcheck disable=SC2086
  missing=$(comm -23 <(tr ' ' '\n' <<<"$pkgs" | grep -v '^$' | sort -u) \
    <(dpkg-query -W -f='${db:Status-Status} ${Package}\n' $pkgs 2>/dev/null | awk '$1 == "installed" {print $2}' | sort -u))
  if [ -n "$missing" ]; then
    echo "setup.sh: installing $(wc -w <<<"$missing") Debian packages (fonts for the Fonts dataset, chromium for the browser test, npm, python3-venv)"
    $sudo apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

case "$dotvenv" in
  create)
    python3 -c 'import ensurepip, venv' 2>/dev/null || die "$(command -v python3) cannot make a virtual environment \
(no ensurepip): install python3-venv (sudo apt-get install python3-venv, or run setup.sh without --no-apt), or \
activate an environment of your own first"
    echo "setup.sh: creating .venv/ with $(command -v python3) ($(python3 -V 2>&1))"
    [ ! -L .venv ] || rm .venv  # a link to an environment that is gone
    python3 -m venv .venv ;;
  link)
    echo "setup.sh: linking .venv -> $env_dir (the active $kind environment), so that .venv/bin/python runs it"
    rm -f .venv
    ln -s "$env_dir" .venv ;;
esac
py=.venv/bin/python
"$py" -m pip --version >/dev/null 2>&1 || "$py" -m ensurepip -q || die "$env_dir has no pip and ensurepip could not \
install it: install pip into it (for a uv venv: uv venv --seed)"

echo "setup.sh: installing Python packages into $env_dir"
# visdom is an sdist whose setup.py imports pkg_resources: build it alone with setuptools<70 (constraints.txt;
# PIP_CONSTRAINT, unlike -c, reaches pip's isolated build environment). Everything else goes without that cap, since
# recent torch needs setuptools>=77.
PIP_CONSTRAINT="$PWD/constraints.txt" "$py" -m pip install -q --no-deps --use-pep517 "$(grep -m1 '^visdom' requirements.txt)"
req=requirements-dev.txt; [ "$dev" = 1 ] || req=requirements.txt
"$py" -m pip install -q -r "$req"
echo "setup.sh: installing visdom's browser files (python -m visdom.server then starts offline)"
"$py" tools/visdom_static.py
"$py" -c "import torch, torchvision; print('setup.sh: torch', torch.__version__, 'torchvision', torchvision.__version__)"
case "$kind" in
  virtualenv|linked|venv) act="source .venv/bin/activate" ;;
  conda) act="conda activate $env_dir" ;;
esac
echo "setup.sh: done: the packages are in $env_dir ($kind); run the scripts with .venv/bin/python (for example"
echo "  .venv/bin/python main.py --help), or activate it first: $act"
