"""The whole model: encoder -> tokens -> sequence model -> dense head.

`Model.__call__` handles ONE sequence; `forward_batch` is the one way the rest
of eicl runs a batch: the encoder on all of its images at once (so batch norm
reduces over the whole batch, as hk.BatchApply gives the original), then the
rest vmapped over sequences.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .. import config as config_mod
from ..config import Config
from ..errors import EiclError
from .encoders import Encoder, build_encoder
from .layers import Dense, LayerNorm, TiedHead, dropout, split
from .rnn import RNNStack
from .tokens import LABEL_TABLE_STD, Tokenizer, image_positions
from .transformer import Intervention, Transformer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Model(eqx.Module):
    """Example encoder -> label table and token layout -> transformer or RNN
    stack -> dense head to num_classes. Parameters are float32; batch-norm
    running statistics live in the eqx.nn.State that build_model returns."""

    encoder: Encoder
    example_norm: LayerNorm | None
    tokenizer: Tokenizer
    core: Transformer | RNNStack
    head: Dense | TiedHead
    kind: str = eqx.field(static=True)  # transformer | lstm | vanilla_rnn
    encoder_name: str = eqx.field(static=True)
    example_dropout_prob: float = eqx.field(static=True)
    compute_dtype: str = eqx.field(static=True)  # float32 | bfloat16

    @property
    def num_classes(self) -> int:
        return self.head.bias.shape[0]

    def __call__(self, examples: jax.Array, labels: jax.Array, state: eqx.nn.State, *,
                 key: jax.Array | None, inference: bool, pos_key: jax.Array | None = None,
                 query_only: bool = False) -> tuple[jax.Array, eqx.nn.State]:
        """One sequence: examples (L, H, W) float in [0, 1] or (L,) int, labels
        (L,) int (the last one, the query's, is never shown) -> logits
        (L, num_classes) float32, the prediction at each image, and the new
        state. `pos_key` (optional) draws the positional-dropout mask; the
        original shares that mask across the batch, so forward_batch passes
        one pos_key to every sequence. `query_only` returns (1, num_classes),
        the query's logits alone: the head is a per-token dense layer, so the
        numbers are the same, but with thousands of classes it is most of the
        step's work and the query-only loss and all metrics need no more."""
        h, state = self.encode(examples, state, inference=inference)
        return self.logits(h, labels, key=key, inference=inference, pos_key=pos_key,
                           query_only=query_only), state

    def encode(self, examples: jax.Array, state: eqx.nn.State, *, inference: bool
               ) -> tuple[jax.Array, eqx.nn.State]:
        """Examples of any number of sequences, (N, H, W) or (N,) -> features
        (N, emb_dim) in the compute dtype, and the new state; batch norm's
        statistics are those of all N."""
        return self.encoder(examples, state, inference=inference,
                            dtype=_DTYPES[self.compute_dtype])

    def logits(self, h: jax.Array, labels: jax.Array, *, key: jax.Array | None,
               inference: bool, pos_key: jax.Array | None = None,
               query_only: bool = False, intervene: Intervention | None = None,
               record: bool = False):
        """One sequence's encoded examples h (L, emb_dim) and labels (L,) ->
        logits, as __call__ returns them. A transformer also takes the
        probe's `intervene` and `record` (Transformer.__call__); with
        `record` the result is (logits, (attention weights, head outputs))."""
        dtype = _DTYPES[self.compute_dtype]
        if key is not None:
            k_example, k_pos, k_core = jax.random.split(key, 3)
        else:
            k_example = k_pos = k_core = None
        if self.example_norm is not None:
            h = self.example_norm(h)
        # As the original, example dropout is noise on the inputs, not a
        # regulariser: it applies at evaluation too.
        h = dropout(k_example, self.example_dropout_prob, h.astype(dtype))
        tokens = self.tokenizer(h, labels, pos_key=pos_key if pos_key is not None else k_pos,
                                inference=inference)
        if record or intervene is not None:
            out = self.core(tokens, k_core, inference=inference, dtype=dtype,
                            intervene=intervene, record=record)
            out, seen = out if record else (out, None)
        else:
            out = self.core(tokens, k_core, inference=inference, dtype=dtype)
        positions = image_positions(labels.shape[0], self.tokenizer.concatenate_labels)
        if query_only:
            positions = positions[-1:]
        if isinstance(self.head, TiedHead):
            logits = self.head(out[positions], self.tokenizer.label_table, dtype)
        else:
            logits = self.head(out[positions], dtype)
        return (logits.astype(jnp.float32), seen) if record else logits.astype(jnp.float32)


def forward_batch(model: Model, state: eqx.nn.State, examples: jax.Array, labels: jax.Array,
                  *, key: jax.Array | None, inference: bool, query_only: bool = False
                  ) -> tuple[jax.Array, eqx.nn.State]:
    """A batch: examples (B, L, ...) and labels (B, L) -> logits (B, L, C) and
    the new state (B, 1, C with `query_only`). Batch norm reduces over all
    B * L images. Each sequence gets its own dropout key split from `key`;
    None is allowed when no dropout is configured (and at evaluation unless
    example dropout is on)."""
    n = labels.shape[0]
    h, state = model.encode(examples.reshape(-1, *examples.shape[2:]), state,
                            inference=inference)
    h = h.reshape(n, -1, *h.shape[1:])
    return logits_batch(model, h, labels, key=key, inference=inference,
                        query_only=query_only), state


def logits_batch(model: Model, h: jax.Array, labels: jax.Array, *, key: jax.Array | None,
                 inference: bool, query_only: bool = False,
                 intervene: Intervention | None = None, record: bool = False):
    """The batch's encoded examples h (B, L, emb_dim) -> logits as
    forward_batch returns them, each sequence drawing its dropout as there;
    `intervene` (shared by every sequence) and `record` as Model.logits, the
    recorded arrays gaining a leading batch axis."""
    n = labels.shape[0]
    if key is None:
        pos_key, seq_keys = None, None
    else:
        pos_key, k_seq = jax.random.split(key)
        seq_keys = jax.random.split(k_seq, n)

    def one(h, lab, k):
        return model.logits(h, lab, key=k, inference=inference, pos_key=pos_key,
                            query_only=query_only, intervene=intervene, record=record)

    return jax.vmap(one, in_axes=(0, 0, 0 if seq_keys is not None else None))(
        h, labels, seq_keys)


def default_image_shape(cfg: Config) -> tuple[int, int] | None:
    """(H, W) of the images the model sees, or None for symbolic data."""
    if cfg.data.dataset == "symbolic":
        return None
    return (28, 28) if cfg.preproc.downsample else (105, 105)


def build_model(cfg: Config, key: jax.Array, image_shape: tuple[int, ...] | None = None
                ) -> tuple[Model, eqx.nn.State]:
    """The model of docs/experiment.md §6 for `cfg`, and its initial state (the batch-norm
    running statistics). image_shape (H, W); None means the shape the config
    implies (105 x 105, 28 x 28 when downsampling, None for symbolic data)."""
    if image_shape is None:
        image_shape = default_image_shape(cfg)
    elif len(image_shape) == 0:  # symbolic examples are scalars: images.shape[1:] == ()
        image_shape = None
    e, t, r = cfg.embedding, cfg.transformer, cfg.rnn
    num_classes = config_mod.num_classes(cfg)
    k_enc, k_lab, k_core, k_head = split(key, 4)
    encoder = build_encoder(
        e.example_encoder, emb_dim=e.emb_dim, image_shape=image_shape, key=k_enc,
        blocks_per_group=e.resnet_blocks_per_group,
        channels_per_group=e.resnet_channels_per_group, conv_channels=e.conv_channels,
        flatten_superpixels=e.flatten_superpixels, symbolic_vocab=cfg.data.symbolic_classes,
        conv_impl=e.conv_impl, stem_impl=e.stem_impl)
    tokenizer = Tokenizer(num_classes, e.emb_dim, k_lab,
                          concatenate_labels=e.concatenate_labels,
                          use_positional_encodings=e.use_positional_encodings,
                          positional_dropout_prob=e.positional_dropout_prob)
    width = tokenizer.width
    kind = cfg.model.kind
    if kind == "transformer":
        if width % t.num_heads:
            raise EiclError(f"transformer.num_heads = {t.num_heads} must divide the token "
                            f"width {width}")
        core = Transformer(width, t.num_layers, t.num_heads, t.widening_factor,
                           t.dropout_prob, k_core, unroll=t.unroll)
        head_in = width
    elif kind in ("lstm", "vanilla_rnn"):
        core = RNNStack(kind, width, r.hidden_size, r.num_layers, r.dropout_prob, k_core)
        head_in = r.hidden_size
    else:
        raise EiclError(f"model.kind = {kind!r} is not allowed; "
                        "choose one of: transformer, lstm, vanilla_rnn")
    if cfg.model.dtype not in _DTYPES:
        raise EiclError(f"model.dtype = {cfg.model.dtype!r} is not allowed; "
                        f"choose one of: {', '.join(_DTYPES)}")
    if e.label_head == "dense":
        head = Dense(head_in, num_classes, k_head, init="variance_scaling")
    else:  # config.validate has checked that head_in == emb_dim
        head = TiedHead(num_classes, e.emb_dim, LABEL_TABLE_STD, k_head,
                        dense=e.label_head == "both")
    example_norm = LayerNorm(e.emb_dim) if e.normalize_examples else None
    model = Model(encoder=encoder, example_norm=example_norm, tokenizer=tokenizer, core=core,
                  head=head, kind=kind, encoder_name=e.example_encoder,
                  example_dropout_prob=e.example_dropout_prob, compute_dtype=cfg.model.dtype)
    state = eqx.nn.State(model)
    # The initial state now lives in `state`; drop the copy inside the model
    # so that it is not mistaken for parameters.
    return eqx.nn.delete_init_state(model), state


def _count(tree) -> int:
    leaves = jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array))
    return sum(int(x.size) for x in leaves)


def parameter_counts(model: Model) -> list[tuple[str, int]]:
    """Trainable parameters per module, in forward order, then ("total", n).
    Batch-norm running statistics are state, not parameters, and not counted."""
    rows = [("label table", _count(model.tokenizer)),
            (f"encoder ({model.encoder_name})", _count(model.encoder))]
    if model.example_norm is not None:
        rows.append(("example LayerNorm", _count(model.example_norm)))
    if isinstance(model.core, Transformer):
        rows += [(f"transformer block {i + 1}", _count(model.core.block(i)))
                 for i in range(model.core.num_layers)]
        rows.append(("final LayerNorm", _count(model.core.final_norm)))
    else:
        rows += [(f"{model.kind} layer {i + 1}", _count(layer))
                 for i, layer in enumerate(model.core.layers)]
    rows.append(("head", _count(model.head)))
    rows.append(("total", sum(n for _, n in rows)))
    assert rows[-1][1] == _count(model), "a module is missing from the parameter table"
    return rows
