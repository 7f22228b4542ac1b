"""Where a config's training step spends its time: the ops of a few training
steps (run as `eicl bench` runs them) under jax.profiler, summed by name
(host and device events alike), largest first.

    python benchmarks/profile_step.py configs/quickstart.toml [--steps 50] [--set k=v ...]
    python benchmarks/profile_step.py configs/images_all_exemplars.toml --model-only --steps 3
    python benchmarks/profile_step.py configs/images_all_exemplars.toml --model-only --stack 2

`--model-only` profiles the model's forward and backward pass alone (random
images, no optimizer, no data pipeline). Use it for the paper config: on the
CPU its bench window shows only the whole step, not the XLA ops inside it.
Each op name is also summed with its numeric suffix dropped (`fusion kind`),
which is where the families of copies and passes show up.

Needs only JAX's own profiler (its Perfetto trace); no TensorBoard plugin.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eicl_cli import bench
from eicl_cli import config as config_mod
from eicl_cli.hugepages import reexec_with_huge_pages
from eicl_cli.metrics import loss_fn
from eicl_cli.model import default_image_shape, forward_batch


def _traced(run: Callable[[], None]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            run()
        events = json.load(gzip.open(next(Path(tmp).rglob("*.json.gz"))))
    return events["traceEvents"] if isinstance(events, dict) else events


def _model_only(cfg: config_mod.Config, steps: int, stack: int = 1) -> Callable[[], None]:
    """A jitted forward + backward of the config's model on random binary
    images and labels of the training batch's shape, compiled and run once.
    `stack` K > 1: K model replicas under vmap, each on its own batch, as
    `eicl sweep --stack K` runs them."""
    from eicl_cli.training.step import build_model_shared  # one pytree structure for all replicas
    from eicl_cli.training.trainer import stack_trees
    image_shape = default_image_shape(cfg)
    built = [build_model_shared(cfg, jax.random.key(i), image_shape) for i in range(stack)]
    model, state = built[0] if stack == 1 else (stack_trees([m for m, _ in built]),
                                                stack_trees([s for _, s in built]))
    rng = np.random.default_rng(0)
    b, length = cfg.train.batch_size, cfg.sequences.seq_len
    lead = (b, length) if stack == 1 else (stack, b, length)
    examples = jnp.asarray((rng.random((*lead, *image_shape)) > 0.7).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, built[0][0].num_classes, lead).astype(np.int32))

    def one(m, st, examples, labels):
        # The data are arguments, not closed-over constants: XLA would
        # otherwise fold everything computed from the images at compile time.
        def loss(m):
            logits, new_state = forward_batch(m, st, examples, labels, key=None,
                                              inference=False, query_only=True)
            return loss_fn(logits, labels), new_state
        return eqx.filter_value_and_grad(loss, has_aux=True)(m)

    step = eqx.filter_jit(one if stack == 1 else eqx.filter_vmap(one))

    def run(n: int) -> None:
        nonlocal state
        for _ in range(n):
            (_, state), grads = step(model, state, examples, labels)
        jax.block_until_ready(grads)

    run(1)  # compile outside the trace
    return lambda: run(steps)


def main() -> None:
    reexec_with_huge_pages()  # the step's buffers as `eicl` has them
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--stack", type=int, default=1,
                        help="with --model-only: K replicas under vmap, as sweep --stack K")
    args = parser.parse_args()
    if args.stack < 1 or (args.stack > 1 and not args.model_only):
        parser.error(f"--stack {args.stack}: a count of at least 1, and only with --model-only")
    cfg = config_mod.load(args.config, args.overrides)
    if args.model_only:
        run = _model_only(cfg, args.steps, args.stack)
    else:
        # Data, model and compilation outside the trace, so the table holds
        # the timed steps alone (a GPU tracer records every kernel it sees).
        from eicl_cli.data.dataset import load_dataset
        from eicl_cli.inputs import device_data
        from eicl_cli.training.loop import run_steps
        dataset = load_dataset(cfg)
        trainer = bench.bench_trainer(cfg, dataset, device_data(dataset, cfg))
        run_steps(trainer, 0, 2)
        jax.block_until_ready(trainer.carry.leaves)

        def run() -> None:
            run_steps(trainer, 2, 2 + args.steps)
            jax.block_until_ready(trainer.carry.leaves)
    events = _traced(run)
    processes = {e["pid"]: e.get("args", {}).get("name", "")
                 for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    by_process: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith("$"):  # skip Python frames
            total[e["name"]] += e.get("dur", 0)
            count[e["name"]] += 1
            by_process[processes.get(e.get("pid"), "?")] += e.get("dur", 0)
    kinds: collections.Counter[str] = collections.Counter()
    for name, us in total.items():
        kinds[re.sub(r"\.\d+$", "", name)] += us
    what = "model forward + backward passes" if args.model_only else "timed steps"
    print(f"{args.config.name}: {args.steps} {what} on {bench.device_description()}")
    # On a GPU the device's kernels are a process of their own: their sum
    # against the step's wall time says whether the device or the host waits.
    print(f"{'ms/step':>9}  events summed per trace process")
    for name, us in by_process.most_common():
        print(f"{us / 1000 / args.steps:9.3f}  {name[:120]}")
    print(f"\n{'ms/step':>9}  {'calls':>6}  op")
    for name, us in total.most_common(args.top):
        print(f"{us / 1000 / args.steps:9.3f}  {count[name]:6d}  {name[:120]}")
    print(f"\n{'ms/step':>9}  fusion kind (numeric suffix dropped)")
    for name, us in kinds.most_common(args.top // 2):
        print(f"{us / 1000 / args.steps:9.3f}  {name[:120]}")


if __name__ == "__main__":
    main()
