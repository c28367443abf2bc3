// JNI glue of ai.gemma.runtime.GemmaModel over gemma_runtime. Strings cross as UTF-8 byte arrays (JNI's own
// "modified UTF-8" splits characters outside the BMP); gemma::Error becomes GemmaInputException (exit code 2)
// or GemmaException, any other C++ exception GemmaException; no C++ exception crosses into the JVM.
#include <jni.h>

#include <memory>
#include <string>
#include <vector>

#include "gemma_runtime.h"

namespace {

std::string bytes(JNIEnv* env, jbyteArray array) {
  jsize n = env->GetArrayLength(array);
  std::string out(static_cast<size_t>(n), '\0');
  env->GetByteArrayRegion(array, 0, n, reinterpret_cast<jbyte*>(out.data()));
  return out;
}

jbyteArray to_bytes(JNIEnv* env, const std::string& s) {
  jbyteArray array = env->NewByteArray(static_cast<jsize>(s.size()));
  env->SetByteArrayRegion(array, 0, static_cast<jsize>(s.size()), reinterpret_cast<const jbyte*>(s.data()));
  return array;
}

jlongArray to_longs(JNIEnv* env, const gemma::TokenIds& ids) {
  jlongArray array = env->NewLongArray(static_cast<jsize>(ids.size()));
  env->SetLongArrayRegion(array, 0, static_cast<jsize>(ids.size()), reinterpret_cast<const jlong*>(ids.data()));
  return array;
}

gemma::TokenIds from_longs(JNIEnv* env, jlongArray array) {
  gemma::TokenIds ids(static_cast<size_t>(env->GetArrayLength(array)));
  env->GetLongArrayRegion(array, 0, static_cast<jsize>(ids.size()), reinterpret_cast<jlong*>(ids.data()));
  return ids;
}

// Runs `body`, turning a C++ exception into the Java one (the caller returns `fallback` to the JVM).
template <typename T, typename F>
T guarded(JNIEnv* env, T fallback, F body) {
  try {
    return body();
  } catch (const gemma::Error& e) {
    const char* cls = e.exit_code() == 2 ? "ai/gemma/runtime/GemmaInputException" : "ai/gemma/runtime/GemmaException";
    env->ThrowNew(env->FindClass(cls), e.what());
  } catch (const std::exception& e) {
    env->ThrowNew(env->FindClass("ai/gemma/runtime/GemmaException"), e.what());
  }
  return fallback;
}

gemma::Model* model(jlong handle) { return reinterpret_cast<gemma::Model*>(handle); }

gemma::GenerateOptions generate_options(jint max_new_tokens, jdouble temperature, jlong top_k, jdouble top_p,
                                        jlong seed) {
  gemma::GenerateOptions options;
  options.max_new_tokens = max_new_tokens;
  options.sampling = {temperature, top_k, top_p, seed};
  return options;
}

}  // namespace

extern "C" {

JNIEXPORT jlong JNICALL Java_ai_gemma_runtime_GemmaModel_open(JNIEnv* env, jclass, jbyteArray dir, jint threads,
                                                              jbyteArray ort_library) {
  return guarded<jlong>(env, 0, [&] {
    gemma::RuntimeOptions options;
    options.threads = threads;
    options.ort_library = bytes(env, ort_library);
    return reinterpret_cast<jlong>(new gemma::Model(bytes(env, dir), options));
  });
}

JNIEXPORT void JNICALL Java_ai_gemma_runtime_GemmaModel_close(JNIEnv*, jclass, jlong handle) { delete model(handle); }

JNIEXPORT jlongArray JNICALL Java_ai_gemma_runtime_GemmaModel_encode(JNIEnv* env, jclass, jlong handle, jbyteArray text) {
  return guarded<jlongArray>(env, nullptr, [&] { return to_longs(env, model(handle)->tokenizer().encode(bytes(env, text))); });
}

JNIEXPORT jbyteArray JNICALL Java_ai_gemma_runtime_GemmaModel_decode(JNIEnv* env, jclass, jlong handle, jlongArray ids) {
  return guarded<jbyteArray>(env, nullptr, [&] { return to_bytes(env, model(handle)->tokenizer().decode(from_longs(env, ids))); });
}

JNIEXPORT jobjectArray JNICALL Java_ai_gemma_runtime_GemmaModel_generate(JNIEnv* env, jclass, jlong handle,
                                                                         jobjectArray prompts, jint max_new_tokens,
                                                                         jdouble temperature, jlong top_k, jdouble top_p,
                                                                         jlong seed) {
  return guarded<jobjectArray>(env, nullptr, [&] {
    std::vector<gemma::TokenIds> batch;
    for (jsize i = 0; i < env->GetArrayLength(prompts); ++i)
      batch.push_back(from_longs(env, static_cast<jlongArray>(env->GetObjectArrayElement(prompts, i))));
    gemma::GenerateOptions options = generate_options(max_new_tokens, temperature, top_k, top_p, seed);
    gemma::Generation gen = model(handle)->generate(batch, options);
    jobjectArray out = env->NewObjectArray(static_cast<jsize>(gen.new_ids.size()), env->FindClass("[J"), nullptr);
    for (size_t b = 0; b < gen.new_ids.size(); ++b) env->SetObjectArrayElement(out, static_cast<jsize>(b), to_longs(env, gen.new_ids[b]));
    return out;
  });
}

// Image prompts: [prompt ids per prompt..., new ids per prompt...] (the expanded prompts' ids first).
JNIEXPORT jobjectArray JNICALL Java_ai_gemma_runtime_GemmaModel_generateImages(JNIEnv* env, jclass, jlong handle,
                                                                               jobjectArray prompts, jobjectArray images,
                                                                               jint max_new_tokens, jdouble temperature,
                                                                               jlong top_k, jdouble top_p, jlong seed) {
  return guarded<jobjectArray>(env, nullptr, [&] {
    std::vector<std::string> texts, paths;
    for (jsize i = 0; i < env->GetArrayLength(prompts); ++i)
      texts.push_back(bytes(env, static_cast<jbyteArray>(env->GetObjectArrayElement(prompts, i))));
    for (jsize i = 0; i < env->GetArrayLength(images); ++i)
      paths.push_back(bytes(env, static_cast<jbyteArray>(env->GetObjectArrayElement(images, i))));
    gemma::GenerateOptions options = generate_options(max_new_tokens, temperature, top_k, top_p, seed);
    gemma::ImagePrompts input = model(handle)->image_prompts(texts, paths);
    gemma::Generation gen = model(handle)->generate(input, options);
    size_t n = gen.new_ids.size();
    jobjectArray out = env->NewObjectArray(static_cast<jsize>(2 * n), env->FindClass("[J"), nullptr);
    for (size_t b = 0; b < n; ++b) {
      env->SetObjectArrayElement(out, static_cast<jsize>(b), to_longs(env, input.prompts[b]));
      env->SetObjectArrayElement(out, static_cast<jsize>(n + b), to_longs(env, gen.new_ids[b]));
    }
    return out;
  });
}

JNIEXPORT jobjectArray JNICALL Java_ai_gemma_runtime_GemmaModel_embed(JNIEnv* env, jclass, jlong handle, jobjectArray texts,
                                                                      jbyteArray task) {
  return guarded<jobjectArray>(env, nullptr, [&] {
    std::vector<std::string> inputs;
    for (jsize i = 0; i < env->GetArrayLength(texts); ++i)
      inputs.push_back(bytes(env, static_cast<jbyteArray>(env->GetObjectArrayElement(texts, i))));
    gemma::Embeddings e = model(handle)->embed(inputs, bytes(env, task));
    jobjectArray out = env->NewObjectArray(static_cast<jsize>(e.rows.size()), env->FindClass("[F"), nullptr);
    for (size_t b = 0; b < e.rows.size(); ++b) {
      jfloatArray row = env->NewFloatArray(static_cast<jsize>(e.rows[b].size()));
      env->SetFloatArrayRegion(row, 0, static_cast<jsize>(e.rows[b].size()), e.rows[b].data());
      env->SetObjectArrayElement(out, static_cast<jsize>(b), row);
    }
    return out;
  });
}

JNIEXPORT void JNICALL Java_ai_gemma_runtime_GemmaModel_checkSampling(JNIEnv* env, jclass, jdouble temperature, jlong top_k,
                                                                      jdouble top_p, jlong seed) {
  guarded<int>(env, 0, [&] {
    gemma::Sampling{temperature, top_k, top_p, seed}.check();
    return 0;
  });
}

}  // extern "C"
