"""Time building the Omniglot cache from local zips and loading it.

    .venv/bin/python benchmarks/bench_data.py [--source ../shared/data/omniglot]

Prints one line per measurement. "cold" = first load in a fresh process
(imports already done, file possibly in the OS page cache); "warm" = best of
3 further loads in the same process. Numbers depend on the machine and on
what else runs on it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "omniglot"

_LOAD = """
import sys, time
from pathlib import Path
from eicl_cli import config
from eicl_cli.data.dataset import load_dataset
cfg = config.from_dict({"data": {"dataset": "omniglot"}, "preproc": {"downsample": %s},
                        "classes": {"n_rare": 10, "n_common": 10, "n_holdout": 10}})
times = []
for _ in range(4):
    t = time.perf_counter()
    ds = load_dataset(cfg, Path(sys.argv[1]))
    times.append(time.perf_counter() - t)
print(times[0], min(times[1:]), ds.images.shape)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    args = ap.parse_args()
    if not (args.source / "images_background.zip").is_file():
        sys.exit(f"no Omniglot zips in {args.source}")
    from eicl_cli.prepare import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = prepare_data(str(args.source), Path(tmp))
        build = time.perf_counter() - t
        print(f"build cache from zips: {build:.2f} s ({r.n_images:,} images, "
              f"{r.bytes / 2**20:.1f} MiB)")
        t = time.perf_counter()
        prepare_data(str(args.source), Path(tmp))
        print(f"re-run, up to date (checksums only): {time.perf_counter() - t:.2f} s")
        for downsample in (False, True):
            out = subprocess.run([sys.executable, "-c", _LOAD % downsample, tmp],
                                 capture_output=True, text=True, check=True).stdout.split()
            label = "load 28x28 (downsampled)" if downsample else "load 105x105"
            print(f"{label}: cold {float(out[0]):.2f} s, warm {float(out[1]):.2f} s, "
                  f"images {' '.join(out[2:])}")


if __name__ == "__main__":
    main()
