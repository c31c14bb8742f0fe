"""The model, the MoE layer, Muon and the schedule, checked against definitions."""

import dataclasses
import itertools
import math
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import OpRecorder, cpu_runtime, synthetic_data, tiny
from torch import nn

import llm


@pytest.mark.parametrize("moe_layers", ["none", "alternate", "all"])
@pytest.mark.parametrize("ffn", ["silu", "swiglu"])
def test_forward_gives_logits_per_position_and_scalar_aux_losses(moe_layers, ffn):
    torch.manual_seed(0)
    model = llm.Transformer(tiny(moe_layers=moe_layers, ffn=ffn, n_kv_heads=2))
    logits, lb, z = model(torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50)
    assert lb.shape == z.shape == ()
    assert (lb == 0).item() == (moe_layers == "none")


@pytest.mark.parametrize("moe_layers", ["none", "all"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(moe_layers):
    torch.manual_seed(0)
    model = llm.Transformer(tiny(moe_layers=moe_layers)).eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 50
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_rope_rotates_over_the_sequence_axis_so_scores_depend_on_relative_position():
    """Same input at every position: q_i . k_j must vary with i - j and only with i - j.
    Rotating over the heads axis (torchtune's layout misread) makes scores constant in i, j."""
    torch.manual_seed(0)
    attn = llm.Attention(tiny())
    x = torch.randn(1, 1, 32).expand(1, 16, 32)
    q, k, _ = attn.rotated_qkv(x)
    scores = q[0, 0] @ k[0, 0].T  # (T, T)
    torch.testing.assert_close(torch.diagonal(scores, 0), torch.full((16,), scores[0, 0].item()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.diagonal(scores, -3), torch.full((13,), scores[3, 0].item()), rtol=1e-4, atol=1e-4)
    assert not torch.isclose(scores[3, 0], scores[0, 0], atol=1e-3)


def test_grouped_matmul_fallback_equals_grouped_mm_including_empty_groups():
    torch.manual_seed(0)
    a, b = torch.randn(10, 8), torch.randn(4, 8, 4)
    offs = torch.tensor([3, 3, 8, 10], dtype=torch.int32)  # expert 1 receives no token
    expected = torch.cat([a[0:3] @ b[0], a[3:8] @ b[2], a[8:10] @ b[3]])
    torch.testing.assert_close(llm.grouped_mm_fallback(a, b, offs), expected)
    torch.testing.assert_close(llm.grouped_mm(a, b, offs), expected)
    a, b = torch.randn(10, 6), torch.randn(4, 6, 5)  # unaligned widths take the fallback
    expected = torch.cat([a[0:3] @ b[0], a[3:8] @ b[2], a[8:10] @ b[3]])
    torch.testing.assert_close(llm.grouped_mm(a, b, offs), expected)


def test_load_balancing_loss_is_one_for_a_uniform_router_and_larger_when_skewed():
    layer = llm.MoE(tiny(num_experts=8, expert_top_k=2))
    x = torch.randn(256, 32)
    torch.nn.init.zeros_(layer.router.weight)  # every expert equally likely
    lb = layer.route(x).balance_loss()
    assert lb.item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():  # expert 0 favoured for every token
        layer.router.weight.normal_(std=0.01)
        layer.router.weight[0] = 0
        x = x.abs()
        layer.router.weight[0, :] = 1.0
    routing = layer.route(x)
    assert (routing.picks == 0).any(dim=1).all()
    assert routing.balance_loss().item() > 1.5


def test_router_noise_changes_selection_only_in_training_gates_and_loss_use_clean_probabilities():
    layer = llm.MoE(tiny(noise_std=5.0))
    x = torch.randn(64, 32)
    logits = F.linear(x, layer.router.weight)
    clean = logits.softmax(-1)  # (N, E) noise-free probabilities, by hand
    layer.eval()
    r1, r2 = layer.route(x), layer.route(x)
    assert torch.equal(r1.picks, r2.picks)
    layer.train()
    torch.manual_seed(0)
    r3 = layer.route(x)
    assert not torch.equal(r1.picks, r3.picks)
    torch.manual_seed(0)  # the same noise again: the picks are the top-k of the noisy scores
    noisy = (logits + torch.randn_like(logits) * 5.0).softmax(-1)
    assert torch.equal(r3.picks, noisy.topk(2, dim=-1).indices)
    torch.testing.assert_close(r3.logits, logits)
    torch.testing.assert_close(r3.scores, clean)  # what the losses and statistics read: clean in training too
    want = clean.gather(-1, r3.picks)
    assert torch.allclose(r3.gates, want / want.sum(-1, keepdim=True))  # gate weights: clean, at the noisy picks
    f = r3.counts / r3.counts.sum()
    assert torch.allclose(r3.balance_loss(), layer.E * (f * clean.mean(0)).sum())
    ec = llm.MoE(tiny(noise_std=5.0, routing="expert_choice")).train()
    ec.w_down.data.normal_()
    ec.w_up.data.normal_()
    with torch.no_grad():
        torch.manual_seed(0)
        y = ec(x[None])[0][0]
        torch.manual_seed(0)  # the same noise again
        logits = F.linear(x, ec.router.weight)
        clean, noisy = logits.softmax(-1), (logits + torch.randn_like(logits) * ec.noise_std).softmax(-1)
        token = noisy.t().topk(ec.capacity(len(x)), dim=-1).indices  # (E, C) picked with noise
        gates = clean.t().gather(1, token)[..., None]  # (E, C, 1) weighted without
        yd = ec.experts(x[token.flatten()].view(*token.shape, -1)) * gates
        want = torch.zeros_like(x).index_add_(0, token.flatten(), yd.flatten(0, 1))
    assert torch.allclose(y, want, atol=1e-6)


def test_moe_layer_makes_no_host_device_sync_and_no_python_loop_over_experts(monkeypatch):
    """.item()/.tolist()/nonzero would sync on CUDA; calling them is refused here."""
    layer = llm.MoE(tiny())
    x = torch.randn(2, 16, 32)
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__"):
        refuse = lambda *a, name=name, **k: (_ for _ in ()).throw(AssertionError(f"sync: {name}"))
        monkeypatch.setattr(torch.Tensor, name, refuse)
    y, routing = layer(x)
    lb, z, sums = routing.balance_loss(), routing.z_loss(), routing.sums()  # the losses and evaluation's sums too
    assert y.shape == x.shape and lb.shape == z.shape == () and sums.vector().shape == (layer.E + 4,)


def test_dropless_dispatch_sorts_16_bit_expert_ids_and_its_gradient_gathers_without_scatter_adds():
    """The token copies move by a permutation both ways: no int64 sort and no index_put/index_add
    (an atomic scatter, which eager mode also sorts) in forward or backward."""
    layer = llm.MoE(tiny())
    x = torch.randn(2, 16, 32, requires_grad=True)
    with OpRecorder() as rec:
        y, routing = layer(x)
        (y.square().sum() + routing.balance_loss() + routing.z_loss()).backward()
    sorts = [d for name, d in rec.calls if "sort" in name]
    assert sorts and all(d == [torch.int16] for d in sorts), sorts
    assert not [name for name in rec.ops if "index_put" in name or "index_add" in name]


def test_muon_orthogonalises_each_expert_of_a_stack_on_its_own():
    torch.manual_seed(0)
    g = torch.randn(4, 24, 16)
    g[0] *= 1000.0  # one expert's gradient dwarfs the others
    batched = llm.newton_schulz(g)
    for e in range(4):
        torch.testing.assert_close(batched[e], llm.newton_schulz(g[e]), rtol=1e-4, atol=1e-5)
        s = torch.linalg.svdvals(batched[e])
        assert s.min() > 0.5 and s.max() < 1.3, s  # near-orthogonal: singular values near 1
    # a joint orthogonalisation of the stack would have shrunk the small experts to ~0
    p = torch.nn.Parameter(torch.zeros(4, 24, 16))
    p.grad = g
    llm.Muon([p], lr=0.1, momentum=0.0, nesterov=False).step()
    norms = p.detach().flatten(1).norm(dim=1)
    assert norms.max() / norms.min() < 1.5


def test_newton_schulz_in_bf16_as_on_cuda_stays_within_two_percent_of_the_exact_iteration():
    """The CUDA path's precision, run on CPU: the fp32 epilogue of baddbmm keeps the bf16 iteration
    within 1.8% of float64 (the textbook all-bf16 iteration is off by 2-3%), wide, tall, square,
    and ill-conditioned."""
    torch.manual_seed(0)
    for shape in [(8, 96, 384), (8, 384, 96), (4, 64, 64)]:
        g = torch.randn(shape)
        for G in (g, g * torch.logspace(0, -3, shape[-1])):
            exact = llm.newton_schulz(G.double(), dtype=torch.float64)
            out = llm.newton_schulz(G, dtype=torch.bfloat16)
            assert out.dtype == G.dtype
            err = ((out - exact).norm() / exact.norm()).item()
            assert err < 0.018, (shape, err)


def test_optimizers_split_params_muon_for_hidden_matrices_adamw_for_embedding_norms_router():
    model = llm.Transformer(tiny(moe_layers="alternate"))
    muon, adamw = llm.make_optimizers(model, model.cfg)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in muon_ids} >= {"blocks.1.ffn.w_up", "blocks.1.ffn.w_down", "blocks.0.attn.qkv.weight"}
    assert not any("embed" in names[i] or "router" in names[i] or "norm" in names[i] for i in muon_ids)
    assert len(muon_ids) + sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))


def test_parameter_accounting_matches_the_built_model():
    for kw in [{"moe_layers": "none"}, {"moe_layers": "alternate", "n_layers": 4}, {"ffn": "swiglu", "n_kv_heads": 2}]:
        cfg = tiny(**kw)
        model = llm.Transformer(cfg)
        size = llm.model_size(cfg)
        assert size.total == sum(p.numel() for p in model.parameters())
        expert = sum(p.numel() for n, p in model.named_parameters() if ".w_" in n)
        assert size.expert == expert
        assert size.active == size.total - expert + expert * cfg.expert_top_k // cfg.num_experts


def test_active_parameters_count_the_chosen_experts():
    """The tutorial's '47% active' counted no expert; a top-2 of 8 MoE uses a quarter of them."""
    cfg = llm.Config(vocab_size=1000)
    c, d = llm.model_size(cfg), llm.model_size(dataclasses.replace(cfg, moe_layers="none"))
    ffn = 2 * cfg.d_model * cfg.d_ff
    assert c.active - d.active == 3 * (ffn + cfg.d_model * cfg.num_experts)  # 3 MoE layers, 2 experts each
    assert c.total - c.active == 3 * 6 * ffn


@pytest.mark.parametrize("kw", [{}, {"moe_layers": "all", "expert_top_k": 1}, {"ffn": "swiglu", "num_experts": 16}])
def test_dense_matched_has_the_moe_active_non_embedding_params_within_one_percent(kw):
    cfg = llm.Config(vocab_size=1000, **kw)
    matched = llm.dense_matched(cfg)
    assert matched.moe_layer_ids() == []
    a, b = llm.model_size(cfg).active_non_embedding, llm.model_size(matched).active_non_embedding
    assert abs(a - b) <= 0.01 * a


def test_model_size_of_a_config_too_large_to_allocate_returns_at_once_with_closed_form_counts():
    """138 billion parameters (554 GB in fp32): only a model built on the meta device (shapes, no
    memory) can be counted; every count equals its closed form for dense-FFN and top-k MoE blocks."""
    cfg = llm.Config(d_model=8192, n_heads=64, n_kv_heads=8, n_layers=64, d_ff=28672, ffn="swiglu", num_experts=64,
                     expert_top_k=8, expert_d_ff=2048, n_shared_experts=1, moe_layers="alternate", vocab_size=200000,
                     max_seq_len=4096).validate()
    t0 = time.perf_counter()
    size = llm.model_size(cfg)
    assert time.perf_counter() - t0 < 10
    d, L, V, T, hd = 8192, 64, 200000, 4096, 8192 // 64
    attn = d * (64 + 2 * 8) * hd + 64 * hd * d  # qkv (grouped-query: 8 key/value heads) and the output projection
    dense_ffn = 3 * d * 28672  # swiglu: gate and up (d -> 2 x 28672), down
    expert = 3 * d * 2048  # one routed expert, and the one shared expert, of width 2048
    router = d * 64
    n_moe = n_dense = L // 2  # alternate: the odd blocks
    norms = 2 * d * L + d  # two RMSNorms per block and the final one
    total = V * d + norms + L * attn + n_dense * dense_ffn + n_moe * (router + 64 * expert + expert)
    active = total - n_moe * 64 * expert + n_moe * 8 * expert  # 8 of the 64 routed experts per token
    assert size.total == total and size.total > 1.3e11
    assert size.expert == n_moe * 64 * expert
    assert size.active == active
    assert size.non_embedding == total - V * d and size.active_non_embedding == active - V * d
    assert size.muon_params == L * attn + n_dense * dense_ffn + n_moe * (64 * expert + expert)
    assert size.adamw_params == V * d + norms + n_moe * router
    # 6 x the active matmul weights (the tied head once, norms none) + attention, 12 d per layer per (T+1)/2 keys
    assert size.flops_per_token == 6 * (active - norms) + 6 * L * d * (T + 1)
    assert size.weight_bytes == size.grad_bytes == 4 * total
    assert size.optimizer_bytes == 4 * size.muon_params + 8 * size.adamw_params


def test_flops_per_token_are_six_times_active_matmul_weights_plus_attention():
    cfg = tiny(moe_layers="none")
    size = llm.model_size(cfg)
    matmul = 2 * (4 * 32 * 32 + 2 * 32 * 48) + 50 * 32
    assert size.flops_per_token == int(6 * matmul + 12 * 2 * 32 * (16 + 1) / 2)


def test_moe_layer_spec_selects_blocks():
    cfg = llm.Config(n_layers=6)
    assert dataclasses.replace(cfg, moe_layers="alternate").moe_layer_ids() == [1, 3, 5]
    assert dataclasses.replace(cfg, moe_layers="last_half").moe_layer_ids() == [3, 4, 5]
    assert dataclasses.replace(cfg, moe_layers="1,4").moe_layer_ids() == [1, 4]
    assert dataclasses.replace(cfg, moe_layers="none").moe_layer_ids() == []
    with pytest.raises(llm.UsageError):
        dataclasses.replace(cfg, moe_layers="0,6").moe_layer_ids()


@pytest.mark.parametrize("schedule", sorted(llm.SCHEDULES))  # every registered schedule, a new one too
def test_schedule_warms_up_then_decays_to_min_lr_in_optimizer_steps(schedule):
    cfg = llm.Config(max_steps=200, warmup_frac=0.1, min_lr_frac=0.1, schedule=schedule, decay_frac=0.2)
    f = [llm.lr_factor(s, cfg) for s in range(200)]
    assert f[0] == pytest.approx(1 / 20) and f[19] == pytest.approx(1.0)
    assert all(a <= b for a, b in itertools.pairwise(f[:21]))  # warm-up: non-decreasing
    assert f[-1] == pytest.approx(0.1, abs=0.01) and min(f[20:]) >= 0.1 - 1e-9  # ends at the floor, never below
    if schedule == "wsd":
        assert f[100] == 1.0 and f[159] == 1.0 and f[170] < 1.0


def test_k_accumulated_micro_batches_equal_one_big_batch():
    data = synthetic_data()
    cfg = tiny(moe_layers="none", vocab_size=64, max_steps=6, eval_every=6, eval_batches=2, log_every=3)
    one = llm.train_model("one", dataclasses.replace(cfg, batch_size=8), data, cpu_runtime())
    acc = llm.train_model("acc", dataclasses.replace(cfg, batch_size=2, gradient_accumulation_steps=4), data,
                          cpu_runtime())
    assert one["val_loss"] == pytest.approx(acc["val_loss"], rel=1e-5)
    assert one["train_loss"] == pytest.approx(acc["train_loss"], rel=1e-5)
    other = llm.train_model("other", dataclasses.replace(cfg, batch_size=4), data, cpu_runtime())
    assert other["val_loss"] != pytest.approx(one["val_loss"], rel=1e-5)  # the comparison can tell


def test_every_model_sees_the_same_batches_and_training_is_deterministic():
    data = synthetic_data()
    cfg = tiny(vocab_size=64, max_steps=5, eval_every=5, eval_batches=2, batch_size=4, log_every=5)
    seen = []
    orig = llm.TrainWindows.batch

    def spy(self, first, count):
        x, y = orig(self, first, count)
        seen.append(x.clone())
        return x, y

    llm.TrainWindows.batch = spy
    try:
        a = llm.train_model("moe", cfg, data, cpu_runtime())
        n = len(seen)
        llm.train_model("dense", dataclasses.replace(cfg, moe_layers="none"), data, cpu_runtime())
        b = llm.train_model("moe", cfg, data, cpu_runtime())
    finally:
        llm.TrainWindows.batch = orig
    assert all(torch.equal(s, t) for s, t in zip(seen[:n], seen[n : 2 * n]))
    assert a["val_loss"] == b["val_loss"]


def test_training_lowers_the_held_out_loss():
    data = synthetic_data()
    cfg = tiny(vocab_size=64, max_steps=40, eval_every=20, eval_batches=4, batch_size=8, muon_lr=0.02,
               adamw_lr=0.01, log_every=10)
    records = []
    result = llm.train_model("moe", cfg, data, cpu_runtime(), records.append)
    evals = [r for r in records if r["kind"] == "eval"]
    assert result["val_loss"] < math.log(64) - 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] + 1e-6
    assert all(r["lb_loss"] >= 0.99 for r in records if r["kind"] == "train")


def test_whole_model_compiles_as_one_graph_under_bf16_autocast_without_recompiling():
    """What torch.compile meets on CUDA: autocast to bf16, a new token split every step."""
    torch._dynamo.reset()
    model = llm.Transformer(tiny(vocab_size=64, moe_layers="alternate", n_layers=2)).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            torch.manual_seed(seed)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, lb, z = compiled(torch.randint(0, 64, (2, 16)))
            (logits.float().mean() + lb + z).backward()
    assert all(p.grad is not None for p in model.parameters())


def reference_muon_step(params, bufs, lr, momentum, weight_decay, ok=True):
    """Muon one parameter at a time, as its definition reads (Nesterov momentum)."""
    for p, buf in zip(params, bufs):
        if not ok:
            continue
        buf.lerp_(p.grad, 1 - momentum)
        update = llm.newton_schulz(p.grad.lerp(buf, momentum))
        p.mul_(1 - lr * weight_decay)
        p.sub_(update * lr * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)


def steps_like_the_reference(shapes, lrs, compile=False):
    """Muon on parameters of these shapes, one step per learning rate (the third skipped on the
    device: ok False with NaN gradients), checked after each step against reference_muon_step."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [p.detach().clone() for p in ours]
    bufs = [torch.zeros_like(p) for p in ref]
    opt = llm.Muon(ours, lr=lrs[0], momentum=0.9, weight_decay=0.1, compile=compile)
    for step, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        skip = step == 2
        grads = [torch.randn(s) if not skip else torch.full(s, float("nan")) for s in shapes]
        for p, r, g in zip(ours, ref, grads):
            p.grad, r.grad = g.clone(), g.clone()
        opt.step(ok=torch.tensor(not skip))
        with torch.no_grad():
            reference_muon_step(ref, bufs, lr, 0.9, 0.1, ok=not skip)
        for p, r, b in zip(ours, ref, bufs):
            torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=1e-5, atol=1e-6)


def test_muon_steps_same_shape_matrices_together_exactly_as_one_at_a_time():
    """qkv-like, square, an expert stack sharing a shape with a plain matrix, and a tall one; one
    step is skipped on the device (ok False with NaN gradients) and must change nothing."""
    steps_like_the_reference([(24, 16), (16, 16), (3, 24, 16), (40, 16), (16, 16)], lrs=[0.05] * 4)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch tracing itself
def test_compiled_muon_steps_as_the_reference_and_compiles_once_over_a_changing_schedule():
    """Muon(compile=True), as train_model builds it when the model is compiled: inductor fuses its
    passes; the result must still be the reference step, through a learning rate that changes
    every step (a recompile per step would cost more than the fusion saves) and a skipped step."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        steps_like_the_reference([(24, 16), (3, 24, 16), (40, 16), (16, 16)], lrs=[0.05 / (n + 1) for n in range(4)],
                                 compile=True)


def test_the_loss_computed_inside_the_model_is_the_cross_entropy_of_its_logits():
    cfg = tiny(vocab_size=50)
    torch.manual_seed(0)
    model = llm.Transformer(cfg).eval()  # no router noise: both calls route alike
    idx, targets = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    logits, lb, z = model(idx)
    ce, lb2, z2 = model(idx, targets=targets)
    assert torch.allclose(ce, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    assert torch.equal(lb, lb2) and torch.equal(z, z2)


def test_cuda_graphs_are_used_only_compiled_on_one_cuda_device_without_accumulation():
    cfg = tiny()
    gpu = llm.Runtime(device=torch.device("cuda", 0), dtype=torch.bfloat16, compile=True)
    assert llm.uses_cuda_graphs(cfg, gpu)
    assert not llm.uses_cuda_graphs(dataclasses.replace(cfg, cuda_graphs=False), gpu)
    assert not llm.uses_cuda_graphs(dataclasses.replace(cfg, gradient_accumulation_steps=2), gpu)
    assert not llm.uses_cuda_graphs(cfg, dataclasses.replace(gpu, world=2))
    assert not llm.uses_cuda_graphs(cfg, dataclasses.replace(gpu, compile=False))
    assert not llm.uses_cuda_graphs(cfg, dataclasses.replace(gpu, device=torch.device("cpu")))


def test_every_model_of_a_long_sweep_is_compiled_not_only_the_first_eight(monkeypatch):
    """dynamo recompiles a function at most 8 times and then runs it eagerly without an error;
    train_model starts each model afresh, so the ninth config of a sweep is compiled too."""
    compiled = []
    real = torch.compile

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=counting_backend))
    data = synthetic_data()
    rt = llm.Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=True)
    for i in range(9):
        before = len(compiled)
        cfg = tiny(moe_layers="none", vocab_size=64, d_ff=16 + 8 * i, max_steps=1, eval_every=1, eval_batches=1,
                   batch_size=2, log_every=1)
        llm.train_model(f"m{i}", cfg, data, rt)
        assert len(compiled) > before, f"model {i} (d_ff {cfg.d_ff}) ran without compiling"


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch tracing itself
def test_the_cuda_graph_training_path_trains_like_the_plain_one(monkeypatch):
    """The branch train_model takes with CUDA graphs (compile mode reduce-overhead, a step marker
    before each forward), run on CPU with an eager backend: what can be checked without a GPU is
    that it trains exactly as the plain path does."""
    real = torch.compile
    modes = []

    def eager_compile(model, mode=None, **kw):
        if isinstance(model, nn.Module):  # not Muon's step, compiled too
            modes.append(mode)
        return real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    data = synthetic_data()
    cfg = tiny(vocab_size=64, max_steps=4, eval_every=4, eval_batches=2, batch_size=4, log_every=2)
    rt = llm.Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=True)
    plain = llm.train_model("plain", cfg, data, rt)
    monkeypatch.setattr(llm, "uses_cuda_graphs", lambda cfg, rt: True)
    graphed = llm.train_model("graphed", cfg, data, rt)
    assert modes == [None, "reduce-overhead"]
    assert graphed["val_loss"] == plain["val_loss"] and graphed["train_loss"] == plain["train_loss"]
