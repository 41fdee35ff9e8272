#!/bin/sh
# Serve the checkpoint at /model (baked in or mounted) unless MODEL or CLASSIFIER_MODEL names another;
# with no checkpoint there, the service builds and serves its embedded default model.
set -eu
if [ -z "${MODEL:-}${CLASSIFIER_MODEL:-}" ] && [ -f /model/config.json ]; then
    export MODEL=/model
fi
exec python -m service "$@"
