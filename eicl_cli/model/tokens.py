"""Turning a sequence of (example embedding, label) pairs into model tokens.

Two layouts, as the original:
- interleaved (default): [x1, y1, x2, y2, ..., xq], 2L - 1 tokens of emb_dim;
  the query's label is never embedded;
- concatenate_labels: L tokens of 2 * emb_dim, concat(x_i, y_i), the query's
  label replaced by an extra "blank" row of the label table.
Then sinusoidal positional encodings (timescale base 30, not 10,000) are added,
with optional dropout on them during training.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .layers import dropout, truncated_normal

POSITIONAL_BASE = 30.0
LABEL_TABLE_STD = 0.02


def positional_encodings(n_tokens: int, dim: int, base: float = POSITIONAL_BASE) -> jax.Array:
    """(n_tokens, dim): sines in the first half, cosines in the second, of
    position * base ** (-2i / dim) for i = 0 .. dim/2 - 1."""
    pos = jnp.arange(n_tokens, dtype=jnp.float32)
    inv_freq = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = pos[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def n_tokens(seq_len: int, concatenate_labels: bool) -> int:
    return seq_len if concatenate_labels else 2 * seq_len - 1


def image_positions(seq_len: int, concatenate_labels: bool) -> jax.Array:
    """Token index of each image: the tokens whose outputs are predictions."""
    step = 1 if concatenate_labels else 2
    return jnp.arange(seq_len) * step


class Tokenizer(eqx.Module):
    """Label table, token layout, positional encodings and their dropout."""

    label_table: jax.Array  # (num_classes [+1 blank], emb_dim)
    concatenate_labels: bool = eqx.field(static=True)
    use_positional_encodings: bool = eqx.field(static=True)
    positional_dropout_prob: float = eqx.field(static=True)

    def __init__(self, num_classes: int, emb_dim: int, key: jax.Array, *,
                 concatenate_labels: bool = False, use_positional_encodings: bool = True,
                 positional_dropout_prob: float = 0.0):
        rows = num_classes + (1 if concatenate_labels else 0)
        self.label_table = truncated_normal(key, (rows, emb_dim), LABEL_TABLE_STD)
        self.concatenate_labels = concatenate_labels
        self.use_positional_encodings = use_positional_encodings
        self.positional_dropout_prob = positional_dropout_prob

    @property
    def width(self) -> int:
        """Token width: emb_dim, or 2 * emb_dim with concatenate_labels."""
        return self.label_table.shape[1] * (2 if self.concatenate_labels else 1)

    def __call__(self, h_examples: jax.Array, labels: jax.Array, *, pos_key: jax.Array | None,
                 inference: bool) -> jax.Array:
        """h_examples (L, E), labels (L,) int -> tokens (T, width)."""
        dtype = h_examples.dtype
        seq_len = labels.shape[0]
        if self.concatenate_labels:
            blank = self.label_table.shape[0] - 1
            shown = labels.at[-1].set(blank)
            h_labels = self.label_table[shown].astype(dtype)
            tokens = jnp.concatenate([h_examples, h_labels], axis=-1)
        else:
            # Only the context labels are embedded: the query's never is.
            h_labels = self.label_table[labels[:-1]].astype(dtype)
            pairs = jnp.stack([h_examples[:-1], h_labels], axis=1)  # (L-1, 2, E)
            tokens = jnp.concatenate([pairs.reshape(2 * (seq_len - 1), -1), h_examples[-1:]])
        if self.use_positional_encodings:
            pe = positional_encodings(tokens.shape[0], tokens.shape[1])
            if not inference:
                pe = dropout(pos_key, self.positional_dropout_prob, pe)
            tokens = tokens + pe.astype(dtype)
        return tokens
