"""W4A16 decode kernels on the CPU, side by side: the seven GEMVs of one Qwen2-1.5B layer, batch 1, fp32 input.

    PYTHONPATH=src python benchmarks/bench_w4_kernels.py [--threads 1 2] [--reps 7] [--gb 1.0]
                                                         [--emulate-avx2] [--no-compile] [--sweep]

Shapes (N x K): q 1536x1536 (+bias), k and v 256x1536 (+bias), o 1536x1536, gate and up 8960x1536,
down 1536x8960; group size 128; random codes, scales and zero points. Candidates:

* ``fp32``: ``F.linear`` on dense fp32 weights (MKL);
* ``int4pack``: today's path, ``linear._W4A16Int4Pack`` (bf16 activations into
  ``_weight_int4pack_mm_for_cpu``, output back to fp32, bias added);
* ``inductor``: ``torch.compile`` of a dequantize-GEMV written in torch ops over the checkpoint's packed
  codes (fp32 math; the fp32 weight is never materialised if inductor fuses it, which it should);
* ``avx2-fp32``: ``torch.ops.nvila.w4a16_linear_f32`` (cpu_kernels.cpp; fp32 math);
* ``avx512-fp32``: ``w4a16_linear_f32_avx512``, the same with 512-bit vectors (only where torch's CPU
  capability is AVX512, so not under ``--emulate-avx2``);
* ``avx2-dyn16``: ``torch.ops.nvila.w4a16_linear_dyn16`` (activations int16 per row and group, int16 dots);
* ``avx2-dyn8``: ``torch.ops.nvila.w4a16_linear_dyn8`` (activations int8 per row and group, u8 x s8 dots).

"cold": each timed pass walks ``--gb`` GB of distinct layers (more than the last-level cache), so the
weights stream from DRAM as in decode; "hot": the same layer again and again (cache-resident, compute
bound). Every repetition runs all candidates in turn (A/B/C/...), and the table shows medians: µs per
token-layer (all seven GEMVs), GB/s of weight bytes as each kernel stores them, the ratio of today's
time to the candidate's (>1 = faster), and the fraction of the read-bandwidth bound (``torch.sum`` over
1 GiB, measured first at the same thread count). relerr: ||y - y_ref|| / ||y_ref|| against the
dequantize-then-``F.linear`` fp32 reference on layer 0 (none for ``fp32``, whose dense weights are others).

``--emulate-avx2`` sets ``ATEN_CPU_CAPABILITY=avx2`` (torch's own kernels, int4pack included, take their
AVX2 code, with bf16 converted in software), ``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2`` and
inductor's ``simdlen=256`` before torch is imported: an AVX2-only CPU such as AMD Zen 2, approximately
(the memory system stays this machine's). ``--sweep`` adds a batch sweep (M = 1..128, gate shape, hot) to
find where dequantize + MKL overtakes the GEMV kernels.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import time

SHAPES = (("q", 1536, 1536, True), ("k", 256, 1536, True), ("v", 256, 1536, True), ("o", 1536, 1536, False),
          ("gate", 8960, 1536, False), ("up", 8960, 1536, False), ("down", 1536, 8960, False))  # (name, N, K, bias)
GROUP = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--gb", type=float, default=1.0, help="distinct int4 weights walked per cold pass")
    ap.add_argument("--emulate-avx2", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the inductor candidate")
    ap.add_argument("--sweep", action="store_true", help="also time M = 1..128 on the gate shape")
    args = ap.parse_args()
    if args.emulate_avx2:
        os.environ.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    import torch  # after the environment is set
    from common import cpu_report  # imports torch too

    from nvila.quant.cpu_kernels import load_cpu_kernels

    print(f"# bench_w4_kernels {time.strftime('%Y-%m-%d %H:%M:%S')}  torch {torch.__version__}  "
          f"capability {torch.backends.cpu.get_cpu_capability()}  emulate_avx2={args.emulate_avx2}")
    print(f"# CPU: {cpu_report()}")
    print(f"# torch: avx512_bf16 {torch.cpu._is_avx512_bf16_supported()}, amx {torch.cpu._is_amx_tile_supported()}")
    print(f"# load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    t = time.perf_counter()
    if not load_cpu_kernels():
        print("not run: nvila's AVX2 kernels could not be built here (see the warning above)")
        return
    print(f"# nvila AVX2 kernels loaded in {time.perf_counter() - t:.1f} s")
    if args.emulate_avx2:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = 256
    Bench(args).run()


class Bench:
    def __init__(self, args):
        import torch
        import torch.nn.functional as F

        from nvila.quant.cpu_kernels import cpu_supports_avx512
        from nvila.quant.linear import W4A16Linear, _W4A16Int4Pack

        self.torch, self.F, self.args = torch, F, args
        torch.manual_seed(0)
        w4_bytes = sum(n * k // 2 + n * (k // GROUP) * 5 for _, n, k, _ in SHAPES)  # codes + fp32 scale + u8 zero
        fp_bytes = sum(n * k * 4 for _, n, k, _ in SHAPES)
        self.layers4 = max(2, math.ceil(args.gb * 1e9 / w4_bytes))
        self.layers32 = max(2, math.ceil(args.gb * 1e9 / fp_bytes))
        self.x = {k: torch.randn(1, k) for k in (1536, 8960)}
        self.mods = []  # [layer][shape] W4A16Linear
        for _ in range(self.layers4):
            layer = []
            for _, n, k, bias in SHAPES:
                m = W4A16Linear(k, n, group_size=GROUP, bias=bias)
                m.qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
                m.scales = torch.rand(n, k // GROUP) * 0.01 + 0.002
                m.zeros = torch.randint(0, 16, (n, k // GROUP), dtype=torch.uint8)
                if bias:
                    m.bias = torch.randn(n) * 0.1
                layer.append(m)
            self.mods.append(layer)
        self.dense = [[(torch.randn(n, k) * 0.02, torch.randn(n) * 0.1 if bias else None) for _, n, k, bias in SHAPES]
                      for _ in range(self.layers32)]
        pack = [[_W4A16Int4Pack(m, cuda=False) for m in layer] for layer in self.mods]
        self.int4pack_bytes = sum(n * k // 2 + n * (k // GROUP) * 4 for _, n, k, _ in SHAPES)  # bf16 pairs
        self.w4_bytes, self.fp_bytes = w4_bytes, fp_bytes
        ops = torch.ops.nvila

        def native(op):
            return [[(lambda x, m=m: op(x, m.qweight, m.scales, m.zeros, GROUP, m.bias)) for m in layer]
                    for layer in self.mods]

        self.avx512 = cpu_supports_avx512()  # torch capability AVX512: not under --emulate-avx2
        # name -> (per-layer lists of callables, weight bytes per token-layer)
        self.candidates = {
            "fp32": ([[(lambda x, w=w, b=b: F.linear(x, w, b)) for w, b in layer] for layer in self.dense], fp_bytes),
            "int4pack": (pack, self.int4pack_bytes),
            "avx2-fp32": (native(ops.w4a16_linear_f32), w4_bytes),
            **({"avx512-fp32": (native(ops.w4a16_linear_f32_avx512), w4_bytes)} if self.avx512 else {}),
            "avx2-dyn16": (native(ops.w4a16_linear_dyn16), w4_bytes),
            "avx2-dyn8": (native(ops.w4a16_linear_dyn8), w4_bytes),
        }
        self.pack = pack

    # ------------------------------------------------------------------------------------- helpers
    def inductor_candidate(self):
        torch = self.torch
        torch._dynamo.reset()
        torch._dynamo.config.cache_size_limit = 64

        def dequant_gemv(x, qweight, scales, zeros, bias):  # x (1, K) -> (1, N), fp32 math
            n, g = scales.shape
            half = qweight.shape[1] // g  # bytes per group
            lo = (qweight & 15).view(n, g, half).float()  # codes of even k
            hi = (qweight >> 4).view(n, g, half).float()  # codes of odd k
            xe, xo = x[0, 0::2].reshape(g, half), x[0, 1::2].reshape(g, half)
            dot = (lo * xe + hi * xo).sum(-1)  # (N, G)
            xsum = x.reshape(g, 2 * half).sum(-1)  # (G,)
            y = ((dot - zeros.float() * xsum) * scales).sum(-1)[None]
            return y if bias is None else y + bias

        fn = torch.compile(dequant_gemv, dynamic=False, fullgraph=True)
        t = time.perf_counter()
        layers = [[(lambda x, m=m: fn(x, m.qweight, m.scales, m.zeros, m.bias)) for m in layer] for layer in self.mods]
        for call, (_, _, k, _) in zip(layers[0], SHAPES):
            call(self.x[k])
        print(f"# inductor: compiled {len(SHAPES)} GEMVs in {time.perf_counter() - t:.0f} s "
              f"(threads {torch.get_num_threads()})")
        return layers, self.w4_bytes

    def relerr(self, calls) -> float:
        F = self.F
        num = den = 0.0
        for call, m, (_, _, k, _) in zip(calls, self.mods[0], SHAPES):
            x = self.x[k]
            ref = F.linear(x, m.dequantized_weight(), m.bias)
            num += float((call(x).float() - ref).square().sum())
            den += float(ref.square().sum())
        return math.sqrt(num / den)

    def read_bandwidth(self) -> float:
        torch = self.torch
        a = torch.ones(2**28)  # 1 GiB
        times = []
        for _ in range(5):
            t = time.perf_counter()
            a.sum()
            times.append(time.perf_counter() - t)
        return a.numel() * 4 / statistics.median(times) / 1e9

    def pass_time(self, layers, hot: bool) -> float:
        """Seconds per token-layer of one pass over the layers (cold) or over layer 0 repeatedly (hot)."""
        x = self.x
        order = [layers[0]] * 16 if hot else layers
        t = time.perf_counter()
        for layer in order:
            for call, (_, _, k, _) in zip(layer, SHAPES):
                call(x[k])
        return (time.perf_counter() - t) / len(order)

    # ---------------------------------------------------------------------------------------- runs
    def run(self) -> None:
        torch, args = self.torch, self.args
        print(f"# cold passes walk {self.layers4} int4 layers ({self.layers4 * self.w4_bytes / 1e9:.2f} GB) and "
              f"{self.layers32} fp32 layers ({self.layers32 * self.fp_bytes / 1e9:.2f} GB); {args.reps} repetitions")
        for threads in args.threads:
            torch.set_num_threads(threads)
            cands = dict(self.candidates)
            if not args.no_compile:
                cands["inductor"] = self.inductor_candidate()
            bw = statistics.median(self.read_bandwidth() for _ in range(3))
            errs = {name: self.relerr(layers[0]) for name, (layers, _) in cands.items() if name != "fp32"}
            with torch.inference_mode():
                for layers, _ in cands.values():  # warm-up
                    self.pass_time(layers, hot=True)
                times = {(name, hot): [] for name in cands for hot in (False, True)}
                for _ in range(args.reps):
                    for hot in (False, True):
                        for name, (layers, _) in cands.items():
                            times[(name, hot)].append(self.pass_time(layers, hot))
            print(f"\n## threads {threads}: read bandwidth (torch.sum, 1 GiB) {bw:.1f} GB/s")
            print("| kernel | weight MB/layer | cold µs | cold GB/s | × int4pack | of bound | hot µs | hot GB/s "
                  "| × int4pack | relerr |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            base = {hot: statistics.median(times[("int4pack", hot)]) for hot in (False, True)}
            for name, (_, nbytes) in cands.items():
                cold, hot = (statistics.median(times[(name, h)]) for h in (False, True))
                print(f"| {name} | {nbytes / 1e6:.1f} | {cold * 1e6:.0f} | {nbytes / cold / 1e9:.1f} | "
                      f"{base[False] / cold:.2f} | {nbytes / cold / 1e9 / bw:.0%} | {hot * 1e6:.0f} | "
                      f"{nbytes / hot / 1e9:.1f} | {base[True] / hot:.2f} | {format(errs[name], '.1e') if name in errs else '—'} |")
            if args.sweep:
                self.sweep()

    def sweep(self) -> None:
        """M = 1..128 on the gate shape (8960 x 1536), hot: where dequantize + MKL overtakes the GEMV kernels."""
        torch, F = self.torch, self.F
        m = self.mods[0][4]
        pack = self.pack[0][4]
        ops = torch.ops.nvila
        w32 = m.dequantized_weight()
        cands = {
            "fp32": lambda x: F.linear(x, w32),
            "int4pack": pack,
            "avx2-fp32": lambda x: ops.w4a16_linear_f32(x, m.qweight, m.scales, m.zeros, GROUP, None),
            **({"avx512-fp32": lambda x: ops.w4a16_linear_f32_avx512(x, m.qweight, m.scales, m.zeros, GROUP, None)}
               if self.avx512 else {}),
            "avx2-dyn16": lambda x: ops.w4a16_linear_dyn16(x, m.qweight, m.scales, m.zeros, GROUP, None),
            "avx2-dyn8": lambda x: ops.w4a16_linear_dyn8(x, m.qweight, m.scales, m.zeros, GROUP, None),
            "dequant+mkl": lambda x: ops.w4a16_linear_dequant(x, m.qweight, m.scales, m.zeros, GROUP, None),
        }
        print(f"\n### batch sweep, gate 8960x1536, hot, ms (threads {torch.get_num_threads()})")
        print("| M | " + " | ".join(cands) + " |")
        print("|---|" + "---|" * len(cands))
        for rows in (1, 2, 4, 8, 16, 32, 64, 128):
            x = torch.randn(rows, 1536)
            times = {name: [] for name in cands}
            with torch.inference_mode():
                for fn in cands.values():
                    fn(x)
                for _ in range(max(3, self.args.reps // 2)):
                    for name, fn in cands.items():
                        t = time.perf_counter()
                        fn(x)
                        times[name].append(time.perf_counter() - t)
            print(f"| {rows} | " + " | ".join(f"{statistics.median(v) * 1e3:.2f}" for v in times.values()) + " |")


if __name__ == "__main__":
    main()
