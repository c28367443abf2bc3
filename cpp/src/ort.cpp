#include "ort.h"

#include <dlfcn.h>

#include <cstdlib>
#include <memory>
#include <mutex>

#include "gemma_runtime.h"

namespace gemma::ort {
namespace {

std::mutex mutex;
const OrtApiBase* api_base = nullptr;
std::unique_ptr<Ort::Env> environment;

}  // namespace

void load(const std::string& path) {
  std::lock_guard<std::mutex> lock(mutex);
  if (environment) return;
  std::string chosen = path;
  if (chosen.empty()) {
    const char* env_path = std::getenv("GEMMA_ORT_LIBRARY");
    if (env_path && *env_path) chosen = env_path;
  }
  void* handle = nullptr;
  std::string error;
  for (const std::string& candidate : chosen.empty() ? std::vector<std::string>{"libonnxruntime.so.1", "libonnxruntime.so"}
                                                     : std::vector<std::string>{chosen}) {
    handle = ::dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle) break;
    error = ::dlerror();
  }
  if (!handle)
    throw Error("ONNX Runtime library not found (" + error + "); set GEMMA_ORT_LIBRARY to libonnxruntime.so.1.x "
                "(the onnxruntime wheel's onnxruntime/capi/ has one)");
  using GetApiBase = const OrtApiBase* (*)();
  auto get_api_base = reinterpret_cast<GetApiBase>(::dlsym(handle, "OrtGetApiBase"));
  if (!get_api_base) throw Error("ONNX Runtime library has no OrtGetApiBase: not an ONNX Runtime library");
  const OrtApiBase* base = get_api_base();
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (!api)
    throw Error("ONNX Runtime " + std::string(base->GetVersionString()) + " is too old: gemma_runtime needs C API " +
                std::to_string(ORT_API_VERSION) + " (ONNX Runtime 1." + std::to_string(ORT_API_VERSION) + " or newer)");
  Ort::InitApi(api);
  api_base = base;
  environment = std::make_unique<Ort::Env>(ORT_LOGGING_LEVEL_ERROR, "gemma_runtime");
}

Ort::Env& env() { return *environment; }

std::string version() { return api_base ? api_base->GetVersionString() : ""; }

}  // namespace gemma::ort
