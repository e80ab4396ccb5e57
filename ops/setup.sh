#!/usr/bin/env bash
# Install everything cacert-signer needs on Debian 12, as root, from a checkout of the project:
# Debian packages, a virtualenv in .venv, and the project (editable) with its test tools.
# Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  python3 python3-venv python3-dev build-essential   # Python and what wheels may compile with
  softhsm2 opensc                                     # PKCS#11: SoftHSM2, and OpenSC for real HSMs
  openssl gnupg sq                                    # outside verifiers used by tests and operators
  mariadb-server                                      # the WebDB database (the client tests start their own)
  systemd                                             # sysusers, tmpfiles, systemd-analyze (ops/install.sh, its test)
)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating the virtualenv .venv"
  python3 -m venv .venv
fi
echo "setup: installing cacert-signer into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: done ($(.venv/bin/signer --version))"
