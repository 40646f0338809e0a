#!/usr/bin/env bash
# Builds __NAME__.wasm (a component) from guest.py with componentize-py, installed
# on first use into the same place `cargo xtask guests` uses.
set -euo pipefail
cd "$(dirname "$0")"
tools="${AIRLOCK_TOOLS:-$HOME/.cache/airlock/tools}/componentize-py-0.25.1"
if [ ! -x "$tools/bin/componentize-py" ]; then
    echo "installing componentize-py 0.25.1 into $tools"
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet --disable-pip-version-check componentize-py==0.25.1
fi
"$tools/bin/componentize-py" --quiet -d wit -w transform componentize guest -p . -o __NAME__.wasm
echo "built __NAME__.wasm"
