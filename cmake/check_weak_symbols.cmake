# Fails when the objects of an instruction-set level define a weak (COMDAT) symbol outside the
# level's own namespace nudgefast::<LEVEL>: the linker keeps one copy of each weak symbol for the
# whole module, so baseline code could end up calling that level's (AVX2 / AVX-512) copy.
# setup.py runs the same check; CMakeLists.txt runs this before linking _cpu.
#   cmake -DNM=<nm> -DLEVEL=<avx2|avx512> "-DOBJECTS=<a.o;b.o>" -P check_weak_symbols.cmake
if(NOT NM OR NOT EXISTS "${NM}")
  message(WARNING "nudgefast: nm not found; the ${LEVEL} kernels' weak symbols are not checked")
  return()
endif()
execute_process(COMMAND "${NM}" --defined-only -C ${OBJECTS}
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "nudgefast: ${NM} failed on the ${LEVEL} kernels: ${err}")
endif()
string(REPLACE ";" "\\;" out "${out}")
string(REPLACE "\n" ";" lines "${out}")
set(shared "")
foreach(line IN LISTS lines)
  # "<address> <type> <name>"; W/V: weak object or function, u: unique global (GNU).
  if(line MATCHES "^[0-9a-fA-F]* +[WVu] +(.*)$")
    set(symbol "${CMAKE_MATCH_1}")
    string(FIND "${symbol}" "nudgefast::${LEVEL}::" own)
    if(own EQUAL -1)
      list(APPEND shared "${symbol}")
    endif()
  endif()
endforeach()
if(shared)
  list(LENGTH shared count)
  list(SUBLIST shared 0 10 first)
  string(REPLACE ";" ", " first "${first}")
  message(FATAL_ERROR "nudgefast: the ${LEVEL} kernels define ${count} weak symbols outside "
                      "nudgefast::${LEVEL}, which the linker may share with baseline code: ${first}")
endif()
