"""The inference engine: preallocated KV cache, prefill/decode steps, continuous batching, streaming.

The engine knows ids, embeddings and positions; the processor prepares requests, the model encodes
media and fuses them (see ``Engine`` for the contract).
"""

from .api import ConstraintError, GenerationRequest, LogitsProcessor, RequestMetrics, TokenEvent, TokenLogprob
from .engine import Engine, EngineClosed, EngineConfig, RequestHandle
from ..llm import KVCache, Runner

__all__ = ["ConstraintError", "Engine", "EngineClosed", "EngineConfig", "GenerationRequest", "KVCache",
           "LogitsProcessor", "RequestHandle", "RequestMetrics", "Runner", "TokenEvent", "TokenLogprob"]
