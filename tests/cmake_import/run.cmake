# cmake -DMODE=find_package|add_subdirectory -DSOURCE_DIR=<repo> -DWORK_DIR=<scratch> -P run.cmake
# Builds tests/cmake_import as an outside project would and runs it.
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGV}\n${out}\n${err}")
  endif()
endfunction()
set(consumer ${SOURCE_DIR}/tests/cmake_import)
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/peft-build -DPEFT_BUILD_TESTS=OFF
      -DPEFT_BUILD_EXAMPLES=OFF -DPEFT_BUILD_BENCHMARKS=OFF)
  run(${CMAKE_COMMAND} --install ${WORK_DIR}/peft-build --prefix ${WORK_DIR}/prefix)
  # The consumer uses neither xtensor nor OpenMP: find_package(peft) must not need them.
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/consumer -DPEFT_CONSUME=find_package
      -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix -DCMAKE_DISABLE_FIND_PACKAGE_xtensor=ON
      -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON)
else()
  run(${CMAKE_COMMAND} -S ${consumer} -B ${WORK_DIR}/consumer -DPEFT_CONSUME=add_subdirectory
      -DPEFT_SOURCE_DIR=${SOURCE_DIR})
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer)
run(${WORK_DIR}/consumer/consumer)
message(STATUS "${MODE} consumer built and ran")
