"""
Specification of distributed training in llm.py: with the same global batch, two gloo processes
(torch.distributed.run) train the same model as one process does, step for step, because every
rank takes its slice of the same deterministic sample stream and gradients are averaged.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 240


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} ran past {TIMEOUT}s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert p.returncode == 0, (f"{' '.join(cmd)} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\n"
                               f"stderr:\n{p.stderr[-8000:]}")
    return p


def results(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(corpus_dir, tmp_path):
    common = ["llm.py", "--preset", "smoke", "--models", "dense", "--data", str(corpus_dir / "*.txt"),
              "--max_steps", "12", "--eval_every", "6", "--cache_dir", str(tmp_path / "cache")]
    single_dir, ddp_dir = str(tmp_path / "single"), str(tmp_path / "ddp")
    # the distributed run goes first, on an empty cache: rank 0 tokenizes and keeps the tokens once the
    # plan fits them, then rank 1 reads them; the single-process run reads the same cache after it
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), *common, "--batch_size", "4", "--out_dir", ddp_dir])
    assert len(os.listdir(tmp_path / "cache")) == 1  # one whole cache entry, no leftover temporary directory
    run([sys.executable, *common, "--batch_size", "8", "--out_dir", single_dir])

    one, two = results(single_dir), results(ddp_dir)
    assert one["environment"]["world_size"] == 1
    assert two["environment"]["world_size"] == 2
    assert one["dataset"]["cache"] == two["dataset"]["cache"]  # the same tokens
    a, b = one["models"][0], two["models"][0]
    assert a["name"] == b["name"] == "dense"
    assert a["tokens"] == b["tokens"] == 12 * 8 * 64  # the same global batch: 8 windows of 64 tokens a step
    for key in ("val_loss", "train_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), f"{key}: 2 processes {b[key]}, 1 process {a[key]}"
    assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-3)

    # the intermediate evaluation (step 6) agrees too, not just the end point
    def evals(out_dir):
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if r["kind"] == "eval"]
    e1, e2 = evals(single_dir), evals(ddp_dir)
    assert [r["step"] for r in e1] == [r["step"] for r in e2] == [6, 12]
    for r1, r2 in zip(e1, e2):
        assert r2["val_loss"] == pytest.approx(r1["val_loss"], rel=1e-4)

    # and training actually moved the model: the check compares trained models, not two initialisations
    assert e1[-1]["val_loss"] < e1[0]["val_loss"]
