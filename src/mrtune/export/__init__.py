"""Taking a model out of its run: a portable adapter directory, GGUF files, the MR grammar for other engines."""
