// peft/models/tokenizer.hpp — a model's tokenizer.json, as HuggingFace `tokenizers` defines it.
//
//   auto tok = peft::models::tokenizer::load("model_dir/tokenizer.json");
//   std::vector<long long> ids = tok.encode("Hello, world!");          // with BOS where the model adds it
//   std::string text = tok.decode(ids, /*skip_special_tokens=*/true);
//
// Implemented (the pipelines of GPT-2, Llama-2/3, Mistral, Qwen2/3 and their relatives):
//   model          BPE (merges as "a b" strings or [a, b] pairs; byte_fallback, fuse_unk, unk_token,
//                  ignore_merges)
//   normalizer     NFC, NFD, NFKC, NFKD (utf8proc), Lowercase, Prepend, Replace, Strip, Sequence
//   pre_tokenizer  ByteLevel, Split (String or Regex pattern, every behavior, invert), Metaspace,
//                  Digits, WhitespaceSplit, Whitespace, Sequence; regexes run in PCRE2 with Unicode
//                  properties
//   post_processor TemplateProcessing (single sequences), ByteLevel, Sequence
//   decoder        ByteLevel, Metaspace, Replace, ByteFallback, Fuse, Strip, Sequence
//   added_tokens   special or not, single_word, lstrip, rstrip, normalized
// Anything else in the file (another model type such as Unigram or WordPiece, a normalizer such as
// Precompiled, BPE dropout, truncation or padding) is refused by name with unsupported_error;
// malformed files raise format_error. Encoding and decoding are const and thread-safe.
//
// Programs that include it link PCRE2 and utf8proc (CMake target peft::text).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/detail/json_depth.hpp"
#include "peft/models/detail/unicode_text.hpp"

namespace peft::models {

/// A tokenizer.json: text to token ids and back.
class tokenizer {
 public:
  /// Reads a tokenizer.json file (or, given a directory, its tokenizer.json).
  static tokenizer load(const std::filesystem::path& path) {
    std::filesystem::path file = path;
    if (std::filesystem::is_directory(file)) file /= "tokenizer.json";
    std::ifstream in(file, std::ios::binary);
    if (!in) peft::detail::raise<io_error>("tokenizer::load", "cannot open " + file.string());
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return from_json_text(text, file.string());
  }

  /// Parses the text of a tokenizer.json; `source` names it in errors.
  static tokenizer from_json_text(std::string_view text, const std::string& source = "tokenizer.json") {
    const auto j = nlohmann::json::parse(text.begin(), text.end(), nullptr, false);
    if (j.is_discarded()) peft::detail::raise<format_error>(where_load, source + " is not JSON");
    if (io::detail::json_nests_deeper(j, 64)) peft::detail::raise<format_error>(where_load, source + " nests deeper than 64 levels");
    if (!j.is_object()) peft::detail::raise<format_error>(where_load, source + " is not a JSON object");
    tokenizer t;
    t.source_ = source;
    t.parse(j);
    return t;
  }

  /// Token ids of `text` (UTF-8). With add_special_tokens the post-processor's tokens (a BOS, for
  /// instance) are added, as `tokenizers`' encode does by default. format_error for invalid UTF-8.
  std::vector<long long> encode(std::string_view text, bool add_special_tokens = true) const {
    if (const auto bad = detail::invalid_utf8_offset(text); bad != std::string_view::npos) {
      peft::detail::raise<format_error>("tokenizer::encode", "the text is not valid UTF-8 (byte " + std::to_string(bad) + ")");
    }
    std::vector<long long> ids;
    word_cache cache;  // per call: repeated words of a long text are merged once
    if (add_special_tokens) append_template(ids, true);
    // Added tokens matched in the raw text first; the rest normalised, then split on the added
    // tokens that match normalised text; the rest pre-tokenized and run through the model.
    for (const auto& seg : split_added(text, false, true)) {
      if (seg.added >= 0) {
        ids.push_back(seg.added);
        continue;
      }
      const std::string normal = normalize(seg.text);
      for (const auto& sub : split_added(normal, true, seg.at_start)) {
        if (sub.added >= 0) {
          ids.push_back(sub.added);
          continue;
        }
        for (const auto& p : pre_tokenize(sub.text, sub.at_start)) cached_bpe(p, ids, cache);
      }
    }
    if (add_special_tokens) append_template(ids, false);
    return ids;
  }

  /// The text of `ids`; skip_special_tokens leaves out added tokens marked special.
  /// shape_error for an id outside the vocabulary.
  std::string decode(std::span<const long long> ids, bool skip_special_tokens = false) const {
    std::vector<std::string> toks;
    toks.reserve(ids.size());
    for (const long long id : ids) {
      if (id < 0 || id >= static_cast<long long>(id_to_token_.size()) || !has_id_[static_cast<std::size_t>(id)]) {
        peft::detail::raise<shape_error>("tokenizer::decode", "token id " + std::to_string(id) + " is not in the vocabulary");
      }
      if (skip_special_tokens && special_[static_cast<std::size_t>(id)]) continue;
      toks.push_back(id_to_token_[static_cast<std::size_t>(id)]);
    }
    if (decoders_.empty()) {
      std::string out;
      for (std::size_t i = 0; i < toks.size(); ++i) out += (i ? " " : "") + toks[i];
      return out;
    }
    for (const auto& d : decoders_) toks = apply_decoder(d, std::move(toks));
    std::string out;
    for (const auto& t : toks) out += t;
    return out;
  }
  std::string decode(const std::vector<long long>& ids, bool skip_special_tokens = false) const {
    return decode(std::span<const long long>(ids), skip_special_tokens);
  }

  /// One more than the largest id (model vocabulary and added tokens).
  long long vocab_size() const noexcept { return static_cast<long long>(id_to_token_.size()); }
  /// The id of a token string (vocabulary or added token).
  std::optional<long long> token_to_id(std::string_view token) const {
    if (auto it = added_by_content_.find(std::string(token)); it != added_by_content_.end()) return it->second;
    if (auto it = vocab_.find(std::string(token)); it != vocab_.end()) return it->second;
    return std::nullopt;
  }
  /// The token string of an id (empty if the id is unused).
  std::string id_to_token(long long id) const {
    if (id < 0 || id >= vocab_size()) peft::detail::raise<shape_error>("tokenizer::id_to_token", "token id " + std::to_string(id) + " is out of range");
    return id_to_token_[static_cast<std::size_t>(id)];
  }
  /// Whether `id` is an added token marked special.
  bool is_special(long long id) const noexcept {
    return id >= 0 && id < vocab_size() && special_[static_cast<std::size_t>(id)];
  }

 private:
  static constexpr const char* where_load = "tokenizer::load";

  enum class behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };
  enum class prepend_scheme { always, first, never };

  struct normalizer_step {
    enum class kind { unicode, lowercase, prepend, replace, strip } k{};
    detail::normal_form form{};
    std::string literal, content;  // prepend text; replace's literal pattern and content
    detail::unicode_regex regex;   // replace with a Regex pattern
    bool left = false, right = false;
  };
  struct pre_step {
    enum class kind { byte_level, split, metaspace, whitespace_split } k{};
    bool add_prefix_space = false, use_regex = true, invert = false, split = true;
    behavior how = behavior::isolated;
    std::string literal;  // Split's String pattern; Metaspace's replacement
    detail::unicode_regex regex;
    prepend_scheme prepend = prepend_scheme::always;
  };
  struct decoder_step {
    enum class kind { byte_level, metaspace, replace, byte_fallback, fuse, strip } k{};
    std::string pattern, content;
    std::size_t start = 0, stop = 0;
    prepend_scheme prepend = prepend_scheme::always;
  };
  struct added_token {
    long long id = 0;
    std::string content;
    bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
  };
  struct segment {
    std::string text;
    long long added = -1;  // the added token's id, or -1 for text
    bool at_start = false;  // begins at the start of the original text (Metaspace's "first")
  };

  std::string source_;
  std::unordered_map<std::string, long long> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<unsigned char> has_id_, special_;
  std::unordered_map<std::uint64_t, std::pair<int, long long>> merges_;  // (left, right) -> (rank, merged id)
  std::optional<long long> unk_;
  bool byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  std::vector<normalizer_step> normalizers_;
  std::vector<pre_step> pre_;
  std::vector<decoder_step> decoders_;
  std::vector<added_token> added_;
  std::array<std::vector<std::size_t>, 256> added_by_first_byte_;  // indices into added_, longest first
  std::unordered_map<std::string, long long> added_by_content_;
  std::vector<long long> template_before_, template_after_;
  std::array<long long, 256> byte_tokens_{};  // <0xXX> ids, -1 where absent

  // ---- loading ------------------------------------------------------------------------------

  [[noreturn]] void bad(const std::string& what) const { peft::detail::raise<format_error>(where_load, source_ + ": " + what); }
  [[noreturn]] void unsupported(const std::string& what) const {
    peft::detail::raise<unsupported_error>(where_load, source_ + ": " + what + " is not implemented");
  }

  /// Refuses keys of `j` outside `known` (a component's fields this class implements).
  void only_keys(const nlohmann::json& j, const std::string& what, std::initializer_list<const char*> known) const {
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (std::none_of(known.begin(), known.end(), [&](const char* k) { return it.key() == k; })) {
        unsupported(what + " field '" + it.key() + "'");
      }
    }
  }
  std::string str(const nlohmann::json& j, const char* key, const std::string& what, std::optional<std::string> dflt = {}) const {
    if (!j.contains(key) || j[key].is_null()) {
      if (dflt) return *dflt;
      bad(what + " has no '" + key + "'");
    }
    if (!j[key].is_string()) bad(what + "'s '" + key + "' is not a string");
    return j[key].get<std::string>();
  }
  bool flag(const nlohmann::json& j, const char* key, const std::string& what, bool dflt) const {
    if (!j.contains(key) || j[key].is_null()) return dflt;
    if (!j[key].is_boolean()) bad(what + "'s '" + key + "' is not true or false");
    return j[key].get<bool>();
  }
  std::size_t count(const nlohmann::json& j, const char* key, const std::string& what) const {
    if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<long long>() < 0) bad(what + "'s '" + key + "' is not a count");
    return j[key].get<std::size_t>();
  }
  static std::string type_of(const nlohmann::json& j) {
    return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>() : std::string();
  }
  /// {"String": s} or {"Regex": r}: (literal, regex).
  std::pair<std::string, detail::unicode_regex> pattern(const nlohmann::json& j, const std::string& what) const {
    if (!j.is_object() || j.size() != 1) bad(what + "'s pattern is not {\"String\": ...} or {\"Regex\": ...}");
    if (j.contains("String") && j["String"].is_string()) return {j["String"].get<std::string>(), {}};
    if (j.contains("Regex") && j["Regex"].is_string()) {
      return {std::string(), detail::unicode_regex(j["Regex"].get<std::string>(), where_load)};
    }
    bad(what + "'s pattern is not {\"String\": ...} or {\"Regex\": ...}");
  }
  prepend_scheme scheme(const nlohmann::json& j, const std::string& what) const {
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
      const std::string s = str(j, "prepend_scheme", what);
      if (s == "always") return prepend_scheme::always;
      if (s == "first") return prepend_scheme::first;
      if (s == "never") return prepend_scheme::never;
      bad(what + "'s prepend_scheme '" + s + "' is not always, first or never");
    }
    return flag(j, "add_prefix_space", what, true) ? prepend_scheme::always : prepend_scheme::never;  // older files
  }
  std::string single_char(const nlohmann::json& j, const char* key, const std::string& what) const {
    const std::string s = str(j, key, what);
    if (s.empty() || detail::invalid_utf8_offset(s) != std::string::npos ||
        detail::utf8_length(static_cast<unsigned char>(s[0])) != s.size()) {
      bad(what + "'s '" + key + "' is not one character");
    }
    return s;
  }

  void parse(const nlohmann::json& j) {
    only_keys(j, "tokenizer.json", {"version", "truncation", "padding", "added_tokens", "normalizer", "pre_tokenizer", "model",
                                    "post_processor", "decoder"});
    if (j.contains("truncation") && !j["truncation"].is_null()) unsupported("truncation");
    if (j.contains("padding") && !j["padding"].is_null()) unsupported("padding");
    if (!j.contains("model")) bad("no 'model'");
    parse_model(j["model"]);
    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) parse_added(j["added_tokens"]);
    if (j.contains("normalizer") && !j["normalizer"].is_null()) parse_normalizer(j["normalizer"]);
    if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) parse_pre(j["pre_tokenizer"]);
    if (j.contains("post_processor") && !j["post_processor"].is_null()) parse_post(j["post_processor"]);
    if (j.contains("decoder") && !j["decoder"].is_null()) parse_decoder(j["decoder"]);
  }

  void set_token(long long id, const std::string& token) {
    constexpr long long max_vocab = 1LL << 24;
    if (id < 0 || id >= max_vocab) bad("token id " + std::to_string(id) + " is out of range");
    const auto u = static_cast<std::size_t>(id);
    if (u >= id_to_token_.size()) {
      id_to_token_.resize(u + 1);
      has_id_.resize(u + 1, 0);
      special_.resize(u + 1, 0);
    }
    id_to_token_[u] = token;
    has_id_[u] = 1;
  }

  static std::uint64_t pair_key(long long a, long long b) {
    return (static_cast<std::uint64_t>(a) << 32) | static_cast<std::uint64_t>(b);
  }

  void parse_model(const nlohmann::json& m) {
    if (!m.is_object()) bad("'model' is not an object");
    const std::string type = type_of(m);
    if (!type.empty() && type != "BPE") unsupported("the model type '" + type + "' (BPE is)");
    if (type.empty() && !m.contains("merges")) unsupported("a model without type or merges");
    only_keys(m, "the BPE model", {"type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk",
                                   "byte_fallback", "ignore_merges", "vocab", "merges"});
    if (m.contains("dropout") && !m["dropout"].is_null() && !(m["dropout"].is_number() && m["dropout"].get<double>() == 0.0)) {
      unsupported("BPE dropout");
    }
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (m.contains(k) && !m[k].is_null() && !(m[k].is_string() && m[k].get<std::string>().empty())) {
        unsupported(std::string("the BPE model's ") + k);
      }
    }
    byte_fallback_ = flag(m, "byte_fallback", "the BPE model", false);
    fuse_unk_ = flag(m, "fuse_unk", "the BPE model", false);
    ignore_merges_ = flag(m, "ignore_merges", "the BPE model", false);
    if (!m.contains("vocab") || !m["vocab"].is_object()) bad("the BPE model has no vocab object");
    for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
      if (!it.value().is_number_integer()) bad("the id of '" + it.key() + "' is not an integer");
      const long long id = it.value().get<long long>();
      set_token(id, it.key());
      vocab_[it.key()] = id;
    }
    byte_tokens_.fill(-1);
    static constexpr char hex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      const std::string name = std::string("<0x") + hex[b >> 4] + hex[b & 15] + ">";
      if (auto it = vocab_.find(name); it != vocab_.end()) byte_tokens_[static_cast<std::size_t>(b)] = it->second;
    }
    if (m.contains("unk_token") && !m["unk_token"].is_null()) {
      const std::string u = str(m, "unk_token", "the BPE model");
      auto it = vocab_.find(u);
      if (it == vocab_.end()) bad("the unk_token '" + u + "' is not in the vocabulary");
      unk_ = it->second;
    }
    if (!m.contains("merges") || !m["merges"].is_array()) bad("the BPE model has no merges array");
    int rank = 0;
    for (const auto& e : m["merges"]) {
      std::string a, b;
      if (e.is_string()) {
        const std::string s = e.get<std::string>();
        const std::size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) bad("the merge '" + s + "' is not two tokens");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        a = e[0].get<std::string>();
        b = e[1].get<std::string>();
      } else {
        bad("merge " + std::to_string(rank) + " is neither \"a b\" nor [a, b]");
      }
      const auto ia = vocab_.find(a), ib = vocab_.find(b), ic = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end()) bad("the merge '" + a + " " + b + "' has a token outside the vocabulary");
      if (ic == vocab_.end()) bad("the merge '" + a + " " + b + "' makes '" + a + b + "', which is not in the vocabulary");
      merges_.try_emplace(pair_key(ia->second, ib->second), rank, ic->second);
      ++rank;
    }
  }

  void parse_added(const nlohmann::json& a) {
    if (!a.is_array()) bad("'added_tokens' is not an array");
    for (const auto& e : a) {
      if (!e.is_object()) bad("an added token is not an object");
      only_keys(e, "an added token", {"id", "content", "single_word", "lstrip", "rstrip", "normalized", "special"});
      added_token t;
      if (!e.contains("id") || !e["id"].is_number_integer()) bad("an added token has no integer id");
      t.id = e["id"].get<long long>();
      t.content = str(e, "content", "an added token");
      if (t.content.empty()) bad("an added token is empty");
      t.single_word = flag(e, "single_word", "an added token", false);
      t.lstrip = flag(e, "lstrip", "an added token", false);
      t.rstrip = flag(e, "rstrip", "an added token", false);
      t.special = flag(e, "special", "an added token", false);
      t.normalized = flag(e, "normalized", "an added token", !t.special);
      set_token(t.id, t.content);
      special_[static_cast<std::size_t>(t.id)] = t.special ? 1 : 0;
      added_by_content_[t.content] = t.id;
      added_.push_back(std::move(t));
    }
    // Longest first: at one position the longest added token matches (leftmost-longest).
    std::stable_sort(added_.begin(), added_.end(), [](const added_token& x, const added_token& y) { return x.content.size() > y.content.size(); });
    for (auto& v : added_by_first_byte_) v.clear();
    for (std::size_t k = 0; k < added_.size(); ++k) added_by_first_byte_[static_cast<unsigned char>(added_[k].content[0])].push_back(k);
  }

  void parse_normalizer(const nlohmann::json& n) {
    const std::string type = type_of(n);
    const std::string what = "the " + type + " normalizer";
    if (type == "Sequence") {
      only_keys(n, what, {"type", "normalizers"});
      if (!n.contains("normalizers") || !n["normalizers"].is_array()) bad("a Sequence normalizer has no 'normalizers' array");
      for (const auto& e : n["normalizers"]) parse_normalizer(e);
      return;
    }
    normalizer_step s;
    if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
      only_keys(n, what, {"type"});
      s.k = normalizer_step::kind::unicode;
      s.form = type == "NFC" ? detail::normal_form::nfc : type == "NFD" ? detail::normal_form::nfd
                                                      : type == "NFKC" ? detail::normal_form::nfkc : detail::normal_form::nfkd;
    } else if (type == "Lowercase") {
      only_keys(n, what, {"type"});
      s.k = normalizer_step::kind::lowercase;
    } else if (type == "Prepend") {
      only_keys(n, what, {"type", "prepend"});
      s.k = normalizer_step::kind::prepend;
      s.literal = str(n, "prepend", what);
    } else if (type == "Replace") {
      only_keys(n, what, {"type", "pattern", "content"});
      s.k = normalizer_step::kind::replace;
      if (!n.contains("pattern")) bad(what + " has no pattern");
      std::tie(s.literal, s.regex) = pattern(n["pattern"], what);
      s.content = str(n, "content", what);
      if (!s.regex && s.literal.empty()) bad(what + "'s pattern is empty");
    } else if (type == "Strip") {
      only_keys(n, what, {"type", "strip_left", "strip_right"});
      s.k = normalizer_step::kind::strip;
      s.left = flag(n, "strip_left", what, true);
      s.right = flag(n, "strip_right", what, true);
    } else {
      unsupported(type.empty() ? std::string("a normalizer without type") : what);
    }
    normalizers_.push_back(std::move(s));
  }

  void parse_pre(const nlohmann::json& p) {
    const std::string type = type_of(p);
    const std::string what = "the " + type + " pre-tokenizer";
    if (type == "Sequence") {
      only_keys(p, what, {"type", "pretokenizers"});
      if (!p.contains("pretokenizers") || !p["pretokenizers"].is_array()) bad("a Sequence pre-tokenizer has no 'pretokenizers' array");
      for (const auto& e : p["pretokenizers"]) parse_pre(e);
      return;
    }
    pre_step s;
    if (type == "ByteLevel") {
      only_keys(p, what, {"type", "add_prefix_space", "trim_offsets", "use_regex"});
      s.k = pre_step::kind::byte_level;
      s.add_prefix_space = flag(p, "add_prefix_space", what, true);
      s.use_regex = flag(p, "use_regex", what, true);
      if (s.use_regex) {
        s.regex = detail::unicode_regex(R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", where_load);
      }
    } else if (type == "Split") {
      only_keys(p, what, {"type", "pattern", "behavior", "invert"});
      s.k = pre_step::kind::split;
      if (!p.contains("pattern")) bad(what + " has no pattern");
      std::tie(s.literal, s.regex) = pattern(p["pattern"], what);
      if (!s.regex && s.literal.empty()) bad(what + "'s pattern is empty");
      s.how = parse_behavior(str(p, "behavior", what), what);
      s.invert = flag(p, "invert", what, false);
    } else if (type == "Metaspace") {
      only_keys(p, what, {"type", "replacement", "prepend_scheme", "add_prefix_space", "split", "str_rep"});
      s.k = pre_step::kind::metaspace;
      s.literal = single_char(p, "replacement", what);
      s.prepend = scheme(p, what);
      s.split = flag(p, "split", what, true);
    } else if (type == "Digits") {
      only_keys(p, what, {"type", "individual_digits"});
      s.k = pre_step::kind::split;
      s.regex = detail::unicode_regex(R"(\p{N})", where_load);
      s.how = flag(p, "individual_digits", what, false) ? behavior::isolated : behavior::contiguous;
    } else if (type == "WhitespaceSplit") {
      only_keys(p, what, {"type"});
      s.k = pre_step::kind::whitespace_split;
    } else if (type == "Whitespace") {
      only_keys(p, what, {"type"});
      s.k = pre_step::kind::split;
      s.regex = detail::unicode_regex(R"(\w+|[^\w\s]+)", where_load);
      s.how = behavior::removed;
      s.invert = true;
    } else {
      unsupported(type.empty() ? std::string("a pre-tokenizer without type") : what);
    }
    pre_.push_back(std::move(s));
  }

  behavior parse_behavior(const std::string& b, const std::string& what) const {
    if (b == "Removed") return behavior::removed;
    if (b == "Isolated") return behavior::isolated;
    if (b == "MergedWithPrevious") return behavior::merged_with_previous;
    if (b == "MergedWithNext") return behavior::merged_with_next;
    if (b == "Contiguous") return behavior::contiguous;
    bad(what + "'s behavior '" + b + "' is not Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous");
  }

  void parse_post(const nlohmann::json& p) {
    const std::string type = type_of(p);
    const std::string what = "the " + type + " post-processor";
    if (type == "Sequence") {
      only_keys(p, what, {"type", "processors"});
      if (!p.contains("processors") || !p["processors"].is_array()) bad("a Sequence post-processor has no 'processors' array");
      for (const auto& e : p["processors"]) parse_post(e);
    } else if (type == "ByteLevel") {
      only_keys(p, what, {"type", "add_prefix_space", "trim_offsets", "use_regex"});  // offsets only: ids unchanged
    } else if (type == "TemplateProcessing") {
      only_keys(p, what, {"type", "single", "pair", "special_tokens"});
      if (!p.contains("single") || !p["single"].is_array()) bad(what + " has no 'single' template");
      if (!template_before_.empty() || !template_after_.empty()) unsupported("a second TemplateProcessing");
      bool seen_sequence = false;
      for (const auto& piece : p["single"]) {
        if (piece.is_object() && piece.contains("Sequence")) {
          if (seen_sequence) bad(what + "'s single template names the sequence twice");
          seen_sequence = true;
        } else if (piece.is_object() && piece.contains("SpecialToken") && piece["SpecialToken"].is_object()) {
          const std::string name = str(piece["SpecialToken"], "id", what);
          std::vector<long long> ids;
          if (p.contains("special_tokens") && p["special_tokens"].is_object() && p["special_tokens"].contains(name)) {
            const auto& st = p["special_tokens"][name];
            if (!st.is_object() || !st.contains("ids") || !st["ids"].is_array()) bad(what + "'s special token '" + name + "' has no ids");
            for (const auto& id : st["ids"]) {
              if (!id.is_number_integer() || id.get<long long>() < 0 || id.get<long long>() >= vocab_size()) {
                bad(what + "'s special token '" + name + "' has an id outside the vocabulary");
              }
              ids.push_back(id.get<long long>());
            }
          } else {
            bad(what + " uses the special token '" + name + "' without defining it");
          }
          auto& dst = seen_sequence ? template_after_ : template_before_;
          dst.insert(dst.end(), ids.begin(), ids.end());
        } else {
          bad(what + "'s single template has a piece that is neither Sequence nor SpecialToken");
        }
      }
      if (!seen_sequence) bad(what + "'s single template has no Sequence");
    } else {
      unsupported(type.empty() ? std::string("a post-processor without type") : what);
    }
  }

  void parse_decoder(const nlohmann::json& d) {
    const std::string type = type_of(d);
    const std::string what = "the " + type + " decoder";
    if (type == "Sequence") {
      only_keys(d, what, {"type", "decoders"});
      if (!d.contains("decoders") || !d["decoders"].is_array()) bad("a Sequence decoder has no 'decoders' array");
      for (const auto& e : d["decoders"]) parse_decoder(e);
      return;
    }
    decoder_step s;
    if (type == "ByteLevel") {
      only_keys(d, what, {"type", "add_prefix_space", "trim_offsets", "use_regex"});
      s.k = decoder_step::kind::byte_level;
    } else if (type == "Metaspace") {
      only_keys(d, what, {"type", "replacement", "prepend_scheme", "add_prefix_space", "split", "str_rep"});
      s.k = decoder_step::kind::metaspace;
      s.pattern = single_char(d, "replacement", what);
      s.prepend = scheme(d, what);
    } else if (type == "Replace") {
      only_keys(d, what, {"type", "pattern", "content"});
      s.k = decoder_step::kind::replace;
      if (!d.contains("pattern") || !d["pattern"].is_object() || !d["pattern"].contains("String")) {
        unsupported("a Replace decoder with a Regex pattern");
      }
      s.pattern = pattern(d["pattern"], what).first;
      if (s.pattern.empty()) bad(what + "'s pattern is empty");
      s.content = str(d, "content", what);
    } else if (type == "ByteFallback") {
      only_keys(d, what, {"type"});
      s.k = decoder_step::kind::byte_fallback;
    } else if (type == "Fuse") {
      only_keys(d, what, {"type"});
      s.k = decoder_step::kind::fuse;
    } else if (type == "Strip") {
      only_keys(d, what, {"type", "content", "start", "stop"});
      s.k = decoder_step::kind::strip;
      s.content = single_char(d, "content", what);
      s.start = count(d, "start", what);
      s.stop = count(d, "stop", what);
    } else {
      unsupported(type.empty() ? std::string("a decoder without type") : what);
    }
    decoders_.push_back(std::move(s));
  }

  // ---- encoding -----------------------------------------------------------------------------

  void append_template(std::vector<long long>& ids, bool before) const {
    const auto& t = before ? template_before_ : template_after_;
    ids.insert(ids.end(), t.begin(), t.end());
  }

  /// Whether the character at s[i] is Unicode White_Space (Rust's char::is_whitespace); its
  /// length in bytes goes to *len.
  static bool is_space_at(std::string_view s, std::size_t i, std::size_t* len) {
    const std::size_t n = detail::utf8_length(static_cast<unsigned char>(s[i]));
    *len = n;
    const std::uint32_t cp = detail::decode_utf8(s.data() + i, n);
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x85 || cp == 0x2028 || cp == 0x2029 ||
           utf8proc_category(static_cast<utf8proc_int32_t>(cp)) == UTF8PROC_CATEGORY_ZS;
  }
  static bool is_word_char(std::uint32_t cp) {
    const auto c = utf8proc_category(static_cast<utf8proc_int32_t>(cp));
    return cp == '_' || (c >= UTF8PROC_CATEGORY_LU && c <= UTF8PROC_CATEGORY_LO) ||
           (c >= UTF8PROC_CATEGORY_ND && c <= UTF8PROC_CATEGORY_NO);
  }
  /// The code point ending just before byte i (i > 0).
  static std::uint32_t char_before(std::string_view s, std::size_t i) {
    std::size_t b = i - 1;
    while (b > 0 && (static_cast<unsigned char>(s[b]) & 0xC0) == 0x80) --b;
    return detail::decode_utf8(s.data() + b, i - b);
  }

  /// `text` split into the added tokens (those matching normalised text when `normalized`, the
  /// others otherwise) and the text between them.
  std::vector<segment> split_added(std::string_view text, bool normalized, bool at_start) const {
    std::vector<segment> out;
    std::size_t done = 0;  // text before this is emitted
    std::size_t i = 0;
    while (i < text.size()) {
      const added_token* hit = nullptr;
      for (const std::size_t k : added_by_first_byte_[static_cast<unsigned char>(text[i])]) {
        const added_token& t = added_[k];
        if (t.normalized != normalized) continue;
        if (text.compare(i, t.content.size(), t.content) != 0) continue;
        if (t.single_word) {
          const std::size_t e = i + t.content.size();
          const bool left_ok = i == 0 || !is_word_char(char_before(text, i));
          const bool right_ok = e >= text.size() ||
                                !is_word_char(detail::decode_utf8(text.data() + e, detail::utf8_length(static_cast<unsigned char>(text[e]))));
          if (!left_ok || !right_ok) continue;
        }
        hit = &t;
        break;  // longest first
      }
      if (!hit) {
        i += detail::utf8_length(static_cast<unsigned char>(text[i]));
        continue;
      }
      std::size_t start = i, stop = i + hit->content.size();
      if (hit->lstrip) {
        while (start > done) {
          std::size_t b = start - 1;
          while (b > done && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
          std::size_t len = 0;
          if (!is_space_at(text, b, &len)) break;
          start = b;
        }
      }
      if (hit->rstrip) {
        std::size_t len = 0;
        while (stop < text.size() && is_space_at(text, stop, &len)) stop += len;
      }
      if (start > done) out.push_back({std::string(text.substr(done, start - done)), -1, at_start && done == 0});
      out.push_back({std::string(), hit->id, false});
      done = i = stop;
    }
    if (done < text.size()) out.push_back({std::string(text.substr(done)), -1, at_start && done == 0});
    return out;
  }

  std::string normalize(std::string_view s) const {
    std::string t(s);
    for (const auto& n : normalizers_) {
      switch (n.k) {
        case normalizer_step::kind::unicode: t = detail::normalize_unicode(t, n.form); break;
        case normalizer_step::kind::lowercase: t = detail::lowercase_unicode(t); break;
        case normalizer_step::kind::prepend:
          if (!t.empty()) t = n.literal + t;
          break;
        case normalizer_step::kind::replace: t = replace_all(t, n.literal, n.regex, n.content); break;
        case normalizer_step::kind::strip: t = strip_spaces(t, n.left, n.right); break;
      }
    }
    return t;
  }

  static std::string replace_all(const std::string& t, const std::string& literal, const detail::unicode_regex& regex,
                                 const std::string& content) {
    std::string out;
    std::size_t prev = 0;
    for (const auto& [b, e] : matches(t, literal, regex)) {
      if (e == b) continue;
      out.append(t, prev, b - prev);
      out += content;
      prev = e;
    }
    out.append(t, prev, std::string::npos);
    return out;
  }

  static std::string strip_spaces(const std::string& t, bool left, bool right) {
    std::size_t b = 0, e = t.size(), len = 0;
    if (left) {
      while (b < e && is_space_at(t, b, &len)) b += len;
    }
    if (right) {
      while (e > b) {
        std::size_t k = e - 1;
        while (k > b && (static_cast<unsigned char>(t[k]) & 0xC0) == 0x80) --k;
        if (!is_space_at(t, k, &len)) break;
        e = k;
      }
    }
    return t.substr(b, e - b);
  }

  /// Matches of a literal or a regex in t.
  static std::vector<std::pair<std::size_t, std::size_t>> matches(std::string_view t, const std::string& literal,
                                                                  const detail::unicode_regex& regex) {
    if (regex) return regex.find_all(t);
    std::vector<std::pair<std::size_t, std::size_t>> out;
    for (std::size_t p = t.find(literal); p != std::string_view::npos; p = t.find(literal, p + literal.size())) {
      out.emplace_back(p, p + literal.size());
    }
    return out;
  }

  struct piece {
    std::string text;
    bool at_start;
  };

  /// `tokenizers`' split of one piece by its matches under a behavior.
  static void split_piece(const piece& p, const std::vector<std::pair<std::size_t, std::size_t>>& found, behavior how, bool invert,
                          std::vector<piece>& out) {
    // The piece as consecutive ranges, each a match or not.
    std::vector<std::pair<std::pair<std::size_t, std::size_t>, bool>> parts;
    std::size_t prev = 0;
    for (const auto& [b, e] : found) {
      if (b > prev) parts.push_back({{prev, b}, invert});
      if (e > b) parts.push_back({{b, e}, !invert});
      prev = e;
    }
    if (prev < p.text.size()) parts.push_back({{prev, p.text.size()}, invert});
    std::vector<std::pair<std::size_t, std::size_t>> ranges;
    switch (how) {
      case behavior::removed:
        for (const auto& [r, m] : parts) {
          if (!m) ranges.push_back(r);
        }
        break;
      case behavior::isolated:
        for (const auto& [r, m] : parts) ranges.push_back(r);
        break;
      case behavior::merged_with_previous: {
        bool previous_match = false;
        for (const auto& [r, m] : parts) {
          if (m && !previous_match && !ranges.empty()) ranges.back().second = r.second;
          else ranges.push_back(r);
          previous_match = m;
        }
        break;
      }
      case behavior::merged_with_next: {
        bool next_match = false;
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
          if (it->second && !next_match && !ranges.empty()) ranges.back().first = it->first.first;
          else ranges.push_back(it->first);
          next_match = it->second;
        }
        std::reverse(ranges.begin(), ranges.end());
        break;
      }
      case behavior::contiguous: {
        bool previous_match = false;
        for (const auto& [r, m] : parts) {
          if (m && previous_match) ranges.back().second = r.second;
          else ranges.push_back(r);
          previous_match = m;
        }
        break;
      }
    }
    for (const auto& [b, e] : ranges) {
      if (e > b) out.push_back({p.text.substr(b, e - b), p.at_start && b == 0});
    }
  }

  std::vector<piece> pre_tokenize(std::string_view text, bool at_start) const {
    std::vector<piece> pieces{{std::string(text), at_start}};
    for (const auto& s : pre_) {
      std::vector<piece> next;
      for (auto& p : pieces) {
        switch (s.k) {
          case pre_step::kind::split: split_piece(p, matches(p.text, s.literal, s.regex), s.how, s.invert, next); break;
          case pre_step::kind::whitespace_split: {
            std::vector<std::pair<std::size_t, std::size_t>> spaces;
            std::size_t len = 0;
            for (std::size_t i = 0; i < p.text.size(); i += len) {
              if (is_space_at(p.text, i, &len)) spaces.emplace_back(i, i + len);
            }
            split_piece(p, spaces, behavior::removed, false, next);
            break;
          }
          case pre_step::kind::metaspace: {
            std::string t = replace_all(p.text, " ", {}, s.literal);
            const bool starts = t.compare(0, s.literal.size(), s.literal) == 0;
            if (!starts && (s.prepend == prepend_scheme::always || (s.prepend == prepend_scheme::first && p.at_start))) t = s.literal + t;
            const piece q{std::move(t), p.at_start};
            if (s.split) split_piece(q, matches(q.text, s.literal, {}), behavior::merged_with_next, false, next);
            else next.push_back(q);
            break;
          }
          case pre_step::kind::byte_level: {
            std::string t = std::move(p.text);
            if (s.add_prefix_space && (t.empty() || t[0] != ' ')) t.insert(t.begin(), ' ');
            std::vector<piece> parts;
            if (s.use_regex) split_piece({t, p.at_start}, s.regex.find_all(t), behavior::isolated, false, parts);
            else parts.push_back({std::move(t), p.at_start});
            const auto& table = detail::byte_level_table::get();
            for (auto& q : parts) {
              std::string mapped;
              mapped.reserve(q.text.size() * 2);
              for (const char c : q.text) mapped += table.to_char[static_cast<unsigned char>(c)];
              next.push_back({std::move(mapped), q.at_start});
            }
            break;
          }
        }
      }
      pieces = std::move(next);
    }
    return pieces;
  }

  using word_cache = std::unordered_map<std::string, std::vector<long long>>;

  /// bpe() through `cache` for pieces of up to 64 bytes (words; a long piece is rarely repeated).
  void cached_bpe(const piece& p, std::vector<long long>& ids, word_cache& cache) const {
    if (p.text.size() > 64) return bpe(p, ids);
    if (auto it = cache.find(p.text); it != cache.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
    const std::size_t first = ids.size();
    bpe(p, ids);
    if (cache.size() < (1u << 16)) cache.emplace(p.text, std::vector<long long>(ids.begin() + static_cast<std::ptrdiff_t>(first), ids.end()));
  }

  /// BPE on one pre-tokenized piece: characters (or their bytes' <0xXX> tokens, or unk) merged by
  /// rank, lowest first and leftmost among equal ranks.
  void bpe(const piece& p, std::vector<long long>& ids) const {
    const std::string& w = p.text;
    if (w.empty()) return;
    if (ignore_merges_) {
      if (auto it = vocab_.find(w); it != vocab_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    struct symbol {
      long long id;
      int prev, next;
      bool alive;
    };
    std::vector<symbol> sym;
    bool pending_unk = false;  // a fused unk not yet added
    auto push = [&](long long id) {
      sym.push_back({id, static_cast<int>(sym.size()) - 1, static_cast<int>(sym.size()) + 1, true});
    };
    for (std::size_t i = 0; i < w.size();) {
      const std::size_t n = detail::utf8_length(static_cast<unsigned char>(w[i]));
      const std::string ch = w.substr(i, n);
      i += n;
      if (auto it = vocab_.find(ch); it != vocab_.end()) {
        if (pending_unk) push(*unk_), pending_unk = false;
        push(it->second);
        continue;
      }
      if (byte_fallback_) {
        bool all = true;
        for (const char c : ch) all = all && byte_tokens_[static_cast<unsigned char>(c)] >= 0;
        if (all) {
          if (pending_unk) push(*unk_), pending_unk = false;
          for (const char c : ch) push(byte_tokens_[static_cast<unsigned char>(c)]);
          continue;
        }
      }
      if (!unk_) continue;  // no unk token: the character is dropped, as `tokenizers` does
      if (pending_unk && !fuse_unk_) push(*unk_);
      pending_unk = true;
    }
    if (pending_unk) push(*unk_);
    if (sym.empty()) return;
    sym.back().next = -1;
    struct cand {
      int rank, pos;
      long long id;
      bool operator>(const cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<cand, std::vector<cand>, std::greater<cand>> queue;
    auto consider = [&](int pos) {
      const int nx = sym[static_cast<std::size_t>(pos)].next;
      if (nx < 0) return;
      if (auto it = merges_.find(pair_key(sym[static_cast<std::size_t>(pos)].id, sym[static_cast<std::size_t>(nx)].id)); it != merges_.end()) {
        queue.push({it->second.first, pos, it->second.second});
      }
    };
    for (int k = 0; k + 1 < static_cast<int>(sym.size()); ++k) consider(k);
    while (!queue.empty()) {
      const cand c = queue.top();
      queue.pop();
      auto& left = sym[static_cast<std::size_t>(c.pos)];
      if (!left.alive || left.next < 0) continue;
      auto& right = sym[static_cast<std::size_t>(left.next)];
      const auto it = merges_.find(pair_key(left.id, right.id));
      if (it == merges_.end() || it->second.second != c.id || it->second.first != c.rank) continue;  // stale
      left.id = c.id;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) sym[static_cast<std::size_t>(right.next)].prev = c.pos;
      if (left.prev >= 0) consider(left.prev);
      consider(c.pos);
    }
    for (int k = 0; k >= 0; k = sym[static_cast<std::size_t>(k)].next) ids.push_back(sym[static_cast<std::size_t>(k)].id);
  }

  // ---- decoding -----------------------------------------------------------------------------

  static std::vector<std::string> apply_decoder(const decoder_step& d, std::vector<std::string> toks) {
    switch (d.k) {
      case decoder_step::kind::byte_level: {
        const auto& table = detail::byte_level_table::get();
        std::string bytes;
        for (const auto& t : toks) {
          std::string mine;
          bool all = true;
          for (std::size_t i = 0; i < t.size() && all;) {
            const std::size_t n = detail::utf8_length(static_cast<unsigned char>(t[i]));
            const int b = table.byte_of(detail::decode_utf8(t.data() + i, n));
            if (b < 0) all = false;
            else mine.push_back(static_cast<char>(b));
            i += n;
          }
          bytes += all ? mine : t;
        }
        return {detail::utf8_lossy(bytes)};
      }
      case decoder_step::kind::metaspace: {
        for (std::size_t i = 0; i < toks.size(); ++i) {
          std::string out;
          const std::string& t = toks[i];
          for (std::size_t p = 0; p < t.size();) {
            if (t.compare(p, d.pattern.size(), d.pattern) == 0) {
              if (!(i == 0 && d.prepend != prepend_scheme::never)) out.push_back(' ');
              p += d.pattern.size();
            } else {
              out.push_back(t[p++]);
            }
          }
          toks[i] = std::move(out);
        }
        return toks;
      }
      case decoder_step::kind::replace:
        for (auto& t : toks) t = replace_all(t, d.pattern, {}, d.content);
        return toks;
      case decoder_step::kind::byte_fallback: {
        std::vector<std::string> out;
        std::string pending;
        auto flush = [&] {
          if (pending.empty()) return;
          if (detail::invalid_utf8_offset(pending) == std::string::npos) {
            out.push_back(pending);
          } else {
            for (std::size_t k = 0; k < pending.size(); ++k) out.emplace_back("\xEF\xBF\xBD");
          }
          pending.clear();
        };
        for (auto& t : toks) {
          int byte = -1;
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') byte = hex_byte(t[3], t[4]);
          if (byte >= 0) {
            pending.push_back(static_cast<char>(byte));
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        return out;
      }
      case decoder_step::kind::fuse: {
        std::string all;
        for (const auto& t : toks) all += t;
        return {all};
      }
      case decoder_step::kind::strip:
        for (auto& t : toks) {
          std::size_t b = 0, e = t.size();
          for (std::size_t k = 0; k < d.start && t.compare(b, d.content.size(), d.content) == 0 && b < e; ++k) b += d.content.size();
          for (std::size_t k = 0; k < d.stop && e >= b + d.content.size() && t.compare(e - d.content.size(), d.content.size(), d.content) == 0; ++k) {
            e -= d.content.size();
          }
          t = t.substr(b, e - b);
        }
        return toks;
    }
    return toks;
  }

  static int hex_byte(char hi, char lo) {
    auto v = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
    const int h = v(hi), l = v(lo);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
  }
};

}  // namespace peft::models
