"""lmms-eval with the nvila plugin (``nvila.lmms``), offline, on a local task this file writes.

The task: a few SynthVILA eval records (single image, two images, a frame-directory video) flattened
into a local JSONL that ``datasets``' json loader reads, a YAML config and a ``utils.py`` that turns
each record into lmms-eval messages and scores it with ``nvila.eval.normalise`` exact match, the
rule of ``nvila eval``. lmms-eval runs as a subprocess (``python -m lmms_eval``) with the Hub and
``datasets`` offline; the plugin is found through the ``lmms_eval.models`` entry point of the
installed nvila.

* ``test_lmms_eval_matches_nvila_eval``: the plugin's accuracy and per-record answers equal
  ``nvila eval`` (``nvila.eval.evaluate``) on the same records, for a tiny checkpoint and the bundled
  model.
* ``test_openai_model_against_nvila_serve``: lmms-eval's OpenAI-compatible model pointed at
  ``nvila serve`` on 127.0.0.1 gives the plugin's answers (greedy).
* ``test_loglikelihood_*``: the plugin scores a continuation on the model's logits; scoring the
  engine's own greedy answer reproduces the engine's per-token log-probabilities and is greedy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nvila.bundled import default_model_path
from nvila.data.llava import read_records
from nvila.data.synthetic import generate_eval_splits
from nvila.eval import evaluate, normalise

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "server"))
from server_testing import LiveServer  # noqa: E402

TASK = "nvila_synth"
FAMILIES = ["coarse_colour", "compare_count", "video_colour"]  # one image, two images, a video

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_messages: !function utils.doc_to_messages
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 16
  temperature: 0
  until: []
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

# The same records as a multiple-choice task: each family's answers are the choices; lmms-eval ranks
# them by loglikelihood (``--force_simple``: it builds such requests only for simple models).
MC_TASK_YAML = """\
task: {task}_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: choices
doc_to_target: target
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = '''\
"""The local SynthVILA task: records -> lmms-eval messages; nvila eval's exact-match rule."""
from nvila.eval import normalise


def doc_to_visual(doc):
    return list(doc["images"]) + ([doc["video"]] if doc["video"] else [])


def doc_to_text(doc):
    return doc["question"]


def doc_to_messages(doc):
    parts = [{"type": "image", "url": p} for p in doc["images"]]
    parts += [{"type": "video", "url": doc["video"]}] if doc["video"] else []
    return [{"role": "user", "content": parts + [{"type": "text", "text": doc["question"]}]}]


def process_results(doc, results):
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
'''


def write_task(tmp: Path, per_family: int = 2) -> tuple[Path, Path]:
    """SynthVILA eval records -> (the task directory for ``--include_path``, the records' JSONL for nvila eval)."""
    records_file = generate_eval_splits(FAMILIES, per_family, tmp / "synth")
    rows = []
    for r in read_records(records_file):
        images = r.get("image") or []
        turns = r["conversations"]
        rows.append({"id": r["id"], "family": r["meta"]["family"],
                     "images": [str(records_file.parent / p) for p in ([images] if isinstance(images, str) else images)],
                     "video": str(records_file.parent / r["video"]) if r.get("video") else "",
                     "question": turns[0]["value"].replace("<image>", "").replace("<video>", "").strip(),
                     "answer": turns[1]["value"]})
    for row in rows:
        row["choices"] = sorted({r["answer"] for r in rows if r["family"] == row["family"]} | {"none"})
        row["target"] = row["choices"].index(row["answer"])
    task_dir = tmp / "task"
    task_dir.mkdir()
    data = task_dir / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (task_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data), encoding="utf-8")
    (task_dir / f"{TASK}_mc.yaml").write_text(MC_TASK_YAML.format(task=TASK, data=data), encoding="utf-8")
    (task_dir / "utils.py").write_text(TASK_UTILS, encoding="utf-8")
    return task_dir, records_file


def run_lmms_eval(model: str, model_args: str, task_dir: Path, out: Path, *extra: str, task: str = TASK,
                  metric: str = "exact_match") -> tuple[float, dict[str, str]]:
    """``python -m lmms_eval`` offline -> (the task's ``metric``, {record id: answer})."""
    pythonpath = os.pathsep.join(filter(None, [str(task_dir), os.environ.get("PYTHONPATH")]))  # the task's utils.py
    env = {**os.environ, "HF_HOME": str(out / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": pythonpath}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks", task,
           "--include_path", str(task_dir), "--output_path", str(out), "--log_samples", "--verbosity", "WARNING",
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out, timeout=600)
    log = proc.stdout[-3000:] + proc.stderr[-6000:]
    found = list(out.rglob("*_results.json"))  # lmms-eval logs an evaluation error and still exits 0
    assert proc.returncode == 0 and "Error during evaluation" not in proc.stderr and len(found) == 1, log
    results = json.loads(found[0].read_text())
    accuracy = results["results"][task][f"{metric},none"]
    ids = [json.loads(line)["id"] for line in (task_dir / "data.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for p in out.rglob(f"*samples_{task}.jsonl") for line in p.read_text().splitlines()]
    answers = {ids[s["doc_id"]]: _text(s["filtered_resps"]) for s in samples}
    return accuracy, answers


def _text(resps):
    """The answer in a logged sample's ``filtered_resps`` (a string, or nested lists of one); for a
    multiple-choice task, the list of per-choice responses."""
    while isinstance(resps, list) and len(resps) == 1:
        resps = resps[0]
    return resps


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    return write_task(tmp_path_factory.mktemp("lmms-task"))


@pytest.fixture(scope="module")
def plugin_runs(task, tiny_checkpoints, tmp_path_factory) -> dict[str, dict]:
    """For the tiny NVILA-Lite and the bundled model: the plugin's (accuracy, answers) and nvila eval's result."""
    task_dir, records = task
    runs = {}
    for name, path in {"tiny": tiny_checkpoints["nvila-lite"], "bundled": default_model_path()}.items():
        out = tmp_path_factory.mktemp(f"lmms-{name}")
        accuracy, answers = run_lmms_eval("nvila", f"pretrained={path},device=cpu", task_dir, out, "--batch_size", "4")
        reference = evaluate(path, records, batch_size=4, progress=False)
        runs[name] = {"path": path, "accuracy": accuracy, "answers": answers, "reference": reference}
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "bundled"])
def test_lmms_eval_matches_nvila_eval(plugin_runs, name):
    run = plugin_runs[name]
    reference = run["reference"]
    assert len(run["answers"]) == reference["n"] == 2 * len(FAMILIES)
    assert run["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-12)
    assert {k: v.strip() for k, v in run["answers"].items()} == {s["id"]: s["prediction"] for s in reference["samples"]}
    if name == "bundled":  # the trained model answers some of them, so equal accuracy is not just 0 == 0
        assert reference["accuracy"] > 0


@pytest.mark.slow
def test_openai_model_against_nvila_serve(plugin_runs, task, tmp_path):
    """lmms-eval's ``openai`` model (videos sent as file:// URLs) against ``nvila serve``: the plugin's answers.

    With ``pass_video_url`` the model also sends vLLM's ``media_io_kwargs.video.num_frames`` (its
    ``max_frames_num``); it is set to the checkpoint's own frame count, which the plugin uses."""
    from nvila.config import NVILAConfig

    task_dir, _ = task
    run = plugin_runs["bundled"]
    frames = NVILAConfig.from_pretrained(run["path"]).num_video_frames
    server = LiveServer(["--model", str(run["path"]), "--port", "0", "--allow-local-media", "--max-batch-size", "4",
                         "--threads", "1"])
    try:
        model_args = (f"model=synthvila,base_url={server.url}/v1,api_key=unused,pass_video_url=True,num_concurrent=2,"
                      f"max_frames_num={frames}")
        _, answers = run_lmms_eval("openai", model_args, task_dir, tmp_path)
    finally:
        server.stop()
    assert {k: v.strip() for k, v in answers.items()} == {k: v.strip() for k, v in run["answers"].items()}


@pytest.fixture(scope="module")
def simple_model(tiny_checkpoints):
    """The plugin's simple-protocol class on the tiny NVILA-Lite, with a one-document task."""
    from nvila.lmms import NVILASimple

    model = NVILASimple(pretrained=str(tiny_checkpoints["nvila-lite"]), device="cpu")
    yield model
    model.engine.shutdown()


@pytest.mark.slow
def test_loglikelihood_scores_the_engines_greedy_answer(simple_model, tmp_path):
    """Scoring the engine's greedy tokens on the logits gives the engine's own log-probabilities, greedy."""
    from PIL import Image

    from nvila.engine import GenerationRequest

    image = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Colour?"}]}]
    events = list(simple_model.engine.submit(GenerationRequest(messages=messages, max_tokens=5, ignore_eos=True,
                                                               logprobs=True)))
    ids = [e.token_id for e in events if e.token_id is not None]
    logprobs = [lp.logprob for e in events for lp in e.logprobs or []]
    assert len(ids) == len(logprobs) == 5
    score, greedy = simple_model._score(messages, ids)
    assert greedy
    assert score == pytest.approx(sum(logprobs), abs=1e-4)
    worse, greedy = simple_model._score(messages, ids[:-1] + [ids[-1] - 1 if ids[-1] else 1])  # not the argmax at the end
    assert not greedy and worse < score


@pytest.mark.slow
def test_loglikelihood_requests_in_lmms_evals_simple_protocol(simple_model, tmp_path):
    """``loglikelihood`` reads lmms-eval's (context, continuation, doc_to_visual, doc_id, task, split)
    requests, media first, and answers each with its continuation's negative log-likelihood (lmms-eval
    ranks multiple choices by the smallest)."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    image = Image.new("RGB", (40, 30), (30, 30, 200))
    simple_model.task_dict = {"t": {"test": [{"image": image}]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    requests = [Instance("loglikelihood", ("Colour?", f" {c}", visual, 0, "t", "test"), i,
                         {"task": "t", "doc_id": 0, "repeats": 1}) for i, c in enumerate(["blue", "red"])]
    scores = [r.text for r in simple_model.loglikelihood(requests)]  # (-log p, greedy) in a GenerationResult
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    expected = [simple_model._score(messages, " blue"), simple_model._score(messages, " red")]
    assert scores == [(-logp, greedy) for logp, greedy in expected]
    assert all(isinstance(s, float) and s > 0 and isinstance(g, bool) for s, g in scores)


@pytest.mark.slow
def test_multiple_choice_task_ranks_choices_by_the_plugins_loglikelihood(task, tmp_path):
    """A multiple-choice task runs with ``--force_simple``: lmms-eval's accuracy is that of ranking each
    record's choices by the plugin's scores, computed here in process."""
    from nvila.lmms import NVILASimple

    task_dir, _ = task
    accuracy, _ = run_lmms_eval("nvila", "device=cpu", task_dir, tmp_path, "--force_simple", "--batch_size", "4",
                                task=f"{TASK}_mc", metric="acc")
    model = NVILASimple(device="cpu")  # the bundled model, as pretrained= left out above
    rows = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    hits = []
    for row in rows:
        parts = ([{"type": "image", "image": p} for p in row["images"]]
                 + ([{"type": "video", "video": row["video"]}] if row["video"] else [])
                 + [{"type": "text", "text": row["question"]}])
        scores = [model._score([{"role": "user", "content": parts}], c)[0] for c in row["choices"]]
        hits.append(max(range(len(scores)), key=scores.__getitem__) == row["target"])
    model.engine.shutdown()
    assert accuracy == pytest.approx(sum(hits) / len(hits), abs=1e-12)
    assert accuracy > 0
