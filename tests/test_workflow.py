"""The research workflow around a comparison: checkpoints and exact resume (SIGKILL, Ctrl-C, damaged
files), non-finite steps, patience, seeds with Welch statistics, sweeps, upcycling, and the
generate / experts / size subcommands.

Everything runs offline on CPU on the `corpus_dir` fixture with the smoke preset and a handful of
steps. One token cache and one finished run are shared by the module; every other run writes under
tmp_path. Real processes are used only where a signal must reach one (SIGKILL, SIGINT).
"""

import dataclasses
import errno
import glob
import hashlib
import json
import math
import os
import pathlib
import shutil
import signal

import helpers
import numpy as np
import pytest
import torch
from helpers import (
    PROCESS_TIMEOUT,
    cpu_runtime,
    logs_of,
    read_json,
    read_metrics,
    smoke_process,
    synthetic_data,
    wait_for_files,
)
from torch.utils.flop_counter import FlopCounterMode

import llm

PNG = b"\x89PNG\r\n\x1a\n"


def run_main(argv):
    try:
        return llm.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        return e.code


def quiet(*args, **kwargs):
    pass


def error_lines(err):
    """The lines of stderr that are not progress bars or the GPU monitor's notice."""
    lines = [l.strip() for l in err.replace("\r", "\n").splitlines()]
    return [l for l in lines if l.startswith("llm.py")]


def tiny(**kw):
    return helpers.tiny(**{"max_seq_len": 32, "vocab_size": 64, **kw})


# ----------------------------------------------------------------------------------------------
# Shared fixtures: one token cache, one finished smoke run (dense and moe)


@pytest.fixture(scope="module")
def data_glob(corpus_dir):
    return str(corpus_dir / "*.txt")


@pytest.fixture(scope="module")
def cache_root(data_glob, tmp_path_factory):
    """The corpus tokenized once, before any process could race to build it."""
    root = str(tmp_path_factory.mktemp("workflow-cache"))
    cfg, *_ = llm.parse_config(["--preset", "smoke", "--data", data_glob])
    llm.prepare_data(cfg, root, log=quiet)
    return root


@pytest.fixture(scope="module")
def smoke(data_glob, cache_root):
    """The arguments every harness run here starts with."""
    return ["--preset", "smoke", "--data", data_glob, "--cache_dir", cache_root]


@pytest.fixture(scope="module")
def finished_run(smoke, tmp_path_factory):
    """A finished smoke comparison of dense and moe (read-only for the tests, except the files
    `experts` adds)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert run_main(smoke + ["--models", "dense,moe", "--max_steps", 10, "--eval_every", 10, "--out_dir", out]) == 0
    return out


# ----------------------------------------------------------------------------------------------
# 1-3. Checkpoints: exact resume after SIGKILL, Ctrl-C, damaged files


def test_resume_after_sigkill_equals_an_uninterrupted_run(smoke, tmp_path, capsys):
    args = smoke + ["--models", "dense,moe", "--max_steps", 100, "--ckpt_every", 10, "--eval_every", 50]
    a, b = str(tmp_path / "A"), str(tmp_path / "B")
    proc = smoke_process(args, a, str(tmp_path), "killed")
    wait_for_files(os.path.join(a, "ckpt", "moe", "step-*"), proc)  # dense done, moe part-way
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    logs_of(proc)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(a, "results.json"))
    with open(os.path.join(a, "metrics.jsonl"), "a") as f:  # as if killed halfway through a line
        f.write('{"model": "moe", "kind": "tr')

    capsys.readouterr()
    assert run_main(["--resume", a]) == 0  # in this process: what was killed was the other one
    resumed = capsys.readouterr().out
    assert "=== dense === finished earlier" in resumed
    assert "dense step" not in resumed  # the finished model was neither trained nor evaluated again
    assert "moe: resumed from " in resumed and "(step 0)" not in resumed

    assert run_main(args + ["--out_dir", b]) == 0  # the same comparison, uninterrupted
    ra, rb = read_json(os.path.join(a, "results.json")), read_json(os.path.join(b, "results.json"))
    assert [m["name"] for m in ra["models"]] == [m["name"] for m in rb["models"]] == ["dense", "moe"]
    for ma, mb in zip(ra["models"], rb["models"]):
        assert ma["val_loss"] == mb["val_loss"], ma["name"]
        assert ma["train_loss"] == mb["train_loss"], ma["name"]
        assert ma["steps"] == mb["steps"] == 100

    ka, kb = read_metrics(a), read_metrics(b)
    keys = [(r["model"], r["kind"], r["step"]) for r in ka]
    assert len(keys) == len(set(keys)), "a record was logged twice across the resume"
    assert keys == [(r["model"], r["kind"], r["step"]) for r in kb]
    loss = lambda r: r["loss"] if r["kind"] == "train" else r["val_loss"]
    assert [loss(r) for r in ka] == [loss(r) for r in kb]  # every logged loss, before and after the resume


def test_resume_drops_a_half_written_last_metrics_line_and_refuses_a_damaged_one_elsewhere(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write('{"step": 1}\n{"step": 2}\n{"st')
    assert llm.read_metrics_for_resume(path) == [{"step": 1}, {"step": 2}]
    assert read_metrics(str(tmp_path)) == [{"step": 1}, {"step": 2}]  # rewritten without the fragment
    with open(path, "w") as f:
        f.write('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(llm.UsageError, match="line 2 is not JSON"):
        llm.read_metrics_for_resume(path)


def test_ctrl_c_saves_a_checkpoint_prints_the_resume_command_and_exits_130(smoke, tmp_path):
    out = str(tmp_path / "run")
    proc = smoke_process(smoke + ["--models", "dense", "--max_steps", 400, "--ckpt_every", 10, "--eval_every", 100],
                         out, str(tmp_path), "interrupted")
    wait_for_files(os.path.join(out, "ckpt", "dense", "step-*"), proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    stdout, stderr = logs_of(proc)
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert f"resume with: python llm.py --resume {out}" in stdout
    assert "Traceback" not in stderr
    saved = stdout.split("checkpoint saved: ")[1].splitlines()[0]
    assert os.path.dirname(saved) == os.path.join(out, "ckpt", "dense")
    assert llm.verify_checkpoint(saved) is None
    state = read_json(os.path.join(saved, "state.json"))
    assert 0 < state["step"] < 400
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_a_damaged_checkpoint_is_refused_with_a_message_and_the_previous_one_is_used(tmp_path):
    from safetensors.torch import load_file
    data, ckpt = synthetic_data(), str(tmp_path / "ckpt")
    cfg = tiny(max_steps=6, ckpt_every=2, eval_every=6, eval_batches=2, batch_size=4, log_every=2)
    whole = llm.train_model("m", cfg, data, cpu_runtime(), ckpt_dir=ckpt)  # checkpoints at 2, 4 and 6
    assert sorted(os.listdir(ckpt)) == ["step-0000004", "step-0000006"]  # the two newest, no temporary left

    # the files need no pickle: safetensors for the weights, torch.load(weights_only=True) for the rest
    newest, previous = (os.path.join(ckpt, d) for d in ("step-0000006", "step-0000004"))
    weights = load_file(os.path.join(newest, "model.safetensors"))
    assert set(weights) == set(llm.Transformer(cfg).state_dict())
    optim = torch.load(os.path.join(newest, "optim.pt"), map_location="cpu", weights_only=True)
    assert set(optim) >= {"optimizers", "schedulers", "rng"} and len(optim["optimizers"]) == 2

    path = os.path.join(newest, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    messages = []
    found, state = llm.latest_checkpoint(ckpt, log=messages.append)
    assert found == previous and state["step"] == 4
    assert len(messages) == 1 and "damaged" in messages[0] and "step-0000006" in messages[0]

    # the previous checkpoint continues the run exactly
    again = llm.train_model("m", cfg, data, cpu_runtime(), resume_from=found)
    assert again["val_loss"] == whole["val_loss"] and again["train_loss"] == whole["train_loss"]

    # a flipped byte (same size) is caught by the checksum: nothing intact is left
    path = os.path.join(previous, "optim.pt")
    raw = bytearray(pathlib.Path(path).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    pathlib.Path(path).write_bytes(bytes(raw))
    messages = []
    assert llm.latest_checkpoint(ckpt, log=messages.append) == (None, None)
    assert len(messages) == 2 and all("damaged" in m for m in messages)


# ----------------------------------------------------------------------------------------------
# 4-6. Using trained models: KV cache, generate, experts


KV_CONFIGS = {
    "dense": {"moe_layers": "none"},
    "moe": {},
    "moe-gqa": {"n_heads": 4, "n_kv_heads": 2, "moe_layers": "alternate", "n_layers": 3},
    "moe-mqa-swiglu": {"n_kv_heads": 1, "ffn": "swiglu", "n_shared_experts": 1},
    # capacity routing drops tokens depending on the rest of the batch (documented), so decoding one
    # token at a time equals the full forward only where nothing overflows
    "switch-no-overflow": {"routing": "switch", "capacity_factor": 4.0},  # capacity = every token
}


@pytest.mark.parametrize("name", list(KV_CONFIGS))
def test_kv_cache_greedy_decoding_equals_full_recomputation(name):
    torch.manual_seed(0)
    cfg = tiny(**KV_CONFIGS[name])
    model = llm.Transformer(cfg).eval()
    with torch.no_grad():  # weights large enough that attention and routing are far from uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.2)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))

    hd = cfg.d_model // cfg.n_heads
    caches = [llm.KVCache(2, cfg.kv_heads, 24, hd, torch.device("cpu"), torch.float32) for _ in model.blocks]
    with torch.no_grad():
        full = model(idx)[0]  # (B, T, V)
        parts = [model(idx[:, :8], caches, 0)[0], model(idx[:, 8:12], caches, 8)[0]]  # a prompt, then a chunk
        parts += [model(idx[:, t : t + 1], caches, t)[0] for t in range(12, 24)]  # then one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)

    for prompt in (idx[:1, :3], idx[:, :5]):
        cached = llm.generate(model, prompt, 20, temperature=0, use_cache=True)
        recomputed = llm.generate(model, prompt, 20, temperature=0, use_cache=False)
        assert cached.shape == (prompt.shape[0], prompt.shape[1] + 20)
        assert torch.equal(cached, recomputed)


def test_generate_cli_prints_text_and_tokens_per_second(finished_run, capsys):
    prompt = "ab cd ef"
    argv = ["generate", "--run", finished_run, "--model", "moe", "--prompt", prompt, "--max_new_tokens", 12,
            "--temperature", 0]
    assert run_main(argv) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt) and len(out.strip()) > len(prompt)
    assert "12 tokens in" in err and "tokens/s" in err and "KV cache" in err
    assert run_main(argv) == 0  # greedy: the same text again
    assert capsys.readouterr().out == out
    assert run_main(argv + ["--no_cache"]) == 0  # and the same without the cache
    out2, err2 = capsys.readouterr()
    assert out2 == out and "no cache" in err2
    assert run_main(["generate", "--run", finished_run, "--model", "dense", "--max_new_tokens", 4,
                     "--temperature", 0]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt5"], "--model gpt5: not in"),
    (["--max_new_tokens", "0"], "max_new_tokens must be positive"),
    (["--prompt", "ab " * 80, "--max_new_tokens", "8"], "exceed max_seq_len (64)"),
])
def test_bad_generate_arguments_exit_2_with_one_line(finished_run, args, message, capsys):
    assert run_main(["generate", "--run", finished_run] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("command, model", [("generate", "moe"), ("experts", "moe"), ("export", "dense")])
def test_a_damaged_run_tokenizer_exits_2_in_one_line_naming_it(finished_run, command, model, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    tokenizer = os.path.join(run, "tokenizer.json")
    with open(tokenizer, "r+b") as f:
        f.truncate(100)
    extra = ["--out", str(tmp_path / "export")] if command == "export" else []
    assert run_main([command, "--run", run, "--model", model, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tokenizer} is not a tokenizer the run saved" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "export")


def test_generate_without_a_run_directory_exits_2_with_one_line(tmp_path, capsys):
    assert run_main(["generate", "--run", tmp_path / "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a run directory" in err and len(err.splitlines()) == 1


def test_experts_cli_writes_json_and_heatmap(finished_run, capsys):
    assert run_main(["experts", "--run", finished_run, "--min_count", 2]) == 0
    capsys.readouterr()
    report = read_json(os.path.join(finished_run, "experts.json"))
    job = next(j for j in read_json(os.path.join(finished_run, "run.json"))["jobs"] if j["name"] == "moe")
    cfg = llm.config_from_saved(job["config"])
    assert [l["layer"] for l in report["layers"]] == cfg.moe_layer_ids() == [0, 1]
    assert report["min_count"] == 2 and report["windows"] > 0
    for layer in report["layers"]:
        assert len(layer["load"]) == cfg.num_experts == len(layer["experts"])
        assert sum(layer["load"]) == pytest.approx(1.0, abs=1e-5)
        assert any(e["tokens"] for e in layer["experts"])
        for e in layer["experts"]:
            assert e["load"] == pytest.approx(layer["load"][e["expert"]])
            for t in e["tokens"]:
                assert 0 <= t["routed"] <= t["seen"] and t["seen"] >= 2
                assert 0 <= t["share"] <= 1 and t["share"] == pytest.approx(t["routed"] / t["seen"])
    with open(os.path.join(finished_run, "experts_heatmap.png"), "rb") as f:
        assert f.read(8) == PNG


def test_experts_of_a_later_seed_read_the_run_split_not_one_made_with_the_job_seed(smoke, cache_root, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_main(smoke + ["--models", "moe", "--seeds", "1,2", "--max_steps", 2, "--eval_every", 2,
                             "--out_dir", out]) == 0
    caches = sorted(os.listdir(cache_root))
    assert run_main(["experts", "--run", out, "--model", "moe-s2", "--min_count", 2]) == 0
    assert "tokenizing" not in capsys.readouterr().out
    assert sorted(os.listdir(cache_root)) == caches  # no second split (and tokenizer) built for seed 2


def test_experts_of_a_dense_model_exit_2(finished_run, capsys):
    assert run_main(["experts", "--run", finished_run, "--model", "dense"]) == 2
    err = capsys.readouterr().err.strip()
    assert "a dense model has no experts" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# 7-8. Size calculator and Welch statistics


SIZE_CONFIGS = {
    "dense": {"moe_layers": "none"},
    "moe-alternate": {"moe_layers": "alternate", "n_layers": 4},
    "swiglu-shared-narrow": {"ffn": "swiglu", "n_shared_experts": 2, "expert_d_ff": 24, "num_experts": 6,
                             "expert_top_k": 3},
    "gqa": {"n_kv_heads": 2, "moe_layers": "1"},
}


@pytest.mark.parametrize("name", list(SIZE_CONFIGS))
def test_size_calculator_agrees_with_the_built_model(name):
    torch.manual_seed(0)
    cfg = tiny(**SIZE_CONFIGS[name])
    size = llm.model_size(cfg)
    model = llm.Transformer(cfg)
    muon, adamw = llm.make_optimizers(model, cfg)
    numel = lambda opt: sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert size.total == sum(p.numel() for p in model.parameters())
    assert size.muon_params == numel(muon) and size.adamw_params == numel(adamw)
    assert size.weight_bytes == sum(p.numel() * p.element_size() for p in model.parameters())

    logits, lb, z = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    (logits.square().mean() + lb + z).backward()
    assert size.grad_bytes == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    with FlopCounterMode(display=False) as flops:
        muon.step()
    assert size.muon_flops_per_step == flops.get_total_flops()  # the Newton-Schulz matmuls, counted by torch
    # the whole step: those matmuls, and per parameter Muon's and AdamW's elementwise arithmetic
    assert size.optimizer_flops_per_step == size.muon_flops_per_step + 12 * numel(muon) + 14 * numel(adamw)
    adamw.step()
    state = sum(v.numel() * v.element_size() for opt in (muon, adamw) for st in opt.state.values()
                for k, v in st.items() if k != "step" and torch.is_tensor(v))
    assert size.optimizer_bytes == state


def test_size_cli_prints_totals_and_rejects_a_bad_config(capsys):
    assert run_main(["size", "--preset", "seed"]) == 0
    out = capsys.readouterr().out
    expected = llm.model_size(dataclasses.replace(llm.Config(), vocab_size=49152))
    for key in ("total", "active", "muon_params", "adamw_params", "flops_per_token", "muon_flops_per_step",
                "optimizer_flops_per_step"):
        line = next(l for l in out.splitlines() if l.split()[:1] == [key])
        assert line.split()[1] == f"{getattr(expected, key):,}"
    assert "training state" in out and "MiB" in out
    assert run_main(["size", "--d_model", 30, "--n_heads", 4]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "llm.py: error: d_model (30) must be divisible by n_heads (4)"


def test_welch_statistics_match_a_hand_computation():
    from scipy import stats
    a, b = [3.1, 2.9, 3.4, 3.0], [2.7, 2.95, 2.6, 2.8, 2.5]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t = (ma - mb) / se
    half = stats.t.ppf(0.975, df) * se
    w = llm.welch(a, b)
    assert w["diff"] == pytest.approx(ma - mb, rel=1e-12)
    assert w["ci95"] == pytest.approx([ma - mb - half, ma - mb + half], rel=1e-9)
    assert w["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert w["n"] == [4, 5]
    assert llm.welch(b, a)["p_value"] == pytest.approx(w["p_value"], rel=1e-9)  # two-sided
    one = llm.welch([3.0], b)
    assert one["ci95"] is None and one["p_value"] is None and one["diff"] == pytest.approx(3.0 - mb)


# ----------------------------------------------------------------------------------------------
# 9-12. Seeds, sweeps, upcycling, patience


def test_seeds_train_every_model_per_seed_and_report_mean_std_and_welch(smoke, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_main(smoke + ["--models", "dense,moe", "--seeds", "1,2", "--max_steps", 4, "--eval_every", 4,
                             "--out_dir", out]) == 0
    printed = capsys.readouterr().out
    results = read_json(os.path.join(out, "results.json"))
    rows = results["models"]
    assert [r["id"] for r in rows] == ["dense-s1", "moe-s1", "dense-s2", "moe-s2"]
    assert [r["seed"] for r in rows] == [1, 1, 2, 2] and results["seeds"] == [1, 2]
    assert [r["config"]["seed"] for r in rows] == [1, 1, 2, 2]
    assert rows[0]["val_loss"] != rows[2]["val_loss"]  # the seed changes the run
    summary = {s["name"]: s for s in results["summary"]}
    assert set(summary) == {"dense", "moe"}
    for name, s in summary.items():
        losses = [r["val_loss"] for r in rows if r["name"] == name]
        assert s["seeds"] == [1, 2]
        assert s["val_loss"] == pytest.approx(np.mean(losses))
        assert s["val_loss_std"] == pytest.approx(np.std(losses, ddof=1))
    (c,) = results["comparisons"]
    assert (c["moe"], c["baseline"]) == ("moe", "dense")
    assert c["diff"] == pytest.approx(summary["moe"]["val_loss"] - summary["dense"]["val_loss"])
    assert len(c["ci95"]) == 2 and c["ci95"][0] <= c["diff"] <= c["ci95"][1] and 0 <= c["p_value"] <= 1
    assert "+-" in printed and "Welch p" in printed and "mean +- std over seeds [1, 2]" in printed


def test_sweep_writes_sweep_json_and_plot_and_a_sorted_summary(smoke, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_main(smoke + ["--models", "dense,moe", "--sweep", "num_experts=2,4", "expert_top_k=1,2",
                             "--max_steps", 4, "--eval_every", 4, "--out_dir", out]) == 0
    printed = capsys.readouterr().out
    sweep = read_json(os.path.join(out, "sweep.json"))
    assert sweep["grid"] == [{"num_experts": e, "expert_top_k": k} for e in (2, 4) for k in (1, 2)]
    losses = [s["val_loss"] for s in sweep["ranked"]]
    assert losses == sorted(losses)
    labels = {f"moe[num_experts={e},expert_top_k={k}]" for e in (2, 4) for k in (1, 2)}
    assert {s["name"] for s in sweep["ranked"]} == labels | {"dense"}
    rows = read_json(os.path.join(out, "results.json"))["models"]
    assert [r["name"] for r in rows].count("dense") == 1  # the baseline is trained once
    for r in rows:
        if r["point"]:
            assert {k: r["config"][k] for k in r["point"]} == r["point"]
    assert len({r["config"]["num_experts"] for r in rows if r["point"]}) == 2
    with open(os.path.join(out, "sweep.png"), "rb") as f:
        assert f.read(8) == PNG
    assert "sweep, best first:" in printed


@pytest.mark.parametrize("sweep, message", [
    (["nope=1"], "--sweep nope=1: expected FIELD=V1,V2"),
    (["num_experts=x"], "--sweep num_experts=x: values must be int"),
    (["expert_top_k=9"], "expert_top_k (9) must not exceed num_experts (4)"),
    (["max_seq_len=32,100000"], "too little text"),
])
def test_a_bad_sweep_exits_2_with_one_line(smoke, tmp_path, sweep, message, capsys):
    out = tmp_path / "run"
    assert run_main(smoke + ["--models", "dense,moe", "--sweep"] + sweep + ["--out_dir", out]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_upcycled_moe_starts_as_the_dense_model(finished_run, smoke, data_glob, cache_root, tmp_path, capsys):
    cfg, *_ = llm.parse_config(["--preset", "smoke", "--data", data_glob])
    assert cfg.moe_layer_ids() == [0, 1] and cfg.expert_top_k == 2 and cfg.norm_topk_prob
    data = llm.prepare_data(cfg, cache_root, log=quiet)
    cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)
    make_init, path = llm.upcycler(finished_run, data, log=quiet)
    init = make_init(cfg)
    dense, _, _, dense_path = llm.load_trained(finished_run, "dense", torch.device("cpu"), log=quiet)
    assert path == dense_path

    torch.manual_seed(123)
    moe = llm.Transformer(cfg)
    init(moe)
    moe.eval()
    x, _ = llm.eval_windows(data.val, cfg.max_seq_len, limit=3).batch(range(3))
    with torch.no_grad():
        want, got = dense(x)[0], moe(x)[0]
        fresh = llm.Transformer(cfg).eval()(x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fresh, want, atol=1e-2)  # the check can tell a model that is not upcycled

    out = str(tmp_path / "up")
    assert run_main(smoke + ["--models", "moe", "--upcycle_from", finished_run, "--max_steps", 4, "--eval_every", 4,
                             "--out_dir", out]) == 0
    (row,) = read_json(os.path.join(out, "results.json"))["models"]
    assert row["upcycled_from"] == dense_path
    assert "upcycled from" in capsys.readouterr().out

    bad = tmp_path / "bad"
    assert run_main(smoke + ["--models", "moe", "--upcycle_from", finished_run, "--d_model", 32, "--out_dir", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "differs in d_model" in err and len(err.splitlines()) == 1
    assert not bad.exists()


def test_upcycling_a_sweep_upcycles_each_grid_point_by_its_own_moe_layers(finished_run, smoke, tmp_path, capsys):
    """Each grid point is its own MoE config: the upcycling must follow the point's MoE layers, not
    the base config's (here the base has MoE in every layer, the first point only in layer 1)."""
    out = str(tmp_path / "up-sweep")
    code = run_main(smoke + ["--models", "moe", "--upcycle_from", finished_run, "--sweep", "moe_layers=1,all",
                             "--max_steps", 2, "--eval_every", 2, "--out_dir", out])
    capsys.readouterr()
    assert code == 0
    rows = read_json(os.path.join(out, "results.json"))["models"]
    assert [r["config"]["moe_layers"] for r in rows] == ["1", "all"]
    assert all(r["upcycled_from"] for r in rows)


def test_patience_stops_a_model_early(smoke, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    real = llm.evaluate  # an evaluation that never improves: the second is no better than the first
    monkeypatch.setattr(llm, "evaluate", lambda *args, **kwargs: {**real(*args, **kwargs), "loss": 5.0})
    assert run_main(smoke + ["--models", "dense", "--patience", 1, "--eval_every", 2,
                             "--max_steps", 20, "--out_dir", out]) == 0
    printed = capsys.readouterr().out
    (row,) = read_json(os.path.join(out, "results.json"))["models"]
    assert row["stopped_early"] is True and row["steps"] == 4  # of max_steps 20
    evals = [r["step"] for r in read_metrics(out) if r["kind"] == "eval"]
    assert evals == [2, 4, 4]  # two periodic evaluations, then the final one where it stopped
    assert "dense: stopped early at step 4 (patience)" in printed


# ----------------------------------------------------------------------------------------------
# 13. Non-finite steps


def nan_cross_entropy(monkeypatch, bad, on_call=lambda n: None):
    """Make training-step losses NaN on the calls (1-based) for which bad(n) is true; evaluation
    (no grad) is untouched. on_call(n) runs before each training call."""
    original = llm.F.cross_entropy
    calls = [0]

    def patched(*args, **kwargs):
        ce = original(*args, **kwargs)
        if not torch.is_grad_enabled():
            return ce
        calls[0] += 1
        on_call(calls[0])
        return ce * float("nan") if bad(calls[0]) else ce

    monkeypatch.setattr(llm.F, "cross_entropy", patched)
    return calls


def test_non_finite_steps_are_skipped_and_counted_and_too_many_in_a_row_stop_the_run(monkeypatch):
    built = []  # (model, optimizers) of each train_model call
    make_optimizers = llm.make_optimizers

    def capture(model, cfg, **kw):
        opts = make_optimizers(model, cfg, **kw)
        built.append((model, opts))
        return opts

    monkeypatch.setattr(llm, "make_optimizers", capture)
    snapshots = {}

    def snapshot(n):  # the weights and all optimizer state going into training step n (1-based)
        model, opts = built[-1]
        tensors = {f"w.{k}": v.clone() for k, v in model.state_dict().items()}
        index = {p: i for i, p in enumerate(model.parameters())}
        for j, opt in enumerate(opts):
            for p, st in opt.state.items():
                for k, v in st.items():
                    tensors[f"opt{j}.{index[p]}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
        snapshots[n] = tensors

    def same(s, t):
        return s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)

    nan_cross_entropy(monkeypatch, bad=lambda n: n in (3, 4), on_call=snapshot)
    data = synthetic_data()
    cfg = tiny(max_steps=10, log_every=5, eval_every=10, eval_batches=2, batch_size=4, max_bad_steps=3)
    records = []
    row = llm.train_model("m", cfg, data, cpu_runtime(), records.append)
    assert same(snapshots[3], snapshots[4]) and same(snapshots[4], snapshots[5])  # steps 3 and 4 skipped
    assert not same(snapshots[5], snapshots[6]) and not same(snapshots[2], snapshots[3])  # the others not
    assert row["skipped_steps"] == 2 and row["steps"] == 10 and math.isfinite(row["val_loss"])
    assert [(r["step"], r["skipped_steps"]) for r in records if r["kind"] == "train"] == [(5, 2), (10, 2)]

    monkeypatch.undo()
    nan_cross_entropy(monkeypatch, bad=lambda n: True)
    with pytest.raises(llm.TrainingError, match=r"max_bad_steps 3\)") as e:
        llm.train_model("m", dataclasses.replace(cfg, log_every=2), data, cpu_runtime())
    assert "last good checkpoint: none" in str(e.value)


def test_under_fp16_the_scalers_skipped_steps_are_counted_and_too_many_in_a_row_stop_the_run(monkeypatch):
    fp16 = llm.Runtime(device=torch.device("cpu"), dtype=torch.float16, compile=False)  # GradScaler on
    cfg = tiny(max_steps=6, log_every=3, eval_every=6, eval_batches=2, batch_size=4, max_bad_steps=3)
    nan_cross_entropy(monkeypatch, bad=lambda n: n == 2)
    records = []
    row = llm.train_model("m", cfg, synthetic_data(), fp16, records.append)
    assert row["skipped_steps"] >= 1
    assert [r["skipped_steps"] >= 1 for r in records if r["kind"] == "train"] == [True] * 2
    monkeypatch.undo()
    nan_cross_entropy(monkeypatch, bad=lambda n: True)
    with pytest.raises(llm.TrainingError, match=r"max_bad_steps 3\)"):
        llm.train_model("m", cfg, synthetic_data(), fp16)


def test_a_run_that_only_gets_non_finite_steps_exits_1_with_one_line(smoke, tmp_path, monkeypatch, capsys):
    nan_cross_entropy(monkeypatch, bad=lambda n: True)
    out = tmp_path / "run"
    assert run_main(smoke + ["--models", "dense", "--max_bad_steps", 3, "--log_every", 2, "--max_steps", 20,
                             "--out_dir", out]) == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith("llm.py: dense: ") and "(max_bad_steps 3)" in line and "Traceback" not in err
    assert not (out / "results.json").exists()


def copy_with_moe_pending(finished_run, tmp_path):
    """A copy of the finished run as a kill would leave it after the moe's checkpoints, before
    run.json marked the moe done."""
    run = str(tmp_path / "run")
    shutil.copytree(finished_run, run)
    state = llm.load_run(run)
    for job in state.jobs:
        if job.name == "moe":
            job.status, job.row = "pending", None
    state.save(llm.RunDir(run))
    return run


def test_resuming_a_model_killed_after_its_final_checkpoint_logs_its_final_evaluation_once(finished_run, tmp_path,
                                                                                          capsys):
    """A kill between the moe's final checkpoint and run.json marking it done (simulated by marking
    it pending again): the resume restores that checkpoint and evaluates once more, so the final
    evaluation record must replace the logged one, not repeat it."""
    run = copy_with_moe_pending(finished_run, tmp_path)
    os.remove(os.path.join(run, "results.json"))
    assert run_main(["--resume", run]) == 0
    capsys.readouterr()
    before = read_json(os.path.join(finished_run, "results.json"))["models"]
    after = read_json(os.path.join(run, "results.json"))["models"]
    assert [(m["name"], m["val_loss"], m["train_loss"]) for m in after] == \
        [(m["name"], m["val_loss"], m["train_loss"]) for m in before]
    keys = [(r["model"], r["kind"], r["step"]) for r in read_metrics(run)]
    assert sorted(k for k in set(keys) if keys.count(k) > 1) == []


# ----------------------------------------------------------------------------------------------
# 14. What --resume and --out_dir refuse


def test_resume_takes_no_other_options_and_needs_a_run_directory(finished_run, tmp_path, capsys):
    for argv in (["--resume", finished_run, "--max_steps", 5], ["--max_steps", 5, "--resume", finished_run],
                 ["--resume", tmp_path]):
        assert run_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("llm.py: error: --")
    assert "not a run directory" in err
    assert run_main([f"--resume={tmp_path}"]) == 2  # the one-word form means the same
    assert "not a run directory" in capsys.readouterr().err


def test_a_new_run_into_a_directory_holding_one_exits_2_and_leaves_it_alone(finished_run, smoke, capsys):
    before = pathlib.Path(finished_run, "run.json").read_bytes()
    assert run_main(smoke + ["--models", "dense", "--out_dir", finished_run]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out_dir {finished_run} holds a run already; continue it with --resume {finished_run}" in err
    assert pathlib.Path(finished_run, "run.json").read_bytes() == before


def test_an_out_dir_that_is_a_file_exits_2_with_one_line_and_leaves_it_alone(smoke, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert run_main(smoke + ["--models", "dense", "--out_dir", path]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out_dir {path} is a file, not a directory" in err and len(err.splitlines()) == 1
    assert path.read_text() == "mine"
    assert run_main(smoke + ["--models", "dense", "--out_dir", path / "run"]) == 2  # under a file: not creatable
    err = capsys.readouterr().err.strip()
    assert f": {path} is a file, not a directory" in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# 15. Reliability: one run per out_dir, OS errors, non-finite runs, damaged files


def test_a_run_holding_an_out_dir_keeps_a_second_fresh_run_and_a_resume_out_naming_its_pid(smoke, tmp_path,
                                                                                           capsys):
    """A second llm.py on one out_dir: a fresh run (before the first wrote run.json) and a --resume
    (after) both exit 2 naming the pid that holds the lock, and leave the first's files alone."""
    out = tmp_path / "run"
    out.mkdir()
    holder = llm.lock_run(str(out))  # as a running llm.py holds it
    try:
        assert run_main(smoke + ["--models", "dense", "--max_steps", 2, "--out_dir", out]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"llm.py: error: --out_dir {out}: another llm.py (pid {os.getpid()}) is running this run"
        assert sorted(os.listdir(out)) == ["run.lock"]  # the holder's lock stays, nothing else was written
    finally:
        os.close(holder)  # the holder ends: its lock goes with it
    assert run_main(smoke + ["--models", "dense", "--max_steps", 2, "--eval_every", 2, "--out_dir", out]) == 0
    capsys.readouterr()
    holder = llm.lock_run(str(out))
    try:
        assert run_main(["--resume", out]) == 2
        assert f"another llm.py (pid {os.getpid()})" in capsys.readouterr().err
    finally:
        os.close(holder)


def test_a_resume_while_another_process_trains_the_run_exits_2_and_a_killed_ones_lock_frees_it(smoke, tmp_path,
                                                                                                  capsys):
    out = str(tmp_path / "run")
    args = smoke + ["--models", "dense", "--max_steps", 400, "--ckpt_every", 10, "--eval_every", 100]
    first = smoke_process(args, out, str(tmp_path), "first")
    wait_for_files(os.path.join(out, "ckpt", "dense", "step-*"), first)
    assert run_main(["--resume", out]) == 2  # the second llm.py: this process
    assert capsys.readouterr().err.strip() == (f"llm.py: error: --out_dir {out}: another llm.py (pid {first.pid}) is "
                                               f"running this run")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert pathlib.Path(out, "run.lock").read_text() == str(first.pid)  # the dead holder's file stays, unlocked
    holder = llm.lock_run(out)  # and can be taken
    os.close(holder)


def test_a_full_disk_mid_run_is_one_line_exit_1_with_the_resume_command_and_the_run_resumes_exactly(
        smoke, tmp_path, monkeypatch, capsys):
    import errno
    real, calls = llm.save_checkpoint, []

    def full_disk(ckpt_dir, *args, **kwargs):  # the second checkpoint finds the disk full
        calls.append(ckpt_dir)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(ckpt_dir, ".tmp-x", "optim.pt"))
        return real(ckpt_dir, *args, **kwargs)

    args = smoke + ["--models", "dense", "--max_steps", 12, "--ckpt_every", 4, "--eval_every", 6]
    a, b = tmp_path / "A", tmp_path / "B"
    monkeypatch.setattr(llm, "save_checkpoint", full_disk)
    assert run_main(args + ["--out_dir", a]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (f"llm.py: {a}/ckpt/dense/.tmp-x/optim.pt: No space left on device; "
                    f"resume with: python llm.py --resume {a}")
    monkeypatch.undo()
    assert run_main(["--resume", a]) == 0  # the disk has room again
    assert run_main(args + ["--out_dir", b]) == 0
    capsys.readouterr()
    (ra,), (rb,) = (read_json(os.path.join(d, "results.json"))["models"] for d in (a, b))
    assert (ra["val_loss"], ra["train_loss"]) == (rb["val_loss"], rb["train_loss"])
    loss = lambda r: r["loss"] if r["kind"] == "train" else r["val_loss"]
    assert [(r["step"], loss(r)) for r in read_metrics(a)] == [(r["step"], loss(r)) for r in read_metrics(b)]


def test_max_bad_steps_stops_the_run_within_that_many_steps_when_log_every_is_larger(monkeypatch):
    nan_cross_entropy(monkeypatch, bad=lambda n: n >= 3)  # from step 3 on: 4 in a row by step 6
    cfg = tiny(max_steps=40, log_every=20, max_bad_steps=4, eval_every=40, eval_batches=1, batch_size=4)
    with pytest.raises(llm.TrainingError, match=r"stopped at step 8;"):  # checked every min(20, 4) steps
        llm.train_model("m", cfg, synthetic_data(), cpu_runtime())


def test_the_last_good_checkpoint_named_holds_finite_weights_written_before_the_bad_steps(monkeypatch, tmp_path):
    """Checkpoints fall due at steps 2, 4, 6 and 8; from step 5 every step is non-finite. The ones at
    6 and 8 are not written (a run of bad steps is under way), so the one named is step 4's."""
    nan_cross_entropy(monkeypatch, bad=lambda n: n >= 5)
    ckpt = str(tmp_path / "ckpt")
    cfg = tiny(max_steps=20, log_every=1, max_bad_steps=5, ckpt_every=2, eval_every=20, eval_batches=1, batch_size=4)
    with pytest.raises(llm.TrainingError, match=r"stopped at step 9; last good checkpoint: (\S+);") as e:
        llm.train_model("m", cfg, synthetic_data(), cpu_runtime(), ckpt_dir=ckpt)
    named = str(e.value).split("last good checkpoint: ")[1].split(";")[0]
    assert named == os.path.join(ckpt, "step-0000004") and sorted(os.listdir(ckpt)) == ["step-0000002", "step-0000004"]
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(named, "model.safetensors")).values())


def test_a_checkpoint_write_that_a_kill_interrupted_is_cleared_by_the_next_one(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / ".tmp-killed").mkdir(parents=True)
    (ckpt / ".tmp-killed" / "optim.pt").write_bytes(b"half")
    cfg = tiny(max_steps=2, ckpt_every=2, eval_every=2, eval_batches=1, batch_size=4, log_every=1)
    llm.train_model("m", cfg, synthetic_data(), cpu_runtime(), ckpt_dir=str(ckpt))
    assert sorted(os.listdir(ckpt)) == ["step-0000002"]


def test_a_checkpoint_that_keeps_its_running_loss_sums_in_progress_as_older_ones_did_resumes_exactly(
        smoke, tmp_path, capsys):
    """Checkpoints written before the running loss sums moved out of Progress hold them in
    progress.running: a resume from one logs the same mean losses as the uninterrupted run."""
    args = smoke + ["--models", "dense", "--max_steps", 10, "--ckpt_every", 4, "--eval_every", 5, "--log_every", 3]
    whole, resumed = str(tmp_path / "whole"), str(tmp_path / "resumed")
    assert run_main(args + ["--out_dir", whole]) == 0
    shutil.copytree(whole, resumed)
    ckpt = os.path.join(resumed, "ckpt", "dense")
    shutil.rmtree(os.path.join(ckpt, "step-0000010"))  # killed after step 8's checkpoint
    state = llm.load_run(resumed)
    state.jobs[0].status, state.jobs[0].row = "pending", None
    state.save(llm.RunDir(resumed))
    path = os.path.join(ckpt, "step-0000008")
    saved = read_json(os.path.join(path, "state.json"))
    running = saved.pop("running")
    assert any(running)  # steps 7 and 8 are summed, not yet logged (at step 9)
    saved["progress"]["running"] = running  # the older layout
    data = json.dumps(saved).encode()
    with open(os.path.join(path, "state.json"), "wb") as f:
        f.write(data)
    manifest = read_json(os.path.join(path, "manifest.json"))
    manifest["state.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    assert run_main(["--resume", resumed]) == 0
    capsys.readouterr()
    logged = [[(r["step"], r["loss"]) for r in read_metrics(d) if r["kind"] == "train"] for d in (whole, resumed)]
    assert logged[0] == logged[1] and (9, logged[0][2][1]) in logged[1]


def test_resuming_a_model_whose_every_checkpoint_is_damaged_exits_2_in_one_line(finished_run, tmp_path, capsys):
    run = copy_with_moe_pending(finished_run, tmp_path)
    for path in glob.glob(os.path.join(run, "ckpt", "moe", "step-*", "model.safetensors")):
        with open(path, "r+b") as f:
            f.truncate(10)
    assert run_main(["--resume", run]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == (f"llm.py: error: --resume {run}: every checkpoint of moe is damaged; "
                           f"remove {run}/ckpt/moe to train it again from step 0")
    assert "is damaged" in out  # each checkpoint's damage, as it was tried


def test_data_dir_reads_its_regular_files_recursively_in_order_skipping_hidden_ones(tmp_path):
    d = tmp_path / "texts"
    for name in ("b.txt", "a/z.md", "a/.hidden.txt", ".git/config", "c"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(f"the document {name}\n")
    assert llm.local_files(str(d)) == [str(d / "a/z.md"), str(d / "b.txt"), str(d / "c")]
    cfg = llm.Config(data=str(d), val_fraction=0.34)
    docs = llm.LocalDocuments(cfg, llm.source_spec(cfg), pool=None)
    assert docs.paths  # three files: each read by path when tokenized
    texts = [llm.read_text(p) for _, p in docs.items()]
    assert sorted(texts) == ["the document a/z.md\n", "the document b.txt\n", "the document c\n"]
    assert docs.documents == 3 and docs.val_documents == 1


def test_two_fresh_runs_started_at_once_on_one_out_dir_one_trains_the_other_exits_2(smoke, tmp_path):
    out = str(tmp_path / "run")
    args = smoke + ["--models", "dense", "--max_steps", 20, "--eval_every", 10]
    procs = [smoke_process(args, out, str(tmp_path), name) for name in ("a", "b")]
    codes = [p.wait(timeout=PROCESS_TIMEOUT) for p in procs]
    assert sorted(codes) == [0, 2], [logs_of(p) for p in procs]
    loser, winner = (procs[0], procs[1]) if codes[0] == 2 else (procs[1], procs[0])
    (line,) = logs_of(loser)[1].strip().splitlines()
    assert line in (f"llm.py: error: --out_dir {out}: another llm.py (pid {winner.pid}) is running this run",
                    f"llm.py: error: --out_dir {out} holds a run already; continue it with --resume {out}")
    keys = [(r["model"], r["kind"], r["step"]) for r in read_metrics(out)]
    assert len(keys) == len(set(keys)) and read_json(os.path.join(out, "results.json"))["models"][0]["steps"] == 20


def test_a_checkpoint_write_the_os_refuses_is_an_oserror_naming_the_file_and_leaves_no_partial_checkpoint(tmp_path):
    """A real failed write (the file-size limit stands in for a full disk): the error names the file
    being written, and neither a temporary directory nor a step directory is left."""
    import resource
    cfg = tiny(max_steps=1)
    model = llm.Transformer(cfg)
    optimizers = llm.make_optimizers(model, cfg)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in optimizers]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    weights = model.state_dict()
    training = llm.training_state([o.state_dict() for o in optimizers], schedulers, scaler, torch.device("cpu"))
    ckpt = tmp_path / "ckpt"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OSError) as raised:
            llm.save_checkpoint(str(ckpt), weights, training, {"step": 1})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert raised.value.strerror == os.strerror(errno.EFBIG)
    assert raised.value.filename.endswith("model.safetensors") and str(ckpt) in raised.value.filename
    assert os.listdir(ckpt) == []
    path = llm.save_checkpoint(str(ckpt), weights, training, {"step": 1})  # room again
    assert llm.verify_checkpoint(path) is None


def test_an_upcycling_that_does_not_fit_exits_2_before_a_new_token_cache_is_kept(finished_run, data_glob, tmp_path,
                                                                                 capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert run_main(["--preset", "smoke", "--data", data_glob, "--cache_dir", cache, "--models", "moe",
                     "--upcycle_from", finished_run, "--d_model", 32, "--out_dir", out]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "differs in d_model" in line
    assert not cache.exists() and not out.exists()


def test_a_saved_run_whose_float_values_a_later_rule_forbids_still_generates_but_does_not_resume(
        finished_run, tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(finished_run, run)
    state = read_json(run / "run.json")
    state["base_config"]["adamw_lr"] = 0.0  # allowed once, refused now
    for job in state["jobs"]:
        job["config"]["adamw_lr"] = 0.0
    (run / "run.json").write_text(json.dumps(state))
    assert run_main(["generate", "--run", run, "--max_new_tokens", 2, "--temperature", 0]) == 0
    capsys.readouterr()
    assert run_main(["--resume", run]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "base_config: adamw_lr must be positive; got 0.0" in line


def test_generate_samples_with_any_positive_temperature_and_top_p_however_small(finished_run, capsys):
    greedy = ["generate", "--run", finished_run, "--max_new_tokens", 6, "--temperature", 0]
    assert run_main(greedy) == 0
    want = capsys.readouterr().out
    for tiny_option in (["--temperature", "1e-300"], ["--top_p", "1e-300"]):
        assert run_main(greedy[:-2] + tiny_option) == 0
        assert capsys.readouterr().out == want  # both leave the most likely token alone: greedy
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert llm.sample_next(logits, 5e-324, 0, 1.0, torch.Generator().manual_seed(0)).tolist() == [0]


def test_experts_with_a_cache_dir_that_cannot_be_made_exits_2_in_one_line(finished_run, capsys):
    assert run_main(["experts", "--run", finished_run, "--cache_dir", "/proc/llm-no-such-dir"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == "llm.py: error: --cache_dir /proc/llm-no-such-dir: No such file or directory"


def test_a_swept_vocab_size_of_0_is_the_tokenizers_as_a_configured_one_is(smoke, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(smoke + ["--models", "moe", "--sweep", "vocab_size=0,600", "--max_steps", 1, "--eval_every", 1,
                             "--eval_batches", 1, "--out_dir", out]) == 0
    capsys.readouterr()
    jobs = read_json(out / "run.json")["jobs"]
    tokenizer = read_json(out / "run.json")["dataset"]["vocab_size"]
    assert [j["config"]["vocab_size"] for j in jobs] == [tokenizer, 600]


def test_data_dir_skips_run_directories_and_token_caches_so_it_never_reads_its_own_output(tmp_path):
    d = tmp_path / "texts"
    files = {"a.txt": "text", "run/run.lock": "123", "run/notes.txt": "x", "old/run.json": "{}",
             "old/metrics.jsonl": "", "old/ckpt/x.txt": "y", "data_cache/e/meta.json": "{}",
             "data_cache/e/train.npy": "z", "data_cache/e/val.npy": "z", "data_cache/e/tokenizer.json": "{}",
             "notes/run.json": "a user's own file of that name", "notes/meta.json": "another"}
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    assert llm.local_files(str(d)) == [str(d / "a.txt"), str(d / "notes/meta.json"), str(d / "notes/run.json")]


def test_remove_empty_removes_nested_directories_given_in_any_order(tmp_path):
    made = [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "c", tmp_path / "c" / "d" / "e", tmp_path / "c" / "d"]
    for d in made:
        d.mkdir(parents=True, exist_ok=True)
    (tmp_path / "c" / "keep").write_text("x")
    llm.remove_empty([str(d) for d in made])
    assert sorted(os.listdir(tmp_path)) == ["c"] and os.listdir(tmp_path / "c") == ["keep"]


def test_a_run_json_written_by_another_run_while_this_one_waited_for_the_lock_is_not_overwritten(
        smoke, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = llm.lock_run

    def another_run_finished_first(out_dir):  # it wrote run.json after our check, released before our lock
        (pathlib.Path(out_dir) / "run.json").write_text("{}")
        return real(out_dir)

    monkeypatch.setattr(llm, "lock_run", another_run_finished_first)
    assert run_main(smoke + ["--models", "dense", "--out_dir", out]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"llm.py: error: --out_dir {out} holds a run already; continue it with --resume {out}"
    assert (out / "run.json").read_text() == "{}"


def test_an_out_dir_whose_file_system_cannot_lock_exits_2_in_one_line_and_leaves_nothing(smoke, tmp_path,
                                                                                           monkeypatch, capsys):
    import fcntl

    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "run"
    assert run_main(smoke + ["--models", "dense", "--out_dir", out]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == (f"llm.py: error: --out_dir {out}: cannot lock {out}/run.lock (No locks available); "
                    f"use a local directory")
    assert not out.exists()


def test_a_lock_file_removed_by_its_holder_as_we_lock_it_is_not_taken(tmp_path):
    """The file we lock must be the one at the path: a holder that ends unlinks run.lock, and a lock
    on the unlinked file would let a third process lock a new one beside us."""
    out = str(tmp_path)
    first = llm.lock_run(out)
    os.remove(os.path.join(out, "run.lock"))  # as the first run does when it stops before run.json
    second = llm.lock_run(out)  # locks the new file at the path, not the first's
    try:
        assert os.fstat(second).st_ino == os.stat(os.path.join(out, "run.lock")).st_ino
        with pytest.raises(llm.UsageError, match="another llm.py"):
            llm.lock_run(out)
    finally:
        os.close(first)
        os.close(second)


def test_two_runs_building_one_token_cache_at_once_both_use_it(data_glob, tmp_path, monkeypatch):
    cfg, *_ = llm.parse_config(["--preset", "smoke", "--data", data_glob])
    root = str(tmp_path / "cache")
    real = os.replace

    def other_run_finishes_first(src, dst):
        if os.path.basename(src).startswith(".tmp-cache-"):
            shutil.copytree(src, dst)  # the other run's identical cache lands between our rmtree and rename
        return real(src, dst)

    monkeypatch.setattr(os, "replace", other_run_finishes_first)
    data = llm.prepare_data(cfg, root, log=quiet)
    monkeypatch.undo()
    assert [e for e in os.listdir(root) if e.startswith(".tmp")] == []
    again, why = llm.load_cache(data.cache_dir)
    assert why == "ok" and np.array_equal(again.train, data.train)


def test_a_run_s_files_get_the_permissions_of_any_new_file(finished_run):
    """Files written atomically (through a temporary file, which is owner-only) end as any new file
    would under the umask, so that others can read a shared run's results."""
    umask = os.umask(0)
    os.umask(umask)
    manifest = glob.glob(os.path.join(finished_run, "ckpt", "moe", "step-*", "manifest.json"))[0]
    for path in (os.path.join(finished_run, "results.json"), os.path.join(finished_run, "run.json"), manifest):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path
