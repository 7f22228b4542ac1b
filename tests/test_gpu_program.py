"""benchmarks/gpu/gpu_program.py's reading of an optimized HLO module: kernels
through loops, bytes of sliced operands, and the source that made each one.
Checked on CPU-compiled programs (the same HLO text format as a GPU's)."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from benchmarks.gpu import gpu_program

_ROOT = Path(__file__).resolve().parents[1]
# The command line as benchmarks/gpu/README.md documents it, from the repository root.
_COMMAND = [sys.executable, "-m", "benchmarks.gpu.gpu_program"]


def _program(fn, *args) -> "gpu_program.Program":
    return gpu_program.Program(jax.jit(fn).lower(*args).compile().as_text())


def test_a_loop_body_launches_once_per_trip():
    def f(x):
        def body(c, _):
            return jnp.sin(c) * 2 + 1, None
        return jax.lax.scan(body, x, None, length=7)[0].sum()

    kernels = _program(f, jnp.ones((64, 64))).kernels()
    looped = [k for k in kernels if "while/body" in k.op_name]
    assert looped and all(k.launches == 7 for k in looped)
    assert any(k.launches == 1 for k in kernels)  # the sum after the loop
    assert sum(k.launches for k in kernels) >= 7 * len(looped) + 1


def test_a_slice_of_a_big_operand_counts_what_it_reads():
    big = jnp.ones((1000, 1000))
    kernels = _program(lambda x: jnp.sin(x[:10]) * 2, big).kernels()
    assert len(kernels) == 1
    # 10 rows read, 10 rows written: not the 4 MB operand.
    assert kernels[0].bytes == 2 * 10 * 1000 * 4


def test_bytes_of_shapes_and_tuples():
    assert gpu_program.nbytes("f32[2,3]{1,0}") == 24
    assert gpu_program.nbytes("(f32[4]{0}, s8[10]{0}, pred[3])") == 16 + 10 + 3
    assert gpu_program.nbytes("f32[]") == 4


@pytest.mark.parametrize("unroll", [1, 2])
def test_kernels_name_the_eicl_source_that_made_them(data_dir: Path, unroll: int):
    from eicl_cli.model import build_model, forward_batch
    from train_support import tiny
    cfg = tiny(data_dir, f"transformer.unroll={unroll}")
    model, state = build_model(cfg, jax.random.key(0), (28, 28))
    examples = jnp.zeros((2, cfg.sequences.seq_len, 28, 28))
    labels = jnp.zeros((2, cfg.sequences.seq_len), jnp.int32)

    def loss(m):
        logits, _ = forward_batch(m, state, examples, labels, key=None, inference=True,
                                  query_only=True)
        return logits.sum()

    import equinox as eqx
    params, static = eqx.partition(model, eqx.is_array)
    kernels = _program(lambda p: eqx.filter_grad(loss)(eqx.combine(p, static)), params).kernels()
    sources = {k.source for k in kernels}
    assert any(s.startswith("model/transformer.py:") for s in sources), sources
    assert any(k.backward for k in kernels) and any(not k.backward for k in kernels)
    layer_kernels = [k for k in kernels if "while/body" in k.op_name]
    if unroll == 1:  # tiny.toml: two layers, looped
        assert layer_kernels and all(k.launches == 2 for k in layer_kernels)
    else:
        assert not layer_kernels
    text = gpu_program.report(kernels, 1e12, top=5)
    assert text.startswith(f"{sum(k.launches for k in kernels)} kernel launches per step")


def test_a_saved_summary_compares_with_another_program():
    x = jnp.ones((256, 256))
    one = gpu_program.summary(_program(lambda x: jnp.sin(x) * 2, x).kernels())
    two = gpu_program.summary(_program(lambda x: (jnp.sin(x) @ x).sum(), x).kernels())
    # A round trip through --save's JSON keeps what --against reads.
    import json
    one = json.loads(json.dumps(one | {"label": "sin"}))
    assert one["launches"] == 1 and one["bytes"] == 2 * 256 * 256 * 4
    assert one["by_source"] and sum(b for _, b in one["by_source"].values()) == one["bytes"]
    text = gpu_program.compare(one, two, top=5)
    assert text.startswith(f"against sin: 1 -> {two['launches']:.5g} launches per step, "
                           f"0.00 -> {two['bytes'] / 1e9:.2f} GB")
    assert "change by source" in text
    assert "(no source moved" in gpu_program.compare(one, one, top=5)


def test_against_a_file_that_is_no_summary_is_one_line_and_exit_2(tmp_path: Path):
    import subprocess
    bad = tmp_path / "bad.json"
    bad.write_text('{"launches": 1}')
    done = subprocess.run([*_COMMAND, "configs/quickstart.toml", "--against",
                           str(bad)], capture_output=True, text=True,
                          cwd=_ROOT, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert f": error: --against {bad}: not a summary --save wrote" in last


_GPU_HLO = """HloModule step

ENTRY %main (x: f32[8,100,20], w: f32[8,20,64]) -> f32[8,100,64] {
  %x = f32[8,100,20]{2,1,0} parameter(0)
  %w = f32[8,20,64]{2,1,0} parameter(1)
  %img = f32[288,105,105,1]{3,2,1,0} parameter(2)
  %k = f32[7,7,1,64]{3,2,1,0} parameter(3)
  %dy = f32[288,53,53,64]{3,2,1,0} parameter(4)
  %ims = f32[2,6,105,105]{3,2,1,0} parameter(5)
  %wm = f32[2,64,64]{2,1,0} parameter(6)
  %sign = f32[2,1,64]{2,1,0} parameter(7)
  %mm = (f32[8,100,64]{2,1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
  %fwd = (f32[288,53,53,64]{3,2,1,0}, u8[0]{0}) custom-call(%img, %k), window={size=7x7 stride=2x2 pad=2_3x2_3}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"
  %dk = (f32[7,7,1,64]{3,2,1,0}, u8[0]{0}) custom-call(%img, %dy), window={size=7x7 stride=2x2 pad=2_3x2_3}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter"
  %pc = (f32[2,6,768,64]{3,2,1,0}, s8[2,6,768,64]{3,2,1,0}) custom-call(%ims, %wm, %sign), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(f)/vmap(jvp())/stem_forward/pallas_call"}
  ROOT %t = (f32[8,100,64]{2,1,0}) tuple(%mm)
}
"""


def test_flops_of_matmuls_convolutions_and_the_stem_kernels():
    from eicl_cli.model.kernels import stem_fused
    kernels = {k.name: k for k in gpu_program.Program(_GPU_HLO).kernels()}
    assert kernels["mm"].kind == "cublas" and kernels["mm"].flops == 2 * 8 * 100 * 64 * 20
    # Forward and weight gradient: 2 x output positions x filter size alike.
    stem = 2 * 288 * 53 * 53 * (7 * 7 * 1 * 64)
    assert kernels["fwd"].flops == stem and kernels["dk"].flops == stem
    assert kernels["pc"].flops == stem_fused.kernel_flops("stem_forward", 2 * 6 * 768, 64, 64,
                                                          moments=False) > 0
    saved = gpu_program.summary(list(kernels.values()))
    assert saved["flops"] == sum(k.flops for k in kernels.values())
    assert sorted(row[0] for row in saved["kernels"]) == sorted(k.kind for k in kernels.values())


def test_stem_kernel_products_are_the_dots_each_kernel_makes_per_tile():
    """stem_fused.PRODUCTS, which gpu_program counts FLOPs by, against the
    dot products in the kernels' own code (per tile: the backward kernel's
    loop body)."""
    import equinox as eqx
    from eicl_cli.model.kernels import stem_fused
    from eicl_cli.model.encoders import ResNetEncoder

    enc = ResNetEncoder((1,), (16,), jax.random.key(0), stem_impl="pallas")
    params, static = eqx.partition(enc, eqx.is_inexact_array)

    def loss(p, images):
        e = eqx.combine(p, static)
        return e(images, eqx.nn.State(e), inference=False)[0].sum()

    def inner(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from inner(sub)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params, jnp.zeros((6, 105, 105))).jaxpr
    calls = {e.params["name"]: e for e in inner(jaxpr) if e.primitive.name == "pallas_call"}
    assert set(calls) == {"stem_forward", "stem_backward"}
    for name, eqn in calls.items():
        dots = sum(e.primitive.name == "dot_general" for e in inner(eqn.params["jaxpr"]))
        key = name + ("_moments" if name == "stem_backward" and len(eqn.invars) > 4 else "")
        assert dots == stem_fused.PRODUCTS[key], name


def test_from_hlo_counts_another_programs_text(tmp_path: Path):
    import json
    import subprocess
    hlo = tmp_path / "step.hlo"
    hlo.write_text(_GPU_HLO)
    saved = tmp_path / "step.json"
    done = subprocess.run([*_COMMAND, "configs/quickstart.toml", "--from-hlo",
                           str(hlo), "--per-call", "2", "--save", str(saved)],
                          capture_output=True, text=True, cwd=_ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith("2 kernel launches per step")  # 4 over 2 steps
    summary = json.loads(saved.read_text())
    assert summary["launches"] == 2 and len(summary["kernels"]) == 4
    missing = subprocess.run([*_COMMAND, "configs/quickstart.toml",
                              "--from-hlo", str(tmp_path / "none.hlo")],
                             capture_output=True, text=True, cwd=_ROOT, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].endswith(
        f"--from-hlo {tmp_path / 'none.hlo'}: No such file or directory")
