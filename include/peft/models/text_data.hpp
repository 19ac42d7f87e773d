// peft/models/text_data.hpp — training data as people have it: plain text and JSONL, tokenized.
//
//   auto tok = peft::models::tokenizer::load(model_dir);
//   auto data = peft::models::read_text_data("corpus.txt", tok, {.seq_len = 256, .eos = 2});
//   // data.rows[i].ids: token ids; data.rows[i].prompt_tokens: leading tokens the loss skips
//   auto labels = peft::models::training_labels(batch, prompt_tokens_of_the_batch_rows);
//
// Formats (chosen by text_format, or by the file's extension: .jsonl/.json lines are JSONL):
//   text   the whole file encoded once (the tokenizer's BOS, if it adds one, at the start), EOS
//          appended, and the tokens packed into consecutive rows of seq_len (the last row shorter)
//   jsonl  one JSON object per line (blank lines skipped):
//            {"text": "..."}                        every token counts in the loss
//            {"prompt": "...", "completion": "..."} the loss counts the completion only (as
//                                                    mlx-lm): prompt and completion are encoded
//                                                    separately (prompt with the BOS), as the
//                                                    model sees them when it generates
//          EOS appended to each; a row longer than seq_len is cut to seq_len (counted in
//          `truncated`); one whose completion is cut away entirely is dropped (`dropped`). Other
//          keys are data, not instructions, and are ignored, except "messages" (chat data: not
//          implemented) which is refused.
// format_error names the file and line of anything else (no text, a non-string, bad JSON).
#pragma once

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/models/causal_lm.hpp"
#include "peft/models/tokenizer.hpp"

namespace peft::models {

/// How a data file is read.
enum class text_format { automatic, text, jsonl };

/// Options of read_text_data.
struct text_data_options {
  index seq_len = 512;              ///< tokens a row holds at most (>= 2)
  std::optional<long long> eos;     ///< appended after each document / example, if given
  text_format format = text_format::automatic;
};

/// One training row: ids, and how many leading ids are prompt (their predictions carry no loss).
struct text_row {
  std::vector<long long> ids;
  std::size_t prompt_tokens = 0;
};

/// What read_text_data made of a file.
struct text_data {
  std::vector<text_row> rows;
  std::size_t examples = 0;   ///< documents (text: 1) or JSONL lines read
  std::size_t truncated = 0;  ///< JSONL examples cut to seq_len
  std::size_t dropped = 0;    ///< JSONL examples left without a completion token after the cut
  std::size_t tokens() const {
    std::size_t n = 0;
    for (const auto& r : rows) n += r.ids.size();
    return n;
  }
  /// The rows' ids alone (what token_batch::from_rows takes).
  std::vector<std::vector<long long>> id_rows() const {
    std::vector<std::vector<long long>> out;
    out.reserve(rows.size());
    for (const auto& r : rows) out.push_back(r.ids);
    return out;
  }
};

/// transformers' causal-LM labels for a batch whose row s starts with prompt_tokens[s] prompt
/// tokens: the ids, with padding and the prompt positions ignored (logits at c predict labels[c + 1],
/// so the first completion token is still predicted from the last prompt token).
inline std::vector<long long> training_labels(const token_batch& b, std::span<const std::size_t> prompt_tokens) {
  if (static_cast<index>(prompt_tokens.size()) != b.sequences) {
    peft::detail::raise<shape_error>("training_labels", "the batch has " + std::to_string(b.sequences) + " rows but " +
                                                          std::to_string(prompt_tokens.size()) + " prompt lengths were given");
  }
  auto labels = b.causal_labels();
  for (index s = 0; s < b.sequences; ++s) {
    const index p = std::min(b.length, static_cast<index>(prompt_tokens[static_cast<std::size_t>(s)]));
    for (index c = 0; c < p; ++c) labels[static_cast<std::size_t>(s * b.length + c)] = ignore_label;
  }
  return labels;
}

}  // namespace peft::models

namespace peft::detail {

inline std::string read_whole_file(const std::filesystem::path& path, const char* where) {
  std::ifstream in(path, std::ios::binary);
  if (!in) peft::detail::raise<io_error>(where, "cannot open " + path.string());
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline bool looks_like_jsonl(const std::filesystem::path& path) {
  const auto e = path.extension().string();
  return e == ".jsonl" || e == ".json" || e == ".ndjson";
}

}  // namespace peft::detail

namespace peft::models {

/// Parses data already in memory; `source` names it in errors. See the file comment for formats.
inline text_data parse_text_data(std::string_view content, const std::string& source, const tokenizer& tok,
                                 const text_data_options& opt, bool jsonl) {
  constexpr const char* where = "read_text_data";
  if (opt.seq_len < 2) peft::detail::raise<shape_error>(where, "seq_len must be at least 2, not " + std::to_string(opt.seq_len));
  const auto L = static_cast<std::size_t>(opt.seq_len);
  text_data d;
  if (!jsonl) {
    if (content.empty()) peft::detail::raise<format_error>(where, source + " is empty");
    if (const auto bad = peft::detail::invalid_utf8_offset(content); bad != std::string_view::npos) {
      peft::detail::raise<format_error>(where, source + " is not UTF-8 text (byte " + std::to_string(bad) + ")");
    }
    auto ids = tok.encode(content, true);
    if (opt.eos) ids.push_back(*opt.eos);
    d.examples = 1;
    for (std::size_t i = 0; i < ids.size(); i += L) {
      const std::size_t e = std::min(ids.size(), i + L);
      if (e - i < 2 && i > 0) break;  // a lone last token predicts nothing
      d.rows.push_back({std::vector<long long>(ids.begin() + static_cast<std::ptrdiff_t>(i), ids.begin() + static_cast<std::ptrdiff_t>(e)), 0});
    }
    return d;
  }
  std::size_t line_no = 0, pos = 0;
  while (pos < content.size()) {
    std::size_t end = content.find('\n', pos);
    if (end == std::string_view::npos) end = content.size();
    const std::string_view line = content.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string at = source + " line " + std::to_string(line_no);
    const auto j = nlohmann::json::parse(line.begin(), line.end(), nullptr, false);
    if (j.is_discarded() || !j.is_object()) peft::detail::raise<format_error>(where, at + " is not a JSON object");
    auto text_of = [&](const char* key) {
      if (!j[key].is_string()) peft::detail::raise<format_error>(where, at + ": \"" + key + "\" is not a string");
      return j[key].get<std::string>();
    };
    text_row row;
    if (j.contains("text")) {
      if (j.contains("prompt") || j.contains("completion")) {
        peft::detail::raise<format_error>(where, at + " has both \"text\" and \"prompt\"/\"completion\"");
      }
      row.ids = tok.encode(text_of("text"), true);
    } else if (j.contains("prompt") && j.contains("completion")) {
      row.ids = tok.encode(text_of("prompt"), true);
      row.prompt_tokens = row.ids.size();
      const auto c = tok.encode(text_of("completion"), false);
      row.ids.insert(row.ids.end(), c.begin(), c.end());
    } else if (j.contains("messages")) {
      peft::detail::raise<unsupported_error>(where, at + ": chat data (\"messages\") is not implemented; give \"text\" or \"prompt\" and \"completion\"");
    } else {
      peft::detail::raise<format_error>(where, at + " has neither \"text\" nor \"prompt\" and \"completion\"");
    }
    if (opt.eos) row.ids.push_back(*opt.eos);
    ++d.examples;
    if (row.ids.size() > L) {
      row.ids.resize(L);
      ++d.truncated;
    }
    if (row.ids.size() < 2 || row.prompt_tokens >= row.ids.size()) {
      ++d.dropped;
      continue;
    }
    d.rows.push_back(std::move(row));
  }
  if (d.rows.empty()) peft::detail::raise<format_error>(where, source + " holds no example with a token to learn");
  return d;
}

/// Reads and tokenizes a data file (see the file comment). io_error when it cannot be read.
inline text_data read_text_data(const std::filesystem::path& path, const tokenizer& tok, const text_data_options& opt = {}) {
  const std::string content = peft::detail::read_whole_file(path, "read_text_data");
  const bool jsonl = opt.format == text_format::jsonl || (opt.format == text_format::automatic && peft::detail::looks_like_jsonl(path));
  return parse_text_data(content, path.string(), tok, opt, jsonl);
}

}  // namespace peft::models
