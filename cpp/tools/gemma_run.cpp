// gemma-run: the C++ runtime's command line, with the Python CLI's arguments, JSON and one-line errors.
//   gemma-run ARTIFACT (--prompt TEXT ... | --token-ids 2,10,...) [--max-new-tokens N] [--temperature T --top-k K
//             --top-p P --seed S] [--threads N] [--stream] [--json] [--dump-logits FILE] [--bench] [--ignore-eos]
//   gemma-run embed ARTIFACT --text TEXT ... [--task NAME] [--threads N] [--json]
//   gemma-run ARTIFACT --prompt "... <start_of_image> ..." --image PATH ...   (image prompts, --image repeatable)
//   gemma-run pixels ARTIFACT --image PATH --out FILE   (debug: FILE the resized uint8 [h, w, 3], FILE.f32 the
//             float32 pixel_values [3, h, w], as runtime/images.py computes them)
//   gemma-run tokenize TOKENIZER_JSON   (stdin: one JSON string (encode) or id list (decode) per line)
// Exit codes as gemma-export's: 0 ok, 2 bad input ("gemma-run: error: ..." on stderr), 3 internal error.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>

#include <nlohmann/json.hpp>

#include "gemma_runtime.h"
#include "image.h"
#include "manifest.h"

namespace {

using gemma::Error;
using ordered = nlohmann::ordered_json;

struct Args {
  std::string command = "generate", artifact;
  std::vector<std::string> prompts, texts, images;
  std::optional<std::string> out;
  std::optional<std::string> token_ids, task, dump_logits;
  gemma::GenerateOptions generate;
  gemma::RuntimeOptions runtime;
  bool json = false, stream = false, bench = false, ignore_eos = false;
};

int64_t parse_int(const std::string& option, const std::string& value) {
  try {
    size_t used;
    long long v = std::stoll(value, &used);
    if (used == value.size()) return v;
  } catch (const std::exception&) {
  }
  throw Error("Invalid value for '" + option + "': " + gemma::python_repr(value) + " is not a valid integer.");
}

double parse_float(const std::string& option, const std::string& value) {
  try {
    size_t used;
    double v = std::stod(value, &used);
    if (used == value.size()) return v;
  } catch (const std::exception&) {
  }
  throw Error("Invalid value for '" + option + "': " + gemma::python_repr(value) + " is not a valid float.");
}

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> args(argv + 1, argv + argc);
  size_t i = 0;
  if (!args.empty() && (args[0] == "embed" || args[0] == "tokenize" || args[0] == "pixels")) a.command = args[i++];
  auto value = [&](const std::string& option) -> std::string {
    if (i + 1 >= args.size()) throw Error("Option '" + option + "' requires an argument.");
    return args[++i];
  };
  for (; i < args.size(); ++i) {
    const std::string& o = args[i];
    if (o == "--prompt") a.prompts.push_back(value(o));
    else if (o == "--text") a.texts.push_back(value(o));
    else if (o == "--image") a.images.push_back(value(o));
    else if (o == "--out") a.out = value(o);
    else if (o == "--token-ids") a.token_ids = value(o);
    else if (o == "--task") a.task = value(o);
    else if (o == "--max-new-tokens") a.generate.max_new_tokens = parse_int(o, value(o));
    else if (o == "--temperature") a.generate.sampling.temperature = parse_float(o, value(o));
    else if (o == "--top-k") a.generate.sampling.top_k = parse_int(o, value(o));
    else if (o == "--top-p") a.generate.sampling.top_p = parse_float(o, value(o));
    else if (o == "--seed") a.generate.sampling.seed = parse_int(o, value(o));
    else if (o == "--threads") a.runtime.threads = static_cast<int>(parse_int(o, value(o)));
    else if (o == "--ort-library") a.runtime.ort_library = value(o);
    else if (o == "--verify-files") a.runtime.verify_files = true;
    else if (o == "--dump-logits") a.dump_logits = value(o);
    else if (o == "--json") a.json = true;
    else if (o == "--stream") a.stream = true;
    else if (o == "--bench") a.bench = true;
    else if (o == "--ignore-eos") a.ignore_eos = true;
    else if (o.rfind("--", 0) == 0) throw Error("No such option: " + o);
    else if (a.artifact.empty()) a.artifact = o;
    else throw Error("Got unexpected extra argument (" + o + ")");
  }
  if (a.artifact.empty()) throw Error("Missing argument 'ARTIFACT'.");
  return a;
}

std::vector<int64_t> parse_token_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::string compact;
  for (char c : text) if (c != ' ') compact += c;
  size_t start = 0;
  while (start <= compact.size()) {
    size_t end = compact.find(',', start);
    if (end == std::string::npos) end = compact.size();
    std::string part = compact.substr(start, end - start);
    if (!part.empty()) {
      size_t used = 0;
      try {
        ids.push_back(std::stoll(part, &used));
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != part.size()) throw Error("--token-ids must be comma-separated integers, got " + gemma::python_repr(text));
    }
    start = end + 1;
  }
  return ids;
}

void print(const ordered& result) {
  ordered out{{"ok", true}};
  for (auto it = result.begin(); it != result.end(); ++it) out[it.key()] = it.value();
  // Python's json.dumps(indent=2): ASCII only, \uXXXX escapes
  std::cout << out.dump(2, ' ', true) << std::endl;
}

int generate(Args& a) {
  gemma::Model model(a.artifact, a.runtime);  // manifest read, --threads checked
  a.generate.sampling.check();
  if (a.images.empty() && a.prompts.empty() == !a.token_ids.has_value())
    throw Error("give either --prompt (repeatable) or --token-ids");
  std::vector<gemma::TokenIds> batch;
  const gemma::Tokenizer* tok = nullptr;
  std::optional<gemma::ImagePrompts> images;
  if (!a.images.empty()) {
    if (a.token_ids) throw Error("--image needs --prompt text with an image marker (not --token-ids)");
    images = model.image_prompts(a.prompts, a.images);
    batch = images->prompts;
    tok = &model.tokenizer();
  } else if (a.token_ids) {
    batch.push_back(parse_token_ids(*a.token_ids));
  } else {
    tok = &model.tokenizer();
    for (const auto& p : a.prompts) batch.push_back(tok->encode(p));
  }
  if (a.stream && tok && batch.size() == 1) {  // text as it comes (one prompt): each token's new characters
    a.generate.on_token = [&, seen = std::string(), ids = gemma::TokenIds()](size_t, int64_t token) mutable {
      ids.push_back(token);
      std::string text = tok->decode(ids);
      if (text.size() > seen.size() && text.compare(0, seen.size(), seen) == 0) std::cerr << text.substr(seen.size()) << std::flush;
      seen = text;
      return true;
    };
  }
  if (a.bench) model.prepare();  // the timings below are generation's, not loading's
  if (a.ignore_eos) a.generate.stop_ids = {-1};  // no id is -1: exactly --max-new-tokens (benchmarks)
  // --bench: prompt in -> first token picked (prefill_s), then the other tokens (decode_s), as bench/workers.py
  using clock = std::chrono::steady_clock;
  clock::time_point started, first, last;
  if (a.bench && !a.generate.on_token) {
    a.generate.on_token = [&](size_t row, int64_t) {
      if (row == 0) (first == clock::time_point{} ? first : last) = clock::now();
      return true;
    };
  }
  started = clock::now();
  gemma::Generation gen = images ? model.generate(*images, a.generate) : model.generate(batch, a.generate);
  if (a.dump_logits) {
    std::ofstream f(*a.dump_logits, std::ios::binary);
    f.write(reinterpret_cast<const char*>(gen.last_logits.data()), static_cast<std::streamsize>(gen.last_logits.size() * 4));
  }
  ordered outputs = ordered::array();
  std::vector<std::string> texts;
  for (size_t b = 0; b < batch.size(); ++b) {
    std::string text;
    if (tok) {
      text = tok->decode(gen.new_ids[b]);
    } else {
      for (size_t k = 0; k < gen.new_ids[b].size(); ++k) text += (k ? "," : "") + std::to_string(gen.new_ids[b][k]);
    }
    texts.push_back(text);
    outputs.push_back(ordered{{"prompt_ids", batch[b]}, {"new_ids", gen.new_ids[b]}, {"text", text}});
  }
  ordered result{{"artifact", gemma::python_path(a.artifact)}};
  if (images) {
    ordered paths = ordered::array();
    for (const auto& p : a.images) paths.push_back(gemma::python_path(p));
    result["images"] = paths;
  }
  result["outputs"] = outputs;
  if (a.bench) {
    result["prefill_s"] = std::chrono::duration<double>(first - started).count();
    result["decode_s"] = last == clock::time_point{} ? 0.0 : std::chrono::duration<double>(last - first).count();
    result["new_tokens"] = gen.new_ids[0].size();
  }
  if (a.json) {
    print(result);
  } else {
    for (const auto& t : texts) std::cout << t << "\n";
  }
  return 0;
}

int embed(Args& a) {
  gemma::Model model(a.artifact, a.runtime);
  gemma::Embeddings e = model.embed(a.texts, a.task.value_or(""));
  ordered outputs = ordered::array();
  for (size_t b = 0; b < a.texts.size(); ++b) {
    ordered values = ordered::array();
    for (float v : e.rows[b]) values.push_back(static_cast<double>(v));
    outputs.push_back(ordered{{"text", a.texts[b]}, {"tokens", e.tokens[b]}, {"embedding", values}});
  }
  ordered result{{"artifact", gemma::python_path(a.artifact)}, {"prompt", e.prompt}, {"dim", e.dim}, {"outputs", outputs}};
  if (a.json) {
    print(result);
  } else {
    for (size_t b = 0; b < a.texts.size(); ++b) {
      std::printf("%lld dims: [", static_cast<long long>(e.dim));
      for (size_t k = 0; k < 4 && k < e.rows[b].size(); ++k) std::printf("%s%.4f", k ? ", " : "", e.rows[b][k]);
      std::printf(", ...]\n");
    }
  }
  return 0;
}

int pixels(const Args& a) {
  gemma::Manifest m = gemma::Manifest::read(a.artifact);
  if (!m.vision) throw Error(gemma::python_path(a.artifact) + ": a text-only artifact; it takes no --image");
  if (a.images.size() != 1 || !a.out) throw Error("pixels needs one --image and --out");
  gemma::RgbImage resized;
  std::vector<float> values = gemma::pixel_values(gemma::load_image(a.images[0]), m.vision->pre, &resized);
  std::ofstream(*a.out, std::ios::binary).write(reinterpret_cast<const char*>(resized.rgb.data()), resized.rgb.size());
  std::ofstream(*a.out + ".f32", std::ios::binary)
      .write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(values.size() * 4));
  return 0;
}

int tokenize(const Args& a) {
  gemma::Tokenizer tok = gemma::Tokenizer::from_file(a.artifact);
  std::string line;
  while (std::getline(std::cin, line)) {
    auto v = nlohmann::json::parse(line);
    ordered out;
    if (v.is_string()) {
      auto ids = tok.encode(v.get<std::string>());
      out["ids"] = ids;
      out["text"] = tok.decode(ids);
    } else {
      out["text"] = tok.decode(v.get<gemma::TokenIds>(), false);
    }
    std::cout << out.dump(-1, ' ', true) << "\n";
  }
  return 0;
}

std::string one_line(const std::string& text) {
  std::string out;
  bool space = false;
  for (char c : text) {
    if (c == '\n' || c == '\r') { space = !out.empty(); continue; }
    if (space) out += ' ', space = false;
    out += c;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Args a = parse(argc, argv);
    if (a.command == "embed") return embed(a);
    if (a.command == "tokenize") return tokenize(a);
    if (a.command == "pixels") return pixels(a);
    return generate(a);
  } catch (const Error& e) {
    std::cerr << "gemma-run: error: " << one_line(e.what()) << std::endl;
    return e.exit_code();
  } catch (const std::exception& e) {
    std::cerr << "gemma-run: internal error: " << one_line(e.what()) << std::endl;
    return 3;
  }
}
