"""Routing variants (switch, expert choice, shared and fine-grained experts, aux-loss-free
balance) and the expert statistics, each checked against its definition."""

import dataclasses
import json
import math

import pytest
import torch

import llm
from helpers import synthetic_data, tiny


def cfg(**kw):
    return tiny(**kw)


def layer_for(**kw):
    torch.manual_seed(0)
    layer = llm.MoE(cfg(**kw))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def expert(layer, e, v):
    return llm.ffn_activation(v @ layer.w_up[e].T, layer.kind) @ layer.w_down[e].T


def naive_switch(layer, x):
    """Top-1 in order of arrival; an expert past its capacity passes the token through (output 0)."""
    flat = x.reshape(-1, x.shape[-1])
    _, probs, _ = layer.scores(flat)
    C = math.ceil(layer.capacity_factor * flat.shape[0] / layer.E)
    used, out = [0] * layer.E, []
    for n in range(flat.shape[0]):
        e = int(probs[n].argmax())
        if used[e] < C:
            used[e] += 1
            out.append(probs[n, e] * expert(layer, e, flat[n]))
        else:
            out.append(torch.zeros_like(flat[n]))
    return torch.stack(out).view_as(x)


def naive_expert_choice(layer, x):
    """Each expert takes the C tokens that score it highest; a token sums what it was given."""
    flat = x.reshape(-1, x.shape[-1])
    _, probs, _ = layer.scores(flat)
    C = math.ceil(layer.capacity_factor * flat.shape[0] * layer.k / layer.E)
    out = [torch.zeros_like(flat[0]) for _ in range(flat.shape[0])]
    for e in range(layer.E):
        for n in probs[:, e].topk(C).indices.tolist():
            out[n] = out[n] + probs[n, e] * expert(layer, e, flat[n])
    return torch.stack(out).view_as(x)


def naive_topk(layer, x):
    flat = x.reshape(-1, x.shape[-1])
    gates, experts, *_ = layer.route(flat)
    out = [sum(gates[n, j] * expert(layer, int(experts[n, j]), flat[n]) for j in range(layer.k))
           for n in range(flat.shape[0])]
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("routing, naive, kw", [
    ("switch", naive_switch, dict(capacity_factor=1.0)),
    ("switch", naive_switch, dict(capacity_factor=0.5, ffn="swiglu")),
    ("expert_choice", naive_expert_choice, dict(capacity_factor=1.0)),
    ("expert_choice", naive_expert_choice, dict(capacity_factor=0.5, expert_top_k=1, ffn="swiglu")),
    ("topk", naive_topk, dict(expert_d_ff=16, num_experts=8, expert_top_k=4)),
    # top-1 with renormalised gates has gate 1 and no router gradient; keep the router in the check
    *[("topk", naive_topk, dict(ffn=ffn, expert_top_k=k, norm_topk_prob=k > 1))
      for ffn in ("silu", "swiglu") for k in (1, 2, 3)],
])
def test_each_routing_mode_matches_a_naive_per_token_reference_in_outputs_and_gradients(routing, naive, kw):
    layer = layer_for(routing=routing, **kw)
    x = torch.randn(2, 9, 32, requires_grad=True)
    fast = layer(x)[0]
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), [x, *layer.parameters()])
    slow = naive(layer, x)
    grads_slow = torch.autograd.grad(slow.pow(2).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    for gf, gs in zip(grads_fast, grads_slow):
        torch.testing.assert_close(gf, gs, rtol=1e-4, atol=1e-4)


def test_switch_drops_exactly_the_over_capacity_tokens_in_order_of_arrival():
    layer = layer_for(routing="switch", capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 2
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.rand(1, 16, 32) + 0.1
    y = layer(x)[0][0]  # capacity ceil(1.0 * 16 / 4) = 4
    assert (y[:4].abs().sum(dim=1) > 0).all()
    assert (y[4:] == 0).all()
    layer.stats = torch.zeros(layer.E + 4)
    layer(x)
    stats = llm.expert_stats(layer.stats, layer.E)
    assert stats["dropped_fraction"] == pytest.approx(12 / 16)


def test_expert_choice_gives_each_expert_exactly_C_distinct_tokens(monkeypatch):
    layer = layer_for(routing="expert_choice", capacity_factor=1.0, expert_top_k=2)
    seen = {}
    orig = layer.experts_bmm

    def spy(xd, dtype):
        seen["shape"] = xd.shape
        return orig(xd, dtype)

    monkeypatch.setattr(layer, "experts_bmm", spy)
    x = torch.randn(2, 12, 32)
    layer.stats = torch.zeros(layer.E + 4)
    layer(x)
    C = math.ceil(1.0 * 24 * 2 / 4)
    assert seen["shape"] == (4, C, 32)
    stats = llm.expert_stats(layer.stats, layer.E)
    assert stats["load"] == [0.25] * 4 and stats["load_cv"] == pytest.approx(0.0)
    _, probs, _ = layer.scores(x.reshape(-1, 32))
    picked = probs.t().topk(C, dim=-1).indices
    assert all(len(set(row.tolist())) == C for row in picked)


def test_expert_choice_gradients_are_the_same_every_time_on_cpu():
    """A token several experts pick gets one gradient per pick; they must be summed in a fixed order,
    or the same run trains to a different loss each time (x[index]'s backward, index_put with
    accumulate, sums them in a varying order on CPU)."""
    layer = layer_for(routing="expert_choice", d_model=64, d_ff=128, capacity_factor=1.0)
    x = torch.randn(8, 64, 64)
    grads = []
    for _ in range(4):
        xx = x.clone().requires_grad_()
        y = layer(xx)[0]
        grads.append(torch.autograd.grad(y.square().sum(), xx)[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_shared_experts_see_every_token():
    layer = layer_for(n_shared_experts=2)
    with torch.no_grad():
        layer.w_down.zero_()  # silence the routed experts
    x = torch.randn(3, 5, 32)
    y = layer(x)[0]
    torch.testing.assert_close(y, layer.shared(x.reshape(-1, 32)).view_as(x))
    assert (y.abs().sum(dim=-1) > 0).all()
    assert layer.shared.down.in_features == 2 * 48


def test_aux_free_bias_moves_load_toward_balance_and_never_changes_gate_weights():
    layer = layer_for(balance="aux_free", expert_top_k=1, num_experts=4)
    with torch.no_grad():  # a skewed router: expert 0 wins most tokens
        layer.router.weight.normal_(std=0.05)
        layer.router.weight[0] += 0.05
    layer.train()
    x = torch.randn(512, 32).abs()
    load = lambda: torch.bincount(layer.route(x)[1].flatten(), minlength=4).float()
    cv = lambda l: (l.std(unbiased=False) / l.mean()).item()
    before = cv(load())
    assert before > 0.5
    for _ in range(300):
        layer(x.view(8, 64, 32))
        layer.update_bias(0.005)
    after = cv(load())
    assert after < before / 2, (before, after)
    assert layer.expert_bias[0] < 0  # the overloaded expert was pushed down
    gates, experts, *_ = layer.route(x)
    _, probs, _ = layer.scores(x)
    torch.testing.assert_close(gates, probs.gather(-1, experts))  # unbiased probabilities


def test_aux_free_training_skips_the_balance_loss_and_updates_the_bias():
    data = synthetic_data()
    c = cfg(vocab_size=64, balance="aux_free", bias_update_rate=0.01, load_balancing_weight=1e6, max_steps=4,
            eval_every=4, eval_batches=1, batch_size=4, log_every=2)
    rt = llm.Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=False)
    result = llm.train_model("moe", c, data, rt)
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < 20  # a 1e6 weight would have blown up


def test_expert_statistics_match_hand_computed_values():
    E = 4
    counts = torch.tensor([6.0, 2.0, 0.0, 0.0])  # 4 tokens, top-2: 8 copies
    probs_entropy_sum, z_sum = 4 * 0.5 * math.log(4), 4 * 2.0
    stats = torch.cat([counts, torch.tensor([4.0, probs_entropy_sum, z_sum, 1.0])])
    s = llm.expert_stats(stats, E)
    f = [0.75, 0.25, 0.0, 0.0]
    mean = 0.25
    std = math.sqrt(sum((v - mean) ** 2 for v in f) / 4)
    assert s["load"] == f
    assert s["load_cv"] == pytest.approx(std / mean)
    assert s["max_load"] == pytest.approx(3.0) and s["min_load"] == 0.0
    assert s["router_entropy"] == pytest.approx(0.5)
    assert s["router_z"] == pytest.approx(2.0) and s["dropped_fraction"] == pytest.approx(0.25)
    assert s["dead_experts"] == [2, 3]


def test_statistics_accumulated_in_evaluation_count_the_routing_decisions():
    layer = layer_for(num_experts=4, expert_top_k=2).eval()
    x = torch.randn(2, 8, 32)
    layer.stats = torch.zeros(6 + 2)
    layer(x)
    _, experts, *_ = layer.route(x.reshape(-1, 32))
    torch.testing.assert_close(layer.stats[:4], torch.bincount(experts.flatten(), minlength=4).float())
    assert layer.stats[4] == 16


@pytest.mark.parametrize("kw", [dict(routing="switch"), dict(routing="expert_choice", capacity_factor=1.0),
                                dict(n_shared_experts=1), dict(expert_d_ff=24, num_experts=8, expert_top_k=4),
                                dict(ffn="swiglu", n_shared_experts=2, expert_d_ff=16)])
def test_accounting_and_dense_matched_stay_exact_for_every_variant(kw):
    c = cfg(**kw)
    model = llm.Transformer(c)
    counts = llm.count_params(c)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".w_" in n)
    assert counts["expert"] == routed
    assert counts["active"] == round(counts["total"] - routed + routed * c.experts_per_token / c.num_experts)
    matched = llm.dense_matched(dataclasses.replace(c, vocab_size=1000))
    a = llm.count_params(dataclasses.replace(c, vocab_size=1000))["active_non_embedding"]
    assert abs(llm.count_params(matched)["active_non_embedding"] - a) <= 0.01 * a


def test_fine_grained_experts_have_the_active_compute_of_the_coarse_ones():
    coarse = llm.Config(vocab_size=1000)
    fine = dataclasses.replace(coarse, num_experts=32, expert_top_k=8, expert_d_ff=coarse.d_ff // 4)
    a, b = llm.count_params(coarse), llm.count_params(fine)
    assert a["flops_per_token"] == pytest.approx(b["flops_per_token"], rel=0.01)
    assert a["total"] == pytest.approx(b["total"], rel=0.01)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_compiled_top_k_picks_the_experts_torch_topk_picks_in_the_same_order(k):
    torch._dynamo.reset()
    torch.manual_seed(0)
    scores = torch.randn(64, 8)
    scores[3] = 0.125  # a tie (e.g. a zero router): still k distinct experts
    compiled = torch.compile(llm.top_k, backend="aot_eager", fullgraph=True)(scores, k)
    rest = torch.arange(64) != 3
    assert torch.equal(compiled[rest], scores.topk(k, dim=-1).indices[rest])
    assert compiled[3].tolist() == list(range(k))
    assert torch.equal(llm.top_k(scores, k), scores.topk(k, dim=-1).indices)  # eager is topk itself


def test_compiled_and_eager_token_choice_route_alike_and_count_the_same_loads():
    torch._dynamo.reset()
    layer = layer_for(num_experts=8, expert_top_k=3).eval()
    x = torch.randn(40, 32)
    eager = layer.route(x)
    compiled = torch.compile(layer.route, backend="aot_eager", fullgraph=True)(x)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
    assert eager[2].sum() == 40 * 3 and eager[2].dtype == torch.float32


@pytest.mark.parametrize("kw, dtype", [(dict(), torch.bfloat16), (dict(), torch.float32),
                                       (dict(routing="switch"), torch.float32),
                                       (dict(routing="expert_choice"), torch.float32),
                                       (dict(balance="aux_free", n_shared_experts=1), torch.bfloat16)])
def test_moe_layer_compiles_as_one_graph_and_does_not_recompile_when_the_split_changes(kw, dtype):
    """bf16 takes F.grouped_mm inside the graph, fp32 the fallback (grouped_mm compiles for bf16 only)."""
    torch._dynamo.reset()
    layer = layer_for(**kw).train().to(dtype)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):  # different inputs, different token split
            torch.manual_seed(seed)
            y, lb, z = compiled(torch.randn(2, 8, 32, dtype=dtype) * (seed + 1))
            (y.float().sum() + lb + z).backward()
    assert layer.w_up.grad is not None and torch.isfinite(layer.w_up.grad.float()).all()


@pytest.mark.parametrize("args, message", [
    (["--routing", "hash"], "routing must be one of topk, switch, expert_choice"),
    (["--balance", "none"], "balance must be one of aux_loss, aux_free"),
    (["--capacity_factor", "0"], "capacity_factor must be positive"),
    (["--n_shared_experts", "-1"], "n_shared_experts must not be negative"),
])
def test_bad_routing_values_exit_2(args, message, tmp_path, capsys):
    code = llm.main(["--preset", "smoke", "--out_dir", str(tmp_path / "o")] + args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["--routing", "switch", "--capacity_factor", "1.25"],
    ["--routing", "expert_choice", "--capacity_factor", "1.0"],
    ["--balance", "aux_free", "--n_shared_experts", "1", "--expert_d_ff", "32", "--expert_top_k", "4",
     "--num_experts", "8"],
])
def test_every_variant_trains_from_the_cli_and_reports_expert_statistics(args, corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = llm.main(["--preset", "smoke", "--models", "moe", "--data", str(corpus_dir / "*.txt"), "--max_steps", "10",
                     "--eval_every", "5", "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache")] + args)
    printed = capsys.readouterr().out
    assert code == 0
    row = json.loads((out / "results.json").read_text())["models"][0]
    assert len(row["experts"]) == 2 and row["load_cv"] >= 0
    assert row["batch_level_routing"] == ("expert_choice" in args)
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert all(len(e["experts"]) == 2 and "router_entropy" in e["experts"][0] for e in evals)
    assert "load CV" in printed and ("dead expert" in printed)
