"""Sequences per second of the batch generator on one CPU core.

    .venv/bin/python benchmarks/bench_generator.py [--seconds 3] [--batch 32]

Paper config (images_all_exemplars: 1,623 classes x 20 drawings, 1,603 rare /
10 common / 10 holdout, bursty training with p_bursty 0.9), training batches
of 32 via train_batch(step) and evaluation sets via eval_batches. The
generator only handles indices, so a Dataset of the real shape with dummy
pixels measures the same work as the real Omniglot cache.

Reference: the original per-sequence Python generator, measured by the team
on the same 2-core machine, makes 1,416 bursty training sequences/s and
4,309 few-shot evaluation sequences/s on one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eicl_cli import config as config_mod  # noqa: E402
from eicl_cli.data.dataset import Dataset  # noqa: E402
from eicl_cli.data.sequences import SequenceGenerator  # noqa: E402

ORIGINAL_BURSTY_PER_S = 1416
ORIGINAL_FEWSHOT_PER_S = 4309


def paper_shaped_dataset(n_classes: int = 1623, n_drawers: int = 20) -> Dataset:
    n = n_classes * n_drawers
    return Dataset(kind="synthetic", images=np.ones((n, 1, 1), np.uint8),
                   class_images=np.arange(n, dtype=np.int32).reshape(n_classes, n_drawers),
                   class_variant=np.zeros(n_classes, np.int8),
                   class_source=np.arange(n_classes, dtype=np.int32),
                   image_drawer=np.tile(np.arange(1, n_drawers + 1), n_classes).astype(np.int8),
                   image_alphabet=np.zeros(n, np.int16), alphabet_names=["-"],
                   synthetic=True, cache_file="", cache_sha256="")


def rate(fn, seconds: float) -> float:
    """Calls per second of fn() over about `seconds` (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        calls += 1
    return calls / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1]
                                            / "configs" / "images_all_exemplars.toml"))
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core

    cfg = config_mod.load(args.config)
    gen = SequenceGenerator(paper_shaped_dataset(), cfg)
    step = iter(range(10**12))
    bursty = rate(lambda: gen.train_batch(next(step), args.batch), args.seconds) * args.batch
    print(f"bursty training batches of {args.batch}: {bursty:,.0f} sequences/s "
          f"({bursty / ORIGINAL_BURSTY_PER_S:.0f}x the original's {ORIGINAL_BURSTY_PER_S:,})")
    for mode in ("fewshot_holdout", "no_support_zipfian"):
        n = 10_000
        per_s = rate(lambda: sum(b.size for b in gen.eval_batches(mode, n, 1000)),
                     args.seconds) * n
        note = (f" ({per_s / ORIGINAL_FEWSHOT_PER_S:.0f}x the original's "
                f"{ORIGINAL_FEWSHOT_PER_S:,})" if mode.startswith("fewshot") else "")
        print(f"{mode} evaluation set: {per_s:,.0f} sequences/s{note}")


if __name__ == "__main__":
    main()
