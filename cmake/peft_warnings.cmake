# peft_project_options(target): warnings and sanitizers for the project's own executables
# (never imposed on consumers of peft::peft).
function(peft_project_options target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic)
    if(PEFT_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
    if(PEFT_SANITIZE)
      target_compile_options(${target} PRIVATE -fsanitize=${PEFT_SANITIZE} -fno-omit-frame-pointer
                                               -fno-sanitize-recover=all)
      target_link_options(${target} PRIVATE -fsanitize=${PEFT_SANITIZE})
    endif()
  endif()
endfunction()
