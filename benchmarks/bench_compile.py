"""Issue 23: does ``torch.compile`` of the decode step help on this CPU? Eager against compiled.

    python benchmarks/bench_compile.py [--threads 1] [--steps 200]

The engine's decode step (``nvila.llm.Runner.decode``, batch 1) on the bundled SynthVILA model, where
per-op overhead matters most (a 4-layer, 256-wide LLM). Compiled with inductor, ``dynamic=True`` (the
key length grows each step), run under ``no_grad`` (inductor cannot trace the step under
``inference_mode``). Eager, compiled, eager again, in one process; prints decode steps/s and the
compile time. A large model's decode is bound by streaming its weights, so it gains less, not more.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import cpu_report
from nvila import NVILAForConditionalGeneration
from nvila.bundled import default_model_path
from nvila.llm import Runner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_report()}; torch {torch.__version__}, {args.threads} thread(s)", flush=True)
    model = NVILAForConditionalGeneration.from_pretrained(default_model_path())
    runner = Runner(model.llm, 1, 64 + args.steps)
    prompt = torch.randn(1, 40, model.config.llm.hidden_size)
    token = torch.tensor([5])

    def rate(step) -> float:
        runner.prefill(0, prompt)
        for p in range(40, 45):  # warm-up
            step(token, [p])
        t = time.perf_counter()
        for i in range(args.steps):
            step(token, [45 + i])
        return args.steps / (time.perf_counter() - t)

    compiled = torch.compile(Runner.decode.__wrapped__, dynamic=True)

    def compiled_step(tok, pos):
        with torch.no_grad():
            return compiled(runner, tok, pos)

    eager = rate(runner.decode)
    t = time.perf_counter()
    runner.prefill(0, prompt)
    compiled_step(token, [40])
    compile_s = time.perf_counter() - t
    result = {"eager_steps_s": eager, "compiled_steps_s": rate(compiled_step), "eager_again_steps_s": rate(runner.decode),
              "compile_s": compile_s}
    result["compiled_vs_eager"] = result["compiled_steps_s"] / ((eager + result["eager_again_steps_s"]) / 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
