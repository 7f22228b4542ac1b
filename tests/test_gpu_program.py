"""benchmarks/gpu_program.py's reading of an optimized HLO module: kernels
through loops, bytes of sliced operands, and the source that made each one.
Checked on CPU-compiled programs (the same HLO text format as a GPU's)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_program.py"
_spec = importlib.util.spec_from_file_location("gpu_program", _PATH)
gpu_program = importlib.util.module_from_spec(_spec)
sys.modules["gpu_program"] = gpu_program  # dataclasses look their module up
_spec.loader.exec_module(gpu_program)


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
    done = subprocess.run([sys.executable, str(_PATH), "configs/quickstart.toml", "--against",
                           str(bad)], capture_output=True, text=True,
                          cwd=_PATH.parents[1], timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"gpu_program.py: error: --against {bad}: not a summary --save wrote")
