"""Past one process's memory: --parallel fsdp shards weights, gradients and optimizer state over
the ranks (FSDP2, here 2 gloo processes on CPU) and trains the same model as DDP and as one
process; Muon orthogonalises each sharded matrix once; checkpoints hold whole tensors, so an FSDP
run resumes exactly under FSDP and on one process too; activation checkpointing moves no number;
a launch that cannot work, or an error on one rank, stops every rank in one line."""

import dataclasses
import glob
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT, cpu_runtime, free_port, read_json, read_metrics, synthetic_data, tiny

import llm

pytestmark = pytest.mark.skipif(not llm.dist.is_available(), reason="this torch build has no torch.distributed")
TIMEOUT = 300
# dense and two MoE variants in one run, both with a shared expert: top-k, and aux-free balance (its expert
# bias a buffer, whole on every rank); top-k alone trains under FSDP in the bf16 and one-process tests below
MODELS = ["--models", "dense,moe", "--n_shared_experts", "1", "--sweep", "balance=aux_loss,aux_free"]
JOB = "moe[balance=aux_free]"  # the one the resume tests resume


def launch(args, nproc=2, env=None, check=True, preexec=None):
    """llm.py under torchrun with nproc gloo processes; the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False,
                       preexec_fn=preexec)
    if check:
        assert p.returncode == 0, f"exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def results(out_dir):
    return read_json(os.path.join(out_dir, "results.json"))


def rows(out_dir):
    return {m["name"]: m for m in results(out_dir)["models"]}


def comparison(corpus_dir, cache):
    """llm.py's arguments for a smoke comparison of 10 steps on the test corpus, its tokens in cache."""
    return ["llm.py", "--preset", "smoke", "--data", str(corpus_dir / "*.txt"), "--cache_dir", str(cache),
            "--max_steps", 10, "--eval_every", 5, "--ckpt_every", 5]


@pytest.fixture(scope="module")
def smoke(corpus_dir, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("fsdp-cache"))
    cfg, *_ = llm.parse_config(["--preset", "smoke", "--data", str(corpus_dir / "*.txt")])
    llm.prepare_data(cfg, cache, log=lambda *a: None)  # what the launches below read
    return comparison(corpus_dir, cache)


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    """The same models trained three ways on the same global batch: out_dir of each, and the cache.
    DDP goes first, on an empty cache: its rank 0 tokenizes and keeps the tokens once the plan fits
    them, then rank 1 reads them; FSDP and the one process read the same cache after it."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    out = {way: str(root / way) for way in ("fsdp", "ddp", "one")}
    args = comparison(corpus_dir, root / "cache")
    launch([*args, *MODELS, "--batch_size", 4, "--out_dir", out["ddp"]])
    out["cache entries"] = os.listdir(root / "cache")
    launch([*args, *MODELS, "--batch_size", 4, "--parallel", "fsdp", "--out_dir", out["fsdp"]])
    assert llm.main([str(a) for a in args[1:]] + MODELS + ["--batch_size", "8", "--out_dir", out["one"]]) == 0
    return out


def evals(out_dir):
    return [r for r in read_metrics(out_dir) if r["kind"] == "eval"]


def test_ddp_on_two_processes_trains_as_one_process_does_on_the_same_global_batch(runs):
    """Every rank takes its slice of the same deterministic sample stream and gradients are averaged:
    each model's losses and accuracy, at the end and at the step-5 evaluation, are one process's."""
    assert len(runs["cache entries"]) == 1  # one whole cache entry, no leftover temporary directory
    one, two = results(runs["one"]), results(runs["ddp"])
    assert (one["environment"]["world_size"], two["environment"]["world_size"]) == (1, 2)
    assert one["dataset"]["cache"] == two["dataset"]["cache"]  # the same tokens
    assert [m["name"] for m in one["models"]] == [m["name"] for m in two["models"]]
    for a, b in zip(one["models"], two["models"]):
        assert a["tokens"] == b["tokens"] == 10 * 8 * 64  # the same global batch: 8 windows of 64 tokens a step
        alone = 1e-6 if a["name"] == "dense" else 1e-3  # see the FSDP test below
        for key in ("val_loss", "train_loss"):
            assert b[key] == pytest.approx(a[key], rel=alone), (a["name"], key)
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-3)
    e1, e2 = evals(runs["one"]), evals(runs["ddp"])
    assert [(r["model"], r["step"]) for r in e1] == [(r["model"], r["step"]) for r in e2]
    assert {r["step"] for r in e1} == {5, 10}
    for r1, r2 in zip(e1, e2):  # the intermediate evaluations agree too, not just the end points
        assert r2["val_loss"] == pytest.approx(r1["val_loss"], rel=1e-6 if r1["model"] == "dense" else 1e-3)
    for name in {r["model"] for r in e1}:  # and training moved the models: trained models compared, not inits
        first, last = (r["val_loss"] for r in e1 if r["model"] == name and r["step"] in (5, 10))
        assert last < first, name


def test_fsdp_trains_every_variant_to_ddp_s_and_one_process_s_losses_over_10_steps(runs):
    fsdp, ddp, one = (rows(runs[w]) for w in ("fsdp", "ddp", "one"))
    assert len(fsdp) == 3 and fsdp.keys() == ddp.keys() == one.keys()
    for name, row in fsdp.items():
        assert row["steps"] == 10 and row["tokens"] == 10 * 8 * 64
        # one process sums the global batch's gradients in another order: a dense model moves by
        # 1e-8, a MoE by up to 4e-4, as a few near-tied router decisions flip
        alone = 1e-6 if name == "dense" else 1e-3
        for key in ("val_loss", "train_loss"):
            assert row[key] == pytest.approx(ddp[name][key], rel=1e-6), (name, key)
            assert row[key] == pytest.approx(one[name][key], rel=alone), (name, key)
    assert results(runs["fsdp"])["environment"]["world_size"] == 2


def test_each_rank_holds_about_half_the_state_and_a_sharded_muon_step_equals_an_unsharded_one(tmp_path):
    """3 experts on 2 ranks: rank 0 holds 2 of each stack, rank 1 one; each rank's parameters,
    gradients and optimizer state together make the whole, each about half of it, as size plans."""
    launch(["tests/fsdp_probe.py", tmp_path])
    ranks = []
    for r in (0, 1):
        with open(tmp_path / f"rank{r}.json") as f:
            ranks.append(json.load(f))
    whole = ranks[0]["whole_params"]
    assert [r["local_experts"] for r in ranks] == [2, 1]
    assert sum(r["params"] for r in ranks) == sum(r["grads"] for r in ranks) == whole
    for r in ranks:
        assert 0.35 * whole < r["params"] < 0.65 * whole  # uneven only by the odd expert
        assert r["plan"]["weights"] == pytest.approx(whole / 2, rel=1e-3)
        assert 0.35 < r["optimizer"] / (2 * r["plan"]["optimizer"]) < 0.65
        assert r["max_difference"] <= 1e-6  # Newton-Schulz once per matrix, on its owner: the same update
        assert r["skipped_change"] == 0.0  # a NaN on rank 1 skipped the step on every rank
    # each matrix (every expert of every stack counted) orthogonalised once, on one rank
    assert ranks[0]["orthogonalised"] + ranks[1]["orthogonalised"] == ranks[0]["matrices"]
    assert 0 < ranks[0]["orthogonalised"] < ranks[0]["matrices"]


def copy_with_pending(run, job, tmp_path, name):
    """A copy of a finished run as a kill after the job's step-5 checkpoint would leave it."""
    copy = str(tmp_path / name)
    shutil.copytree(run, copy)
    state = llm.load_run(copy)
    for j in state.jobs:
        if j.id == job:
            j.status, j.row = "pending", None
    state.save(llm.RunDir(copy))
    shutil.rmtree(os.path.join(llm.RunDir(copy).ckpt(job), "step-0000010"))
    return copy


def test_an_fsdp_run_resumes_exactly_under_fsdp_and_within_tolerance_on_one_process(runs, tmp_path):
    job = JOB
    again = copy_with_pending(runs["fsdp"], job, tmp_path, "fsdp-again")
    launch(["llm.py", "--resume", again])
    assert (rows(again)[job]["val_loss"], rows(again)[job]["train_loss"]) == \
        (rows(runs["fsdp"])[job]["val_loss"], rows(runs["fsdp"])[job]["train_loss"])
    alone = copy_with_pending(runs["fsdp"], job, tmp_path, "one-process")  # 2 processes of 4 windows each
    assert llm.main(["--resume", alone, "--parallel", "ddp"]) == 0  # one process of 8: the same global batch
    assert rows(alone)[job]["val_loss"] == pytest.approx(rows(runs["fsdp"])[job]["val_loss"], rel=1e-3)
    assert rows(alone)[job]["config"]["batch_size"] == 8 and rows(alone)[job]["config"]["parallel"] == "ddp"


def test_an_fsdp_run_resumes_on_four_processes_and_refuses_three_that_cannot_split_its_steps(runs, tmp_path,
                                                                                             monkeypatch, capsys):
    """Its steps took 8 windows (2 processes of 4): 4 processes take 2 each, with whole experts (4 over
    4 ranks); 3 processes cannot split 8 windows, which is one line and exit 2 on each rank before
    their world forms (so here rank 0 of 3 alone, in this process, says it)."""
    job = JOB
    wider = copy_with_pending(runs["fsdp"], job, tmp_path, "four")
    launch(["llm.py", "--resume", wider], nproc=4)
    assert rows(wider)[job]["val_loss"] == pytest.approx(rows(runs["fsdp"])[job]["val_loss"], rel=1e-3)
    assert rows(wider)[job]["config"]["batch_size"] == 2 and rows(wider)[job]["steps"] == 10
    uneven = copy_with_pending(runs["fsdp"], job, tmp_path, "three")
    def files():  # but the lock file, which the refused resume took and let go
        return {p: os.path.getmtime(p) for p in glob.glob(os.path.join(uneven, "**"), recursive=True)
                if not p.endswith("run.lock")}
    before = files()
    for name, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():  # what torchrun --nproc_per_node 3 sets
        monkeypatch.setenv(name, value)
    assert llm.main(["--resume", uneven]) == 2
    assert capsys.readouterr().err == ("llm.py: error: --resume: the run's steps took 8 windows each, which 3 "
                                       "processes x 1 micro-batches cannot split evenly\n")
    assert not llm.dist.is_initialized()
    assert files() == before


def test_bf16_fsdp_with_accumulation_and_activation_checkpointing_trains_as_bf16_ddp(smoke, tmp_path):
    """bf16 autocast on CPU: FSDP gathers the blocks' weights in bf16 (the router's and the root's in
    fp32) and reduce-scatters every micro-batch; DDP casts under autocast and reduces once."""
    args = [*smoke, "--models", "dense,moe", "--max_steps", 10, "--dtype", "bf16", "--batch_size", 2,
            "--gradient_accumulation_steps", 2]
    launch([*args, "--out_dir", tmp_path / "ddp"])
    launch([*args, "--parallel", "fsdp", "--activation_checkpointing", "true", "--out_dir", tmp_path / "fsdp"])
    ddp, fsdp = rows(tmp_path / "ddp"), rows(tmp_path / "fsdp")
    for name in ("dense", "moe"):
        assert fsdp[name]["tokens"] == ddp[name]["tokens"] == 10 * 8 * 64
        for key in ("val_loss", "train_loss"):
            assert fsdp[name][key] == pytest.approx(ddp[name][key], rel=1e-4), (name, key)


def test_activation_checkpointing_moves_no_loss_and_plans_less_memory():
    data = synthetic_data()
    for kw in ({}, {"balance": "aux_free"}, {"routing": "expert_choice"}):
        cfg = tiny(vocab_size=64, max_steps=8, eval_every=4, eval_batches=1, batch_size=4, noise_std=0.1,
                   dropout=0.1, **kw)
        plain = llm.train_model("m", cfg, data, cpu_runtime())
        recomputed = llm.train_model("m", dataclasses.replace(cfg, activation_checkpointing=True), data, cpu_runtime())
        assert (plain["val_loss"], plain["train_loss"]) == (recomputed["val_loss"], recomputed["train_loss"]), kw
    seed = llm.Config(vocab_size=49152)
    assert llm.activation_bytes(dataclasses.replace(seed, activation_checkpointing=True)) < \
        0.6 * llm.activation_bytes(seed)


def test_size_plans_each_process_s_memory_under_ddp_and_fsdp(capsys):
    assert llm.main(["size", "--preset", "smoke", "--vocab_size", "512", "--world", "4", "--parallel", "fsdp"]) == 0
    out = capsys.readouterr().out
    size = llm.model_size(llm.Config(**llm.PRESETS["smoke"], vocab_size=512))
    assert f"weights {size.weight_bytes / 4 / 2**20:,.1f} MiB (fp32, 1/4 of the whole)" in " ".join(out.split())
    assert "in flight" in out and "the root whole, the largest block's weights twice" in out
    assert llm.main(["size", "--preset", "smoke", "--vocab_size", "512", "--world", "4"]) == 0
    out = capsys.readouterr().out
    assert "the whole on every process" in out and "DDP's gradient buckets" in out


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "launch: WORLD_SIZE is 2 but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not set"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "launch: WORLD_SIZE, RANK, LOCAL_RANK and MASTER_PORT must be integers"),
    ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "launch: RANK 2 of WORLD_SIZE 2"),
])
def test_an_incomplete_launch_exits_2_in_one_line_before_anything_is_made(env, message, tmp_path, monkeypatch,
                                                                         capsys):
    for name, value in env.items():  # in this process: what a launcher would have set
        monkeypatch.setenv(name, value)
    assert llm.main(["--preset", "smoke", "--out_dir", str(tmp_path / "o"), "--cache_dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llm.py: error: {message}") and len(err.splitlines()) == 1, err
    assert not os.listdir(tmp_path)


# A world that does not form within --dist_timeout: tests/test_bad_input.py (two real processes, one line each)


def test_an_error_on_rank_0_stops_every_rank_with_its_message_within_seconds(smoke, tmp_path):
    """Rank 0 cannot write its first checkpoint (a file-size limit stands in for a full disk): both
    ranks stop, rank 1 with rank 0's message, and nobody waits at a barrier."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))

    started = time.monotonic()
    p = launch([*smoke, "--models", "dense", "--ckpt_every", 5, "--parallel", "fsdp", "--out_dir", tmp_path / "o"],
               check=False, preexec=small_files)
    assert time.monotonic() - started < 120 and p.returncode != 0
    # rank 0's progress bar ends without a newline, so a message may follow it on the same line
    assert re.search(r"llm\.py: \S+model\.safetensors: File too large; resume with", p.stderr), p.stderr[-3000:]
    assert re.search(r"llm\.py: rank 0 stopped the run: .*File too large", p.stderr), p.stderr[-3000:]
    assert not glob.glob(str(tmp_path / "o" / "ckpt" / "*" / "step-*"))


def test_an_error_on_rank_1_alone_ends_every_rank_within_seconds(smoke, tmp_path):
    """Rank 1 fails mid-training (a sitecustomize makes its fourth loss raise) while rank 0 waits in a
    collective: torchrun ends rank 0 too, and the run exits non-zero with rank 1's message."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import torch.nn.functional as F\n"
        "    real, calls = F.cross_entropy, []\n"
        "    def failing(*args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) > 3:\n"
        "            raise RuntimeError('injected failure on rank 1')\n"
        "        return real(*args, **kwargs)\n"
        "    F.cross_entropy = failing\n")
    path = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    started = time.monotonic()
    p = launch([*smoke, "--models", "dense", "--parallel", "fsdp", "--out_dir", tmp_path / "o"], check=False,
               env={"PYTHONPATH": path})
    assert time.monotonic() - started < 120 and p.returncode != 0
    assert "injected failure on rank 1" in p.stderr, p.stderr[-3000:]


def test_fsdp_runs_compiled_and_says_how_it_runs(smoke, tmp_path):
    p = launch([*smoke, "--models", "dense", "--max_steps", 2, "--parallel", "fsdp", "--compile", "on",
                "--activation_checkpointing", "true", "--out_dir", tmp_path / "o"])
    assert ("device: cpu, float32, compile on, 2 processes, FSDP (weights, gradients and optimizer state sharded), "
            "activation checkpointing") in p.stdout
    assert rows(tmp_path / "o")["dense"]["steps"] == 2


def test_fsdp_on_one_process_trains_as_a_plain_run_within_fp32_rounding(smoke, tmp_path):
    """World 1: FSDP's one-process group shards nothing away, and moves no number beyond rounding:
    its DTensors take other kernels (the gradient norm over per-parameter norms, for one), whose
    fp32 sums may round differently on another CPU (9e-8 apart on an Intel Xeon, equal on an AMD
    EPYC), far below what a changed computation moves (1e-3 or more at 10 steps)."""
    args = [str(a) for a in smoke[1:]] + ["--models", "dense,moe", "--max_steps", "10", "--eval_every", "5"]
    assert llm.main(args + ["--out_dir", str(tmp_path / "plain")]) == 0
    assert llm.main(args + ["--parallel", "fsdp", "--out_dir", str(tmp_path / "fsdp")]) == 0
    assert not llm.dist.is_initialized()  # the run took its group down again
    plain, fsdp, keys = rows(tmp_path / "plain"), rows(tmp_path / "fsdp"), ("val_loss", "train_loss")
    for name in ("dense", "moe"):
        assert [fsdp[name][k] for k in keys] == pytest.approx([plain[name][k] for k in keys], rel=1e-6, abs=0)


def test_muon_refuses_parameters_fsdp_sharded_unless_given_their_sharded_step():
    """A DTensor is no matrix Muon can orthogonalise alone: without Sharding.muon_update it is refused,
    not stepped as a local shard (which would orthogonalise a slice of each matrix)."""
    cfg = tiny(parallel="fsdp")
    runtime = llm.make_runtime(cfg)  # one process: a world of 1, which FSDP still shards over
    try:
        model = llm.shard_model(llm.Transformer(cfg), runtime)
        with pytest.raises(ValueError, match="parameters sharded by FSDP need sharded="):
            llm.make_optimizers(model, cfg)
        muon, _ = llm.make_optimizers(model, cfg, sharded=runtime.fsdp.muon_update)
        assert muon.sharded_update is not None
    finally:
        llm.dist.destroy_process_group()
