#!/usr/bin/env python
"""Speed of one MoE layer (forward + backward) and of a whole training step, side by side.

    python tests/bench_moe.py                  # the seed shapes; cuda when available, else cpu
    python tests/bench_moe.py --quick          # small shapes, about a minute on 2 CPU cores
    python tests/bench_moe.py --smoke          # the smallest shapes: that it runs, not how fast (its test)
    python tests/bench_moe.py --compile        # torch.compile every candidate (ours with fullgraph=True)
    python tests/bench_moe.py --device cpu --dtype bf16 --repeats 9 --iters 10
    python tests/bench_moe.py --compile --profile  # and where each candidate's time goes, kernel by kernel

A script, not a test: pytest does not collect it (its name does not start with test_).

Section 1, one layer, forward + backward at equal matmul FLOPs per token:
  dense FFN      llm.FeedForward(cfg, top_k * d_ff): the compute-matched dense FFN, the reference
  ours           llm.MoE(cfg): token choice, dropless, one grouped matmul per projection; with its
                 balance and z losses (from its Routing), as the model computes them
  floor          ours' expert matmuls and activation alone, on copies already grouped by expert:
                 what the grouped GEMM kernels cost before any routing (a bound on ours)
  mask loop      the original tutorial's per-expert boolean-mask loop (reimplemented here only)
  HF Mixtral     transformers' MixtralSparseMoeBlock with each experts implementation (eager,
                 batched_mm, grouped_mm); SwiGLU experts of intermediate size I = 2/3 d_ff have the
                 matmul FLOPs of a SiLU MLP of width d_ff
Section 2, one training step (forward, backward, gradient clipping, Muon + AdamW steps) of the
"moe" config against its "dense-matched" config (llm.dense_matched), as llm.train_model runs it
(--compile on CUDA: torch.compile with CUDA graphs, and Muon's step compiled). Under --compile, the
same two steps again with Muon's step eager: what compiling it buys each. Then each one's optimizer
step alone (gradient clipping, Muon, AdamW on gradients computed once): Muon's cost grows with
total parameters, so the MoE pays for all its experts there, not only for the active ones.

Timing: every candidate is warmed up, then each repeat times `iters` calls of every candidate in
turn (the order rotates between repeats, so a noisy neighbour hits all of them alike); the table
shows the median over repeats. CUDA runs under bf16 autocast by default and is timed with CUDA
events; CPU runs fp32 by default. On CUDA each layer candidate that makes no host sync is also
captured once in a CUDA graph and its replays timed the same way ("GPU ms"): that is the device
time alone, without the host's per-op dispatch, which at these sizes can exceed the kernels' time
(in a whole model the host runs ahead of the GPU, so the GPU time is what a layer costs there when
the GPU is the bottleneck). Candidates that sync (the mask loop, HF eager) cannot be captured.
Before timing, our layer is checked against the mask loop with the same weights (outputs and
gradients), so a fast but wrong layer cannot win; a mismatch exits 1.
The last line printed is one line of JSON with every number.
"""

import argparse
import collections
import datetime
import functools
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
import torch.nn.functional as F
from torch import nn

import llm  # before transformers: llm quiets torchao's import-time logging, which transformers triggers

sys.path.insert(0, os.path.join(ROOT, "tests"))
from helpers import MoEWithLosses, OpRecorder  # the test suite's

try:
    import transformers
    from transformers import MixtralConfig
    from transformers.integrations import moe as hf_moe
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts, MixtralSparseMoeBlock
    HF_VERSION = transformers.__version__
    HF_MISSING = (None if hasattr(hf_moe, "ALL_EXPERTS_FUNCTIONS")
                  else f"transformers {HF_VERSION} has no experts implementations")
except Exception as e:  # noqa: BLE001  (an old or missing transformers: the HF rows say why)
    HF_VERSION = getattr(sys.modules.get("transformers"), "__version__", "not installed")
    HF_MISSING = f"{type(e).__name__}: {e}"

HF_IMPLS = ("eager", "batched_mm", "grouped_mm")
DEVICE_SKIP = "ok" in inspect.signature(llm.Muon.step).parameters  # llm.train_model's sync-free step skipping
MODEL_LOSS = "targets" in inspect.signature(llm.Transformer.forward).parameters  # the loss computed in the model
MUON_COMPILE = "compile" in inspect.signature(llm.make_optimizers).parameters  # Muon's step as one compiled graph
INIT_STD = 0.02
CHECK_TOKENS = 64  # tokens per sequence in the correctness checks


# ----------------------------------------------------------------------------------------------
# Candidates


class MaskLoopMoE(nn.Module):
    """The original tutorial's MoE: a ModuleList of Linear-SiLU-Linear experts, a router, top-k
    softmax gates, and a Python loop that gathers each expert's tokens with a boolean mask."""

    def __init__(self, d_model, d_ff, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, d_ff, bias=False), nn.SiLU(), nn.Linear(d_ff, d_model, bias=False))
            for _ in range(num_experts))

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        x = x.reshape(-1, D)
        top_logits, top_k_indices = self.router(x).topk(self.top_k, dim=-1)
        gates = top_logits.softmax(dim=-1)  # softmax over the top k = renormalised top-k probabilities
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            chosen = top_k_indices == i  # (N, k)
            mask = chosen.any(dim=-1)  # (N,)
            if mask.any():
                weights_for_i = (gates * chosen).sum(dim=-1)  # (N,)
                out[mask] += weights_for_i[mask, None] * expert(x[mask])
        return out.view(B, T, D)

    @torch.no_grad()
    def copy_from(self, moe):
        """Take llm.MoE's router and stacked expert weights (E, out, in)."""
        self.router.weight.copy_(moe.router.weight)
        for i, expert in enumerate(self.experts):
            expert[0].weight.copy_(moe.w_up[i])
            expert[2].weight.copy_(moe.w_down[i])


class ExpertsAlone(nn.Module):
    """The floor under a dropless grouped-GEMM layer: llm.MoE's expert matmuls and activation
    (llm.MoE.experts with group ends, weight casts included) on token copies already grouped by
    expert in an even split: no router, sort or permutation. Its ratio to the dense FFN is the cost
    of the grouped GEMM kernels alone, a bound the whole layer cannot beat."""

    def __init__(self, moe, rows):
        super().__init__()
        self.moe = moe
        self.register_buffer("offs", torch.tensor([(e + 1) * rows // moe.E for e in range(moe.E)], dtype=torch.int32))

    def forward(self, xs):  # (N*k, D) -> (N*k, D)
        return self.moe.experts(xs.to(llm.compute_dtype(xs)), self.offs)


def init_weights(module):
    """Fresh random weights, the same scale for every candidate."""
    with torch.no_grad():
        for p in module.parameters():
            nn.init.normal_(p, std=INIT_STD)
    return module


def hf_block(impl, d_model, intermediate, num_experts, top_k):
    """A MixtralSparseMoeBlock with its own config (the experts read config._experts_implementation
    at every call, so blocks must not share one)."""
    cfg = MixtralConfig(hidden_size=d_model, intermediate_size=intermediate, num_local_experts=num_experts,
                        num_experts_per_tok=top_k, router_jitter_noise=0.0, experts_implementation=impl)
    block = MixtralSparseMoeBlock(cfg)
    assert block.experts.config._experts_implementation == impl
    return init_weights(block)


def hf_function(block):
    """The function the experts' forward dispatches to, by the same lookup transformers does."""
    impl = block.experts.config._experts_implementation
    original = MixtralExperts.forward.__wrapped__
    fn = hf_moe.ALL_EXPERTS_FUNCTIONS.get_interface(impl, original)
    return "MixtralExperts.forward (original loop)" if fn is original else fn.__name__


def matmul_path(ops):
    """Which matmul path ran, from the recorded ops (for llm.MoE, bmm means llm.grouped_mm_fallback)."""
    if "_grouped_mm" in ops:
        return "grouped_mm"
    if any("grouped_mm_fallback" in o for o in ops):
        return "grouped_mm_fallback"  # transformers' per-expert loop (custom op)
    if "bmm" in ops:
        return "bmm"
    if "index_add_" in ops or "index_put" in ops:
        return "index loop"
    return "mm"


PATH_TEXT = {"grouped_mm": "F.grouped_mm", "grouped_mm_fallback": "HF grouped_mm fallback loop",
             "bmm": "bmm", "index loop": "index_add_ loop", "mm": "mm", None: "?"}


def path_text(path, ours=False):
    if ours and path == "bmm":
        return "llm.grouped_mm_fallback (einsum over all experts)"
    return PATH_TEXT.get(path, path)


# ----------------------------------------------------------------------------------------------
# Timing


class Candidate:
    def __init__(self, key, label, flops=None):
        self.key, self.label, self.flops = key, label, flops
        self.step, self.status, self.note = None, "ok", ""
        self.samples = []  # ms per call, one per repeat
        self.ratio = self.graph_ratio = None  # against the section's reference, set after timing
        self.graphable = False  # makes no host sync: can be captured in a CUDA graph
        self.graph, self.graph_status, self.graph_samples = None, "not captured", []  # replays, ms per call
        self.profile = None  # --profile: the heaviest kernels (CUDA) or ops (CPU) of one call

    def fail(self, reason):
        self.status, self.step = f"n/a ({reason})", None

    @property
    def ok(self):
        return self.status == "ok" and bool(self.samples)

    @property
    def ms(self):
        return statistics.median(self.samples) if self.ok else None

    @property
    def spread(self):
        return (max(self.samples) - min(self.samples)) / self.ms if self.ok and len(self.samples) > 1 else None

    @property
    def graph_ms(self):
        return statistics.median(self.graph_samples) if self.graph_samples else None


def short_error(e):
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= 110 else text[:107] + "..."


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, iters, device):
    """Milliseconds per call of fn, over iters calls."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1000 / iters


def release(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def capture(step, device):
    """One call of step as a CUDA graph (warmed up on a side stream first, as capture requires)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize(device)
    return graph


def profile_calls(c, args, device, log, top=12):
    """--profile: torch.profiler over `iters` calls of c; prints and keeps the kernels (CUDA: device
    time) or ops (CPU: self time) that take longest, per call."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(args.iters):
            c.step()
        sync(device)
    events = prof.key_averages()
    if cuda:
        rows = [(e.device_time_total, e.count, e.key) for e in events
                if e.device_type.name == "CUDA" and e.device_time_total > 0]
    else:
        rows = [(e.self_cpu_time_total, e.count, e.key) for e in events if e.self_cpu_time_total > 0]
    rows.sort(key=lambda r: -r[0])
    # CUDA: which operators launched each kernel (a kernel name alone, e.g. a memcpy, seldom says why it runs)
    launchers = {}
    for e in prof.events() if cuda else ():
        for k in e.kernels:
            launchers.setdefault(k.name, collections.Counter())[e.name] += 1
    per_call = sum(r[0] for r in rows) / args.iters / 1000
    log(f"  profile of {c.label}: {per_call:.3f} ms of {'kernel' if cuda else 'CPU op'} time per call; the heaviest:")
    c.profile = {"ms_per_call": per_call, "kind": "cuda kernels" if cuda else "cpu ops", "top": []}
    for t, n, key in rows[:top]:
        by = [f"{op} x{m / args.iters:.3g}" for op, m in launchers.get(key, collections.Counter()).most_common(3)]
        log(f"    {t / args.iters / 1000:8.3f} ms  x{n / args.iters:<5.3g} {key[:110]}"
            + (f"  (from {', '.join(by)})" if by else ""))
        c.profile["top"].append({"name": key, "ms_per_call": t / args.iters / 1000, "calls_per_call": n / args.iters,
                                 "launched_by": by})


def measure(cands, args, device, log):
    """Warm every candidate up, then interleave them over the repeats. A candidate whose warm-up
    call takes longer than slow_s (e.g. HF batched_mm on a CPU) gets one timed call, not repeats.
    The call judged is the first one, or the second under --compile (the first one compiles)."""
    slow_s = 5.0 if args.quick else 60.0
    judged = 1 if args.compile else 0
    for c in cands:
        if c.step is None:
            continue
        first = None
        try:
            for i in range(max(args.warmup, judged + 1)):
                t0 = time.perf_counter()
                c.step()
                sync(device)
                took = time.perf_counter() - t0
                first = took if i == 0 else first
                if i == judged and took > slow_s:
                    c.samples = [1000 * took] if i > 0 else [time_calls(c.step, 1, device)]
                    c.note = ((c.note + "; " if c.note else "")
                              + f"slow: 1 timed call, no repeats (warm-up call {took:.1f}s)")
                    c.step = None
                    break
        except Exception as e:  # noqa: BLE001  (out of memory, unsupported dtype, compile failure)
            c.fail(short_error(e))
            release(device)
        log(f"  warmed up {c.label}: {c.status}" + (f" (first call {first:.2f}s)" if first is not None else ""))
    if device.type == "cuda":
        for c in cands:
            if c.step is None:
                c.graph_status = "-"
            elif not c.graphable:
                c.graph_status = "host syncs"
            else:
                try:
                    c.graph, c.graph_status = capture(c.step, device), "ok"
                except Exception as e:  # noqa: BLE001  (a sync inside, or an op capture does not allow)
                    c.graph_status = f"capture failed: {short_error(e)}"
                    release(device)
    live = [c for c in cands if c.step is not None]
    for r in range(args.repeats):
        for j in range(len(live)):
            c = live[(r + j) % len(live)]
            if c.step is None:
                continue
            try:
                c.samples.append(time_calls(c.step, args.iters, device))
                if c.graph is not None:
                    c.graph_samples.append(time_calls(c.graph.replay, args.iters, device))
            except Exception as e:  # noqa: BLE001
                c.fail(short_error(e))
                release(device)
    if args.profile:
        for c in live:
            if c.step is not None:
                try:
                    profile_calls(c, args, device, log)
                except Exception as e:  # noqa: BLE001
                    log(f"  profile of {c.label} failed: {short_error(e)}")
    for c in cands:  # drop the models and their graphs before the next section
        c.step = c.graph = None
    release(device)


# ----------------------------------------------------------------------------------------------
# Section 1: one layer


def layer_step(module, x, g, amp, aux=False):
    """One forward + backward of a layer; the same upstream gradient g for every candidate."""
    params = list(module.parameters())
    grads = {}

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        with amp():
            out = module(x)
        if aux:  # ours (MoEWithLosses) also returns its load-balancing and z losses: they are part of its cost
            y, lb, z = out
            gy = grads.setdefault(y.dtype, g.to(y.dtype))
            # made once: a host-to-device copy per call would also keep the step out of a CUDA graph
            g_lb = grads.setdefault("lb", torch.full((), 0.01, device=lb.device, dtype=lb.dtype))
            g_z = grads.setdefault("z", torch.full((), 0.001, device=z.device, dtype=z.dtype))
            torch.autograd.backward((y, lb, z), (gy, g_lb, g_z))
        else:
            out.backward(grads.setdefault(out.dtype, g.to(out.dtype)))
    return step


def check_ours_vs_loop(cfg, device, dtype, amp, log):
    """Our layer and the mask loop with the same weights: outputs and gradients must agree.
    The loop runs in fp32 as the reference; ours runs in the benchmark's dtype (routing is fp32
    in both, so bf16 changes only the expert matmuls)."""
    torch.manual_seed(1)
    ours = init_weights(llm.MoE(cfg)).to(device).eval()  # eval: no router noise
    loop = MaskLoopMoE(cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.expert_top_k).to(device)
    loop.copy_from(ours)
    x = torch.randn(2, CHECK_TOKENS, cfg.d_model, device=device)
    g = torch.randn_like(x)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with OpRecorder() as rec:
        with amp():
            y1 = ours(x1)[0]
        y1.backward(g.to(y1.dtype))
    y2 = loop(x2)
    y2.backward(g)
    scale = y2.abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # relative to the output's largest entry
    up_loop = torch.stack([e[0].weight.grad for e in loop.experts])
    diffs = {"out": (y1.float() - y2).abs().max().item() / scale,
             "dx": (x1.grad - x2.grad).abs().max().item() / x2.grad.abs().max().item(),
             "dw_up": (ours.w_up.grad - up_loop).abs().max().item() / up_loop.abs().max().item()}
    ok = all(v <= tol for v in diffs.values())
    path = matmul_path(rec.ops)
    log(f"check: ours == mask loop ({'ok' if ok else 'MISMATCH'}; max abs diff {diffs['out'] * scale:.2e} on outputs "
        f"of max {scale:.2e}; relative diffs out {diffs['out']:.1e}, dx {diffs['dx']:.1e}, dw_up {diffs['dw_up']:.1e}; "
        f"tolerance {tol:g}; ours ran {str(dtype).replace('torch.', '')} via {path_text(path, ours=True)})")
    return {"ok": ok, "tolerance": tol, "path": path, **{f"rel_diff_{k}": v for k, v in diffs.items()}}


def check_hf(dims, device, hf_dtype, amp, log):
    """Each experts implementation must dispatch to the function it names, run the matmul path
    expected of it, and agree with eager on the same weights."""
    D, I, E, k = dims
    torch.manual_seed(2)
    block = hf_block("eager", D, I, E, k).to(device, hf_dtype)
    x = torch.randn(1, CHECK_TOKENS, D, device=device)
    expect = {"eager": ("MixtralExperts.forward (original loop)", {"index loop"}),
              "batched_mm": ("batched_mm_experts_forward", {"bmm"}),
              "grouped_mm": ("grouped_mm_experts_forward", {"grouped_mm", "grouped_mm_fallback"})}
    result, outs = {}, {}
    for impl in HF_IMPLS:
        block.experts.config._experts_implementation = impl
        fn = hf_function(block)
        xi = x.clone().requires_grad_()

        def run(xi=xi):
            with amp():
                y = block(xi)
            y.float().sum().backward()
            return y
        try:
            with OpRecorder() as rec:
                outs[impl] = run().detach().float()
            path = matmul_path(rec.ops)
        except Exception as e:  # noqa: BLE001
            result[impl] = {"ok": False, "function": fn, "path": None, "error": short_error(e)}
            continue
        want_fn, want_path = expect[impl]
        result[impl] = {"ok": fn == want_fn and path in want_path, "function": fn, "path": path}
    block.zero_grad(set_to_none=True)
    tol = 1e-4 if hf_dtype == torch.float32 else 3e-2
    ref = outs.get("eager")
    for impl in HF_IMPLS:
        if impl in outs and ref is not None:
            diff = (outs[impl] - ref).abs().max().item() / ref.abs().max().item()
            result[impl].update(rel_diff_vs_eager=diff, agrees=diff <= tol)
            result[impl]["ok"] &= diff <= tol
    parts = []
    for impl, r in result.items():
        if "error" in r:
            parts.append(f"{impl}: failed ({r['error']})")
        else:
            parts.append(f"{impl} -> {r['function']} via {path_text(r['path'])}"
                         + (f", rel diff vs eager {r['rel_diff_vs_eager']:.1e}"
                            if impl != "eager" and "rel_diff_vs_eager" in r else ""))
    all_ok = all(r["ok"] for r in result.values())
    log(f"check: HF experts implementations {'ok' if all_ok else 'UNEXPECTED'} ({'; '.join(parts)}; tolerance {tol:g})")
    return result


def batched_mm_bytes(tokens, dims, elem):
    """batched_mm gathers one copy of both expert matrices per token-expert pair; backward holds
    their gradients too."""
    D, I, _E, k = dims
    return 2 * tokens * k * 3 * I * D * elem


def available_bytes(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def layer_section(args, device, dtype, amp, log):
    cfg = llm.Config(vocab_size=1).validate()  # the seed shapes
    D, Fw, E, k = cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.expert_top_k
    I = 2 * Fw // 3  # SwiGLU of width I: 3 D I multiply-adds, as a SiLU MLP of width 1.5 I = d_ff
    B, T = (2, 32) if args.smoke else (4, 128) if args.quick else (cfg.batch_size, cfg.max_seq_len)
    N = B * T
    fwd_flops = 2 * 2 * D * Fw * k * N  # the routed experts' matmuls, forward
    router_share = (2 * D * E) / (2 * 2 * D * Fw * k)
    hf_dtype = dtype  # HF blocks hold weights in the run dtype (see the note printed below)
    log(f"layer: {N} tokens ({B} x {T}), d_model {D}, {E} experts of d_ff {Fw} ({cfg.ffn}), top-{k}; "
        f"dense FFN d_ff {k * Fw}; HF Mixtral SwiGLU intermediate {I}")
    log(f"  equal FLOPs: {4 * D * Fw * k / 1e6:.2f} MFLOP per token forward in every candidate's expert/FFN matmuls; "
        f"the router adds {router_share:.2%} (not matched, negligible)")
    if dtype != torch.float32:
        log(f"  dtype: ours, dense and the mask loop keep fp32 weights under {args.dtype} autocast (cast per call, "
            f"as in training); HF blocks hold {args.dtype} weights, their usual form (HF grouped_mm casts inputs to "
            f"the weight dtype, so fp32 weights would run it in fp32)")

    checks = {"ours_vs_loop": check_ours_vs_loop(cfg, device, dtype, amp, log)}
    if HF_MISSING is None:
        checks["hf"] = check_hf((D, I, E, k), device, hf_dtype, amp, log)

    torch.manual_seed(0)
    x = torch.randn(B, T, D, device=device, requires_grad=True)  # unit RMS, like the normed residual stream
    g = torch.randn(B, T, D, device=device)
    def compile_(module, fullgraph):
        return torch.compile(module, fullgraph=fullgraph) if args.compile else module

    cands = []

    def add(key, label, build, aux=False, fullgraph=False, note="", graphable=False, inputs=(x, g)):
        c = Candidate(key, label, flops=3 * fwd_flops)
        c.note, c.graphable = note, graphable
        try:
            module = build().to(device).train()
            c.step = layer_step(compile_(module, fullgraph), *inputs, amp, aux=aux)
        except Exception as e:  # noqa: BLE001
            c.fail(short_error(e))
        cands.append(c)
        return c

    add("dense_ffn", f"dense FFN d_ff {k * Fw} (compute-matched)", lambda: init_weights(llm.FeedForward(cfg, k * Fw)),
        fullgraph=True, graphable=True)
    ours_note = f"via {path_text(checks['ours_vs_loop']['path'], ours=True)}"
    if args.compile and device.type == "cpu" and dtype == torch.float32:
        ours_note += " (eager check; compiled fp32 on CPU uses llm.grouped_mm_fallback, E x the FLOPs)"
    # the layer and its two losses, as the model computes them: y, balance_loss(), z_loss() of its Routing
    add("ours", "ours: llm.MoE (topk, dropless)", lambda: MoEWithLosses(init_weights(llm.MoE(cfg))), aux=True,
        fullgraph=True, graphable=True, note=ours_note)
    copies = (torch.randn(N * k, D, device=device, requires_grad=True), torch.randn(N * k, D, device=device))
    add("experts_alone", "floor: ours' experts alone", lambda: ExpertsAlone(init_weights(llm.MoE(cfg)), N * k),
        fullgraph=True, graphable=True, inputs=copies,
        note="grouped matmuls + activation on pre-grouped copies, even split; no router, sort, permutation")
    add("mask_loop", "mask loop (tutorial)", lambda: init_weights(MaskLoopMoE(D, Fw, E, k)))
    for impl in HF_IMPLS:
        key, label = f"hf_{impl}", f"HF Mixtral {impl}"
        if HF_MISSING is not None:
            c = Candidate(key, label)
            c.fail(HF_MISSING)
            cands.append(c)
            continue
        hf_check = checks["hf"].get(impl, {})
        if "error" in hf_check:
            c = Candidate(key, label)
            c.fail(hf_check["error"])
            cands.append(c)
            continue
        if impl == "batched_mm":
            need, free = batched_mm_bytes(N, (D, I, E, k), torch.finfo(hf_dtype).bits // 8), available_bytes(device)
            if free is not None and need > 0.8 * free:
                c = Candidate(key, label)
                c.fail(f"needs ~{need / 2**30:.0f} GiB for per-token weight copies, {free / 2**30:.0f} GiB free")
                cands.append(c)
                continue
        note = f"via {path_text(hf_check.get('path'))}"
        if impl == "grouped_mm" and args.compile and hf_dtype != torch.bfloat16:
            note += " (eager check; compiled with non-bf16 weights HF uses its per-expert loop fallback)"
        add(key, label, lambda impl=impl: hf_block(impl, D, I, E, k).to(dtype=hf_dtype), note=note,
            graphable=impl != "eager")  # eager loops over the experts that were hit: a host sync

    log("timing the layer candidates ...")
    measure(cands, args, device, log)
    dense = cands[0]
    for c in cands:
        c.ratio = c.ms / dense.ms if c.ok and dense.ok else None
        c.graph_ratio = c.graph_ms / dense.graph_ms if c.graph_ms is not None and dense.graph_ms is not None else None
    info = {"tokens": N, "batch": B, "seq_len": T, "d_model": D, "d_ff": Fw, "num_experts": E, "top_k": k,
            "hf_intermediate": I}
    return info, cands, checks


# ----------------------------------------------------------------------------------------------
# Section 2: the training step


def train_section(args, device, dtype, amp, log):
    if args.quick:
        base = llm.Config(**llm.PRESETS["cpu"], vocab_size=4096)
        B, T = (2, 32) if args.smoke else (8, 128)
    else:
        base = llm.Config(vocab_size=49152)
        B, T = base.batch_size, base.max_seq_len
    base = base.validate()
    cfgs = {"moe": base, "dense-matched": llm.dense_matched(base).validate()}
    info = {}
    cands = []
    torch.manual_seed(0)
    idx = torch.randint(0, base.vocab_size, (B, T), device=device)
    tgt = torch.randint(0, base.vocab_size, (B, T), device=device)

    rt = llm.Runtime(device=device, dtype=dtype, compile=args.compile)
    muon_eager = []  # --compile: the training steps again with Muon's step eager

    def make_optimizers(model, cfg):  # as llm.train_model: Muon compiled when the model is
        if MUON_COMPILE:
            return llm.make_optimizers(model, cfg, compile=args.compile)
        return llm.make_optimizers(model, cfg)

    def forward_backward(run, cfg):
        lb_weight = 0.0 if cfg.balance == "aux_free" else cfg.load_balancing_weight  # as llm.train_model
        with amp():
            if MODEL_LOSS:  # as llm.train_model: the loss inside the (compiled) model
                ce, lb, z = run(idx, targets=tgt)
            else:
                logits, lb, z = run(idx)
                ce = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
            loss = ce + lb_weight * lb + cfg.z_loss_weight * z
        loss.backward()

    def optimizer_step(model, optimizers, cfg):
        # as llm.train_model (bf16/fp32): the clipped norm doubles as the finiteness check, and a
        # non-finite step is skipped on the device (Muon's ok, fused AdamW's found_inf)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        muon, adamw = optimizers
        if DEVICE_SKIP:
            ok = torch.isfinite(norm)
            muon.step(ok=ok)
            adamw.found_inf = (~ok).float()
            adamw.step()
        else:  # an llm.py whose Muon cannot skip on the device
            muon.step()
            adamw.step()

    for name, cfg in cfgs.items():
        size = llm.model_size(cfg)
        info[name] = {"d_ff": cfg.d_ff, "moe_layers": cfg.moe_layer_ids(), "active_params": size.active,
                      "total_params": size.total, "flops_per_token": size.flops_per_token}
        c = Candidate("train_" + name.replace("-", "_"), name, flops=size.flops_per_token * B * T)
        try:
            torch.manual_seed(0)
            model = llm.Transformer(cfg).to(device).train()  # its own init (std 0.02, scaled output projections)
            optimizers = make_optimizers(model, cfg)
            # as llm.train_model: compiled on one GPU, the forward and backward replay as CUDA graphs
            graphs = hasattr(llm, "uses_cuda_graphs") and llm.uses_cuda_graphs(cfg, rt)
            run = torch.compile(model, mode="reduce-overhead" if graphs else None) if args.compile else model

            def step(model=model, run=run, optimizers=optimizers, cfg=cfg, graphs=graphs):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                forward_backward(run, cfg)
                optimizer_step(model, optimizers, cfg)
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
            c.step = step
            if args.compile and MUON_COMPILE:  # what compiling Muon's step buys: the same model, Muon eager
                eager = Candidate(c.key + "_muon_eager", f"{name}, Muon eager", flops=c.flops)
                eager.note = "the same compiled model, Muon's step not compiled; ratio vs dense-matched, Muon eager"
                eager.step = functools.partial(step, optimizers=llm.make_optimizers(model, cfg))
                muon_eager.append(eager)
        except Exception as e:  # noqa: BLE001
            c.fail(short_error(e))
        cands.append(c)
    cands += muon_eager
    for name, cfg in cfgs.items():  # the optimizer's share: its step alone, on gradients computed once
        c = Candidate(f"train_{name.replace('-', '_')}_optimizer", f"{name}: optimizer alone")
        c.note = "clip + Muon + AdamW on fixed gradients, no forward or backward"
        try:
            torch.manual_seed(0)
            model = llm.Transformer(cfg).to(device).train()
            optimizers = make_optimizers(model, cfg)
            forward_backward(model, cfg)
            c.step = lambda model=model, optimizers=optimizers, cfg=cfg: optimizer_step(model, optimizers, cfg)
        except Exception as e:  # noqa: BLE001
            c.fail(short_error(e))
        cands.append(c)
    m = info["moe"]
    log(f"training step: batch {B} x {T}, vocab {base.vocab_size}, d_model {base.d_model}, {base.n_layers} layers, "
        f"MoE layers {m['moe_layers']} ({base.num_experts} experts of d_ff {base.d_ff}, top-{base.expert_top_k}); "
        f"dense-matched d_ff {info['dense-matched']['d_ff']}; active params {m['active_params']:,} vs "
        f"{info['dense-matched']['active_params']:,}; forward+backward+clip+Muon+AdamW as llm.train_model"
        + ("" if DEVICE_SKIP else " (no on-device step skipping in this llm.py)"))
    log("timing the training steps ...")
    measure(cands, args, device, log)
    by = {c.key: c for c in cands}
    for c in cands:
        dense = by.get("train_dense_matched_muon_eager" if c.key.endswith("_muon_eager") else "train_dense_matched")
        c.ratio = c.ms / dense.ms if c.ok and dense is not None and dense.ok else None
    return {"batch": B, "seq_len": T, "vocab_size": base.vocab_size, "models": info}, cands


# ----------------------------------------------------------------------------------------------
# Report


def fmt(v, spec):
    """v formatted by spec, or a dash as wide as spec asks when there is no value."""
    return format(v, spec) if v is not None else format("-", spec.rstrip("f").split(".")[0] or "")


def table(title, cands, ratio_name, log, graphs=False):
    """graphs: add the CUDA-graph replay columns (GPU time alone) and their TFLOP/s."""
    log("")
    log(title)
    w = max(len(c.label) for c in cands) + 2
    extra = f"{'GPU ms':>9}{ratio_name:>12}{'TFLOP/s':>9}" if graphs else ""
    log(f"{'candidate':<{w}}{'ms (median)':>12}{'spread':>8}{ratio_name:>12}{'TFLOP/s':>9}{extra}  note")
    for c in cands:
        if not c.ok:
            log(f"{c.label:<{w}}{c.status}")
            continue
        tflops = c.flops / (c.ms / 1000) / 1e12 if c.flops else None
        spread = f"{100 * c.spread:.0f}%" if c.spread is not None else "-"
        extra, note = "", c.note
        if graphs and c.graph_ms is not None:
            g_tflops = c.flops / (c.graph_ms / 1000) / 1e12 if c.flops else None
            extra = f"{c.graph_ms:>9.3f}{fmt(c.graph_ratio, '>11.2f')}x{fmt(g_tflops, '>9.2f')}"
        elif graphs:
            extra = f"{'-':>9}{'-':>12}{'-':>9}"
            note = f"{note}; no graph: {c.graph_status}" if note else f"no graph: {c.graph_status}"
        log(f"{c.label:<{w}}{c.ms:>12.3f}{spread:>8}"
            f"{fmt(c.ratio, '>11.2f')}x{fmt(tflops, '>9.2f')}{extra}  {note}".rstrip())


def targets(layer, train, correct):
    """The targets as checks, computed from the measured ratios (None: cannot be computed)."""
    by = {c.key: c for c in layer + train}
    ours = by["ours"]
    hf = [c for c in layer if c.key.startswith("hf_") and c.ok]
    fastest = min(hf, key=lambda c: c.ms) if hf else None
    out = []
    v = ours.ratio
    out.append(("moe_layer_vs_dense_ffn", "MoE layer fwd+bwd <= 1.10x the compute-matched dense FFN", v, 1.10,
                None if v is None else (v <= 1.10 and correct)))
    v = ours.ms / fastest.ms if ours.ok and fastest else None
    out.append(("moe_layer_vs_fastest_hf", "MoE layer fwd+bwd <= the fastest HF Mixtral implementation"
                + (f" ({fastest.label.split()[-1]})" if fastest else ""), v, 1.0,
                None if v is None else (v <= 1.0 and correct)))
    if ours.graph_ms is not None:  # the same two on GPU time (CUDA graph replays)
        v = ours.graph_ratio
        out.append(("moe_layer_vs_dense_ffn_gpu_time", "  the same on GPU time (CUDA graphs)", v, 1.10,
                    None if v is None else (v <= 1.10 and correct)))
        hf_g = [c for c in hf if c.graph_ms is not None]
        fastest_g = min(hf_g, key=lambda c: c.graph_ms) if hf_g else None
        v = ours.graph_ms / fastest_g.graph_ms if fastest_g else None
        out.append(("moe_layer_vs_fastest_hf_gpu_time", "  the same on GPU time (CUDA graphs)"
                    + (f" ({fastest_g.label.split()[-1]})" if fastest_g else ""), v, 1.0,
                    None if v is None else (v <= 1.0 and correct)))
    v = by["train_moe"].ratio
    out.append(("train_step_moe_vs_dense_matched", "full moe training step <= 1.15x dense-matched", v, 1.15,
                None if v is None else v <= 1.15))
    return out


def finite(v):
    """JSON has no NaN or infinity: those become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes for a CPU (4 x 128 tokens; cpu preset model)")
    p.add_argument("--smoke", action="store_true",
                   help="--quick at 2 x 32 tokens: checks that every candidate runs (HF batched_mm copies every "
                        "expert's weights per token, 20 s at --quick on a CPU); its times mean nothing")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per candidate, median reported (default 7 on cuda, 5 on cpu)")
    p.add_argument("--iters", type=int, default=None, help="calls per repeat (default 20 on cuda, 5 on cpu)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate first (default 3)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every candidate (ours and dense with fullgraph=True)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="default: bf16 autocast on cuda, fp32 on cpu")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--profile", action="store_true", help="after timing, torch.profiler over each candidate's calls: "
                   "its heaviest kernels (CUDA) or ops (CPU) per call")
    args = p.parse_args(argv)
    args.quick = args.quick or args.smoke
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and args.dtype == "bf16" and not torch.cuda.is_bf16_supported():
        p.error("--dtype bf16: this GPU does not support bf16")
    args.repeats = (7 if args.device == "cuda" else 5) if args.repeats is None else args.repeats
    args.iters = (20 if args.device == "cuda" else 5) if args.iters is None else args.iters
    for name in ("repeats", "iters", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as llm.make_runtime: TF32 outside autocast

    def amp():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def log(line=""):
        print(line, flush=True)

    t_start = time.perf_counter()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else llm.cpu_name()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    log(f"bench_moe: MoE layer and training step vs compute-matched dense, {date}")
    log(f"device: {device.type} ({device_name}), {torch.get_num_threads()} CPU threads")
    log(f"torch {torch.__version__}, transformers {HF_VERSION}, python {platform.python_version()}")
    log(f"dtype: {args.dtype}{' autocast' if dtype != torch.float32 else ''}; "
        f"compile: {'on' if args.compile else 'off'}; warmup {args.warmup}, "
        f"{args.repeats} repeats x {args.iters} calls (median over repeats, candidates interleaved)"
        + ("; --smoke (smallest shapes)" if args.smoke else "; --quick (small shapes)" if args.quick else ""))

    layer_info, layer, checks = layer_section(args, device, dtype, amp, log)
    train_info, train = train_section(args, device, dtype, amp, log)
    correct = checks["ours_vs_loop"]["ok"]

    table(f"MoE layer, forward + backward ({layer_info['tokens']} tokens)", layer, "x dense FFN", log,
          graphs=device.type == "cuda")
    table(f"training step ({train_info['batch']} x {train_info['seq_len']} tokens)", train, "x dense-m.", log)

    h100 = device.type == "cuda" and "H100" in device_name
    log("")
    log("targets" + ("" if h100 else f" (defined for an H100; this run is on {device_name}, so informational only)")
        + ":")
    results = targets(layer, train, correct)
    for key, text, value, limit, ok in results:
        verdict = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        log(f"  {verdict}  {text}: {fmt(value, '.3f')} (limit {limit:.2f})"
            + (" [ours differs from the mask loop]" if not correct and key.startswith("moe_layer") else ""))
    floor = next(c for c in layer if c.key == "experts_alone")
    if floor.ok:  # what the kernels allow: the layer ratio cannot go below the ratio of its expert matmuls
        log(f"  floor: ours' expert matmuls alone take {fmt(floor.ratio, '.3f')}x the dense FFN"
            + (f" ({fmt(floor.graph_ratio, '.3f')}x on GPU time)" if floor.graph_ratio is not None else "")
            + "; the layer's routing, sort and permutations come on top")
    wall = time.perf_counter() - t_start
    log(f"total time {wall:.1f}s")

    def rows(cands):
        return {c.key: {"label": c.label, "ms": c.ms, "spread": c.spread, "ratio": c.ratio, "samples_ms": c.samples,
                        "status": c.status, "note": c.note, "gpu_ms": c.graph_ms, "gpu_ratio": c.graph_ratio,
                        "gpu_samples_ms": c.graph_samples, "graph_status": c.graph_status, "profile": c.profile}
                for c in cands}
    record = {"bench": "bench_moe", "date": date, "device": device.type, "device_name": device_name,
              "torch": torch.__version__, "transformers": HF_VERSION, "dtype": args.dtype, "args": vars(args),
              "wall_s": round(wall, 1), "layer": {**layer_info, "candidates": rows(layer)},
              "train": {**train_info, "candidates": rows(train)},
              "ratios": {"moe_layer_vs_dense_ffn": layer[1].ratio, "experts_alone_vs_dense_ffn": floor.ratio,
                         "train_moe_vs_dense_matched": train[0].ratio},
              "targets": {key: {"value": value, "limit": limit, "passed": ok, "defined_for": "H100"}
                          for key, _text, value, limit, ok in results},
              "correctness": checks}
    log(json.dumps(finite(record), default=str, allow_nan=False))
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
