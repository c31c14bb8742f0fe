"""Small builders shared by the test files."""

import glob
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESS_TIMEOUT = 240  # seconds; generous, the machine may be shared


def tiny(**kw):
    """A model config small enough for per-token reference loops."""
    base = {"d_model": 32, "n_heads": 4, "n_layers": 2, "d_ff": 48, "max_seq_len": 16, "vocab_size": 50,
            "num_experts": 4, "expert_top_k": 2, "moe_layers": "all", "dropout": 0.0, "noise_std": 0.0}
    base.update(kw)
    return llm.Config(**base).validate()


def synthetic_data(n_train=6000, n_val=800, vocab=64, seed=0):
    """A learnable token stream: each token mostly follows from the previous one."""
    rng = np.random.default_rng(seed)

    def stream(n):
        out = [0]
        for _ in range(n - 1):
            out.append((out[-1] * 7 + 3) % vocab if rng.random() < 0.8 else int(rng.integers(vocab)))
        return np.array(out, dtype=np.uint16)

    return llm.Data(train=stream(n_train), val=stream(n_val), vocab_size=vocab, source="synthetic", tokenizer="none")


class MoEWithLosses(torch.nn.Module):
    """An MoE layer and its training losses, as the model computes them in one graph:
    x (B, T, D) -> (y, balance loss, z loss)."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        y, routing = self.moe(x)
        return y, routing.balance_loss(), routing.z_loss()


def cpu_runtime():
    return llm.Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=False)


class OpRecorder(TorchDispatchMode):
    """The ops that actually run (forward and backward): names without "aten.", and each call's
    name with the dtypes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops, self.calls = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        name = name.removeprefix("aten.")
        self.ops.add(name)
        self.calls.append((name, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_metrics(run_dir):
    """A run's metrics.jsonl records (a blank line skipped)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_process(args, out_dir, log_dir, name):
    """llm.py in a real process, its output going to files (a full pipe would stall it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc_logs = [pathlib.Path(log_dir) / f"{name}.out", pathlib.Path(log_dir) / f"{name}.err"]
    with open(proc_logs[0], "w") as stdout, open(proc_logs[1], "w") as stderr:  # the child keeps its own copies
        proc = subprocess.Popen([sys.executable, "llm.py"] + [str(a) for a in args] + ["--out_dir", out_dir],
                                cwd=ROOT, stdout=stdout, stderr=stderr, env=env)
    proc.logs = proc_logs
    return proc


def logs_of(proc):
    return tuple(path.read_text() for path in proc.logs)


def wait_for_files(pattern, proc, timeout=PROCESS_TIMEOUT):
    """Poll every 0.05 s until `pattern` matches a file, while the process still runs."""
    deadline = time.monotonic() + timeout
    while not glob.glob(pattern):
        if proc.poll() is not None:
            out, err = logs_of(proc)
            pytest.fail(f"the process ended (status {proc.returncode}) before {pattern} appeared:\n"
                        f"{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"no {pattern} within {timeout} s")
        time.sleep(0.05)
