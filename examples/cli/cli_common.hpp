// Pieces the `peft` tool's commands share: the usage error and an argument reader.
#pragma once

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace peft_cli {

/// Bad command-line use: the tool prints it with a pointer to --help and exits 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Walks "--flag value" and "--switch" arguments.
class arg_reader {
 public:
  explicit arg_reader(const std::vector<std::string>& args) : args_(args) {}
  bool next() { return ++i_ < args_.size(); }
  const std::string& flag() const { return args_[i_]; }
  std::string value() {
    if (i_ + 1 >= args_.size()) throw usage_error(args_[i_] + " needs a value");
    return args_[++i_];
  }
  long long integer(long long min) {
    const std::string f = flag();
    const std::string v = value();
    std::size_t used = 0;
    long long x = 0;
    try {
      x = std::stoll(v, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != v.size() || x < min) throw usage_error(f + " must be an integer >= " + std::to_string(min) + ", not '" + v + "'");
    return x;
  }
  double number() {
    const std::string f = flag();
    const std::string v = value();
    std::size_t used = 0;
    double x = 0;
    try {
      x = std::stod(v, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != v.size() || !(x == x)) throw usage_error(f + " must be a number, not '" + v + "'");
    return x;
  }
  [[noreturn]] void unknown() const { throw usage_error("unknown argument '" + flag() + "'"); }

 private:
  const std::vector<std::string>& args_;
  std::size_t i_ = static_cast<std::size_t>(-1);
};

int lm_logits(const std::vector<std::string>& args);
int lm_generate(const std::vector<std::string>& args);
int lm_finetune(const std::vector<std::string>& args);
int export_adapter(const std::vector<std::string>& args);
int import_adapter(const std::vector<std::string>& args);

}  // namespace peft_cli
