package ai.gemma.runtime;

/** Bad input: a missing or corrupt artifact, a token id out of the vocabulary, a prompt past max length, ... */
public class GemmaInputException extends GemmaException {
    public GemmaInputException(String message) {
        super(message, 2);
    }
}
