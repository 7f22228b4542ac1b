"""The ResNet stem's forms side by side on this machine: values, gradients and
batch-norm statistics of each against the first, and the time of a jitted
forward + backward pass of each, alone and stacked (vmap over runs, as
`sweep --stack`). One JSON line per form and stack.

    python -m benchmarks.gpu.stem_check [--forms whole,fused] [--batch 32] [--length 9]
        [--size 105] [--stack 1,8] [--iters 20] [--noise 0.0] [--fused-tiles 32x2,64x2]
        [--dtype float32|bfloat16]

On a GPU, "fused" is the Pallas kernels of `embedding.stem_impl = "pallas"`
(off a GPU Pallas interprets them: slow, for checking only) and "whole" the
XLA form a GPU runs by default; "blocked" is the CPU's form. The images are
random binary ones (Omniglot's pixels are 0/1), plus Gaussian noise of
`--noise`. `--dtype` is the model's compute dtype (`model.dtype`); in
bfloat16 the forms differ by bfloat16's rounding. Differences are relative
to the largest magnitude of the first form's array (max |a - b| / max |b|).
`--fused-tiles` runs the fused form once per TILE x BACKWARD_SPLITS of
eicl_cli/model/kernels/stem_fused.py (pooled positions per program,
programs per image in the backward pass), named "fused:TxS".
"""

from __future__ import annotations

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def _stem_parts(seed: int):
    from eicl_cli.model.encoders import ResNetEncoder
    enc = ResNetEncoder((1,), (16,), jax.random.key(seed))
    # Some channels with a negative batch-norm scale: their pool is a min.
    enc = eqx.tree_at(lambda e: e.initial_norm.scale, enc,
                      enc.initial_norm.scale.at[::5].set(-0.7))
    return (enc.initial_conv, enc.initial_norm), lambda: eqx.nn.State(enc)


def _step(form: str, new_state, dtype=jnp.float32):
    """value_and_grad of a fixed weighting of the stem's output, over a batch
    of sequences (all their images in one call, as the model's encoder runs,
    statistics over the batch)."""
    from eicl_cli.model.encoders import _stem

    def loss(params, images):
        conv, norm = params
        state = new_state()  # a State is used once
        out, state = _stem(conv, norm, images.reshape(-1, *images.shape[2:]), state,
                           inference=False, dtype=dtype, form=form)
        weights = jnp.cos(jnp.arange(out.size, dtype=jnp.float32) * 0.01).reshape(out.shape)
        return (out * weights).sum() / out.shape[0], (out.astype(jnp.float32), state)

    return eqx.filter_value_and_grad(loss, has_aux=True)


def _set_tiles(form: str, defaults: tuple[int, int]) -> str:
    """The stem form to run for `form`, setting the fused kernels' tile and
    backward splits (read when a step is traced): those of "fused:TxS", else
    `defaults`."""
    from eicl_cli.model.kernels import stem_fused
    tile, splits = defaults
    if form.startswith("fused:"):
        tile, splits = (int(v) for v in form.split(":")[1].split("x"))
        form = "fused"
    stem_fused.TILE, stem_fused.BACKWARD_SPLITS = tile, splits
    return form


def _arrays(result) -> dict[str, jax.Array]:
    (value, (out, new_state)), grads = result
    conv_grad, norm_grad = grads
    return {"loss": value, "output": out, "conv_weight_grad": conv_grad.weight,
            "norm_scale_grad": norm_grad.scale, "norm_offset_grad": norm_grad.offset,
            "running_stats": jnp.concatenate([x.ravel() for x in
                                              jax.tree_util.tree_leaves(new_state)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", default="whole,fused")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=9)
    parser.add_argument("--size", type=int, default=105)
    parser.add_argument("--stack", default="1,8")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--fused-tiles", default="",
                        help="TILExSPLITS,... for extra runs of the fused form")
    args = parser.parse_args()
    forms = args.forms.split(",") + [f"fused:{v}" for v in args.fused_tiles.split(",") if v]
    rng = np.random.default_rng(0)
    shape = (args.batch, args.length, args.size, args.size)
    images = (rng.random(shape) > 0.7).astype(np.float32)
    images += rng.normal(0.0, args.noise, shape).astype(np.float32) if args.noise else 0.0
    images = jnp.asarray(images)
    params, new_state = _stem_parts(1)
    params = eqx.filter(params, eqx.is_inexact_array)
    device = jax.devices()[0].device_kind
    from eicl_cli.model.kernels import stem_fused
    defaults = (stem_fused.TILE, stem_fused.BACKWARD_SPLITS)
    reference = None
    for k in (int(s) for s in args.stack.split(",")):
        for form in forms:
            step = _step(_set_tiles(form, defaults), new_state, jnp.dtype(args.dtype))
            if k == 1:
                fn, inputs = eqx.filter_jit(step), (params, images)
            else:
                # Each run its own weights and images, as stacked sweep points.
                fn = eqx.filter_jit(eqx.filter_vmap(step))
                inputs = (jax.tree_util.tree_map(lambda a: jnp.stack([a] * k), params),
                          jnp.stack([jnp.roll(images, r, axis=0) for r in range(k)]))
            line = {"form": form, "stack": k, "device": device, "images": shape,
                    "dtype": args.dtype}
            try:
                started = time.perf_counter()
                result = jax.block_until_ready(fn(*inputs))
                line["compile_s"] = round(time.perf_counter() - started, 2)
                started = time.perf_counter()
                for _ in range(args.iters):
                    result = fn(*inputs)
                jax.block_until_ready(result)
                line["ms_per_pass"] = round(1e3 * (time.perf_counter() - started) / args.iters, 3)
            except Exception as err:  # noqa: BLE001 - report and go on to the next form
                line["error"] = f"{type(err).__name__}: {str(err)[:400]}"
                print(json.dumps(line), flush=True)
                continue
            arrays = _arrays(result)
            if k == 1 and reference is None:
                reference = arrays
            elif k == 1:
                line["max_rel_diff"] = {
                    name: float(jnp.abs(a - reference[name]).max()
                                / max(float(jnp.abs(reference[name]).max()), 1e-30))
                    for name, a in arrays.items()}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
