"""``nvila infer`` on the bundled model prints nothing on stderr at the default log level.

Library deprecation warnings (e.g. transformers' ``past_key_values`` rename) must be fixed where we
call the library, not silenced. A subprocess, because such warnings are emitted once per process
(transformers' ``warning_once``, Python's ``warnings`` registry) and earlier tests would hide them.
``nvila inspect`` runs a subset of this path (config, tokenizer, model on meta).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.mark.slow
def test_infer_on_the_bundled_model_has_an_empty_stderr():
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    argv = ["infer", "--media", str(ASSETS / "example.png"), "--text", "What colour is it?", "--max-new-tokens", "4"]
    proc = subprocess.run([sys.executable, "-m", "nvila", *argv], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert proc.stderr == ""
