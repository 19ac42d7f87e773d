// peft/models/generate.hpp — greedy and sampled decoding with a key/value cache.
//
//   peft::models::sampling_options s{.max_new_tokens = 32, .temperature = 0.8, .top_p = 0.95, .seed = 1};
//   std::vector<long long> ids = peft::models::generate(lm, prompt, s);   // the new tokens only
//
// temperature 0 is greedy (argmax; the first of equal logits, as torch.argmax). Otherwise the
// logits go through transformers' warpers in its order — temperature, top-k, top-p (the smallest
// set whose probability reaches top_p, at least one token) — and a token is drawn from
// peft::rng seeded with `seed` (reproducible here, not PyTorch's stream). Decoding stops after an
// end-of-sequence id of the config unless `stop_at_eos` is false.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/matrix_view.hpp"
#include "peft/core/random.hpp"

namespace peft::models {

struct sampling_options {
  index max_new_tokens = 16;
  double temperature = 0.0;  // 0: greedy
  index top_k = 0;           // 0: off
  double top_p = 1.0;        // 1: off
  std::uint64_t seed = 0;
  bool stop_at_eos = true;
};

/// Picks the next token from `logits` (vocab) as sampling_options says.
template <class T>
long long pick_token(const std::vector<T>& logits, const sampling_options& s, rng& gen) {
  const index V = static_cast<index>(logits.size());
  if (s.temperature <= 0) {
    return static_cast<long long>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
  std::vector<double> z(logits.begin(), logits.end());
  for (auto& v : z) v /= s.temperature;
  std::vector<index> order(static_cast<std::size_t>(V));
  std::iota(order.begin(), order.end(), index{0});
  std::stable_sort(order.begin(), order.end(), [&](index a, index b) { return z[static_cast<std::size_t>(a)] > z[static_cast<std::size_t>(b)]; });
  index keep = V;
  if (s.top_k > 0 && s.top_k < V) {
    // transformers keeps every token whose logit is >= the k-th largest (ties included).
    const double kth = z[static_cast<std::size_t>(order[static_cast<std::size_t>(s.top_k - 1)])];
    keep = s.top_k;
    while (keep < V && z[static_cast<std::size_t>(order[static_cast<std::size_t>(keep)])] >= kth) ++keep;
  }
  const double m = z[static_cast<std::size_t>(order[0])];
  std::vector<double> p(static_cast<std::size_t>(keep));
  double sum = 0;
  for (index i = 0; i < keep; ++i) sum += p[static_cast<std::size_t>(i)] = std::exp(z[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] - m);
  if (s.top_p < 1.0) {
    // Drop the least likely tokens whose cumulative probability (ascending) stays <= 1 - top_p.
    double tail = 0;
    index n = keep;
    while (n > 1) {
      const double q = p[static_cast<std::size_t>(n - 1)] / sum;
      if (tail + q > 1.0 - s.top_p) break;
      tail += q;
      --n;
    }
    keep = n;
    sum = 0;
    for (index i = 0; i < keep; ++i) sum += p[static_cast<std::size_t>(i)];
  }
  double u = gen.uniform() * sum;
  for (index i = 0; i < keep; ++i) {
    u -= p[static_cast<std::size_t>(i)];
    if (u < 0) return static_cast<long long>(order[static_cast<std::size_t>(i)]);
  }
  return static_cast<long long>(order[static_cast<std::size_t>(keep - 1)]);
}

/// Where generate() spent its time: the prompt's one forward pass, then one step per new token.
struct generation_timing {
  index prompt_tokens = 0;
  double prompt_seconds = 0;
  index new_tokens = 0;         // decoded after the first (each a forward pass of one token)
  double decode_seconds = 0;
};

/// The tokens `lm` generates after `prompt` (not including it); `timing`, when given, receives
/// the wall-clock time of the prompt and of the decoding steps.
template <class LM>
std::vector<long long> generate(LM& lm, const std::vector<long long>& prompt, const sampling_options& s,
                                generation_timing* timing = nullptr) {
  constexpr const char* where = "generate";
  if (prompt.empty()) detail::raise<error>(where, "the prompt is empty");
  if (s.max_new_tokens < 0) detail::raise<error>(where, "max_new_tokens must not be negative");
  if (s.top_p <= 0 || s.top_p > 1) detail::raise<error>(where, "top_p must be in (0, 1]");
  const index total = static_cast<index>(prompt.size()) + s.max_new_tokens;
  if (total > lm.config().max_positions) {
    detail::raise<error>(where, "prompt + max_new_tokens = " + std::to_string(total) + " exceeds the model's " +
                                    std::to_string(lm.config().max_positions) + " positions");
  }
  std::vector<long long> out;
  if (s.max_new_tokens == 0) return out;
  auto cache = lm.new_cache(total);
  rng gen(s.seed);
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto logits = lm.decode(cache, prompt);
  const auto t1 = clock::now();
  index steps = 0;
  const auto& eos = lm.config().eos_token_ids;
  for (index t = 0; t < s.max_new_tokens; ++t) {
    const long long next = pick_token(logits, s, gen);
    out.push_back(next);
    if (s.stop_at_eos && std::find(eos.begin(), eos.end(), next) != eos.end()) break;
    if (t + 1 < s.max_new_tokens) {
      logits = lm.decode(cache, {next});
      ++steps;
    }
  }
  if (timing != nullptr) {
    timing->prompt_tokens = static_cast<index>(prompt.size());
    timing->prompt_seconds = std::chrono::duration<double>(t1 - t0).count();
    timing->new_tokens = steps;
    timing->decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  }
  return out;
}

}  // namespace peft::models
