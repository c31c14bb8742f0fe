"""tests/bench_moe.py is a script, not a test; this runs it once, at its smallest, so that the
benchmark the README and BENCHMARKS.md cite keeps working on a CPU."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_moe_bench_runs_on_cpu_checks_ours_times_and_profiles_every_candidate():
    p = subprocess.run([sys.executable, "tests/bench_moe.py", "--quick", "--repeats", "1", "--iters", "1", "--warmup",
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
