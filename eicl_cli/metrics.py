"""Loss and the metrics of docs/experiment.md §8, computed on device for a whole batch.

Inputs are the model's per-image logits (B, L, C) (position L-1 is the query)
and the labels (B, L). The label masks come from the sequence generator
(`label_masks(mode)`): `common`, `rare`, `fewshot` (labels 0..ways-1) and
`closed` (the labels that can be right in the mode), each (C,) bool.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

METRIC_NAMES = (
    "accuracy_query", "accuracy_closed", "loss_query",
    "from_common", "from_rare", "from_fewshot",
    "from_support", "from_support_common", "from_support_rare", "from_support_fewshot",
)
MASK_NAMES = ("common", "rare", "fewshot", "closed")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy per position, in float32: (B, L, C), (B, L) -> (B, L)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def loss_fn(logits: jax.Array, labels: jax.Array, w_interim: float = 0.0) -> jax.Array:
    """The training loss: mean over sequences of the query's cross-entropy,
    or, with w_interim > 0, of (1 - w) * query CE + w * the mean CE of the
    context images' predictions (the original's weighting). Logits may cover
    only the last positions (forward_batch's query_only): they pair with the
    last labels."""
    labels = labels[:, labels.shape[1] - logits.shape[1]:]
    ce = cross_entropy(logits, labels)
    n_context = labels.shape[1] - 1
    if (isinstance(w_interim, (int, float)) and w_interim == 0) or n_context == 0:
        # A Python branch: 0 * a non-finite context loss must not leak in.
        return ce[:, -1].mean()
    per_seq = (1.0 - w_interim) * ce[:, -1] + w_interim * ce[:, :-1].mean(axis=1)
    return per_seq.mean()


def batch_metrics(logits: jax.Array, labels: jax.Array, masks: Mapping[str, jax.Array],
                  *, polysemy: int = 1) -> dict[str, jax.Array]:
    """Per-batch means of every docs/experiment.md §8 metric, on the query position.

    - accuracy_query: argmax over all labels equals the target;
    - accuracy_closed: argmax over the `closed` labels only equals the target;
    - loss_query: the query's cross-entropy;
    - from_common / from_rare / from_fewshot: the prediction lies in that mask;
    - from_support: the prediction is one of the labels shown in the context
      of that sequence; from_support_X: from_support and from_X together.
    `polysemy` X > 1 (no_support_rare / _zipfian after ordered_polysemyX
    training, where rare class i owns the rare labels i X .. i X + X - 1)
    counts a rare query right, in both accuracies, when the prediction is any
    of its class's X labels. Other labels still have to match exactly: the
    original's test, prediction // X == target // X for every query, also
    took a common class for its neighbour (common labels are one per class).
    Aggregate across batches with `aggregate` (weights by batch size).
    """
    missing = [m for m in MASK_NAMES if m not in masks]
    if missing:
        raise ValueError(f"batch_metrics needs label masks {missing}")
    common, rare, fewshot, closed = (jnp.asarray(masks[m], bool) for m in MASK_NAMES)
    q_logits = logits[:, -1].astype(jnp.float32)
    target = labels[:, -1]
    pred = jnp.argmax(q_logits, axis=-1)
    pred_closed = jnp.argmax(jnp.where(closed, q_logits, -jnp.inf), axis=-1)

    def names_target(p: jax.Array) -> jax.Array:
        if polysemy == 1:
            return p == target
        same_class = rare[target] & rare[p] & (p // polysemy == target // polysemy)
        return (p == target) | same_class

    from_support = (pred[:, None] == labels[:, :-1]).any(axis=1)
    from_common, from_rare, from_fewshot = common[pred], rare[pred], fewshot[pred]
    values = {
        "accuracy_query": names_target(pred),
        "accuracy_closed": names_target(pred_closed),
        "loss_query": optax.softmax_cross_entropy_with_integer_labels(q_logits, target),
        "from_common": from_common,
        "from_rare": from_rare,
        "from_fewshot": from_fewshot,
        "from_support": from_support,
        "from_support_common": from_support & from_common,
        "from_support_rare": from_support & from_rare,
        "from_support_fewshot": from_support & from_fewshot,
    }
    return {k: v.astype(jnp.float32).mean() for k, v in values.items()}


def aggregate(batches: Iterable[tuple[Mapping[str, jax.Array | float], int]]) -> dict[str, float]:
    """Exact means over several batches: [(batch_metrics(...), batch_size), ...]."""
    totals: dict[str, float] = {}
    count = 0
    for values, n in batches:
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + float(np.asarray(v)) * n
        count += n
    if count == 0:
        raise ValueError("aggregate needs at least one non-empty batch")
    return {k: v / count for k, v in totals.items()}
