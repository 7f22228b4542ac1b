"""Example encoders: one image (or symbol) per sequence item -> an emb_dim vector.

Every encoder maps many items at once, (N, H, W) float images or (N,) int
symbols -> (N, out_dim): the model passes all the images of a batch (N = B x
L), so convolutions run as one batched op and batch norm reduces over the
whole batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ..config import CONV_IMPLS, STEM_IMPLS
from ..errors import EiclError
from .layers import (BatchNorm, Dense, affine, fan_in_init, same_out, split, truncated_normal,
                     zeros)
from .kernels import convolution, stem_blocked, stem_fused
from .kernels.pooling import signed_max_pool

class Conv2D(eqx.Module):
    """A 2-D convolution over NHWC input with SAME padding (Haiku's default).

    `reads_images`: the input is the (one-channel) data itself, never trained,
    so the backward pass computes only the weight gradient, as one GEMM.
    `gemm`: compute a k x k convolution as one matrix product over the k * k
    shifted input windows instead of XLA's convolution. The same function;
    under `sweep --stack` vmap turns XLA's convolution into a grouped one
    (one group per run), while the product becomes a batched GEMM."""

    weight: jax.Array  # (kh, kw, in, out)
    bias: jax.Array | None
    stride: int = eqx.field(static=True)
    reads_images: bool = eqx.field(static=True)
    gemm: bool = eqx.field(static=True)

    def __init__(self, n_in: int, n_out: int, kernel: int, stride: int, key: jax.Array,
                 *, bias: bool = False, reads_images: bool = False, gemm: bool = False):
        self.weight = fan_in_init(key, (kernel, kernel, n_in, n_out))
        self.bias = zeros((n_out,)) if bias else None
        self.stride = stride
        self.reads_images = reads_images
        self.gemm = gemm

    def __call__(self, x: jax.Array, dtype=jnp.float32) -> jax.Array:
        kh, kw, n_in, n_out = self.weight.shape
        w = self.weight.astype(dtype)
        x = x.astype(dtype)
        if kh == kw == 1:
            # A 1x1 conv is a matmul over channels; strided = subsample first.
            if self.stride > 1:
                x = x[:, ::self.stride, ::self.stride]
            y = convolution.pointwise(x, w[0, 0])
        elif self.reads_images and n_in == 1:
            image_conv = convolution.image_conv_gemm if self.gemm else convolution.image_conv
            y = image_conv(x, w, self.stride)
        elif self.gemm:
            y = convolution.conv_gemm(x, w, self.stride)
        else:
            y = convolution.conv(x, w, self.stride)
        if self.bias is not None:
            y = y + self.bias.astype(dtype)
        return y


def _stem(conv: "Conv2D", norm: BatchNorm, images: jax.Array, state: eqx.nn.State, *,
          inference: bool, dtype, form: str | None = None, gpu_kernels: bool = False
          ) -> tuple[jax.Array, eqx.nn.State]:
    """max_pool(relu(batch_norm(conv(images)))), with the pool taken first.

    Batch norm is a per-channel affine map a * y + b and ReLU is monotone, so
    the max over a window commutes with both when a >= 0, and turns into a
    min when a < 0: pooling sign(a) * y and then applying |a| (exactly the
    same floating-point values) does the elementwise work and its gradient on
    a quarter of the pixels. The statistics still come from the full map.
    sign(a) is the sign of batch norm's scale, known before the statistics.

    Three forms of the convolution, the pool and the map's moments, picked
    when the step is compiled (or named by `form`): "blocked" on a CPU, a few
    images at a time in cache, the moments summed block by block and their
    gradients from the kernel taps' Gram matrix (stem_blocked); "fused" on a
    CUDA GPU with `gpu_kernels`, two Pallas kernels that never write the map
    (stem_fused; named off a GPU, Pallas interprets them); "whole" elsewhere,
    the whole map at once, the moments reduced from it.

    The pooled map comes out of every form in `dtype`, and batch norm's
    affine map then runs in float32. Rounding is monotone, so a rounded pool
    is the pool of the rounded map: in bfloat16 the whole form (whose map is
    bfloat16) pools the same values as before, and the float32 forms round
    once at the end. In bfloat16 the fused kernels so move the pooled map
    and its gradient at half the bytes. The whole form still pools in
    float32: pooling the bfloat16 map directly made XLA lay a stacked
    program's maps out another way, moving more bytes in all
    (docs/performance.md)."""
    sign = lax.stop_gradient(jnp.where(norm.scale >= 0, 1.0, -1.0))
    need_stats = not inference

    def whole(images, weight, sign):
        y = eqx.tree_at(lambda c: c.weight, conv, weight)(images[..., None], dtype)
        pooled = signed_max_pool(y.astype(jnp.float32), sign).astype(dtype)
        if not need_stats:
            return pooled, None, None
        y32 = y.astype(jnp.float32)
        return pooled, y32.mean((0, 1, 2)), jnp.square(y32).mean((0, 1, 2))

    def blocked(images, weight, sign):
        return stem_blocked.pool_and_moments(images, weight, sign, conv.stride, need_stats,
                                             out_dtype=dtype)

    def fused(images, weight, sign, interpret=False):
        return stem_fused.pool_and_moments(images, weight, sign, conv.stride, need_stats,
                                           out_dtype=dtype, interpret=interpret)

    def fused_anywhere(*args):
        return lax.platform_dependent(*args, cuda=fused,
                                      default=functools.partial(fused, interpret=True))

    forms = {"whole": whole, "blocked": blocked, "fused": fused_anywhere}
    if form is not None:
        pooled, mean, mean_sq = forms[form](images, conv.weight, sign)
    else:
        # The blocked and fused forms compute in float32; the whole one in `dtype`.
        f32 = jnp.dtype(dtype) == jnp.float32 and conv.bias is None
        branches = {"cpu": blocked if f32 else whole, "default": whole}
        if gpu_kernels and conv.bias is None:
            branches["cuda"] = fused
        pooled, mean, mean_sq = lax.platform_dependent(images, conv.weight, sign, **branches)
    mean, var, state = norm.statistics_from_moments(mean, mean_sq, state, inference=inference)
    a = norm.multiplier(var)
    return affine(pooled, sign * mean, a * sign, norm.offset, jnp.dtype(dtype), True), state


class BottleneckBlock(eqx.Module):
    """ResNet v1 bottleneck block: 1x1 (c/4) -> 3x3 (c/4, strided) -> 1x1 (c),
    batch norm after each conv, ReLU between, the last batch norm's scale
    starting at zero, projection shortcut (1x1 conv + batch norm) when asked."""

    convs: tuple[Conv2D, Conv2D, Conv2D]
    norms: tuple[BatchNorm, BatchNorm, BatchNorm]
    shortcut: tuple[Conv2D, BatchNorm] | None

    def __init__(self, n_in: int, channels: int, stride: int, projection: bool,
                 key: jax.Array, gemm: bool = False):
        k0, k1, k2, kp = split(key, 4)
        mid = channels // 4
        self.convs = (Conv2D(n_in, mid, 1, 1, k0), Conv2D(mid, mid, 3, stride, k1, gemm=gemm),
                      Conv2D(mid, channels, 1, 1, k2))
        self.norms = (BatchNorm(mid), BatchNorm(mid), BatchNorm(channels, zero_scale=True))
        self.shortcut = ((Conv2D(n_in, channels, 1, stride, kp),
                          BatchNorm(channels)) if projection else None)

    def __call__(self, x, state, *, inference: bool, dtype):
        shortcut = x
        if self.shortcut is not None:
            conv, norm = self.shortcut
            if conv.stride == 1:
                # The projection and the first 1x1 conv read the same x: one
                # matmul for both. XLA merges them itself for one run, but not
                # for sweep --stack's 8x larger batched dots, which then read
                # the block's widest input twice.
                shortcut, first = _shared_input_1x1(conv, self.convs[0], x, dtype)
            else:
                shortcut, first = conv(x, dtype), None
            shortcut, state = norm(shortcut, state, inference=inference)
        else:
            first = None
        out = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            out = first if i == 0 and first is not None else conv(out, dtype)
            out, state = norm(out, state, inference=inference, relu=i < 2)
        return jax.nn.relu(out + shortcut), state


def _shared_input_1x1(a: Conv2D, b: Conv2D, x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(a(x), b(x)) for two bias-free, unstrided 1x1 convolutions, as one
    matmul against their kernels side by side."""
    w = jnp.concatenate([a.weight[0, 0], b.weight[0, 0]], axis=-1)
    y = convolution.pointwise(x.astype(dtype), w.astype(dtype))
    return y[..., :a.weight.shape[-1]], y[..., a.weight.shape[-1]:]


class ResNetEncoder(eqx.Module):
    """The paper's ResNet v1 (bottleneck) without logits."""

    initial_conv: Conv2D
    initial_norm: BatchNorm
    blocks: tuple[BottleneckBlock, ...]
    flatten_superpixels: bool = eqx.field(static=True)
    stem_impl: str = eqx.field(static=True)

    def __init__(self, blocks_per_group: Sequence[int], channels_per_group: Sequence[int],
                 key: jax.Array, *, flatten_superpixels: bool = False,
                 strides: Sequence[int] = (1, 2, 2, 2),
                 gemm: bool = False, stem_impl: str = "auto"):
        keys = split(key, 1 + sum(blocks_per_group))
        self.initial_conv = Conv2D(1, 64, 7, 2, keys[0], reads_images=True, gemm=gemm)
        self.initial_norm = BatchNorm(64)
        blocks, n_in, k = [], 64, 1
        for n_blocks, channels, stride in zip(blocks_per_group, channels_per_group, strides):
            for b in range(n_blocks):
                blocks.append(BottleneckBlock(n_in, channels, stride if b == 0 else 1,
                                              b == 0, keys[k], gemm))
                n_in, k = channels, k + 1
        self.blocks = tuple(blocks)
        self.flatten_superpixels = flatten_superpixels
        self.stem_impl = stem_impl

    def __call__(self, images, state, *, inference: bool, dtype=jnp.float32):
        x, state = _stem(self.initial_conv, self.initial_norm, images, state,
                         inference=inference, dtype=dtype, gpu_kernels=self.stem_impl == "pallas")
        for block in self.blocks:
            x, state = block(x, state, inference=inference, dtype=dtype)
        if self.flatten_superpixels:
            return x.reshape(x.shape[0], -1), state
        return x.astype(jnp.float32).mean((1, 2)).astype(dtype), state


def resnet_output_hw(image_shape: tuple[int, int], n_groups: int = 4,
                     strides: Sequence[int] = (1, 2, 2, 2)) -> tuple[int, int]:
    """Spatial size of the ResNet's last feature map (SAME padding throughout)."""
    h, w = image_shape
    h, w = same_out(same_out(h, 2), 2), same_out(same_out(w, 2), 2)  # conv, pool
    for s in strides[:n_groups]:
        h, w = same_out(h, s), same_out(w, s)
    return h, w


class LinearEncoder(eqx.Module):
    """Flatten the image, one dense layer to emb_dim."""

    dense: Dense

    def __init__(self, n_pixels: int, emb_dim: int, key: jax.Array):
        self.dense = Dense(n_pixels, emb_dim, key)

    def __call__(self, images, state, *, inference: bool, dtype=jnp.float32):
        return self.dense(images.reshape(images.shape[0], -1), dtype), state


class ConvEncoder(eqx.Module):
    """A cheap CPU encoder (not in the paper): 3x3 stride-2 convs with bias and
    ReLU, then flatten and one dense layer to emb_dim."""

    convs: tuple[Conv2D, ...]
    dense: Dense

    def __init__(self, image_shape: tuple[int, int], channels: Sequence[int], emb_dim: int,
                 key: jax.Array, gemm: bool = False):
        keys = split(key, len(channels) + 1)
        convs, n_in = [], 1
        h, w = image_shape
        for c, k in zip(channels, keys):
            convs.append(Conv2D(n_in, c, 3, 2, k, bias=True, reads_images=not convs, gemm=gemm))
            n_in, h, w = c, same_out(h, 2), same_out(w, 2)
        self.convs = tuple(convs)
        self.dense = Dense(h * w * n_in, emb_dim, keys[-1])

    def __call__(self, images, state, *, inference: bool, dtype=jnp.float32):
        x = images[..., None]
        for conv in self.convs:
            x = jax.nn.relu(conv(x, dtype))
        return self.dense(x.reshape(x.shape[0], -1), dtype), state


class EmbeddingEncoder(eqx.Module):
    """Symbolic examples: an integer id -> a row of a table (Haiku's Embed
    default initialiser, truncated normal with std 1)."""

    table: jax.Array

    def __init__(self, vocab: int, emb_dim: int, key: jax.Array):
        self.table = truncated_normal(key, (vocab, emb_dim), 1.0)

    def __call__(self, symbols, state, *, inference: bool, dtype=jnp.float32):
        return self.table[symbols].astype(dtype), state


Encoder = ResNetEncoder | LinearEncoder | ConvEncoder | EmbeddingEncoder


def build_encoder(name: str, *, emb_dim: int, image_shape: tuple[int, ...] | None,
                  key: jax.Array, blocks_per_group: Sequence[int] = (2, 2, 2, 2),
                  channels_per_group: Sequence[int] = (16, 32, 32),
                  conv_channels: Sequence[int] = (32, 32, 32),
                  flatten_superpixels: bool = False, symbolic_vocab: int = 0,
                  conv_impl: str = "xla",
                  stem_impl: str = "auto") -> Encoder:
    """The example encoder named `name`, producing emb_dim features per item.
    conv_impl: "xla" (XLA's convolution) or "gemm" (see Conv2D); stem_impl:
    "auto" or "pallas" (the ResNet stem's fused GPU kernels, see _stem)."""
    for knob, value, allowed in (("conv_impl", conv_impl, CONV_IMPLS),
                                 ("stem_impl", stem_impl, STEM_IMPLS)):
        if value not in allowed:
            raise EiclError(f"embedding.{knob} = {value!r} is not allowed; "
                            f"choose one of: {', '.join(allowed)}")
    gemm = conv_impl == "gemm"
    if name == "embedding":
        if image_shape is not None:
            raise EiclError("embedding.example_encoder = 'embedding' needs symbolic data; "
                            "images need resnet, linear or conv")
        return EmbeddingEncoder(symbolic_vocab, emb_dim, key)
    if image_shape is None or len(image_shape) != 2:
        raise EiclError(f"embedding.example_encoder = {name!r} needs (H, W) images, "
                        f"got image shape {image_shape!r}")
    image_shape = (int(image_shape[0]), int(image_shape[1]))
    if name == "resnet":
        channels = list(channels_per_group)
        if flatten_superpixels:
            # As the original: the last group has emb_dim / 16 channels and the
            # 4 x 4 superpixels of a 105 x 105 image are flattened to emb_dim.
            hw = resnet_output_hw(image_shape, len(blocks_per_group))
            if emb_dim % 16 or math.prod(hw) * (emb_dim // 16) != emb_dim:
                raise EiclError(
                    f"embedding.flatten_superpixels needs emb_dim divisible by 16 and a final "
                    f"4 x 4 feature map (105 x 105 images); got emb_dim {emb_dim} and a "
                    f"{hw[0]} x {hw[1]} map for {image_shape[0]} x {image_shape[1]} images")
            channels.append(emb_dim // 16)
        else:
            channels.append(emb_dim)
        if min(channels) < 4:
            raise EiclError(
                f"resnet group channels {channels} (resnet_channels_per_group, then "
                f"emb_dim{' / 16' if flatten_superpixels else ''}) must all be >= 4: "
                "each bottleneck block narrows to channels / 4")
        return ResNetEncoder(blocks_per_group, channels, key,
                             flatten_superpixels=flatten_superpixels,
                             gemm=gemm, stem_impl=stem_impl)
    if name == "linear":
        return LinearEncoder(math.prod(image_shape), emb_dim, key)
    if name == "conv":
        return ConvEncoder(image_shape, conv_channels, emb_dim, key, gemm)
    raise EiclError(f"embedding.example_encoder = {name!r} is not allowed; "
                    "choose one of: resnet, linear, conv, embedding")
