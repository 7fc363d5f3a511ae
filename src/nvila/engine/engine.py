"""A continuous-batching engine: requests join and leave the running batch between decode steps.

Contract: ``submit`` runs the processor in the caller's thread (bad input raises there, before
anything is queued) and returns a handle; one scheduler thread owns the model. Each scheduler
iteration admits at most one waiting request (its media encoding + prefill), then runs one decode
step for every running request, so a new request stalls the others for at most one prefill. On the
CPU, the thread that builds the engine, each ``submit`` and the idle scheduler free their OpenMP
worker pools (``openmp.release_pool``), which would otherwise slow a busy scheduler thread's.
Handles stream ``TokenEvent``s (a blocking iterator and an async iterator).

Every request ends with exactly one final event, whatever fails. An exception while admitting a
request (media encoding, prefill, seeding, first sample) or while sampling or recording its token
ends only that request with "error"; an exception in the batched decode ends the requests of that
step. The engine keeps serving. Should the scheduler thread itself die, the engine closes and
everything it holds ends with "abort".

Media features are cached by their content hash (``MediumInfo.digest``), so a follow-up turn about
the same image or video does not re-encode it (nor re-tile an image: the processor keeps those). The
KV of every finished request is kept too (``prefix.PrefixCache``, bounded, LRU): a request whose
prompt starts like a kept one (same ids, same media) copies that KV and prefills only the rest, so a
follow-up turn of a chat costs its new tokens only. Its metrics report the reused positions
(``cached_tokens``).

Per-request rules on the next token go through one hook: a request's logits processors (its own
``logits_processors``, then the JSON constraint its ``response_format`` asks for, built at submit)
rewrite its float32 logits row before sampling, at the first token and at every step, and are told
the token sampled (``LogitsProcessor``). A step in which no request has processors and every one
decodes greedily picks all tokens with one batched argmax (one host sync); the others sample row
by row. Requests that ask for ``logprobs`` get ``log_softmax`` of their raw logits row (before the
processors and the sampling settings) on their events.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..llm import Runner
from ..processor import MediumInfo, NVILAProcessor
from ..sampling import SamplingParams, sample
from ..timetokens import TimeTokenStream
from .api import MAX_TOP_LOGPROBS, ConstraintError, GenerationRequest, RequestMetrics, TokenEvent, TokenLogprob
from .constraints import JsonConstraints, json_schema_of
from .logprobs import TokenSpeller, token_logprob
from .openmp import release_pool
from .prefix import PrefixCache, media_positions, media_slices, prompt_key

logger = logging.getLogger(__name__)

SEED_RANGE = (-2**63, 2**64)  # [lo, hi): what torch.Generator.manual_seed takes (negatives wrap mod 2**64)


@dataclass
class EngineConfig:
    """Engine resources (not model behaviour)."""

    max_batch_size: int = 8  # concurrent decode streams = KV-cache slots
    max_seq_len: int | None = 4096  # context per stream; None = the model's model_max_length
    threads: int | None = None  # torch intra-op threads for the scheduler; None = torch's default
    vision_cache_size: int = 64  # media whose features are kept (0: no cache)
    prefix_cache_mib: float = 512.0  # KV of finished requests kept for prefix reuse (0: no cache)
    cuda_graphs: bool = True  # on CUDA, decode steps replay CUDA graphs (llm.DecodeGraphs); False: eager

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.vision_cache_size < 0:
            raise ValueError(f"vision_cache_size must be >= 0, got {self.vision_cache_size}")
        if self.prefix_cache_mib < 0:
            raise ValueError(f"prefix_cache_mib must be >= 0, got {self.prefix_cache_mib}")


class EngineClosed(RuntimeError):
    """The engine was shut down: it takes no new requests."""


class RequestHandle:
    """A submitted request: iterate it (sync or async) for its ``TokenEvent``s; ``cancel()`` to stop.

    Events go to a thread-safe queue; once an async iterator starts, they are handed to its event
    loop with ``call_soon_threadsafe`` instead (no executor thread per pending event).
    """

    def __init__(self, rid: str, media: list[MediumInfo], metrics: RequestMetrics):
        self.id = rid
        self.media = media
        self.metrics = metrics
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []  # every sampled id, the stop token included (events skip empty text)
        self.token_times: list[float] = []  # time.perf_counter() when each id was sampled
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._lock = threading.Lock()
        self._async: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, ev: TokenEvent) -> None:
        """Called by the scheduler thread."""
        with self._lock:
            if self._async is None:
                self._events.put(ev)
                return
            loop, aq = self._async
        try:
            loop.call_soon_threadsafe(aq.put_nowait, ev)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            ev = self._events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    async def __aiter__(self):
        aq: asyncio.Queue[TokenEvent] = asyncio.Queue()
        with self._lock:
            while not self._events.empty():
                aq.put_nowait(self._events.get_nowait())
            self._async = (asyncio.get_running_loop(), aq)
        while True:
            ev = await aq.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def text(self) -> str:
        """Block until the request finishes; return its whole text."""
        return "".join(ev.text for ev in self)


class _Detokenizer:
    """Incremental text for a stream of ids, holding back incomplete characters and stop-string prefixes.
    With ``timer`` (a ``TimeTokenStream``), time tokens in the text become seconds as they stream."""

    def __init__(self, tokenizer, stop: list[str], timer: TimeTokenStream | None = None):
        self.tokenizer = tokenizer
        self.timer = timer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns (text to emit now, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            j = text.find(s, max(self.sent - len(s), 0))
            if j != -1:
                out, self.sent = text[self.sent:j], j
                return self._time(out, last=True), True
        if text.endswith("\ufffd"):
            return "", False
        end = max(len(text) - self.hold, self.sent)
        out, self.sent = text[self.sent:end], end
        return self._time(out), False

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        out, self.sent = text[self.sent:], len(text)
        return self._time(out, last=True)

    def _time(self, text: str, last: bool = False) -> str:
        if self.timer is None:
            return text
        return self.timer.push(text) + (self.timer.flush() if last else "")


class _Running:
    """Scheduler-side state of one request."""

    def __init__(self, handle: RequestHandle, request: GenerationRequest, inputs, detok: _Detokenizer, submitted: float,
                 processors: list, digests: list[str], media_ends: list[int], key):
        self.handle = handle
        self.request = request
        self.inputs = inputs
        self.digests = digests  # per medium, its content hash (feature cache and prefix key)
        self.media_ends = media_ends  # per medium, the prompt position of its last placeholder
        self.key = key  # (L,) the prompt's prefix-cache key (prefix.prompt_key), or None with no prefix cache
        self.detok = detok
        self.submitted = submitted
        self.params = SamplingParams(do_sample=request.do_sample, temperature=request.temperature,
                                     top_k=request.top_k, top_p=request.top_p,
                                     repetition_penalty=request.repetition_penalty)
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor = inputs["input_ids"]  # (1, T) ids so far, for the repetition penalty
        self.position = 0  # tokens in the cache
        self.last_token = 0
        self.new_tokens = 0
        self.first_token_at = 0.0
        self.processors = processors  # callables (generated ids, logits (V,)) -> logits (V,)
        self.logprobs: list[TokenLogprob] = []  # for tokens not yet on an event (requests that asked)

    def take_logprobs(self) -> list[TokenLogprob] | None:
        """The logprobs of the tokens since the last event (None for requests that did not ask)."""
        if not self.request.logprobs:
            return None
        out, self.logprobs = self.logprobs, []
        return out


class Engine:
    """Continuous batching over one NVILA model. See the module docstring for the contract."""

    def __init__(self, model, processor: NVILAProcessor, config: EngineConfig | None = None, *, model_id: str = "nvila"):
        self.model = model.eval()
        self.processor = processor
        self.config = config or EngineConfig()
        self.model_id = model_id
        self.context_length = min(self.config.max_seq_len or model.config.llm.model_max_length,
                                  model.config.llm.model_max_length)
        self.runner = Runner(model.llm, self.config.max_batch_size, self.context_length,
                             cuda_graphs=self.config.cuda_graphs)
        self._stop_ids = set(model.ids.stop)
        self._speller = TokenSpeller(processor.tokenizer)
        self._constraints: JsonConstraints | None = None  # built on the first response_format request
        self._constraints_lock = threading.Lock()
        self._waiting: deque[_Running] = deque()
        self._active: list[_Running] = []
        self._features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prefixes = PrefixCache(int(self.config.prefix_cache_mib * 2**20))
        self._wake = threading.Condition()
        self._shutdown = False
        self._fps_warned = False  # a video without a frame rate is reported once per engine, not per request
        self._cpu = self.model.device.type == "cpu"
        if self._cpu:  # this thread's OpenMP workers would slow the scheduler's (openmp.py)
            release_pool()
        self._thread = threading.Thread(target=self._loop, name="nvila-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        config: EngineConfig | None = None, **processor_overrides) -> "Engine":
        from ..checkpoint import check_layout
        from ..model import NVILAForConditionalGeneration

        root = check_layout(path)  # a Hub id is fetched once; both loaders read the snapshot
        processor = NVILAProcessor.from_pretrained(root, **processor_overrides)
        model = NVILAForConditionalGeneration.from_pretrained(root, torch_dtype=dtype, device=device)
        return cls(model, processor, config, model_id=Path(path).name)

    # ----------------------------------------------------------------------------------- client side
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Preprocess ``request`` now (raising on bad input) and queue it; returns its handle."""
        if self._shutdown:
            raise EngineClosed("the engine is shut down")
        if request.max_tokens is not None and request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.seed is not None and not SEED_RANGE[0] <= request.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {request.seed}")
        SamplingParams(do_sample=request.do_sample, temperature=request.temperature, top_k=request.top_k,
                       top_p=request.top_p, repetition_penalty=request.repetition_penalty)
        if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}")
        if request.top_logprobs and not request.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        processors = list(request.logits_processors)
        constraint = self._json_constraint(request.response_format)
        if constraint is not None:
            processors.append(constraint)
        submitted = time.perf_counter()
        try:
            inputs, infos = self.processor.prepare([request.messages], add_generation_prompt=True, **request.options)
        finally:
            if self._cpu:
                release_pool()
        n = inputs["input_ids"].shape[1]
        if n >= self.context_length:
            raise ValueError(f"the prompt has {n} tokens; the context holds {self.context_length}")
        metrics = RequestMetrics(prompt_tokens=n, visual_tokens=[i.num_visual_tokens for i in infos[0]])
        handle = RequestHandle(f"req-{uuid.uuid4().hex[:16]}", infos[0], metrics)
        digests = [info.digest for info in infos[0]]
        token = {"image": self.model.ids.image, "video": self.model.ids.video}
        positions = media_positions(inputs["input_ids"][0], [(token[i.kind], i.num_visual_tokens) for i in infos[0]])
        key = prompt_key(inputs["input_ids"][0], positions, digests) if self.config.prefix_cache_mib else None
        # None: the text keeps any time tokens
        duration = self.processor.time_token_duration(infos[0], warn=not self._fps_warned)
        self._fps_warned |= duration is not None and infos[0][0].duration_s is None
        cfg = self.model.config
        timer = None if duration is None else TimeTokenStream(duration, cfg.num_time_tokens, cfg.time_token_format)
        detok = _Detokenizer(self.processor.tokenizer, request.stop, timer)
        running = _Running(handle, request, inputs, detok, submitted, processors, digests,
                           [int(p[-1]) for p in positions], key)
        with self._wake:
            if self._shutdown:  # checked again under the lock: the scheduler drains the queue once
                raise EngineClosed("the engine is shut down")
            self._waiting.append(running)
            self._wake.notify()
        return handle

    def _json_constraint(self, response_format: dict | None):
        """A new JSON constraint for ``response_format``, or None for free text.

        Raises:
            ConstraintError: an unknown format, an invalid schema, or the ``json`` extra missing.
        """
        if response_format is not None and not isinstance(response_format, dict):
            raise ConstraintError(f"response_format must be a dict, got {type(response_format).__name__}")
        if json_schema_of(response_format) is None:
            return None
        with self._constraints_lock:
            if self._constraints is None:
                self._constraints = JsonConstraints(self.processor.tokenizer, self.model.ids.vocab_size,
                                                    sorted(self._stop_ids))
        return self._constraints.processor(response_format)

    def generate(self, messages: list[dict], **kw) -> Iterator[TokenEvent]:
        """Submit one conversation and yield its events (``kw`` are ``GenerationRequest`` fields)."""
        yield from self.submit(GenerationRequest(messages=messages, **kw))

    def shutdown(self, wait: bool = True) -> None:
        """Stop the scheduler; running and waiting requests end with finish_reason "abort"."""
        with self._wake:
            self._shutdown = True
            self._wake.notify()
        if wait:
            self._thread.join()

    def stats(self) -> dict:
        """A snapshot: running requests (= KV-cache slots in use, of ``slots``), waiting requests,
        ``kv_tokens`` (positions held in the cache by running requests), cached media features, and
        the prefix cache's entries, tokens, bytes, hits and reused tokens."""
        active = list(self._active)
        return {"running": len(active), "waiting": len(self._waiting), "slots": self.config.max_batch_size,
                "kv_tokens": sum(r.position for r in active), "cached_media": len(self._features),
                "prefix_cache": self._prefixes.stats()}

    # -------------------------------------------------------------------------------- scheduler side
    def _loop(self) -> None:
        """The scheduler thread: ``_serve`` until shutdown. Should a bug escape it, the engine closes
        all the same (``_serve`` ends what it holds with "abort"), so that no client waits forever."""
        try:
            self._serve()
        except Exception:
            logger.exception("the engine's scheduler stopped on an error; the engine is closed")

    def _serve(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        new: _Running | None = None
        try:
            while True:
                with self._wake:
                    while not self._shutdown and not self._waiting and not self._active:
                        if self._cpu:  # idle: our OpenMP workers would slow another engine's (openmp.py)
                            release_pool()
                        self._wake.wait()
                    if self._shutdown:
                        return
                    for r in [r for r in self._waiting if r.handle.cancelled]:  # free cancelled waiters now
                        self._waiting.remove(r)
                        self._finish(r, "abort")
                    new = (self._waiting.popleft() if self._waiting and len(self._active) < self.config.max_batch_size
                           else None)
                try:
                    if new is not None:
                        self._admit(new)
                    if self._active:
                        self._step()
                except Exception as e:  # outside the per-request guards (e.g. moving a cache slot): fail the batch
                    logger.exception("engine step failed")
                    self._end_all(([new] if new is not None else []) + self._active, "error", error=_describe(e))
                    self._active.clear()
        finally:
            with self._wake:
                self._shutdown = True
                left = ([new] if new is not None else []) + self._active + list(self._waiting)
                self._active, self._waiting = [], deque()
            self._end_all(left, "abort")

    def _admit(self, r: _Running) -> None:
        if r.handle.cancelled:
            self._finish(r, "abort")
            return
        start = time.perf_counter()
        r.handle.metrics.queue_s = start - r.submitted
        try:  # a failure here is this request's alone: the slot it was prefilled into is still free
            slot, n = len(self._active), r.inputs["input_ids"].shape[1]
            reused, entry = (0, None) if r.key is None else self._prefixes.longest(r.key, n - 1)
            if entry is not None:
                self.runner.cache.write(slot, entry.k[:, :, :reused], entry.v[:, :, :reused])
                r.handle.metrics.cached_tokens = reused
            embeds = self._embed(r, reused)
            logits = self.runner.prefill(slot, embeds[:, reused:], start=reused)
            r.handle.metrics.prefill_s = time.perf_counter() - start
            if r.request.seed is not None:
                r.generator = torch.Generator(device=logits.device).manual_seed(r.request.seed)
            token, logprob = self._pick(r, logits.float(), None)
        except Exception as e:
            self._fail(r, e)
            return
        r.position = n
        self._active.append(r)
        self._accept_or_fail(r, token, logprob)

    def _embed(self, r: _Running, reused: int) -> torch.Tensor:
        """Prompt embeddings (1, L, H), encoding only media missing from the feature cache; media
        wholly inside the first ``reused`` positions (their KV is reused) get zero rows instead."""
        inputs = r.inputs.to(self.model.device)
        feats: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
        slices = media_slices(inputs, r.handle.media)
        for info, digest, end, (pixels, meta) in zip(r.handle.media, r.digests, r.media_ends, slices):
            if end < reused:
                feats[info.kind].append(torch.zeros(info.num_visual_tokens, self.model.config.llm.hidden_size,
                                                    dtype=self.model.dtype, device=self.model.device))
                continue
            cached = self._features.get(digest)
            if cached is None:
                encode = self.model.encode_images if info.kind == "image" else self.model.encode_videos
                with torch.inference_mode():
                    cached = encode(pixels, meta)
                if self.config.vision_cache_size:
                    self._features[digest] = cached
                    while len(self._features) > self.config.vision_cache_size:
                        self._features.popitem(last=False)
            else:
                self._features.move_to_end(digest)
                r.handle.metrics.cached_media += 1
            feats[info.kind].append(cached)
        with torch.inference_mode():
            return self.model.fuse(inputs["input_ids"], *(torch.cat(feats[k]) if feats[k] else None
                                                          for k in ("image", "video")))

    def _step(self) -> None:
        """One decode step for every running request. A failure of the batched forward ends every
        request of the step; a failure to sample or record one request's token ends that one."""
        for r in [r for r in self._active if r.handle.cancelled]:
            self._finish(r, "abort")
        if not self._active:
            return
        batch = list(self._active)
        try:
            device = self.model.device
            tokens = torch.tensor([r.last_token for r in batch], device=device)
            logits = self.runner.decode(tokens, [r.position for r in batch]).float()  # (B, V)
            greedy = all(r.params.greedy and r.params.repetition_penalty == 1.0 and not r.processors for r in batch)
            argmax = logits.argmax(-1).tolist() if greedy else [None] * len(batch)
        except Exception as e:
            logger.exception("decode step failed for %s", ", ".join(r.handle.id for r in batch))
            self._end_all(batch, "error", error=_describe(e))
            self._active.clear()  # every slot is free: no cache to move
            return
        picked = [self._pick_or_error(r, logits[i], argmax[i]) for i, r in enumerate(batch)]
        # Every active slot now holds one more position; advance them all before any request can
        # finish, since finishing moves the last slot's cache (``position`` entries) into the hole.
        for r in batch:
            r.position += 1
        for r, got in zip(batch, picked):
            if isinstance(got, Exception):
                self._fail(r, got)
            else:
                self._accept_or_fail(r, *got)

    def _pick(self, r: _Running, logits: torch.Tensor, token: int | None) -> tuple[int, TokenLogprob | None]:
        """``r``'s next token and, if it asked, its logprobs.

        Args:
            r: the request.
            logits: (V,) float32, its raw logits row, which no other request reads. Processors may
                rewrite it in place; they get a copy only when the raw row is still needed, for logprobs.
            token: the token when the step already picked it (the batched greedy argmax), else None.
        """
        if token is None:
            row = logits
            if r.processors:
                row = logits.clone() if r.request.logprobs else logits
                with torch.inference_mode():  # the row is an inference tensor: in-place writes need the mode
                    for p in r.processors:
                        row = p(r.handle.token_ids, row)
            token = int(sample(row[None], r.seen, r.params, r.generator)[0])
        logprob = token_logprob(logits, token, r.request.top_logprobs, self._speller) if r.request.logprobs else None
        return token, logprob

    def _pick_or_error(self, r: _Running, logits: torch.Tensor, token: int | None):
        """``_pick``, or the exception it raised (which ends only ``r``)."""
        try:
            return self._pick(r, logits, token)
        except Exception as e:
            return e

    def _accept_or_fail(self, r: _Running, token: int, logprob: TokenLogprob | None = None) -> None:
        if logprob is not None:
            r.logprobs.append(logprob)
        try:
            self._accept(r, token)
        except Exception as e:
            self._fail(r, e)

    def _accept(self, r: _Running, token: int) -> None:
        """Record a sampled token: stream its text, or finish the request."""
        now = time.perf_counter()
        m = r.handle.metrics
        if r.new_tokens == 0:
            r.first_token_at = now
            m.ttft_s = now - r.submitted
        r.new_tokens += 1
        r.handle.token_ids.append(token)
        r.handle.token_times.append(now)
        m.completion_tokens = r.new_tokens
        m.decode_s = now - r.first_token_at
        r.last_token = token
        if r.params.repetition_penalty != 1.0:
            r.seen = torch.cat([r.seen, torch.tensor([[token]], device=r.seen.device)], dim=1)
        if token in self._stop_ids and not r.request.ignore_eos:
            del r.logprobs[-1:]  # the stop token's: it is not part of the answer
            self._finish(r, "stop")
            return
        complete = False  # a processor (the JSON constraint) says the answer is complete
        for p in r.processors:
            accept = getattr(p, "accept", None)
            if accept is not None and accept(token):
                complete = True
        text, stopped = r.detok.push(token)
        if stopped or complete:
            self._emit(r, TokenEvent(r.handle.id, token, text, logprobs=r.take_logprobs()))
            self._finish(r, "stop", flush=not stopped)
            return
        limit = r.request.max_tokens
        if (limit is not None and r.new_tokens >= limit) or r.position + 1 >= self.context_length:
            self._emit(r, TokenEvent(r.handle.id, token, text, logprobs=r.take_logprobs()))
            self._finish(r, "length")
            return
        if text:
            self._emit(r, TokenEvent(r.handle.id, token, text, logprobs=r.take_logprobs()))

    def _finish(self, r: _Running, reason: str, *, error: str | None = None, flush: bool = True) -> None:
        tail = r.detok.flush() if flush and reason in ("stop", "length") else ""
        if r in self._active:
            i = self._active.index(r)
            if r.key is not None and reason in ("stop", "length"):
                self._keep_prefix(r, i)
            last = len(self._active) - 1
            if i != last:  # keep active requests in slots 0..B-1: move the last one into the hole
                moved = self._active[last]
                self.runner.cache.move(last, i, moved.position)
                self._active[i] = moved
            self._active.pop()
        r.handle.finish_reason = reason
        self._emit(r, TokenEvent(r.handle.id, None, tail, reason, error=error, logprobs=r.take_logprobs()))

    def _keep_prefix(self, r: _Running, slot: int) -> None:
        """Offer the KV in ``slot`` (the prompt, then every sampled token but the last) to the prefix cache."""
        generated = r.handle.token_ids[:r.position - len(r.key)]
        key = np.concatenate([r.key, np.asarray(generated, dtype=np.int64)])
        self._prefixes.insert(key, *self.runner.cache.read(slot, r.position))

    def _fail(self, r: _Running, e: Exception) -> None:
        """End one request with "error" (unless it has already ended), freeing its slot."""
        logger.error("%s failed", r.handle.id, exc_info=e)
        if r.handle.finish_reason is None:
            self._finish(r, "error", error=_describe(e))

    def _end_all(self, rs: list[_Running], reason: str, *, error: str | None = None) -> None:
        """End the requests not ended yet without touching the cache; the caller frees their slots."""
        for r in rs:
            if r.handle.finish_reason is None:
                r.handle.finish_reason = reason
                self._emit(r, TokenEvent(r.handle.id, None, "", reason, error=error))

    @staticmethod
    def _emit(r: _Running, ev: TokenEvent) -> None:
        r.handle._put(ev)


def _describe(e: Exception) -> str:
    """One line for a client: the exception's type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
