"""kvcli: ask questions about long documents on a local LLM with a compressed KV cache."""

__version__ = "0.1.0"
