"""How often the scaling ladder's one-seed 95% intervals hold the truth.

Two families follow one law, L = 2 + 3 (C / 1e13)^-0.3, each point with its own Gaussian noise
(sigma 0.02), so every multiplier's true value is 1. For each ladder size, it simulates ladders,
runs llm.intervals_by_bootstrap on each, and counts the intervals that hold 1: as llm.py draws the
bootstrap's sigma (from its own uncertainty) and, side by side on the same ladders, with the
residual sigma taken as known.

    python tests/bench_scaling_coverage.py [--ladders 60] [--rungs 3 4 6]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import llm

REAL_RNG = np.random.default_rng  # numpy's own, kept: known_sigma swaps the one llm.py calls


class KnownSigma:
    """A generator whose chi-square draw is its mean: the bootstrap's sigma stays the residual one."""

    def __init__(self, seed):
        self.rng = REAL_RNG(seed)

    def chisquare(self, df):
        return float(df)

    def normal(self, *args):
        return self.rng.normal(*args)


def coverage(rungs, ladders, known_sigma):
    rng, c, held = REAL_RNG(123 + rungs), np.geomspace(1e12, 1e14, rungs), []
    truth = 2.0 + 3.0 * (c / 1e13) ** -0.3
    if known_sigma:
        np.random.default_rng = KnownSigma
    try:
        for _ in range(ladders):
            points = {f: (c, truth + rng.normal(0, 0.02, rungs)) for f in ("moe", "dense-matched")}
            found, _ = llm.intervals_by_bootstrap(points, llm.fit_power_laws(points), shared_E=True)
            held += [m["ci95"] is not None and m["ci95"][0] <= 1.0 <= m["ci95"][1] for m in found]
    finally:
        np.random.default_rng = REAL_RNG
    return sum(held) / len(held)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ladders", type=int, default=60)
    p.add_argument("--rungs", type=int, nargs="+", default=[3, 4, 6])
    a = p.parse_args()
    print(f"{'rungs':>5}  {'drawn sigma (llm.py)':>20}  {'known sigma':>11}   ({a.ladders} ladders each)")
    for rungs in a.rungs:
        print(f"{rungs:>5}  {coverage(rungs, a.ladders, False):>20.1%}  {coverage(rungs, a.ladders, True):>11.1%}")


if __name__ == "__main__":
    main()
