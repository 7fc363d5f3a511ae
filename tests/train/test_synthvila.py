"""The SynthVILA recipe script (recipes/synthvila/train.py) in its CI smoke mode, the stage-0 vision
pre-training, and the ablation benchmark's smoke mode on the recipe's shared stage-2 checkpoint."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from nvila.cli import main as cli_main

REPO = Path(__file__).resolve().parents[2]
RECIPE = runpy.run_path(str(REPO / "recipes" / "synthvila" / "train.py"))
STAGES = ["stage0a_llm", *RECIPE["MODES"]["smoke"]["steps"]]


def _run_script(path: Path, argv: list[str]) -> int:
    old = sys.argv
    sys.argv = [str(path), *argv]
    try:
        with pytest.raises(SystemExit) as exc:
            runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv = old
    return exc.value.code


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthvila")
    out, bundle = root / "run", root / "bundle"
    code = _run_script(REPO / "recipes" / "synthvila" / "train.py",
                       ["--out", str(out), "--mode", "smoke", "--bundle", str(bundle), "--no-progress"])
    assert code == 0
    return out, bundle


def _losses(path: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_recipe_runs_every_stage_and_the_losses_fall(smoke_run):
    out, _ = smoke_run
    vision = _losses(out / "stage0b_vision" / "final" / "metrics.jsonl")
    assert vision[-1] < vision[0]
    text = _losses(out / "stage0a_llm" / "final" / "metrics.jsonl")
    assert sum(text[-3:]) < sum(text[:3])
    assert list(RECIPE["MODES"]["smoke"]["steps"]) == list(RECIPE["MODES"]["full"]["steps"])  # same stages
    for stage in STAGES:
        final = out / stage / "final"
        assert (final / "config.json").is_file() and not (final / "trainer").exists()
    log = json.loads((out / "train_log.json").read_text())
    assert log["mode"] == "smoke" and "--mode smoke" in log["command"]
    assert set(log["stages"]) == set(STAGES)


@pytest.mark.slow
def test_bundle_has_the_published_layout_log_and_eval(smoke_run, tmp_path, capsys):
    _, bundle = smoke_run
    for name in ("config.json", "llm", "vision_tower", "mm_projector", "training_log.jsonl", "train_log.json",
                 "eval.json", "eval.md"):
        assert (bundle / name).exists(), name
    stages = {json.loads(line)["stage"] for line in (bundle / "training_log.jsonl").read_text().splitlines()}
    assert stages == {"stage0b_vision", *STAGES}
    result = json.loads((bundle / "eval.json").read_text())
    assert set(result["families"]) == {"fine_code", "coarse_colour", "coarse_count", "coarse_shape", "compare_count",
                                       "compare_colour", "video_colour", "video_order", "video_count",
                                       "video_localize"}
    assert {"miou", "p_at_0.5"} <= set(result["families"]["video_localize"])
    assert json.loads((bundle / "config.json").read_text())["num_time_tokens"] == 17
    from nvila.data.synthetic import generate, preset_options

    generate("coarse_colour", 1, tmp_path, 0, **preset_options("coarse_colour", "small"))
    media = tmp_path / "coarse_colour" / "0000000.png"
    assert cli_main(["infer", "--model", str(bundle), "--media", str(media), "--text", "What colour is the largest "
                     "shape?", "--max-new-tokens", "4"]) == 0
    assert "81" in capsys.readouterr().out  # Dynamic-S2 over 24/72 px, 2x2: 9 tiles x 9 tokens


@pytest.mark.slow
def test_start_runs_only_the_stages_after_8_on_a_stage_8_checkpoint(smoke_run, tmp_path, monkeypatch):
    out, _ = smoke_run
    late = tmp_path / "late"
    code = _run_script(REPO / "recipes" / "synthvila" / "train.py",
                       ["--out", str(late), "--mode", "smoke", "--start", str(out / "stage8_joint_sft" / "final"),
                        "--bundle", str(tmp_path / "bundle"), "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in late.glob("stage*")) == ["stage10_joint_replay", "stage9_localize"]
    assert set(json.loads((late / "train_log.json").read_text())["stages"]) == set(RECIPE["LATE"])
    stages = {json.loads(line)["stage"] for line in (tmp_path / "bundle" / "training_log.jsonl").read_text().splitlines()}
    assert stages == set(RECIPE["LATE"])
    assert json.loads((tmp_path / "bundle" / "config.json").read_text())["num_time_tokens"] == 17
    # Table 10 in miniature, from the same stage-8 checkpoint and the stage-9 data
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # its `common`, as when run as a script
    code = _run_script(REPO / "benchmarks" / "ablation_time_tokens.py",
                       ["--mode", "smoke", "--base", str(out / "stage8_joint_sft" / "final"), "--data",
                        str(late / "data"), "--run", str(tmp_path / "t10"), "--no-progress"])
    assert code == 0
    results = json.loads((tmp_path / "t10" / "results.json").read_text())
    assert {k: sorted(v) for k, v in results["variants"].items()} == {
        "time tokens + soft CE": ["0", "1"], "time tokens + hard CE": ["0", "1"], "decimal text": ["0", "1"]}
    assert (tmp_path / "t10" / "table10.png").is_file() and "decimal text" in (tmp_path / "t10" / "table10.md").read_text()
    code = _run_script(REPO / "benchmarks" / "ablation_time_tokens.py",  # durations drawn per clip
                       ["--mode", "smoke", "--base", str(out / "stage8_joint_sft" / "final"), "--fps", "1,4",
                        "--run", str(tmp_path / "t10fps"), "--seeds", "1", "--no-progress"])
    assert code == 0
    records = [json.loads(x) for x in (tmp_path / "t10fps" / "data" / "video_localize.jsonl").read_text().splitlines()]
    assert {r["duration"] for r in records} <= {16.0, 4.0} and len({r["duration"] for r in records}) == 2


@pytest.mark.slow
def test_ablations_smoke_on_the_shared_stage2_checkpoint(smoke_run, tmp_path):
    out, _ = smoke_run
    code = _run_script(REPO / "benchmarks" / "ablations.py",
                       ["--mode", "smoke", "--base", str(out / "stage2g_fine" / "final"), "--recipe-run", str(out),
                        "--run", str(tmp_path), "--no-progress"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    tokens1 = {k: v["tokens"] for k, v in results["table1"].items()}
    assert tokens1 == {"low-res 2x2": 9, "Dynamic-S2 2x2": 81, "Dynamic-S2 3x3 (projector only)": 36,
                       "Dynamic-S2 3x3 after VEP": 36}
    tokens2 = {k: v["tokens"] for k, v in results["table2"].items()}
    assert tokens2 == {"4 frames": 36, "16 frames": 144, "16 frames, 4x temporal pooling": 36}
    assert {k: v["tokens"] for k, v in results["table1b"].items()} == {"low-res": 9, "Dynamic-S2": 81}
    # Table 1b ran the recipe's code stages, with their mixtures, after its own projector stage
    assert sorted(p.name for p in (tmp_path / "t1b-0").iterdir()) == [
        "P", "init", "stage7a_fill", "stage7b_fill", "stage7c_fill", "stage7d_code"]
    assert "fine_fill5x10" in (tmp_path / "t1b-0" / "stage7a_fill" / "final" / "metrics.jsonl").read_text()
    assert (tmp_path / "ablations.png").stat().st_size > 1000
    assert "Table 2 analogue" in (tmp_path / "ablations.md").read_text()
    assert "Table 1b" in (tmp_path / "ablations.md").read_text()


def test_ablations_without_a_base_checkpoint_is_a_clear_error(tmp_path, capsys):
    code = _run_script(REPO / "benchmarks" / "ablations.py", ["--base", str(tmp_path / "nope"), "--run",
                                                               str(tmp_path / "r")])
    assert code == 2
    assert "no shared checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_ablations_table1b_without_a_recipe_run_is_a_clear_error(smoke_run, tmp_path, capsys):
    out, _ = smoke_run
    run = tmp_path / "recipe"
    (run / "stage6_count").mkdir(parents=True)
    (run / "stage6_count" / "final").symlink_to(out / "stage6_count" / "final")
    (run / "data").mkdir()
    for f in (out / "data").iterdir():
        if not f.name.startswith("fine_fill"):  # a run from before the code curriculum
            (run / "data" / f.name).symlink_to(f)
    code = _run_script(REPO / "benchmarks" / "ablations.py",
                       ["--mode", "smoke", "--tables", "1b", "--recipe-run", str(run), "--run", str(tmp_path / "r"),
                        "--no-progress"])
    assert code == 2
    assert "Table 1b needs a recipes/synthvila/train.py run" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    code = _run_script(REPO / "benchmarks" / "ablations.py", ["--tables", "3", "--run", str(tmp_path / "r")])
    assert code == 2
    assert "unknown table ['3']; valid: 1, 1b, 2" in capsys.readouterr().err


@pytest.mark.slow
def test_centre_projector_removes_the_mean_visual_token_and_nothing_else(smoke_run, tmp_path):
    import torch

    from nvila.model import NVILAForConditionalGeneration
    from nvila.processor import NVILAProcessor
    from nvila.train.synthvila import centre_projector

    out, _ = smoke_run
    start, data = out / "stage1_projector" / "final", out / "data"
    centred = centre_projector(start, tmp_path / "centred", data)
    images = [json.loads(line)["image"] for line in (data / "coarse_colour.jsonl").read_text().splitlines()]

    def mean_token(path: Path) -> torch.Tensor:
        model, proc = NVILAForConditionalGeneration.from_pretrained(path).eval(), NVILAProcessor.from_pretrained(path)
        with torch.no_grad():
            rows = []
            for rel in images:
                inputs, _ = proc.prepare([[{"role": "user", "content": [{"type": "image", "image": str(data / rel)}]}]])
                rows.append(model.encode_images(inputs["pixel_values"], inputs["image_block_sizes"]))
        return torch.cat(rows).mean(0)

    before, after = mean_token(start), mean_token(centred)
    assert before.norm() > 1.0 and after.norm() < 1e-3 * before.norm()
    a, b = (NVILAForConditionalGeneration.from_pretrained(p).state_dict() for p in (start, centred))
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert len(changed) == 1 and changed[0].startswith("mm_projector.") and changed[0].endswith(".bias")


def test_make_data_skips_a_repeat_and_regenerates_when_the_preset_changes(tmp_path, monkeypatch):
    from nvila.data import synthetic
    from nvila.train.synthvila import make_data

    sizes = {"compare_count": 2}
    out = make_data(tmp_path, sizes)
    first = (out / "compare_count.jsonl").read_text()
    canvas = json.loads(first.splitlines()[0])["meta"]["scene"][0]["canvas"]
    assert canvas == list(synthetic.preset_options("compare_count", "small")["canvas"])
    (out / "compare_count.jsonl").write_text("sentinel")
    make_data(tmp_path, sizes)  # same arguments and options: a no-op
    assert (out / "compare_count.jsonl").read_text() == "sentinel"
    small = {**synthetic.SIZE_PRESETS["small"], "multi_image": {"canvas": (30, 30), "clutter": 4, "noise": 8.0}}
    monkeypatch.setitem(synthetic.SIZE_PRESETS, "small", small)
    make_data(tmp_path, sizes)  # the preset's options changed: regenerated
    record = json.loads((out / "compare_count.jsonl").read_text().splitlines()[0])
    assert record["meta"]["scene"][0]["canvas"] == [30, 30]


def test_make_data_writes_curriculum_variants_as_their_own_splits(tmp_path):
    from nvila.train.synthvila import make_data

    out = make_data(tmp_path, {"fine_code": 2, "fine_fill2x2": 2},
                    variants={"fine_fill2x2": ("fine_code", {"code_repeat": (2, 2)})})
    plain, fill = (json.loads((out / f"{n}.jsonl").read_text().splitlines()[0]) for n in ("fine_code", "fine_fill2x2"))
    assert plain["meta"]["family"] == fill["meta"]["family"] == "fine_code"
    assert "repeat" not in plain["meta"]["scene"]["code"] and fill["meta"]["scene"]["code"]["repeat"] == [2, 2]
    assert fill["image"].startswith("fine_fill2x2/") and (out / fill["image"]).is_file()
    assert fill["conversations"][1]["value"] == fill["meta"]["scene"]["code"]["text"]
