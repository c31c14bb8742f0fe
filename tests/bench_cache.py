"""What checking the token cache's sha256 sums costs, on a cache of the seed preset's size.

    python tests/bench_cache.py

Writes a cache directory of random token ids the size of the seed run's (25.65M training and 1.35M
validation tokens, uint16, in shards as prepare_data caches the SmolLM corpus), then times
llm.load_cache (which verifies each shard's sha256, shards in parallel threads) and the hashing of
the shards one after another: medians of 5, the files in the page cache.
"""

import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llm  # after the path to the repository root


def median_ms(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2] * 1000


with tempfile.TemporaryDirectory() as d:
    rng = np.random.default_rng(0)
    meta = {"source": "smollm", "tokenizer": "-", "vocab_size": 49152, "dtype": "uint16", "shards": {}, "sha256": {}}
    for split, n in (("train", 25_650_000), ("val", 1_350_000)):  # as prepare_data writes them: in shards
        writer = llm.ShardWriter(d, split, n, np.dtype(np.uint16))
        writer.write(rng.integers(0, 49152, n, dtype=np.uint16))
        writer.close()
        meta["shards"][split], meta[f"{split}_tokens"] = writer.shards, writer.n
        meta["sha256"].update(writer.sha256)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump(meta, f)
    assert llm.load_cache(d)[1] == "ok"
    files = sorted(meta["sha256"])
    size = sum(os.path.getsize(os.path.join(d, name)) for name in files) / 1e6
    load = median_ms(lambda: llm.load_cache(d))
    hashing = median_ms(lambda: [llm.file_sha256(os.path.join(d, name)) for name in files])
    print(f"{size:.1f} MB of tokens in {len(files)} shards: load_cache {load:.0f} ms; the sha256 of the shards one "
          f"after another {hashing:.0f} ms ({llm.cpu_name()}, median of 5)")
