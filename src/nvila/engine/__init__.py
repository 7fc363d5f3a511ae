"""The inference engine: preallocated KV cache, prefill/decode steps, continuous batching, streaming.

The engine knows ids, embeddings and positions; the processor prepares requests, the model encodes
media and fuses them (see ``Engine`` for the contract).
"""

from .api import GenerationRequest, RequestMetrics, TokenEvent
from .engine import Engine, EngineClosed, EngineConfig, RequestHandle
from .runner import KVCache, Runner

__all__ = ["Engine", "EngineClosed", "EngineConfig", "GenerationRequest", "KVCache", "RequestHandle", "RequestMetrics", "Runner",
           "TokenEvent"]
