"""The bundled SynthVILA model localizes in time: ``nvila infer`` on a held-out ``video_localize`` clip
(a frame directory with a declared fps) answers an interval in seconds inside the clip (issue 19)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nvila.cli import main
from nvila.config import NVILAConfig
from nvila.bundled import default_model_path
from nvila.data.synthetic import generate_eval_split, get_family


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_infer_on_a_held_out_localization_clip_prints_seconds(tmp_path, capsys):
    assert NVILAConfig.from_pretrained(default_model_path()).num_time_tokens > 0
    record = json.loads(generate_eval_split("video_localize", 1, tmp_path).read_text().splitlines()[0])
    argv = ["infer", "--media", str(tmp_path / record["video"]), "--video-fps", str(record["fps"]),
            "--text", get_family("video_localize").question, "--max-new-tokens", "8", "--threads", "1"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [segment] = report["segments"][:1]
    assert 0 <= segment[0] <= segment[1] <= record["duration"], report["answer"]
    assert "<t" not in report["answer"]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == report["answer"]  # the human report prints the seconds


def test_num_time_tokens_that_disagrees_with_the_tokenizer_is_one_line(tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    config = json.loads((model / "config.json").read_text())
    held = config["num_time_tokens"]
    config["num_time_tokens"] = held - 1  # the tokenizer holds one time token more than the config says
    (model / "config.json").write_text(json.dumps(config))
    assert main(["infer", "--model", str(model), "--text", "hi", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nvila: error: num_time_tokens is") and f"holds {held} time tokens" in err
    assert len(err.splitlines()) == 1
