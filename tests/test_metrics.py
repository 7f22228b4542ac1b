"""Loss and docs/experiment.md §8 metrics on hand-made logits where every value is known."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from eicl_cli.metrics import METRIC_NAMES, aggregate, batch_metrics, cross_entropy, loss_fn

C = 6  # labels 0,1 few-shot; 2,3 rare; 4,5 common
MASKS = {
    "fewshot": np.array([1, 1, 0, 0, 0, 0], bool),
    "rare": np.array([0, 0, 1, 1, 0, 0], bool),
    "common": np.array([0, 0, 0, 0, 1, 1], bool),
    "closed": np.array([1, 1, 0, 0, 0, 0], bool),
}


def _one_hot_logits(index: int, value: float = 5.0, second: int | None = None,
                    second_value: float = 0.0) -> np.ndarray:
    row = np.zeros(C, np.float32)
    row[index] = value
    if second is not None:
        row[second] = second_value
    return row


def _batch():
    """Four sequences of 3 items (2 context + query). Query rows:
    0: predicts 1 (target 1), context labels [0, 1]  -> right, fewshot, support;
    1: predicts 4 (target 0), closed argmax is 0     -> wrong, closed right, common, no support;
    2: predicts 2 (target 3), context [2, 5]         -> wrong, rare, support, closed picks 1;
    3: predicts 5 (target 5), context [5, 5]         -> right, common, support; closed picks 0.
    """
    labels = np.array([[0, 1, 1], [1, 1, 0], [2, 5, 3], [5, 5, 5]], np.int32)
    logits = np.zeros((4, 3, C), np.float32)
    logits[0, -1] = _one_hot_logits(1)
    logits[1, -1] = _one_hot_logits(4, 5.0, second=0, second_value=2.0)
    logits[2, -1] = _one_hot_logits(2, 5.0, second=1, second_value=1.0)
    logits[3, -1] = _one_hot_logits(5)
    return jnp.asarray(logits), jnp.asarray(labels)


def _ce(row: np.ndarray, target: int) -> float:
    return float(np.log(np.exp(row).sum()) - row[target])


def test_every_metric_on_hand_made_logits():
    logits, labels = _batch()
    m = {k: float(v) for k, v in batch_metrics(logits, labels, MASKS).items()}
    assert set(m) == set(METRIC_NAMES)
    rows = np.asarray(logits)[:, -1]
    expected_loss = np.mean([_ce(rows[i], int(labels[i, -1])) for i in range(4)])
    assert m["accuracy_query"] == pytest.approx(2 / 4)
    # closed argmax over {0, 1}: row0 -> 1 (t 1) ok, row1 -> 0 (t 0) ok,
    # row2 -> 1 (t 3) wrong, row3 -> 0 (tie, first) (t 5) wrong.
    assert m["accuracy_closed"] == pytest.approx(2 / 4)
    assert m["loss_query"] == pytest.approx(expected_loss, rel=1e-6)
    assert m["from_fewshot"] == pytest.approx(1 / 4)
    assert m["from_rare"] == pytest.approx(1 / 4)
    assert m["from_common"] == pytest.approx(2 / 4)
    assert m["from_support"] == pytest.approx(3 / 4)
    assert m["from_support_fewshot"] == pytest.approx(1 / 4)
    assert m["from_support_rare"] == pytest.approx(1 / 4)
    assert m["from_support_common"] == pytest.approx(1 / 4)  # row 1's 4 is not in its context


def test_query_label_in_context_does_not_count_as_support():
    # The query's own label sits at position -1; only positions :-1 are context.
    labels = jnp.array([[0, 0, 3]])
    logits = jnp.zeros((1, 3, C)).at[0, -1, 3].set(9.0)
    m = batch_metrics(logits, labels, MASKS)
    assert float(m["from_support"]) == 0.0
    assert float(m["accuracy_query"]) == 1.0


def test_context_logits_do_not_change_query_metrics():
    logits, labels = _batch()
    noisy = logits.at[:, :-1].set(100.0 * jnp.arange(C, dtype=jnp.float32))
    a, b = batch_metrics(logits, labels, MASKS), batch_metrics(noisy, labels, MASKS)
    for k in METRIC_NAMES:
        assert float(a[k]) == float(b[k]), k  # same program, same query logits: exact


def test_polysemy_counts_any_label_of_a_rare_class_and_only_of_a_rare_class():
    # X = 2: rare labels 2, 3 are one class's; common labels 4 and 5 are two
    # classes. Queries (target, prediction): rare (2, 2), (2, 3), (2, 4);
    # common (4, 4), (4, 5). The original's pred // X == target // X also
    # took 5 for 4.
    targets, preds = [2, 2, 2, 4, 4], [2, 3, 4, 4, 5]
    labels = jnp.array([[0, 0, t] for t in targets])
    logits = jnp.zeros((5, 3, C))
    for i, p in enumerate(preds):
        logits = logits.at[i, -1, p].set(9.0)
    strict = batch_metrics(logits, labels, MASKS)
    poly = batch_metrics(logits, labels, MASKS, polysemy=2)
    assert float(strict["accuracy_query"]) == pytest.approx(2 / 5)
    assert float(poly["accuracy_query"]) == pytest.approx(3 / 5)
    # Closed over the rare and common labels: the same predictions.
    masks = MASKS | {"closed": np.array([0, 0, 1, 1, 1, 1], bool)}
    assert float(batch_metrics(logits, labels, masks)["accuracy_closed"]) == pytest.approx(2 / 5)
    assert float(batch_metrics(logits, labels, masks, polysemy=2)["accuracy_closed"]) == \
        pytest.approx(3 / 5)


def test_missing_mask_is_refused():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="closed"):
        batch_metrics(logits, labels, {k: v for k, v in MASKS.items() if k != "closed"})


def test_loss_query_only_is_mean_query_cross_entropy():
    logits, labels = _batch()
    # Context logits are huge and wrong: they must not enter the query-only loss.
    logits = logits.at[:, :-1, 3].set(50.0)
    rows = np.asarray(logits)[:, -1]
    expected = np.mean([_ce(rows[i], int(labels[i, -1])) for i in range(4)])
    assert float(loss_fn(logits, labels, 0.0)) == pytest.approx(expected, rel=1e-6)


def test_loss_uniform_logits_is_log_num_classes():
    labels = jnp.zeros((2, 5), jnp.int32)
    assert float(loss_fn(jnp.zeros((2, 5, C)), labels)) == pytest.approx(math.log(C), rel=1e-6)


def test_loss_w_interim_weights_query_and_context():
    # One sequence of 3 images: context CEs c0, c1 and query CE q.
    labels = jnp.array([[0, 1, 2]])
    logits = jnp.stack([jnp.asarray(_one_hot_logits(0, 3.0)),   # right, CE small
                        jnp.asarray(_one_hot_logits(4, 2.0)),   # wrong
                        jnp.asarray(_one_hot_logits(2, 1.0))])[None]
    ce = np.asarray(cross_entropy(logits, labels))[0]
    w = 0.4
    expected = (1 - w) * ce[2] + w * (ce[0] + ce[1]) / 2
    assert float(loss_fn(logits, labels, w)) == pytest.approx(expected, rel=1e-6)
    assert float(loss_fn(logits, labels, 1.0)) == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-6)


def test_aggregate_weights_batches_by_size():
    a = {"accuracy_query": jnp.float32(1.0)}
    b = {"accuracy_query": jnp.float32(0.25)}
    out = aggregate([(a, 2), (b, 6)])
    assert out["accuracy_query"] == pytest.approx((2 * 1.0 + 6 * 0.25) / 8)
    with pytest.raises(ValueError):
        aggregate([])


def test_loss_on_query_only_logits_equals_the_query_loss_of_all_logits():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 5, 7)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 7, size=(4, 5)))
    np.testing.assert_allclose(float(loss_fn(logits[:, -1:], labels, 0.0)),
                               float(loss_fn(logits, labels, 0.0)), rtol=1e-6)
