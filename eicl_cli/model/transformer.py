"""Causal pre-LayerNorm transformer, as the original's TransformerBlock stack.

Each block: x += Dropout(Attention(LN(x))); x += Dropout(MLP(LN(x))), the
MLP widening 4x with GELU; after the stack a final LayerNorm. Dense layers use
Haiku's VarianceScaling(1.0) initialiser and all have biases, the query, key,
value and output projections included. The blocks are stored stacked (one
leading layer axis on every parameter) and run with lax.scan, which keeps
compile time flat in the number of layers; `unroll` blocks per loop iteration
trade compile time for a faster step where the step is small (unroll >=
num_layers: no loop at all).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .layers import Dense, LayerNorm, dropout, split

_MASKED = -1e10  # the original's additive mask value

# A probe's edit of the attention heads: (scale, fill), see Block.attention.
Intervention = tuple[jax.Array, jax.Array]


def _host_concat(arrays: list[jax.Array], axis: int) -> jax.Array:
    # On the host: eager jnp ops would compile once per shape at build time.
    return jnp.asarray(np.concatenate([np.asarray(a) for a in arrays], axis=axis))


class Block(eqx.Module):
    norm_attn: LayerNorm
    qkv: Dense  # (E, 3E): the query, key and value projections side by side
    out: Dense
    norm_mlp: LayerNorm
    mlp_in: Dense
    mlp_out: Dense
    num_heads: int = eqx.field(static=True)
    dropout_prob: float = eqx.field(static=True)

    def __init__(self, width: int, num_heads: int, widening: int, dropout_prob: float,
                 key: jax.Array):
        kq, kk, kv, ko, k1, k2 = split(key, 6)
        self.norm_attn = LayerNorm(width)
        # Three separately initialised (E, E) projections, stored as one matrix.
        q, k, v = (Dense(width, width, kx, init="variance_scaling") for kx in (kq, kk, kv))
        self.qkv = eqx.tree_at(lambda d: (d.weight, d.bias), q, (
            _host_concat([q.weight, k.weight, v.weight], axis=1),
            _host_concat([q.bias, k.bias, v.bias], axis=0)))
        self.out = Dense(width, width, ko, init="variance_scaling")
        self.norm_mlp = LayerNorm(width)
        self.mlp_in = Dense(width, widening * width, k1, init="variance_scaling")
        self.mlp_out = Dense(widening * width, width, k2, init="variance_scaling")
        self.num_heads = num_heads
        self.dropout_prob = dropout_prob

    def attention(self, x: jax.Array, dtype, intervene: Intervention | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(T, E) -> the attention's output (T, E), its weights (H, T, T) and
        each head's output before the output projection (T, H, D). With
        `intervene` = (scale (H,), fill (T, H, D)), head h's output becomes
        scale[h] * output + (1 - scale[h]) * fill[:, h]: scale 0 with a zero
        fill removes the head, with its mean output mean-ablates it."""
        t, width = x.shape
        head_dim = width // self.num_heads
        q, k, v = jnp.split(self.qkv(x, dtype).reshape(t, 3, self.num_heads, head_dim), 3, axis=1)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]  # (T, H, D)
        scores = jnp.einsum("thd,shd->hts", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, _MASKED), axis=-1)
        heads = jnp.einsum("hts,shd->thd", weights.astype(dtype), v)
        if intervene is not None:
            scale, fill = intervene
            scale = scale.astype(dtype)[None, :, None]
            heads = scale * heads + (1 - scale) * fill.astype(dtype)
        return self.out(heads.reshape(t, width), dtype), weights, heads

    def __call__(self, x: jax.Array, key: jax.Array | None, *, inference: bool, dtype,
                 intervene: Intervention | None = None, record: bool = False):
        """(T, E) -> (T, E); with `record`, also (attention weights (H, T, T),
        head outputs (T, H, D)) for the probe."""
        rate = 0.0 if inference else self.dropout_prob
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        attended, weights, heads = self.attention(self.norm_attn(x), dtype, intervene)
        x = x + dropout(k1, rate, attended)
        h = jax.nn.gelu(self.mlp_in(self.norm_mlp(x), dtype))
        x = x + dropout(k2, rate, self.mlp_out(h, dtype))
        return (x, (weights, heads)) if record else x


class Transformer(eqx.Module):
    """num_layers stacked Blocks, then the final LayerNorm: (T, E) -> (T, E)."""

    blocks: Block  # every array has a leading num_layers axis
    final_norm: LayerNorm
    num_layers: int = eqx.field(static=True)
    unroll: int = eqx.field(static=True)

    def __init__(self, width: int, num_layers: int, num_heads: int, widening: int,
                 dropout_prob: float, key: jax.Array, unroll: int = 1):
        blocks = [Block(width, num_heads, widening, dropout_prob, k)
                  for k in split(key, num_layers)]
        self.blocks = jax.tree_util.tree_map(
            lambda *xs: jnp.asarray(np.stack([np.asarray(x) for x in xs])), *blocks)
        self.final_norm = LayerNorm(width)
        self.num_layers = num_layers
        self.unroll = unroll

    def __call__(self, x: jax.Array, key: jax.Array | None, *, inference: bool, dtype,
                 intervene: Intervention | None = None, record: bool = False):
        """(T, E) -> (T, E). For the probe: `intervene` = (scale (layers, H),
        fill (layers, T, H, D)) edits every layer's heads as Block.attention
        says, and `record` also returns every layer's attention weights
        (layers, H, T, T) and head outputs (layers, T, H, D). Neither given,
        the traced program is the training step's as it always was."""
        params, static = eqx.partition(self.blocks, eqx.is_array)
        needs_key = key is not None and not inference and self.blocks.dropout_prob > 0
        keys = jax.random.split(key, self.num_layers) if needs_key else None

        def step(h, layer):
            block_params, layer_key, edit = layer
            block = eqx.combine(block_params, static)
            out = block(h, layer_key, inference=inference, dtype=dtype, intervene=edit,
                        record=record)
            return out if record else (out, None)

        def layers(x, unroll):
            return jax.lax.scan(step, x, (params, keys, intervene),
                                unroll=min(unroll, self.num_layers))

        if self.unroll == 0:  # auto: a loop for a CPU, every layer unrolled for a GPU
            x, seen = jax.lax.platform_dependent(
                x, cpu=lambda x: layers(x, 1), default=lambda x: layers(x, self.num_layers))
        else:
            x, seen = layers(x, self.unroll)
        return (self.final_norm(x), seen) if record else self.final_norm(x)

    def block(self, i: int) -> Block:
        """The i-th block, unstacked (for inspection and parameter counts)."""
        return jax.tree_util.tree_map(lambda a: a[i] if eqx.is_array(a) else a, self.blocks)
