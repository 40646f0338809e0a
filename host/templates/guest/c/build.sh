#!/usr/bin/env bash
# Builds __NAME__.wasm (a component) from guest.c: wit-bindgen's C bindings, clang
# for wasm32-wasi (a reactor), then wasm-tools with the WASI preview1 adapter.
# Needs clang, lld and wasi-libc (Debian: clang lld wasi-libc), and wit-bindgen-cli
# 0.61.1, wasm-tools 1.258.3 and the adapter where `cargo xtask guests --lang c`
# puts them (or set WIT_BINDGEN, WASM_TOOLS and WASI_ADAPTER).
set -euo pipefail
cd "$(dirname "$0")"
tools="${AIRLOCK_TOOLS:-$HOME/.cache/airlock/tools}"
wit_bindgen="${WIT_BINDGEN:-$tools/wit-bindgen-cli-0.61.1/bin/wit-bindgen}"
wasm_tools="${WASM_TOOLS:-$tools/wasm-tools-1.258.3/bin/wasm-tools}"
adapter="${WASI_ADAPTER:-$(ls "$tools"/wasi-preview1-adapter-*/wasi_snapshot_preview1.reactor.wasm 2>/dev/null | head -1)}"
for tool in "$wit_bindgen" "$wasm_tools" "$adapter"; do
    if [ ! -f "$tool" ]; then
        echo "missing $tool: run \`cargo xtask guests --lang c\` in the airlock repository once," >&2
        echo "or set WIT_BINDGEN, WASM_TOOLS and WASI_ADAPTER" >&2
        exit 1
    fi
done
rm -rf build && mkdir -p build
"$wit_bindgen" c wit --world transform --out-dir build
clang --target=wasm32-wasi -mexec-model=reactor -O2 -std=c11 -Wall -Wextra -Wno-unused-parameter \
    -I build -I . guest.c airlock_guest.c build/transform.c build/transform_component_type.o \
    -o build/__NAME__.core.wasm
"$wasm_tools" component new build/__NAME__.core.wasm --adapt "wasi_snapshot_preview1=$adapter" -o __NAME__.wasm
echo "built __NAME__.wasm"
