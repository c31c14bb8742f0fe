"""Variants are registries: each Config field that picks a variant accepts exactly its registry's
keys, and a new variant is one function plus its registry entry, as the README shows."""

import dataclasses
import json
import os
import re

import pytest
import torch

import llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every Config field that picks a variant, and the registry that lists them
REGISTRIES = {"ffn": "FFN_KINDS", "router_score": "ROUTER_SCORES", "routing": "ROUTING_MODES",
              "schedule": "SCHEDULES"}


def test_the_variant_fields_are_exactly_the_registered_ones():
    registered = {f.name for f in dataclasses.fields(llm.Config) if "registry" in f.metadata}
    assert registered == set(REGISTRIES)


@pytest.mark.parametrize("name, registry", REGISTRIES.items())
def test_each_variant_field_accepts_exactly_its_registrys_keys(name, registry):
    keys = getattr(llm, registry)
    f = next(f for f in dataclasses.fields(llm.Config) if f.name == name)
    assert f.metadata["registry"]() is keys
    assert f.default in keys
    for key in keys:
        assert getattr(llm.Config(**{name: key}).validate(), name) == key
    with pytest.raises(llm.UsageError, match=f"^{name} must be one of {', '.join(keys)}; got 'nope'$"):
        llm.Config(**{name: "nope"}).validate()
    help_text = " ".join(llm.build_parser().format_help().split())
    assert f"one of {', '.join(keys)}; default {f.default!r}" in help_text


@pytest.mark.parametrize("name, registry", REGISTRIES.items())
def test_a_key_added_to_a_registry_is_accepted_and_one_removed_is_refused(name, registry, monkeypatch):
    keys = getattr(llm, registry)
    default = next(f.default for f in dataclasses.fields(llm.Config) if f.name == name)
    monkeypatch.setattr(llm, registry, {**keys, "added": keys[default]})
    assert llm.Config(**{name: "added"}).validate()
    monkeypatch.setattr(llm, registry, {k: v for k, v in keys.items() if k != default})
    with pytest.raises(llm.UsageError, match=f"^{name} must be one of"):
        llm.Config().validate()


def readme_examples():
    """The Python blocks of the README's "Reading and changing llm.py"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Reading and changing llm.py", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_readme_shows_a_new_activation_schedule_router_score_and_routing_mode_as_one_entry_each():
    blocks = readme_examples()
    assert len(blocks) == 4
    for block, registry in zip(blocks, ("FFN_KINDS", "SCHEDULES", "ROUTER_SCORES", "ROUTING_MODES")):
        assert re.findall(r"^(\w+) = ", block, re.MULTILINE) == [registry]  # the registry is all it rebinds
        assert len(re.findall(r"^def ", block, re.MULTILINE)) == 1  # and one function


def test_the_readmes_four_examples_train_with_no_other_edit(corpus_dir, tmp_path, monkeypatch, capsys):
    namespace = dict(vars(llm))
    for block in readme_examples():
        exec(block, namespace)  # noqa: S102  (the README's own code, as if pasted into llm.py)
    for registry in ("FFN_KINDS", "SCHEDULES", "ROUTER_SCORES", "ROUTING_MODES"):
        assert namespace[registry] is not getattr(llm, registry)
        monkeypatch.setattr(llm, registry, namespace[registry])
    out = tmp_path / "run"
    flags = ["--ffn", "relu2", "--schedule", "linear", "--router_score", "softplus", "--routing", "confident"]
    assert llm.main(["--preset", "smoke", "--models", "dense,dense-matched,moe", "--data", str(corpus_dir / "*.txt"),
                     "--max_steps", "8", "--eval_every", "4", "--out_dir", str(out),
                     "--cache_dir", str(tmp_path / "cache"), *flags]) == 0
    printed = capsys.readouterr().out
    assert "relu2 FFN" in printed and "softplus router" in printed  # describe names them
    assert "confident top-2" in printed
    results = json.loads((out / "results.json").read_text())
    for row in results["models"]:
        assert row["config"]["ffn"] == "relu2" and row["val_loss"] < 10
    # the mode's own statistic, in every evaluation of every MoE layer: the experts a token used, of its top 2
    used = [layer["experts_used"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["model"] == "moe" and r["kind"] == "eval" for layer in r["experts"]]
    assert len(used) == 2 * 2 and all(0 < u <= 2 for u in used)  # 2 evaluations, 2 MoE layers
    cfg = llm.config_from_saved(results["models"][-1]["config"])
    assert llm.lr_factor(cfg.max_steps - 1, cfg) == pytest.approx(cfg.min_lr_frac)  # linear ends at the floor
    moe = llm.MoE(cfg)
    scores, shares = moe.score(torch.randn(5, cfg.num_experts))
    assert (scores > 0).all() and torch.allclose(shares.sum(-1), torch.ones(5))
    with torch.no_grad():  # a sharp router: many a second pick holds under a fair share, and is not used
        moe.router.weight.normal_(std=3.0)
    routing = moe.eval().route(torch.randn(64, cfg.d_model))
    stats = llm.expert_stats(routing.sums(moe.mode.stats), moe.E)
    assert stats["experts_used"] == pytest.approx((routing.gates > 0).sum().item() / 64)
    assert 1 <= stats["experts_used"] < 2
    size = llm.model_size(cfg)  # a non-gated FFN: one matrix up, as silu
    assert size.total == llm.model_size(dataclasses.replace(cfg, ffn="silu")).total


@pytest.mark.parametrize("score", list(llm.ROUTER_SCORES))
@pytest.mark.parametrize("routing", list(llm.ROUTING_MODES))
def test_describe_names_the_ffn_the_routing_the_router_score_and_the_balance(routing, score):
    cfg = llm.Config(vocab_size=100, ffn="swiglu", routing=routing, router_score=score, balance="aux_free")
    line = llm.describe("moe", cfg)
    label = llm.ROUTING_MODES[routing].label(cfg)
    assert line.startswith("moe: swiglu FFN, d_ff 1536, 8 experts of d_ff 1536 (")
    assert f"({label}, {score} router, aux_free balance) in layers [1, 3, 5]" in line
    assert len({mode.label(cfg) for mode in llm.ROUTING_MODES.values()}) == len(llm.ROUTING_MODES)
    dense = llm.describe("dense", dataclasses.replace(cfg, moe_layers="none"))
    assert dense.startswith("dense: swiglu FFN, d_ff 1536; params") and "router" not in dense
