// Gemma's tokenizer.json, as Hugging Face `tokenizers` runs it (tests/cpp/test_tokenizer.py checks the ids and
// text against it on the real 262,144-token vocabulary):
//   added tokens split off the raw text (leftmost-longest) -> normalizer (Replace ' ' -> '▁', Prepend) ->
//   pre-tokenizer (Split on a string, or none) -> BPE per piece (merges by rank through a priority queue,
//   unknown characters as <0xXX> byte tokens) -> post-processor (TemplateProcessing: <bos>).
// Decoding: ids -> token strings (special ones skipped on request) -> decoder chain (Replace, ByteFallback,
// Fuse, Strip). Only the components Gemma's files use are implemented; any other is refused by name at load.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "gemma_runtime.h"
#include "utf8.h"

namespace gemma {
namespace {

using json = nlohmann::json;

// Added tokens as a byte trie: (node << 8 | byte) -> child node; a node's token id or -1.
class Trie {
 public:
  void insert(const std::string& word, int32_t id) {
    uint32_t node = 0;
    for (unsigned char c : word) {
      uint64_t key = (uint64_t{node} << 8) | c;
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        it = edges_.emplace(key, static_cast<uint32_t>(ids_.size())).first;
        ids_.push_back(-1);
      }
      node = it->second;
    }
    ids_[node] = id;
  }
  bool empty() const { return edges_.empty(); }
  // The longest token starting at text[pos]: (id, length), or (-1, 0).
  std::pair<int32_t, size_t> longest(const std::string& text, size_t pos) const {
    uint32_t node = 0;
    std::pair<int32_t, size_t> best{-1, 0};
    for (size_t i = pos; i < text.size(); ++i) {
      auto it = edges_.find((uint64_t{node} << 8) | static_cast<unsigned char>(text[i]));
      if (it == edges_.end()) break;
      node = it->second;
      if (ids_[node] >= 0) best = {ids_[node], i + 1 - pos};
    }
    return best;
  }

 private:
  std::unordered_map<uint64_t, uint32_t> edges_;
  std::vector<int32_t> ids_{-1};
};

struct Piece {  // a stretch of text, or an added token already matched
  std::string text;
  int32_t added = -1;
};

// Leftmost-longest split of every non-added piece on the trie's tokens.
std::vector<Piece> split_added(std::vector<Piece> pieces, const Trie& trie) {
  if (trie.empty()) return pieces;
  std::vector<Piece> out;
  for (auto& piece : pieces) {
    if (piece.added >= 0) { out.push_back(std::move(piece)); continue; }
    const std::string& s = piece.text;
    size_t start = 0;
    for (size_t i = 0; i < s.size();) {
      auto [id, len] = trie.longest(s, i);
      if (id < 0) { ++i; continue; }
      if (i > start) out.push_back({s.substr(start, i - start)});
      out.push_back({s.substr(i, len), id});
      i += len;
      start = i;
    }
    if (start < s.size()) out.push_back({s.substr(start)});
  }
  return out;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  if (from.empty()) return;
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out += to;
  }
  out.append(s, pos, std::string::npos);
  s.swap(out);
}

std::string string_pattern(const json& pattern, const std::string& where) {
  if (!pattern.contains("String")) throw Error("tokenizer.json: " + where + ": only string patterns are supported");
  return pattern["String"].get<std::string>();
}

struct Step {  // one normalizer or decoder step
  std::string kind;
  std::string a, b;
  int start = 0, stop = 0;
};

}  // namespace

struct Tokenizer::Impl {
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> tokens;  // id -> string (model vocabulary and added tokens)
  std::unordered_set<std::string> special;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (left << 32 | right) -> (rank, merged id)
  int32_t unk = -1;
  bool byte_fallback = false, fuse_unk = false;
  int32_t byte_ids[256];
  Trie raw_added, normalized_added;
  std::vector<Step> normalizer, decoder;
  bool split = false;
  std::string split_pattern, split_behavior;
  std::vector<std::pair<std::string, TokenIds>> post;  // "A" = the sequence, else the special token's ids

  void load(const json& doc);
  void load_normalizer(const json& n);
  void load_decoder(const json& d);
  std::string normalize(std::string s) const;
  std::vector<std::string> pre_tokenize(const std::string& s) const;
  void bpe(const std::string& word, TokenIds& out) const;
  TokenIds encode(const std::string& text, bool add_special) const;
  std::string decode(const TokenIds& ids, bool skip_special) const;
};

void Tokenizer::Impl::load_normalizer(const json& n) {
  if (n.is_null()) return;
  std::string type = n.at("type");
  if (type == "Sequence") {
    for (const auto& child : n.at("normalizers")) load_normalizer(child);
  } else if (type == "Replace") {
    normalizer.push_back({type, string_pattern(n.at("pattern"), "normalizer"), n.at("content")});
  } else if (type == "Prepend") {
    normalizer.push_back({type, n.at("prepend"), ""});
  } else {
    throw Error("tokenizer.json: normalizer " + type + " is not supported (Gemma's are Replace and Prepend)");
  }
}

void Tokenizer::Impl::load_decoder(const json& d) {
  if (d.is_null()) return;
  std::string type = d.at("type");
  if (type == "Sequence") {
    for (const auto& child : d.at("decoders")) load_decoder(child);
  } else if (type == "Replace") {
    decoder.push_back({type, string_pattern(d.at("pattern"), "decoder"), d.at("content")});
  } else if (type == "ByteFallback" || type == "Fuse") {
    decoder.push_back({type, "", ""});
  } else if (type == "Strip") {
    decoder.push_back({type, d.at("content"), "", d.at("start"), d.at("stop")});
  } else {
    throw Error("tokenizer.json: decoder " + type + " is not supported (Gemma's are Replace, ByteFallback, Fuse, Strip)");
  }
}

void Tokenizer::Impl::load(const json& doc) {
  const json& model = doc.at("model");
  if (model.at("type") != "BPE") throw Error("tokenizer.json: model " + model.at("type").get<std::string>() + " is not supported (Gemma's is BPE)");
  if (!model.value("continuing_subword_prefix", json()).is_null() || !model.value("end_of_word_suffix", json()).is_null())
    throw Error("tokenizer.json: BPE with subword prefixes or suffixes is not supported");
  const json& vocab_json = model.at("vocab");
  vocab.reserve(vocab_json.size());
  tokens.reserve(vocab_json.size());
  for (const auto& [token, id] : vocab_json.items()) {
    int32_t i = id.get<int32_t>();
    vocab.emplace(token, i);
    if (static_cast<size_t>(i) >= tokens.size()) tokens.resize(i + 1);
    tokens[i] = token;
  }
  byte_fallback = model.value("byte_fallback", false);
  fuse_unk = model.value("fuse_unk", false);
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = vocab.find(model["unk_token"].get<std::string>());
    if (it != vocab.end()) unk = it->second;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto it = vocab.find(name);
    byte_ids[b] = it == vocab.end() ? -1 : it->second;
  }
  int32_t rank = 0;
  merges.reserve(model.at("merges").size());
  for (const auto& m : model.at("merges")) {
    std::string left, right;
    if (m.is_array()) {
      left = m.at(0), right = m.at(1);
    } else {  // the older "left right" spelling
      std::string s = m;
      size_t space = s.find(' ', 1);
      left = s.substr(0, space), right = s.substr(space + 1);
    }
    auto l = vocab.find(left), r = vocab.find(right), merged = vocab.find(left + right);
    if (l == vocab.end() || r == vocab.end() || merged == vocab.end())
      throw Error("tokenizer.json: merge '" + left + " " + right + "' names a token not in the vocabulary");
    uint64_t key = (uint64_t(uint32_t(l->second)) << 32) | uint32_t(r->second);
    merges[key] = {rank++, merged->second};  // a pair listed twice: the later rank, as HF's map keeps
  }
  for (const auto& added : doc.value("added_tokens", json::array())) {
    if (added.value("lstrip", false) || added.value("rstrip", false) || added.value("single_word", false))
      throw Error("tokenizer.json: added tokens with lstrip/rstrip/single_word are not supported");
    std::string content = added.at("content");
    int32_t id = added.at("id");
    if (static_cast<size_t>(id) >= tokens.size()) tokens.resize(id + 1);
    tokens[id] = content;
    (added.value("normalized", false) ? normalized_added : raw_added).insert(content, id);
    if (added.value("special", false)) special.insert(content);
  }
  load_normalizer(doc.value("normalizer", json()));
  const json& pre = doc.value("pre_tokenizer", json());
  if (!pre.is_null()) {
    if (pre.at("type") != "Split" || pre.value("invert", false))
      throw Error("tokenizer.json: pre_tokenizer " + pre.at("type").get<std::string>() + " is not supported (Gemma's is Split on a string)");
    split = true;
    split_pattern = string_pattern(pre.at("pattern"), "pre_tokenizer");
    split_behavior = pre.at("behavior");
  }
  load_decoder(doc.value("decoder", json()));
  const json& post_processor = doc.value("post_processor", json());
  if (!post_processor.is_null()) {
    if (post_processor.at("type") != "TemplateProcessing")
      throw Error("tokenizer.json: post_processor " + post_processor.at("type").get<std::string>() + " is not supported");
    for (const auto& part : post_processor.at("single")) {
      if (part.contains("Sequence")) {
        post.push_back({"A", {}});
      } else {
        std::string name = part.at("SpecialToken").at("id");
        post.push_back({name, post_processor.at("special_tokens").at(name).at("ids").get<TokenIds>()});
      }
    }
  }
}

std::string Tokenizer::Impl::normalize(std::string s) const {
  for (const auto& step : normalizer) {
    if (step.kind == "Replace") replace_all(s, step.a, step.b);
    else if (!s.empty()) s = step.a + s;  // Prepend: not on an empty string
  }
  return s;
}

std::vector<std::string> Tokenizer::Impl::pre_tokenize(const std::string& s) const {
  if (!split || split_pattern.empty()) return {s};
  std::vector<std::pair<std::string, bool>> parts;  // (text, is a match), in order, none empty
  size_t pos = 0;
  for (size_t hit; (hit = s.find(split_pattern, pos)) != std::string::npos; pos = hit + split_pattern.size()) {
    if (hit > pos) parts.push_back({s.substr(pos, hit - pos), false});
    parts.push_back({split_pattern, true});
  }
  if (pos < s.size()) parts.push_back({s.substr(pos), false});
  std::vector<std::string> out;
  const std::string& b = split_behavior;
  if (b == "Isolated") {
    for (auto& p : parts) out.push_back(p.first);
  } else if (b == "Removed") {
    for (auto& p : parts) if (!p.second) out.push_back(p.first);
  } else if (b == "MergedWithPrevious") {  // a match joins the piece before it, unless that was a match
    bool previous_match = false;
    for (auto& p : parts) {
      if (p.second && !previous_match && !out.empty()) out.back() += p.first;
      else out.push_back(p.first);
      previous_match = p.second;
    }
  } else if (b == "MergedWithNext") {
    bool previous_match = false;
    for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
      if (it->second && !previous_match && !out.empty()) out.back() = it->first + out.back();
      else out.push_back(it->first);
      previous_match = it->second;
    }
    std::reverse(out.begin(), out.end());
  } else if (b == "Contiguous") {
    bool previous_match = false;
    for (auto& p : parts) {
      if (p.second && previous_match) out.back() += p.first;
      else out.push_back(p.first);
      previous_match = p.second;
    }
  } else {
    throw Error("tokenizer.json: split behavior " + b + " is not supported");
  }
  return out;
}

void Tokenizer::Impl::bpe(const std::string& word, TokenIds& out) const {
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  auto push = [&](int32_t id) {
    int32_t n = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, n - 1, n + 1, true});
  };
  for (size_t i = 0; i < word.size();) {
    size_t len = utf8::char_length(word, i);
    auto it = vocab.find(word.substr(i, len));
    if (it != vocab.end()) {
      push(it->second);
    } else {
      bool bytes_known = byte_fallback;
      for (size_t k = 0; k < len && bytes_known; ++k) bytes_known = byte_ids[static_cast<unsigned char>(word[i + k])] >= 0;
      if (bytes_known) {
        for (size_t k = 0; k < len; ++k) push(byte_ids[static_cast<unsigned char>(word[i + k])]);
      } else if (unk < 0) {
        throw Error("tokenizer.json: a character is not in the vocabulary and there is no unk token");
      } else if (!(fuse_unk && !symbols.empty() && symbols.back().id == unk)) {
        push(unk);
      }
    }
    i += len;
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;

  // Lowest rank first, then leftmost: HF's Word::merge_all. Entries go stale when a neighbour merges;
  // they are recognised (the pair no longer gives that merge) and skipped.
  struct Merge {
    int32_t rank, pos, id;
    bool operator<(const Merge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  auto lookup = [&](int32_t left, int32_t right) {
    auto it = merges.find((uint64_t(uint32_t(left)) << 32) | uint32_t(right));
    return it == merges.end() ? nullptr : &it->second;
  };
  std::vector<Merge> initial;
  for (size_t i = 0; i + 1 < symbols.size(); ++i)
    if (auto m = lookup(symbols[i].id, symbols[i + 1].id)) initial.push_back({m->first, int32_t(i), m->second});
  std::priority_queue<Merge> queue(std::less<Merge>(), std::move(initial));
  while (!queue.empty()) {
    Merge top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    auto m = lookup(left.id, right.id);
    if (!m || m->second != top.id) continue;
    left.id = top.id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    if (left.prev >= 0)
      if (auto p = lookup(symbols[left.prev].id, left.id)) queue.push({p->first, left.prev, p->second});
    if (left.next >= 0)
      if (auto n = lookup(left.id, symbols[left.next].id)) queue.push({n->first, top.pos, n->second});
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) out.push_back(symbols[i].id);
}

TokenIds Tokenizer::Impl::encode(const std::string& text, bool add_special) const {
  TokenIds ids;
  for (auto& piece : split_added({{text}}, raw_added)) {
    if (piece.added >= 0) { ids.push_back(piece.added); continue; }
    for (auto& sub : split_added({{normalize(piece.text)}}, normalized_added)) {
      if (sub.added >= 0) { ids.push_back(sub.added); continue; }
      for (const auto& word : pre_tokenize(sub.text)) bpe(word, ids);
    }
  }
  if (!add_special || post.empty()) return ids;
  TokenIds out;
  for (const auto& [name, special_ids] : post) {
    const TokenIds& part = name == "A" ? ids : special_ids;
    out.insert(out.end(), part.begin(), part.end());
  }
  return out;
}

std::string Tokenizer::Impl::decode(const TokenIds& ids, bool skip_special) const {
  std::vector<std::string> pieces;
  for (int64_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= tokens.size()) continue;
    const std::string& token = tokens[id];
    if (skip_special && special.count(token)) continue;
    pieces.push_back(token);
  }
  for (const auto& step : decoder) {
    if (step.kind == "Replace") {
      for (auto& p : pieces) replace_all(p, step.a, step.b);
    } else if (step.kind == "Fuse") {
      std::string all;
      for (auto& p : pieces) all += p;
      pieces.assign(1, all);
    } else if (step.kind == "Strip") {  // per piece: up to `start` leading and `stop` trailing copies of content
      for (auto& p : pieces) {
        int n = 0;
        while (n < step.start && p.compare(0, step.a.size(), step.a) == 0 && !p.empty()) p.erase(0, step.a.size()), ++n;
        n = 0;
        while (n < step.stop && p.size() >= step.a.size() && !p.empty() &&
               p.compare(p.size() - step.a.size(), step.a.size(), step.a) == 0)
          p.erase(p.size() - step.a.size()), ++n;
      }
    } else {  // ByteFallback: runs of <0xXX> become their bytes, or one U+FFFD per byte if not valid UTF-8
      std::vector<std::string> out;
      std::string bytes;
      size_t count = 0;
      auto flush = [&] {
        if (!count) return;
        if (utf8::valid(bytes)) out.push_back(bytes);
        else for (size_t k = 0; k < count; ++k) out.push_back("\xEF\xBF\xBD");
        bytes.clear();
        count = 0;
      };
      for (auto& p : pieces) {
        unsigned value;
        char tail;
        if (p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' && std::isxdigit(static_cast<unsigned char>(p[3])) &&
            std::isxdigit(static_cast<unsigned char>(p[4])) && std::sscanf(p.c_str() + 3, "%2x%c", &value, &tail) == 2) {
          bytes.push_back(static_cast<char>(value));
          ++count;
        } else {
          flush();
          out.push_back(std::move(p));
        }
      }
      flush();
      pieces.swap(out);
    }
  }
  std::string text;
  for (auto& p : pieces) text += p;  // no decoder: HF joins with spaces; every Gemma file has one
  return text;
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot load tokenizer (cannot open the file)");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());  // parses faster
  auto impl = std::make_unique<Impl>();
  try {
    impl->load(json::parse(text));
  } catch (const json::exception& e) {
    throw Error(path + ": cannot load tokenizer (" + e.what() + ")");
  } catch (const Error& e) {
    throw Error(path + ": cannot load tokenizer (" + e.what() + ")");
  }
  return Tokenizer(std::move(impl));
}

TokenIds Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  return impl_->encode(text, add_special_tokens);
}
std::string Tokenizer::decode(const TokenIds& ids, bool skip_special_tokens) const {
  return impl_->decode(ids, skip_special_tokens);
}
size_t Tokenizer::vocab_size() const { return impl_->tokens.size(); }

}  // namespace gemma
