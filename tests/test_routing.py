"""Routing variants (switch, expert choice, shared and fine-grained experts, aux-loss-free
balance) and the expert statistics, each checked against its definition."""

import dataclasses
import json
import math

import pytest
import torch
from helpers import MoEWithLosses, cpu_runtime, synthetic_data, tiny

import llm


def cfg(**kw):
    return tiny(**kw)


def layer_for(**kw):
    torch.manual_seed(0)
    layer = llm.MoE(cfg(**kw))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def expert(layer, e, v):
    return layer.act(v @ layer.w_up[e].T) @ layer.w_down[e].T


# The router scores by their definitions, written here apart from llm.ROUTER_SCORES
SCORES = {"softmax": lambda logits: logits.softmax(-1), "sigmoid": torch.sigmoid}


def clean_scores(layer, flat, score):
    """(N, E) each token's score for each expert: its router logits through softmax or sigmoid."""
    return SCORES[score](flat @ layer.router.weight.T)


def naive_switch(layer, x, score):
    """Top-1 in order of arrival, weighted by its score; an expert past its capacity passes the token
    through (output 0)."""
    flat = x.reshape(-1, x.shape[-1])
    scores = clean_scores(layer, flat, score)
    C = math.ceil(layer.capacity_factor * flat.shape[0] / layer.E)
    used, out = [0] * layer.E, []
    for n in range(flat.shape[0]):
        e = int(scores[n].argmax())
        if used[e] < C:
            used[e] += 1
            out.append(scores[n, e] * expert(layer, e, flat[n]))
        else:
            out.append(torch.zeros_like(flat[n]))
    return torch.stack(out).view_as(x)


def naive_expert_choice(layer, x, score):
    """Each expert takes the C tokens that score it highest; a token sums what it was given, each
    output weighted by the token's score for that expert."""
    flat = x.reshape(-1, x.shape[-1])
    scores = clean_scores(layer, flat, score)
    C = math.ceil(layer.capacity_factor * flat.shape[0] * layer.k / layer.E)
    out = [torch.zeros_like(flat[0]) for _ in range(flat.shape[0])]
    for e in range(layer.E):
        for n in scores[:, e].topk(C).indices.tolist():
            out[n] = out[n] + scores[n, e] * expert(layer, e, flat[n])
    return torch.stack(out).view_as(x)


def naive_topk(layer, x, score):
    """Each token's k highest-scoring experts, weighted by their scores (renormalised over the k with
    norm_topk_prob)."""
    flat = x.reshape(-1, x.shape[-1])
    scores, out = clean_scores(layer, flat, score), []
    for n in range(flat.shape[0]):
        top = scores[n].topk(layer.k).indices
        gates = scores[n, top]
        if layer.k > 1 and layer.norm_topk_prob:
            gates = gates / gates.sum()
        out.append(sum(gates[j] * expert(layer, int(top[j]), flat[n]) for j in range(layer.k)))
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("routing, naive, kw", [
    ("switch", naive_switch, {"capacity_factor": 1.0}),
    ("switch", naive_switch, {"capacity_factor": 0.5, "ffn": "swiglu"}),
    ("expert_choice", naive_expert_choice, {"capacity_factor": 1.0}),
    ("expert_choice", naive_expert_choice, {"capacity_factor": 0.5, "expert_top_k": 1, "ffn": "swiglu"}),
    ("topk", naive_topk, {"expert_d_ff": 16, "num_experts": 8, "expert_top_k": 4}),
    ("topk", naive_topk, {"expert_top_k": 3, "norm_topk_prob": False}),
    # top-1 with renormalised gates has gate 1 and no router gradient; keep the router in the check
    *[("topk", naive_topk, {"ffn": ffn, "expert_top_k": k, "norm_topk_prob": k > 1})
      for ffn in ("silu", "swiglu") for k in (1, 2, 3)],
])
def test_each_routing_mode_and_router_score_match_a_naive_per_token_reference_in_outputs_and_gradients(
        routing, naive, kw, score):
    layer = layer_for(routing=routing, router_score=score, **kw)
    x = torch.randn(2, 9, 32, requires_grad=True)
    fast = layer(x)[0]
    grads_fast = torch.autograd.grad(fast.pow(2).sum(), [x, *layer.parameters()])
    slow = naive(layer, x, score)
    grads_slow = torch.autograd.grad(slow.pow(2).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    for gf, gs in zip(grads_fast, grads_slow):  # fp32 sums in another order: a few 1e-4 apart at most
        torch.testing.assert_close(gf, gs, rtol=5e-4, atol=1e-4)


def test_switch_drops_exactly_the_over_capacity_tokens_in_order_of_arrival():
    layer = layer_for(routing="switch", capacity_factor=1.0)
    with torch.no_grad():  # every token prefers expert 2
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.rand(1, 16, 32) + 0.1
    y = layer(x)[0][0]  # capacity ceil(1.0 * 16 / 4) = 4
    assert (y[:4].abs().sum(dim=1) > 0).all()
    assert (y[4:] == 0).all()
    _, routing = layer(x)
    assert routing.counts.tolist() == [0, 0, 16, 0]  # counted before the capacity cut
    stats = llm.expert_stats(routing.sums(), layer.E)
    assert stats["dropped_fraction"] == pytest.approx(12 / 16)


def test_expert_choice_gives_each_expert_exactly_C_distinct_tokens(monkeypatch):
    layer = layer_for(routing="expert_choice", capacity_factor=1.0, expert_top_k=2)
    seen = {}
    orig = layer.experts

    def spy(xs, offs=None):
        seen["shape"], seen["offs"] = xs.shape, offs
        return orig(xs, offs)

    monkeypatch.setattr(layer, "experts", spy)
    x = torch.randn(2, 12, 32)
    _, routing = layer(x)
    C = math.ceil(1.0 * 24 * 2 / 4)
    assert seen["shape"] == (4, C, 32) and seen["offs"] is None  # one batched matmul over (E, C, D)
    assert routing.picks.shape == (4, C)
    assert all(len(set(row.tolist())) == C for row in routing.picks)
    stats = llm.expert_stats(routing.sums(), layer.E)
    assert stats["load"] == [0.25] * 4 and stats["load_cv"] == pytest.approx(0.0)
    scores = layer.route(x.reshape(-1, 32)).scores
    picked = scores.t().topk(C, dim=-1).indices
    assert torch.equal(routing.picks, picked)
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
    layer = layer_for(balance="aux_free", expert_top_k=1, num_experts=4, bias_update_rate=0.005)
    with torch.no_grad():  # a skewed router: expert 0 wins most tokens
        layer.router.weight.normal_(std=0.05)
        layer.router.weight[0] += 0.05
    layer.train()
    x = torch.randn(512, 32).abs()
    load = lambda: torch.bincount(layer.route(x).picks.flatten(), minlength=4).float()
    cv = lambda l: (l.std(unbiased=False) / l.mean()).item()
    before = cv(load())
    assert before > 0.5
    for _ in range(300):
        layer.count_load(layer(x.view(8, 64, 32))[1])  # as the model does after each MoE block
        layer.update_bias()  # as the Muon step pre-hook does, at the layer's bias_update_rate
    after = cv(load())
    assert after < before / 2, (before, after)
    assert layer.expert_bias[0] < 0  # the overloaded expert was pushed down
    routing = layer.route(x)
    probs = torch.nn.functional.linear(x, layer.router.weight).softmax(-1)  # clean: no bias, no noise
    torch.testing.assert_close(routing.scores, probs)
    torch.testing.assert_close(routing.gates, probs.gather(-1, routing.picks))  # unbiased probabilities


def test_aux_free_training_skips_the_balance_loss_and_updates_the_bias(monkeypatch):
    built = []  # the model train_model builds, caught where its optimizers are made
    make_optimizers = llm.make_optimizers

    def catch(model, cfg, **kw):
        built.append(model)
        return make_optimizers(model, cfg, **kw)

    monkeypatch.setattr(llm, "make_optimizers", catch)
    data = synthetic_data()
    c = cfg(vocab_size=64, balance="aux_free", bias_update_rate=0.01, load_balancing_weight=1e6, max_steps=4,
            eval_every=4, eval_batches=1, batch_size=4, log_every=2)
    rt = llm.Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=False)
    result = llm.train_model("moe", c, data, rt)
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < 20  # a 1e6 weight would have blown up
    (model,) = built
    moes = [m for m in model.modules() if isinstance(m, llm.MoE)]
    assert len(moes) == 2
    for m in moes:
        steps = m.expert_bias / 0.01  # each optimizer step moves each bias by -1, 0 or +1 times the rate
        assert m.expert_bias.abs().sum() > 0 and steps.abs().max() <= 4 + 1e-4
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
        assert (m.load == 0).all()  # the last step's update consumed the last step's load


def test_aux_free_bias_moves_in_the_muon_step_pre_hook_not_in_the_forward_and_not_for_aux_loss():
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    model = llm.Transformer(cfg(vocab_size=64, balance="aux_free", bias_update_rate=0.01)).train()
    muon, adamw = llm.make_optimizers(model, model.cfg)
    moes = [m for m in model.modules() if isinstance(m, llm.MoE)]
    model.eval()
    model(idx)
    assert all((m.load == 0).all() for m in moes)  # evaluation forwards count nothing
    model.train()
    _, routings = model.logits_and_routings(idx)
    ce, lb, z = model(idx, targets=targets)  # a second training forward: loads add up
    (ce + z).backward()
    for m, r in zip(moes, routings):
        torch.testing.assert_close(m.load, 2 * r.counts)  # no noise: both forwards route alike
        assert m.load.sum() == 2 * 4 * 16 * m.k
        assert (m.expert_bias == 0).all()  # the forwards alone moved no bias
    load = [m.load.clone() for m in moes]
    adamw.step()
    assert all((m.expert_bias == 0).all() and torch.equal(m.load, l) for m, l in zip(moes, load))
    muon.step()
    for m, l in zip(moes, load):
        torch.testing.assert_close(m.expert_bias, 0.01 * torch.sign(l.mean() - l))
        assert l.max() > l.mean() and m.expert_bias[l.argmax()] < 0  # the most loaded expert went down
        assert l.min() < l.mean() and m.expert_bias[l.argmin()] > 0  # the least loaded one up
        assert (m.load == 0).all()  # the update consumed the load

    model = llm.Transformer(cfg(vocab_size=64, balance="aux_loss", bias_update_rate=0.01)).train()
    muon, adamw = llm.make_optimizers(model, model.cfg)
    moes = [m for m in model.modules() if isinstance(m, llm.MoE)]
    ce, lb, z = model(idx, targets=targets)
    (ce + lb + z).backward()
    assert all((m.load == 0).all() for m in moes)  # aux_loss counts no load
    skew = torch.tensor([8.0, 0.0, 0.0, 0.0])
    for m in moes:  # a load an update would act on, were one registered
        m.load.copy_(skew)
    muon.step()
    adamw.step()
    assert all((m.expert_bias == 0).all() and torch.equal(m.load, skew) for m in moes)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("routing, kw", [
    ("topk", {}), ("topk", {"expert_top_k": 3, "norm_topk_prob": False}), ("topk", {"expert_top_k": 1}),
    ("switch", {"capacity_factor": 1.0}), ("expert_choice", {"capacity_factor": 1.0}),
    ("expert_choice", {"capacity_factor": 0.5, "expert_top_k": 1}),
])
def test_every_routing_mode_returns_a_routing_of_documented_shapes_counts_and_clean_gates(routing, kw, score):
    layer = layer_for(routing=routing, router_score=score, noise_std=1.0, **kw).train()  # noise on: gates stay clean
    with torch.no_grad():  # and a selection bias, which the gates must ignore as well
        layer.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.1]))
    x = torch.randn(2, 9, 32)
    N, E = 18, layer.E
    torch.manual_seed(0)
    y, r = layer(x)
    assert y.shape == x.shape and isinstance(r, llm.Routing)
    assert r._fields == ("logits", "scores", "shares", "picks", "gates", "counts", "dropped")
    logits = torch.nn.functional.linear(x.reshape(N, 32), layer.router.weight)
    assert r.logits.shape == r.scores.shape == r.shares.shape == (N, E)
    assert r.logits.dtype == r.scores.dtype == r.shares.dtype == torch.float32
    torch.testing.assert_close(r.logits, logits)
    torch.testing.assert_close(r.scores, SCORES[score](logits))  # clean: no noise, no bias
    torch.testing.assert_close(r.shares, r.scores / r.scores.sum(-1, keepdim=True))  # each row sums to 1
    torch.manual_seed(0)  # the noise the forward drew, for the scores the choice ranks
    ranked = SCORES[score](logits + torch.randn_like(logits) * 1.0) + layer.expert_bias
    assert r.counts.shape == (E,) and r.counts.dtype == torch.float32 and r.dropped.shape == ()
    if routing == "expert_choice":
        C = layer.capacity(N)
        assert C == math.ceil(layer.capacity_factor * N * layer.k / E)
        assert r.picks.shape == r.gates.shape == (E, C)  # token ids per expert
        assert torch.equal(r.picks, ranked.t().topk(C, dim=-1).indices)
        assert r.counts.tolist() == [C] * E and r.counts.sum() == E * C
        want = r.scores.t().gather(1, r.picks)
        assert r.dropped == N - len(set(r.picks.flatten().tolist()))  # tokens no expert picked
    else:
        k = 1 if routing == "switch" else layer.k
        assert r.picks.shape == r.gates.shape == (N, k)  # expert ids per token
        assert torch.equal(r.picks, ranked.topk(k, dim=-1).indices)
        assert r.counts.sum() == N * k
        assert torch.equal(r.counts, torch.bincount(r.picks.flatten(), minlength=E).float())
        want = r.scores.gather(-1, r.picks)
        if k > 1 and layer.norm_topk_prob:
            want = want / want.sum(-1, keepdim=True)
        C = layer.capacity(N)
        assert r.dropped == (N - r.counts.clamp_max(C).sum() if routing == "switch" else 0)
    torch.testing.assert_close(r.gates, want)


def test_softmax_shares_are_its_scores_exactly():
    """The softmax's rows sum to 1 already: its shares are the same tensor, so the balance loss and
    the entropy read exactly what they read before router scores had shares."""
    scores, shares = llm.softmax_scores(torch.randn(8, 4))
    assert shares is scores


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_balance_loss_is_one_at_perfect_balance_and_entropy_is_one_for_an_undecided_router(score):
    """For scores that do not sum to 1 (sigmoid) as for those that do: the balance loss reads each
    token's shares, so a balanced load scores 1.0 whatever the scores' scale; an undecided router (equal
    logits) has router entropy 1, an all-but-certain one nearly 0."""
    layer = layer_for(router_score=score, num_experts=8, expert_top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()  # equal logits: every score alike
    x = torch.randn(16, 32)
    r = layer.route(x)
    balanced = r._replace(counts=torch.full((8,), 2.0))  # an even load, whatever the picks were
    assert balanced.balance_loss().item() == pytest.approx(1.0)
    assert llm.expert_stats(balanced.sums(), 8)["router_entropy"] == pytest.approx(1.0)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.3)
        layer.router.weight[0] = 0
        layer.router.weight[0, 0] = 100.0  # expert 0 scores near 1, its rivals lower, for x > 0
    r = layer.route(x.abs() + 1)
    assert (r.picks == 0).all()
    if score == "softmax":  # sigmoid scores its rivals independently: they keep a share
        assert llm.expert_stats(r.sums(), 8)["router_entropy"] < 0.01


def test_expert_statistics_match_hand_computed_values():
    E = 4
    counts = torch.tensor([6.0, 2.0, 0.0, 0.0])  # 4 tokens, top-2: 8 copies
    probs_entropy_sum, z_sum = 4 * 0.5 * math.log(4), 4 * 2.0
    stats = torch.cat([counts, torch.tensor([4.0, probs_entropy_sum, z_sum, 1.0])])
    s = llm.expert_stats(llm.RouterSums.of(stats, E), E)
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
    _, routing = layer(x)
    sums = routing.sums()
    experts = layer.route(x.reshape(-1, 32)).picks
    torch.testing.assert_close(sums.counts, torch.bincount(experts.flatten(), minlength=4).float())
    assert sums.tokens == 16


@pytest.mark.parametrize("kw", [{"routing": "switch"}, {"routing": "expert_choice", "capacity_factor": 1.0},
                                {"n_shared_experts": 1}, {"expert_d_ff": 24, "num_experts": 8, "expert_top_k": 4},
                                {"ffn": "swiglu", "n_shared_experts": 2, "expert_d_ff": 16}])
def test_accounting_and_dense_matched_stay_exact_for_every_variant(kw):
    c = cfg(**kw)
    model = llm.Transformer(c)
    size = llm.model_size(c)
    assert size.total == sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".w_" in n)
    assert size.expert == routed
    assert size.active == round(size.total - routed + routed * c.experts_per_token / c.num_experts)
    matched = llm.dense_matched(dataclasses.replace(c, vocab_size=1000))
    a = llm.model_size(dataclasses.replace(c, vocab_size=1000)).active_non_embedding
    assert abs(llm.model_size(matched).active_non_embedding - a) <= 0.01 * a


def test_fine_grained_experts_have_the_active_compute_of_the_coarse_ones():
    coarse = llm.Config(vocab_size=1000)
    fine = dataclasses.replace(coarse, num_experts=32, expert_top_k=8, expert_d_ff=coarse.d_ff // 4)
    a, b = llm.model_size(coarse), llm.model_size(fine)
    assert a.flops_per_token == pytest.approx(b.flops_per_token, rel=0.01)
    assert a.total == pytest.approx(b.total, rel=0.01)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_compiled_top_k_picks_the_experts_torch_topk_picks_in_the_same_order(k):
    torch._dynamo.reset()
    torch.manual_seed(0)
    scores = torch.randn(64, 8)
    scores[3] = 0.125  # a tie (e.g. a zero router): still k distinct experts
    compiled = torch.compile(llm.top_k_indices, backend="aot_eager", fullgraph=True)(scores, k)
    rest = torch.arange(64) != 3
    assert torch.equal(compiled[rest], scores.topk(k, dim=-1).indices[rest])
    assert compiled[3].tolist() == list(range(k))
    assert torch.equal(llm.top_k_indices(scores, k), scores.topk(k, dim=-1).indices)  # eager is topk itself


def test_compiled_and_eager_token_choice_route_alike_and_count_the_same_loads():
    torch._dynamo.reset()
    layer = layer_for(num_experts=8, expert_top_k=3).eval()
    x = torch.randn(40, 32)
    eager = layer.route(x)
    compiled = torch.compile(layer.route, backend="aot_eager", fullgraph=True)(x)
    assert isinstance(compiled, llm.Routing)
    for name in llm.Routing._fields:
        assert torch.equal(getattr(eager, name), getattr(compiled, name)), name
    assert eager.counts.sum() == 40 * 3 and eager.counts.dtype == torch.float32


@pytest.mark.parametrize("kw, dtype", [({}, torch.bfloat16), ({}, torch.float32),
                                       ({"routing": "switch"}, torch.float32),
                                       ({"routing": "expert_choice"}, torch.float32),
                                       ({"balance": "aux_free", "n_shared_experts": 1}, torch.bfloat16),
                                       ({"router_score": "sigmoid"}, torch.bfloat16),
                                       ({"router_score": "sigmoid", "routing": "expert_choice"}, torch.float32)])
def test_moe_layer_compiles_as_one_graph_and_does_not_recompile_when_the_split_changes(kw, dtype):
    """bf16 takes F.grouped_mm inside the graph, fp32 the fallback (grouped_mm compiles for bf16 only)."""
    torch._dynamo.reset()
    layer = layer_for(**kw).train().to(dtype)
    compiled = torch.compile(MoEWithLosses(layer), backend="aot_eager", fullgraph=True, dynamic=False)
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
    *[["--router_score", "sigmoid", *more] for more in (
        [], ["--routing", "switch"], ["--routing", "expert_choice", "--capacity_factor", "1.0"],
        ["--balance", "aux_free"])],
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
    assert all(len(e["experts"]) == 2 and 0 <= e["experts"][0]["router_entropy"] <= 1 + 1e-6 for e in evals)
    assert "load CV" in printed and ("dead expert" in printed)


def layer_state(layer):
    """What an MoE layer holds: its attributes, buffers and submodules by name, and its buffers' values."""
    return (set(vars(layer)), set(layer._buffers), set(layer._modules),
            {k: v.clone() for k, v in layer._buffers.items()})


@pytest.mark.parametrize("routing", ["topk", "switch", "expert_choice"])
def test_evaluation_and_expert_analysis_read_routing_from_the_model_and_leave_its_layers_as_they_were(routing):
    torch.manual_seed(0)
    c = cfg(vocab_size=64, routing=routing, capacity_factor=1.0, balance="aux_free")
    model = llm.Transformer(c).train()  # evaluation switches to eval mode and back
    moes = [m for m in model.modules() if isinstance(m, llm.MoE)]
    before = [layer_state(m) for m in moes]
    windows = llm.eval_windows(synthetic_data().val, c.max_seq_len, limit=10)
    result = llm.evaluate(model, windows, cpu_runtime(), batch_size=4)
    assert model.training
    layers = llm.expert_analysis(model.eval(), windows, 4, c.vocab_size, min_count=1)
    for b, m in zip(before, moes):
        a = layer_state(m)
        assert a[:3] == b[:3], "an MoE layer gained state during evaluation"
        assert all(torch.equal(a[3][k], b[3][k]) for k in b[3])  # no load counted, no bias moved

    sums = [torch.zeros(llm.RouterSums.width(m.E)) for m in moes]  # the same batches, routed by the model itself
    copies = [torch.zeros(m.E) for m in moes]
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            _, routings = model.logits_and_routings(windows.batch(range(i, min(i + 4, len(windows))))[0])
            for s, n, m, r in zip(sums, copies, moes, routings):
                s += r.sums().vector()
                n += m.assignment(r).sum(0)
    expected = [llm.expert_stats(llm.RouterSums.of(s, m.E), m.E) for s, m in zip(sums, moes)]
    assert len(result["experts"]) == len(expected) == 2
    for got, want in zip(result["experts"], expected):
        assert got.keys() == want.keys()
        assert got["load"] == pytest.approx(want["load"], abs=1e-5)
        assert got["dead_experts"] == want["dead_experts"]
        for k in ("load_cv", "max_load", "min_load", "router_entropy", "dropped_fraction", "router_z"):
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
    assert [layer["layer"] for layer in layers] == c.moe_layer_ids()
    for layer, n, want in zip(layers, copies, expected):
        assert layer["load"] == pytest.approx((n / n.sum()).tolist(), abs=1e-6)
        assert layer["load"] == pytest.approx(want["load"], abs=1e-5)  # assignment and counts agree


def test_a_single_expert_layer_reports_a_router_entropy_of_0_and_its_whole_load():
    """One expert leaves the router no choice: its entropy, normalised by log E = 0, is 0, not a
    division by zero at the end of training (num_experts=1 is the first point of a sweep over E)."""
    layer = llm.MoE(tiny(num_experts=1, expert_top_k=1))
    s = llm.expert_stats(layer.route(torch.randn(8, 32)).sums(), 1)
    assert s["router_entropy"] == 0.0 and s["load"] == [1.0] and s["load_cv"] == 0.0
