"""Modelled H100 step times of GPU programs that gpu_program.py saved, from
a model fitted to the H100 step times measured so far.

Each kernel of a step takes the longest of: a fixed launch time, its bytes
at an effective memory bandwidth, and its FLOPs at an effective rate
("max"); or the launch time plus the longer of the other two ("sum").
Matmuls and convolutions count at one rate, fitted; the stem's Pallas
kernels, whose products run on tensor cores and which no measurement covers
yet, at an assumed rate (--tensor-core-tflops). Both forms and every
(launch, bandwidth, rate) of a grid are tried against the measured steps;
the figures shown are the best fit's and, as ranges, those of every fit
within 25% of its error. Leaving each measurement out of the fit in turn
and predicting it shows how far the model can be trusted on a program it
has not seen. The rate is float32's: for a bfloat16 program the model is
pessimistic about matmuls and convolutions.

    python -m benchmarks.gpu.time_model [--calibration FILE] [--pairs] [--breakdown]
        [--tensor-core-tflops R] [PROGRAM.json ...]

PROGRAM.json: `gpu_program.py --save` files (with their kernel lists),
each shown with its ratio to the first, or with --pairs, given two by two
(one run, then the same stacked), the second of each pair to the first.
The calibration file lists saved programs with the step times measured for
them; see docs/results/gpu/time_model/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION = Path(__file__).resolve().parents[2] / "docs/results/gpu/time_model/calibration.json"
FORMS = ("max", "sum")
LAUNCH_US = np.arange(0.5, 10.01, 0.25)
BANDWIDTH_TBS = np.arange(1.0, 3.351, 0.05)
RATE_TFLOPS = np.array([5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 60, 100, 200, 1e6])
NEAR = 1.25  # fits within this factor of the best error make the ranges


@dataclass(frozen=True)
class Program:
    """A step's kernels as arrays: launches per step, bytes and FLOPs per
    launch, and whether the FLOPs are the stem's Pallas kernels'."""

    label: str
    launches: np.ndarray
    bytes: np.ndarray
    flops: np.ndarray
    pallas: np.ndarray
    kinds: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> "Program":
        saved = json.loads(path.read_text())
        rows = saved.get("kernels")
        if not rows:
            raise ValueError(f"{path}: no kernel list (save it with this checkout's "
                             f"gpu_program.py --save)")
        kind, n, b, f = zip(*rows)
        return cls(saved.get("label", path.stem), np.array(n, float), np.array(b, float),
                   np.array(f, float), np.array(["triton" in k for k in kind]), kind)


def kernel_seconds(p: Program, form: str, launch_s, bandwidth, rate, pallas_rate
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each kernel's modelled seconds per launch, and those of its bytes and
    of its FLOPs alone."""
    by_bytes = p.bytes / bandwidth
    by_flops = np.where(p.pallas, p.flops / pallas_rate, p.flops / rate)
    work = np.maximum(by_bytes, by_flops)
    each = np.maximum(launch_s, work) if form == "max" else launch_s + work
    return each, by_bytes, by_flops


def step_seconds(p: Program, form: str, launch_s, bandwidth, rate, pallas_rate) -> np.ndarray:
    """Modelled seconds per step; launch_s, bandwidth and rate may be arrays
    of one shape (a grid), broadcast against the kernels."""
    launch_s, bandwidth, rate = (np.asarray(a, float)[..., None]
                                 for a in (launch_s, bandwidth, rate))
    return (kernel_seconds(p, form, launch_s, bandwidth, rate, pallas_rate)[0]
            * p.launches).sum(-1)


def breakdown(p: Program, fit: "Fit", pallas_rate: float) -> dict[str, float]:
    """The fit's seconds per step by what bounds each kernel (its launch,
    bytes or FLOPs) and its kind (fusion, cuBLAS, cuDNN, Pallas)."""
    launch = fit.launch_us * 1e-6
    each, by_bytes, by_flops = kernel_seconds(p, fit.form, launch, fit.bandwidth_tbs * 1e12,
                                              fit.rate_tflops * 1e12, pallas_rate)
    bound = np.where(np.maximum(by_bytes, by_flops) <= launch, "launch",
                     np.where(by_bytes >= by_flops, "bytes", "FLOPs"))
    out: dict[str, float] = {}
    for kind, b, t in zip(p.kinds, bound, each * p.launches):
        key = f"{'Pallas' if 'triton' in kind else kind.split(':')[0]}, {b}"
        out[key] = out.get(key, 0.0) + float(t)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True)
class Fit:
    form: str
    launch_us: float
    bandwidth_tbs: float
    rate_tflops: float
    error: float  # root mean square of log(modelled / measured)

    def seconds(self, p: Program, pallas_rate: float) -> float:
        return float(step_seconds(p, self.form, self.launch_us * 1e-6, self.bandwidth_tbs * 1e12,
                                  self.rate_tflops * 1e12, pallas_rate))


def fits(programs: list[Program], measured_s: list[float], pallas_rate: float) -> list[Fit]:
    """Every grid point of both forms with its error, best first."""
    a, b, r = np.meshgrid(LAUNCH_US, BANDWIDTH_TBS, RATE_TFLOPS, indexing="ij")
    out = []
    for form in FORMS:
        logs = np.stack([np.log(step_seconds(p, form, a * 1e-6, b * 1e12, r * 1e12,
                                             pallas_rate) / m)
                         for p, m in zip(programs, measured_s)])
        error = np.sqrt((logs ** 2).mean(0))
        out += [Fit(form, float(x), float(y), float(z), float(e))
                for x, y, z, e in zip(a.ravel(), b.ravel(), r.ravel(), error.ravel())]
    return sorted(out, key=lambda f: f.error)


def load_calibration(path: Path) -> tuple[str, list[Program], list[float], list[str]]:
    spec = json.loads(path.read_text())
    entries = spec["measured"]
    programs = [Program.load(path.parent / e["program"]) for e in entries]
    return spec["device"], programs, [e["step_ms"] / 1e3 for e in entries], \
        [e["program"] for e in entries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("programs", nargs="*", type=Path)
    parser.add_argument("--calibration", type=Path, default=CALIBRATION)
    parser.add_argument("--pairs", action="store_true",
                        help="programs two by two (one run, then stacked): each second one's "
                             "ratio to the first of its pair")
    parser.add_argument("--breakdown", action="store_true",
                        help="each program's best-fit time by kernel kind and what bounds it")
    parser.add_argument("--tensor-core-tflops", type=float, default=200.0,
                        help="assumed rate of the stem's Pallas kernels' products (default 200)")
    args = parser.parse_args()
    pallas_rate = args.tensor_core_tflops * 1e12
    if args.pairs and len(args.programs) % 2:
        parser.error(f"--pairs takes programs two by two; got {len(args.programs)}")
    try:
        device, calib, measured, names = load_calibration(args.calibration)
        targets = [Program.load(p) for p in args.programs]
    except (OSError, ValueError, KeyError) as e:
        parser.error(str(e))

    ranked = fits(calib, measured, pallas_rate)
    best = ranked[0]
    near = [f for f in ranked if f.error <= NEAR * best.error]
    print(f"{device}: {len(calib)} measured steps; best fit ({best.form}): launch "
          f"{best.launch_us:g} us, {best.bandwidth_tbs:.2f} TB/s, {best.rate_tflops:g} TFLOPS, "
          f"error {best.error:.1%} (rms of log)")
    print(f"{len(near)} fits within {NEAR:g}x of that error: launch "
          f"{min(f.launch_us for f in near):g}-{max(f.launch_us for f in near):g} us, "
          f"{min(f.bandwidth_tbs for f in near):.2f}-"
          f"{max(f.bandwidth_tbs for f in near):.2f} TB/s, "
          f"{min(f.rate_tflops for f in near):g}-{max(f.rate_tflops for f in near):g} TFLOPS")
    print(f"\n{'measured':>9} {'best fit':>9} {'left out':>9}  program (ms per step)")
    for i, (p, m, name) in enumerate(zip(calib, measured, names)):
        rest = [q for j, q in enumerate(calib) if j != i]
        left_out = fits(rest, [x for j, x in enumerate(measured) if j != i], pallas_rate)[0]
        print(f"{m * 1e3:9.2f} {best.seconds(p, pallas_rate) * 1e3:9.2f} "
              f"{left_out.seconds(p, pallas_rate) * 1e3:9.2f}  {name}")
    if not targets:
        return
    base = "the one before it" if args.pairs else "the first"
    print(f"\n{'best fit':>9} {'range':>13} {'ratio':>13}  program (ms per step; ratio to {base})")
    # Each program's time under every near fit, once: the ratios divide them.
    times = [np.array([f.seconds(p, pallas_rate) for f in near]) for p in targets]
    for i, p in enumerate(targets):
        ratio = times[i] / times[i - i % 2 if args.pairs else 0]
        print(f"{best.seconds(p, pallas_rate) * 1e3:9.2f} {times[i].min() * 1e3:6.2f}-"
              f"{times[i].max() * 1e3:<6.2f} {ratio.min():6.2f}-{ratio.max():<6.2f}  {p.label}")
        if args.breakdown:
            parts = breakdown(p, best, pallas_rate)
            print(" " * 39 + "; ".join(f"{k} {v * 1e3:.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    sys.exit(main())
