"""The Equinox model of docs/experiment.md §6: parameter counts, shapes, causality, batch norm,
tokens, initialisers and mixed precision. Tiny sizes throughout."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eicl_cli import config
from eicl_cli.errors import EiclError
from eicl_cli.model import build_model, forward_batch, parameter_counts
from eicl_cli.model.layers import BatchNorm
from eicl_cli.model.tokens import positional_encodings

ROOT = Path(__file__).resolve().parents[1]
IMAGE = (12, 12)
N_CLASSES = 15  # 10 rare + 3 common + 2 holdout


def tiny_cfg(encoder: str = "linear", kind: str = "transformer", concat: bool = False,
             **sections) -> config.Config:
    symbolic = encoder == "embedding"
    raw = {
        "data": {"dataset": "symbolic" if symbolic else "synthetic", "symbolic_classes": 20},
        "classes": {"n_rare": 10, "n_common": 3, "n_holdout": 2},
        "embedding": {"emb_dim": 8, "example_encoder": encoder, "concatenate_labels": concat,
                      "resnet_blocks_per_group": [1, 1, 1, 1],
                      "resnet_channels_per_group": [4, 4, 8], "conv_channels": [4, 4]},
        "model": {"kind": kind},
        "transformer": {"num_layers": 2, "num_heads": 2},
        "rnn": {"num_layers": 2, "hidden_size": 8},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config.from_dict(raw)


def tiny_inputs(cfg: config.Config, batch: int = 3, seq_len: int = 5, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    if cfg.data.dataset == "symbolic":
        examples = jax.random.randint(k1, (batch, seq_len), 0, cfg.data.symbolic_classes)
    else:
        examples = jax.random.uniform(k1, (batch, seq_len) + IMAGE)
    labels = jax.random.randint(k2, (batch, seq_len), 0, N_CLASSES)
    return examples, labels


def image_shape(cfg):
    return None if cfg.data.dataset == "symbolic" else IMAGE


@pytest.fixture(scope="module")
def tiny_resnet():
    """One tiny ResNet + transformer shared by several tests, so that its
    compiled train and eval steps are reused (each build has fresh state
    markers and would compile again)."""
    cfg = tiny_cfg("resnet")
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    return cfg, model, state


@eqx.filter_jit
def run(model, state, examples, labels, key, inference):
    return forward_batch(model, state, examples, labels, key=key, inference=inference)


# ---------------------------------------------------------------- parameter counts

def test_paper_default_model_has_the_originals_parameter_count():
    cfg = config.load(ROOT / "configs" / "images_all_exemplars.toml")
    model, _ = build_model(cfg, jax.random.PRNGKey(0))
    rows = dict(parameter_counts(model))
    assert rows["label table"] == 103_872
    assert rows["encoder (resnet)"] == 22_176
    assert [rows[f"transformer block {i}"] for i in range(1, 13)] == [49_984] * 12
    assert rows["final LayerNorm"] == 128
    assert rows["head"] == 105_495
    assert rows["total"] == 831_479
    assert "transformer block 13" not in rows


def test_debug_variant_has_the_originals_parameter_count():
    cfg = config.load(ROOT / "configs" / "images_all_exemplars.toml",
                      ["transformer.num_layers=2", "transformer.num_heads=2"])
    model, _ = build_model(cfg, jax.random.PRNGKey(0))
    assert parameter_counts(model)[-1] == ("total", 331_639)


def test_rnn_parameter_counts_follow_haiku_cores():
    e, h, c = 8, 8, N_CLASSES
    lstm, _ = build_model(tiny_cfg(kind="lstm"), jax.random.PRNGKey(0), IMAGE)
    rows = dict(parameter_counts(lstm))
    assert rows["lstm layer 1"] == (e + h) * 4 * h + 4 * h
    assert rows["head"] == h * c + c
    rnn, _ = build_model(tiny_cfg(kind="vanilla_rnn"), jax.random.PRNGKey(0), IMAGE)
    rows = dict(parameter_counts(rnn))
    assert rows["vanilla_rnn layer 2"] == h * h + h + h * h + h  # two biases, as Haiku


def test_build_is_deterministic_in_the_key():
    cfg = tiny_cfg("resnet")
    a, _ = build_model(cfg, jax.random.PRNGKey(3), IMAGE)
    b, _ = build_model(cfg, jax.random.PRNGKey(3), IMAGE)
    c, _ = build_model(cfg, jax.random.PRNGKey(4), IMAGE)
    la, lb, lc = (jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_array)) for m in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(la, lb))
    assert not np.array_equal(la[0], lc[0])


# ---------------------------------------------------------------- shapes

GRID = list(itertools.product(["resnet", "linear", "conv", "embedding"],
                              ["transformer", "lstm", "vanilla_rnn"], [False, True]))


@pytest.mark.parametrize("encoder,kind,concat", GRID)
def test_output_shapes_for_every_encoder_model_and_layout(encoder, kind, concat):
    cfg = tiny_cfg(encoder, kind, concat)
    model, state = build_model(cfg, jax.random.PRNGKey(0), image_shape(cfg))
    examples, labels = tiny_inputs(cfg, batch=3, seq_len=5)
    for inference in (False, True):
        logits, new_state = eqx.filter_eval_shape(
            lambda m, s: forward_batch(m, s, examples, labels, key=jax.random.PRNGKey(1),
                                       inference=inference), model, state)
        assert logits.shape == (3, 5, N_CLASSES)
        assert logits.dtype == jnp.float32
        assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)


# (resnet + transformer runs in the batch-norm tests below.)
@pytest.mark.parametrize("encoder,kind", [("conv", "lstm"), ("embedding", "vanilla_rnn")])
def test_forward_runs_and_is_finite(encoder, kind):
    cfg = tiny_cfg(encoder, kind)
    model, state = build_model(cfg, jax.random.PRNGKey(0), image_shape(cfg))
    examples, labels = tiny_inputs(cfg)
    logits, _ = run(model, state, examples, labels, jax.random.PRNGKey(1), False)
    assert logits.shape == (3, 5, N_CLASSES)
    assert bool(jnp.isfinite(logits).all())


def test_paper_model_shapes_on_full_size_and_downsampled_images():
    cfg = config.load(ROOT / "configs" / "images_all_exemplars.toml")
    for shape in ((105, 105), (28, 28)):
        model, state = build_model(cfg, jax.random.PRNGKey(0), shape)
        examples = jnp.zeros((2, 9) + shape)
        labels = jnp.zeros((2, 9), jnp.int32)
        feats, _ = eqx.filter_eval_shape(
            lambda m, s: m.encoder(examples.reshape(18, *shape), s, inference=False),
            model, state)
        assert feats.shape == (18, 64)
        logits, _ = eqx.filter_eval_shape(
            lambda m, s: forward_batch(m, s, examples, labels, key=None, inference=False),
            model, state)
        assert logits.shape == (2, 9, 1623)


def test_flatten_superpixels_needs_a_four_by_four_map():
    cfg = tiny_cfg("resnet", embedding={"emb_dim": 64, "flatten_superpixels": True})
    model, state = build_model(cfg, jax.random.PRNGKey(0), (105, 105))  # 4 x 4 x 4 = 64
    assert model.encoder.blocks[-1].convs[-1].weight.shape[-1] == 4
    images = jnp.zeros((2, 3, 105, 105))
    feats, _ = eqx.filter_eval_shape(
        lambda m, s: m.encoder(images.reshape(6, 105, 105), s, inference=False), model, state)
    assert feats.shape == (6, 64)
    with pytest.raises(EiclError, match="flatten_superpixels"):
        build_model(cfg, jax.random.PRNGKey(0), (28, 28))
    with pytest.raises(EiclError, match=">= 4"):
        build_model(tiny_cfg("resnet", embedding={"emb_dim": 32, "flatten_superpixels": True}),
                    jax.random.PRNGKey(0), (105, 105))


def test_w_interim_with_concatenated_labels_is_refused():
    # Refused when the config is read, before a run folder exists.
    with pytest.raises(EiclError, match="w_interim = 0.5 needs interleaved tokens"):
        tiny_cfg("linear", concat=True, train={"w_interim": 0.5})


# ---------------------------------------------------------------- causality

def _perturb(examples, labels, j, symbolic):
    if symbolic:
        examples = examples.at[:, j].set((examples[:, j] + 7) % 20)
    else:
        examples = examples.at[:, j].set(1.0 - examples[:, j])
    return examples, labels.at[:, j].set((labels[:, j] + 5) % N_CLASSES)


@pytest.mark.parametrize("kind", ["transformer", "lstm", "vanilla_rnn"])
@pytest.mark.parametrize("concat", [False, True])
def test_later_items_never_change_earlier_logits(kind, concat):
    cfg = tiny_cfg("linear", kind, concat)
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    examples, labels = tiny_inputs(cfg, batch=2, seq_len=5)
    base, _ = run(model, state, examples, labels, None, True)
    for j in (1, 3):
        ex2, lab2 = _perturb(examples, labels, j, False)
        out, _ = run(model, state, ex2, lab2, None, True)
        np.testing.assert_array_equal(np.asarray(out[:, :j]), np.asarray(base[:, :j]))
        assert not np.allclose(out[:, j:], base[:, j:])  # the change is seen later on
    # Changing only label j: interleaved, image j's prediction comes before its
    # label token; concatenated, item j's token holds its own label.
    lab3 = labels.at[:, 2].set((labels[:, 2] + 5) % N_CLASSES)
    out, _ = run(model, state, examples, lab3, None, True)
    first_changed = 2 if concat else 3
    np.testing.assert_array_equal(np.asarray(out[:, :first_changed]),
                                  np.asarray(base[:, :first_changed]))
    assert not np.allclose(out[:, first_changed:], base[:, first_changed:])


@pytest.mark.parametrize("concat", [False, True])
def test_query_label_is_never_shown(concat):
    cfg = tiny_cfg("embedding", "transformer", concat)
    model, state = build_model(cfg, jax.random.PRNGKey(0), None)
    examples, labels = tiny_inputs(cfg)
    base, _ = run(model, state, examples, labels, None, True)
    out, _ = run(model, state, examples, labels.at[:, -1].set(0), None, True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_resnet_transformer_is_causal_at_evaluation(tiny_resnet):
    cfg, model, state = tiny_resnet
    examples, labels = tiny_inputs(cfg)
    # Give the running statistics real values first.
    _, state = run(model, state, examples, labels, None, False)
    base, _ = run(model, state, examples, labels, None, True)
    ex2, lab2 = _perturb(examples, labels, 3, False)
    out, _ = run(model, state, ex2, lab2, None, True)
    # Same program, same inputs for the rows before the change: exact.
    np.testing.assert_allclose(np.asarray(out[:, :3]), np.asarray(base[:, :3]), rtol=0, atol=0)


# ---------------------------------------------------------------- batch norm

def _bn_layers(model) -> list[BatchNorm]:
    return [x for x in jax.tree_util.tree_leaves(model, is_leaf=lambda x: isinstance(x, BatchNorm))
            if isinstance(x, BatchNorm)]


def test_training_updates_running_statistics_over_all_images_of_the_batch(tiny_resnet):
    cfg, model, state = tiny_resnet
    examples, labels = tiny_inputs(cfg, batch=3, seq_len=5)
    _, state1 = run(model, state, examples, labels, None, False)
    norms = _bn_layers(model)
    assert len(norms) == 1 + 4 * 3 + 4  # initial + 3 per block + 4 projections
    for bn in norms:
        assert int(state1.get(bn.stats)[2]) == 1
    # The first batch norm's (zero-debiased) running averages are exactly the
    # statistics of the first conv's output over all 3 x 5 images.
    first = model.encoder.initial_norm
    conv = model.encoder.initial_conv(examples.reshape((-1,) + IMAGE)[..., None])
    mean, var = first.running_averages(state1)
    # Moments (tests/TOLERANCES.md): the model's float32 E[x^2] - E[x]^2
    # against NumPy-style mean and var of another program's map.
    np.testing.assert_allclose(mean, conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(var, conv.var((0, 1, 2)), rtol=1e-3, atol=1e-6)
    # Hidden values follow the 0.9 decay; a second step moves them again.
    hidden_mean = state1.get(first.stats)[0]
    np.testing.assert_allclose(hidden_mean, 0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-7)
    ex_b, lab_b = tiny_inputs(cfg, batch=3, seq_len=5, seed=9)
    _, state2 = run(model, state1, ex_b, lab_b, None, False)
    conv_b = model.encoder.initial_conv(ex_b.reshape((-1,) + IMAGE)[..., None])
    # Moments, as above, through one more decay step.
    np.testing.assert_allclose(state2.get(first.stats)[0],
                               0.9 * hidden_mean + 0.1 * conv_b.mean((0, 1, 2)),
                               rtol=1e-4, atol=1e-7)
    assert int(state2.get(first.stats)[2]) == 2


def test_evaluation_uses_running_statistics_and_ignores_the_rest_of_the_batch(tiny_resnet):
    cfg, model, state = tiny_resnet
    ex_a, lab_a = tiny_inputs(cfg, batch=3, seed=1)
    _, state = run(model, state, ex_a, lab_a, None, False)
    ex_b, lab_b = tiny_inputs(cfg, batch=3, seed=2)
    # Same first sequence, different companions.
    ex_b, lab_b = ex_b.at[0].set(ex_a[0]), lab_b.at[0].set(lab_a[0])
    eval_a, state_after = run(model, state, ex_a, lab_a, None, True)
    eval_b, _ = run(model, state, ex_b, lab_b, None, True)
    assert bool(jnp.isfinite(eval_a).all())
    # The same compiled program, and row 0's inputs are the same: exact.
    np.testing.assert_array_equal(eval_a[0], eval_b[0])
    # Evaluation leaves the state alone.
    for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state_after)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # In training the batch statistics do depend on the companions.
    train_a, _ = run(model, state, ex_a, lab_a, None, False)
    train_b, _ = run(model, state, ex_b, lab_b, None, False)
    assert not np.allclose(train_a[0], train_b[0], rtol=1e-5, atol=1e-5)


def test_bottleneck_last_norm_starts_with_zero_scale(tiny_resnet):
    _, model, _ = tiny_resnet
    for block in model.encoder.blocks:
        assert float(jnp.abs(block.norms[2].scale).max()) == 0.0
        assert float(block.norms[0].scale.min()) == 1.0


# ---------------------------------------------------------------- tokens and initialisers

def test_positional_encodings_use_base_30():
    pe = np.asarray(positional_encodings(17, 8))
    t, i = 5, 1
    # Math: float32 sin and cos against float64 NumPy.
    assert pe[t, i] == pytest.approx(np.sin(t / 30 ** (2 * i / 8)), rel=1e-5)
    assert pe[t, 4 + i] == pytest.approx(np.cos(t / 30 ** (2 * i / 8)), rel=1e-5)


@pytest.mark.parametrize("concat", [False, True])
def test_token_layout(concat):
    cfg = tiny_cfg("embedding", concat=concat, embedding={"use_positional_encodings": False})
    model, _ = build_model(cfg, jax.random.PRNGKey(0), None)
    tok = model.tokenizer
    h = jnp.arange(3 * 8, dtype=jnp.float32).reshape(3, 8)
    labels = jnp.array([4, 7, 9])
    out = tok(h, labels, pos_key=None, inference=True)
    table = tok.label_table
    if concat:
        assert out.shape == (3, 16) and table.shape == (N_CLASSES + 1, 8)
        np.testing.assert_array_equal(out[1], jnp.concatenate([h[1], table[7]]))
        np.testing.assert_array_equal(out[2], jnp.concatenate([h[2], table[N_CLASSES]]))
    else:
        assert out.shape == (5, 8) and table.shape == (N_CLASSES, 8)
        expected = jnp.stack([h[0], table[4], h[1], table[7], h[2]])
        np.testing.assert_array_equal(out, expected)


def test_label_table_initialiser_is_truncated_normal_std_002():
    cfg = config.load(ROOT / "configs" / "images_all_exemplars.toml")
    model, _ = build_model(cfg, jax.random.PRNGKey(0))
    table = np.asarray(model.tokenizer.label_table)
    assert np.abs(table).max() <= 0.04 + 1e-7
    # A normal truncated at 2 sigma has std 0.02 * 0.8796.
    assert table.std() == pytest.approx(0.02 * 0.8796, rel=0.02)


# ---------------------------------------------------------------- dropout and mixed precision

def test_positional_and_transformer_dropout_apply_in_training_only():
    cfg = tiny_cfg("linear", embedding={"positional_dropout_prob": 0.5},
                   transformer={"dropout_prob": 0.5})
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    examples, labels = tiny_inputs(cfg)
    a, _ = run(model, state, examples, labels, jax.random.PRNGKey(1), False)
    b, _ = run(model, state, examples, labels, jax.random.PRNGKey(2), False)
    assert not np.allclose(a, b)
    c, _ = run(model, state, examples, labels, jax.random.PRNGKey(1), True)
    d, _ = run(model, state, examples, labels, None, True)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    with pytest.raises(ValueError, match="key"):
        run(model, state, examples, labels, None, False)


def test_example_dropout_applies_at_evaluation_too():
    cfg = tiny_cfg("linear", embedding={"example_dropout_prob": 0.5})
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    examples, labels = tiny_inputs(cfg)
    a, _ = run(model, state, examples, labels, jax.random.PRNGKey(1), True)
    b, _ = run(model, state, examples, labels, jax.random.PRNGKey(2), True)
    assert not np.allclose(a, b)


def test_bfloat16_keeps_float32_params_and_logits_close_to_float32(tiny_resnet):
    cfg32, m32, s32 = tiny_resnet
    cfg16 = tiny_cfg("resnet", model={"dtype": "bfloat16"})
    m16, s16 = build_model(cfg16, jax.random.PRNGKey(0), IMAGE)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
        eqx.filter(m16, eqx.is_inexact_array)))
    examples, labels = tiny_inputs(cfg32)
    l32, _ = run(m32, s32, examples, labels, None, False)
    l16, st16 = run(m16, s16, examples, labels, None, False)
    assert l16.dtype == jnp.float32
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree_util.tree_leaves(st16))
    # bfloat16 through the whole ResNet and transformer: logits of order 1
    # after tens of roundings of 0.4%; the next line checks bfloat16 was used.
    np.testing.assert_allclose(l16, l32, atol=0.1)
    assert not np.array_equal(np.asarray(l16), np.asarray(l32))


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_loss_is_differentiable_through_every_part(tiny_resnet, kind):
    from eicl_cli.metrics import loss_fn

    if kind == "transformer":
        cfg, model, state = tiny_resnet
    else:
        cfg = tiny_cfg("resnet", kind)
        model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    examples, labels = tiny_inputs(cfg)

    @eqx.filter_jit
    def grads(m, s):
        def loss(m):
            logits, new_s = forward_batch(m, s, examples, labels, key=None, inference=False)
            return loss_fn(logits, labels, 0.5), new_s
        return eqx.filter_grad(loss, has_aux=True)(m)

    g, _ = grads(model, state)
    leaves = jax.tree_util.tree_leaves(eqx.filter(g, eqx.is_inexact_array))
    assert all(bool(jnp.isfinite(x).all()) for x in leaves)
    for part in (g.tokenizer.label_table, g.head.weight, g.encoder.initial_conv.weight,
                 g.encoder.blocks[0].norms[2].scale):
        assert float(jnp.abs(part).max()) > 0


@pytest.mark.parametrize("kind,concat", [("transformer", False), ("transformer", True),
                                         ("lstm", False)])
def test_query_only_logits_equal_the_query_row_of_all_logits(kind, concat):
    cfg = tiny_cfg("linear", kind, concat)
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    examples, labels = tiny_inputs(cfg)
    full, _ = forward_batch(model, state, examples, labels, key=None, inference=True)
    query, _ = forward_batch(model, state, examples, labels, key=None, inference=True,
                             query_only=True)
    assert full.shape == (3, 5, N_CLASSES) and query.shape == (3, 1, N_CLASSES)
    # Reordered: the query row alone is another program (other matmul shapes)
    # over the same short sums.
    np.testing.assert_allclose(np.asarray(query[:, 0]), np.asarray(full[:, -1]), rtol=1e-6,
                               atol=1e-6)


# ---------------------------------------------------------------- label heads

def test_tied_head_logits_are_the_label_table_times_the_output():
    cfg = tiny_cfg("linear", embedding={"label_head": "tied"})
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    assert dict(parameter_counts(model))["head"] == N_CLASSES + 1  # the bias and the scale
    untied, _ = build_model(tiny_cfg("linear"), jax.random.PRNGKey(0), IMAGE)
    assert dict(parameter_counts(untied))["head"] == 8 * N_CLASSES + N_CLASSES
    both, _ = build_model(tiny_cfg("linear", embedding={"label_head": "both"}),
                          jax.random.PRNGKey(0), IMAGE)
    assert dict(parameter_counts(both))["head"] == 8 * N_CLASSES + N_CLASSES + 1
    # The logits are scale * h @ table.T + bias: moving one label's row moves
    # that label's logit, by the dot product with the final features.
    examples, labels = tiny_inputs(cfg)
    delta = jnp.zeros(8).at[0].set(1.0)
    moved = eqx.tree_at(lambda m: m.tokenizer.label_table, model,
                        model.tokenizer.label_table.at[4].add(delta))
    # Label 4 must not be shown, or its token (and so the features) would move too.
    labels = jnp.where(labels[:, :-1] == 4, 5, labels[:, :-1])
    labels = jnp.concatenate([labels, jnp.full((3, 1), 4)], axis=1)
    before, _ = forward_batch(model, state, examples, labels, key=None, inference=True,
                              query_only=True)
    after, _ = forward_batch(moved, state, examples, labels, key=None, inference=True,
                             query_only=True)
    diff = np.asarray(after - before)[:, 0]
    assert np.abs(np.delete(diff, 4, axis=-1)).max() < 1e-6
    assert np.abs(diff[:, 4]).min() > 1e-4


def test_both_head_starts_as_the_dense_head():
    dense, state = build_model(tiny_cfg("linear"), jax.random.PRNGKey(0), IMAGE)
    both, _ = build_model(tiny_cfg("linear", embedding={"label_head": "both"}),
                          jax.random.PRNGKey(0), IMAGE)
    assert float(both.head.scale) == 0.0
    examples, labels = tiny_inputs(tiny_cfg("linear"))
    a, _ = forward_batch(dense, state, examples, labels, key=None, inference=True)
    b, _ = forward_batch(both, state, examples, labels, key=None, inference=True)
    # Reordered: the "both" head adds a zero-scaled term in another fusion.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head", ["tied", "both"])
def test_tied_head_trains_a_label_row_from_the_target_alone(head):
    # A label that is only ever the query's target is never embedded as a
    # token, so only the tied readout can send its row a gradient.
    cfg = tiny_cfg("linear", embedding={"label_head": head})
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    if head == "both":
        model = eqx.tree_at(lambda m: m.head.scale, model, jnp.asarray(1.0))
    examples, labels = tiny_inputs(cfg)
    labels = jnp.where(labels == 7, 6, labels).at[:, -1].set(7)

    def loss(m):
        logits, _ = forward_batch(m, state, examples, labels, key=None, inference=True,
                                  query_only=True)
        return -jax.nn.log_softmax(logits[:, 0])[:, 7].mean()

    g = eqx.filter_grad(loss)(model)
    assert float(jnp.abs(g.tokenizer.label_table[7]).max()) > 0
    assert float(jnp.abs(g.head.scale)) > 0


@pytest.mark.parametrize("kind,concat", [("transformer", True), ("lstm", False)])
def test_tied_head_needs_an_emb_dim_wide_output(kind, concat):
    # Refused when the config is read, before a run folder exists.
    with pytest.raises(EiclError, match="label_head"):
        tiny_cfg("linear", kind, concat, embedding={"label_head": "tied"},
                 rnn={"hidden_size": 12})


def test_unknown_label_head_is_refused():
    with pytest.raises(EiclError, match="'shared'.*dense, tied, both"):
        tiny_cfg("linear", embedding={"label_head": "shared"})


def test_normalize_examples_gives_every_image_token_the_same_scale():
    cfg = tiny_cfg("linear", embedding={"normalize_examples": True,
                                        "use_positional_encodings": False})
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    assert dict(parameter_counts(model))["example LayerNorm"] == 2 * 8
    examples, _ = tiny_inputs(cfg)
    # Faint and heavy images (a tenth and ten times the ink) give embeddings
    # of very different sizes, and tokens of the same size.
    x = jnp.stack([0.1 * examples[0], 10.0 * examples[0]])
    h, _ = model.encoder(x.reshape(-1, *x.shape[2:]), state, inference=True)
    h = h.reshape(*x.shape[:2], -1)
    sizes = np.asarray(h.std(-1))
    assert sizes[1].min() > 5 * sizes[0].max()
    normed = np.asarray(model.example_norm(h))
    # Math: LayerNorm's float32 mean and variance (its epsilon moves the
    # variance of the faint embeddings below 1 by up to a percent).
    np.testing.assert_allclose(normed.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(normed.var(-1), 1.0, rtol=1e-2)
    plain, _ = build_model(tiny_cfg("linear"), jax.random.PRNGKey(0), IMAGE)
    assert plain.example_norm is None and "example LayerNorm" not in dict(parameter_counts(plain))


@pytest.mark.parametrize("unroll", [2, 3, 7])
def test_unrolled_layer_loop_is_the_same_model(unroll):
    """transformer.unroll changes how the layers are looped over, not the
    parameters, the outputs or the gradients (dropout on: the per-layer keys
    must line up too). 3 layers: unroll 2 leaves a remainder, 7 > layers."""
    sections = dict(transformer={"num_layers": 3, "num_heads": 2, "dropout_prob": 0.3})
    looped = tiny_cfg("linear", **sections)
    sections["transformer"]["unroll"] = unroll
    unrolled = tiny_cfg("linear", **sections)
    m1, s1 = build_model(looped, jax.random.PRNGKey(0), IMAGE)
    m2, s2 = build_model(unrolled, jax.random.PRNGKey(0), IMAGE)
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(m1, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(m2, eqx.is_array))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    examples, labels = tiny_inputs(looped)
    key = jax.random.PRNGKey(3)

    def loss(model, state):
        logits, _ = forward_batch(model, state, examples, labels, key=key, inference=False)
        return jnp.mean(logits ** 2)

    (l1, g1), (l2, g2) = (eqx.filter_jit(eqx.filter_value_and_grad(loss))(m, s)
                          for m, s in ((m1, s1), (m2, s2)))
    # Reordered: the unrolled loop is another program (other fusions); the
    # gradient sums through three layers (rtol 1e-5).
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)

    def scan_unrolls(model) -> set[int]:
        text = str(jax.make_jaxpr(lambda m: forward_batch(
            m, s1, examples, labels, key=key, inference=False)[0])(model))
        return {int(u) for u in re.findall(r"unroll=(\d+)", text)}

    assert 1 in scan_unrolls(m1) and min(unroll, 3) in scan_unrolls(m2)


def test_auto_unroll_loops_over_layers_on_a_cpu_and_unrolls_them_for_a_gpu():
    """transformer.unroll = 0 (the default): the CPU's step keeps the loop
    over layers (the same program as unroll = 1), a GPU's has none."""
    sections = dict(transformer={"num_layers": 3, "num_heads": 2, "unroll": 0})
    cfg = tiny_cfg("linear", **sections)
    model, state = build_model(cfg, jax.random.PRNGKey(0), IMAGE)
    examples, labels = tiny_inputs(cfg)
    f = jax.jit(lambda m: forward_batch(m, state, examples, labels, key=None,
                                        inference=True)[0])
    cpu = f.trace(model).lower(lowering_platforms=("cpu",)).as_text()
    gpu = f.trace(model).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.while" in cpu and "stablehlo.while" not in gpu
    sections["transformer"]["unroll"] = 1
    looped, _ = build_model(tiny_cfg("linear", **sections), jax.random.PRNGKey(0), IMAGE)
    np.testing.assert_array_equal(f(model), f(looped))


@pytest.mark.parametrize("encoder", ["resnet", "conv"])
def test_gemm_convolutions_are_the_same_model(encoder):
    """embedding.conv_impl = "gemm" computes the same encoder (parameters,
    outputs, gradients, batch-norm statistics) without XLA's convolution."""
    xla, gemm = tiny_cfg(encoder), tiny_cfg(encoder, embedding={"conv_impl": "gemm"})
    m1, s1 = build_model(xla, jax.random.PRNGKey(0), IMAGE)
    m2, s2 = build_model(gemm, jax.random.PRNGKey(0), IMAGE)
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(m1, eqx.is_array)),
                    jax.tree_util.tree_leaves(eqx.filter(m2, eqx.is_array)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    examples, labels = tiny_inputs(xla)

    def loss(model, state):
        logits, new_state = forward_batch(model, state, examples, labels, key=None,
                                          inference=False)
        return jnp.mean(logits ** 2), new_state

    value_and_grad = eqx.filter_value_and_grad(loss, has_aux=True)
    grad = eqx.filter_jit(value_and_grad)
    ((l1, st1), g1), ((l2, st2), g2) = grad(m1, s1), grad(m2, s2)
    # Reordered, and the gradient reordered against its largest entry: GEMM
    # convolutions against XLA's; batch-norm statistics reordered means.
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(np.asarray(a)).max()))
    for a, b in zip(jax.tree_util.tree_leaves(st1), jax.tree_util.tree_leaves(st2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    jaxpr = lambda m, s: str(jax.make_jaxpr(lambda m: value_and_grad(m, s))(m))
    assert "conv_general_dilated" in jaxpr(m1, s1)
    assert "conv_general_dilated" not in jaxpr(m2, s2)


def test_unknown_conv_impl_is_refused():
    with pytest.raises(config.ConfigError, match="embedding.conv_impl = 'cudnn'.*xla, gemm"):
        tiny_cfg("resnet", embedding={"conv_impl": "cudnn"})
    with pytest.raises(config.ConfigError, match="embedding.stem_impl = 'triton'.*auto, pallas"):
        tiny_cfg("resnet", embedding={"stem_impl": "triton"})


def test_stem_impl_pallas_is_the_same_model_off_a_gpu():
    """embedding.stem_impl = "pallas" changes only what a CUDA GPU compiles:
    the same parameters and, on this machine, the same step to the bit."""
    auto, pallas = tiny_cfg("resnet"), tiny_cfg("resnet", embedding={"stem_impl": "pallas"})
    m1, s1 = build_model(auto, jax.random.PRNGKey(0), IMAGE)
    m2, s2 = build_model(pallas, jax.random.PRNGKey(0), IMAGE)
    assert m2.encoder.stem_impl == "pallas"
    examples, labels = tiny_inputs(auto)

    def loss(model, state):
        logits, new_state = forward_batch(model, state, examples, labels, key=None,
                                          inference=False)
        return jnp.mean(logits ** 2), new_state

    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    for a, b in zip(jax.tree_util.tree_leaves(grad(m1, s1)),
                    jax.tree_util.tree_leaves(grad(m2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
