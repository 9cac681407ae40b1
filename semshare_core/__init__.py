"""SemShare: faster prefill by reusing the KV cache of a semantically similar stored prompt."""

from .config import GenerationConfig, ReuseConfig
from .engine import GenerationResult, GenerationStream, PrefillOutcome, SemShareEngine
from .model import DEFAULT_MODEL, load_model
from .store import ReferenceEntry, ReferenceStore

__all__ = [
    "DEFAULT_MODEL",
    "GenerationConfig",
    "GenerationResult",
    "GenerationStream",
    "PrefillOutcome",
    "ReferenceEntry",
    "ReferenceStore",
    "ReuseConfig",
    "SemShareEngine",
    "load_model",
]
