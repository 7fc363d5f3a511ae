"""Hugging Face Hub ids as checkpoints (``nvila.checkpoint.resolve_checkpoint``), offline.

A temporary Hugging Face cache is filled in huggingface_hub's layout
(``<cache>/models--ORG--NAME/snapshots/<commit>/...`` plus ``refs/<branch>`` holding the commit)
with the bundled SynthVILA checkpoint, and every load by id is compared with loading that
directory. huggingface_hub reads its environment once, at import, so the fixture sets both the
environment variables and the module constants it derived from them. The only network used is
loopback: a closed port for "unreachable" and a stub Hub that answers "not found".
"""

from __future__ import annotations

import http.server
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("huggingface_hub")

import huggingface_hub  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

from nvila import NVILAForConditionalGeneration, NVILAProcessor  # noqa: E402
from nvila.bundled import default_model_path  # noqa: E402
from nvila.checkpoint import CheckpointError, hub_patterns, resolve_checkpoint  # noqa: E402
from nvila.cli import main  # noqa: E402
from nvila.config import NVILAConfig  # noqa: E402

REPO_ID = "nvila-test/SynthVILA"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ASSETS = Path(__file__).resolve().parents[2] / "assets"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding ``REPO_ID`` at ``COMMIT`` (branch main, tag v1)."""
    home = tmp_path / "hf"
    cache = home / "hub"
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    # Snapshot files are links into the bundled checkpoint, as the real cache links into blobs/.
    shutil.copytree(default_model_path(), repo / "snapshots" / COMMIT, copy_function=lambda s, d: Path(d).symlink_to(s))
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def online(monkeypatch, endpoint: str) -> None:
    """Downloads on, against ``endpoint`` (loopback only)."""
    assert endpoint.startswith("http://127.0.0.1:")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)


def one_line_error(call) -> str:
    with pytest.raises(CheckpointError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------- id rule
@pytest.mark.parametrize("text", ["./org/name", "../org/name", "/org/name", "~/org/name", "org/name/extra",
                                  "name", "org/", "/name", ".org/name", "org/-name", "org/name@", "org/name@a b"])
def test_paths_that_are_not_hub_ids_stay_paths(text, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # no Hub look-up may be attempted
    assert resolve_checkpoint(text) == Path(text)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        NVILAForConditionalGeneration.from_pretrained(text)


def test_an_existing_local_directory_wins_over_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    local = tmp_path / "Efficient-Large-Model" / "NVILA-8B"
    shutil.copytree(default_model_path(), local)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("Efficient-Large-Model/NVILA-8B") == Path("Efficient-Large-Model/NVILA-8B")
    assert NVILAConfig.from_pretrained("Efficient-Large-Model/NVILA-8B") == NVILAConfig.from_pretrained(local)


def test_only_configs_tokenizers_templates_and_safetensors_are_fetched():
    """Both layouts: the vila component directories and the hf root."""
    listing = ["config.json", "README.md", "modeling_vila.py", "training_args.bin", "model.safetensors",
               "chat_template.jinja", "processor_config.json", "model.safetensors.index.json", "processing_nvila.py",
               "llm/config.json", "llm/generation_config.json", "llm/tokenizer.json", "llm/tokenizer_config.json",
               "llm/vocab.json", "llm/merges.txt", "llm/special_tokens_map.json", "llm/added_tokens.json",
               "llm/chat_template.jinja", "llm/model.safetensors.index.json", "llm/model-00001-of-00002.safetensors",
               "llm/model-00002-of-00002.safetensors", "llm/pytorch_model.bin", "llm/tokenizer.py",
               "vision_tower/config.json", "vision_tower/preprocessor_config.json", "vision_tower/model.safetensors",
               "vision_tower/optimizer.pt", "mm_projector/config.json", "mm_projector/model.safetensors",
               "mm_projector/mm_projector.pth"]
    configs = {"config.json", "chat_template.jinja", "processor_config.json", "model.safetensors.index.json",
               "llm/config.json", "llm/generation_config.json", "llm/tokenizer.json",
               "llm/tokenizer_config.json", "llm/vocab.json", "llm/merges.txt", "llm/special_tokens_map.json",
               "llm/added_tokens.json", "llm/chat_template.jinja", "llm/model.safetensors.index.json",
               "vision_tower/config.json", "vision_tower/preprocessor_config.json", "mm_projector/config.json"}
    weights = {"model.safetensors", "llm/model-00001-of-00002.safetensors", "llm/model-00002-of-00002.safetensors",
               "vision_tower/model.safetensors", "mm_projector/model.safetensors"}
    assert set(filter_repo_objects(listing, allow_patterns=hub_patterns(weights=False))) == configs
    assert set(filter_repo_objects(listing, allow_patterns=hub_patterns())) == configs | weights


# ---------------------------------------------------------------------------------- loading by id
def test_load_by_id_offline_equals_loading_the_directory(hub):
    local = default_model_path()
    snapshot = hub / "models--nvila-test--SynthVILA" / "snapshots" / COMMIT
    for spec in (REPO_ID, f"{REPO_ID}@{COMMIT}", f"{REPO_ID}@v1", f"{REPO_ID}@main"):
        assert resolve_checkpoint(spec) == snapshot
    assert resolve_checkpoint(REPO_ID, weights=False, local_files_only=True) == snapshot

    by_id = NVILAForConditionalGeneration.from_pretrained(f"{REPO_ID}@v1")
    by_dir = NVILAForConditionalGeneration.from_pretrained(local)
    assert by_id.state_dict().keys() == by_dir.state_dict().keys()
    assert all(torch.equal(v, by_dir.state_dict()[k]) for k, v in by_id.state_dict().items())
    assert by_id.ids == by_dir.ids
    assert NVILAConfig.from_pretrained(REPO_ID) == NVILAConfig.from_pretrained(local)

    messages = [{"role": "user", "content": [{"type": "image", "image": str(ASSETS / "example.png")},
                                             {"type": "text", "text": "What colour?"}]}]
    inputs = {}
    for name, spec in (("id", REPO_ID), ("dir", local)):
        inputs[name], _ = NVILAProcessor.from_pretrained(spec, local_files_only=True).prepare(
            [messages], add_generation_prompt=True)
    assert torch.equal(inputs["id"]["input_ids"], inputs["dir"]["input_ids"])
    assert torch.equal(inputs["id"]["pixel_values"], inputs["dir"]["pixel_values"])
    out_id = by_id.generate(**inputs["id"], max_new_tokens=4)
    out_dir = by_dir.generate(**inputs["dir"], max_new_tokens=4)
    assert torch.equal(out_id, out_dir)


def test_a_cached_id_loads_when_the_hub_is_unreachable(hub, monkeypatch):
    online(monkeypatch, "http://127.0.0.1:9")  # nothing listens on the discard port
    assert resolve_checkpoint(REPO_ID) == hub / "models--nvila-test--SynthVILA" / "snapshots" / COMMIT


# --------------------------------------------------------------------------------- failure modes
def test_offline_and_not_cached(hub):
    message = one_line_error(lambda: NVILAForConditionalGeneration.from_pretrained("nvila-test/Missing"))
    assert "not in the Hugging Face cache" in message and str(hub) in message and "HF_HUB_OFFLINE=1" in message
    message = one_line_error(lambda: resolve_checkpoint(f"{REPO_ID}@no-such-branch"))
    assert "not in the Hugging Face cache" in message


def test_local_files_only_and_not_cached(hub, monkeypatch):
    online(monkeypatch, "http://127.0.0.1:9")
    message = one_line_error(lambda: NVILAProcessor.from_pretrained("nvila-test/Missing", local_files_only=True))
    assert "not in the Hugging Face cache" in message and "local_files_only" in message


def test_huggingface_hub_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    message = one_line_error(lambda: NVILAConfig.from_pretrained("nvila-test/Missing"))
    assert message.startswith("nvila-test/Missing: no such local directory") and "pip install 'nvila[hub]'" in message


def test_hub_unreachable(hub, monkeypatch):
    online(monkeypatch, "http://127.0.0.1:9")
    message = one_line_error(lambda: resolve_checkpoint("nvila-test/Missing"))
    assert "could not be reached" in message and "http://127.0.0.1:9" in message


class _StubHub(http.server.BaseHTTPRequestHandler):
    """Answers every API call with the Hub's 404: revision 'nope' is missing, any other repo too."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        code = "RevisionNotFound" if "/revision/nope" in self.path else "RepoNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_hub(hub, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    online(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def test_repository_not_found(stub_hub):
    message = one_line_error(lambda: resolve_checkpoint("nvila-test/Missing"))
    assert message.startswith("nvila-test/Missing: no such local directory, and no model repository nvila-test/Missing")


def test_revision_not_found(stub_hub):
    message = one_line_error(lambda: resolve_checkpoint(f"{REPO_ID}@nope"))
    assert message == f"{REPO_ID}@nope: the Hugging Face Hub repository {REPO_ID} has no revision 'nope'"


# -------------------------------------------------------------------------------------------- CLI
def test_cli_by_id_offline(hub, capsys):
    assert main(["inspect", REPO_ID, "--json"]) == 0
    by_id = capsys.readouterr().out
    assert main(["inspect", str(default_model_path()), "--json"]) == 0
    by_dir = capsys.readouterr().out
    assert by_id.replace(REPO_ID, "PATH") == by_dir.replace(str(default_model_path()), "PATH")

    argv = ["--media", str(ASSETS / "example.png"), "--text", "What colour?", "--max-new-tokens", "3", "--json"]
    reports = {}
    for name, model in (("id", REPO_ID), ("dir", str(default_model_path()))):
        assert main(["infer", "--model", model, *argv]) == 0
        reports[name] = json.loads(capsys.readouterr().out)
        assert reports[name].pop("model") == model
        reports[name].pop("timings")
    assert reports["id"] == reports["dir"]


@pytest.mark.parametrize("argv", [["inspect", "nvila-test/Missing"],
                                  ["infer", "--model", "nvila-test/Missing", "--text", "hi"]])
def test_cli_error_is_one_line(hub, capsys, argv):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("nvila: error: nvila-test/Missing: no such local directory")
