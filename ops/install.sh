#!/usr/bin/env bash
# Install cacert-signer as services on Debian 12, as root, from a checkout of the project
# (after ops/setup.sh, which installs the Debian packages):
#
#   bash ops/install.sh --role signer     # a signer host: cacert-signer.service (+ daily backup)
#   bash ops/install.sh --role webdb      # the WebDB host: cacert-webdb-client.service
#   bash ops/install.sh --prefix DIR ...  # into DIR instead of / (staging, tests): users are
#                                         # written to DIR/etc/passwd, nothing else is touched
#
# What it puts in place (docs/operations.md, "Install as services"):
#   /opt/cacert-signer/                     a virtualenv with the project (bin/signer)
#   /etc/cacert-signer/                     configuration (examples: *.yaml.example)
#   /var/lib/cacert-signer/, cacert-webdb/  state (the repository and journal; the metrics file)
#   /etc/systemd/system/*.service|timer     the units; /etc/sysusers.d, /etc/tmpfiles.d
# It never enables or starts a unit. Safe to run again: existing configuration is kept.
set -euo pipefail
checkout="$(cd "$(dirname "$0")/.." && pwd)"
prefix=""
role="both"
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --prefix) prefix="$(realpath -m "$2")"; shift 2 ;;
    --role) role="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "install: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done
case "$role" in signer|webdb|both) ;; *) echo "install: --role signer, webdb or both" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "install: run as root" >&2; exit 2; }
root="${prefix:-/}"
roles=(); [ "$role" != webdb ] && roles+=(signer); [ "$role" != signer ] && roles+=(webdb)
say() { echo "install: $*"; }

# 1. The program: a virtualenv of its own (not relocatable: a prefix install runs from there).
venv="$prefix/opt/cacert-signer"
if [ ! -x "$venv/bin/python" ]; then
  say "creating the virtualenv $venv"
  python3 -m venv "$venv"
fi
say "installing cacert-signer into $venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "$checkout"

# 2. Users (systemd-sysusers) and directories (systemd-tmpfiles), under the prefix if given.
install -d -m 0755 "$prefix/etc/sysusers.d" "$prefix/etc/tmpfiles.d" "$prefix/etc/systemd/system"
install -d -m 0755 -o root -g root "$prefix/etc/cacert-signer"
for r in "${roles[@]}"; do
  user="cacert-$r"
  install -m 0644 "$checkout/ops/sysusers.d/$user.conf" "$prefix/etc/sysusers.d/$user.conf"
  install -m 0644 "$checkout/ops/tmpfiles.d/$user.conf" "$prefix/etc/tmpfiles.d/$user.conf"
  systemd-sysusers --root="$root" "$prefix/etc/sysusers.d/$user.conf"
  systemd-tmpfiles --root="$root" --create "$prefix/etc/tmpfiles.d/$user.conf"
done

# 3. Units and example configuration (never over the operator's own files).
units=()
[ "$role" != webdb ] && units+=(cacert-signer.service cacert-signer-backup.service cacert-signer-backup.timer)
[ "$role" != signer ] && units+=(cacert-webdb-client.service)
for unit in "${units[@]}"; do
  install -m 0644 "$checkout/ops/systemd/$unit" "$prefix/etc/systemd/system/$unit"
done
examples=()
[ "$role" != webdb ] && examples+=(signer.yaml signer-a.yaml signer-b.yaml ceremony.yaml)
[ "$role" != signer ] && examples+=(webdb-client.yaml)
for example in "${examples[@]}"; do
  install -m 0644 "$checkout/config/$example" "$prefix/etc/cacert-signer/$example.example"
done
say "units: ${units[*]}"

if [ -z "$prefix" ]; then
  if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
  say "next: write /etc/cacert-signer/*.yaml (from the .example files), then"
  [ "$role" != webdb ] && say "  systemctl enable --now cacert-signer.service cacert-signer-backup.timer"
  [ "$role" != signer ] && say "  systemctl enable --now cacert-webdb-client.service"
else
  say "installed under $prefix (users in $prefix/etc/passwd; the real system is untouched)"
fi
say "done ($("$venv/bin/signer" --version))"
