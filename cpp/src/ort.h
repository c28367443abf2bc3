// ONNX Runtime, loaded at run time: the wheel's libonnxruntime.so.1.x versions its symbols per release, so a
// binary linked to one release would not start with another. ORT_API_MANUAL_INIT (set by CMake for every
// file) makes the C++ API take its function table from Ort::InitApi instead of a linked OrtGetApiBase.
#pragma once

#include <string>

#include <onnxruntime_cxx_api.h>

namespace gemma::ort {

// Loads the library once per process (later calls return at once): `path`, else $GEMMA_ORT_LIBRARY, else
// libonnxruntime.so.1 / libonnxruntime.so on the loader's path. Throws the one-line "not found" / "too old".
void load(const std::string& path);
Ort::Env& env();
std::string version();

}  // namespace gemma::ort
