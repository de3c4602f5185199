#!/usr/bin/env bash
# Install or upgrade dpypeline as a systemd service.
#
#   sudo deploy/install.sh                  system service: /opt/dpypeline, /etc/dpypeline,
#                                           /var/lib/dpypeline, user "dpypeline"
#   deploy/install.sh --user                user service, no root: ~/.local/share/dpypeline,
#                                           ~/.config/dpypeline, ~/.local/state/dpypeline
# Options:
#   --wheelhouse DIR   install from the wheels in DIR only (no index; for machines without
#                      PyPI access: make it elsewhere with `pip wheel . -w DIR`)
#   --python PY        the interpreter for the virtual environment (default: python3, >= 3.11)
#   --source DIR|WHEEL what to install (default: the checkout this script is in)
#   --bindir DIR       where the `dpypeline` command goes (default: /usr/local/bin, or
#                      ~/.local/bin with --user)
#
# Running it again upgrades: the package in the virtual environment and the unit files are
# replaced, systemd reloads them and running services restart; the config, the credentials
# and the state are never touched. See OPERATING.md next to this script.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mode=system wheelhouse="" python=python3 source="$here/.." bindir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --user) mode=user; shift ;;
        --wheelhouse) wheelhouse=$(cd "$2" && pwd); shift 2 ;;
        --python) python=$2; shift 2 ;;
        --source) source=$2; shift 2 ;;
        --bindir) bindir=$2; shift 2 ;;
        -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

if [ "$mode" = system ]; then
    [ "$(id -u)" = 0 ] || die "the system service needs root (sudo $0), or use --user"
    venv=/opt/dpypeline
    units=/etc/systemd/system
    conf=/etc/dpypeline
    state=/var/lib/dpypeline
    data=/srv/dpypeline
    systemctl=(systemctl)
    bindir=${bindir:-/usr/local/bin}
else
    [ "$(id -u)" != 0 ] || die "--user installs for an ordinary user; as root, leave it out"
    venv=${XDG_DATA_HOME:-$HOME/.local/share}/dpypeline/venv
    units=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
    conf=${XDG_CONFIG_HOME:-$HOME/.config}/dpypeline
    state=${XDG_STATE_HOME:-$HOME/.local/state}/dpypeline
    data=$HOME/dpypeline
    systemctl=(systemctl --user)
    bindir=${bindir:-$HOME/.local/bin}
fi

# 1. Python: its own virtual environment, so the system's packages never mix with ours.
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
    die "$python is missing or older than 3.11; pass --python /path/to/python3.11"
if [ ! -x "$venv/bin/python" ]; then
    say "creating the virtual environment $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" || die "could not create $venv (Debian: apt install python3-venv)"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade)
if [ -n "$wheelhouse" ]; then
    pip+=(--no-index --find-links "$wheelhouse")
    [ "$source" = "$here/.." ] && source=dpypeline  # the dpypeline wheel in the wheelhouse
fi
case "$source" in *.whl | *]) ;; *) source="$source[dask]" ;; esac  # the dask executor too
say "installing $source into $venv"
"${pip[@]}" "$source" || die "pip could not install $source (nothing else was changed)"
version=$("$venv/bin/dpypeline" --version)
mkdir -p "$venv/share"
install -m 0644 "$here/OPERATING.md" "$venv/share/OPERATING.md"

# 2. The service user and the directories it reads and writes (system service only).
if [ "$mode" = system ]; then
    install -D -m 0644 "$here/dpypeline.sysusers" /etc/sysusers.d/dpypeline.conf
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers /etc/sysusers.d/dpypeline.conf
    elif ! id dpypeline >/dev/null 2>&1; then
        useradd --system --user-group --home-dir "$state" --shell /usr/sbin/nologin dpypeline
    fi
    install -d -m 0755 -o dpypeline -g dpypeline "$data" "$data/inbox" "$data/output"
    install -d -m 0700 -o dpypeline -g dpypeline "$state"  # systemd's StateDirectory= adopts it
    install -d -m 0750 -o root -g dpypeline "$conf"
    if mkdir -p "$bindir" 2>/dev/null &&
        sed "s|@VENV@|$venv|g" "$here/dpypeline-cli.sh" >"$bindir/dpypeline.new" 2>/dev/null; then
        chmod 0755 "$bindir/dpypeline.new"
        mv -f "$bindir/dpypeline.new" "$bindir/dpypeline"
    else
        say "WARNING: could not write $bindir/dpypeline; run $venv/bin/dpypeline as user dpypeline"
    fi
else
    mkdir -p "$data/inbox" "$data/output" "$units" "$bindir"
    install -d -m 0700 "$conf"
    ln -sf "$venv/bin/dpypeline" "$bindir/dpypeline"
fi

# 3. The config skeleton and a credentials placeholder: written once, never overwritten.
if [ ! -e "$conf/pipeline.yaml" ]; then
    if [ "$mode" = system ]; then
        restart="systemctl restart dpypeline"
        cred_ref='${CREDENTIALS_DIRECTORY}/s3.json   # LoadCredential= in the unit'
    else
        restart="systemctl --user restart dpypeline"
        cred_ref="$conf/credentials.json"
    fi
    sed -e "s|@NAME@|dpypeline|g" -e "s|@CACHE@|$state|g" -e "s|@INBOX@|$data/inbox|g" \
        -e "s|@OUTPUT@|$data/output|g" -e "s|@CREDENTIALS@|$conf/credentials.json|g" \
        -e "s|@CREDENTIALS_REF@|$cred_ref|g" -e "s|@RESTART@|$restart|g" \
        "$here/pipeline.yaml.in" >"$conf/pipeline.yaml"
    [ "$mode" = system ] && chgrp dpypeline "$conf/pipeline.yaml" && chmod 0640 "$conf/pipeline.yaml"
    say "wrote the config skeleton $conf/pipeline.yaml"
fi
if [ ! -e "$conf/credentials.json" ]; then
    (umask 077 && printf '{"token": "", "secret": "", "endpoint_url": ""}\n' >"$conf/credentials.json")
    say "wrote the credentials placeholder $conf/credentials.json (mode 0600): fill it in"
fi

# 4. The units; then systemd reloads them and services already running restart on the new code.
if [ "$mode" = system ]; then
    install -m 0644 "$here/../systemd/dpypeline.service" "$here/../systemd/dpypeline@.service" "$units/"
else
    install -m 0644 "$here/../systemd/user/dpypeline.service" "$units/"
fi
if "${systemctl[@]}" daemon-reload 2>/dev/null; then
    restarted=()
    while read -r unit _; do
        [ -n "$unit" ] && "${systemctl[@]}" try-restart "$unit" && restarted+=("$unit")
    done < <("${systemctl[@]}" list-units --state=active --plain --no-legend 'dpypeline*.service')
    [ ${#restarted[@]} -eq 0 ] || say "restarted ${restarted[*]} on the new version"
else
    say "systemd is not reachable: run '${systemctl[*]} daemon-reload' once it is"
fi

say "installed $version"
if [ "$mode" = system ]; then
    cat <<EOF
next:
  1. edit /etc/dpypeline/pipeline.yaml (and credentials.json for an object store);
     give the service its output directories: systemctl edit dpypeline  → ReadWritePaths=...
  2. dpypeline validate
  3. systemctl enable --now dpypeline
  4. systemctl status dpypeline; journalctl -u dpypeline -f
EOF
else
    cat <<EOF
next:
  1. edit $conf/pipeline.yaml
  2. dpypeline validate -c $conf/pipeline.yaml       (~/.local/bin must be on PATH)
  3. systemctl --user enable --now dpypeline;  loginctl enable-linger (to outlive your login)
  4. systemctl --user status dpypeline; journalctl --user -u dpypeline -f
EOF
fi
