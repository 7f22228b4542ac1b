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

    def attention(self, x: jax.Array, dtype) -> jax.Array:
        t, width = x.shape
        head_dim = width // self.num_heads
        q, k, v = jnp.split(self.qkv(x, dtype).reshape(t, 3, self.num_heads, head_dim), 3, axis=1)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]  # (T, H, D)
        scores = jnp.einsum("thd,shd->hts", q, k).astype(jnp.float32) / math.sqrt(head_dim)
        causal = jnp.tril(jnp.ones((t, t), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, _MASKED), axis=-1)
        mixed = jnp.einsum("hts,shd->thd", weights.astype(dtype), v).reshape(t, width)
        return self.out(mixed, dtype)

    def __call__(self, x: jax.Array, key: jax.Array | None, *, inference: bool, dtype):
        rate = 0.0 if inference else self.dropout_prob
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x = x + dropout(k1, rate, self.attention(self.norm_attn(x), dtype))
        h = jax.nn.gelu(self.mlp_in(self.norm_mlp(x), dtype))
        return x + dropout(k2, rate, self.mlp_out(h, dtype))


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

    def __call__(self, x: jax.Array, key: jax.Array | None, *, inference: bool, dtype
                 ) -> jax.Array:
        params, static = eqx.partition(self.blocks, eqx.is_array)
        needs_key = key is not None and not inference and self.blocks.dropout_prob > 0
        keys = jax.random.split(key, self.num_layers) if needs_key else None

        def step(h, layer):
            block_params, layer_key = layer
            block = eqx.combine(block_params, static)
            return block(h, layer_key, inference=inference, dtype=dtype), None

        def layers(x, unroll):
            return jax.lax.scan(step, x, (params, keys), unroll=min(unroll, self.num_layers))[0]

        if self.unroll == 0:  # auto: a loop for a CPU, every layer unrolled for a GPU
            x = jax.lax.platform_dependent(x, cpu=lambda x: layers(x, 1),
                                           default=lambda x: layers(x, self.num_layers))
        else:
            x = layers(x, self.unroll)
        return self.final_norm(x)

    def block(self, i: int) -> Block:
        """The i-th block, unstacked (for inspection and parameter counts)."""
        return jax.tree_util.tree_map(lambda a: a[i] if eqx.is_array(a) else a, self.blocks)
