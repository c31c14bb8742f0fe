"""What a comparison may claim: a step budget capped at max_epochs passes over short data, the
verdict at equal training time beside the one at equal FLOPs, loss curves that show overfitting, and
a single seed's result flagged as untested.

Runs use the smoke preset on the `corpus_dir` fixture, offline on CPU; --max_tokens 3000 leaves 43
training windows of 64 tokens, so that 30 steps of 8 windows would be 5.6 passes over them.
"""

import dataclasses
import json
import math
import shlex

import pytest
from helpers import read_json, read_metrics, synthetic_data

import llm

SHORT = ["--preset", "smoke", "--max_tokens", "3000", "--eval_every", "5", "--ckpt_every", "0"]


def run_main(argv):
    return llm.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def short(corpus_dir, tmp_path_factory):
    """The arguments of a run on short data, its token cache built once."""
    cache = str(tmp_path_factory.mktemp("verdict-cache"))
    return SHORT + ["--data", str(corpus_dir / "*.txt"), "--cache_dir", cache]


# ----------------------------------------------------------------------------------------------
# The step budget


def steps(tokens, world=1, **fields):
    """The step budget of a comparison of dense and moe on `tokens` training tokens."""
    cfg = llm.Config(**{"max_seq_len": 64, "batch_size": 8, "max_steps": 30, "vocab_size": 64, **fields})
    jobs, budget = llm.plan_budget(cfg, llm.plan_jobs(cfg, ["dense", "moe"], [1], []), tokens, world)
    assert {job.config.max_steps for job in jobs} == {budget.steps}
    return budget.steps


def test_the_budget_is_max_steps_when_the_data_is_long_and_max_epochs_passes_when_it_is_short():
    # 64 * 1000 + 64 tokens: 1000 windows; 30 steps of 8 are 0.24 passes
    assert steps(64 * 1001) == 30
    # 43 windows: 4 passes are 172 windows, 21 steps of 8 (the last pass not quite whole)
    assert steps(64 * 44 + 10) == 21
    assert steps(64 * 44 + 10, world=2) == 10  # a global batch of 16
    assert steps(64 * 44 + 10, gradient_accumulation_steps=3) == 7
    assert steps(64 * 44, max_epochs=0) == 30
    assert steps(64 * 44, batch_size=64, max_epochs=0.1) == 1  # never 0


def test_every_job_of_a_sweep_gets_the_fewest_steps_that_any_of_them_may_take():
    cfg = llm.Config(max_seq_len=64, batch_size=8, max_steps=30, vocab_size=64)
    jobs = llm.plan_jobs(cfg, ["dense", "moe"], [1], llm.parse_sweep(["max_seq_len=32,64"]))
    jobs, budget = llm.plan_budget(cfg, jobs, 64 * 44 + 10, 1)
    # 43 windows of 64 allow 21 steps, 87 windows of 32 allow 43: all get 21
    assert [job.config.max_steps for job in jobs] == [21, 21, 21] and budget.steps == 21


def test_a_capped_run_says_so_before_training_gives_every_model_the_same_budget_and_keeps_the_requested_steps(
        short, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(short + ["--models", "dense,moe", "--out_dir", out]) == 0
    printed = capsys.readouterr().out
    before_training = printed[: printed.index("=== dense ===")]
    assert ("budget: 30 steps would be 5.58 passes over the 43 training windows; capped at max_epochs 4: "
            "21 steps (3.91 passes); --max_epochs 0 lifts the cap") in before_training
    results = read_json(out / "results.json")
    assert results["budget"] == {"requested_steps": 30, "max_epochs": 4.0, "steps": 21, "capped": True,
                                 "epochs": pytest.approx(21 * 8 / 43), "windows": 43, "step_windows": 8}
    assert results["config"]["max_steps"] == 30  # the run's config is what was asked for
    for row in results["models"]:
        assert row["steps"] == 21 and row["config"]["max_steps"] == 21
        assert row["epochs"] == pytest.approx(21 * 8 / 43) and row["epochs"] <= 4
    table = printed[printed.index("model  params"):]
    assert "3.91" in table.splitlines()[2]  # the epochs column shows what was trained


def test_the_learning_rate_schedule_is_laid_over_the_capped_budget_and_ends_at_its_floor(short, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(short + ["--models", "dense", "--log_every", 1, "--out_dir", out]) == 0
    capsys.readouterr()
    cfg = llm.Config(**{**read_json(out / "results.json")["config"], "max_steps": 21})
    lrs = [r["lr"] for r in read_metrics(out) if r["kind"] == "train"]
    assert len(lrs) == 21
    # the lr logged at step s is the one step s used, down to the capped last step's
    assert lrs == [pytest.approx(cfg.muon_lr * llm.lr_factor(s, cfg)) for s in range(21)]
    assert cfg.muon_lr * cfg.min_lr_frac <= lrs[-1] < lrs[-2]  # cosine reaches its floor one step after the end


def test_the_last_logged_learning_rate_of_a_wsd_run_is_its_floor_not_past_it(short, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(short + ["--models", "dense", "--log_every", 1, "--schedule", "wsd", "--out_dir", out]) == 0
    capsys.readouterr()
    config = read_json(out / "results.json")["config"]
    lrs = [r["lr"] for r in read_metrics(out) if r["kind"] == "train"]
    assert lrs[-1] == pytest.approx(config["muon_lr"] * config["min_lr_frac"]) and min(lrs) > 0


def test_max_epochs_0_trains_the_requested_steps_on_short_data(short, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(short + ["--models", "dense", "--max_epochs", 0, "--out_dir", out]) == 0
    assert "capped" not in capsys.readouterr().out
    results = read_json(out / "results.json")
    assert results["budget"]["capped"] is False and results["models"][0]["steps"] == 30


def test_train_model_called_directly_trains_no_more_than_max_epochs_passes_as_a_planned_run():
    """plan_budget caps a comparison's jobs; train_model holds the same cap itself, so a call that
    skips the plan (a notebook, a test, a new harness) cannot train past max_epochs either."""
    data = synthetic_data(n_train=2000)  # 124 windows of 16 tokens: 4 passes are 124 steps of 4 windows
    cfg = llm.Config(d_model=32, n_heads=4, n_layers=1, d_ff=64, max_seq_len=16, vocab_size=64, batch_size=4,
                     max_steps=500, eval_every=1000, moe_layers="none").validate()
    runtime = llm.Runtime(llm.torch.device("cpu"), llm.torch.float32, False)
    row = llm.train_model("m", cfg, data, runtime)
    assert row["steps"] == llm.epoch_steps(cfg, len(data.train), 1) == 124 and row["epochs"] == pytest.approx(4.0)
    uncapped = llm.train_model("m", dataclasses.replace(cfg, max_steps=130, max_epochs=0.0), data, runtime)
    assert uncapped["steps"] == 130  # max_epochs 0: no cap


def test_a_run_saved_before_the_cap_resumes_without_one(short, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(short + ["--models", "dense", "--max_epochs", 0, "--out_dir", out]) == 0
    state = read_json(out / "run.json")
    del state["base_config"]["max_epochs"]  # as an llm.py without max_epochs wrote it
    state["jobs"][0].update(status="pending", row=None)  # its model interrupted after the last checkpoint
    (out / "run.json").write_text(json.dumps(state))
    assert run_main(["--resume", out]) == 0
    assert "budget: 30 steps, 5.58 passes" in capsys.readouterr().out
    results = read_json(out / "results.json")
    assert results["budget"]["capped"] is False and results["models"][0]["steps"] == 30
    assert llm.config_from_saved({}).max_epochs == 0 and llm.Config().max_epochs == 4


# ----------------------------------------------------------------------------------------------
# The verdict at equal training time


def curve(*points):  # eval records of one model: (train_seconds, val loss on the evaluation sample) pairs
    return [{"kind": "eval", "train_seconds": t, "sample_val_loss": loss} for t, loss in points]


def test_time_to_loss_interpolates_linearly_between_the_evaluations_around_the_target():
    assert llm.time_to_loss(curve((10, 5.0), (20, 4.0), (30, 3.5)), 4.5) == pytest.approx(15.0)
    assert llm.time_to_loss(curve((10, 5.0), (20, 4.0), (30, 3.5)), 3.75) == pytest.approx(25.0)


def test_time_to_loss_is_the_first_evaluation_that_reaches_the_target_when_one_reaches_it_exactly_or_first():
    assert llm.time_to_loss(curve((10, 5.0), (20, 4.0), (30, 4.0)), 4.0) == 20  # a tie: the first to reach it
    assert llm.time_to_loss(curve((10, 3.0), (20, 2.0)), 4.0) == 10  # already below: nothing before it to go on


def test_time_to_loss_is_none_when_the_target_is_never_reached():
    assert llm.time_to_loss(curve((10, 5.0), (20, 4.5)), 4.0) is None
    assert llm.time_to_loss([], 4.0) is None


def test_time_to_loss_follows_the_first_crossing_even_if_the_loss_rises_again():
    assert llm.time_to_loss(curve((10, 5.0), (20, 3.0), (30, 5.0), (40, 2.0)), 4.0) == pytest.approx(15.0)


def rows_and_records(seeds, times):
    """Rows of moe and dense per seed, and their eval records: times[name][i] = ((seconds, loss), ...)."""
    rows, records = [], []
    for i, seed in enumerate(seeds):
        for name, moe in (("moe", True), ("dense", False)):
            run_id = name + (f"-s{seed}" if len(seeds) > 1 else "")
            points = times[name][i]
            rows.append({"id": run_id, "name": name, "seed": seed, "total_params": 10, "active_params": 5,
                         "flops_per_token": 10, "config": {"moe_layers": "all" if moe else "none"},
                         "val_loss": points[-1][1], "val_perplexity": math.exp(points[-1][1]), "val_accuracy": 0.1,
                         "train_loss": 1.0, "tokens_per_s": 1.0, "wall_time_s": points[-1][0], "epochs": 1.0,
                         "experts": None, "steps": 10, "skipped_steps": 0, "batch_level_routing": False})
            records += [{"model": run_id, **r} for r in curve(*points)]
    return rows, records


def test_each_comparison_gives_both_models_time_to_the_worse_final_loss():
    rows, records = rows_and_records([42], {"moe": [((10, 5.0), (20, 4.0), (40, 3.8))],
                                            "dense": [((10, 4.5), (20, 3.9))]})
    _, (c,) = llm.summarize(rows, records)
    assert c["time_to_loss"]["loss"] == [3.9]  # the worse of 3.8 and 3.9
    assert c["time_to_loss"]["moe_s"] == [pytest.approx(20 + 20 * 0.1 / 0.2)]
    assert c["time_to_loss"]["baseline_s"] == [20]
    lines = llm.format_table(rows, records).splitlines()
    at_equal_steps = next(i for i, line in enumerate(lines) if line.startswith("moe vs dense: val loss -0.1000"))
    assert lines[at_equal_steps + 1] == ("  to reach val loss 3.9000, the worse final one on the val sample every "
                                         "evaluation uses: moe 30.0 s, dense 20.0 s (x1.50); training seconds, "
                                         "interpolated between evaluations")


def test_with_seeds_the_time_comparison_is_a_mean_and_std_over_the_seeds():
    rows, records = rows_and_records([1, 2], {"moe": [((10, 5.0), (20, 4.0)), ((10, 5.0), (30, 4.1))],
                                              "dense": [((10, 4.0), (20, 3.5)), ((20, 4.0), (30, 3.0))]})
    _, (c,) = llm.summarize(rows, records)
    assert c["time_to_loss"]["moe_s"] == [20, 30] and c["time_to_loss"]["baseline_s"] == [10, 20]
    assert c["time_to_loss"]["moe_s_mean"] == 25 and c["time_to_loss"]["moe_s_std"] == pytest.approx(math.sqrt(50))
    text = llm.format_table(rows, records)
    assert "moe 25.0 +- 7.1 s, dense 15.0 +- 7.1 s" in text


def test_a_pair_with_evaluations_from_before_train_seconds_is_not_timed_rather_than_not_reached():
    rows, records = rows_and_records([42], {"moe": [((10, 5.0), (20, 4.0))], "dense": [((10, 4.5), (20, 3.9))]})
    for untimed in ([r for r in records if r["model"] != "dense"],  # a model's records lost
                    [{k: v for k, v in r.items() if k != "train_seconds" or r["train_seconds"] != 10}
                     for r in records]):  # the first evaluations logged by an older llm.py, before a resume
        _, (c,) = llm.summarize(rows, untimed)
        assert c["time_to_loss"]["timed"] is False and c["time_to_loss"]["moe_s"] == [None]
        assert "not timed" in llm.format_table(rows, untimed) and "not reached" not in llm.format_table(rows, untimed)


def test_evaluation_records_carry_training_seconds_that_grow_and_exclude_evaluation_and_checkpoints(
        monkeypatch, tmp_path):
    clock = [0.0]
    monkeypatch.setattr(llm.time, "perf_counter", lambda: clock[0])
    real_evaluate = llm.evaluate

    def slow_evaluate(*args, **kwargs):  # every evaluation takes 100 "seconds"
        clock[0] += 100.0
        return real_evaluate(*args, **kwargs)

    real_step = llm.Trainer.train_step

    def timed_step(self, step):  # every training step takes 1 "second"
        clock[0] += 1.0
        real_step(self, step)

    real_save = llm.save_checkpoint

    def slow_save(*args, **kwargs):  # every checkpoint 50
        clock[0] += 50.0
        return real_save(*args, **kwargs)

    monkeypatch.setattr(llm, "evaluate", slow_evaluate)
    monkeypatch.setattr(llm.Trainer, "train_step", timed_step)
    monkeypatch.setattr(llm, "save_checkpoint", slow_save)
    records = []
    cfg = llm.Config(d_model=32, n_heads=4, n_layers=1, d_ff=64, max_seq_len=16, vocab_size=64, batch_size=4,
                     max_steps=9, eval_every=3, eval_batches=1, ckpt_every=2, moe_layers="none")
    llm.train_model("m", cfg, synthetic_data(), llm.Runtime(llm.torch.device("cpu"), llm.torch.float32, False),
                    records.append, ckpt_dir=str(tmp_path))
    evals = [r for r in records if r["kind"] == "eval"]
    # the first step (compilation on a GPU) is not counted: steps 2..s took s - 1 seconds; neither
    # the evaluations nor the checkpoints at steps 2, 4, 6 and 8 are
    assert [(r["step"], r["train_seconds"]) for r in evals] == [(3, 2.0), (6, 5.0), (9, 8.0)]


# ----------------------------------------------------------------------------------------------
# Curves, and how much to trust one run


def test_the_loss_figure_has_val_loss_against_tokens_and_against_seconds_with_train_loss_dashed_beside_it():
    records = []
    for run_id, shift in (("dense", 0.0), ("moe", -0.1)):
        for step in (5, 10):
            records.append({"model": run_id, "kind": "eval", "step": step, "tokens": step * 100,
                            "train_seconds": step * 2.0, "val_loss": 5 - step / 10 + shift,
                            "train_loss": 4.8 - step / 8 + shift})
        records.append({"model": run_id, "kind": "train", "step": 10, "tokens": 1000, "loss": 4.0})
    fig = llm.curves_figure(records)
    by_tokens, by_seconds = fig.axes
    assert "tokens" in by_tokens.get_xlabel() and "seconds" in by_seconds.get_xlabel()
    lines = {line.get_label(): line for line in by_tokens.get_lines()}
    assert [t.get_text() for t in by_tokens.get_legend().get_texts()] == ["dense", "moe"]
    assert set(lines) == {"dense val", "dense train", "moe val", "moe train"}
    for run_id, shift in (("dense", 0.0), ("moe", -0.1)):
        val, train = lines[f"{run_id} val"], lines[f"{run_id} train"]
        assert val.get_color() == train.get_color()
        assert val.get_linestyle() == "-" and train.get_linestyle() == "--"
        assert list(val.get_xdata()) == list(train.get_xdata()) == [500, 1000]
        assert list(val.get_ydata()) == [5 - 0.5 + shift, 5 - 1.0 + shift]
        assert list(train.get_ydata()) == [4.8 - 5 / 8 + shift, 4.8 - 10 / 8 + shift]
    assert lines["dense val"].get_color() != lines["moe val"].get_color()
    seconds = {line.get_label(): line for line in by_seconds.get_lines()}
    assert list(seconds["moe val"].get_xdata()) == [10.0, 20.0]
    assert seconds["moe val"].get_color() == lines["moe val"].get_color()
    llm.pyplot().close(fig)


def test_one_seed_is_flagged_untested_with_the_command_that_would_test_it():
    rows, records = rows_and_records([7], {"moe": [((10, 5.0), (20, 4.0))], "dense": [((10, 4.5), (20, 3.9))]})
    argv = ["--preset", "cpu", "--seed", "7", "--out_dir", "runs/a", "--num_experts", "4"]
    text = llm.format_table(rows, records, argv)
    (hint,) = [line for line in text.splitlines() if "untested" in line]
    command = hint[hint.index("python llm.py"):]
    # --seed stays: it fixes the data split (and token cache) that the three seeds must share
    assert command == "python llm.py --preset cpu --seed 7 --num_experts 4 --seeds 7,8,9"
    cfg, _, _, args = llm.parse_config(shlex.split(command)[2:])
    assert args.seeds == [7, 8, 9] and cfg.seed == 7 and cfg.num_experts == 4
    assert llm.seeds_command(["--seeds=7", "--out_dir=x", "--seed=7"], 7) == "python llm.py --seed=7 --seeds 7,8,9"


def test_several_seeds_are_not_flagged_untested():
    rows, records = rows_and_records([1, 2], {"moe": [((10, 5.0), (20, 4.0))] * 2,
                                              "dense": [((10, 4.5), (20, 3.9))] * 2})
    assert "untested" not in llm.format_table(rows, records, ["--seeds", "1,2"])


def test_the_final_evaluation_also_measures_the_samples_the_periodic_ones_use():
    """The curves and the time verdict compare evaluations with each other, so the final one is
    measured on the same fixed samples as the periodic ones, beside the whole val set."""
    cfg = llm.Config(d_model=32, n_heads=4, n_layers=1, d_ff=64, max_seq_len=16, vocab_size=64, batch_size=4,
                     max_steps=4, eval_every=2, eval_batches=1, moe_layers="none")
    runtime = llm.Runtime(llm.torch.device("cpu"), llm.torch.float32, False)
    records = []
    llm.train_model("m", cfg, synthetic_data(), runtime, records.append)
    periodic, final = [r for r in records if r["kind"] == "eval"]
    assert periodic["sample_val_loss"] == periodic["val_loss"]
    assert periodic["sample_train_loss"] == periodic["train_loss"]
    assert final["sample_val_loss"] != final["val_loss"]  # 4 windows, not all 49
    records = []
    llm.train_model("m", dataclasses.replace(cfg, eval_batches=100), synthetic_data(), runtime, records.append)
    final = records[-1]
    assert final["sample_val_loss"] == final["val_loss"]  # the sample is every window


def test_a_resume_whose_budget_changed_exits_2_naming_both(short, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(short + ["--models", "dense", "--out_dir", out]) == 0
    state = read_json(out / "run.json")
    state["budget"]["steps"] = 25  # as if the data had been longer when the run started
    state["jobs"][0].update(status="pending", row=None)
    (out / "run.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert run_main(["--resume", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"llm.py: error: --resume {out}: the run's budget was 25 steps over 43 training windows, now 21 "
                   f"over 43: its data or its number of processes changed since it started")


def test_a_budget_shorter_than_eval_every_says_the_curves_get_one_point(short, tmp_path, capsys):
    assert run_main(short + ["--models", "dense", "--eval_every", 100, "--out_dir", tmp_path / "run"]) == 0
    assert "note: eval_every (100) >= the budget (21 steps): no evaluation before the last step" in \
        capsys.readouterr().out
