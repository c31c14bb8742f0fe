"""Bad input, case by case: every one exits with status 2 and one line on stderr naming what is wrong,
with no traceback, and leaves no out_dir and no cache entry behind.

Each case runs llm.main in this process with its own out_dir and cache_dir under tmp_path (neither
exists before). `{corpus}`, `{file}`, `{run}` and `{long}` in a case's arguments stand for the test
corpus, a plain file, a damaged run directory and a 300-character name.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from helpers import PROCESS_TIMEOUT, ROOT, free_port

import llm

SMOKE = ["--preset", "smoke"]
DROP = object()  # a damage that removes the key
# a valid run.json; its cache_dir cannot be made, so that a case that failed to damage it never trains
GOOD_RUN = {"argv": [], "base_config": {"d_model": 64, "n_heads": 4}, "models": ["moe"], "seeds": [1], "sweep": [],
            "upcycle_from": None, "cache_dir": "/proc/llm-no-such-dir", "llm_py_sha256": "x", "jobs": []}

CONFIG = [  # (argv, what the line says)
    (["--dropout", "nan"], "dropout must be a finite number; got nan"),
    (["--dropout", "1"], "dropout must lie in [0, 1); got 1.0"),
    (["--dropout", "-0.1"], "dropout must lie in [0, 1)"),
    (["--warmup_frac", "nan"], "warmup_frac must be a finite number"),
    (["--warmup_frac", "1.5"], "warmup_frac must lie in [0, 1]"),
    (["--capacity_factor", "inf"], "capacity_factor must be a finite number; got inf"),
    (["--capacity_factor", "0"], "capacity_factor must be positive"),
    (["--muon_lr", "nan"], "muon_lr must be a finite number"),
    (["--muon_lr", "0"], "muon_lr must be positive"),
    (["--adamw_lr", "-1"], "adamw_lr must be positive"),
    (["--grad_clip", "nan"], "grad_clip must be a finite number"),
    (["--grad_clip", "-1"], "grad_clip must not be negative"),
    (["--noise_std", "-0.1"], "noise_std must not be negative"),
    (["--noise_std", "inf"], "noise_std must be a finite number"),
    (["--load_balancing_weight", "-1"], "load_balancing_weight must not be negative"),
    (["--z_loss_weight", "nan"], "z_loss_weight must be a finite number"),
    (["--rope_base", "0"], "rope_base must be positive"),
    (["--seed", "-1"], "seed must lie in [0, 4294967296); got -1"),
    (["--seed", "4294967296"], "seed must lie in [0, 4294967296)"),
    (["--muon_momentum", "1"], "muon_momentum must lie in [0, 1)"),
    (["--weight_decay", "-0.1"], "weight_decay must not be negative"),
    (["--min_lr_frac", "2"], "min_lr_frac must lie in [0, 1]"),
    (["--decay_frac", "nan"], "decay_frac must be a finite number"),
    (["--val_fraction", "0"], "val_fraction must lie in (0, 1)"),
    (["--val_fraction", "1"], "val_fraction must lie in (0, 1)"),
    (["--bias_update_rate", "-1"], "bias_update_rate must not be negative"),
    (["--hub_timeout", "nan"], "hub_timeout must be a finite number"),
    (["--warmup_frac", "0.9", "--decay_frac", "0.2"], "warmup_frac + decay_frac must not exceed 1"),
    (["--batch_size", "0"], "batch_size must be positive"),
    (["--max_steps", "-5"], "max_steps must be positive"),
    (["--max_epochs", "-1"], "max_epochs must not be negative"),
    (["--max_epochs", "inf"], "max_epochs must be a finite number"),
    (["--n_layers", "0"], "n_layers must be positive"),
    (["--eval_every", "0"], "eval_every must be positive"),
    (["--log_every", "0"], "log_every must be positive"),
    (["--max_bad_steps", "0"], "max_bad_steps must be positive"),
    (["--ckpt_every", "-1"], "ckpt_every must not be negative"),
    (["--patience", "-1"], "patience must not be negative"),
    (["--d_model", "100", "--n_heads", "8"], "d_model (100) must be divisible by n_heads (8)"),
    (["--n_kv_heads", "3"], "n_heads (4) must be divisible by n_kv_heads (3)"),
    (["--d_model", "12", "--n_heads", "4"], "head size d_model/n_heads (3) must be even for RoPE"),
    (["--expert_top_k", "9"], "expert_top_k (9) must not exceed num_experts (4)"),
    (["--routing", "hash"], "routing must be one of topk, switch, expert_choice"),
    (["--balance", "none"], "balance must be one of aux_loss, aux_free"),
    (["--ffn", "relu"], "ffn must be one of silu, swiglu"),
    (["--router_score", "cosine"], "router_score must be one of softmax, sigmoid; got 'cosine'"),
    (["--dtype", "fp64"], "dtype must be one of auto, bf16, fp16, fp32"),
    (["--compile", "maybe"], "compile must be one of auto, on, off"),
    (["--schedule", "linear"], "schedule must be one of cosine, wsd"),
    (["--moe_layers", "0,9"], "moe_layers: layer ids must lie in 0..1"),
    (["--moe_layers", "x"], "moe_layers: expected all, alternate, last_half, none or a list"),
    (["--norm_topk_prob", "maybe"], "argument --norm_topk_prob"),
    (["--d_model", "abc"], "argument --d_model: invalid int value: 'abc'"),
    (["--not_a_field", "3"], "unrecognized arguments: --not_a_field"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
]

CLI = [
    (["--models", "dense,gpt5"], "--models: unknown model gpt5"),
    (["--models", ""], "--models: unknown model (none given)"),
    (["--models", "dense,dense"], "--models: a model is named twice"),
    (["--moe_layers", "none"], "moe_layers is none: the moe and dense-matched models need MoE layers"),
    (["--seeds", ""], "--seeds: expected comma-separated integers, got ''"),
    (["--seeds", "1,1"], "--seeds: expected distinct seeds"),
    (["--seeds", "-3"], "--seeds: a seed must lie in [0, 4294967296); got -3"),
    (["--seeds", "x"], "--seeds: expected comma-separated integers"),
    (["--out_dir", ""], "--out_dir: expected a directory, got ''"),
    (["--sweep", "nope=1"], "--sweep nope=1: expected FIELD=V1,V2"),
    (["--sweep", "num_experts=x"], "--sweep num_experts=x: values must be int"),
    (["--sweep", "expert_top_k=9"], "expert_top_k (9) must not exceed num_experts (4)"),
    (["--sweep", "num_experts=4,4"], "--sweep num_experts=4,4: a value or field given twice"),
    (["--sweep", "dropout=nan"], "dropout must be a finite number"),
    (["--sweep", "moe_layers=none"], "leaves the moe model without MoE layers"),
    (["--sweep", "max_epochs=1,4"], "--sweep max_epochs: it caps every model of a comparison alike"),
    (["--models", "dense", "--sweep", "num_experts=4"], "--sweep varies the moe model: include moe in --models"),
    (["--upcycle_from", "{file}"], "--upcycle_from {file}: no such directory"),
    (["--resume", "{run}", "--max_steps", "5"], "--resume RUN_DIR takes no other options"),
    (["--max_steps", "5", "--resume", "{run}"], "--resume RUN_DIR takes no other options"),
    (["--resume", "{run}", "--fit_E", "separate"], "--fit_E: {run} is not a ladder (llm.py scaling)"),
    (["--resume", "{run}", "--fit_E"], "--resume RUN_DIR takes no other options"),
]

PATHS = [
    (["--out_dir", "{file}"], "--out_dir {file} is a file, not a directory"),
    (["--out_dir", "{file}/run"], ": {file} is a file, not a directory"),
    (["--out_dir", "/proc/llm-no-such-dir"], "--out_dir /proc/llm-no-such-dir: No such file or directory"),
    (["--out_dir", "{long}"], "File name too long"),
    (["--cache_dir", "{file}"], "--cache_dir {file} is a file, not a directory"),
    (["--cache_dir", "/proc/llm-no-such-dir"], "--cache_dir /proc/llm-no-such-dir: No such file or directory"),
    (["--cache_dir", "{out}"], ("--out_dir {out} and --cache_dir {out} are the same directory; token caches are "
                                "shared between runs, so give them a directory apart")),
    (["--cache_dir", "{out}/tokens"], "--out_dir {out} and --cache_dir {out}/tokens are one inside the other"),
    (["--out_dir", "{cache}/run"], "--out_dir {cache}/run and --cache_dir {cache} are one inside the other"),
    (["--cache_dir", "{out}/../out/."], "are the same directory"),
    (["--cache_dir", ""], "--cache_dir : No such file or directory"),
]

DATA = [
    (["--data", "no/such/file.txt"], "--data no/such/file.txt: no such file"),
    (["--data", "hf:"], "--data hf:: expected hf:NAME[:CONFIG]"),
    (["--data", "smollm"], "the Hugging Face Hub is unreachable"),
    (["--data", "{nonutf8}"], "could not read the text files: {nonutf8}/b.txt: 'utf-8' codec can't decode"),
    (["--data", "{binary}"], "could not read the text files: {binary}/b.txt is binary (NUL bytes)"),
    (["--data", "{empty}"], "no such file"),
    (["--data", "{blank}"], "it holds no text"),
    (["--data", "{corpus}", "--max_seq_len", "100000"], "too little text"),
    (["--data", "{corpus}", "--sweep", "max_seq_len=32,100000"], "too little text"),
    (["--data", "{corpus}", "--sweep", "vocab_size=10"], "vocab_size (10) is smaller than the tokenizer's"),
    (["--data", "{corpus}", "--vocab_size", "10"], "vocab_size (10) is smaller than the tokenizer's"),
    (["--data", "{corpus}", "--bpe_vocab_size", "256"],
     "bpe_vocab_size must be at least 257 for the locally trained BPE (its 256-byte alphabet and the end-of-text"),
    (["--data", "{corpus}", "--sweep", "vocab_size=0,10"], "vocab_size (10) is smaller than the tokenizer's"),
    (["--tokenize_workers", "-1"], "tokenize_workers must not be negative"),
]

SIZES = [  # sizes no model can have, and sizes no machine here can train: refused before anything trains
    (["--data", "{corpus}", "--d_ff", "9223372036854775807"],
     "no model can be built at d_model 64, n_layers 2, n_heads 4, d_ff 9223372036854775807"),
    (["--data", "{corpus}", "--d_model", "262144"], "dense: training it needs at least"),
    (["--data", "{corpus}", "--models", "moe", "--d_ff", "68719476736"], "moe: training it needs at least"),
]

# llm.py prepare: every data case a comparison refuses (prepare has no --sweep), the same line, and no
# cache entry or staging directory left; then its own
PREPARE = [case for case in DATA if "--sweep" not in case[0]] + [
    (["--data", "{corpus}", "--cache_dir", "{file}"], "--cache_dir {file} is a file, not a directory"),
    (["--data", "{corpus}", "--out_dir", "{out}"], "unrecognized arguments: --out_dir"),
]

RUN_FILES = [  # run.json of a run directory, damaged as named; the command reads it
    (["--resume", "{run}"], "[]", "run.json is not an object"),
    (["--resume", "{run}"], {"argv": DROP}, "run.json: argv is missing"),
    (["--resume", "{run}"], {"base_config": {"dropout": float("nan")}}, "base_config: dropout must be a finite"),
    (["--resume", "{run}"], {"seeds": ["a"]}, "run.json: seeds must be list[int]"),
    (["--resume", "{run}"], {"cache_dir": None}, "run.json: cache_dir must be str"),
    (["generate", "--run", "{run}"], {"jobs": [{"id": 1}]}, "run.json: jobs[0]: id must be str"),
    (["generate", "--run", "{run}"], {"argv": None}, "run.json: argv must be list[str]"),
    (["experts", "--run", "{run}"], {"jobs": [{"id": "moe", "name": "moe", "seed": 1, "config": {}, "status": "done"}]},
     "run.json: jobs[0]: status 'done' without a result row"),
    (["experts", "--run", "{run}"], {"base_config": {"routing": "nope"}}, "base_config: routing must be one of"),
    (["generate", "--run", "{run}"], {"dataset": {"source": "x", "tokenizer": None, "vocab_size": 5, "cache": "c"}},
     "run.json: dataset: tokenizer must be str; got None"),
    (["experts", "--run", "{run}"], {"dataset": {"source": "x", "tokenizer": "bpe", "vocab_size": 5}},
     "run.json: dataset: cache must be str; got None"),
    (["scaling", "--resume", "{run}"], {},
     "scaling --resume {run}: a comparison, not a ladder; continue it with python llm.py --resume {run}"),
]

OPTIONS = [  # generate and experts check their options before they read the run
    (["generate", "--run", "{run}", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["generate", "--run", "{run}", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "--run", "{run}", "--top_p", "0"], "--top_p must lie in (0, 1]"),
    (["generate", "--run", "{run}", "--top_p", "nan"], "--top_p must lie in (0, 1]"),
    (["generate", "--run", "{run}", "--top_k", "-1"], "--top_k must not be negative"),
    (["generate", "--run", "{run}", "--max_new_tokens", "0"], "--max_new_tokens must be positive"),
    (["generate", "--run", "{run}", "--seed", "-1"], "--seed must lie in [0, 2**63)"),
    (["generate", "--run", "{run}", "--prompt", "ROMEO\udcff"],
     "--prompt: not valid UTF-8 (an undecodable byte at character 5)"),
    (["generate", "--run", "{run}", "--prompt_file", "{nonutf8}/b.txt"],
     "--prompt_file {nonutf8}/b.txt: not valid UTF-8 (byte 0x80 at offset 5)"),
    (["generate", "--run", "{run}", "--prompt_file", "{run}/no-such-prompt.txt"],
     "--prompt_file {run}/no-such-prompt.txt: No such file or directory"),
    (["generate", "--run", "{run}", "--prompt_file", "{run}"], "--prompt_file {run}: Is a directory"),
    (["generate", "--run", "{run}", "--prompt_file", "/dev/zero"], "--prompt_file /dev/zero: more than 16 MiB"),
    (["generate", "--run", "{run}", "--prompt", "x", "--prompt_file", "{file}"],
     "argument --prompt_file: not allowed with argument --prompt"),
    (["experts", "--run", "{run}", "--top", "0"], "--top must be positive"),
    (["experts", "--run", "{run}", "--max_windows", "0"], "--max_windows must be positive"),
    (["experts", "--run", "{run}", "--min_count", "-2"], "--min_count must be positive"),
]



@pytest.fixture
def places(tmp_path, corpus_dir):
    """What a case's placeholders stand for; the run directory's run.json is the good one."""
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(GOOD_RUN))
    dirs = {name: tmp_path / name for name in ("nonutf8", "binary", "empty", "blank")}
    for d in dirs.values():
        d.mkdir()
    for d in ("nonutf8", "binary", "blank"):
        (dirs[d] / "a.txt").write_text("some words here\n" if d != "blank" else "\n\n")
    (dirs["nonutf8"] / "b.txt").write_bytes(b"fine\n" + bytes(range(128, 256)))
    (dirs["binary"] / "b.txt").write_bytes(b"text\0with a NUL\n")
    return {"file": str(file), "run": str(run), "corpus": str(corpus_dir), "long": str(tmp_path / ("x" * 300)),
            "out": str(tmp_path / "out"), "cache": str(tmp_path / "cache"), **{k: str(v) for k, v in dirs.items()}}


def run_case(argv, places, tmp_path, capsys, harness=True):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = [a.format(**places) for a in argv]
    if harness and "--resume" not in argv:
        argv = SMOKE + (["--out_dir", str(out)] if "--out_dir" not in argv else []) \
            + (["--cache_dir", str(cache)] if "--cache_dir" not in argv else []) + argv
    try:
        code = llm.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and not cache.exists(), "left behind: " + ", ".join(
        str(p) for p in (out, cache) if p.exists())
    return err.strip()


@pytest.mark.parametrize("argv, message", CONFIG + CLI + PATHS + DATA + SIZES,
                         ids=[" ".join(a)[:60] for a, _ in CONFIG + CLI + PATHS + DATA + SIZES])
def test_bad_input_exits_2_with_one_line_naming_it_and_leaves_nothing(argv, message, places, tmp_path, capsys):
    line = run_case(argv, places, tmp_path, capsys, harness=argv[:1] != ["--resume"])
    assert message.format(**places) in line


@pytest.mark.parametrize("argv, message", PREPARE, ids=[" ".join(a)[:60] for a, _ in PREPARE])
def test_bad_input_to_prepare_exits_2_with_one_line_and_leaves_no_cache(argv, message, places, tmp_path, capsys):
    argv = ["prepare", *SMOKE, *argv] + (["--cache_dir", places["cache"]] if "--cache_dir" not in argv else [])
    assert message.format(**places) in run_case(argv, places, tmp_path, capsys, harness=False)


@pytest.mark.parametrize("argv, damage, message", RUN_FILES, ids=[m[:50] for _, _, m in RUN_FILES])
def test_a_damaged_run_json_exits_2_naming_the_field(argv, damage, message, places, tmp_path, capsys):
    state = damage if isinstance(damage, str) else json.dumps(
        {k: v for k, v in {**GOOD_RUN, **damage}.items() if v is not DROP})
    with open(os.path.join(places["run"], "run.json"), "w") as f:
        f.write(state)
    line = run_case(argv, places, tmp_path, capsys, harness=False)
    assert message.format(**places) in line and places["run"] in line


@pytest.mark.parametrize("argv, message", OPTIONS, ids=[" ".join(a[3:]).encode("ascii", "replace").decode()
                                                       for a, _ in OPTIONS])
def test_bad_generate_and_experts_options_exit_2_before_reading_the_run(argv, message, places, tmp_path, capsys):
    os.remove(os.path.join(places["run"], "run.json"))  # never read: the options are checked first
    assert message.format(**places) in run_case(argv, places, tmp_path, capsys, harness=False)


def test_there_are_at_least_sixty_cases():
    assert len(CONFIG + CLI + PATHS + DATA + PREPARE + RUN_FILES + OPTIONS) >= 60


def test_a_run_made_before_the_paths_rule_with_its_cache_inside_it_still_resumes(corpus_dir, tmp_path, capsys):
    """The out_dir/cache_dir rule refuses new runs only: one an older llm.py made resumes as it was."""
    out = tmp_path / "old"
    cfg = llm.Config(**{**llm.PRESETS["smoke"], "data": str(corpus_dir / "*.txt"), "max_steps": 4, "eval_every": 2})
    llm.run_comparison(cfg, ["dense"], str(out), str(out / "cache"), argv=["--models", "dense"])
    assert llm.main(["--resume", str(out)]) == 0
    assert "finished earlier" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Sizes: no model can be built at them, or this machine cannot train it (llm.check_memory)

SCALING = [  # llm.py scaling: a rung refused before the first one trains, naming it
    (["--ladder", "d_model=32,48,2147483648"],
     "--ladder d_model=2147483648: no model can be built at d_model 2147483648"),
    (["--ladder", "d_model=32,48,262144"], "moe[d_model=262144]: training it needs at least"),
]


@pytest.mark.parametrize("argv, message", SCALING, ids=[a[1] for a, _ in SCALING])
def test_a_ladder_rung_too_large_exits_2_naming_it_before_any_rung_trains(argv, message, places, tmp_path, capsys):
    argv = ["scaling", *SMOKE, "--data", "{corpus}", "--out_dir", "{out}", "--cache_dir", "{cache}", *argv]
    assert message in run_case(argv, places, tmp_path, capsys, harness=False)


def test_size_of_a_config_no_model_can_have_exits_2_naming_its_sizes(places, tmp_path, capsys):
    line = run_case(["size", *SMOKE, "--d_model", "1073741824"], places, tmp_path, capsys, harness=False)
    assert "no model can be built at d_model 1073741824, n_layers 2, n_heads 4" in line
    assert "Storage size calculation overflowed" in line


def least_need(cfg, world=1):  # what check_memory holds a job to: its state, half its planned activations
    plan = llm.memory_plan(cfg, world)
    return plan.total - plan.activations + plan.activations // llm.ACTIVATION_MARGIN


def test_a_job_is_refused_exactly_when_its_least_need_exceeds_what_the_machine_has(monkeypatch):
    cfg = llm.Config(**llm.PRESETS["smoke"], vocab_size=512).validate()
    jobs = llm.plan_jobs(cfg, ["moe"], [1], [])
    need, cpu = least_need(jobs[0].config), torch.device("cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(llm, "machine_memory", lambda device: (need, "of host memory available (MemAvailable)"))
    llm.check_memory(jobs, 1, cpu)  # it fits exactly
    monkeypatch.setattr(llm, "machine_memory", lambda device: (need - 1, "of host memory available (MemAvailable)"))
    with pytest.raises(llm.UsageError, match=r"^moe: training it needs at least .* GiB \(its weights, gradients, "
                                             r"optimizer state and buffers: .*, more than the .* GiB of host memory"):
        llm.check_memory(jobs, 1, cpu)
    # torchrun's processes on one host share its memory
    monkeypatch.setattr(llm, "machine_memory", lambda device: (2 * need - 1, "of host memory available"))
    llm.check_memory(jobs, 1, cpu)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(llm.UsageError, match="for its 2 processes on this host"):
        llm.check_memory(jobs, 1, cpu)


def test_the_presets_comparisons_and_ladders_need_under_a_tenth_of_a_gib_and_the_seed_ones_under_10():
    """The check refuses no run the README gives: on 2 cores, the smoke and cpu presets' comparisons and
    ladders need under 0.1 GiB; the seed preset's (a GPU's) under 10 GiB. A ladder's top rung is its largest."""
    for preset, vocab, most in (("smoke", 512, 0.1), ("cpu", 4096, 0.1), ("seed", 49152, 10)):
        cfg = llm.Config(**llm.PRESETS[preset], vocab_size=vocab).validate()
        spec, per_param = llm.LADDERS[preset]
        rungs, _ = llm.plan_ladder(cfg, llm.parse_ladder(spec, per_param, "shared"), [1], 10**9, 1)
        for job in llm.plan_jobs(cfg, list(llm.MODELS), [1], []) + rungs[-2:]:
            assert 0 < least_need(job.config) < most * 2**30, (preset, job.id)


def test_this_machine_s_memory_is_read():
    free, what = llm.machine_memory(torch.device("cpu"))
    assert free > 0 and "host memory" in what


# ----------------------------------------------------------------------------------------------
# Checkpoints that do not fit the model run.json describes

TINY = {"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 32, "num_experts": 4, "moe_layers": "1",
        "vocab_size": 300, "max_seq_len": 16}


@pytest.fixture
def trained(places):
    """The run directory made a run of one tiny MoE (untrained: its checkpoint is its initialisation),
    with its BPE tokenizer; generate, experts and export read it."""
    cfg = llm.config_from_saved(TINY).validate()
    run = places["run"]
    job = {"id": "moe", "name": "moe", "seed": 1, "config": dataclasses.asdict(cfg)}
    state = {**GOOD_RUN, "base_config": TINY, "jobs": [job],
             "dataset": {"source": "x", "tokenizer": "bpe", "vocab_size": 300, "cache": "c"}}
    with open(os.path.join(run, "run.json"), "w") as f:
        json.dump(state, f)
    llm.train_bpe(["some words here and there, " * 20], 300).save(os.path.join(run, "tokenizer.json"))
    torch.manual_seed(0)
    model = llm.Transformer(cfg)
    llm.save_checkpoint(os.path.join(run, "ckpt", "moe"), model.state_dict(), {}, {"step": 1})
    return state


def rewrite_weights(run, edit):
    """The checkpoint's model.safetensors, edited (name -> tensor), its manifest made to agree."""
    import safetensors.torch
    ckpt = os.path.join(run, "ckpt", "moe", "step-0000001")
    weights = safetensors.torch.load_file(os.path.join(ckpt, "model.safetensors"))
    edit(weights)
    safetensors.torch.save_file(weights, os.path.join(ckpt, "model.safetensors"))
    with open(os.path.join(ckpt, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["model.safetensors"] = {"sha256": llm.file_sha256(os.path.join(ckpt, "model.safetensors")),
                                     "bytes": os.path.getsize(os.path.join(ckpt, "model.safetensors"))}
    with open(os.path.join(ckpt, "manifest.json"), "w") as f:
        json.dump(manifest, f)


COMMANDS = [["generate", "--run", "{run}", "--model", "moe", "--max_new_tokens", "2"],
            ["experts", "--run", "{run}", "--model", "moe"],
            ["export", "--run", "{run}", "--model", "moe", "--out", "{out}"]]

MISFITS = [  # (what is damaged, how, what the line says)
    ("run.json", lambda state, w: state["jobs"][0]["config"].update(d_model=64),
     "model.safetensors: embed.weight has shape [300, 32]; the model run.json describes (moe) has [300, 64]"),
    ("run.json", lambda state, w: state["jobs"][0]["config"].update(num_experts=8),
     "model.safetensors: blocks.1.ffn.w_up has shape [4, 32, 32]; the model run.json describes (moe) has [8, 32, 32]"),
    ("weights", lambda state, w: w.update({"blocks.0.ffn.up.weight": torch.zeros(32, 33)}),
     "model.safetensors: blocks.0.ffn.up.weight has shape [32, 33]; the model run.json describes (moe) has [32, 32]"),
    ("weights", lambda state, w: w.pop("norm.weight"),
     "model.safetensors: it holds no norm.weight, which the model run.json describes (moe) has"),
    ("weights", lambda state, w: w.update({"blocks.7.extra": torch.zeros(2)}),
     "model.safetensors: it holds blocks.7.extra, which the model run.json describes (moe) has not"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
@pytest.mark.parametrize("where, damage, message", MISFITS, ids=[m.split(": ", 1)[1][:40] for _, _, m in MISFITS])
def test_a_checkpoint_that_does_not_fit_its_model_exits_2_naming_the_file_and_the_tensor(
        command, where, damage, message, trained, places, tmp_path, capsys):
    if where == "run.json":
        damage(trained, None)
        with open(os.path.join(places["run"], "run.json"), "w") as f:
            json.dump(trained, f)
    else:
        rewrite_weights(places["run"], lambda weights: damage(None, weights))
    line = run_case(command, places, tmp_path, capsys, harness=False)
    assert line.startswith(f"llm.py: error: {places['run']}/ckpt/moe/step-0000001/") and line.endswith(message)


def test_the_tiny_run_s_checkpoint_is_read_by_generate_when_nothing_is_damaged(trained, places, capsys):
    """The other side of the misfit cases: the same run, undamaged, generates."""
    assert llm.main(["generate", "--run", places["run"], "--max_new_tokens", "2", "--prompt", "some"]) == 0


def test_an_optimizer_state_of_the_wrong_shape_exits_2_naming_the_file_and_the_tensor(tmp_path):
    cfg = llm.config_from_saved(TINY).validate()
    model = llm.Transformer(cfg)
    optimizers = llm.make_optimizers(model, cfg)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in optimizers]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))[0].backward()
    for o in optimizers:
        o.step()
    states = [o.state_dict() for o in optimizers]
    path = llm.save_checkpoint(str(tmp_path), model.state_dict(), llm.training_state(
        states, schedulers, scaler, torch.device("cpu")), {"step": 1})
    llm.restore_checkpoint(path, model, optimizers, schedulers, scaler)  # whole, it restores
    states[0]["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    torch.save(llm.training_state(states, schedulers, scaler, torch.device("cpu")), os.path.join(path, "optim.pt"))
    with pytest.raises(llm.UsageError, match=r"optim.pt: blocks.0.attn.qkv.weight momentum_buffer has shape \[3, 3\]; "
                                             r"the parameter has \[96, 32\]"):
        llm.restore_checkpoint(path, model, optimizers, schedulers, scaler)
    with open(os.path.join(path, "optim.pt"), "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(llm.UsageError, match=r"optim.pt: not readable \(UnpicklingError"):
        llm.restore_checkpoint(path, model, optimizers, schedulers, scaler)


# ----------------------------------------------------------------------------------------------
# A ladder's run.json whose finished rows are damaged: refused when it is read, before anything is written

LADDER = {"field": "d_model", "values": [32, 48, 64], "tokens_per_param": 0.5, "fit_E": "shared", "tune": "",
          "tune_rungs": 2}


def ladder_state():
    """A ladder's run.json, made up, every job finished with a whole row."""
    jobs = []
    for i, value in enumerate(LADDER["values"]):
        config = dataclasses.asdict(llm.Config(d_model=value, n_heads=4, vocab_size=512))
        for fam in ("moe", "dense-matched"):
            name = f"{fam}[d_model={value}]"
            row = {"id": name, "name": name, "seed": 1, "point": None, "rung": i, "val_loss": 5.0 - i / 10,
                   "val_perplexity": 140.0, "val_accuracy": 0.1, "train_loss": 5.0, "total_params": 10**5,
                   "active_params": 9 * 10**4, "flops_per_token": 6 * 10**5, "optimizer_flops_per_step": 10**6,
                   "tokens_per_s": 1000.0, "wall_time_s": 3.0, "epochs": 0.5, "steps": 10, "skipped_steps": 0,
                   "tokens": 5120, "train_time_s": 2.5, "experts": None, "load_cv": None, "config": config}
            jobs.append({"id": name, "name": name, "seed": 1, "config": config, "rung": i, "status": "done",
                         "row": row})
    return {**GOOD_RUN, "models": ["moe", "dense-matched"], "jobs": jobs, "ladder": LADDER}


def damage_row(key, value):
    return lambda jobs: jobs[5]["row"].update({key: value}) if value is not DROP else jobs[5]["row"].pop(key)


ROWS = [  # jobs[5] is dense-matched[d_model=64], of rung 2
    (damage_row("rung", 7), "jobs[5]: row: rung 7 is not its job's (2)"),
    (lambda jobs: [jobs[5].update(rung=7), jobs[5]["row"].update(rung=7)],
     "jobs[5]: row: rung 7 is not one of the ladder's 3 rungs"),
    (lambda jobs: [j.update(name="moe[d_model=32]", id="moe[d_model=32]") for j in (jobs[5], jobs[5]["row"])],
     "jobs[5]: row: name 'moe[d_model=32]' is not a model of rung 2 (d_model 64)"),
    (damage_row("val_loss", DROP), "jobs[5]: row: val_loss must be a finite number; got None"),
    (damage_row("train_loss", DROP), "jobs[5]: row: train_loss must be a finite number; got None"),
    (damage_row("val_loss", float("nan")), "jobs[5]: row: val_loss must be a finite number; got nan"),
    (damage_row("seed", 2), "jobs[5]: row: seed 2 is not its job's (1)"),
    (damage_row("steps", 0), "jobs[5]: row: steps must be positive; got 0"),
    (damage_row("experts", [{"load": [1.0]}]),
     "jobs[5]: row: experts: expected a list of layers' statistics beside config_moe_layer_ids"),
    (damage_row("config", {"d_model": 64}), "jobs[5]: row: config: moe_layers, vocab_size, muon_lr, adamw_lr missing"),
    (damage_row("config", {"d_model": "wide"}), "jobs[5]: row: config: d_model must be int; got 'wide'"),
    (damage_row("load_cv", "low"), "jobs[5]: row: load_cv must be a finite number; got 'low'"),
]


@pytest.mark.parametrize("command", [["--resume", "{run}"], ["scaling", "--resume", "{run}"]], ids=["", "scaling"])
@pytest.mark.parametrize("damage, message", ROWS, ids=[m[14:60] for _, m in ROWS])
def test_a_damaged_row_of_a_ladder_exits_2_naming_it_and_touches_nothing(command, damage, message, places, tmp_path,
                                                                          capsys):
    path = os.path.join(places["run"], "run.json")
    with open(path, "w") as f:
        json.dump(ladder_state(), f)
    llm.load_run(places["run"])  # whole, it is read
    state = ladder_state()
    damage(state["jobs"])
    with open(path, "w") as f:
        json.dump(state, f)
    before = sorted(os.listdir(places["run"])), pathlib.Path(path).read_bytes()
    line = run_case(command, places, tmp_path, capsys, harness=False)
    assert line.endswith(f"--resume {places['run']}: run.json: {message}"), line
    assert (sorted(os.listdir(places["run"])), pathlib.Path(path).read_bytes()) == before


# ----------------------------------------------------------------------------------------------
# Launch: a rendezvous that times out

@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_a_world_that_cannot_form_in_dist_timeout_says_so_in_one_line_per_rank_without_a_cpp_backtrace(
        corpus_dir, tmp_path):
    """Rank 1 finds no rank 0 at its port and rank 0 (at another) no rank 1, within --dist_timeout 0.001:
    torch's C++ logs each with a backtrace of some 40 lines; llm.py's stderr holds its one line."""
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "llm.py", *SMOKE, "--models", "dense", "--data", str(corpus_dir / "*.txt"),
             "--dist_timeout", "0.001", "--out_dir", str(tmp_path / f"out{rank}"), "--cache_dir",
             str(tmp_path / "cache")], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=PROCESS_TIMEOUT)
        assert proc.returncode == 2, err
        assert err.startswith("llm.py: error: launch: the 2 processes could not form a world (waiting at most "
                              "0.001 s") and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"out{rank}").exists()


def test_running_out_of_memory_past_the_plan_is_one_line_and_exit_1(corpus_dir, tmp_path, capsys, monkeypatch):
    def train_model(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(llm, "train_model", train_model)
    assert llm.main([*SMOKE, "--models", "dense", "--data", str(corpus_dir / "*.txt"), "--out_dir",
                     str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip()  # after gpu_monitor's line on a machine without NVML
    assert err.splitlines()[-1].startswith("llm.py: out of memory (CUDA out of memory. Tried to allocate 40.00 GiB); "
                                           "llm.py size") and "Traceback" not in err, err
