package ai.gemma.runtime;

/** A failure of the runtime, with the one-line message and exit code of the Python CLI for the same fault. */
public class GemmaException extends RuntimeException {
    private final int exitCode;

    public GemmaException(String message) {
        this(message, 3);
    }

    protected GemmaException(String message, int exitCode) {
        super(message);
        this.exitCode = exitCode;
    }

    /** 2 for bad input (gemma-export's "error:" lines), 1 for changed files, 3 for internal errors. */
    public int exitCode() {
        return exitCode;
    }
}
