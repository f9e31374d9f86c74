#!/bin/sh
# Creates VENV with Slotline installed (editable, with the test tools). On a fresh Debian/Ubuntu
# the system Python may lack venv/ensurepip and the C toolchain for the codec's optional apply
# helper: install those first (as root, or with sudo), then build.
# Usage: packaging/dev/bootstrap-venv.sh PYTHON VENV
set -eu
py=${1:-python3} venv=${2:-.venv}
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  echo "installing system packages: $*"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "Slotline needs Python 3.11 or newer; $py is $($py -V 2>&1)" >&2; exit 1; }
if ! $py -c 'import ensurepip, venv' >/dev/null 2>&1; then
  ver=$($py -c 'import sys;print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  apt_install "python$ver-venv" || apt_install python3-venv
fi
# The codec's C apply helper is optional (numpy fallback), but wanted: build it when we can.
if ! command -v cc >/dev/null 2>&1 || ! $py -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  apt_install build-essential python3-dev || echo "note: no C toolchain; the codec uses its numpy fallback"
fi
$py -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -e '.[test]'
