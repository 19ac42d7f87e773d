#!/usr/bin/env bash
# benchmarks/plot.sh RESULTS.csv OUT.png — time vs batch rows m for every linear/* benchmark at
# r = 16, from a peft_bench run written with
#   --benchmark_out=RESULTS.csv --benchmark_out_format=csv
# (medians when the run has repetitions, else the single measurement). Needs gnuplot.
set -euo pipefail
in="${1:?usage: benchmarks/plot.sh RESULTS.csv OUT.png}"
out="${2:?usage: benchmarks/plot.sh RESULTS.csv OUT.png}"
command -v gnuplot >/dev/null || { echo "plot.sh: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 2; }
dat="$(mktemp)"
trap 'rm -f "$dat"' EXIT
# name,iterations,real_time,... -> "impl m ms" for linear/<impl>/m:<m>/k:../n:../r:16
awk -F, '
  NR == 1 { next }
  {
    name = $1; gsub(/"/, "", name)
    if (name !~ /^linear\// || name !~ /\/r:16/) next
    if (name ~ /_(mean|stddev|cv)$/) next
    if (seen_median[name] || (name !~ /_median$/ && has_median)) next
    if (name ~ /_median$/) has_median = 1
    split(name, parts, "/")
    impl = parts[2]; m = parts[3]; sub(/^m:/, "", m)
    unit = $5; gsub(/"/, "", unit)
    t = $3 + 0
    if (unit == "us") t /= 1000; else if (unit == "ns") t /= 1e6; else if (unit == "s") t *= 1000
    print impl, m, t
  }' "$in" | sort -k1,1 -k2,2n > "$dat"
impls=$(cut -d' ' -f1 "$dat" | uniq)
plots=""
for impl in $impls; do
  plots+="${plots:+, }'< grep \"^$impl \" $dat' using 2:3 with linespoints title '$impl'"
done
gnuplot <<GNUPLOT
set terminal pngcairo size 900,600 noenhanced
set output '$out'
set title 'y = x W^T (+ adapter), k = n = 4096, r = 16: median time per call'
set xlabel 'batch rows m'
set ylabel 'ms'
set logscale xy
set key left top
set grid
plot $plots
GNUPLOT
echo "wrote $out"
