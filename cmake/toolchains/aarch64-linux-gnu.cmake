# Cross-compiling for 64-bit Arm Linux with Debian's cross compiler (g++-aarch64-linux-gnu), the
# programs run through qemu-user (qemu-aarch64, package qemu-user):
#
#   cmake -S . -B build-aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake
#
# The target's C and C++ libraries (libstdc++, libgomp) come from the cross toolchain's sysroot,
# /usr/aarch64-linux-gnu. The dependencies (Eigen, xsimd, xtl, xtensor, nlohmann_json, Catch2) are
# header-only and the same for every architecture: they are the host's, found in /usr through their
# CMake package files. A package file kept in the host's architecture folder (Debian's xsimd and
# xtensor: /usr/lib/x86_64-linux-gnu/cmake) needs its <name>_DIR on the command line.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(PEFT_AARCH64_TRIPLE aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${PEFT_AARCH64_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${PEFT_AARCH64_TRIPLE}-g++)

# Libraries from the target's sysroot only; programs from the host; headers and CMake package
# files from both (the header-only dependencies live in the host's /usr).
set(CMAKE_FIND_ROOT_PATH /usr/${PEFT_AARCH64_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

# add_test and try_run run the target's programs under qemu-user, with the sysroot's loader and
# shared libraries.
find_program(PEFT_QEMU_AARCH64 NAMES qemu-aarch64 qemu-aarch64-static)
if(PEFT_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${PEFT_QEMU_AARCH64} -L /usr/${PEFT_AARCH64_TRIPLE})
endif()
