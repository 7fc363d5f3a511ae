"""The bundled SynthVILA model localizes in time: ``nvila infer`` on a held-out ``video_localize`` clip
(a frame directory with a declared fps) answers an interval in seconds inside the clip (issue 19)."""

from __future__ import annotations

import json

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
