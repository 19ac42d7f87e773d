#!/usr/bin/env bash
# tests/run_shard.sh K N EXE [ARGS...] — runs shard K (1-based) of N of a Catch2 executable's test
# cases: every N-th name of `EXE --list-test-names-only`, starting at the K-th, passed to EXE
# through an input file (-f) with ARGS. The N shards together run every test case exactly once,
# tests added later included; ctest runs them side by side (tests/CMakeLists.txt: unit_K_of_N).
set -euo pipefail
if (($# < 3)) || ! [[ "$1" =~ ^[0-9]+$ && "$2" =~ ^[0-9]+$ ]] || (($1 < 1 || $1 > $2)); then
  echo "usage: tests/run_shard.sh K N EXE [ARGS...] (1 <= K <= N)" >&2
  exit 2
fi
k="$1" n="$2" exe="$3"
shift 3
list="$(mktemp)"
trap 'rm -f "$list"' EXIT
# Catch v2 exits with the number of test cases listed, so the listing's status is not checked;
# an empty shard is. Each line is read as a quoted test spec: \ " , [ ] ~ are escaped.
names="$("$exe" --list-test-names-only || true)"
awk -v k="$k" -v n="$n" 'NF { if (count++ % n == k - 1) { gsub(/[\\",\[\]~]/, "\\\\&"); print "\"" $0 "\"" } }' \
  <<<"$names" >"$list"
if [[ ! -s "$list" ]]; then
  echo "tests/run_shard.sh: shard $k of $n of $exe has no test cases" >&2
  exit 1
fi
# Catch echoes the whole list as its first line ("Filters: ..."): cut to its start, so that a
# failure's report is readable in a log's tail. The status is the executable's (pipefail; sed
# does not fail), and the EXIT trap removes the list.
"$exe" -f "$list" "$@" | sed -E 's/^(Filters: .{0,160}).*/\1 ... ('"$(wc -l <"$list")"' test cases)/'
