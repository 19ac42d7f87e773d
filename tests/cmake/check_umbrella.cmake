# cmake -DSOURCE_DIR=<repo> -P check_umbrella.cmake
# peft/peft.hpp includes every public header (not detail/, not the optional interop/xtensor.hpp,
# dist/mpi.hpp and models/), so a header added to include/peft/ cannot be forgotten there.
file(READ ${SOURCE_DIR}/include/peft/peft.hpp umbrella)
file(GLOB_RECURSE headers RELATIVE ${SOURCE_DIR}/include ${SOURCE_DIR}/include/peft/*.hpp)
set(missing "")
foreach(h IN LISTS headers)
  if(h MATCHES "/detail/" OR h MATCHES "^peft/models/" OR h STREQUAL "peft/peft.hpp" OR h STREQUAL "peft/interop/xtensor.hpp" OR
     h STREQUAL "peft/dist/mpi.hpp")
    continue()
  endif()
  string(FIND "${umbrella}" "#include \"${h}\"" at)
  if(at EQUAL -1)
    list(APPEND missing ${h})
  endif()
endforeach()
if(missing)
  string(REPLACE ";" ", " missing "${missing}")
  message(FATAL_ERROR "include/peft/peft.hpp does not include: ${missing}")
endif()
message(STATUS "peft/peft.hpp includes every public header")
