"""The trainer: resume equality, SIGKILL-and-resume, keep-last-K, and 2-process (gloo) equality."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nvila.model import NVILAForConditionalGeneration
from nvila.train.cli import main
from nvila.train.config import load_config
from nvila.train.trainer import lr_factor

from trainkit import image_mixture, kill_when, make_image_data, tiny_ckpts, video_mixture  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
RECIPE = "nvila_stage3_pretrain"
STEPS = 6


def _args(ckpt, mixture, out, *extra):
    return ["--config", str(RECIPE), f"model.path={ckpt}", f"data.mixture={mixture}", f"run.output_dir={out}",
            "model.dtype=float32", "model.gradient_checkpointing=false", "model.llm=lora", "model.lora.r=4",
            "optim.lr.llm=1e-3", "optim.lr.projector=1e-3", "optim.global_batch_size=2", "optim.micro_batch_size=1",
            f"optim.max_steps={STEPS}", "optim.warmup_ratio=0.2", "run.save_every=2", "run.keep_last=2",
            "run.progress=false", "--threads", "1", *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tiny_ckpts, tmp_path_factory):
    """A 6-sample mixture and the uninterrupted reference run (LoRA dropout on: RNG state matters)."""
    root = tmp_path_factory.mktemp("trainer")
    mixture = make_image_data(root / "data", 6)
    ref = root / "ref"
    assert main(_args(tiny_ckpts["nvila-video"], mixture, ref)) == 0
    return tiny_ckpts["nvila-video"], mixture, _losses(ref), ref


def test_schedule_warmup_then_cosine():
    f = [lr_factor(s, warmup=2, total=10, min_ratio=0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] > 0.1


def test_reference_run_checkpoints(setup):
    ckpt, _, losses, ref = setup
    assert len(losses) == STEPS
    kept = sorted(p.name for p in ref.glob("checkpoint-*"))
    assert kept == ["checkpoint-0000004", "checkpoint-0000006"]  # keep_last=2
    assert not list(ref.glob(".staging-*"))
    assert (ref / "checkpoint-0000006" / "trainer" / "trainable.safetensors").is_file()
    model = NVILAForConditionalGeneration.from_pretrained(ref / "checkpoint-0000006")
    base = NVILAForConditionalGeneration.from_pretrained(ckpt)
    changed = [n for n, p in model.state_dict().items() if not p.equal(base.state_dict()[n])]
    assert any(n.startswith("mm_projector") for n in changed) and any(n.startswith("llm") for n in changed)
    assert not any(n.startswith("vision_tower") for n in changed)  # frozen in stage 3


def test_resume_continues_exactly(setup, tmp_path):
    ckpt, mixture, ref_losses, _ = setup
    out = tmp_path / "run"
    assert main(_args(ckpt, mixture, out, "run.stop_after=3")) == 0  # stops after a checkpoint-less step
    assert len(_losses(out)) == 3
    assert main(_args(ckpt, mixture, out)) == 2  # refuses to overwrite without --resume
    assert main(_args(ckpt, mixture, out, "--resume")) == 0
    resumed = _losses(out)
    assert len(resumed) == STEPS
    assert max(abs(a - b) for a, b in zip(resumed, ref_losses)) <= 1e-6, (resumed, ref_losses)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(setup, tmp_path):
    ckpt, mixture, ref_losses, _ = setup
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nvila.train", *_args(ckpt, mixture, out)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, out / "metrics.jsonl", 3)
    done = sorted(p.name for p in out.glob("checkpoint-*"))
    assert done and done[-1] in ("checkpoint-0000002", "checkpoint-0000004")  # complete checkpoints only
    assert main(_args(ckpt, mixture, out, "--resume")) == 0
    resumed = _losses(out)
    assert len(resumed) == STEPS
    assert max(abs(a - b) for a, b in zip(resumed, ref_losses)) <= 1e-6


@pytest.mark.slow
def test_two_processes_match_one(setup, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, DDP) = one process at the same global batch of 2."""
    ckpt, mixture, ref_losses, _ = setup
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun is part of torch"
    out = tmp_path / "ddp"
    # 2 ranks x micro-batch 1 x 1 accumulation step = the reference's 1 rank x 1 x 2 steps.
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000), "-m", "nvila.train",
           *_args(ckpt, mixture, out, "model.lora.dropout=0.0"), ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    single = tmp_path / "single"
    assert main(_args(ckpt, mixture, single, "model.lora.dropout=0.0")) == 0
    ddp, one = _losses(out), _losses(single)
    assert len(ddp) == STEPS
    assert max(abs(a - b) for a, b in zip(ddp, one)) <= 1e-5, (ddp, one)
    cfg = load_config(RECIPE, [f"model.path={ckpt}"])
    assert cfg.optim.global_batch_size % 2 == 0  # the recipe itself splits over 2 processes


@pytest.mark.parametrize("pack", ["true", "false"])
def test_metrics_split_the_loss_by_dataset(tiny_ckpts, tmp_path, pack):
    root = tmp_path / "data"
    mixture = make_image_data(root, 4)
    texts = [{"conversations": [{"from": "human", "value": f"Name colour {i}."}, {"from": "gpt", "value": "Red."}]}
             for i in range(4)]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts), encoding="utf-8")
    mixture.write_text("datasets:\n  - {name: shapes, path: shapes.jsonl, media_root: images}\n"
                       "  - {name: text, path: text.jsonl, media_root: .}\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(_args(tiny_ckpts["nvila-video"], mixture, out, f"data.pack={pack}", "optim.global_batch_size=4",
                      "optim.micro_batch_size=2")) == 0
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert {name for m in lines for name in m["loss_by_dataset"]} == {"shapes", "text"}
    for m in lines:
        by, n = m["loss_by_dataset"], m["targets_by_dataset"]
        assert set(by) == set(n) and all(v > 0 for v in by.values()) and all(k > 0 for k in n.values())
        mean = sum(by[k] * n[k] for k in by) / sum(n.values())
        assert abs(mean - m["loss"]) <= 1e-6 * max(1.0, m["loss"]), (m, mean)
