"""Issue 23 benchmark e: checkpoints made by ``nvila quantize`` against fp32 and transformers' Qwen2-VL-2B.

    python benchmarks/bench_quant_ckpt.py            # full run: ~1 h on 2 idle cores, peak ~19 GiB RSS
    python benchmarks/bench_quant_ckpt.py --quick    # calibration 8x128 / 4 tiles / 256 rows, 1 pair: ~40 min
    python benchmarks/bench_quant_ckpt.py --tiny     # toy shapes: a smoke test of the whole path (~30 s)

Time goes mostly to ``nvila quantize``'s AWQ searches: ~50 s per Qwen2-1.5B layer at 1 thread with the
default calibration here (16 x 256 tokens, 512 search rows), so ~25 min for the W4A16 checkpoint; the
W8A8 one takes ~5 min. The measurements take ~25 min (TTFT rounds of ~35 s fp32, ~60 s Qwen2-VL).

Unlike ``bench_quant.py`` (round-to-nearest copies built in memory), every quantized model here comes
from a checkpoint that the real pipeline wrote:

1. a random NVILA-Lite-2B-shaped fp32 model (SigLIP-so400m tower, ``mlp_downsample_3x3_fix``,
   Qwen2-1.5B, vocab 151936, tied embeddings; ~8.8 GB) is saved in the published layout with
   ``save_pretrained``. Its tokenizer is the small benchmark BPE (``nvila.tiny.build_tokenizer``)
   padded with unreachable entries to 151936 ids, so loading keeps the full-size embedding;
2. ``nvila quantize`` (``nvila.cli.main``) writes two checkpoints from it: W8A8 (SmoothQuant) vision
   tower + projector with an AWQ W4A16 LLM ("w8a8_w4a16"), and the same with a SmoothQuant W8A8 LLM
   ("w8a8"). The calibration is small by default (``--calib-*``, ``--search-tokens`` raise it); the
   bundled calibration prose tokenizes into mostly single bytes with the small tokenizer, so it only
   touches ~1k embedding rows: the statistics are those of random weights either way, and the
   pipeline (capture, SmoothQuant, AWQ searches, format, save) is the real one;
3. the checkpoints are loaded with ``from_pretrained`` and measured side by side in one process,
   sides alternating (medians of the per-pair ratios):
   a. vision tower seconds per 448 tile, fp32 vs each quantized tower (target >= 1.6x);
   b. TTFT of one 896x896 image (5 tiles) + prompt through ``Engine`` (prefix and vision caches off),
      fp32 vs quantized;
   c. the same request on transformers' Qwen2-VL-2B shape (fp32, random weights) vs NVILA fp32
      (target >= 2x) and vs the quantized checkpoints (target >= 3x for W8A8). As in bench_engine,
      NVILA's TTFT includes its processor (tiling); Qwen2-VL's includes only the patch layout.
   The tower is timed on the main thread and TTFT on the engine's scheduler thread: pass ``--threads``
   to pin both to the same torch thread count.
   Memory: the fp32 NVILA and Qwen2-VL models are never alive with both quantized ones, so the
   peak stays near bench_engine's (~18 GiB). The kernels that ran are read off the quantized modules.

Every run prints the CPU model and ISA flags, the torch CPU capability, the quantized engine and the
W4A16 kernel that ``NVILA_W4A16_CPU_KERNEL`` (default ``auto``) resolves to, and ends with one JSON
object. The temporary checkpoints are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from bench_engine import VOCAB, qwen2vl_inputs, random_init_, run_qwen2vl, test_image
from common import cpu_report
from nvila import NVILAConfig, NVILAForConditionalGeneration, NVILAProcessor
from nvila.checkpoint import save_pretrained, token_ids
from nvila.cli import main as nvila_main
from nvila.config import LLM_PRESETS, VisionConfig
from nvila.engine import Engine, EngineConfig, GenerationRequest
from nvila.quant import linear as qlinear
from nvila.tiny import build_tokenizer, tiny_config

PROMPT = "Describe the image in detail."
VARIANTS = {  # name -> nvila quantize flags
    "w8a8_w4a16": ["--vision", "w8a8", "--projector", "w8a8", "--llm", "w4a16"],
    "w8a8": ["--vision", "w8a8", "--projector", "w8a8", "--llm", "w8a8"],
}
TARGETS = {"tower_speedup": 1.6, "qwen2vl_vs_fp32": 2.0, "qwen2vl_vs_w8a8": 3.0}


# ------------------------------------------------------------------------------------ checkpoints
def padded_tokenizer(vocab_size: int):
    """The small benchmark BPE with unreachable entries appended so that ``len(tok) == vocab_size``
    (``from_pretrained`` resizes the embedding to the tokenizer's length, as the reference does)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    small = build_tokenizer()
    state = json.loads(small.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<bench_unused_{i}>"] = i
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                  bos_token=small.bos_token, eos_token=small.eos_token, pad_token=small.pad_token,
                                  model_max_length=small.model_max_length, padding_side="right")
    tok.chat_template = small.chat_template
    if len(tok) != vocab_size:
        raise RuntimeError(f"padded tokenizer has {len(tok)} ids, expected {vocab_size}")
    return tok


def nvila_config(tiny: bool) -> NVILAConfig:
    if tiny:  # the tiny nvila-lite family, LLM widened to 128 so W4A16 keeps group size 128
        cfg = tiny_config("nvila-lite", 4096)
        return replace(cfg, llm=replace(cfg.llm, hidden_size=128, intermediate_size=256))
    llm = LLM_PRESETS[1536]
    return NVILAConfig(llm=replace(llm, vocab_size=VOCAB), vision=VisionConfig(),
                       projector_type="mlp_downsample_3x3_fix", image_aspect_ratio="dynamic", s2_scales=None)


def write_fp32_checkpoint(out: Path, tiny: bool) -> Path:
    """Random fp32 NVILA-Lite-2B (or tiny) in the published layout, with the padded tokenizer."""
    cfg = nvila_config(tiny)
    tok = padded_tokenizer(cfg.llm.vocab_size)
    ids = token_ids(tok, tok.chat_template)
    model = NVILAForConditionalGeneration.on_meta(cfg, ids).materialize("cpu", torch.float32)
    random_init_(model)
    path = save_pretrained(model, tok, out, metadata={"nvila_weights": "random"})
    del model
    gc.collect()
    return path


def quantize(fp_dir: Path, out: Path, flags: list[str], args) -> float:
    """``nvila quantize`` through its Python entry; returns the wall time in seconds."""
    argv = ["quantize", "--model", str(fp_dir), "--out", str(out), *flags, "--json",
            "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
            "--calib-tiles", str(args.calib_tiles), "--search-tokens", str(args.search_tokens)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    t = time.perf_counter()
    rc = nvila_main(argv)
    if rc != 0:
        raise RuntimeError(f"nvila {' '.join(argv)} exited with {rc}")
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------ measurements
class Side:
    """One loaded checkpoint with its processor and engine (no prefix or vision-feature cache)."""

    def __init__(self, path: Path, threads: int | None):
        self.model = NVILAForConditionalGeneration.from_pretrained(path)
        self.processor = NVILAProcessor.from_pretrained(path)
        self.engine = Engine(self.model, self.processor,
                             EngineConfig(max_batch_size=1, max_seq_len=2048, threads=threads,
                                          vision_cache_size=0, prefix_cache_mib=0))

    def tower_seconds(self, tiles: torch.Tensor) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            self.model.vision_tower(tiles)
            return (time.perf_counter() - t) / tiles.shape[0]

    def ttft(self, messages) -> float:
        h = self.engine.submit(GenerationRequest(messages=messages, max_tokens=1, ignore_eos=True))
        h.text()
        return h.metrics.ttft_s

    def close(self) -> None:
        self.engine.shutdown()
        del self.engine, self.model, self.processor


def rotate(fns: dict, pairs: int) -> dict[str, list[float]]:
    """Run every side once per round, in order, for ``pairs`` rounds (after one untimed warm-up)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(pairs):
        for name, fn in fns.items():
            times[name].append(fn())
    return times


def ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of slow / fast (the speedup of ``fast``)."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def build_qwen2vl(tiny: bool):
    """transformers' Qwen2-VL with the 2B shape (or a toy one), random fp32 weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if tiny:
        text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, mrope_section=[4, 6, 6])
        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4)
    else:
        text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, mrope_section=[16, 24, 24])
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16)
    section = text.pop("mrope_section")
    cfg = Qwen2VLConfig(
        text_config=dict(**text, vocab_size=VOCAB, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}),
        vision_config=dict(**vision, mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           in_channels=3),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(cfg)
    random_init_(model)
    return model.eval()


def kernels_ran(model) -> dict[str, int]:
    """Count of the runtime kernels the quantized linears built at their first forward (read off the
    modules' private kernel objects: there is no public accessor)."""
    seen = Counter()
    for m in model.modules():
        if isinstance(m, qlinear.QuantLinear) and m._kernel is not None:
            k = m._kernel
            if isinstance(k, qlinear._W8A8Cpu):
                ran = sorted(k.packed) + ([f"nvila {k.names[0]} GEMV"] if k.gemv_ok else [])
                name = f"w8a8: {' + '.join(ran)}"
            elif isinstance(k, qlinear._W4A16Avx2):
                name = f"w4a16: nvila {qlinear.w4a16_cpu_kernel_name(m.group_size)} (cpu_kernels.cpp)"
            elif isinstance(k, qlinear._W4A16Int4Pack):
                name = "w4a16: torch _weight_int4pack_mm_for_cpu (bf16)"
            else:
                name = f"{m.scheme}: {type(k).__name__}"
            seen[name] += 1
    return dict(seen)


def kernel_choice() -> dict:
    """What the ISA and settings pick, before anything runs."""
    return {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "NVILA_W8A8_CPU_KERNEL": os.environ.get("NVILA_W8A8_CPU_KERNEL", "auto"),
            "w8a8_kernels_1_2to3_4plus_rows": qlinear.w8a8_cpu_kernel_names(),
            "NVILA_W4A16_CPU_KERNEL": os.environ.get("NVILA_W4A16_CPU_KERNEL", "auto"),
            "w4a16_kernel_g128": qlinear.w4a16_cpu_kernel_name(128)}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# -------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller calibration, 1 pair")
    ap.add_argument("--tiny", action="store_true", help="toy model shapes: a smoke test of the code path")
    ap.add_argument("--pairs", type=int, default=3, help="timed rounds per comparison (default 3; --quick/--tiny: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--calib-samples", type=int, default=16, help="nvila quantize --calib-samples (default 16)")
    ap.add_argument("--calib-seq-len", type=int, default=256, help="nvila quantize --calib-seq-len (default 256)")
    ap.add_argument("--calib-tiles", type=int, default=8, help="nvila quantize --calib-tiles (default 8)")
    ap.add_argument("--search-tokens", type=int, default=512, help="nvila quantize --search-tokens (default 512)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="quantized checkpoints to make and measure (default: both; w8a8 alone skips the "
                         "AWQ searches)")
    args = ap.parse_args()
    for name in set(VARIANTS) - set(args.variants):
        del VARIANTS[name]
    if args.quick or args.tiny:
        args.pairs = 1
        args.calib_samples, args.calib_seq_len = min(args.calib_samples, 8), min(args.calib_seq_len, 128)
        args.calib_tiles, args.search_tokens = min(args.calib_tiles, 4), min(args.search_tokens, 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_report()}", flush=True)
    kernels = kernel_choice()
    print(f"kernels: {json.dumps(kernels)}", flush=True)
    results: dict = {"cpu": cpu_report(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "tiny": args.tiny, "pairs": args.pairs, "kernels": kernels,
                     "calibration": {k: getattr(args, k) for k in ("calib_samples", "calib_seq_len", "calib_tiles",
                                                                     "search_tokens")}}

    def report(key: str, value) -> None:
        results[key] = value
        print(json.dumps({key: value}), flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench_quant_ckpt.", dir=args.workdir or "/tmp"))
    try:
        # 1-2. the fp32 checkpoint and the two quantized ones
        t = time.perf_counter()
        fp_dir = write_fp32_checkpoint(work / "fp32", args.tiny)
        report("write_fp32_s", round(time.perf_counter() - t, 1))
        paths = {"fp32": fp_dir}
        quantize_s = {}
        for name, flags in VARIANTS.items():
            paths[name] = work / name
            quantize_s[name] = round(quantize(fp_dir, paths[name], flags, args), 1)
            gc.collect()
        report("quantize_s", quantize_s)
        report("checkpoint_gib", {n: round(sum(f.stat().st_size for f in p.rglob("*.safetensors")) / 2**30, 2)
                                  for n, p in paths.items()})

        # 3a-b. fp32 and both quantized checkpoints: tower per tile, TTFT
        sides = {name: Side(p, args.threads) for name, p in paths.items()}
        tile = torch.randn(1, 3, 448, 448)
        tower = rotate({n: (lambda s=s: s.tower_seconds(tile)) for n, s in sides.items()}, args.pairs)
        report("a_tower_per_tile", {
            **{f"{n}_s": statistics.median(v) for n, v in tower.items()},
            **{f"{n}_speedup": ratio(tower["fp32"], tower[n]) for n in VARIANTS},
            "target": TARGETS["tower_speedup"]})

        image = test_image(896)
        msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]
        ttft = rotate({n: (lambda s=s: s.ttft(msgs)) for n, s in sides.items()}, args.pairs)
        inputs, _ = sides["fp32"].processor.prepare([msgs])
        report("b_ttft_896", {
            **{f"{n}_s": statistics.median(v) for n, v in ttft.items()},
            **{f"{n}_speedup": ratio(ttft["fp32"], ttft[n]) for n in VARIANTS},
            "prompt_tokens": inputs["input_ids"].shape[1]})
        report("kernels_ran", {n: kernels_ran(sides[n].model) for n in VARIANTS})

        # 3c. Qwen2-VL-2B shape: vs fp32 (quantized sides closed), then vs the quantized (fp32 closed)
        prompt_ids = [t for t in inputs["input_ids"][0].tolist() if t != sides["fp32"].model.ids.image]
        for n in VARIANTS:
            sides.pop(n).close()
        gc.collect()
        qwen = build_qwen2vl(args.tiny)
        qwen_ttft = lambda: run_qwen2vl(qwen, image, prompt_ids, 1)[0]  # noqa: E731
        vs_fp = rotate({"qwen2vl": qwen_ttft, "fp32": lambda: sides["fp32"].ttft(msgs)}, args.pairs)
        sides.pop("fp32").close()
        gc.collect()
        sides = {n: Side(paths[n], args.threads) for n in VARIANTS}
        vs_q = rotate({"qwen2vl": qwen_ttft, **{n: (lambda s=s: s.ttft(msgs)) for n, s in sides.items()}},
                      args.pairs)
        report("c_vs_qwen2vl_896", {
            "qwen2vl_s": statistics.median(vs_fp["qwen2vl"] + vs_q["qwen2vl"]),
            "qwen2vl_prompt_tokens": qwen2vl_inputs(image, prompt_ids)[2].shape[1],
            "fp32_s": statistics.median(vs_fp["fp32"]), "fp32_speedup": ratio(vs_fp["qwen2vl"], vs_fp["fp32"]),
            **{f"{n}_s": statistics.median(vs_q[n]) for n in VARIANTS},
            **{f"{n}_speedup": ratio(vs_q["qwen2vl"], vs_q[n]) for n in VARIANTS},
            "target_fp32": TARGETS["qwen2vl_vs_fp32"], "target_w8a8": TARGETS["qwen2vl_vs_w8a8"]})
        for s in sides.values():
            s.close()
        del qwen, sides
    finally:
        if args.keep:
            print(f"checkpoints kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["peak_rss_gib"] = round(peak_rss_gib(), 2)
    a, b, c = results["a_tower_per_tile"], results["b_ttft_896"], results["c_vs_qwen2vl_896"]
    print(f"a. tower per 448 tile: fp32 {a['fp32_s']:.3f} s; " + "; ".join(
        f"{n} {a[n + '_s']:.3f} s ({a[n + '_speedup']:.2f}x, target {a['target']}x)" for n in VARIANTS))
    print(f"b. 896x896 TTFT ({b['prompt_tokens']} tokens): fp32 {b['fp32_s']:.2f} s; " + "; ".join(
        f"{n} {b[n + '_s']:.2f} s ({b[n + '_speedup']:.2f}x)" for n in VARIANTS))
    print(f"c. 896x896 TTFT vs Qwen2-VL-2B shape ({c['qwen2vl_s']:.2f} s): fp32 {c['fp32_speedup']:.2f}x "
          f"(target {c['target_fp32']}x); " + "; ".join(
              f"{n} {c[n + '_speedup']:.2f}x (target {c['target_w8a8']}x)" for n in VARIANTS))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
