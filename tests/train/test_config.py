"""Recipe YAMLs, key=value overrides, the errors raised before any work, and the dry-run memory report."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nvila.train.cli import main
from nvila.train.config import TRAINABILITY, TrainConfigError, load_config, shipped_recipes
from nvila.train.memory import GIB, memory_report

from nvila_testing import CONFIGS
from trainkit import image_mixture, make_image_data, tiny_ckpts, video_mixture  # noqa: F401 (fixtures)

SHIPPED = shipped_recipes()
EXAMPLE_MIXTURE = Path(__file__).resolve().parents[2] / "docs" / "mixture_example.yaml"
NVILA_8B = CONFIGS / "NVILA-8B.json"


def test_every_recipe_is_shipped():
    names = set(SHIPPED)
    assert {"nvila_stage1_projector", "nvila_stage2_vep", "nvila_stage3_pretrain", "nvila_stage4_image_sft",
            "nvila_stage5_video_sft", "finetune_lora", "finetune_qlora"} <= names


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_loads_and_opens_with_its_command(name):
    cfg = load_config(name)
    first = SHIPPED[name].read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(f"# nvila train --config {name} ") or first.startswith("# nvila finetune"), first
    assert all(getattr(cfg.model, c) in TRAINABILITY for c in ("vision", "projector", "llm"))
    assert cfg.optim.global_batch_size % cfg.optim.micro_batch_size == 0


def test_stage_table_is_encoded():
    """Trainable parts and LRs per stage (spec training.md §1.2)."""
    expect = {
        "nvila_stage1_projector": (("frozen", "full", "frozen"), "projector", 1e-3, None),
        "nvila_stage2_vep": (("full", "full", "frozen"), "vision", 2e-5, 5.0),
        "nvila_stage3_pretrain": (("frozen", "full", "full"), "llm", 2e-5, None),
        "nvila_stage4_image_sft": (("full", "full", "full"), "llm", 1.5e-5, 5.0),
        "nvila_stage5_video_sft": (("full", "full", "full"), "llm", 2e-5, None),
    }
    for name, (modes, comp, lr, clip) in expect.items():
        cfg = load_config(name)
        assert (cfg.model.vision, cfg.model.projector, cfg.model.llm) == modes, name
        assert getattr(cfg.optim.lr, comp) == lr and cfg.optim.max_grad_norm == clip, name
    ft = load_config("finetune_lora")
    assert (ft.model.vision, ft.model.projector, ft.model.llm) == ("layernorm", "full", "lora")
    assert 5 <= ft.optim.lr.llm / ft.optim.lr.vision <= 50
    assert load_config("finetune_qlora").model.quantize_llm == "nf4"


def test_example_mixture_parses():
    raw = yaml.safe_load(EXAMPLE_MIXTURE.read_text(encoding="utf-8"))
    assert [d["name"] for d in raw["datasets"]] == ["llava_instruct", "sharegpt4v", "video_qa"]


def test_overrides_are_typed():
    cfg = load_config("finetune_lora", ["optim.lr.llm=3e-4", "run.threads=2", "model.lora.r=8",
                                                        "optim.max_grad_norm=null", "data.pack=false"])
    assert cfg.optim.lr.llm == 3e-4 and cfg.run.threads == 2 and cfg.model.lora.r == 8
    assert cfg.optim.max_grad_norm is None and cfg.data.pack is False


@pytest.mark.parametrize("overrides, message", [
    (["optim.learning_rate=1e-4"], "unknown config key optim.learning_rate"),
    (["model.vision=partial"], "model.vision: 'partial' is not valid"),
    (["optim.global_batch_size=ten"], "optim.global_batch_size: expected int"),
    (["model.llm=full", "model.quantize_llm=nf4"], "model.llm must be lora or frozen"),
    (["model.vision=frozen", "model.projector=frozen", "model.llm=frozen"], "nothing to train"),
])
def test_bad_values_are_named(overrides, message):
    with pytest.raises(TrainConfigError, match=message):
        load_config("finetune_lora", overrides)


def _cli(tmp_path, capsys, *overrides):
    code = main(["--config", "finetune_lora", *overrides])
    return code, capsys.readouterr().err


def test_cli_errors_before_any_work(tmp_path, tiny_ckpts, capsys):
    mixture = make_image_data(tmp_path / "data", 4)
    out = tmp_path / "out"
    base = [f"model.path={tiny_ckpts['nvila-video']}", f"run.output_dir={out}"]
    cases = [
        ([*base, f"data.mixture={mixture}", "optim.nonsense=1"], "unknown config key optim.nonsense"),
        ([*base, f"data.mixture={tmp_path / 'nope.yaml'}"], "no such mixture file"),
        ([*base, f"data.mixture={mixture}", "optim.global_batch_size=6", "optim.micro_batch_size=4"],
         "impossible batch size"),
        ([*base, f"data.mixture={mixture}", "optim.global_batch_size=8"], "has only 4 samples"),
        ([f"model.path={tmp_path / 'no-ckpt'}", f"data.mixture={mixture}"], "model.path"),
    ]
    for overrides, message in cases:
        code, err = _cli(tmp_path, capsys, *overrides)
        assert code == 2 and message in err and err.startswith("nvila: error:"), (overrides, err)
        assert not out.exists()  # nothing was started
    (mixture.parent / "shapes.jsonl").unlink()
    code, err = _cli(tmp_path, capsys, *base, f"data.mixture={mixture}")
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("recipe, limit", [("finetune_lora.yaml", 24), ("finetune_qlora.yaml", 12)])
def test_dry_run_peft_fits_24gb_for_nvila_8b(recipe, limit):
    cfg = load_config(recipe, [f"model.path={NVILA_8B}"])
    r = memory_report(cfg)
    c = r["components"]
    assert c["vision"].trainable < 1e6 < c["vision"].parameters  # LayerNorm only
    assert c["projector"].trainable == c["projector"].parameters
    assert 1e8 < c["llm"].trainable < 3e8 and c["llm"].parameters > 7e9  # LoRA r=64 on 7.6B
    for comp in c.values():
        assert comp.optimizer_bytes == 2 * comp.grad_bytes
    assert r["total_bytes"] / GIB < limit


def test_dry_run_cli_prints_per_component_table(capsys):
    code = main(["--config", "finetune_lora", f"model.path={NVILA_8B}", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert all(w in out for w in ("vision", "projector", "llm", "grads", "optim", "fits in 24 GiB"))
    code = main(["--config", "nvila_stage4_image_sft", f"model.path={NVILA_8B}", "--dry-run"])
    assert code == 0 and "does NOT fit in 24 GiB" in capsys.readouterr().out  # full training of 8B does not


def test_recipes_are_found_by_name_and_unknown_names_list_the_shipped_ones(tmp_path):
    assert load_config("finetune_lora.yaml").model.llm == "lora"  # with or without the suffix
    with pytest.raises(TrainConfigError, match="no recipe of that name ships with nvila.*finetune_lora"):
        load_config("finetune_lorax")
    own = tmp_path / "finetune_lora.yaml"  # an existing file wins over the shipped name
    own.write_text("model: {llm: full}\n", encoding="utf-8")
    assert load_config(own).model.llm == "full"


def test_recipe_defaults_point_at_something_real_or_say_what_to_set(tmp_path, capsys):
    """Stage 1 and the data mixtures are required keys; stages 2-5 start from the previous stage's run."""
    assert load_config("nvila_stage1_projector").model.path == ""
    for n, name in enumerate(["nvila_stage2_vep", "nvila_stage3_pretrain", "nvila_stage4_image_sft",
                              "nvila_stage5_video_sft"], 1):
        assert load_config(name).model.path == f"runs/nvila-stage{n}"
    assert all(load_config(name).data.mixture == "" for name in SHIPPED)
    assert main(["--config", "nvila_stage1_projector", "data.mixture=x.yaml"]) == 2
    assert "model.path is not set" in capsys.readouterr().err
    assert main(["--config", "nvila_stage2_vep", f"model.path={tmp_path / 'nope'}", "data.mixture=x.yaml"]) == 2
    assert "set model.path=CKPT" in capsys.readouterr().err


def test_a_run_directory_as_model_path_means_its_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "runs" / "nvila-stage1"
    for step in (5, 40, 300):
        (run / f"checkpoint-{step:07d}" / "trainer").mkdir(parents=True)
        if step != 300:  # 300 is incomplete (no trainer/state.json)
            (run / f"checkpoint-{step:07d}" / "trainer" / "state.json").write_text("{}", encoding="utf-8")
    assert load_config("nvila_stage2_vep", [f"model.path={run}"]).model.path == str(run / "checkpoint-0000040")
    ckpt = run / "checkpoint-0000040"
    assert load_config("nvila_stage2_vep", [f"model.path={ckpt}"]).model.path == str(ckpt)
