"""Strategies and parts: registries, collectives on the group's device, FSDP2 = one process, DCP resume, export.

The torchrun tests (slow) run 2 gloo processes on CPU: FSDP2 against ``dist.strategy=none`` at the
same global batch (full training; LoRA LLM + LayerNorm-only ViT with activation checkpointing),
SIGKILL part-way then ``--resume`` from the DCP checkpoint, the export against the single-process
export, and the measured per-rank parameter + optimizer bytes against DDP's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from nvila.cli import main as nvila_main
from nvila.train import distributed as D
from nvila.train.cli import main
from nvila.train.config import LOSSES, OPTIMIZERS, STRATEGIES, TrainConfigError, load_config
from nvila.train.fsdp import shard_rows
from nvila.train.parts import PRECISIONS, pick

from trainkit import kill_when, make_image_data, tiny_ckpts  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
FULL = ["model.vision=full", "model.projector=full", "model.llm=full"]
LORA_LN = ["model.vision=layernorm", "model.llm=lora", "model.gradient_checkpointing=true", "optim.lr.vision=1e-3"]
COMPONENTS = ("llm", "vision_tower", "mm_projector")


def _args(ckpt, mixture, out, *extra):
    return ["--config", "nvila_stage3_pretrain", f"model.path={ckpt}", f"data.mixture={mixture}",
            f"run.output_dir={out}", "model.dtype=float32", "model.gradient_checkpointing=false", "model.llm=lora",
            "model.lora.r=4", "model.lora.dropout=0.0", "optim.lr.llm=1e-3", "optim.lr.projector=1e-3",
            "optim.global_batch_size=2", "optim.micro_batch_size=1", f"optim.max_steps={STEPS}",
            "optim.warmup_ratio=0.2", "run.save_every=2", "run.keep_last=2", "run.progress=false", "--threads", "1",
            *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [m["loss"] for m in _metrics(out)]


def _torchrun(args: list[str], port_offset: int = 0, **popen) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    assert torchrun, "torchrun is part of torch"
    port = 29500 + (os.getpid() + 7 * port_offset) % 1000
    return [torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "nvila.train", *args]


ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def _run2(args: list[str], port_offset: int = 0) -> None:
    res = subprocess.run(_torchrun(args, port_offset), env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_data(tmp_path_factory.mktemp("fsdp") / "data", 6)


# ------------------------------------------------------------------------------ fast: registries
def test_registries_match_the_config_names_and_list_valid_keys():
    from nvila.train.parts import LOSSES as L, OPTIMIZERS as O

    assert tuple(L) == LOSSES and tuple(O) == OPTIMIZERS and tuple(D.STRATEGIES) == STRATEGIES
    assert set(PRECISIONS) == {"float32", "bfloat16", "float16"}
    assert PRECISIONS["bfloat16"].reduce == torch.float32
    with pytest.raises(TrainConfigError, match="choose one of none, ddp, fsdp2"):
        pick(D.STRATEGIES, "zero3", "dist.strategy")
    with pytest.raises(TrainConfigError, match="dist.strategy: 'zero3' is not valid; choose one of none, ddp, fsdp2"):
        load_config("nvila_stage3_pretrain", ["dist.strategy=zero3"])
    with pytest.raises(TrainConfigError, match="optim.loss.*token_ce, soft_ce"):
        load_config("nvila_stage3_pretrain", ["optim.loss=focal"])


def test_shard_rows_follow_torch_chunk():
    for rows in (1, 5, 7, 64):
        for world in (1, 2, 3, 8):
            chunks = torch.arange(rows).chunk(world)
            for r in range(world):
                start, stop = shard_rows(rows, world, r)
                want = chunks[r].tolist() if r < len(chunks) else []
                assert list(range(start, stop)) == want, (rows, world, r)


# ---------------------------------------------------------------------- fast: collectives' device
def test_collectives_run_on_the_device_of_their_group(monkeypatch):
    """Every helper builds its tensor on ``group_device(group)`` and passes that group on."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.new_group([0], backend="gloo")
        seen = []
        real = dist.all_reduce

        def spy(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
            seen.append((t.device, group))
            return real(t, op=op, group=group)

        monkeypatch.setattr(dist, "all_reduce", spy)
        for g in (None, group):
            assert D.all_sum([1.0, 2.0], group=g) == [1.0, 2.0]
            assert D.all_max([3.0], group=g) == [3.0]
            D.barrier(g)
        assert seen == [(torch.device("cpu"), None)] * 2 + [(torch.device("cpu"), group)] * 2
        assert all(dev == D.group_device(g) for dev, g in seen)
        # An NCCL group maps to the current CUDA device (no GPU here: the mapping alone is checked).
        monkeypatch.setattr(dist, "get_backend", lambda g=None: "nccl")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
        assert D.group_device(group) == torch.device("cuda", 3)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- fast: bad input
def test_fsdp2_without_a_process_group_is_one_line_error(tiny_ckpts, data, tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert main(_args(tiny_ckpts["nvila-video"], data, tmp_path / "x", "dist.strategy=fsdp2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("nvila: error: dist.strategy=fsdp2 needs a process group: launch with torchrun")
    assert not (tmp_path / "x").exists()  # before any work


def test_world_size_not_dividing_the_batch_is_one_line_error(tiny_ckpts, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before the process group is joined
    assert main(_args(tiny_ckpts["nvila-video"], data, tmp_path / "x", "dist.strategy=fsdp2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "impossible batch size: optim.global_batch_size=2 is not a multiple of" in err and "(3)" in err
    assert not dist.is_initialized()


def test_resume_with_another_strategy_is_one_line_error(tiny_ckpts, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(_args(tiny_ckpts["nvila-video"], data, out, "dist.strategy=none", "optim.max_steps=2")) == 0
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(_args(tiny_ckpts["nvila-video"], data, out, "dist.strategy=fsdp2", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nvila: error: ") and "written with dist.strategy=none" in err
    assert "resume with dist.strategy=none, not fsdp2" in err
    assert not dist.is_initialized()


# --------------------------------------------------------------------------------- fast: export
def test_streamed_export_equals_the_merged_copy(tiny_ckpts, tmp_path):
    """export.py (no deep copy) writes what save_pretrained(merged_copy(model)) writes, tensor for tensor."""
    from nvila.checkpoint import load_tokenizer, save_pretrained
    from nvila.model import NVILAForConditionalGeneration
    from nvila.train.config import ModelSection
    from nvila.train.export import export
    from nvila.train.peft import apply_trainability, merged_copy

    ckpt = tiny_ckpts["nvila"]
    model = NVILAForConditionalGeneration.from_pretrained(ckpt)
    apply_trainability(model, ModelSection(vision="layernorm", projector="full", llm="lora"))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a non-zero update to merge
    tok = load_tokenizer(Path(ckpt) / "llm")
    export(model, tok, tmp_path / "streamed", D.DistInfo(), {"nvila_weights": "trained"})
    save_pretrained(merged_copy(model), tok, tmp_path / "copied", metadata={"nvila_weights": "trained"})
    for comp in COMPONENTS:
        a = load_file(tmp_path / "streamed" / comp / "model.safetensors")
        b = load_file(tmp_path / "copied" / comp / "model.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), comp


# -------------------------------------------------------------------------------- fast: memory
def test_dry_run_reports_per_rank_bytes_under_fsdp2():
    from nvila.train.memory import memory_report

    cfgs = {n: load_config("nvila_stage4_image_sft", ["model.path=tests/assets/configs/NVILA-8B.json",
                                                      f"dist.strategy={s}", f"dist.world_size={n}"])
            for n, s in ((1, "ddp"), (2, "fsdp2"), (8, "fsdp2"))}
    totals = {n: memory_report(c)["total_bytes"] for n, c in cfgs.items()}
    assert totals[2] <= 0.51 * totals[1] and totals[8] <= 0.13 * totals[1], totals


# ---------------------------------------------------------------------------- slow: torchrun
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora_layernorm"])
def test_fsdp2_two_processes_match_one(tiny_ckpts, data, tmp_path, mode, capsys):
    """FSDP2 x 2 ranks = one process at the same global batch; the export equals the single-process one."""
    ckpt = tiny_ckpts["nvila-video"]
    extra = FULL if mode == "full" else LORA_LN
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    assert main(_args(ckpt, data, single, "dist.strategy=none", *extra)) == 0
    _run2(_args(ckpt, data, fsdp, "dist.strategy=fsdp2", *extra))
    one, two = _losses(single), _losses(fsdp)
    assert len(two) == STEPS and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5, (one, two)
    last = f"checkpoint-{STEPS:07d}"
    assert not (fsdp / "checkpoint-0000004" / "llm").exists()  # DCP only until the run's end
    assert sorted(p.name for p in (fsdp / last / "trainer" / "dcp").glob("*.distcp")) == ["__0_0.distcp",
                                                                                         "__1_0.distcp"]
    for comp in COMPONENTS:
        a = load_file(single / last / comp / "model.safetensors")
        b = load_file(fsdp / last / comp / "model.safetensors")
        assert a.keys() == b.keys(), comp
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.allclose(a[k], b[k], rtol=0, atol=1e-6), (comp, k)
    capsys.readouterr()
    assert nvila_main(["infer", "--model", str(fsdp / last), "--text", "What is it?", "--max-new-tokens", "2",
                       "--json", "--threads", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] >= 1
    if mode == "full":  # per-rank parameter + optimizer bytes, measured after a step, against DDP's
        ddp = tmp_path / "ddp"
        _run2(_args(ckpt, data, ddp, "dist.strategy=ddp", *extra), port_offset=1)
        mine, theirs = _metrics(fsdp)[0]["state_bytes"], _metrics(ddp)[0]["state_bytes"]
        ratio = (mine["params"] + mine["optimizer"]) / (theirs["params"] + theirs["optimizer"])
        assert ratio <= 0.6, (mine, theirs)


@pytest.mark.slow
def test_fsdp2_sigkill_then_resume_from_dcp(tiny_ckpts, data, tmp_path):
    ckpt = tiny_ckpts["nvila-video"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    _run2(_args(ckpt, data, ref, "dist.strategy=fsdp2", *LORA_LN))
    proc = subprocess.Popen(_torchrun(_args(ckpt, data, out, "dist.strategy=fsdp2", *LORA_LN), 2), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when(proc, out / "metrics.jsonl", 3, 180, group=True)  # torchrun and both ranks
    done = sorted(p.name for p in out.glob("checkpoint-*"))
    assert done and done[-1] in ("checkpoint-0000002", "checkpoint-0000004")
    _run2(_args(ckpt, data, out, "dist.strategy=fsdp2", *LORA_LN, "--resume"), port_offset=3)
    resumed, want = _losses(out), _losses(ref)
    assert len(resumed) == STEPS
    assert max(abs(a - b) for a, b in zip(resumed, want)) <= 1e-6, (resumed, want)


@pytest.mark.slow
def test_fsdp2_refuses_micro_batches_whose_media_differ_across_ranks(tiny_ckpts, data, tmp_path):
    """Rank 0 always draws an image sample and rank 1 a text-only one: a clear error on every rank at
    the first step, not a hang."""
    images = data.parent / "images"
    records = []
    for i in range(4):
        image = {"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                          {"from": "gpt", "value": "Red."}]}
        text = {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
        records += [image, text]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    mixture = tmp_path / "mixture.yaml"
    mixture.write_text(f"datasets:\n  - name: mixed\n    path: {mixed.name}\n    media_root: {images}\n", encoding="utf-8")
    res = subprocess.run(_torchrun(_args(tiny_ckpts["nvila-video"], mixture, tmp_path / "out", "dist.strategy=fsdp2",
                                         "data.shuffle=false", *FULL), 3),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "at step 1 some ranks' micro-batches have images or videos and others do not" in res.stderr
