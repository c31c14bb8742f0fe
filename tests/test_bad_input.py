"""Bad input, case by case: every one exits with status 2 and one line on stderr naming what is wrong,
with no traceback, and leaves no out_dir and no cache entry behind.

Each case runs llm.main in this process with its own out_dir and cache_dir under tmp_path (neither
exists before). `{corpus}`, `{file}`, `{run}` and `{long}` in a case's arguments stand for the test
corpus, a plain file, a damaged run directory and a 300-character name.
"""

import json
import os

import pytest

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

PREPARE = [  # llm.py prepare: the same line, and no cache entry or staging directory left
    (["--data", "{binary}"], "could not read the text files: {binary}/b.txt is binary (NUL bytes)"),
    (["--data", "{blank}"], "it holds no text"),
    (["--data", "no/such/file.txt"], "--data no/such/file.txt: no such file"),
    (["--data", "{corpus}", "--max_seq_len", "100000"], "too little text"),
    (["--data", "{corpus}", "--tokenize_workers", "-2"], "tokenize_workers must not be negative"),
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
]

OPTIONS = [  # generate and experts check their options before they read the run
    (["generate", "--run", "{run}", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["generate", "--run", "{run}", "--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["generate", "--run", "{run}", "--top_p", "0"], "--top_p must lie in (0, 1]"),
    (["generate", "--run", "{run}", "--top_p", "nan"], "--top_p must lie in (0, 1]"),
    (["generate", "--run", "{run}", "--top_k", "-1"], "--top_k must not be negative"),
    (["generate", "--run", "{run}", "--max_new_tokens", "0"], "--max_new_tokens must be positive"),
    (["generate", "--run", "{run}", "--seed", "-1"], "--seed must lie in [0, 2**63)"),
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


@pytest.mark.parametrize("argv, message", CONFIG + CLI + PATHS + DATA,
                         ids=[" ".join(a)[:60] for a, _ in CONFIG + CLI + PATHS + DATA])
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
    assert message in line and places["run"] in line


@pytest.mark.parametrize("argv, message", OPTIONS, ids=[" ".join(a[3:]) for a, _ in OPTIONS])
def test_bad_generate_and_experts_options_exit_2_before_reading_the_run(argv, message, places, tmp_path, capsys):
    os.remove(os.path.join(places["run"], "run.json"))  # never read: the options are checked first
    assert message in run_case(argv, places, tmp_path, capsys, harness=False)


def test_there_are_at_least_sixty_cases():
    assert len(CONFIG + CLI + PATHS + DATA + PREPARE + RUN_FILES + OPTIONS) >= 60


def test_a_run_made_before_the_paths_rule_with_its_cache_inside_it_still_resumes(corpus_dir, tmp_path, capsys):
    """The out_dir/cache_dir rule refuses new runs only: one an older llm.py made resumes as it was."""
    out = tmp_path / "old"
    cfg = llm.Config(**{**llm.PRESETS["smoke"], "data": str(corpus_dir / "*.txt"), "max_steps": 4, "eval_every": 2})
    llm.run_comparison(cfg, ["dense"], str(out), str(out / "cache"), argv=["--models", "dense"])
    assert llm.main(["--resume", str(out)]) == 0
    assert "finished earlier" in capsys.readouterr().out
