#!/usr/bin/env bash
# The benchmark, one command, on a fresh Debian or Ubuntu machine (as root):
#
#   bench/run.sh              # everything, about 6 minutes on 2 cores; appends to bench/results/<date>.md
#   bench/run.sh --quick      # a short look, about 1.5 minutes
#   bench/run.sh --no-cluster # without the cluster step (and without installing PostgreSQL for it)
#   bench/run.sh --scale      # also bench/queue_scale.py: 100 000 and 1 000 000 queued messages (hours)
#   bench/run.sh --help       # the options (bench/suite.py's): --runs, --only, --profile, --scale, ...
#
# 1. Installs Debian's postfix package if smtp-source/smtp-sink are missing, preseeded to "No configuration"
#    and with service starts blocked, so no system Postfix runs or listens on port 25 afterwards (the
#    benchmark starts its own private instance on loopback and stops it again).
#    For the cluster step, Debian's postgresql package if /usr/lib/postgresql/*/bin/initdb is missing, with
#    service starts blocked too and its system service disabled (bench/cluster.py runs its own throwaway
#    cluster on loopback, as the `postgres` user, and removes it again).
# 2. Creates .venv if missing and installs the project into it (pip install -e .) if it is not importable;
#    for the cluster step also the PostgreSQL driver (pip install -e '.[postgres]': asyncpg).
# 3. Raises the open-files limit (bench/idle.py holds 10 000 sessions: one fd each in the client and server).
# 4. Runs bench/suite.py with the arguments given here.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'bench/run.sh: %s\n' "$*" >&2; }

case "${1:-}" in
  -h | --help)
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
    if [ -x .venv/bin/python ]; then exec .venv/bin/python bench/suite.py --help; fi
    exit 0
    ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  say "run this as root: it may install packages, and the private Postfix instance and smtp-sink need root"
  exit 2
fi

need_apt() {
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get: install $* yourself (a Debian or Ubuntu machine is assumed)"
    exit 1
  fi
}

apt_updated=0
apt_install() {
  need_apt "$@"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    apt-get update -qq || return 1
    apt_updated=1
  fi
  say "apt-get install $*"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null || return 1
}

# apt_install with no service started during the install (invoke-rc.d and deb-systemd-invoke honour a
# policy-rc.d that exits 101); the file is only added, and removed again, when there is none already.
apt_install_no_start() {
  local policy_added=0 status=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    policy_added=1
  fi
  apt_install "$@" || status=$?
  if [ "$policy_added" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
  return "$status"
}

# Is the cluster step (bench/cluster.py) among the steps asked for? Not with --no-cluster, nor with an
# --only list that leaves it out.
want_cluster=1
prev=""
for arg in "$@"; do
  case "$arg" in
    --no-cluster) want_cluster=0 ;;
    --only=*) [[ ",${arg#--only=}," == *,cluster,* ]] || want_cluster=0 ;;
  esac
  if [ "$prev" = "--only" ] && [[ ",$arg," != *,cluster,* ]]; then want_cluster=0; fi
  prev=$arg
done

# --- 1. Postfix's smtp-source and smtp-sink (and postfix itself, for the private reference instance)
if [ ! -x /usr/sbin/smtp-source ] || [ ! -x /usr/sbin/smtp-sink ] || [ ! -x /usr/sbin/postfix ]; then
  need_apt postfix
  # "No configuration": the package writes no /etc/postfix/main.cf, so the system instance cannot start.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt_install_no_start postfix
  # We installed it, so its system service is ours to keep off: stopped now and not started at boot.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now postfix.service >/dev/null 2>&1 || true
  fi
  if [ -f /etc/postfix/main.cf ] && /usr/sbin/postfix status >/dev/null 2>&1; then
    /usr/sbin/postfix stop >/dev/null 2>&1 || true
  fi
fi
# PostgreSQL's server binaries, for the cluster step's throwaway cluster (as .ci/run installs them)
if [ "$want_cluster" -eq 1 ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  need_apt postgresql
  apt_install_no_start postgresql
  # We installed it, so its system service (and the "main" cluster the package creates) is ours to keep
  # off: the benchmark never uses it.
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now postgresql.service >/dev/null 2>&1 || true
  fi
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | while read -r version name _ status _; do
      if [ "$status" = "online" ]; then pg_ctlcluster "$version" "$name" stop >/dev/null 2>&1 || true; fi
    done || true
  fi
fi
if command -v ss >/dev/null 2>&1 && [ -n "$(ss -ltnH 'sport = :25' 2>/dev/null)" ]; then
  say "note: something listens on port 25 (not started by this script); the benchmark does not use it"
fi

# --- 2. the virtual environment with the project in it
if [ ! -x .venv/bin/python ]; then
  if ! command -v python3 >/dev/null 2>&1; then apt_install python3 python3-venv; fi
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  say "creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import smtpsvc.app, uvloop' >/dev/null 2>&1; then
  say "pip install -e . into .venv"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e .
fi
if [ "$want_cluster" -eq 1 ] && ! .venv/bin/python -c 'import asyncpg' >/dev/null 2>&1; then
  say "pip install -e '.[postgres]' into .venv (asyncpg, for the cluster step)"
  .venv/bin/python -m pip install --quiet -e '.[postgres]'
fi

for arg in "$@"; do
  if [ "$arg" = "--profile" ] && [ ! -x .venv/bin/py-spy ]; then
    say "pip install py-spy into .venv (for --profile)"
    .venv/bin/python -m pip install --quiet py-spy
  fi
done

# --- 3. open files: 10 000 idle sessions need 10 000 fds in the client and as many in the server
want=20000
hard=$(ulimit -Hn)
if [ "$hard" != "unlimited" ] && [ "$hard" -lt "$want" ]; then
  ulimit -Hn "$want" 2>/dev/null || say "could not raise the hard open-files limit from $hard to $want"
fi
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
say "open files limit: $(ulimit -Sn)"

# --- 4. run
command="bench/run.sh"
for arg in "$@"; do command+=" $(printf '%q' "$arg")"; done
exec .venv/bin/python bench/suite.py --command "$command" "$@"
