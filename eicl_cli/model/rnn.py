"""Recurrent sequence models, as the original's hk.DeepRNN of LSTM or
VanillaRNN cores: the tokens go straight into the first layer, each layer's
hidden sequence into the next, zero initial state, no skip connections and no
final LayerNorm (the dense head reads the last layer's hidden state).

Cores follow Haiku: LSTM = one dense layer on concat(x, h) to the four gates
(i, g, f, o) with +1 added to the forget gate; vanilla RNN = relu(W_i x + b_i
+ W_h h + b_h). Both unroll with lax.scan.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .layers import Dense, dropout, split


class LSTMCore(eqx.Module):
    gates: Dense  # (in + hidden, 4 * hidden)

    def __init__(self, n_in: int, hidden: int, key: jax.Array):
        self.gates = Dense(n_in + hidden, 4 * hidden, key)

    def __call__(self, xs: jax.Array, dtype) -> jax.Array:
        hidden = self.gates.weight.shape[1] // 4
        # The input half of the matmul does not depend on the state: do it once.
        w = self.gates.weight.astype(dtype)
        n_in = xs.shape[-1]
        x_part = xs.astype(dtype) @ w[:n_in] + self.gates.bias.astype(dtype)
        w_h = w[n_in:]

        def step(carry, xg):
            h, c = carry
            g = (xg + h @ w_h).astype(jnp.float32)
            i, cand, f, o = jnp.split(g, 4)
            c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(cand)
            h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(dtype)
            return (h, c), h

        init = (jnp.zeros((hidden,), dtype), jnp.zeros((hidden,), jnp.float32))
        _, hs = jax.lax.scan(step, init, x_part)
        return hs


class VanillaRNNCore(eqx.Module):
    input_to_hidden: Dense
    hidden_to_hidden: Dense

    def __init__(self, n_in: int, hidden: int, key: jax.Array):
        k1, k2 = split(key, 2)
        self.input_to_hidden = Dense(n_in, hidden, k1)
        self.hidden_to_hidden = Dense(hidden, hidden, k2)

    def __call__(self, xs: jax.Array, dtype) -> jax.Array:
        x_part = self.input_to_hidden(xs, dtype)
        w_h = self.hidden_to_hidden.weight.astype(dtype)
        b_h = self.hidden_to_hidden.bias.astype(dtype)

        def step(h, xh):
            h = jax.nn.relu(xh + h @ w_h + b_h)
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros((w_h.shape[0],), dtype), x_part)
        return hs


class RNNStack(eqx.Module):
    """num_layers recurrent layers of hidden_size: (T, E) -> (T, hidden_size)."""

    layers: tuple[LSTMCore, ...] | tuple[VanillaRNNCore, ...]
    dropout_prob: float = eqx.field(static=True)

    def __init__(self, kind: str, width: int, hidden: int, num_layers: int,
                 dropout_prob: float, key: jax.Array):
        core = {"lstm": LSTMCore, "vanilla_rnn": VanillaRNNCore}[kind]
        keys = split(key, num_layers)
        self.layers = tuple(core(width if i == 0 else hidden, hidden, keys[i])
                            for i in range(num_layers))
        self.dropout_prob = dropout_prob

    def __call__(self, x: jax.Array, key: jax.Array | None, *, inference: bool, dtype
                 ) -> jax.Array:
        # The original accepts rnn.dropout_prob but never applies it; here it
        # drops each layer's outputs in training (a no-op at the paper's 0.0).
        rate = 0.0 if inference else self.dropout_prob
        keys = (jax.random.split(key, len(self.layers)) if key is not None and rate > 0
                else [None] * len(self.layers))
        for layer, k in zip(self.layers, keys):
            x = dropout(k, rate, layer(x, dtype))
        return x
