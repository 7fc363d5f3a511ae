"""Issue 4 benchmark: quantized vs fp32 NVILA on the CPU, paired side by side in one run.

    .venv/bin/python benchmarks/bench_quant.py [--quick] [--threads 1] [--skip-llamacpp]

Model: NVILA-Lite-2B shapes with random weights (SigLIP-so400m tower: hidden 1152, 27 layers, 16 heads,
MLP 4304, 448 tiles; projector mlp_downsample_3x3_fix; Qwen2-1.5B: hidden 1536, 28 layers, 12/2 heads,
MLP 8960, vocab 151936, tied embeddings). Quantized modules are built by round-to-nearest from the
fp32 weights, with an explicit ``input_scale`` wherever the real pipeline keeps one (GQA ``o_proj``,
vision ``fc2``, projector linears after GELU): the SmoothQuant/AWQ searches change the values, not the
work, and would take an hour on this CPU at this size. Non-linear weights are shared with the fp32
model, so the fp32 model plus one quantized variant stay under ~11 GiB.

Sections (every ratio is the median over paired repetitions, fp32 and quantized alternating):
  a. vision tower, seconds per 448 tile: W8A8 vs fp32;
  b. LLM decode tokens/s at batch 1: W4A16 and W8A8 (lm_head fp32 and W8A8) vs fp32, plus each as a
     fraction of the bandwidth bound (copy bandwidth measured here / weight bytes read per token);
  c. TTFT for one 896x896 image (5 tiles, 605 visual tokens) and a short prompt;
  d. llama.cpp (llama-cpp-python) Q8_0 / Q4_0 decode on the same LLM, converted with ``gguf``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from common import copy_bandwidth_gbs, cpu_report
from nvila.config import LLMConfig, NVILAConfig, TokenIds, VisionConfig
from nvila.llm import reset_llm_buffers
from nvila.model import NVILAForConditionalGeneration
from nvila.quant.groups import projector_groups, qwen2_groups, siglip_groups
from nvila.quant.linear import QuantLinear, W4A16Linear, W8A8Linear, pick_group_size, w8a8_cpu_kernel_names

IMAGE_TOKEN, VIDEO_TOKEN = 151646, 151647


def lite_2b_config() -> NVILAConfig:
    llm = LLMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    return NVILAConfig(llm=llm, vision=VisionConfig(), image_aspect_ratio="dynamic",
                       projector_type="mlp_downsample_3x3_fix", s2_scales=None)


def build_fp32(config: NVILAConfig) -> NVILAForConditionalGeneration:
    ids = TokenIds(image=IMAGE_TOKEN, video=VIDEO_TOKEN, pad=0, stop=(), newline=(198,),
                   vocab_size=config.llm.vocab_size)
    model = NVILAForConditionalGeneration.on_meta(config, ids).materialize("cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layernorm" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def shared_copy(fp: NVILAForConditionalGeneration) -> NVILAForConditionalGeneration:
    """A second model object whose tensors are the fp32 model's own (no weight memory)."""
    q = NVILAForConditionalGeneration.on_meta(fp.config, fp.ids)
    q.load_state_dict(fp.state_dict(), assign=True)
    reset_llm_buffers(q.llm, "cpu")
    q.vision_tower.reset_buffers("cpu")
    return q.eval()


def _swap(root: nn.Module, groups, make) -> None:
    for g in groups:
        for name in g.linears:
            parent_name, _, attr = name.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            lin = getattr(parent, attr)
            scale = torch.ones(lin.in_features) if g.prev is None else None
            setattr(parent, attr, make(lin, scale))


def w8(lin, scale):
    return W8A8Linear.from_float(lin, input_scale=scale)


def w4(lin, scale):
    return W4A16Linear.from_float(lin, pick_group_size(lin.in_features), input_scale=scale)


def quantized(fp, *, vision: bool, llm, lm_head: bool) -> NVILAForConditionalGeneration:
    q = shared_copy(fp)
    if vision:
        used = q.vision_tower.vision_model.encoder.layers[: q.config.vision.num_layers_used]
        for layer in used:
            _swap(layer, siglip_groups(layer), w8)
        _swap(q.mm_projector, projector_groups(q.mm_projector), w8)
    if llm is not None:
        for layer in q.llm.model.layers:
            _swap(layer, qwen2_groups(layer), llm)
    if lm_head:
        q.llm.lm_head = W8A8Linear.from_float(q.llm.lm_head)
    return q


# ------------------------------------------------------------------------------------ measurements
def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every LLM linear and norm, as the kernels store them."""
    total = 0
    for m in model.llm.modules():
        if isinstance(m, W4A16Linear):  # int4-pack codes + bf16 (scale, zero) pairs
            total += m.in_features * m.out_features // 2 + m.scales.numel() * 4
        elif isinstance(m, W8A8Linear):
            total += m.qweight.numel() + m.scales.numel() * 4
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        if isinstance(m, (nn.Linear, QuantLinear)) and m.bias is not None:
            total += m.bias.numel() * 4
    total += sum(p.numel() * 4 for n, p in model.llm.named_parameters() if "norm" in n)
    return total


class _Clock:
    def __init__(self):
        self.times = []

    def put(self, _ids):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode_tps(model, prompt: torch.Tensor, new: int) -> float:
    clock = _Clock()
    model.generate(prompt, max_new_tokens=new, streamer=clock)
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def vision_seconds(model, tiles: torch.Tensor) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model.vision_tower(tiles)
        return (time.perf_counter() - t) / tiles.shape[0]


def ttft(model, inputs: dict) -> float:
    clock = _Clock()
    t = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, streamer=clock)
    return clock.times[0] - t


def paired(fp_fn, q_fn, reps: int) -> tuple[float, float, float]:
    """Alternate fp32 and quantized runs; medians of each and of the per-pair ratios (fp/q time)."""
    a, b = [], []
    for _ in range(reps):
        a.append(fp_fn())
        b.append(q_fn())
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def image_inputs(config: NVILAConfig) -> dict:
    """One 896x896 image (Lite tiling: 2x2 tiles + thumbnail) and a short prompt, as input_ids."""
    from PIL import Image

    from nvila import tiling
    from nvila.projector import tokens_per_tile

    g = torch.Generator().manual_seed(1)
    arr = (torch.rand(896, 896, 3, generator=g) * 255).to(torch.uint8).numpy()
    tiles, _ = tiling.preprocess_image(Image.fromarray(arr), config.image_aspect_ratio, tile=448, scales=None,
                                       min_tiles=config.min_tiles, max_tiles=config.max_tiles, single=True)
    pixels = tiling.to_pixels(tiles, 448, config.image_mean, config.image_std)  # (5, 3, 448, 448)
    per_tile = tokens_per_tile(config.projector_type, config.vision.grid)
    ids = torch.randint(0, 150000, (1, 12), generator=g).tolist()[0]
    for _ in range(pixels.shape[0]):
        ids += [IMAGE_TOKEN] * per_tile + [198]
    ids += torch.randint(0, 150000, (16,), generator=g).tolist()
    return {"input_ids": torch.tensor([ids]), "pixel_values": pixels, "image_block_sizes": [None] * pixels.shape[0]}


# --------------------------------------------------------------------------------------- llama.cpp
def write_gguf(model, path: Path) -> None:
    """The LLM as an F32 qwen2 GGUF (dummy vocabulary; the tensors are ours)."""
    import gguf

    cfg = model.config.llm
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(4096)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    tokens = ["a", "b", "ab"] + [f"<t{i}>" for i in range(3, cfg.vocab_size)]
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * cfg.vocab_size)
    w.add_token_merges(["a b"])
    w.add_eos_token_id(2)
    w.add_bos_token_id(2)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    llm = model.llm.model
    w.add_tensor("token_embd.weight", llm.embed_tokens.weight.detach().numpy())
    w.add_tensor("output_norm.weight", llm.norm.weight.detach().numpy())
    for i, layer in enumerate(llm.layers):
        for ours, theirs in names.items():
            mod = layer.get_submodule(ours)
            w.add_tensor(f"blk.{i}.{theirs}.weight", mod.weight.detach().numpy())
            if getattr(mod, "bias", None) is not None:
                w.add_tensor(f"blk.{i}.{theirs}.bias", mod.bias.detach().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llamacpp_decode(model, threads: int, new: int, reps: int) -> dict[str, float] | str:
    """Decode tok/s of llama.cpp Q8_0 and Q4_0, or the reason it could not run."""
    try:
        import llama_cpp
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); pip install 'nvila[bench]'"
    out = {}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        f32 = Path(tmp) / "f32.gguf"
        write_gguf(model, f32)
        for qtype, ftype in (("Q8_0", 7), ("Q4_0", 2)):
            qpath = Path(tmp) / f"{qtype}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.nthread = threads
            if llama_cpp.llama_model_quantize(str(f32).encode(), str(qpath).encode(), params) != 0:
                return f"llama.cpp could not quantize the GGUF to {qtype}"
            llm = llama_cpp.Llama(str(qpath), n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
            rates = []
            for _ in range(reps):
                llm.reset()
                llm.eval(list(range(10, 42)))
                t = time.perf_counter()
                for i in range(new):
                    llm.eval([100 + i])
                rates.append(new / (time.perf_counter() - t))
            out[qtype] = statistics.median(rates)
            out[qtype + "_bytes"] = qpath.stat().st_size
            del llm
            qpath.unlink()
    return out


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and tokens")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-llamacpp", action="store_true")
    args = ap.parse_args()
    print(f"CPU: {cpu_report()}", flush=True)
    torch.set_num_threads(args.threads)
    reps = 2 if args.quick else 3
    new = 8 if args.quick else 24
    print(f"# bench_quant {time.strftime('%Y-%m-%d %H:%M:%S')}  threads={args.threads} quick={args.quick}  "
          f"torch {torch.__version__}  w8a8 kernels (1 row, 2-3 rows, 4+ rows)={w8a8_cpu_kernel_names()}")
    print(f"# load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    config = lite_2b_config()
    fp = build_fp32(config)
    bw = copy_bandwidth_gbs(7)
    print(f"copy bandwidth: {bw:.1f} GB/s (1 thread, 256 MiB, read+write)")

    # a. vision tower
    qv = quantized(fp, vision=True, llm=None, lm_head=False)
    tiles = torch.randn(1, 3, 448, 448)
    vision_seconds(qv, tiles)
    f, q, r = paired(lambda: vision_seconds(fp, tiles), lambda: vision_seconds(qv, tiles), reps)
    print(f"a. vision tower per 448 tile: fp32 {f:.2f} s, W8A8 {q:.2f} s, speedup {r:.2f}x (target 1.6x)")

    # b. LLM decode, one quantized variant alive at a time
    prompt = torch.randint(0, 150000, (1, 32), generator=torch.Generator().manual_seed(2))
    fp_bytes = decode_bytes(fp)
    decode_tps(fp, prompt, 2)
    print(f"b. decode, batch 1, {new} tokens after a 32-token prompt; fp32 reads {fp_bytes / 1e9:.2f} GB/token "
          f"(bound {bw * 1e9 / fp_bytes:.2f} tok/s)")
    for label, scheme, head in (("W4A16", w4, False), ("W8A8", w8, False), ("W4A16+head8", w4, True),
                                ("W8A8+head8", w8, True)):
        del qv
        gc.collect()
        qv = quantized(fp, vision=False, llm=scheme, lm_head=head)
        decode_tps(qv, prompt, 2)
        f, q, r = paired(lambda: decode_tps(fp, prompt, new), lambda: decode_tps(qv, prompt, new), reps)
        qb = decode_bytes(qv)
        bound = bw * 1e9 / qb
        print(f"   {label:12s} {q:6.2f} tok/s vs fp32 {f:5.2f} tok/s: {1 / r:.2f}x fp32 (target 3x); "
              f"{qb / 1e9:.2f} GB/token, bound {bound:.1f} tok/s, {q / bound:.0%} of bound (fp32 at {f / (bw * 1e9 / fp_bytes):.0%})")

    # c. TTFT: deployment recipe (W8A8 tower + projector, W4A16 LLM) and the all-W8A8 variant
    inputs = image_inputs(config)
    for label, scheme in (("W8A8 vision + W4A16 LLM", w4), ("W8A8 vision + W8A8 LLM", w8)):
        del qv
        gc.collect()
        qv = quantized(fp, vision=True, llm=scheme, lm_head=False)
        f, q, r = paired(lambda: ttft(fp, inputs), lambda: ttft(qv, inputs), 1 if args.quick else 2)
        print(f"c. TTFT, 896x896 image ({inputs['input_ids'].shape[1]} prompt tokens), {label}: fp32 {f:.1f} s, "
              f"quantized {q:.1f} s, speedup {r:.2f}x (target 1.4x)")
    del qv
    gc.collect()

    # d. llama.cpp peer
    if args.skip_llamacpp:
        return
    res = llamacpp_decode(fp, args.threads, new, reps)
    if isinstance(res, str):
        print(f"d. llama.cpp: not run: {res}")
        return
    for qtype in ("Q8_0", "Q4_0"):
        b = res[qtype + "_bytes"]
        print(f"d. llama.cpp {qtype}: {res[qtype]:.2f} tok/s, file {b / 1e9:.2f} GB, "
              f"{res[qtype] / (bw * 1e9 / b):.0%} of its bound")


if __name__ == "__main__":
    main()
