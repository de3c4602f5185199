#!/bin/sh
# dpypeline's command line for operators (installed as /usr/local/bin/dpypeline). It reads
# /etc/dpypeline/pipeline.yaml unless -c or $DPYPELINE_CONFIG says otherwise. Called by
# root, it runs the command the way the unit runs the service: as the user dpypeline (so
# the state in /var/lib/dpypeline keeps its owner), with a private copy of the pipeline's
# credentials file in $CREDENTIALS_DIRECTORY/s3.json, as LoadCredential= gives it, or the
# unit's default for a missing file (SetCredential=): `validate` then agrees with the unit.
: "${DPYPELINE_CONFIG:=/etc/dpypeline/pipeline.yaml}"
export DPYPELINE_CONFIG
venv=@VENV@
[ "$(id -u)" = 0 ] || exec "$venv/bin/dpypeline" "$@"

config=$DPYPELINE_CONFIG previous=""
for arg in "$@"; do
    case "$previous" in -c | --config) config=$arg ;; esac
    case "$arg" in --config=*) config=${arg#--config=} ;; esac
    previous=$arg
done
name=$(basename "$config" .yaml)
case "$name" in
    pipeline) credentials=/etc/dpypeline/credentials.json ;;
    *) credentials=/etc/dpypeline/$name.credentials.json ;;
esac
if [ -z "${CREDENTIALS_DIRECTORY:-}" ]; then
    private=$(mktemp -d /run/dpypeline-cli.XXXXXX) || exit 1
    trap 'rm -rf "$private"' EXIT INT TERM
    if [ -r "$credentials" ]; then
        install -m 0400 -o dpypeline -g dpypeline "$credentials" "$private/s3.json"
    else  # what the unit hands over instead: one newline
        printf '\n' | install -m 0400 -o dpypeline -g dpypeline /dev/stdin "$private/s3.json"
    fi
    chown dpypeline:dpypeline "$private"
    chmod 0500 "$private"
    env CREDENTIALS_DIRECTORY="$private" DPYPELINE_CREDENTIALS_SOURCE="$credentials" \
        setpriv --reuid=dpypeline --regid=dpypeline --init-groups -- "$venv/bin/dpypeline" "$@"
    exit $?
fi
exec setpriv --reuid=dpypeline --regid=dpypeline --init-groups -- "$venv/bin/dpypeline" "$@"
