#!/usr/bin/env bash
# Builds __NAME__.wasm (a component) from src/lib.rs.
set -euo pipefail
cd "$(dirname "$0")"
rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
cargo build --release --target wasm32-wasip2
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasip2/release/__CRATE__.wasm" __NAME__.wasm
echo "built __NAME__.wasm"
