#!/usr/bin/env bash
# Remove dpypeline's service: stop and disable its units, remove them, the virtual
# environment and the command-line wrapper. The config (/etc/dpypeline) and the state
# (/var/lib/dpypeline: the ledger of what was processed) stay, so a re-install carries on
# where it stopped, unless --purge is given.
#
#   sudo deploy/uninstall.sh [--purge] [--bindir DIR]
#   deploy/uninstall.sh --user [--purge]
set -euo pipefail

mode=system purge=no bindir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --user) mode=user; shift ;;
        --purge) purge=yes; shift ;;
        --bindir) bindir=$2; shift 2 ;;
        -h | --help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "uninstall.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
say() { printf 'uninstall.sh: %s\n' "$*"; }

if [ "$mode" = system ]; then
    [ "$(id -u)" = 0 ] || { echo "uninstall.sh: needs root (or --user)" >&2; exit 1; }
    venv=/opt/dpypeline units=/etc/systemd/system conf=/etc/dpypeline state=/var/lib/dpypeline
    systemctl=(systemctl)
    bindir=${bindir:-/usr/local/bin}
else
    venv=${XDG_DATA_HOME:-$HOME/.local/share}/dpypeline/venv
    units=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
    conf=${XDG_CONFIG_HOME:-$HOME/.config}/dpypeline
    state=${XDG_STATE_HOME:-$HOME/.local/state}/dpypeline
    systemctl=(systemctl --user)
    bindir=${bindir:-$HOME/.local/bin}
fi

if "${systemctl[@]}" daemon-reload 2>/dev/null; then
    while read -r unit _; do
        [ -n "$unit" ] && { "${systemctl[@]}" disable --now "$unit" >/dev/null 2>&1 || true; }
    done < <("${systemctl[@]}" list-units --all --plain --no-legend 'dpypeline*.service'; echo dpypeline.service)
fi
rm -f "$units/dpypeline.service" "$units/dpypeline@.service"
"${systemctl[@]}" daemon-reload 2>/dev/null || true
rm -rf "$venv"
if [ "$mode" = system ]; then
    rm -f "$bindir/dpypeline" /etc/sysusers.d/dpypeline.conf
else
    rm -f "$bindir/dpypeline"
    rmdir "$(dirname "$venv")" 2>/dev/null || true
fi
say "removed the units, $venv and the dpypeline command"

if [ "$purge" = yes ]; then
    rm -rf "$conf" "$state"
    say "purged $conf and $state (the service user, if any, is left: userdel dpypeline)"
else
    say "kept $conf (config, credentials) and $state (what was processed); --purge removes them"
fi
