import os
import sys

import numpy as np
import pytest

# The Hub is unreachable from CI; tests never wait for it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Twenty small documents of random words: any 8-word sequence occurs in one place only."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 8))) for _ in range(3000)]
    for i in range(20):
        text = " ".join(rng.choice(words, size=1500))
        (d / f"doc{i:02d}.txt").write_text(text + "\n")
    return d


@pytest.fixture(scope="session")
def shakespeare_smoke(tmp_path_factory):
    """`python llm.py --preset smoke --data shakespeare` (all three models), trained once for the
    session: its out_dir, its token cache and what it printed. Read-only for the tests."""
    import contextlib
    import io
    from types import SimpleNamespace

    import llm
    root = tmp_path_factory.mktemp("shakespeare-smoke")
    run = SimpleNamespace(out=root / "run", cache=root / "cache", printed=io.StringIO())
    with contextlib.redirect_stdout(run.printed):
        assert llm.main(["--preset", "smoke", "--data", "shakespeare", "--cache_dir", str(run.cache),
                         "--out_dir", str(run.out)]) == 0
    run.printed = run.printed.getvalue()
    return run
