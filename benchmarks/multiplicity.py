"""How often the leaderboard marks a run "different from the best" when all runs are equal.

K runs of equal quality on N = 100 test images (per-image score = a shared image effect plus
independent noise per run); each repetition ranks them, takes the best run (chosen after looking,
as the leaderboard does) and counts whether any other run is marked different at alpha = 0.05:

- max-statistic: the leaderboard's marks (:func:`brainrecon.leaderboard.compare_to_best`,
  single-step max-statistic permutation test over all the group's runs);
- Holm: Holm's correction over the K - 1 pair p-values against the best (any rejection means the
  smallest p <= alpha / (K - 1));
- unadjusted: any pair p-value < alpha (what the leaderboard did before).

Deterministic (seeded); ``python benchmarks/multiplicity.py [--trials 2000] [--permutations 199]``.
The figures in docs/evaluation.md were printed by this script with its defaults.
"""

from __future__ import annotations

import argparse

import numpy as np

from brainrecon.leaderboard import LeaderboardEntry, cell_mark, compare_to_best


def _entry(name: str, scores: np.ndarray) -> LeaderboardEntry:
    e = LeaderboardEntry(name=name, path=None, decoder="sim", subject=1, data_name="simulation",
                         data_kind="synthetic", is_nsd=False, fingerprint="sim", n_test=len(scores),
                         ids_sha256="sim", variant="mindeye")
    e.scores = {"SSIM": float(scores.mean())}
    e.per_image = {"SSIM": {i: float(v) for i, v in enumerate(scores)}}
    return e


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--permutations", type=int, default=199)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    rng = np.random.default_rng(2026)
    n, alpha = args.images, args.alpha
    for k in (2, 5, 10):
        adjusted = holm = unadjusted = 0
        for t in range(args.trials):
            base = rng.uniform(0.3, 0.7, n)
            members = [_entry(f"r{j}", base + rng.normal(0, 0.05, n)) for j in range(k)]
            compare_to_best(members, seed=t, n_permutations=args.permutations)
            ps = sorted(e.p_vs_best["SSIM"] for e in members if "SSIM" in e.p_vs_best)
            adjusted += any(cell_mark(e, "SSIM", alpha) == "differs" for e in members)
            holm += bool(ps) and ps[0] <= alpha / len(ps)
            unadjusted += any(p < alpha for p in ps)
        print(f"K={k}: max-statistic {adjusted / args.trials:.3f}  Holm {holm / args.trials:.3f}  "
              f"unadjusted {unadjusted / args.trials:.3f}  ({args.trials} trials, N={n}, "
              f"B={args.permutations})", flush=True)


if __name__ == "__main__":
    main()
