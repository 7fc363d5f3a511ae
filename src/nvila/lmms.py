"""lmms-eval model plugin: ``lmms-eval --model nvila --model_args pretrained=PATH[,...] --tasks ...``.

Registration: lmms-eval (>= 0.6) reads the Python entry-point group ``lmms_eval.models``; our
``pyproject.toml`` declares ``nvila = "nvila.lmms:manifest"`` there, so installing nvila next to
lmms-eval is all it takes (no fork, no ``LMMS_EVAL_PLUGINS``). The manifest offers two classes
under one name, as lmms-eval's registry (``ModelManifest``) allows:

* ``NVILA`` (the default, a chat model, ``is_simple = False``): ``generate_until`` reads each
  document's ``doc_to_messages`` (lmms-eval's message protocol: text, image and video parts) and
  answers through nvila's continuous-batching engine (``nvila.engine.Engine``, ``batch_size``
  streams at once, greedy unless the task asks for ``temperature > 0``) -- the decode path of
  ``nvila eval``, ``nvila infer`` and ``nvila serve``.
* ``NVILASimple`` (``--force_simple``, ``is_simple = True``): the same answers from the older
  ``doc_to_visual`` + ``doc_to_text`` protocol. lmms-eval builds ``loglikelihood`` /
  ``multiple_choice`` requests only for simple models, so multiple-choice tasks run through it.

``loglikelihood`` (both classes) scores a continuation on the model's logits: the context becomes
one user turn (media first) under the checkpoint's chat template with the generation prompt, the
continuation's tokens follow, and one ``NVILAForConditionalGeneration.forward`` gives their summed
log-probability and whether each is the argmax. lmms-eval receives the negative of that sum (its
multiple-choice scorer takes the argmin; see ``loglikelihood``).

``model_args``: ``pretrained`` (a checkpoint directory in either layout or a Hub id; default the
bundled SynthVILA model), ``max_tiles``, ``num_frames``, ``fps`` (processor overrides),
``max_new_tokens`` (default when the task sets none: 16), ``device`` (default cuda if available),
``dtype`` (float32|bfloat16|float16). Nothing is downloaded for a local checkpoint; the task's own
data loading decides the rest. lmms-eval's ``--batch_size N`` (its default: 1) sets the engine's
slots: N answers decode together.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image

from nvila.bundled import default_model_path
from nvila.engine import Engine, EngineConfig, GenerationRequest


def manifest():
    """The entry point's payload: both classes under the name ``nvila``. A function, so that importing
    this module does not import ``lmms_eval.models``, whose package init loads the entry points."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="nvila", chat_class_path="nvila.lmms.NVILA",
                         simple_class_path="nvila.lmms.NVILASimple")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _visual_part(visual: Any) -> dict:
    """One ``doc_to_visual`` item (PIL image, image/video path or ``{"type", "url"|"path"}``) -> a content part."""
    if isinstance(visual, Image.Image):
        return {"type": "image", "image": visual}
    if isinstance(visual, dict):
        kind = visual.get("type", "video")
        return {"type": kind, kind: visual.get("url") or visual.get("path")}
    if isinstance(visual, (str, os.PathLike)):
        is_image = os.fspath(visual).lower().endswith(IMAGE_EXTS)
        return {"type": "image", "image": visual} if is_image else {"type": "video", "video": visual}
    raise TypeError(f"unsupported visual of type {type(visual).__name__}; expected a PIL image or a path")


def _protocol_messages(messages: list[dict]) -> list[dict]:
    """lmms-eval's message protocol (parts ``{"type", "text"|"url"}``) -> nvila processor messages.

    Raises:
        ValueError: an audio part (NVILA has no audio input).
    """
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for p in content:
            kind = p["type"]
            if kind == "text":
                parts.append({"type": "text", "text": p["text"]})
            elif kind in ("image", "video"):
                url = p.get("url", p.get(kind))
                parts.append(_visual_part(url) if isinstance(url, dict) else {"type": kind, kind: url})
            else:
                raise ValueError(f"NVILA takes text, image and video parts, not {kind!r}")
        out.append({"role": m["role"], "content": parts})
    return out


class _NVILABase(lmms):
    """Shared loading, engine decoding and logit scoring; subclasses only read requests."""

    def __init__(self, pretrained: str | None = None, max_tiles: int | None = None, num_frames: int | None = None,
                 fps: float | None = None, batch_size: int | str = 8, max_new_tokens: int = 16,
                 device: str | None = None, dtype: str = "float32", **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown nvila model_args {sorted(unknown)}; valid: pretrained, max_tiles, num_frames, "
                             "fps, batch_size, max_new_tokens, device, dtype")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not valid; choose one of {', '.join(DTYPES)}")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        options = {"max_tiles": None if max_tiles is None else int(max_tiles),
                   "num_video_frames": None if num_frames is None else int(num_frames),
                   "fps": None if fps is None else float(fps)}  # processor overrides, fixed for the run
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = Engine.from_pretrained(pretrained or default_model_path(), dtype=DTYPES[dtype], device=device,
                                             config=EngineConfig(max_batch_size=self.batch_size),
                                             **{k: v for k, v in options.items() if v is not None})
        self.model, self.processor = self.engine.model, self.engine.processor

    def __del__(self) -> None:
        engine = self.__dict__.get("engine")
        if engine is not None:
            engine.shutdown(wait=False)

    # ------------------------------------------------------------------------------- generation
    def _generate(self, conversations: list[list[dict]], gen_kwargs: list[dict]) -> list[str]:
        """Answer each conversation through the engine, at most ``2 * batch_size`` queued at a time."""
        answers: list[str] = [""] * len(conversations)
        pending: deque = deque()  # (index, handle), oldest first
        for i, (messages, kw) in enumerate(zip(conversations, gen_kwargs)):
            pending.append((i, self.engine.submit(self._request(messages, kw))))
            while len(pending) > 2 * self.batch_size or (pending and i + 1 == len(conversations)):
                j, handle = pending.popleft()
                answers[j] = handle.text()
        return answers

    def _request(self, messages: list[dict], kw: dict) -> GenerationRequest:
        """lmms-eval ``generation_kwargs`` -> a ``GenerationRequest``: ``until`` stop strings,
        ``max_new_tokens``, sampling only when ``do_sample`` or ``temperature > 0``."""
        until = kw.get("until") or []
        temperature = float(kw.get("temperature") or 0.0)
        do_sample = bool(kw.get("do_sample")) or temperature > 0
        return GenerationRequest(messages=messages, max_tokens=int(kw.get("max_new_tokens") or self.max_new_tokens),
                                 stop=[until] if isinstance(until, str) else list(until), do_sample=do_sample,
                                 temperature=temperature if do_sample else 1.0, top_p=float(kw.get("top_p") or 1.0))

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("nvila does not implement generate_until_multi_round")

    # ------------------------------------------------------------------------------- likelihood
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(negative log-likelihood of the continuation, all its tokens greedy)`` per request, each
        wrapped in a ``GenerationResult`` as its ``text``. Two departures from lmms-eval's docstring,
        both to match what its evaluator (0.7.3) does:

        * the first value is ``-log p(continuation)`` (>= 0, lower is better): lmms-eval's
          ``multiple_choice`` scorer picks the choice with the *smallest* value (``np.argmin``,
          because its own models return a loss; lmms-eval issue #370);
        * the wrapping: the evaluator passes every model output through ``unwrap_generation_output``,
          which keeps a ``GenerationResult``'s ``text`` as it is but turns a bare ``(float, bool)``
          tuple into its string, which ``multiple_choice`` scoring cannot unpack.

        Request args (the simple protocol): ``(context, continuation or doc_to_target,
        doc_to_visual, doc_id, task, split)``.
        """
        out = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):
                continuation = continuation(doc)
            visuals = doc_to_visual(doc) if doc_to_visual is not None else []
            parts = [_visual_part(v) for v in visuals or []] + [{"type": "text", "text": context}]
            logp, greedy = self._score([{"role": "user", "content": parts}], str(continuation))
            out.append(GenerationResult(text=(-logp, greedy)))
        return out

    @torch.inference_mode()
    def _score(self, messages: list[dict], continuation: str | list[int]) -> tuple[float, bool]:
        """Log-probability of ``continuation`` (text, or its token ids) as the assistant's reply to
        ``messages``, and whether greedy decoding would produce exactly its tokens."""
        inputs, _ = self.processor.prepare([messages], add_generation_prompt=True)
        target = (self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
                  if isinstance(continuation, str) else list(continuation))
        if not target:
            return 0.0, True
        n = inputs["input_ids"].shape[1]
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([target])], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs = inputs.to(self.model.device, self.model.dtype)
        logits = self.model(**inputs).logits[0, n - 1:-1].float()  # (T, V): the rows that predict the target
        logp = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(target, device=logp.device)
        return float(logp.gather(1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


class NVILA(_NVILABase):
    """The chat model: ``generate_until`` over ``doc_to_messages`` (images and videos), batched by the engine."""

    is_simple = False

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Request args: ``(context, doc_to_messages, generation_kwargs, doc_id, task, split)``."""
        conversations, kws = [], []
        for req in requests:
            _, doc_to_messages, kw, doc_id, task, split = req.args
            raw = doc_to_messages(self.task_dict[task][split][doc_id])
            conversations.append(_protocol_messages([m if isinstance(m, dict) else m.model_dump() for m in raw]))
            kws.append(kw or {})
        return self._generate(conversations, kws)


class NVILASimple(_NVILABase):
    """The simple-protocol model (``--force_simple``): ``doc_to_visual`` + context text; loglikelihood tasks."""

    is_simple = True

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Request args: ``(context, generation_kwargs, doc_to_visual, doc_id, task, split)``."""
        conversations, kws = [], []
        for req in requests:
            context, kw, doc_to_visual, doc_id, task, split = req.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            parts = [_visual_part(v) for v in visuals or []] + [{"type": "text", "text": context}]
            conversations.append([{"role": "user", "content": parts}])
            kws.append(kw or {})
        return self._generate(conversations, kws)
