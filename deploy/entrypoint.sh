#!/bin/sh
# Serve the checkpoint at /model (baked in or mounted) unless MODEL or CLASSIFIER_MODEL names another. With no
# checkpoint there, the service looks for its embedded default model, which the image cannot build (it holds the
# runtime only): the log says so in one line, and /health answers 503.
set -eu
if [ -z "${MODEL:-}${CLASSIFIER_MODEL:-}" ] && [ -f /model/config.json ]; then
    export MODEL=/model
fi
exec python -m service "$@"
