#!/usr/bin/env python3
"""The GPU check: parity, the engine, the quantized kernels and speed on a CUDA device, as one table.

    python scripts/gpu_check.py                      # on cuda (every section)
    python scripts/gpu_check.py --device cpu --quick # the same script on the CPU (a dry run of it)
    python scripts/gpu_check.py --sections parity,engine --json out.json

Sections (each prints rows ``section | check | value | verdict``; a failed check exits 1; a section
that raises is one failed row with the exception, its traceback goes to stderr, and the next section
runs):

* ``parity``: the golden cases (tests/assets/golden) on the golden tiny checkpoints, rebuilt by
  tests/golden_checkpoints.py, in float32 with TF32 off: max |Δ| of the last two positions' logits
  (<= 1e-4, the CPU criterion; GPU kernels sum in another order, so the figure is reported either
  way and only the greedy ids decide) and identical greedy ids through ``model.generate``;
* ``engine``: the engine's greedy ids on the same cases, float32, equal the golden ones; a batch of
  the four cases, submitted together, gives each one the ids it gets alone; bf16 and fp16 engines
  run (their ids are reported, agreement with float32 is not required);
* ``quant``: ``nvila quantize`` (W8A8 towers, W4A16 LLM) on the tiny NVILA checkpoint on the device,
  then the quantized model decodes through the engine; and the kernels alone (W8A8 ``_int_mm``,
  W4A16 tinygemm) against ``F.linear`` on the dequantized weights: max relative error;
* ``fp8``: the FP8 training GEMM (``nvila.train.fp8.fp8_mm``: ``torch._scaled_mm`` on CUDA sm89+,
  dequantize + matmul elsewhere) against the float32 product of the same dequantized operands
  (relative error <= 1e-3), and one linear's forward + backward at the Qwen2-1.5B MLP shape,
  ``F.linear`` in bf16 (float32 on CPU) against ``fp8_linear``: milliseconds each;
* ``speed``: TTFT and decode tokens/s of the NVILA-Lite-2B shape (random weights, one 896x896 image)
  through the engine, against transformers' Qwen2-VL-2B shape on the same image and prompt
  (benchmarks/bench_engine.py builds both), in bf16 on CUDA (float32 on CPU); our decode with CUDA
  graphs (the engine's default on CUDA) and eager; TTFT split into submit -> prefill start
  (preprocessing), encode + prefill, and the rest; and TTFT when each prompt has a length not
  seen before (kernels that plan per shape, such as cuDNN's attention, pay then).
  ``--profile FILE`` adds torch.profiler tables of one prompt through ``model.generate``.

The script needs the repository (tests/ and benchmarks/ hold the assets and model builders).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from golden_checkpoints import VARIANTS, build_checkpoint, unpack_tokenizer  # noqa: E402
from nvila_testing import GOLDEN, golden_case  # noqa: E402

from nvila import NVILAForConditionalGeneration, NVILAProcessor  # noqa: E402
from nvila.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402

SECTIONS = ("parity", "engine", "quant", "fp8", "speed")
CASES = ["nvila__text", "nvila__image", "nvila-lite__image", "nvila-video__video"]
TOL = 1e-4


class Table:
    """Rows of (section, check, value, verdict); ``failed`` counts the checks that did not hold."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, section: str, check: str, value, ok: bool | None = None) -> None:
        verdict = "-" if ok is None else "ok" if ok else "FAIL"
        self.rows.append({"section": section, "check": check, "value": value, "verdict": verdict})
        sys.stdout.write(f"{section:8s} | {check:58s} | {value!s:>28s} | {verdict}\n")
        sys.stdout.flush()

    @property
    def failed(self) -> int:
        return sum(r["verdict"] == "FAIL" for r in self.rows)


def messages_of(case: dict) -> list[dict]:
    """The case's conversation with media paths made absolute."""
    out = []
    for m in case["messages"]:
        parts = [{**p, p["type"]: str(GOLDEN / "inputs" / p[p["type"]])} if p["type"] in ("image", "video") else p
                 for p in m["content"]]
        out.append({"role": m["role"], "content": parts})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ sections
def check_parity(t: Table, ckpts: dict[str, Path], device: torch.device) -> None:
    for name in CASES:
        case, arrays = golden_case(name)
        path = ckpts[case["variant"]]
        processor = NVILAProcessor.from_pretrained(path)
        model = NVILAForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32, device=device)
        inputs, _ = processor.prepare([messages_of(case)], add_generation_prompt=True)
        inputs = inputs.to(device)
        with torch.inference_mode():
            logits = model(**inputs).logits[0, -2:].float().cpu()
            out = model.generate(**inputs, max_new_tokens=case["max_new_tokens"], do_sample=False)
        err = (logits - torch.from_numpy(arrays["logits_last2"])).abs().max().item()
        t.add("parity", f"{name}: logits max |Δ| (CPU criterion {TOL:g})", f"{err:.2e}", None if err > TOL else True)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        t.add("parity", f"{name}: greedy ids = golden", f"{len(new)} ids", new == case["generated_ids"])


def check_engine(t: Table, ckpts: dict[str, Path], device: torch.device, dtypes: list[torch.dtype]) -> None:
    cases = {name: golden_case(name)[0] for name in CASES}

    def ids(engine: Engine, case: dict, handles: list | None = None):
        h = engine.submit(GenerationRequest(messages=messages_of(case), max_tokens=case["max_new_tokens"]))
        return h if handles is not None else (h.text(), h.token_ids)[1]

    for dtype in dtypes:
        label = str(dtype).removeprefix("torch.")
        engines = {v: Engine.from_pretrained(ckpts[v], dtype=dtype, device=device) for v in VARIANTS}
        try:
            alone = {name: ids(engines[c["variant"]], c) for name, c in cases.items()}
            if dtype == torch.float32:
                for name, c in cases.items():
                    t.add("engine", f"{name}: float32 engine ids = golden", f"{len(alone[name])} ids",
                          alone[name] == c["generated_ids"])
            batch = {name: ids(engines[c["variant"]], c, []) for name, c in cases.items()}  # submitted together
            for h in batch.values():
                h.text()
            same = sum(batch[name].token_ids == alone[name] for name in cases)
            t.add("engine", f"{label}: requests submitted together = one at a time", f"{same}/{len(cases)}",
                  same == len(cases))
        finally:
            for e in engines.values():
                e.shutdown()


def check_quant(t: Table, ckpts: dict[str, Path], device: torch.device, work: Path) -> None:
    from nvila.quant.handler import QuantPlan, quantize_checkpoint
    from nvila.quant.linear import W4A16Linear, W8A8Linear

    plan = QuantPlan(vision="w8a8", projector="w8a8", llm="w4a16")
    try:
        q = quantize_checkpoint(ckpts["nvila"], work / "nvila-q", plan, device=device, n_samples=8, seq_len=128,
                                n_tiles=2, calib_images=[GOLDEN / "inputs" / "image_1000x700.png"])
        engine = Engine.from_pretrained(q, dtype=torch.float32, device=device)
        try:
            case = golden_case("nvila__image")[0]
            h = engine.submit(GenerationRequest(messages=messages_of(case), max_tokens=8))
            h.text()
            t.add("quant", "nvila quantize W8A8/W8A8/W4A16 + engine decode", f"{len(h.token_ids)} tokens",
                  h.finish_reason in ("stop", "length"))
        finally:
            engine.shutdown()
    except Exception as e:  # a kernel missing on this device is a finding, reported as such
        t.add("quant", "nvila quantize W8A8/W8A8/W4A16 + engine decode", f"{type(e).__name__}: {str(e)[:60]}", False)
    torch.manual_seed(0)
    for make, name in ((W8A8Linear.from_float, "w8a8"), (lambda lin: W4A16Linear.from_float(lin, 128), "w4a16")):
        linear = torch.nn.Linear(1536, 8960, bias=False).float()
        x = torch.randn(4, 1536)
        try:
            ql = make(linear).to(device)
            got = ql(x.to(device)).float().cpu()
            ref = torch.nn.functional.linear(x, linear.weight)
            rel = ((got - ref).norm() / ref.norm()).item()
            t.add("quant", f"{name} kernel vs float F.linear, relative error", f"{rel:.3e}", rel < 0.1)
        except Exception as e:
            t.add("quant", f"{name} kernel on {device.type}", f"{type(e).__name__}: {str(e)[:60]}", False)


def check_fp8(t: Table, device: torch.device, quick: bool) -> None:
    from nvila.train.fp8 import E4M3, fp8_linear, fp8_mm, quantize

    torch.manual_seed(0)
    n, k, m = (256, 256, 512) if quick else (4096, 1536, 8960)  # tokens, in, out (Qwen2-1.5B MLP up)
    x, w = torch.randn(n, k, device=device), torch.randn(m, k, device=device) * 0.02
    qx, qw = quantize(x, E4M3), quantize(w, E4M3)
    fused = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    got = fp8_mm(qx, qw, transpose_b=True, out_dtype=torch.float32)
    ref = qx.dequantize(torch.float32) @ qw.dequantize(torch.float32).t()
    rel = ((got - ref).norm() / ref.norm()).item()
    t.add("fp8", f"fp8_mm ({'_scaled_mm' if fused else 'dequantize + matmul'}) vs float32, relative error",
          f"{rel:.2e}", rel <= 1e-3)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    grad = torch.randn(n, m, device=device, dtype=dtype)

    def ms(fn) -> float:
        for _ in range(3):  # warm-up
            fn(xs, ws).backward(grad)
        times = []
        for _ in range(5 if quick else 20):
            sync(device)
            t0 = time.perf_counter()
            fn(xs, ws).backward(grad)
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    plain, fp8 = ms(torch.nn.functional.linear), ms(fp8_linear)
    label = str(dtype).removeprefix("torch.")
    t.add("fp8", f"linear {n}x{k}->{m} fwd+bwd: {label} F.linear / fp8_linear", f"{plain:.2f} / {fp8:.2f} ms")


def profile_ttft(model, processor, messages, device: torch.device, path: Path) -> None:
    """The operators of one prompt's prefill (tower, projector, LLM) and 3 eager decode steps
    through ``model.generate``, by device time and by host time (torch.profiler tables)."""
    from torch.profiler import ProfilerActivity, profile

    inputs, _ = processor.prepare([messages], add_generation_prompt=True)
    inputs = inputs.to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        sync(device)
    by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=by, row_limit=40) + "\n\n"
                    + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def check_speed(t: Table, device: torch.device, quick: bool, profile_path: Path | None = None) -> None:
    import bench_engine as B

    cuda = device.type == "cuda"  # elsewhere the engine decodes eagerly already: no second engine
    dtype = torch.bfloat16 if cuda else torch.float32
    new_tokens, pairs = (8, 1) if quick else (64, 3)
    model, processor, engine = B.build_nvila_lite_2b(None)
    engine.shutdown()
    model = model.to(device=device, dtype=dtype)
    config = EngineConfig(max_batch_size=1, max_seq_len=2048, vision_cache_size=0, prefix_cache_mib=0)
    engine = Engine(model.eval(), processor, config)
    eager = Engine(model, processor, EngineConfig(**{**config.__dict__, "cuda_graphs": False})) if cuda else None
    image = B.test_image(896)
    qwen = B.build_qwen2vl_2b().to(device=device, dtype=dtype)
    prompt_ids = processor.tokenizer(B.PROMPT)["input_ids"]

    def qwen_run(prompt: list[int] = prompt_ids):
        t0 = time.perf_counter()
        pixels, grid, ids = B.qwen2vl_inputs(image, prompt)
        clock = B.StepClock()
        with torch.inference_mode():
            qwen.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                          pixel_values=pixels.to(device, dtype), image_grid_thw=grid.to(device),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                          pad_token_id=0)
        return clock.times[0] - t0, B._decode_rate(clock.times)

    def ours_run(e: Engine, text: str = B.PROMPT):  # (TTFT, decode tok/s, submit -> prefill start, encode + prefill)
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
        h = e.submit(GenerationRequest(messages=msgs, max_tokens=new_tokens, ignore_eos=True))
        h.text()
        m = h.metrics
        return m.ttft_s, m.decode_tokens_per_s, m.queue_s, m.prefill_s

    try:
        ours_run(engine), qwen_run()  # warm-up: kernels, allocator, decode graphs
        if cuda:
            ours_run(eager)
        ours, theirs, plain = [], [], []
        for _ in range(pairs):
            sync(device)
            ours.append(ours_run(engine))
            sync(device)
            theirs.append(qwen_run())
            if cuda:
                sync(device)
                plain.append(ours_run(eager))
        med = [[statistics.median(r[i] for r in rs) for i in range(len(rs[0]))] for rs in (ours, theirs, plain) if rs]
        label = str(dtype).removeprefix("torch.")
        t.add("speed", f"TTFT 896x896, NVILA-Lite-2B ({label}) / Qwen2-VL-2B", f"{med[0][0]:.3f} s / {med[1][0]:.3f} s")
        t.add("speed", "TTFT ratio (Qwen2-VL / ours)", f"{med[1][0] / med[0][0]:.2f}x")
        t.add("speed", "TTFT parts: submit->prefill / encode+prefill / rest",
              f"{med[0][2]:.3f} / {med[0][3]:.3f} / {med[0][0] - med[0][2] - med[0][3]:.3f} s")
        t.add("speed", f"decode tok/s batch 1, NVILA-Lite-2B ({'CUDA graphs' if cuda else 'eager'}) / Qwen2-VL-2B",
              f"{med[0][1]:.1f} / {med[1][1]:.1f}")
        if cuda:
            t.add("speed", "decode tok/s batch 1, NVILA-Lite-2B eager", f"{med[2][1]:.1f}")
        # a prompt of a length not seen before each time: kernels that plan per shape pay here
        texts = [f"{B.PROMPT} {' '.join(['and'] * (i + 1))}" for i in range(2 * pairs)]
        fresh = [(ours_run(engine, texts[2 * i])[0], qwen_run(processor.tokenizer(texts[2 * i + 1])["input_ids"])[0])
                 for i in range(pairs)]
        t.add("speed", "TTFT, a new prompt length each run: ours / Qwen2-VL-2B",
              " / ".join(f"{statistics.median(r[i] for r in fresh):.3f} s" for i in range(2)))
        if profile_path is not None:
            messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": B.PROMPT}]}]
            profile_ttft(model, processor, messages, device, profile_path)
    finally:
        engine.shutdown()
        if eager is not None:
            eager.shutdown()


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and one pair in the speed section")
    ap.add_argument("--json", type=Path, help="also write the table here")
    ap.add_argument("--profile", type=Path, help="speed section: write torch.profiler tables of one prompt here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write("gpu_check: error: no CUDA device (torch.cuda.is_available() is False); use --device cpu "
                         "for a dry run\n")
        return 2
    sections = args.sections.split(",")
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.stderr.write(f"gpu_check: error: unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}\n")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sys.stdout.write(f"gpu_check on {name}, torch {torch.__version__}\n")
    t = Table()
    dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory(prefix="nvila-gpu-check-") as tmp:
        work = Path(tmp)
        tokenizer = unpack_tokenizer(work / "tokenizer")
        ckpts = {v: build_checkpoint(v, work / v, tokenizer) for v in VARIANTS}
        run = {"parity": lambda: check_parity(t, ckpts, device),
               "engine": lambda: check_engine(t, ckpts, device, dtypes),
               "quant": lambda: check_quant(t, ckpts, device, work),
               "fp8": lambda: check_fp8(t, device, args.quick),
               "speed": lambda: check_speed(t, device, args.quick, args.profile)}
        for section in SECTIONS:
            if section not in sections:
                continue
            try:
                run[section]()
            except Exception as e:  # one section's failure is a row; the others still run
                traceback.print_exc()
                t.add(section, "section raised", f"{type(e).__name__}: {str(e)[:60]}", False)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": t.rows}, indent=1))
    sys.stdout.write(f"{len(t.rows)} checks, {t.failed} failed\n")
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main())
