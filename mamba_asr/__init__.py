"""Code shared by the Mamba-ASR recipe scripts (data, corpus, environment, training helpers)."""
