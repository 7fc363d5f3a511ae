"""scripts/gpu_check.py, the GPU check of the Engine v2 issue, runs its CPU dry run cleanly (so that the
script does not rot between the sessions that are lent a GPU). The speed section is left out: it
builds two 2B-shaped models (~15 GiB in float32)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "table.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu",
                           "--sections", "parity,engine,quant,fp8", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == {"parity", "engine", "quant", "fp8"}
    assert [r for r in rows if r["verdict"] == "FAIL"] == []
    assert all(r["verdict"] == "ok" for r in rows if "fwd+bwd" not in r["check"]), rows  # timings: no verdict


def test_gpu_check_without_cuda_is_a_one_line_error(monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: error: no CUDA device") and len(err.splitlines()) == 1
    assert gpu_check.main(["--device", "cpu", "--sections", "parity,nonsense"]) == 2
    assert "unknown sections ['nonsense']" in capsys.readouterr().err
