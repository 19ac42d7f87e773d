# The test files tests/aarch64 cross-compiles, in the parts that run as separate tests (run in
# parallel by ctest -j): aarch64_kernels, aarch64_base, aarch64_adapters. Read by
# tests/aarch64/CMakeLists.txt (the executable, its own tests) and tests/CMakeLists.txt (the
# aarch64_* tests of the native build). Paths are relative to tests/.
#
# What depends on the architecture: the kernels (NEON through xsimd, the dispatch without x86
# tiers), the numeric types and views, the quantized formats (bit fiddling, char signedness), and
# the adapters over them. io, models, serve, train and the command-line tool are the same code on
# every architecture and run in the native suite only.
set(PEFT_AARCH64_PARTS kernels base adapters)
set(PEFT_AARCH64_kernels_SOURCES
  core/test_dtype.cpp
  core/test_matrix_view.cpp
  kernels/test_dispatch.cpp
  kernels/test_gemm.cpp
  kernels/test_linear.cpp
  kernels/test_packed.cpp
  kernels/test_quantized_int8.cpp
  kernels/test_transformer.cpp)
set(PEFT_AARCH64_base_SOURCES
  base/test_dense.cpp
  base/test_quantized.cpp)
set(PEFT_AARCH64_adapters_SOURCES
  adapters/test_adalora.cpp
  adapters/test_adapter_properties.cpp
  adapters/test_compacter.cpp
  adapters/test_dora.cpp
  adapters/test_dynamic_rank.cpp
  adapters/test_ia3.cpp
  adapters/test_loha.cpp
  adapters/test_lokr.cpp
  adapters/test_lora.cpp
  adapters/test_phm_delta.cpp
  adapters/test_randlora.cpp
  adapters/test_shira.cpp
  adapters/test_sora.cpp
  adapters/test_vera.cpp)

# peft_aarch64_test_args(PART OUT): the test executable's arguments that run PART's files (Catch2's
# file-name tags, "[#test_gemm]"), in the order and with the seed of the native unit test.
function(peft_aarch64_test_args part out)
  set(tags "")
  foreach(source ${PEFT_AARCH64_${part}_SOURCES})
    get_filename_component(name ${source} NAME_WE)
    string(APPEND tags "[#${name}],")
  endforeach()
  string(REGEX REPLACE ",$" "" tags "${tags}")
  set(${out} --filenames-as-tags "${tags}" --order rand --rng-seed 20261122 PARENT_SCOPE)
endfunction()
