# cmake -DMPIEXEC=... -DEXAMPLE=finetune_mpi -DCOMPARE=peft_mpi_compare -DWORK_DIR=... -P compare_runs.cmake
# The example's per-step losses (the global batch's mean loss, printed by rank 0) on 2 ranks
# (contiguous shares) and 3 ranks (strided, uneven shares of 64) equal the single-process run to
# 1e-5 relative, and decrease; with a global batch of 3 on 4 ranks (rank 0's share is empty) they
# equal the single-process run with the same batch. The 2-rank run also saves a checkpoint from
# rank 0 and reports bit-identical adapters on every rank.
foreach(v MPIEXEC EXAMPLE COMPARE WORK_DIR)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "compare_runs.cmake needs -D${v}=...")
  endif()
endforeach()
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run name np)
  execute_process(
    COMMAND ${MPIEXEC} --allow-run-as-root --oversubscribe -np ${np} ${EXAMPLE} ${ARGN}
    RESULT_VARIABLE status OUTPUT_FILE ${WORK_DIR}/${name}.txt ERROR_VARIABLE err TIMEOUT 60)
  if(NOT status EQUAL 0)
    file(READ ${WORK_DIR}/${name}.txt out)
    message(FATAL_ERROR "-np ${np} ${ARGN}: exit status '${status}'\n${out}\n${err}")
  endif()
endfunction()

run(np1 1 --steps 30)
run(np2 2 --steps 30 --out ${WORK_DIR}/checkpoint)
run(np3 3 --steps 30 --split strided)
run(batch3_np1 1 --steps 12 --batch 3)
run(batch3_np4 4 --steps 12 --batch 3)

function(compare)
  execute_process(COMMAND ${COMPARE} ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message(STATUS "${out}${err}")
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "the losses differ: ${COMPARE} ${ARGN}")
  endif()
endfunction()
compare(loss 1e-5 --min-count 30 --decreasing ${WORK_DIR}/np1.txt ${WORK_DIR}/np2.txt ${WORK_DIR}/np3.txt)
compare(loss 1e-5 --min-count 12 ${WORK_DIR}/batch3_np1.txt ${WORK_DIR}/batch3_np4.txt)

file(READ ${WORK_DIR}/np2.txt out)
if(NOT out MATCHES "adapters bit-identical on all 2 rank\\(s\\): yes")
  message(FATAL_ERROR "the 2-rank run did not report bit-identical adapters:\n${out}")
endif()
foreach(f adapter_config.json adapter_model.safetensors)
  if(NOT EXISTS ${WORK_DIR}/checkpoint/${f})
    message(FATAL_ERROR "the 2-rank run saved no ${f}")
  endif()
endforeach()
