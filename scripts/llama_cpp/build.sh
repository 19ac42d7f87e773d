#!/usr/bin/env bash
# Build llama.cpp (CPU only) from the source package of llama-cpp-python on PyPI, for generating
# and checking the GGUF reference data under tests/data/gguf/. Nothing here is needed by the C++
# build or tests of peft-cpp.
#
#   scripts/llama_cpp/build.sh            # download, extract, build, install Python deps
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 LLAMA_CPP_DIR=/some/dir scripts/llama_cpp/build.sh
#
# Afterwards (prints the same at the end):
#   $LLAMA_CPP_DIR/vendor/llama.cpp/build/bin/llama-quantize, llama-bench, libllama.so
#   $LLAMA_CPP_DIR/vendor/llama.cpp/convert_hf_to_gguf.py, convert_lora_to_gguf.py
#   the Python binding: PYTHONPATH=$LLAMA_CPP_DIR LLAMA_CPP_LIB_PATH=.../build/bin
#     (the package's pure-Python ctypes layer loads the libllama.so built here; no second build)
set -euo pipefail

VER="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"   # pinned; the references in tests/data/gguf use it
JOBS="${JOBS:-2}"
PY="${PYTHON:-python3}"
CACHE="${PEFT_CPP_CACHE:-$HOME/.cache/peft-cpp}"
DIR="${LLAMA_CPP_DIR:-$CACHE/llama.cpp-$VER}"
SKIP_PIP="${SKIP_PIP:-0}"

echo "llama-cpp-python version: $VER"
echo "source dir: $DIR"
start=$(date +%s)

if [[ ! -f "$DIR/vendor/llama.cpp/CMakeLists.txt" ]]; then
  mkdir -p "$CACHE/sdist"
  sdist="$CACHE/sdist/llama_cpp_python-$VER.tar.gz"
  if [[ ! -f "$sdist" ]]; then
    "$PY" -m pip download "llama-cpp-python==$VER" --no-binary :all: --no-deps -d "$CACHE/sdist"
  fi
  tmp="$(mktemp -d "$CACHE/extract.XXXXXX")"
  tar xzf "$sdist" -C "$tmp"
  mkdir -p "$(dirname "$DIR")"
  rm -rf "$DIR"
  mv "$tmp/llama_cpp_python-$VER" "$DIR"
  rmdir "$tmp"
fi

LL="$DIR/vendor/llama.cpp"
if [[ -d "$LL/.git" || -f "$LL/.git" ]]; then
  echo "vendored llama.cpp commit: $(git -C "$LL" rev-parse HEAD 2>/dev/null || echo unknown)"
fi

if [[ "$SKIP_PIP" != 1 ]]; then
  # Converters' needs + the reference generator's (torch from PyPI is large; CPU is all we use).
  "$PY" -m pip install --quiet torch transformers peft tokenizers numpy safetensors sentencepiece protobuf
  # llama-cpp-python's own runtime dependencies (its pyproject.toml), for the Python binding
  # used from the source tree (PYTHONPATH) instead of a second, pip-driven build of llama.cpp.
  "$PY" -m pip install --quiet "typing-extensions>=4.5.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
  # The gguf-py that matches the vendored converters (the PyPI 'gguf' can lag behind them).
  "$PY" -m pip install --quiet "$LL/gguf-py"
fi

cmake -S "$LL" -B "$LL/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON \
  -DGGML_NATIVE=ON \
  -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON
cmake --build "$LL/build" -j "$JOBS" --target llama-quantize llama-bench llama

end=$(date +%s)
echo "build took $((end - start)) s"
echo
echo "export LLAMA_CPP_DIR=$DIR"
echo "export LLAMA_CPP_LIB_PATH=$LL/build/bin"
echo "quantize:  $LL/build/bin/llama-quantize"
echo "bench:     $LL/build/bin/llama-bench"
echo "convert:   $PY $LL/convert_hf_to_gguf.py / convert_lora_to_gguf.py"
echo "binding:   PYTHONPATH=$DIR LLAMA_CPP_LIB_PATH=$LL/build/bin $PY -c 'import llama_cpp'"
