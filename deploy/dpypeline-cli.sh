#!/bin/sh
# dpypeline's command line for operators (installed as /usr/local/bin/dpypeline): reads
# /etc/dpypeline/pipeline.yaml unless -c or $DPYPELINE_CONFIG says otherwise, and runs as
# the service user when called by root, so the state in /var/lib/dpypeline keeps its owner.
: "${DPYPELINE_CONFIG:=/etc/dpypeline/pipeline.yaml}"
export DPYPELINE_CONFIG
if [ "$(id -u)" = 0 ]; then
    exec setpriv --reuid=dpypeline --regid=dpypeline --init-groups -- @VENV@/bin/dpypeline "$@"
fi
exec @VENV@/bin/dpypeline "$@"
