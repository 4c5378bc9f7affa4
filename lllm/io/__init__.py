"""Input and output: loading models (embedded, hub, local, GGUF) and the results store with its codecs."""
