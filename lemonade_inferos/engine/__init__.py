"""The generation engine: prefill + decode on onnxruntime with a pluggable KV cache."""

from .engine import ContextLengthError, Engine, GenerationResult
from .sampling import GenerationConfig

__all__ = ["Engine", "GenerationConfig", "GenerationResult", "ContextLengthError"]
