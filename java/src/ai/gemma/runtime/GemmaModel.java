package ai.gemma.runtime;

import java.nio.charset.StandardCharsets;

/**
 * A gemma-export artifact opened by the C++ runtime (gemma_runtime, through JNI). Not thread-safe: use one
 * instance per thread (each holds its decode state). Close it (try-with-resources) to free the native model
 * at once; ONNX Runtime is found through $GEMMA_ORT_LIBRARY (or the given path).
 */
public final class GemmaModel implements AutoCloseable {
    static {
        System.loadLibrary("gemma_runtime_jni");
    }

    private long handle;

    public GemmaModel(String artifactDir) {
        this(artifactDir, 0, "");
    }

    /** threads: ONNX Runtime intra-op threads (0 = all cores); ortLibrary: "" = $GEMMA_ORT_LIBRARY. */
    public GemmaModel(String artifactDir, int threads, String ortLibrary) {
        handle = open(utf8(artifactDir), threads, utf8(ortLibrary));
    }

    /** Token ids of a text, the tokenizer's special tokens (Gemma: bos) added. */
    public long[] encode(String text) {
        return encode(live(), utf8(text));
    }

    /** Text of token ids, special tokens skipped. */
    public String decode(long[] ids) {
        return new String(decode(live(), ids), StandardCharsets.UTF_8);
    }

    /** New tokens per prompt (a left-padded batch); a row stops at an end-of-sequence id. */
    public long[][] generate(long[][] prompts, GenerationOptions options) {
        return generate(live(), prompts, options.maxNewTokens, options.temperature, options.topK, options.topP,
                options.seed);
    }

    /**
     * Image prompts (an image + text artifact): each image goes to the next image marker of the prompts
     * (&lt;start_of_image&gt;, PaliGemma's &lt;image&gt;). Returns the expanded prompts' token ids, then the new
     * tokens: [2 * prompts][].
     */
    public long[][] generateWithImages(String[] prompts, String[] imagePaths, GenerationOptions options) {
        byte[][] texts = new byte[prompts.length][];
        for (int i = 0; i < prompts.length; i++) texts[i] = utf8(prompts[i]);
        byte[][] paths = new byte[imagePaths.length][];
        for (int i = 0; i < imagePaths.length; i++) paths[i] = utf8(imagePaths[i]);
        return generateImages(live(), texts, paths, options.maxNewTokens, options.temperature, options.topK,
                options.topP, options.seed);
    }

    /** Sentence embeddings [texts][dim] of an EmbeddingGemma artifact; task "" = the default prompt. */
    public float[][] embed(String[] texts, String task) {
        byte[][] encoded = new byte[texts.length][];
        for (int i = 0; i < texts.length; i++) encoded[i] = utf8(texts[i]);
        return embed(live(), encoded, utf8(task));
    }

    /** Throws the CLI's message for sampling options it refuses (--temperature must be ..., ...). */
    public static void checkSampling(GenerationOptions options) {
        checkSampling(options.temperature, options.topK, options.topP, options.seed);
    }

    @Override
    public void close() {
        if (handle != 0) {
            close(handle);
            handle = 0;
        }
    }

    private long live() {
        if (handle == 0) throw new IllegalStateException("GemmaModel is closed");
        return handle;
    }

    private static byte[] utf8(String s) {
        return s.getBytes(StandardCharsets.UTF_8);  // not JNI's modified UTF-8, which splits emoji in two
    }

    private static native long open(byte[] artifactDir, int threads, byte[] ortLibrary);
    private static native void close(long handle);
    private static native long[] encode(long handle, byte[] text);
    private static native byte[] decode(long handle, long[] ids);
    private static native long[][] generate(long handle, long[][] prompts, int maxNewTokens, double temperature,
            long topK, double topP, long seed);
    private static native long[][] generateImages(long handle, byte[][] prompts, byte[][] images, int maxNewTokens,
            double temperature, long topK, double topP, long seed);
    private static native float[][] embed(long handle, byte[][] texts, byte[] task);
    private static native void checkSampling(double temperature, long topK, double topP, long seed);
}
