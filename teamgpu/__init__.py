"""teamgpu: an authenticated, fair, audited OpenAI-compatible gateway in front of vLLM."""

__version__ = "0.1.0"

__all__ = ["__version__"]
