"""llm-proxy: a trio-based LLM gateway."""

__version__ = "0.1.0"
