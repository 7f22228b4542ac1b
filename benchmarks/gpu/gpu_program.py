"""What a config's training step is on an NVIDIA GPU, without a GPU.

XLA compiles the step (as `eicl bench` runs it) ahead of time for an H100 or
H200 target, deviceless, and this script lists what one step launches: the
kernels (fusions, cuBLAS and cuDNN calls, copies), with the layer loop's
body counted once per layer, grouped by kind and by the source that made
them (the innermost eicl_cli file and function, or optax), with the bytes
each one reads and writes, and the FLOPs of its matmuls, convolutions and
the stem's Pallas kernels. A change to the model or the step can be checked
here for what it does to the GPU program before a GPU is lent.
`--save FILE` keeps the per-step totals, sources and kernels as JSON and
`--against FILE` prints what moved since: run the old code with --save and
the new with --against, each from its own checkout. `--from-hlo FILE` reads
a step that another checkout's script wrote with `--hlo` (its own package
compiled it) and counts it with this one's rules. benchmarks.gpu.time_model
turns saved programs into modelled H100 step times.

    python -m benchmarks.gpu.gpu_program configs/images_all_exemplars.toml [--set k=v ...]
        [--stack K] [--target h100|h200] [--top N] [--hlo FILE]
        [--save FILE] [--against FILE] [--from-hlo FILE [--per-call N]]

Needs a JAX with its CUDA plugin, of the JAX version eicl runs on (a second
virtual environment will do): pip install "jax[cuda12]==$(python -c 'import
jax; print(jax.__version__)')" plus eicl's dependencies. No GPU, no driver.
Triton's GEMM fusions are turned off (their deviceless tiling check fails on
this model), so every dot is a cuBLAS call here; a real compilation may
fuse some of them. Bytes are each kernel's operands and results (a slice
read from a larger operand counts what it reads); a kernel that reads part
of an operand some other way is over-counted. Figures are per step.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Device facts of the targets (NVIDIA's published figures); XLA's fusion and
# tiling decisions read them in place of a device query.
_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""
TARGETS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", bandwidth=3_352_320_000_000,
                 memory=84_929_347_584),
    "h200": dict(name="NVIDIA H200", bandwidth=4_800_000_000_000, memory=150_754_820_096),
}

_SIZES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_SIZES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
# Work a kernel launch does not stand for: bookkeeping of the program itself.
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
         "opt-barrier", "partition-id", "replica-id", "async-done", "async-update"}
# Scratch buffers cuBLAS and cuDNN calls return beside their result.
_SCRATCH = re.compile(r"s8\[\d+\]\{0\}|u8\[\d+\]\{0\}")


def nbytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's summed)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _SIZES[dtype]
    return total


def dims(shape_text: str) -> list[int]:
    """The dimensions of the first array in an HLO shape."""
    m = _ARRAY.search(shape_text)
    return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


def _stem_kernel_flops(i: "Instr", operands: list[list[int]], result: list[int]) -> int:
    """The stem's Pallas kernels (eicl_cli/model/kernels/stem_fused.py), by their
    operands: images, weights (taps, C), then forward nothing more (result:
    the pooled map, rows x C per image), backward the choices (rows x C per
    image), the gradient and, in training, the moments' gradients."""
    from eicl_cli.model.kernels import stem_fused
    op = i.attr(r'op_name="([^"]+)"') or ""
    name = next((n for n in ("stem_forward", "stem_backward") if f"/{n}/" in op), None)
    if name is None or len(operands) < 3:
        return 0
    taps, channels = operands[1][-2:]
    rows = math.prod((result if name == "stem_forward" else operands[2])[:-1])
    return stem_fused.kernel_flops(name, rows, taps, channels, moments=len(operands) > 4)


@dataclass
class Instr:
    name: str
    shape: str
    op: str
    rest: str  # operands and attributes

    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.rest.split("), ")[0])

    def attr(self, pattern: str) -> str | None:
        m = re.search(pattern, self.rest)
        return m.group(1) if m else None


@dataclass
class Kernel:
    name: str
    kind: str  # "fusion:kLoop", "cublas", "cudnn:convForward", "copy", ...
    launches: int  # per step: 1, or a loop's trip count
    bytes: int  # read + written by one launch
    shape: str
    op_name: str
    source: str  # innermost eicl_cli file:function (or "optax"), else "?"
    flops: int = 0  # of one launch: cuBLAS and cuDNN calls and the stem's Pallas kernels

    @property
    def backward(self) -> bool:
        return "transpose(" in self.op_name

    @property
    def where(self) -> str:
        """Its source and pass: what the source tables group by."""
        return f"{self.source} {'backward' if self.backward else 'forward'}"


class Program:
    """An optimized HLO module's text: computations, and the source table."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instr]] = {}
        self.entry = ""
        tables: dict[str, list[str]] = collections.defaultdict(list)
        table = current = None
        for line in text.splitlines():
            if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                table, current = line, None
                continue
            m = _HEADER.match(line)
            if m:
                table, current = None, m.group(2)
                self.computations[current] = []
                if m.group(1):
                    self.entry = current
                continue
            if line.startswith("}"):
                current = None
            elif current is not None:
                m = _INSTR.match(line)
                if m:
                    self.computations[current].append(Instr(*m.groups()))
            elif table and line.strip():
                tables[table].append(line.strip())
        self._files = {int(k): v.strip('"') for k, v in
                       (t.split(" ", 1) for t in tables["FileNames"])}
        self._functions = {int(k): v.strip('"') for k, v in
                           (t.split(" ", 1) for t in tables["FunctionNames"])}
        self._locations = {int(t.split(" ", 1)[0]): (int(re.search(r"file_name_id=(\d+)", t)[1]),
                                                     int(re.search(r"function_name_id=(\d+)", t)[1]))
                           for t in tables["FileLocations"]}
        self._frames = {int(t.split(" ", 1)[0]): (int(re.search(r"file_location_id=(\d+)", t)[1]),
                                                  int(re.search(r"parent_frame_id=(\d+)", t)[1]))
                        for t in tables["StackFrames"]}

    def source(self, frame: int | None) -> str:
        """Where an op was written: the innermost eicl_cli frame of its stack,
        model/layers.py (shared by the ResNet and the transformer) only where
        no other eicl_cli frame is recorded, else the optimizer's update
        (optax, eqx.apply_updates), else "?". (Recorded stacks are short.)"""
        chain, seen = [], set()
        while frame and frame in self._frames and frame not in seen:
            seen.add(frame)
            location, parent = self._frames[frame]
            file_id, function_id = self._locations.get(location, (0, 0))
            chain.append((self._files.get(file_id, ""), self._functions.get(function_id, "?")))
            frame = parent if parent != frame else None  # a root frame names itself
        ours = [(p.split("eicl_cli/", 1)[1], f) for p, f in chain if "eicl_cli/" in p]
        for module, function in ours:
            if module != "model/layers.py":
                return f"{module}:{function}"
        if ours:
            return f"{ours[0][0]}:{ours[0][1]}"
        if any("/optax/" in p or p.endswith("equinox/_update.py") for p, _ in chain):
            return "optimizer update (optax, eqx.apply_updates)"
        return "?"

    def kernels(self) -> list[Kernel]:
        """Every kernel one execution launches, loops counted by trip count."""
        out: list[Kernel] = []
        self._walk(self.entry, 1, out)
        return out

    def _walk(self, computation: str, times: int, out: list[Kernel]) -> None:
        table = {i.name: i for i in self.computations[computation]}
        for i in self.computations[computation]:
            if i.op in _FREE:
                continue
            if i.op == "while":
                n = int(i.attr(r'known_trip_count":\{"n":"(\d+)"') or 1)
                self._walk(i.attr(r"body=%([\w.\-]+)"), times * n, out)
                self._walk(i.attr(r"condition=%([\w.\-]+)"), times * n, out)
                continue
            if i.op in ("call", "conditional", "async-start"):
                for called in re.findall(r"(?:to_apply|calls|computations)=\{?%([\w.\-]+)", i.rest):
                    self._walk(called, times, out)
                continue
            kind = i.op
            if i.op == "fusion":
                kind = "fusion:" + (i.attr(r"kind=(\w+)") or "?")
            elif i.op == "custom-call":
                target = i.attr(r'custom_call_target="([^"]+)"') or "?"
                kind = ("cublas" if "cublas" in target else
                        "cudnn:" + target.split("$")[-1] if "cudnn" in target else target)
            frame = i.attr(r"stack_frame_id=(\d+)")
            out.append(Kernel(i.name, kind, times, self._bytes(i, table), i.shape,
                              i.attr(r'op_name="([^"]+)"') or "",
                              self.source(int(frame) if frame else None),
                              self._flops(i, table, kind)))

    def _flops(self, i: Instr, table: dict[str, Instr], kind: str) -> int:
        """Multiply-adds x 2 of a matmul, convolution or stem kernel; 0 for
        the rest (elementwise work is small beside their bytes)."""
        if not (kind == "cublas" or kind.startswith("cudnn:conv") or "triton" in kind):
            return 0
        operands = [dims(table[name].shape) for name in i.operands() if name in table]
        result = dims(_SCRATCH.sub("", i.shape))
        if kind == "cublas":
            contracting = i.attr(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
            if contracting is None or not operands:
                return 0
            k = math.prod(operands[0][int(d)] for d in re.findall(r'"(\d+)"', contracting))
            return 2 * math.prod(result) * k
        if kind.startswith("cudnn:conv"):
            # 2 x (output positions) x (filter size), whichever of input,
            # filter and output the call computes; dim_labels name the
            # output's feature axis.
            labels = i.attr(r"dim_labels=([\w]+_[\w]+->[\w]+)")
            role = kind.split(":", 1)[1]
            if labels is None or len(operands) < 2:
                return 0
            if role == "convBackwardInput":
                out, kernel = operands[0], operands[1]
            elif role == "convBackwardFilter":
                out, kernel = operands[1], result
            else:  # convForward, convBiasActivationForward
                out, kernel = result, operands[1]
            feature = labels.split("->")[1].index("f")
            return 2 * math.prod(out) // out[feature] * math.prod(kernel)
        return _stem_kernel_flops(i, operands, result)

    def _bytes(self, i: Instr, table: dict[str, Instr]) -> int:
        written = nbytes(_SCRATCH.sub("", i.shape))
        if i.op == "fusion" and "dynamic-update-slice" in self._fused_ops(i):
            # Updated in place: a loop writes one slice of its stacked buffer.
            return 2 * sum(nbytes(o.shape) for o in self._fused_updates(i))
        read = 0
        narrowed = self._narrowed_reads(i) if i.op == "fusion" else {}
        for k, name in enumerate(i.operands()):
            if name in table:
                read += narrowed.get(k, nbytes(table[name].shape))
        return read + written

    def _fused(self, i: Instr) -> list[Instr]:
        called = i.attr(r"calls=%([\w.\-]+)")
        return self.computations.get(called, []) if called else []

    def _fused_ops(self, i: Instr) -> set[str]:
        return {f.op for f in self._fused(i)}

    def _fused_updates(self, i: Instr) -> list[Instr]:
        body = {f.name: f for f in self._fused(i)}
        return [body[f.operands()[1]] for f in body.values()
                if f.op == "dynamic-update-slice" and len(f.operands()) > 1
                and f.operands()[1] in body]

    def _narrowed_reads(self, i: Instr) -> dict[int, int]:
        """Operand index -> bytes read, for fused parameters that are only
        sliced or gathered from (the slices' sizes, not the operand's)."""
        body = self._fused(i)
        users: dict[str, list[Instr]] = collections.defaultdict(list)
        for f in body:
            for name in f.operands():
                users[name].append(f)
        out = {}
        for f in body:
            if f.op != "parameter":
                continue
            uses = users.get(f.name, [])
            if uses and all(u.op in ("slice", "dynamic-slice", "gather") and
                            u.operands()[0] == f.name for u in uses):
                out[int(f.rest.split(")")[0])] = sum(nbytes(u.shape) for u in uses)
        return out


def _grouped(kernels: list[Kernel], key, steps: int) -> dict[str, list[float]]:
    """[launches, bytes] per step of the kernels, by key(kernel)."""
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for k in kernels:
        g = groups[key(k)]
        g[0] += k.launches / steps
        g[1] += k.launches * k.bytes / steps
    return dict(groups)


def report(kernels: list[Kernel], bandwidth: float, top: int, steps: int = 1) -> str:
    """Launches and bytes per training step of a program that runs `steps`."""
    launches = sum(k.launches for k in kernels) / steps
    total = sum(k.launches * k.bytes for k in kernels) / steps
    flops = sum(k.launches * k.flops for k in kernels) / steps
    lines = [f"{launches:.5g} kernel launches per step ({len(kernels)} distinct), "
             f"{total / 1e9:.2f} GB read + written: {total / bandwidth * 1e3:.2f} ms at "
             f"{bandwidth / 1e12:.2f} TB/s if every kernel ran at full memory speed; "
             f"{flops / 1e9:.1f} GFLOP in matmuls, convolutions and the stem's kernels"]

    def table(title: str, key) -> None:
        groups = _grouped(kernels, key, steps)
        lines.append(f"\n{'launches':>9} {'MB':>9}  {title}")
        for name, (n, b) in sorted(groups.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]:
            lines.append(f"{n:9.5g} {b / 1e6:9.1f}  {name}")

    table("kind", lambda k: k.kind)
    table("source (forward / backward)", lambda k: k.where)
    lines.append(f"\n{'MB':>9} {'x':>5}  largest kernels: kind, result shape, op")
    for k in sorted(kernels, key=lambda k: -k.launches * k.bytes)[:top]:
        lines.append(f"{k.launches * k.bytes / steps / 1e6:9.1f} {k.launches / steps:5.3g}  "
                     f"{k.kind}  "
                     f"{k.shape[:60]}  {k.op_name[-70:]}")
    return "\n".join(lines)


def summary(kernels: list[Kernel], steps: int = 1) -> dict:
    """Launches and bytes per step, in all and by source (as report()
    groups them) and the kernel list: what --save writes, and --against and
    time_model.py read."""
    # Kernels alike in kind, bytes and FLOPs as one row [kind, launches per
    # step, bytes, flops]: what benchmarks/gpu/time_model.py times.
    alike: dict[tuple, float] = collections.defaultdict(float)
    for k in kernels:
        alike[(k.kind, k.bytes, k.flops)] += k.launches / steps
    return {"launches": sum(k.launches for k in kernels) / steps,
            "bytes": sum(k.launches * k.bytes for k in kernels) / steps,
            "flops": sum(k.launches * k.flops for k in kernels) / steps,
            "by_source": _grouped(kernels, lambda k: k.where, steps),
            "kernels": sorted([kind, n, b, f] for (kind, b, f), n in alike.items())}


def compare(before: dict, after: dict, top: int) -> str:
    """The change from one summary to another: totals, then the sources whose
    bytes or launches moved most."""
    lines = [f"against {before.get('label', 'the saved program')}: "
             f"{before['launches']:.5g} -> {after['launches']:.5g} launches per step, "
             f"{before['bytes'] / 1e9:.2f} -> {after['bytes'] / 1e9:.2f} GB",
             f"\n{'launches':>9} {'MB':>9}  change by source (before -> after)"]
    names = set(before["by_source"]) | set(after["by_source"])
    rows = []
    for name in names:
        (n0, b0), (n1, b1) = (s["by_source"].get(name, (0.0, 0.0)) for s in (before, after))
        if abs(n1 - n0) >= 0.5 or abs(b1 - b0) >= 0.5e6:
            rows.append((n1 - n0, b1 - b0, name, b0, b1))
    rows.sort(key=lambda r: (-abs(r[1]), -abs(r[0]), r[2]))
    for dn, db, name, b0, b1 in rows[:top]:
        lines.append(f"{dn:+9.4g} {db / 1e6:+9.1f}  {name} ({b0 / 1e6:.1f} -> {b1 / 1e6:.1f} MB)")
    if not rows:
        lines.append("(no source moved by half a launch or 0.5 MB)")
    return "\n".join(lines)


def compile_step(config: Path, overrides: list[str], stack: int, target: str) -> tuple[str, int]:
    """The optimized HLO text of the config's training step (one device call:
    train.steps_per_call steps) for the target GPU, and its steps per call."""
    import jax
    from jax.experimental import topologies

    from eicl_cli import bench
    from eicl_cli.data.dataset import load_dataset
    from eicl_cli.training.flat_step import steps_per_call
    from eicl_cli.inputs import device_data

    topology = topologies.get_topology_desc(
        platform="cuda", target_config=_TARGET.format(**TARGETS[target]), topology="1x1x1")
    mesh = topologies.make_mesh(topology, (1,), ("x",))
    on_gpu = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    cfg = bench.load_for_bench(config, overrides)
    dataset = load_dataset(cfg)
    runner = bench.bench_trainer(cfg, dataset, device_data(dataset, cfg), stack)
    k = steps_per_call(cfg.train.steps_per_call, "gpu")  # as a run on the GPU would
    fn, args = runner.first_call(k)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_gpu)
        if hasattr(x, "dtype") else x, args)
    return fn.lower(*abstract).compile().as_text(), k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--stack", type=int, default=1)
    parser.add_argument("--target", choices=sorted(TARGETS), default="h100")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo", type=Path, help="also write the optimized HLO text here")
    parser.add_argument("--from-hlo", type=Path,
                        help="read a step's optimized HLO text (another checkout's --hlo) "
                             "instead of compiling CONFIG, which then only labels it")
    parser.add_argument("--per-call", type=int, default=10,
                        help="with --from-hlo: the training steps in its call (default 10, "
                             "a GPU's train.steps_per_call = 0)")
    parser.add_argument("--save", type=Path,
                        help="write the per-step totals, sources and kernel list here "
                             "(JSON, for --against and benchmarks.gpu.time_model)")
    parser.add_argument("--against", type=Path,
                        help="compare with a program --save wrote (another version of "
                             "the code, or other --set values)")
    args = parser.parse_args()
    before = None
    if args.against:
        try:
            before = json.loads(args.against.read_text())
            before["launches"], before["bytes"], before["by_source"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--against {args.against}: not a summary --save wrote ({e})")
    # Compile for CUDA while computing (data, initial state) on the CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_gpu_enable_triton_gemm=false").strip()
    # This checkout's package, whatever else the environment has installed:
    # --save and --against compare two checkouts' steps.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    started = time.perf_counter()
    if args.from_hlo:
        try:
            text, per_call = args.from_hlo.read_text(), args.per_call
        except OSError as e:
            parser.error(f"--from-hlo {args.from_hlo}: {e.strerror}")
        print(f"{args.from_hlo.name}: {args.config.name} {' '.join(args.overrides)} "
              f"stack {args.stack}, {per_call} steps per call")
    else:
        text, per_call = compile_step(args.config, args.overrides, args.stack, args.target)
        print(f"{args.config.name} {' '.join(args.overrides)} stack {args.stack}, compiled "
              f"for {TARGETS[args.target]['name']} in {time.perf_counter() - started:.0f} s")
    if args.hlo:
        args.hlo.write_text(text)
    kernels = Program(text).kernels()
    print(report(kernels, TARGETS[args.target]["bandwidth"], args.top, per_call))
    mine = summary(kernels, per_call)
    mine["label"] = (f"{args.config.name} {' '.join(args.overrides)} stack {args.stack} "
                     f"({args.target})").replace("  ", " ")
    if args.save:
        part = args.save.with_name(args.save.name + ".part")
        part.write_text(json.dumps(mine, indent=1) + "\n")
        part.replace(args.save)
    if before is not None:
        print("\n" + compare(before, mine, args.top))


if __name__ == "__main__":
    main()
