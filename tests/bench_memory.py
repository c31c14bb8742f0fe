"""Peak memory of training with and without activation checkpointing, on CPU, by the process's own
counter: each mode trains a few steps in a fresh process, which reports its peak resident set size
(getrusage's ru_maxrss) before and after them; beside it, what `size` plans for the activations.

    python tests/bench_memory.py [--d_model 256] [--batch_size 16] [--max_seq_len 512] [--steps 3]
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = """
import json, resource, sys
import numpy as np, torch
sys.path.insert(0, {root!r})
import llm
cfg = llm.Config(**{config!r}).validate()
rng = np.random.default_rng(0)
data = llm.Data(train=rng.integers(0, cfg.vocab_size, 400_000).astype(np.uint16),
                val=rng.integers(0, cfg.vocab_size, 20_000).astype(np.uint16), vocab_size=cfg.vocab_size,
                source="random", tokenizer="none")
runtime = llm.Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=False)
trainer = llm.Trainer("m", cfg, data, runtime)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for step in range(cfg.max_steps):
    trainer.train_step(step)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"before_kib": before, "after_kib": after}}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    import llm
    base = {"d_model": a.d_model, "n_heads": a.d_model // 64, "n_layers": 6, "d_ff": 4 * a.d_model,
            "vocab_size": 8192, "batch_size": a.batch_size, "max_seq_len": a.max_seq_len, "max_steps": a.steps,
            "dropout": 0.0, "eval_every": 1000, "max_epochs": 0.0}
    print(f"d_model {a.d_model}, 6 layers (MoE in alternate ones), batch {a.batch_size} x {a.max_seq_len}, "
          f"fp32 on CPU, {a.steps} training steps in a fresh process per mode")
    for checkpointing in (False, True):
        config = {**base, "activation_checkpointing": checkpointing}
        code = CHILD.format(root=ROOT, config=config)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        rss = json.loads(out.strip().splitlines()[-1])
        planned = llm.activation_bytes(llm.Config(**config))
        print(f"activation_checkpointing {checkpointing!s:<5}: peak RSS {rss['after_kib'] / 2**20:.2f} GiB, "
              f"{(rss['after_kib'] - rss['before_kib']) / 2**20:.2f} GiB above the process before training; "
              f"size plans {planned / 2**30:.2f} GiB of activations (bf16 autocast; fp32 keeps more)")


if __name__ == "__main__":
    main()
