"""Where a config's training step spends its time: the ops of a short
`eicl bench` window under jax.profiler, summed by name (host and device
events alike), largest first.

    python benchmarks/profile_step.py configs/quickstart.toml [--steps 50] [--set k=v ...]

Needs only JAX's own profiler (its Perfetto trace); no TensorBoard plugin.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import tempfile
from pathlib import Path

import jax

from eicl_cli import bench
from eicl_cli import config as config_mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    cfg = config_mod.load(args.config, args.overrides)
    # Compile outside the trace, so the table is the steady state.
    bench.bench_config(cfg, steps=3, generator_seconds=0.1, eval_sequences=8)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            bench.bench_config(cfg, steps=args.steps, generator_seconds=0.1, eval_sequences=8)
        trace = next(Path(tmp).rglob("*.json.gz"))
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith("$"):  # skip Python frames
            total[e["name"]] += e.get("dur", 0)
            count[e["name"]] += 1
    print(f"{args.config.name}: {args.steps} timed steps on {bench.device_description()}")
    print(f"{'ms/step':>9}  {'calls':>6}  op")
    for name, us in total.most_common(args.top):
        print(f"{us / 1000 / args.steps:9.3f}  {count[name]:6d}  {name[:120]}")


if __name__ == "__main__":
    main()
