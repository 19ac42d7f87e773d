#!/usr/bin/env bash
# peft-cpp set-up: installs the Debian packages that are missing, configures, builds, and runs.
#
#   scripts/setup.sh example   the main example (LoRA adaptation on the UCI digits)
#   scripts/setup.sh test      the whole test suite (unit, packaging, CLI faults, the fuzzers, MPI
#                              tests, aarch64 tests under qemu), then unit and CLI again under
#                              AddressSanitizer + UBSan, and the serving tests (hot swap, soak)
#                              under ThreadSanitizer
#   scripts/setup.sh fortunes  the language-model example: a small Llama pretrained on English
#                              fortunes, adapted to Italian ones with every method (about 7
#                              minutes on 2 cores; arguments after `fortunes` go to the program)
#   scripts/setup.sh bench     peft_bench (Release)
#
# Environment: BUILD_DIR (default build), JOBS (default nproc), PEFT_SKIP_SANITIZE=1 skips the
# sanitizer pass of `test`.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-test}"
jobs="${JOBS:-$(nproc)}"
build="${BUILD_DIR:-build}"

packages=(cmake g++ make libeigen3-dev libxtensor-dev libxsimd-dev nlohmann-json3-dev catch2 libbenchmark-dev
          libpcre2-dev libutf8proc-dev libopenblas-openmp-dev)
# The benchmarks also compare against OpenBLAS and plot with gnuplot (benchmarks/plot.sh).
[[ "$what" == bench ]] && packages+=(gnuplot-nox)
# The fortunes example reads Debian's English and Italian fortune files.
[[ "$what" == fortunes ]] && packages+=(fortunes fortunes-it)
# The test suite also runs: the data-parallel tests (tests/dist) over MPI, the libFuzzer targets
# (tests/fuzz: clang with its runtime libraries), and the kernel and adapter tests built for
# aarch64 with Debian's cross compiler and run under qemu-user (tests/aarch64).
# The sanitizer passes are compiled with clang++ (with its OpenMP runtime, libomp): at -O0 under
# ASan + UBSan it compiles the tests about twice as fast as g++, and it keeps them warning-clean
# on clang too.
[[ "$what" == test ]] && packages+=(libopenmpi-dev openmpi-bin clang libclang-rt-14-dev libomp-dev
                                    g++-aarch64-linux-gnu qemu-user)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "== installing: ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ctest DIR [ARGS...], and when a test fails, after ctest's summary, each failed assertion with
# its test case and messages (from the log --output-on-failure printed further up), so that the
# end of a CI log says what failed.
run_ctest() {
  local dir="$1"; shift
  if ! ctest --test-dir "$dir" --output-on-failure "$@"; then
    echo "== failed assertions (from $dir/Testing/Temporary/LastTest.log)"
    awk '/^-+$/ && length($0) > 70 { show = 0; rule = !rule; if (rule) name = ""; next }
         /^=+$/ && length($0) > 70 { show = 0; next }
         rule && NF { name = name (name == "" ? "" : " / ") $0; next }
         /FAILED:$/ { print "-- " name; show = 14 }
         show > 0 { print; show-- }' "$dir/Testing/Temporary/LastTest.log" | head -n 30
    return 1
  fi
}

configure() {  # configure DIR [cmake args...]
  local dir="$1"; shift
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release -DPEFT_WARNINGS_AS_ERRORS=ON "$@" >/dev/null
}

case "$what" in
  example)
    configure "$build"
    cmake --build "$build" -j "$jobs" --target lora_digits peft_cli
    "$build/examples/lora_digits"
    ;;
  test)
    # The demonstration programs at -O1 (examples/CMakeLists.txt): their tests check output only.
    configure "$build" -DPEFT_QUICK_DEMOS=ON
    cmake --build "$build" -j "$jobs"
    run_ctest "$build" -j "$jobs"
    if [[ "${PEFT_SKIP_SANITIZE:-0}" != 1 ]]; then
      echo "== again under AddressSanitizer + UndefinedBehaviorSanitizer"
      # Line tables are all the sanitizers' reports need: about 20% less compile time than -g.
      configure "$build-asan" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_FLAGS_DEBUG=-gline-tables-only \
        -DPEFT_SANITIZE=address,undefined \
        -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_BUILD_EXAMPLES=ON
      cmake --build "$build-asan" -j "$jobs" --target peft_tests peft_cli
      # (the registry's soak test, part of unit, for 20 s here)
      PEFT_SOAK_SECONDS=20 run_ctest "$build-asan" -j "$jobs" -R '^(unit|cli)'
      echo "== the serving tests (hot swap, soak) under ThreadSanitizer (OpenMP off: its runtime is not instrumented)"
      configure "$build-tsan" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_FLAGS_DEBUG=-gline-tables-only \
        -DPEFT_SANITIZE=thread -DPEFT_USE_OPENMP=OFF \
        -DPEFT_BUILD_BENCHMARKS=OFF -DPEFT_BUILD_EXAMPLES=OFF
      cmake --build "$build-tsan" -j "$jobs" --target peft_thread_tests
      run_ctest "$build-tsan" -R '^thread'
    fi
    ;;
  fortunes)
    configure "$build"
    cmake --build "$build" -j "$jobs" --target fortunes
    "$build/examples/fortunes" "${@:2}"
    ;;
  bench)
    # A build dir of `test` compiles the tool at -O1: the comparison scripts need it at full speed.
    configure "$build" -DPEFT_QUICK_DEMOS=OFF
    cmake --build "$build" -j "$jobs" --target peft_bench
    "$build/benchmarks/peft_bench" "${@:2}"
    ;;
  *)
    echo "usage: scripts/setup.sh example|test|fortunes|bench" >&2
    exit 2
    ;;
esac
