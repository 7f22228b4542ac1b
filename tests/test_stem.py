"""The fast ResNet stem (pool before batch norm's affine map, the one-channel
convolution's weight gradient as a GEMM; on a CPU in cache-sized blocks, the
map's moments from the taps' Gram matrix) against the plain formulation:
XLA convolution, batch norm, ReLU, reduce_window max pool; and convolutions
as GEMMs (`embedding.conv_impl = "gemm"`) against XLA's convolution."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from eicl_cli.model.encoders import Conv2D, ConvEncoder, ResNetEncoder, _stem
from eicl_cli.model.kernels import convolution


def _reference_stem(conv, norm, images, state, inference=False):
    y = lax.conv_general_dilated(images[..., None], conv.weight, (2, 2), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, state = norm(y, state, inference=inference)
    return lax.reduce_window(jax.nn.relu(y), -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                             "SAME"), state


def _loss(stem_fn, offset: float = 0.0):
    def loss(params, images, state):
        conv, norm = params
        # All the batch's images in one call, as the model's encoder runs.
        out, new_state = stem_fn(conv, norm, images.reshape(-1, *images.shape[2:]), state)
        weights = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape)) + offset
        return (out * weights).sum(), (out, new_state)
    return loss


def _stem_with_negative_scales(seed: int = 1, stem_impl: str = "auto"):
    enc = ResNetEncoder((1,), (16,), jax.random.key(seed), stem_impl=stem_impl)
    # Some channels with a negative batch-norm scale: their max pool becomes a min.
    return eqx.tree_at(lambda e: e.initial_norm.scale, enc,
                       enc.initial_norm.scale.at[:5].set(-0.7))


# (sequences, images per sequence, image size, pixel values): three 53 x 53
# stem maps make one block, four make two blocks of two, 28 x 28 images one
# block of all; noisy images are not binary (each case compiles six programs,
# so the two-block case is also the noisy one).
STEM_CASES = [(2, 3, 105, "binary"), (2, 4, 105, "noisy"), (3, 3, 28, "binary")]


@pytest.mark.parametrize("form", ["blocked", "whole", "fused"])
@pytest.mark.parametrize("case", STEM_CASES)
def test_fast_stem_matches_plain_stem_in_values_gradients_and_statistics(form, case):
    batch, length, size, pixels = case
    enc = _stem_with_negative_scales()
    rng = np.random.default_rng(0)
    images = (rng.random((batch, length, size, size)) > 0.3).astype(np.float32)
    if pixels == "noisy":
        images += rng.normal(0, 0.1, images.shape).astype(np.float32)
    images = jnp.asarray(images)
    params = (enc.initial_conv, enc.initial_norm)
    grad = lambda f, st: eqx.filter_value_and_grad(_loss(f), has_aux=True)(params, images, st)
    (_, (ref_out, ref_state)), ref_grads = grad(_reference_stem, eqx.nn.State(enc))
    fast = lambda c, n, im, st: _stem(c, n, im, st, inference=False, dtype=jnp.float32,
                                      form=form)
    (_, (out, state)), grads = grad(fast, eqx.nn.State(enc))
    # Blocked/whole/fused kernels against the plain stem: other programs,
    # sums of 49 products and batch means over every pixel, reordered.
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    leaves = lambda t: jax.tree_util.tree_leaves(eqx.filter(t, eqx.is_inexact_array))
    for g, r in zip(leaves(grads), leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))
    # Batch norm's running averages: reordered means over every pixel.
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # At inference both normalise with the running averages just updated.
    infer = lambda f: jax.vmap(lambda im: f(im, state)[0])(images)  # noqa: E731
    # Reordered, as the training outputs above.
    np.testing.assert_allclose(
        infer(lambda im, st: _stem(*params, im, st, inference=True, dtype=jnp.float32,
                                   form=form)),
        infer(lambda im, st: _reference_stem(*params, im, st, inference=True)),
        rtol=1e-5, atol=1e-5)


def _scan_lengths(fn, *args) -> list[int]:
    lengths = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                lengths.append(eqn.params["length"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return lengths


def test_blocked_stem_runs_the_batch_as_one_flat_loop_of_blocks():
    # Under the batch's vmap the blocks run through all B x L images in one
    # loop (forward and backward), not a loop per sequence batched over B.
    enc = _stem_with_negative_scales()
    images = jnp.asarray((np.random.default_rng(1).random((4, 6, 105, 105)) > 0.5)
                         .astype(np.float32))
    params, static = eqx.partition((enc.initial_conv, enc.initial_norm), eqx.is_inexact_array)
    loss = lambda p, im: _loss(  # noqa: E731
        lambda c, n, x, st: _stem(c, n, x, st, inference=False, dtype=jnp.float32,
                                  form="blocked"))(eqx.combine(p, static), im,
                                                   eqx.nn.State(enc))[0]
    # 6 images per sequence: blocks of 3 (two per sequence), 4 x 6 / 3 = 8.
    assert _scan_lengths(jax.grad(loss), params, images) == [8, 8]


def test_blocked_convolution_and_pool_with_per_example_weights():
    # Weights batched alongside the images (not the batch's vmap) take the
    # plain vmap of the per-sequence form: each example with its own weights.
    from eicl_cli.model.kernels.stem_blocked import pool_and_moments
    rng = np.random.default_rng(2)
    images = jnp.asarray((rng.random((2, 2, 28, 28)) > 0.5).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(2, 7, 7, 1, 8)).astype(np.float32))
    sign = jnp.asarray(np.where(rng.random(8) > 0.5, 1.0, -1.0).astype(np.float32))

    def loss(w, images):
        pooled, mean, mean_sq = pool_and_moments(images, w, sign, 2, True)
        return (pooled ** 2).sum() + (mean * mean_sq).sum()

    each = [jax.value_and_grad(loss)(w[i], images[i]) for i in range(2)]
    both = jax.vmap(jax.value_and_grad(loss))(w, images)
    for i in range(2):
        # Reordered (tests/TOLERANCES.md): vmap's program against one run's.
        np.testing.assert_allclose(both[0][i], each[i][0], rtol=1e-5)
        np.testing.assert_allclose(both[1][i], each[i][1], rtol=1e-5, atol=1e-5)
    y = convolution.conv(images[0][..., None], w[0], 2)
    _, mean, mean_sq = pool_and_moments(images[0], w[0], sign, 2, True)
    # Reordered: block-by-block sums against XLA's reduction of the whole map.
    np.testing.assert_allclose(mean, y.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean_sq, (y ** 2).mean((0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_stem_is_compiled_blocked_for_a_cpu_and_whole_for_a_gpu():
    enc = _stem_with_negative_scales()
    params, static = eqx.partition((enc.initial_conv, enc.initial_norm), eqx.is_inexact_array)
    images = jnp.zeros((2, 3, 105, 105))
    f = jax.jit(jax.grad(lambda p, im: _loss(
        lambda c, n, x, st: _stem(c, n, x, st, inference=False, dtype=jnp.float32))(
            eqx.combine(p, static), im, eqx.nn.State(enc))[0]))
    cpu = f.trace(params, images).lower(lowering_platforms=("cpu",)).as_text()
    gpu = f.trace(params, images).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.while" in cpu and "stablehlo.convolution" not in cpu
    assert "stablehlo.while" not in gpu and "stablehlo.convolution" in gpu
    assert "triton" not in gpu


def test_stem_impl_pallas_compiles_the_fused_kernels_for_a_gpu_only():
    enc = _stem_with_negative_scales(stem_impl="pallas")
    params, static = eqx.partition(enc, eqx.is_inexact_array)
    images = jnp.zeros((2, 3, 105, 105))

    def loss(p, im):
        e = eqx.combine(p, static)
        out, _ = e(im.reshape(-1, 105, 105), eqx.nn.State(e), inference=False)
        return out.sum()

    f = jax.jit(jax.grad(loss))
    cpu = f.trace(params, images).lower(lowering_platforms=("cpu",)).as_text()
    gpu = f.trace(params, images).lower(lowering_platforms=("cuda",)).as_text()
    # The forward and backward kernels, as Triton calls; no map-sized convolution.
    assert gpu.count("__gpu$xla.gpu.triton") == 2
    assert "stem_forward" in gpu and "stem_backward" in gpu
    assert "1x105x105x1" not in gpu and "stablehlo.while" in cpu and "triton" not in cpu
    # Evaluation: the forward kernel alone, without the moments.
    infer = jax.jit(lambda p, im: eqx.combine(p, static)(im.reshape(-1, 105, 105),
                                                         eqx.nn.State(enc), inference=True)[0])
    gpu = infer.trace(params, images).lower(lowering_platforms=("cuda",)).as_text()
    assert gpu.count("__gpu$xla.gpu.triton") == 1 and "stem_forward" in gpu


def test_fused_stem_with_stacked_weights_gives_each_run_its_own_gradient():
    # `sweep --stack`: the runs' weights and images batched together become
    # one more grid axis of the kernels, each run its own values and gradients.
    from eicl_cli.model.kernels import stem_blocked, stem_fused
    rng = np.random.default_rng(3)
    images = jnp.asarray((rng.random((2, 3, 21, 21)) > 0.5).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(2, 7, 7, 1, 64)).astype(np.float32))
    sign = jnp.asarray(np.where(rng.random(64) > 0.5, 1.0, -1.0).astype(np.float32))

    def loss(module, **kw):
        def f(w, images):
            pooled, mean, mean_sq = module.pool_and_moments(images, w, sign, 2, True, **kw)
            return (jnp.sin(pooled)).sum() + (mean * mean_sq).sum()
        return jax.value_and_grad(f)

    stacked = jax.vmap(loss(stem_fused, interpret=True))(w, images)
    for run in range(2):
        value, grad = loss(stem_blocked)(w[run], images[run])
        # Reordered, gradient against the largest entry: the fused kernels
        # (interpreted) against the blocked ones, two programs.
        np.testing.assert_allclose(stacked[0][run], value, rtol=1e-5)
        np.testing.assert_allclose(stacked[1][run], grad, rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(grad).max()))


@pytest.mark.parametrize("module_name", ["stem_blocked", "stem_fused"])
def test_bfloat16_pooled_map_is_the_rounded_float32_pool_with_the_same_gradient(module_name):
    # In bfloat16 the float32 forms store the pooled map rounded (half the
    # bytes); rounding commutes with the max, the moments stay float32, and a
    # bfloat16 gradient gives the weight gradient its float32 values would.
    import importlib
    module = importlib.import_module(f"eicl_cli.model.kernels.{module_name}")
    kw = {"interpret": True} if module_name == "stem_fused" else {}
    rng = np.random.default_rng(4)
    images = jnp.asarray((rng.random((3, 28, 28)) > 0.5).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(7, 7, 1, 16)).astype(np.float32))
    sign = jnp.asarray(np.where(rng.random(16) > 0.5, 1.0, -1.0).astype(np.float32))
    cot = jnp.asarray(rng.normal(size=(3, 7, 7, 16))).astype(jnp.bfloat16)

    def run(dtype):
        def f(w):
            pooled, mean, mean_sq = module.pool_and_moments(images, w, sign, 2, True,
                                                            out_dtype=dtype, **kw)
            return (pooled * cot.astype(dtype)).sum(dtype=jnp.float32) + (
                mean * mean_sq).sum(), (pooled, mean, mean_sq)
        return jax.value_and_grad(f, has_aux=True)(w)

    (_, (p16, m16, s16)), g16 = run(jnp.bfloat16)
    (_, (p32, m32, s32)), g32 = run(jnp.float32)
    assert p16.dtype == jnp.bfloat16 and m16.dtype == s16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(p16), np.asarray(p32.astype(jnp.bfloat16)))
    np.testing.assert_array_equal(m16, m32)
    np.testing.assert_array_equal(s16, s32)
    # The pooled values and moments above are equal; the gradient's float32
    # sums see the same terms in another fusion (reordered, a short sum).
    np.testing.assert_allclose(g16, g32, rtol=1e-6, atol=1e-6 * float(jnp.abs(g32).max()))


@pytest.mark.parametrize("form", ["blocked", "whole", "fused"])
def test_bfloat16_stem_forms_stay_close_to_float32(form):
    enc = _stem_with_negative_scales()
    rng = np.random.default_rng(5)
    images = jnp.asarray((rng.random((2, 3, 28, 28)) > 0.3).astype(np.float32))
    params = (enc.initial_conv, enc.initial_norm)

    def grad(form, dtype):
        f = lambda c, n, im, st: _stem(c, n, im, st, inference=False, dtype=dtype,  # noqa: E731
                                       form=form)
        # Weights of one sign: a gradient that is a sum of cancelling terms
        # would measure bfloat16's rounding against a value near zero.
        return eqx.filter_value_and_grad(_loss(f, offset=1.5), has_aux=True)(
            params, images, eqx.nn.State(enc))

    (_, (out, _)), grads = grad(form, jnp.bfloat16)
    (_, (ref, _)), ref_grads = grad("blocked", jnp.float32)
    assert out.dtype == jnp.bfloat16
    # bfloat16 (tests/TOLERANCES.md): a few roundings of 0.4% each, values of order 1.
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=0.02, atol=0.03)
    leaves = lambda t: jax.tree_util.tree_leaves(eqx.filter(t, eqx.is_inexact_array))  # noqa: E731
    # The whole form's convolution itself runs in bfloat16, so its weight
    # gradient is several times further from float32's than the float32
    # forms' are: the tolerance is set by the whole form.
    for g, r in zip(leaves(grads), leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=0.1 * float(jnp.abs(r).max()))


def test_first_conv_of_the_conv_encoder_gets_the_same_weight_gradient():
    enc = ConvEncoder((28, 28), (8, 8), 16, jax.random.key(2))
    images = jnp.asarray(np.random.default_rng(1).random((5, 28, 28)).astype(np.float32))

    def loss(conv, images, plain):
        x = images[..., None]
        if plain:
            y = lax.conv_general_dilated(x, conv.weight, (2, 2), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + conv.bias
        else:
            y = conv(x)
        return jnp.sum(jnp.tanh(y) * jnp.cos(y))

    fast = eqx.filter_grad(loss)(enc.convs[0], images, False)
    plain = eqx.filter_grad(loss)(enc.convs[0], images, True)
    # Gradient, reordered: one GEMM against XLA's convolution gradient.
    np.testing.assert_allclose(fast.weight, plain.weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.bias, plain.bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 53, 53, 3), (2, 54, 52, 3), (1, 1, 1, 2), (1, 2, 3, 1),
                                   (2, 7, 6, 2), (3, 27, 27, 4)])
def test_max_pool_equals_reduce_window_in_values_and_gradients(shape):
    from eicl_cli.model.kernels.pooling import max_pool_3x3_s2

    def ref(x):
        return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")

    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    np.testing.assert_array_equal(max_pool_3x3_s2(x), ref(x))
    w = jnp.arange(ref(x).size, dtype=jnp.float32).reshape(ref(x).shape)
    expected = jax.grad(lambda x: (ref(x) * w).sum())(x)
    np.testing.assert_array_equal(jax.grad(lambda x: (max_pool_3x3_s2(x) * w).sum())(x),
                                  expected)
    per_example = jax.vmap(jax.grad(lambda x, w: (max_pool_3x3_s2(x[None])[0] * w).sum()))
    np.testing.assert_array_equal(per_example(x, w), expected)


@pytest.mark.parametrize("shape", [(2, 53, 53, 5), (2, 54, 52, 3), (1, 1, 1, 2), (1, 2, 3, 1),
                                   (2, 7, 6, 2), (2, 1, 4, 2), (2, 6, 1, 2)])
@pytest.mark.parametrize("ties", [True, False])
def test_one_pass_pooling_equals_the_separable_one_bit_for_bit(shape, ties):
    # The GPU's form (all nine window elements at once) against the CPU's
    # (rows, then columns): the same maxima, the same choices among ties,
    # the same gradients to the last bit, with negative channel signs.
    from eicl_cli.model.kernels.pooling import signed_max_pool_2d, signed_max_pool_separable
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, shape) if ties else rng.normal(size=shape)
    y = jnp.asarray(y.astype(np.float32))
    sign = jnp.asarray(np.where(rng.random(shape[-1]) > 0.5, 1.0, -1.0).astype(np.float32))
    out = signed_max_pool_separable(y, sign)
    np.testing.assert_array_equal(signed_max_pool_2d(y, sign), out)
    w = jnp.asarray(rng.normal(size=out.shape).astype(np.float32))
    grads = [jax.grad(lambda y: (f(y, sign) * w).sum())(y)
             for f in (signed_max_pool_separable, signed_max_pool_2d)]
    np.testing.assert_array_equal(grads[1], grads[0])


def test_pooling_is_compiled_separable_for_a_cpu_and_in_one_pass_for_a_gpu():
    from eicl_cli.model.kernels.pooling import signed_max_pool
    x, sign = jnp.zeros((2, 53, 53, 4)), jnp.ones(4)
    f = jax.jit(jax.grad(lambda x: (signed_max_pool(x, sign) ** 2).sum()))
    cpu = f.trace(x).lower(lowering_platforms=("cpu",)).as_text()
    gpu = f.trace(x).lower(lowering_platforms=("cuda",)).as_text()
    # The separable form joins edge windows to the interior; the other pads.
    assert "stablehlo.pad" not in cpu and "stablehlo.pad" in gpu
    assert "stablehlo.optimization_barrier" in gpu


# (batch, height, width, in, out, kernel, stride): the ResNet's 3 x 3 shapes,
# odd and even sizes, a 5 x 5 kernel with stride 3, and the one-channel stems.
CONV_SHAPES = [(3, 27, 27, 4, 4, 3, 1), (3, 27, 27, 8, 8, 3, 2), (2, 14, 13, 16, 16, 3, 2),
               (2, 10, 9, 5, 3, 5, 3), (2, 105, 105, 1, 64, 7, 2), (2, 28, 28, 1, 16, 3, 2)]


@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_gemm_convolution_equals_xlas_in_values_and_gradients(shape):
    n, h, w, c, o, k, stride = shape
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=convolution.conv(x, kernel, stride).shape), jnp.float32)

    def loss(conv):
        def f(x, kernel):
            y = conv(x, kernel, stride)
            return (y * weights).sum(), y
        return f

    grads = lambda conv, argnums: jax.grad(loss(conv), argnums, has_aux=True)(x, kernel)
    (ref_dx, ref_dk), ref_y = grads(convolution.conv, (0, 1))
    (dx, dk), y = grads(convolution.conv_gemm, (0, 1))
    scale = lambda a: float(jnp.abs(a).max())
    # Reordered, against each array's scale: im2col GEMM against XLA's convolution.
    np.testing.assert_allclose(y, ref_y, atol=1e-5 * scale(ref_y))
    np.testing.assert_allclose(dx, ref_dx, atol=1e-5 * scale(ref_dx))
    np.testing.assert_allclose(dk, ref_dk, atol=1e-5 * scale(ref_dk))
    if c == 1:
        # The images' convolution: no gradient to the images, the same kernel's.
        dk_img, y_img = grads(convolution.image_conv_gemm, 1)
        ref_dk_img, _ = grads(convolution.image_conv, 1)
        np.testing.assert_allclose(y_img, ref_y, atol=1e-5 * scale(ref_y))
        np.testing.assert_allclose(dk_img, ref_dk_img, atol=1e-5 * scale(ref_dk))


def test_stacked_gemm_convolution_is_a_batched_matmul_not_a_grouped_convolution():
    """Under vmap over runs (sweep --stack), XLA's convolution becomes a
    grouped convolution; the GEMM form stays a matmul, batched over runs, and
    gives each run its own convolution's gradient."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(4, 2, 13, 13, 4)), jnp.float32)
    kernels = jnp.asarray(rng.normal(size=(4, 3, 3, 4, 8)), jnp.float32)
    grad = lambda conv: jax.vmap(jax.grad(lambda k, x: (conv(x, k, 2) ** 2).sum()))
    stacked = grad(convolution.conv_gemm)(kernels, x)
    for run in range(4):
        one = jax.grad(lambda k: (convolution.conv(x[run], k, 2) ** 2).sum())(kernels[run])
        # Reordered, against the gradient's scale: a batched GEMM against one run's convolution.
        np.testing.assert_allclose(stacked[run], one, atol=1e-5 * float(jnp.abs(one).max()))
    text = jax.jit(grad(convolution.conv_gemm)).lower(kernels, x).as_text()
    assert "convolution" not in text and "dot_general" in text
    assert "feature_group_count = 4" in jax.jit(grad(convolution.conv)).lower(kernels, x).as_text()


def _dot_contractions(jaxpr) -> list[int]:
    """How many axes each dot_general in a jaxpr (and its sub-jaxprs) contracts."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(len(eqn.params["dimension_numbers"][0][0]))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_contractions(sub)
    return found


def test_stacked_1x1_convolution_weight_gradient_contracts_over_flat_pixels():
    """A 1 x 1 convolution's weight gradient under vmap over stacked runs and
    over the batch contracts over (sequence, pixels), two axes: with the image,
    row and column axes apart (four), XLA's GPU compiler copied dy to
    channels-major for the batched dot, a full pass over the activations per
    layer (benchmarks/gpu/gpu_program.py counts the bytes). The same values
    as one run's plain matmul."""
    rng = np.random.default_rng(3)
    runs, batch, images, size, c_in, c_out = 3, 2, 4, 6, 5, 7
    x = jnp.asarray(rng.normal(size=(runs, batch, images, size, size, c_in)), jnp.float32)
    convs = [Conv2D(c_in, c_out, 1, 1, jax.random.key(r)) for r in range(runs)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *convs)

    def loss(conv, x):  # one run: its batch of sequences, per-example code
        return (jax.vmap(conv)(x) ** 2).sum()

    grads = jax.vmap(jax.grad(loss))(stacked, x)
    for r in range(runs):
        flat = x[r].reshape(-1, c_in)
        dy = 2 * flat @ convs[r].weight[0, 0]
        want = flat.T @ dy
        # A batched dot against a plain matmul (another program) summing 288
        # products: 1e-5 of the largest entry, as cancelling entries have no
        # relative precision.
        np.testing.assert_allclose(grads.weight[r, 0, 0], want, rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want).max()))
    jaxpr = jax.make_jaxpr(jax.vmap(jax.grad(loss)))(stacked, x).jaxpr
    assert max(_dot_contractions(jaxpr)) == 2


@pytest.mark.parametrize("stride", [1, 2])
def test_projection_block_computes_its_two_1x1_convolutions_of_x_as_one_matmul(stride):
    """A bottleneck block whose projection shortcut is unstrided reads x with
    one matmul for the shortcut and the first 1 x 1 convolution (XLA's GPU
    compiler stopped merging them itself at sweep --stack's sizes, reading x
    twice). Same values and gradients as the two
    convolutions apart; a strided shortcut reads a subsampled x, apart."""
    enc = ResNetEncoder((1,), (16,), jax.random.key(2), strides=(stride,))
    block = enc.blocks[0]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 9, 9, 64)), jnp.float32)

    def apart(block, x):
        conv, norm = block.shortcut
        shortcut, st = norm(conv(x), eqx.nn.State(enc), inference=False)
        out = x
        for i, (conv, norm) in enumerate(zip(block.convs, block.norms)):
            out, st = norm(conv(out), st, inference=False)
            out = jax.nn.relu(out) if i < 2 else out
        return jax.nn.relu(out + shortcut)

    def merged(block, x):
        return block(x, eqx.nn.State(enc), inference=False, dtype=jnp.float32)[0]

    def run(f):
        g = f
        w = jnp.cos(jnp.arange(g(block, x).size, dtype=jnp.float32))
        return eqx.filter_value_and_grad(lambda b: (g(b, x).ravel() * w).sum())(block)

    (v1, g1), (v2, g2) = run(apart), run(merged)
    # Reordered: the two 1x1 convolutions as one matmul against two; the
    # gradient sums more terms through the block's batch norms (rtol 2e-4).
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)
    dots = [e for e in jax.make_jaxpr(merged)(block, x).jaxpr.eqns
            if e.primitive.name == "dot_general"]
    assert len(dots) == (2 if stride == 1 else 3)


def test_stem_check_script_compares_the_forms():
    # benchmarks/gpu/stem_check.py is what gpu_session.sh's pallas plan runs
    # first: here with the CPU's form against the interpreted kernels, small,
    # run as benchmarks/gpu/README.md documents it.
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]

    def check(*args: str) -> list[dict]:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu.stem_check", "--forms",
             "blocked,fused", "--batch", "2", "--length", "3", "--size", "21", "--iters", "1",
             *args], capture_output=True, text=True, timeout=300, cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in done.stdout.splitlines()]

    lines = check("--stack", "1,2", "--noise", "0.1")
    assert [(x["form"], x["stack"]) for x in lines] == [
        ("blocked", 1), ("fused", 1), ("blocked", 2), ("fused", 2)]
    assert all("error" not in x and x["ms_per_pass"] > 0 for x in lines)
    assert max(lines[1]["max_rel_diff"].values()) < 1e-5
    # In bfloat16 (the kernels store the pooled map so): the same forms, within
    # bfloat16's rounding.
    lines = check("--stack", "1", "--dtype", "bfloat16")
    assert [(x["form"], x["dtype"]) for x in lines] == [("blocked", "bfloat16"),
                                                       ("fused", "bfloat16")]
    assert "error" not in lines[1] and max(lines[1]["max_rel_diff"].values()) < 0.02
