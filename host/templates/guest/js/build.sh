#!/usr/bin/env bash
# Builds __NAME__.wasm (a component) from guest.js with componentize-js, installed
# from npm on first use.
set -euo pipefail
cd "$(dirname "$0")"
tools="${AIRLOCK_TOOLS:-$HOME/.cache/airlock/tools}/componentize-js-0.23.0"
cli="$tools/node_modules/@bytecodealliance/componentize-js/src/cli.js"
if [ ! -f "$cli" ]; then
    echo "installing componentize-js 0.23.0 into $tools"
    mkdir -p "$tools"
    npm install --prefix "$tools" --no-audit --no-fund --loglevel=error @bytecodealliance/componentize-js@0.23.0
fi
# No wasi:http: airlock offers guests no network.
node "$cli" guest.js --wit wit --world-name transform --disable http --disable fetch-event -o __NAME__.wasm
echo "built __NAME__.wasm"
