"""tests/bench_moe.py is a script, not a test; this runs it once, at its smallest, so that the
benchmark the README and BENCHMARKS.md cite keeps working on a CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_moe_bench_runs_on_cpu_checks_ours_times_and_profiles_every_candidate():
    p = subprocess.run([sys.executable, "tests/bench_moe.py", "--smoke", "--repeats", "1", "--iters", "1", "--warmup",
                        "1", "--profile"], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    record = json.loads(p.stdout.strip().splitlines()[-1])  # the last line is the JSON record
    assert record["correctness"]["ours_vs_loop"]["ok"]
    layer = record["layer"]["candidates"]
    assert set(layer) == {"dense_ffn", "ours", "experts_alone", "mask_loop", "hf_eager", "hf_batched_mm",
                          "hf_grouped_mm"}
    assert all(c["status"] == "ok" and c["ms"] > 0 for c in layer.values()), {k: c["status"] for k, c in layer.items()}
    assert layer["dense_ffn"]["ratio"] == 1.0 and record["ratios"]["experts_alone_vs_dense_ffn"] > 0
    train = record["train"]["candidates"]
    assert set(train) == {"train_moe", "train_dense_matched", "train_moe_optimizer", "train_dense_matched_optimizer"}
    assert all(c["status"] == "ok" and c["ms"] > 0 for c in train.values())
    assert set(record["targets"]) == {"moe_layer_vs_dense_ffn", "moe_layer_vs_fastest_hf",
                                      "train_step_moe_vs_dense_matched"}
    assert "floor: ours' expert matmuls alone take" in p.stdout
    heaviest = layer["ours"]["profile"]["top"]  # --profile: where the time goes, heaviest first
    assert heaviest and heaviest[0]["ms_per_call"] >= heaviest[-1]["ms_per_call"] > 0
    assert any(op["name"] == "aten::_grouped_mm" for op in heaviest)


def test_the_scaling_coverage_bench_prints_its_table_and_the_targets_for_a_tiny_ladder():
    tiny = ["--rungs", "4", "--seeds", "1", "--scenarios", "k=1.2", "--rho", "0.5", "--fit_E", "shared", "--ladders",
            "3", "--per_rung_ladders", "1", "--jobs", "1"]
    p = subprocess.run([sys.executable, "tests/bench_scaling_coverage.py", *tiny], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("| rungs | seeds | scenario | rho | fit_E | ladders |")
    row = [c.strip() for c in lines[2].strip("|").split("|")]  # the header, its rule, then one row per configuration
    assert row[:6] == ["4", "1", "k=1.2", "0.5", "shared", "3"] and row[14] == "1"  # 3 ladders, 1 with the bootstrap
    assert all(c.endswith("%") for c in row[6:14] + row[15:18]), row
    assert any(line.startswith("targets, 4 rungs, 1 seed, fit_E shared, rho 0.5: ") for line in lines)
