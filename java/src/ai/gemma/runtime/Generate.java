package ai.gemma.runtime;

import java.util.ArrayList;
import java.util.List;

/**
 * The Java twin of gemma-run (same arguments, same JSON as `gemma-export generate --json`, same one-line errors):
 * java -Djava.library.path=build/java -cp build/java/gemma-runtime.jar ai.gemma.runtime.Generate ARTIFACT
 *      (--prompt TEXT ... | --token-ids 2,10,...) [--max-new-tokens N] [--temperature T --top-k K --top-p P
 *      --seed S] [--threads N] [--json]
 */
public final class Generate {
    private Generate() {}

    public static void main(String[] args) {
        int code;
        try {
            code = run(args);
        } catch (GemmaException e) {
            System.err.println("gemma-run: error: " + e.getMessage());
            code = e.exitCode();
        }
        System.exit(code);
    }

    static int run(String[] args) {
        String artifact = null, tokenIds = null;
        List<String> prompts = new ArrayList<>();
        List<String> images = new ArrayList<>();
        GenerationOptions options = new GenerationOptions();
        int threads = 0;
        boolean json = false;
        for (int i = 0; i < args.length; i++) {
            String o = args[i];
            switch (o) {
                case "--prompt": prompts.add(value(args, ++i, o)); break;
                case "--image": images.add(value(args, ++i, o)); break;
                case "--token-ids": tokenIds = value(args, ++i, o); break;
                case "--max-new-tokens": options.maxNewTokens = (int) integer(o, value(args, ++i, o)); break;
                case "--temperature": options.temperature = real(o, value(args, ++i, o)); break;
                case "--top-k": options.topK = integer(o, value(args, ++i, o)); break;
                case "--top-p": options.topP = real(o, value(args, ++i, o)); break;
                case "--seed": options.seed = integer(o, value(args, ++i, o)); break;
                case "--threads": threads = (int) integer(o, value(args, ++i, o)); break;
                case "--json": json = true; break;
                default:
                    if (o.startsWith("--")) throw new GemmaInputException("No such option: " + o);
                    if (artifact != null) throw new GemmaInputException("Got unexpected extra argument (" + o + ")");
                    artifact = o;
            }
        }
        if (artifact == null) throw new GemmaInputException("Missing argument 'ARTIFACT'.");
        try (GemmaModel model = new GemmaModel(artifact, threads, "")) {
            GemmaModel.checkSampling(options);
            if (!images.isEmpty() && tokenIds != null) {
                throw new GemmaInputException("--image needs --prompt text with an image marker (not --token-ids)");
            }
            if (images.isEmpty() && prompts.isEmpty() == (tokenIds == null)) {
                throw new GemmaInputException("give either --prompt (repeatable) or --token-ids");
            }
            long[][] batch, generated = null;
            if (!images.isEmpty()) {
                long[][] both = model.generateWithImages(prompts.toArray(new String[0]), images.toArray(new String[0]),
                        options);
                batch = java.util.Arrays.copyOfRange(both, 0, both.length / 2);
                generated = java.util.Arrays.copyOfRange(both, both.length / 2, both.length);
            } else if (tokenIds != null) {
                batch = new long[][] {parseTokenIds(tokenIds)};
            } else {
                batch = new long[prompts.size()][];
                for (int i = 0; i < batch.length; i++) batch[i] = model.encode(prompts.get(i));
            }
            if (images.isEmpty()) generated = model.generate(batch, options);
            StringBuilder out = new StringBuilder();
            out.append("{\n  \"ok\": true,\n  \"artifact\": ").append(Json.string(Json.pythonPath(artifact)));
            if (!images.isEmpty()) {
                out.append(",\n  \"images\": [");
                for (int i = 0; i < images.size(); i++) {
                    out.append(i == 0 ? "\n    " : ",\n    ").append(Json.string(Json.pythonPath(images.get(i))));
                }
                out.append("\n  ]");
            }
            out.append(",\n  \"outputs\": [");
            List<String> texts = new ArrayList<>();
            for (int b = 0; b < batch.length; b++) {
                String text = tokenIds == null ? model.decode(generated[b]) : joined(generated[b]);
                texts.add(text);
                out.append(b == 0 ? "\n" : ",\n").append("    {\n      \"prompt_ids\": ").append(Json.ints(batch[b], 8));
                out.append(",\n      \"new_ids\": ").append(Json.ints(generated[b], 8));
                out.append(",\n      \"text\": ").append(Json.string(text)).append("\n    }");
            }
            out.append(batch.length == 0 ? "]" : "\n  ]").append("\n}");
            if (json) {
                System.out.println(out);
            } else {
                texts.forEach(System.out::println);
            }
        }
        return 0;
    }

    private static String value(String[] args, int i, String option) {
        if (i >= args.length) throw new GemmaInputException("Option '" + option + "' requires an argument.");
        return args[i];
    }

    private static long integer(String option, String value) {
        try {
            return Long.parseLong(value.trim());
        } catch (NumberFormatException e) {
            throw new GemmaInputException("Invalid value for '" + option + "': " + Json.repr(value) + " is not a valid integer.");
        }
    }

    private static double real(String option, String value) {
        try {
            return Double.parseDouble(value.trim());
        } catch (NumberFormatException e) {
            throw new GemmaInputException("Invalid value for '" + option + "': " + Json.repr(value) + " is not a valid float.");
        }
    }

    static long[] parseTokenIds(String text) {
        List<Long> ids = new ArrayList<>();
        for (String part : text.replace(" ", "").split(",", -1)) {
            if (part.isEmpty()) continue;
            try {
                ids.add(Long.parseLong(part));
            } catch (NumberFormatException e) {
                throw new GemmaInputException("--token-ids must be comma-separated integers, got " + Json.repr(text));
            }
        }
        return ids.stream().mapToLong(Long::longValue).toArray();
    }

    private static String joined(long[] ids) {
        StringBuilder s = new StringBuilder();
        for (int i = 0; i < ids.length; i++) s.append(i == 0 ? "" : ",").append(ids[i]);
        return s.toString();
    }
}
