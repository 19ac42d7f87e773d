# tests/aarch64/build.cmake — the native build's test aarch64_build: configures tests/aarch64 with
# the aarch64 toolchain and builds it.
#
#   cmake -DSOURCE_DIR=<repository> -DBINARY_DIR=<build dir> -DINITIAL_CACHE=<file> \
#         -DGENERATOR=<generator> -DJOBS=<n> -P tests/aarch64/build.cmake
#
# INITIAL_CACHE (written by tests/CMakeLists.txt) holds the native configuration's choices and
# where it found the header-only dependencies.
foreach(var SOURCE_DIR BINARY_DIR INITIAL_CACHE GENERATOR JOBS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "[aarch64_build] ${var} is not set")
  endif()
endforeach()
execute_process(
  COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/aarch64 -B ${BINARY_DIR} -G ${GENERATOR}
          -C ${INITIAL_CACHE}
          -DCMAKE_TOOLCHAIN_FILE=${SOURCE_DIR}/cmake/toolchains/aarch64-linux-gnu.cmake
  COMMAND_ERROR_IS_FATAL ANY)
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BINARY_DIR} -j ${JOBS} COMMAND_ERROR_IS_FATAL ANY)
