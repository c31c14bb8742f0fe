"""The command line: bad input is one line and exit 2 with nothing written; a smoke run writes
the documented results."""

import json
import math
import os
import subprocess
import sys

import pytest

import llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(argv):
    try:
        return llm.main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("args, message", [
    (["--d_model", "100", "--n_heads", "8"], "d_model (100) must be divisible by n_heads (8)"),
    (["--expert_top_k", "9", "--num_experts", "8"], "expert_top_k (9) must not exceed num_experts (8)"),
    (["--not_a_field", "3"], "unrecognized arguments: --not_a_field"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--batch_size", "0"], "batch_size must be positive"),
    (["--max_steps", "-5"], "max_steps must be positive"),
    (["--d_model", "abc"], "argument --d_model: invalid int value: 'abc'"),
    (["--norm_topk_prob", "maybe"], "argument --norm_topk_prob"),
    (["--ffn", "relu"], "ffn must be one of silu, swiglu"),
    (["--moe_layers", "0,9"], "moe_layers: layer ids must lie in 0..1"),
    (["--models", "dense,gpt5"], "--models: unknown model gpt5"),
    (["--data", "no/such/file.txt"], "--data no/such/file.txt: no such file"),
    (["--data", "hf:"], "--data hf:: expected hf:NAME[:CONFIG]"),
])
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_main(["--preset", "smoke", "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache")] + args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_smollm_without_hub_or_cache_exits_2_and_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(llm, "hub_reachable", lambda timeout: False)
    code = run_main(["--preset", "smoke", "--data", "smollm", "--out_dir", str(tmp_path / "out"),
                     "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Hugging Face Hub is unreachable" in err and "--data shakespeare" in err
    assert not (tmp_path / "out").exists()


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "llm.py", "--d_model", "30", "--n_heads", "4", "--out_dir",
                        str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2
    assert p.stderr.strip() == "llm.py: error: d_model (30) must be divisible by n_heads (4)"


def test_presets_apply_under_explicit_overrides():
    cfg, names, preset, _ = llm.parse_config(["--preset", "smoke", "--d_model", "96", "--models", "moe,dense"])
    assert preset == "smoke" and names == ["moe", "dense"]
    assert cfg.d_model == 96 and cfg.n_layers == llm.PRESETS["smoke"]["n_layers"]
    cfg, _, preset, _ = llm.parse_config([])
    assert preset == "cpu"  # no CUDA here
    assert cfg.max_steps == llm.PRESETS["cpu"]["max_steps"]


def test_every_config_field_is_a_typed_flag():
    cfg, *_ = llm.parse_config(["--muon_lr", "0.5", "--norm_topk_prob", "false", "--moe_layers", "1,3",
                                "--max_tokens", "1000"])
    assert cfg.muon_lr == 0.5 and cfg.norm_topk_prob is False and cfg.moe_layers == "1,3" and cfg.max_tokens == 1000


def test_smoke_run_writes_results_metrics_and_plot_and_its_loss_falls(shakespeare_smoke):
    out, printed = shakespeare_smoke.out, shakespeare_smoke.printed
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["source"] == "shakespeare"
    assert set(results) >= {"dataset", "config", "models", "environment"}
    assert [m["name"] for m in results["models"]] == ["dense", "dense-matched", "moe"]
    for m in results["models"]:
        assert set(m) >= {"name", "total_params", "active_params", "flops_per_token", "val_loss", "val_accuracy",
                          "val_perplexity", "train_loss", "epochs", "tokens_per_s", "train_time_s", "peak_memory_bytes"}
        assert m["val_loss"] < math.log(results["dataset"]["vocab_size"])  # learned something
        assert m["val_perplexity"] == pytest.approx(math.exp(m["val_loss"]))
    env = results["environment"]
    assert set(env) >= {"torch", "device", "llm_py_sha256"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    moe_train = [r["loss"] for r in records if r["model"] == "moe" and r["kind"] == "train"]
    assert moe_train[-1] < moe_train[0] - 0.5
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "moe vs dense-matched: val loss" in printed
    for header in ("val loss", "active", "FLOPs/tok", "epochs", "tok/s", "peak mem", "GPU util"):
        assert header in printed


def test_an_unreadable_text_file_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 20)  # not UTF-8
    code = run_main(["--preset", "smoke", "--data", str(tmp_path / "*.txt"), "--out_dir", str(tmp_path / "out"),
                     "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("llm.py: error: --data") and "could not read the text files" in err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["[]", '{"jobs": []}', "not json"])
def test_resume_of_a_damaged_run_state_exits_2_with_one_line(content, tmp_path, capsys):
    (tmp_path / "run.json").write_text(content)
    assert run_main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err


def test_ctrl_c_before_training_exits_130_without_a_traceback(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(llm, "prepare_data", interrupted)
    assert run_main(["--preset", "smoke", "--out_dir", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err.strip() == "llm.py: interrupted"
    assert not (tmp_path / "o").exists()
