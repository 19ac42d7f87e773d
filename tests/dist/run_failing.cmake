# cmake -DMPIEXEC=... -DEXAMPLE=finetune_mpi -DNP=2 -DFAIL_RANK=1 -P run_failing.cmake
# One rank of the example throws at step 3: the job must end with a non-zero status, promptly,
# with the line "rank R: injected failure at step 3" on stderr (peft::dist::run_or_abort).
foreach(v MPIEXEC EXAMPLE NP FAIL_RANK)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "run_failing.cmake needs -D${v}=...")
  endif()
endforeach()
string(TIMESTAMP start "%s" UTC)
execute_process(
  COMMAND ${MPIEXEC} --allow-run-as-root --oversubscribe -np ${NP} ${EXAMPLE}
          --steps 8 --fail-at-step 3 --fail-rank ${FAIL_RANK}
  RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 60)
string(TIMESTAMP end "%s" UTC)
math(EXPR seconds "${end} - ${start}")
message(STATUS "exit status '${status}' after ${seconds} s\n--- stdout\n${out}--- stderr\n${err}---")
if(status MATCHES "timeout")
  message(FATAL_ERROR "the job hung: still running after 60 s")
endif()
if(status EQUAL 0)
  message(FATAL_ERROR "the job exited with status 0 although rank ${FAIL_RANK} failed")
endif()
if(NOT err MATCHES "(^|\n)rank ${FAIL_RANK}: injected failure at step 3 \\(--fail-at-step\\)\n")
  message(FATAL_ERROR "no line 'rank ${FAIL_RANK}: injected failure at step 3 (--fail-at-step)' on stderr")
endif()
if(NOT out MATCHES "step +2 +loss")
  message(FATAL_ERROR "the job did not reach step 2 before the failure")
endif()
if(out MATCHES "step +3 +loss")
  message(FATAL_ERROR "step 3 completed although a rank failed in it")
endif()
if(seconds GREATER 30)
  message(FATAL_ERROR "the job took ${seconds} s to end")
endif()
