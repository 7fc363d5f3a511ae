"""``nvila prune``: the DeltaLoss score, batch invariance, per-dataset top-K, the outputs, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvila.cli import main
from nvila.processor import NVILAProcessor
from nvila.prune.score import packed_ce
from nvila.prune.select import kmeans, num_kept, select
from nvila.train.data import MixtureDataset, SampleEncoder, load_mixture, read_records
from nvila.train.packing import pad, use_packed_attention
from nvila.train.parts import token_ce

from trainkit import kill_when, make_image_data, tiny_ckpts  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[2]


def _mixture(root: Path) -> Path:
    """Two sub-datasets: 9 image records (one with missing media) and 5 text-only ones."""
    mixture = make_image_data(root, 8, bad=1)
    texts = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Name colour number {i}."},
                                               {"from": "gpt", "value": ["Red.", "A green one.", "Blue", "Yellow!",
                                                                         "Red again."][i]}]} for i in range(5)]
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts), encoding="utf-8")
    mixture.write_text("datasets:\n  - {name: shapes, path: shapes.jsonl, media_root: images}\n"
                       "  - {name: text, path: text.jsonl, media_root: ., repeat: 2}\n", encoding="utf-8")
    return mixture


def _prune(large, small, mixture, out, *extra) -> int:
    return main(["prune", "--large", str(large), "--small", str(small), "--mixture", str(mixture), "--keep", "0.5",
                 "--out", str(out), "--threads", "1", "--no-progress", *extra])


def _rows(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "scores.jsonl").read_text().splitlines()[1:]]


@pytest.fixture(scope="module")
def setup(tiny_ckpts, tmp_path_factory):
    """(large, small, mixture, out of one deltaloss run at keep 0.5, batch 4)."""
    from nvila.tiny import build_tiny_checkpoint, build_tokenizer

    root = tmp_path_factory.mktemp("prune")
    large = tiny_ckpts["nvila-video"]
    small = build_tiny_checkpoint(root / "small", "nvila-video", seed=1, tokenizer=build_tokenizer())
    mixture = _mixture(root / "data")
    out = root / "out"
    assert _prune(large, small, mixture, out, "--batch-size", "4") == 0
    return large, small, mixture, out


def _model(path):
    from nvila.model import NVILAForConditionalGeneration

    m = NVILAForConditionalGeneration.from_pretrained(path).eval()
    use_packed_attention(m.llm)
    return m


def _samples(ckpt, mixture):
    enc = SampleEncoder(NVILAProcessor.from_pretrained(ckpt), 8192)
    ds = MixtureDataset(load_mixture(mixture))
    return [enc(*ds[i]) for i in (0, 1, 2, 3, 9)]  # 4 image samples and a text one


def _hand_ce(model, sample) -> float:
    """Mean CE over the labelled targets, through the model's own forward and the trainer's token_ce."""
    batch = pad([sample], pad_id=0)
    labels = batch.pop("labels")
    with torch.no_grad():
        ce = token_ce(model(**batch).logits, labels)  # (1, L-1)
    return float(ce.sum() / (labels[:, 1:] != -100).sum())


def test_score_is_the_hand_computed_ce_difference(setup):
    large, small, mixture, out = setup
    rows = {(r["dataset"], r["index"]): r for r in _rows(out)}
    samples = _samples(large, mixture)
    big, little = _model(large), _model(small)
    for s, key in zip(samples[:2], [("shapes", 0), ("shapes", 1)]):
        ce_l, ce_s = _hand_ce(big, s), _hand_ce(little, s)
        r = rows[key]
        assert abs(r["ce_large"] - ce_l) <= 1e-5 and abs(r["ce_small"] - ce_s) <= 1e-5
        assert abs(r["score"] - (ce_s - ce_l)) <= 1e-5
        assert r["tokens"] == int((s.labels[1:] != -100).sum())
    assert rows[("shapes", 8)]["skipped"] == "missing media" and rows[("shapes", 8)]["score"] is None


def test_a_score_is_the_same_in_a_batch_and_alone(setup):
    large, _, mixture, _ = setup
    model, samples = _model(large), _samples(large, mixture)
    ce, n, emb = packed_ce(model, samples, embeddings=True)
    for b, s in enumerate(samples):
        ce1, n1, emb1 = packed_ce(model, [s], embeddings=True)
        assert n1[0] == n[b]
        assert abs(float(ce1[0] / n1[0]) - float(ce[b] / n[b])) <= 1e-5
        assert torch.allclose(emb1[0], emb[b], atol=1e-5)


def test_top_k_is_per_dataset_with_ties_to_the_lower_index():
    rows = {"a": [{"index": i, "score": s} for i, s in enumerate([0.1, 0.5, 0.5, 0.5, -1.0, None])],
            "b": [{"index": i, "score": 1.0} for i in range(3)]}
    kept = select(rows, {"a": list(range(6)), "b": list(range(3))}, 0.5, "deltaloss")
    assert kept == {"a": [1, 2, 3], "b": [0, 1]}  # ceil(0.5*6)=3 of a, ceil(0.5*3)=2 of b: per dataset
    assert select(rows, {"a": list(range(6)), "b": list(range(3))}, 0.3, "deltaloss") == {"a": [1, 2], "b": [0]}
    assert num_kept(10, 0.3) == 3 and num_kept(7, 1.0) == 7
    assert select({}, {"a": list(range(6))}, 0.5, "random", seed=3) == select({}, {"a": list(range(6))}, 0.5,
                                                                                 "random", seed=3)


def test_kmeans_separates_blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 4, generator=g) * 0.1 + c for c in (0.0, 5.0, -5.0)])
    assign, _ = kmeans(x, 3, seed=0)
    assert all(len(set(assign[i * 20:(i + 1) * 20].tolist())) == 1 for i in range(3))
    assert len(set(assign.tolist())) == 3


def test_outputs_complement_and_the_pruned_mixture_trains(setup, tmp_path):
    large, _, mixture, out = setup
    summary = json.loads((out / "summary.json").read_text())
    assert {k: v["kept"] for k, v in summary["datasets"].items()} == {"shapes": 5, "text": 3}  # ceil(0.5 * n)
    rows = _rows(out)
    for name, n in (("shapes", 9), ("text", 5)):
        drop = json.loads((out / "filter_index" / "0.5" / f"{name}.json").read_text())
        scored = sorted((r for r in rows if r["dataset"] == name), key=lambda r: (r["score"] is None,
                                                                                   -(r["score"] or 0), r["index"]))
        kept = sorted(r["index"] for r in scored[:summary["datasets"][name]["kept"]])
        assert sorted(set(range(n)) - set(drop)) == kept and len(drop) + len(kept) == n
    ds = MixtureDataset(load_mixture(out / "mixture.yaml"))
    assert len(ds) == 5 + 2 * 3  # repeat carried over
    text = "\n".join((out / "report.txt").read_text().splitlines())
    assert "highest kept" in text and "lowest dropped" in text
    from nvila.train.cli import main as train_main

    run = tmp_path / "run"
    assert train_main(["--config", "nvila_stage3_pretrain", f"model.path={large}", f"data.mixture={out / 'mixture.yaml'}",
                       f"run.output_dir={run}", "model.dtype=float32", "model.gradient_checkpointing=false",
                       "optim.global_batch_size=2", "optim.micro_batch_size=2", "optim.max_steps=1",
                       "run.progress=false", "--threads", "1"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_random_and_cluster_baselines(setup, tmp_path):
    large, small, mixture, _ = setup
    for method in ("random", "cluster"):
        out = tmp_path / method
        assert _prune(large, small, mixture, out, "--method", method, "--batch-size", "8") == 0
        summary = json.loads((out / "summary.json").read_text())
        assert {k: v["kept"] for k, v in summary["datasets"].items()} == {"shapes": 5, "text": 3}
    assert all("embedding" in r for r in _rows(tmp_path / "cluster") if r.get("score") is not None)


def test_bad_input_is_one_line_before_any_work(setup, tmp_path, capsys):
    from nvila.tiny import build_tiny_checkpoint, build_tokenizer

    large, small, mixture, out = setup
    cases = [(["--keep", "0"], "--keep"), (["--keep", "1.5"], "--keep"),
             (["--mixture", str(tmp_path / "nope.yaml")], "no such mixture"),
             (["--reduction", "sum"], "other inputs")]  # the setup's scores file was written with mean
    other = build_tiny_checkpoint(tmp_path / "other", "nvila-video",
                                 tokenizer=build_tokenizer(["zebra quokka narwhal axolotl"], vocab_size=300))
    cases.append((["--small", str(other), "--out", str(tmp_path / "o")], "different tokenizers"))
    for extra, needle in cases:
        capsys.readouterr()
        assert _prune(large, small, mixture, out, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sigkill_then_resume_scores_each_sample_once(setup, tmp_path):
    large, small, mixture, ref = setup
    data = mixture.parent
    many = [r for r in read_records(data / "shapes.jsonl")] * 4  # 36 records: enough to kill mid-run
    (data / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many), encoding="utf-8")
    mix = tmp_path / "many.yaml"
    mix.write_text(f"datasets:\n  - {{name: many, path: {data / 'many.jsonl'}, media_root: {data / 'images'}}}\n")
    full, out = tmp_path / "full", tmp_path / "killed"
    assert _prune(large, small, mix, full, "--batch-size", "2") == 0
    cmd = [sys.executable, "-m", "nvila", "prune", "--large", str(large), "--small", str(small), "--mixture", str(mix),
           "--keep", "0.5", "--out", str(out), "--threads", "1", "--no-progress", "--batch-size", "2"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO / "src")}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    kill_when(proc, out / "scores.jsonl", 7)
    before = len(_rows(out))
    assert 0 < before < 36
    assert _prune(large, small, mix, out, "--batch-size", "2") == 0
    rows = _rows(out)
    assert len(rows) == 36 and len({r["index"] for r in rows}) == 36  # none scored twice
    ref_rows = {r["index"]: r for r in _rows(full)}
    for r in rows:
        assert r["score"] is None if ref_rows[r["index"]]["score"] is None else \
            abs(r["score"] - ref_rows[r["index"]]["score"]) <= 1e-6
    for name in ("filter_index/0.5/many.json", "mixture.yaml"):
        assert (out / name).read_text().replace(str(out), "") == (full / name).read_text().replace(str(full), "")


@pytest.mark.slow
def test_two_ranks_score_shards_that_merge_into_the_same_selection(setup, tmp_path):
    large, small, mixture, ref = setup
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29617",
           "-m", "nvila", "prune", "--large", str(large), "--small", str(small), "--mixture", str(mixture),
           "--keep", "0.5", "--out", str(out), "--threads", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    assert not list(out.glob("scores.rank*.jsonl"))  # merged into scores.jsonl
    rows = {(r["dataset"], r["index"]): r for r in _rows(out)}
    assert len(rows) == len(_rows(out)) == 14
    for r in _rows(ref):
        got = rows[(r["dataset"], r["index"])]["score"]
        assert got is None if r["score"] is None else abs(got - r["score"]) <= 1e-5
    for name in ("shapes", "text"):
        assert (out / "filter_index/0.5" / f"{name}.json").read_text() == \
            (ref / "filter_index/0.5" / f"{name}.json").read_text()


@pytest.mark.slow
def test_table3_miniature_smoke(tmp_path):
    """benchmarks/ablation_deltaloss.py end to end at smoke size on the bundled model: the pool's
    mislabelled records, the cut small model, six fine-tune datasets x two seeds, the report."""
    import runpy

    script = REPO / "benchmarks" / "ablation_deltaloss.py"
    run = tmp_path / "dl"
    old = sys.argv
    sys.argv = [str(script), "--mode", "smoke", "--run", str(run), "--no-progress"]
    try:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old
    assert exc.value.code == 0
    results = json.loads((run / "results.json").read_text())
    assert results["params"]["small"]["llm_layers"] == 2 < results["params"]["large"]["llm_layers"]
    # 30 % of the 10 pool records of each of the two noisy families carry a wrong answer
    bad = json.loads((run / "data" / "pool" / "mislabelled.json").read_text())
    assert {f: len(v) for f, v in bad.items()} == {"coarse_shape": 3, "compare_colour": 3}
    for fam, indices in bad.items():
        records = read_records(run / "data" / "pool" / f"{fam}.jsonl")
        for i, r in enumerate(records):
            wrong = r["conversations"][1]["value"] != r["meta"].get("true_answer", r["conversations"][1]["value"])
            assert wrong == (i in indices) == bool(r["meta"].get("mislabelled"))
    ft = results["finetunes"]
    assert list(ft) == ["full pool", "DeltaLoss 50%", "random 50%", "cluster 50%", "DeltaLoss 30%", "DeltaLoss 10%"]
    assert [ft[k]["records"] for k in ft] == [60, 30, 30, 30, 18, 6]  # ceil(keep * 10) of each of 6 families
    assert ft["full pool"]["mislabelled_kept"] == [{"coarse_shape": 3, "compare_colour": 3}] * 2
    assert all(len(r["mean_by_seed"]) == 2 and 0 <= min(r["mean_by_seed"]) <= max(r["mean_by_seed"]) <= 1
               for r in ft.values())
    assert (run / "ablation_deltaloss.png").stat().st_size > 1000
    assert "DeltaLoss 10%" in (run / "ablation_deltaloss.md").read_text()
