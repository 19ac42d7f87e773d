// tests/dist/compare_numbers.cpp — compares the numbers several runs printed (no MPI).
//
//   peft_mpi_compare FIELD REL_TOL [--min-count N] [--decreasing] FILE FILE...
//
// From each file takes, in order, every number that follows a whitespace-separated token equal
// to FIELD ("loss" in "step 3 loss 2.1"; a word after FIELD is skipped). Passes (exit 0) when every file has the same count of
// them, at least N (default 1), each within |a - b| <= REL_TOL max(|a|, |b|, 1e-30) of the first
// file's, all finite; with --decreasing also the first file's last number is below its first.
// Prints the largest relative difference; exit 1 on a mismatch, 2 on bad usage or input.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

bool numbers_after(const std::string& path, const std::string& field, std::vector<double>& out) {
  std::ifstream in(path);
  if (!in) return false;
  std::string token, previous;
  while (in >> token) {
    if (previous == field) {
      char* end = nullptr;
      const double v = std::strtod(token.c_str(), &end);
      if (end != token.c_str() && *end == '\0') out.push_back(v);  // other words are skipped
    }
    previous = token;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: peft_mpi_compare FIELD REL_TOL [--min-count N] [--decreasing] FILE FILE...\n");
    return 2;
  }
  const std::string field = argv[1];
  const double tol = std::strtod(argv[2], nullptr);
  std::size_t min_count = 1;
  bool decreasing = false;
  std::vector<std::string> files;
  for (int i = 3; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--min-count" && i + 1 < argc) {
      min_count = std::strtoul(argv[++i], nullptr, 10);
    } else if (a == "--decreasing") {
      decreasing = true;
    } else {
      files.push_back(a);
    }
  }
  if (files.size() < 2 || !(tol >= 0.0)) {
    std::fprintf(stderr, "peft_mpi_compare: need a tolerance >= 0 and two files or more\n");
    return 2;
  }
  std::vector<std::vector<double>> runs(files.size());
  for (std::size_t f = 0; f < files.size(); ++f) {
    if (!numbers_after(files[f], field, runs[f])) {
      std::fprintf(stderr, "peft_mpi_compare: cannot read %s\n", files[f].c_str());
      return 2;
    }
  }
  const auto& ref = runs[0];
  if (ref.size() < min_count) {
    std::fprintf(stderr, "%s: %zu values after '%s', expected at least %zu\n", files[0].c_str(), ref.size(),
                 field.c_str(), min_count);
    return 1;
  }
  int status = 0;
  for (double v : ref) {
    if (!std::isfinite(v)) {
      std::fprintf(stderr, "%s: a value is not finite\n", files[0].c_str());
      status = 1;
    }
  }
  if (decreasing && !(ref.back() < ref.front())) {
    std::fprintf(stderr, "%s: last %s %.9g is not below the first %.9g\n", files[0].c_str(), field.c_str(),
                 ref.back(), ref.front());
    status = 1;
  }
  for (std::size_t f = 1; f < runs.size(); ++f) {
    if (runs[f].size() != ref.size()) {
      std::fprintf(stderr, "%s: %zu values after '%s', %s has %zu\n", files[f].c_str(), runs[f].size(),
                   field.c_str(), files[0].c_str(), ref.size());
      status = 1;
      continue;
    }
    double worst = 0.0;
    std::size_t at = 0;
    for (std::size_t k = 0; k < ref.size(); ++k) {
      const double a = ref[k], b = runs[f][k];
      const double rel = std::fabs(a - b) / std::max({std::fabs(a), std::fabs(b), 1e-30});
      if (!(rel <= worst)) {
        worst = rel;
        at = k;
      }
    }
    std::printf("%s vs %s: %zu values of '%s', largest relative difference %.3g (value %zu)\n",
                files[f].c_str(), files[0].c_str(), ref.size(), field.c_str(), worst, at + 1);
    if (!(worst <= tol)) {
      std::fprintf(stderr, "%s: value %zu is %.9g, %s has %.9g: relative difference %.3g > %.3g\n",
                   files[f].c_str(), at + 1, runs[f][at], files[0].c_str(), ref[at], worst, tol);
      status = 1;
    }
  }
  return status;
}
