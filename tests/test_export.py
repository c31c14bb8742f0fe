"""`llm.py export`: a trained model as a Hugging Face directory that stock transformers classes load
offline, with our logits, our greedy generations and our tokenizer; and the kinds no stock class
holds exactly, refused in one line.

Every run here is a smoke run on the `corpus_dir` fixture, a few steps long: the weights need not be
good, only trained (a routed expert's bias moves, norms leave 1).
"""

import errno
import json
import logging
import os
import shlex
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.activations import ACT2FN

import llm

SUPPORTED = {  # run -> its extra flags and models; each model's export class is checked below
    "gated": ["--ffn", "swiglu", "--n_layers", "4", "--moe_layers", "alternate", "--n_kv_heads", "2",
              "--models", "dense,moe", "--ckpt_every", "5"],
    "shared": ["--ffn", "swiglu", "--n_shared_experts", "1", "--norm_topk_prob", "false", "--moe_layers", "1",
               "--models", "moe"],
    "plain": ["--models", "dense,moe"],  # ffn silu: a dense Arcee; its MoE is refused
    "aux_free": ["--ffn", "swiglu", "--balance", "aux_free", "--n_shared_experts", "1", "--models", "moe"],
    # each point is refused: capacity routing, expert choice, a sigmoid score, a bias with top-1 gates
    "routing": ["--ffn", "swiglu", "--models", "moe", "--sweep", "routing=switch,expert_choice"],
    "bias": ["--ffn", "swiglu", "--balance", "aux_free", "--models", "moe", "--sweep",
             "router_score=softmax,sigmoid", "expert_top_k=1"],
}

KINDS = [  # (run, model, stock class): every kind the issue names
    ("plain", "dense", "ArceeForCausalLM"),  # dense, non-gated SiLU
    ("gated", "dense", "LlamaForCausalLM"),  # dense SwiGLU, GQA
    ("gated", "moe", "Qwen2MoeForCausalLM"),  # SwiGLU MoE in alternate layers, GQA, renormalised gates
    ("shared", "moe", "Qwen2MoeForCausalLM"),  # a shared expert, gates not renormalised, MoE in layer 1 only
    ("aux_free", "moe", "Ernie4_5_MoeForCausalLM"),  # aux_free's trained selection bias, a shared expert
]


def run_main(argv):
    try:
        return llm.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        return e.code


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("llm.py")]


@pytest.fixture(scope="module")
def smoke(corpus_dir, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("export-cache"))
    return ["--preset", "smoke", "--data", str(corpus_dir / "*.txt"), "--cache_dir", cache, "--eval_every", 10]


@pytest.fixture(scope="module")
def runs(smoke, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for name, flags in SUPPORTED.items():
        out[name] = str(root / name)
        steps = 10 if name in ("gated", "shared", "plain", "aux_free") else 2
        assert run_main(smoke + ["--max_steps", steps, "--out_dir", out[name], *flags]) == 0
    return out


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """Each supported kind exported once: (run, model) -> its directory."""
    root, out = tmp_path_factory.mktemp("exports"), {}
    for run, model, _ in KINDS:
        out[run, model] = str(root / f"{run}-{model}")
        assert run_main(["export", "--run", runs[run], "--model", model, "--out", out[run, model]]) == 0
    return out


def trained(runs, run, model):
    net, cfg, state, _ = llm.load_trained(runs[run], model, torch.device("cpu"), log=lambda *a: None)
    return net, cfg, state


def held_out_windows(state, cfg, n=4):
    data = llm.prepare_data(state.base_config, state.cache_dir, log=lambda *a: None)
    windows = llm.eval_windows(data.val, cfg.max_seq_len, limit=n)
    inputs, _ = windows.batch(range(len(windows)))
    return torch.as_tensor(np.asarray(inputs), dtype=torch.long)


@pytest.mark.parametrize("run, model, cls", KINDS)
def test_the_export_loads_offline_as_its_stock_class_and_gives_our_fp32_logits_on_held_out_windows(
        runs, exports, run, model, cls):
    with open(os.path.join(exports[run, model], "config.json")) as f:
        assert json.load(f)["architectures"] == [cls]
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports[run, model], dtype=torch.float32).eval()
    assert type(hf).__name__ == cls
    net, cfg, state = trained(runs, run, model)
    idx = held_out_windows(state, cfg)
    with torch.no_grad():
        gap = (hf(idx).logits - net(idx)[0]).abs().max().item()
    assert gap <= 1e-4


def test_the_aux_free_bias_reaches_the_export_and_changes_what_it_routes(runs, exports):
    """torchtitan #3557: an export that drops the bias routes differently. Here it is carried, and
    dropping it again moves the logits: the test above would catch its loss."""
    net, cfg, state = trained(runs, "aux_free", "moe")
    assert all(b.ffn.expert_bias.any() for b in net.blocks if b.is_moe)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports["aux_free", "moe"], dtype=torch.float32).eval()
    idx = held_out_windows(state, cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.zero_()
        assert (hf(idx).logits - net(idx)[0]).abs().max().item() > 1e-3


@pytest.mark.parametrize("run, model, cls", KINDS)
def test_hf_greedy_generation_gives_the_tokens_of_llm_py_generate_top_k_1(runs, exports, run, model, cls, capsys):
    prompt, n = "ab cd ef", 16
    assert run_main(["generate", "--run", runs[run], "--model", model, "--prompt", prompt, "--top_k", 1,
                     "--max_new_tokens", n]) == 0
    ours_text = capsys.readouterr().out.rstrip("\n")
    tok = transformers.AutoTokenizer.from_pretrained(exports[run, model])
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports[run, model], dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    theirs = hf.generate(ids, do_sample=False, max_new_tokens=n)[0]
    net, *_ = trained(runs, run, model)
    mine = llm.generate(net, ids, n, temperature=0)[0]
    # transformers stops at the end-of-text token; llm.py generates on past it
    assert theirs.tolist() == mine[: len(theirs)].tolist()
    assert len(theirs) == len(mine) or theirs[-1].item() == tok.eos_token_id
    if len(theirs) == len(mine):
        assert tok.decode(theirs, skip_special_tokens=True) == ours_text


def test_the_tokenizer_goes_with_the_model_and_round_trips_text_to_the_same_ids(runs, exports):
    text = "ab cd ef, gh ij!\nkl <|endoftext|> mn"
    state = llm.load_run(runs["gated"], ranges=False)
    mine = llm.load_tokenizer(runs["gated"], state)
    theirs = transformers.AutoTokenizer.from_pretrained(exports["gated", "dense"])
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ids == mine(text, add_special_tokens=False)["input_ids"]
    assert theirs.decode(ids) == text
    with open(os.path.join(exports["gated", "dense"], "config.json")) as f:
        config = json.load(f)
    assert theirs.eos_token == llm.EOS and config["eos_token_id"] == theirs.eos_token_id == llm.eos_id(mine)
    # with transformers' defaults (special tokens added) it encodes as training did, and pads with EOS
    assert theirs(text)["input_ids"] == ids
    assert theirs.pad_token_id == theirs.bos_token_id == config["pad_token_id"] == config["bos_token_id"]
    assert theirs(["ab", "ab cd ef"], padding=True)["input_ids"][0][-1] == theirs.eos_token_id


def test_the_tokenizer_config_names_a_class_transformers_4_has_too_and_it_loads_the_same_ids(exports):
    """transformers 5 saves TokenizersBackend, which 4.x (requirements.txt allows >= 4.46) cannot find;
    PreTrainedTokenizerFast is a class of both (the README shows it loaded under 4.46.3 and 4.57.6)."""
    out = exports["gated", "dense"]
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # 4.x's class would also return token_type_ids, which generate(**tok(text)) refuses
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    text = "ab cd ef, gh ij!\nkl"
    named = getattr(transformers, config["tokenizer_class"]).from_pretrained(out)
    assert named(text) == transformers.AutoTokenizer.from_pretrained(out)(text)


def test_the_config_carries_the_rope_base_where_transformers_4_reads_it(runs, exports):
    """4.x reads rope_theta, not rope_parameters: without it a class's default base (Ernie-4.5's is
    500000) would be used silently."""
    for (run, model), out in exports.items():
        with open(os.path.join(out, "config.json")) as f:
            config = json.load(f)
        _, cfg, _ = trained(runs, run, model)
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == cfg.rope_base


def test_generate_stays_inside_the_training_context_unless_asked_and_says_nothing(runs, exports):
    """generation_config.json sets no length: transformers' default cuts at the context, and a
    max_length there would make every generate() given max_new_tokens warn that both are set."""
    out = exports["gated", "dense"]
    _, cfg, _ = trained(runs, "gated", "dense")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(1, cfg.vocab_size, (1, cfg.max_seq_len - 4), generator=torch.Generator().manual_seed(0))
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():  # with no length at all, transformers advises max_new_tokens (any model)
        warnings.simplefilter("ignore")
        assert hf.generate(**prompt, do_sample=False).shape[1] <= cfg.max_seq_len
    said = []
    handler = logging.Handler()
    handler.emit = said.append
    logging.getLogger("transformers").addHandler(handler)  # its own handler writes to stderr, unpropagated
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert hf.generate(**prompt, do_sample=False, max_new_tokens=2).shape[1] <= cfg.max_seq_len - 2
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [r.getMessage() for r in said] + [str(w.message) for w in caught] == []


def test_a_qwen2_moe_export_without_shared_experts_loads_without_a_warning(runs, exports):
    """Qwen2-MoE always builds a shared expert: 0 wide, torch warned six times at every load that
    initialising it does nothing. One unit of zeros adds 0, and the logit tests hold it exact."""
    out = exports["gated", "moe"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert [str(w.message) for w in caught] == []
    _, cfg, _ = trained(runs, "gated", "moe")
    with open(os.path.join(out, "config.json")) as f:
        assert cfg.n_shared_experts == 0 and json.load(f)["shared_expert_intermediate_size"] == 1


def test_every_ffn_kind_says_what_it_exports_as_and_that_name_computes_it():
    """hf_act is transformers' name of the kind's activation (a gated kind's gate's), or None."""
    for name, kind in llm.FFN_KINDS.items():
        if kind.hf_act is None:
            continue
        assert kind.hf_act in ACT2FN, name
        h = torch.randn(3, 8 * kind.up_factor)
        theirs = ACT2FN[kind.hf_act]
        expected = theirs(h[:, :8]) * h[:, 8:] if kind.up_factor == 2 else theirs(h)
        assert torch.allclose(kind.activation(h), expected, atol=1e-6), name
    assert {k: v.hf_act for k, v in llm.FFN_KINDS.items()} == {"silu": "silu", "swiglu": "silu"}


def geglu(h):  # a gated kind one registry entry away: GELU gates
    gate, up = h.chunk(2, dim=-1)
    return F.gelu(gate) * up


def test_a_gated_ffn_of_another_activation_exports_with_the_registrys_name(runs, tmp_path, monkeypatch):
    """The activation comes from FFN_KINDS: with swiglu's entry made GELU-gated, the MoE (dense MLPs
    in alternate layers, gated experts) exports with hidden_act gelu and our logits; named silu,
    its logits differ and nothing is written."""
    monkeypatch.setitem(llm.FFN_KINDS, "swiglu", llm.FFNKind(geglu, up_factor=2, hf_act="gelu"))
    out = tmp_path / "moe"
    assert run_main(["export", "--run", runs["gated"], "--model", "moe", "--out", out]) == 0
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu"
    monkeypatch.setitem(llm.FFN_KINDS, "swiglu", llm.FFNKind(geglu, up_factor=2, hf_act="silu"))
    assert run_main(["export", "--run", runs["gated"], "--model", "dense", "--out", tmp_path / "dense"]) == 1
    assert sorted(os.listdir(tmp_path)) == ["moe"]


def test_an_ffn_kind_without_a_transformers_activation_is_refused_in_one_line_naming_it(
        runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(llm.FFN_KINDS, "silu", llm.FFNKind(F.silu))  # no hf_act
    assert run_main(["export", "--run", runs["plain"], "--model", "dense", "--out", tmp_path / "export"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no stock transformers class holds dense" in lines[0]
    assert "ffn silu: its activation has no transformers name" in lines[0]
    assert os.listdir(tmp_path) == []


def test_a_hub_tokenizer_is_saved_beside_the_model(smoke, corpus_dir, tmp_path):
    """A local stand-in for a Hub tokenizer: a fast tokenizer directory given as --tokenizer."""
    docs = [p.read_text() for p in sorted(corpus_dir.glob("*.txt"))]
    hub = llm.wrap_tokenizer(llm.train_bpe(docs, 300))
    hub.save_pretrained(tmp_path / "hub-tokenizer")
    run, out = tmp_path / "run", tmp_path / "export"
    assert run_main(smoke + ["--models", "dense", "--ffn", "swiglu", "--max_steps", 2, "--out_dir", run,
                             "--tokenizer", tmp_path / "hub-tokenizer", "--vocab_size", 0]) == 0
    assert run_main(["export", "--run", run, "--model", "dense", "--out", out]) == 0
    text = "xy zw, ab"
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert theirs(text)["input_ids"] == hub(text)["input_ids"]
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("run, model, message", [
    ("plain", "moe", "experts of ffn silu: every stock MoE class has gated experts (train with --ffn swiglu)"),
    ("routing", "moe[routing=switch]",
     "routing switch: stock classes route top-k with no capacity (train with --routing topk)"),
    ("routing", "moe[routing=expert_choice]", "routing expert_choice"),
    ("bias", "moe[router_score=sigmoid,expert_top_k=1]", "router_score sigmoid"),
    ("bias", "moe[router_score=softmax,expert_top_k=1]",
     "a selection bias (aux_free): Qwen2-MoE has none (train with --balance aux_loss)"),
    ("bias", "moe[router_score=softmax,expert_top_k=1]", "Ernie-4.5-MoE renormalises every token's gates"),
])
def test_a_kind_no_stock_class_holds_exactly_exits_2_in_one_line_and_writes_nothing(
        runs, tmp_path, run, model, message, capsys):
    out = tmp_path / "export"
    assert run_main(["export", "--run", runs[run], "--model", model, "--out", out]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no stock transformers class holds" in lines[0] and message in lines[0]
    assert os.listdir(tmp_path) == []


def test_an_export_whose_logits_differ_from_ours_is_never_written(runs, tmp_path, monkeypatch, capsys):
    """Without the RoPE row permutation Llama's logits differ: export says so, exit 1, no directory."""
    monkeypatch.setattr(llm, "rope_halves", lambda w, heads: w)
    assert run_main(["export", "--run", runs["gated"], "--model", "dense", "--out", tmp_path / "export"]) == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "LlamaForCausalLM's logits differ from ours" in lines[0]
    assert "nothing written" in lines[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt5"], "--model gpt5: not in"),
    (["--out", "{exists}"], "exists already"),
    (["--out", "{missing}/export"], "its parent directory does not exist"),
])
def test_bad_export_arguments_exit_2_in_one_line(runs, tmp_path, args, message, capsys):
    (tmp_path / "exists").mkdir()
    args = [a.format(exists=tmp_path / "exists", missing=tmp_path / "missing") for a in args]
    argv = ["export", "--run", runs["gated"], "--model", "dense", "--out", tmp_path / "new", *args]
    assert run_main(argv) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and message in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["exists"]


def no_space(*args, **kwargs):  # as tokenizers (Rust) reports a full disk
    raise Exception("No space left on device (os error 28)")  # noqa: TRY002


@pytest.mark.parametrize("where", ["/proc", "our writes", "the tokenizer"])
def test_an_out_that_cannot_be_written_is_named_in_one_line_exit_2_and_nothing_is_left(
        runs, tmp_path, monkeypatch, capsys, where):
    """Not the hidden directory export fills: --out as given. /proc refuses a new directory even to
    root; a full disk is an OSError (our writes) or an error from a library written in Rust."""
    out = "/proc/llm-export" if where == "/proc" else str(tmp_path / "export")
    if where == "our writes":
        def full(path, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        monkeypatch.setattr(llm, "write_file", full)
    if where == "the tokenizer":
        monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", no_space)
    assert run_main(["export", "--run", runs["gated"], "--model", "dense", "--out", out]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"llm.py: error: --out {out}: ") and "/." not in lines[0], lines
    assert os.listdir(tmp_path) == []
    if where != "/proc":
        assert lines[0].endswith("cannot write the export there (No space left on device); nothing written")


def test_the_model_card_names_the_run_its_data_val_loss_and_commands(runs, exports):
    with open(os.path.join(exports["gated", "moe"], "README.md")) as f:
        card = f.read()
    state = llm.load_run(runs["gated"], ranges=False)
    job = llm.find_job(state, "moe", runs["gated"])
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"{job.row['val_loss']:.4f} nats per token on the whole held-out set, for these weights (step 10)" in card
    assert "Qwen2MoeForCausalLM" in card and "held out as whole documents" in card
    assert f"python llm.py {shlex.join(state.argv)}`" in card  # the training command, as run.json recorded it
    assert f"python llm.py export --run {runs['gated']} --model moe" in card
    assert "q and k rows are reordered" in card and "sqrt(d_model)" in card


def test_the_card_of_an_earlier_checkpoint_does_not_give_the_final_val_loss(runs, tmp_path, capsys):
    """The final checkpoint damaged, export takes the one before (step 5 of 10): the val loss the run
    measured at step 10 is not these weights'."""
    run = tmp_path / "run"
    shutil.copytree(runs["gated"], run)
    with open(run / "ckpt" / "dense" / "step-0000010" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert run_main(["export", "--run", run, "--model", "dense", "--out", tmp_path / "export"]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "not measured for these weights (step 5;" in card and "nats per token" not in card
    assert "step-0000005" in capsys.readouterr().out


def test_the_export_gets_the_permissions_of_any_new_directory_and_file_not_a_temporary_s(exports):
    umask = os.umask(0)
    os.umask(umask)
    out = exports["gated", "dense"]
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask
    for name in os.listdir(out):
        assert os.stat(os.path.join(out, name)).st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("ids, placed", [
    ([0, 1, 2, 3], (0, 3, 1)), ([1, 3, 5], (1, 5, 2)), ([2, 3], (2, 3, 1)), ([3], (3, 3, 4)), ([2, 5], (2, 5, 3)),
    ([0, 2], None), ([1, 2, 5], None),
])
def test_moe_layers_are_placed_as_ernie_places_them_or_refused(ids, placed):
    """Ernie-4.5-MoE's layer i is MoE when start <= i <= end and (i + 1) % interval == 0."""
    assert llm.every_kth(ids) == placed
    if placed:
        start, end, interval = placed
        assert [i for i in range(8) if start <= i <= end and (i + 1) % interval == 0] == ids


def test_rope_halves_makes_a_rotation_of_halves_apply_torchtune_s_rotation_of_adjacent_pairs():
    """q, k (per head) permuted evens-then-odds, then rotated as Llama does, equal the permutation of
    torchtune's rotation; the permutation is the same for q and k, so their dot products agree."""
    from torchtune.modules import RotaryPositionalEmbeddings
    heads, hd, T = 2, 8, 5
    x = torch.randn(1, T, heads, hd)
    rotated = RotaryPositionalEmbeddings(hd, T)(x)  # (1, T, heads, hd): ours
    w = torch.eye(heads * hd)
    perm = llm.rope_halves(w, heads)  # the rows of the identity: the permutation itself
    xp = (x.flatten(2) @ perm.T).view(1, T, heads, hd)
    freqs = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.arange(T).float()[:, None] * freqs  # (T, hd/2)
    cos, sin = torch.cat([angles.cos()] * 2, -1)[None, :, None], torch.cat([angles.sin()] * 2, -1)[None, :, None]
    half = torch.cat([-xp[..., hd // 2:], xp[..., : hd // 2]], -1)
    theirs = xp * cos + half * sin
    assert torch.allclose(theirs, (rotated.flatten(2) @ perm.T).view(1, T, heads, hd), atol=1e-6)
