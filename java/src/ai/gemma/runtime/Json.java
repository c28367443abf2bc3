package ai.gemma.runtime;

/** Just enough JSON to print what Python's json.dumps(indent=2) prints (ASCII only, \\uXXXX escapes). */
final class Json {
    private Json() {}

    static String string(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
                case '"': out.append("\\\""); break;
                case '\\': out.append("\\\\"); break;
                case '\n': out.append("\\n"); break;
                case '\r': out.append("\\r"); break;
                case '\t': out.append("\\t"); break;
                case '\b': out.append("\\b"); break;
                case '\f': out.append("\\f"); break;
                default:
                    if (c < 0x20 || c >= 0x7F) out.append(String.format("\\u%04x", (int) c));
                    else out.append(c);
            }
        }
        return out.append('"').toString();
    }

    /** A list of ints, one per line at `indent` spaces, as json.dumps(indent=2) lays it out. */
    static String ints(long[] values, int indent) {
        if (values.length == 0) return "[]";
        String pad = " ".repeat(indent);
        StringBuilder out = new StringBuilder("[");
        for (int i = 0; i < values.length; i++) out.append(i == 0 ? "\n" : ",\n").append(pad).append(values[i]);
        return out.append("\n").append(" ".repeat(indent - 2)).append("]").toString();
    }

    /** Python's repr() of a str (for messages quoting the user's value). */
    static String repr(String s) {
        char quote = s.indexOf('\'') >= 0 && s.indexOf('"') < 0 ? '"' : '\'';
        StringBuilder out = new StringBuilder().append(quote);
        for (char c : s.toCharArray()) {
            if (c == '\\') out.append("\\\\");
            else if (c == quote) out.append('\\').append(c);
            else if (c == '\n') out.append("\\n");
            else if (c == '\t') out.append("\\t");
            else if (c == '\r') out.append("\\r");
            else out.append(c);
        }
        return out.append(quote).toString();
    }

    /** str(Path(p)) in Python: no doubled or trailing slashes, no "." parts. */
    static String pythonPath(String p) {
        StringBuilder out = new StringBuilder(p.startsWith("/") ? "/" : "");
        for (String part : p.split("/")) {
            if (part.isEmpty() || part.equals(".")) continue;
            if (out.length() > 0 && out.charAt(out.length() - 1) != '/') out.append('/');
            out.append(part);
        }
        return out.length() == 0 ? "." : out.toString();
    }
}
