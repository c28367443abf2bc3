package ai.gemma.runtime;

/**
 * How to generate: greedy when temperature is 0, else the specified sampler shared with Python and C++
 * (README "Sampling, specified"): the same seed gives the same tokens in every language.
 */
public final class GenerationOptions {
    public int maxNewTokens = 32;
    public double temperature = 0.0;
    public long topK = 0;
    public double topP = 1.0;
    public long seed = 0;

    public GenerationOptions maxNewTokens(int n) { this.maxNewTokens = n; return this; }
    public GenerationOptions temperature(double t) { this.temperature = t; return this; }
    public GenerationOptions topK(long k) { this.topK = k; return this; }
    public GenerationOptions topP(double p) { this.topP = p; return this; }
    public GenerationOptions seed(long s) { this.seed = s; return this; }
}
