"""Strict ICL of a trained run when fewshot_holdout's labels 0/1 are replaced
by other pairs of labels: which labels the model copies well, and whether that
follows the ink of the characters that own them.

    python benchmarks/label_pairs.py RUN [--pairs 0,1 8,9 ...] [--blocks 24]

The same 1,000 fewshot_holdout sequences (same images, same order) are scored
with the labels of each pair put in place of 0 and 1. `--blocks N` also
scores N random blocks of 8 rare labels (one Omniglot character and its 7
flips and rotations, under preserve_ordering_every_n = 8) at their first two
labels, and prints the correlation of strict ICL with the character's ink
(the mean of 1 - pixel over its drawings). A diagnostic, not an eicl command:
it uses eicl's own evaluation pieces and the run's latest checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eicl_cli.evaluate import restore_for_eval
from eicl_cli.inputs import materialise, to_device
from eicl_cli.model import forward_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--pairs", nargs="*", default=["0,1", "2,3", "8,9", "100,101", "6000,6001"])
    ap.add_argument("--blocks", type=int, default=0)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()

    restored, data, gen = restore_for_eval(args.run)
    batch = next(iter(gen.eval_batches("fewshot_holdout", args.n, args.n)))
    on_device = to_device(batch)
    labels01 = np.asarray(batch.label)  # 0/1: which of the two ways each item is

    def strict_and_closed(pair: np.ndarray) -> tuple[float, float]:
        labels = pair[labels01]
        inputs = dict(on_device, label=jnp.asarray(labels, jnp.int32))
        x = materialise(data, inputs, jax.random.key(0))
        logits, _ = forward_batch(restored.model, restored.state, x, inputs["label"], key=None,
                                  inference=True, query_only=True)
        q = np.asarray(logits)[:, -1]
        strict = float((q.argmax(-1) == labels[:, -1]).mean())
        closed = float((q[:, pair].argmax(-1) == labels01[:, -1]).mean())
        return strict, closed

    for text in args.pairs:
        pair = np.array([int(v) for v in text.split(",")])
        s, c = strict_and_closed(pair)
        print(f"labels {pair[0]:>5},{pair[1]:<5}  strict {s:.3f}  closed {c:.3f}")

    if args.blocks:
        images = np.asarray(gen.dataset.images)
        rare = np.asarray(gen.split.rare)
        first_images = gen.dataset.class_images[rare[::8]]  # each block's unaugmented class
        ink = 1.0 - images[first_images].mean(axis=(1, 2, 3))
        rng = np.random.default_rng(1)
        blocks = rng.choice(len(rare) // 8, args.blocks, replace=False)
        strict = np.array([strict_and_closed(np.array([8 * b, 8 * b + 1]))[0] for b in blocks])
        print(f"block 0 (labels 0-7): ink {ink[0]:.3f}, above {np.mean(ink < ink[0]):.0%} "
              f"of blocks (mean {ink.mean():.3f})")
        for b, s in sorted(zip(blocks, strict), key=lambda t: ink[t[0]]):
            print(f"labels {8 * b:>5},{8 * b + 1:<5}  ink {ink[b]:.3f}  strict {s:.3f}")
        print(f"correlation of strict ICL with ink over {args.blocks} blocks: "
              f"{np.corrcoef(strict, ink[blocks])[0, 1]:.2f}")


if __name__ == "__main__":
    main()
