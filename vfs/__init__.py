"""lamina-llm-cache: a read-only FUSE filesystem that serves Hugging Face models lazily."""

__version__ = "0.1.0"
