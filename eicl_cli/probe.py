"""Which attention heads do in-context learning: attention scores and
ablations of every head, on a run's fixed evaluation sequences.

For each checkpoint, mode, layer and head (docs/usage.md, Probing):
- label attention: the weight the query token puts on the context label
  tokens of items carrying the query's label (the copying step of an
  induction circuit), and on the other context labels;
- match attention: the weight the query puts on the context images of those
  items;
- previous-token score: the weight each context label token puts on the
  image just before it (the first step of an induction circuit);
- ablation: the mode's accuracies with that head's output replaced by its
  mean over the mode's sequences (or by zero), and with each whole layer's
  attention replaced so.
With concatenated tokens (embedding.concatenate_labels) an item's image and
label share one token: label and match attention are then one number, the
weight on the tokens of the query's label, and there is no previous-token
step to score.

The attention scores are means over the sequences whose context holds the
query's label (every few-shot sequence; no no-support one); the
previous-token score is a mean over all sequences. Sequences, inputs and
dropout draws are those of `eicl eval` (evaluate.mode_key), so the
unablated accuracies are the evaluation's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import runs
from .checkpoint import CheckpointError, CheckpointMismatch
from .errors import EiclError
from .eval_modes import polysemy_factor, role
from .evaluate import Restored, checkpoint_loader, device_label_masks, mode_key
from .inputs import DeviceData, materialise, to_device
from .model.tokens import n_tokens

SCORES = ("label_match", "label_other", "image_match", "previous_token")
ACCURACIES = ("accuracy_query", "accuracy_closed")
ABLATIONS = ("mean", "zero")


@dataclass
class ProbeResult:
    """One checkpoint's probe: per mode, the unablated accuracies, the
    scores (layers x heads; None where a mode has no such token), and the
    accuracies with each head and each layer ablated."""
    step: int
    path: Path
    layout: str  # interleaved | concatenated
    ablation: str  # mean | zero
    modes: dict[str, dict[str, Any]]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "checkpoint": str(self.path), "layout": self.layout,
                "ablation": self.ablation, "seconds": round(self.seconds, 3),
                "modes": self.modes}


# ---------------------------------------------------------------- which checkpoints

def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Every step a run kept, oldest first: its dynamics checkpoints and its
    rolling ones (the dynamics file where both hold a step)."""
    found = dict(runs.list_checkpoints(run_dir))
    found.update(runs.list_dynamics(run_dir))
    return sorted(found.items())


def select(run_dir: Path, step: int | None, every: bool) -> list[tuple[int, Path]]:
    """The checkpoints to probe: all of them, the one of `step`, or the newest."""
    if not runs.is_run_dir(run_dir):
        raise EiclError(f"{run_dir} is not a run folder (no {runs.CONFIG_FILE})")
    kept = checkpoints(run_dir)
    if not kept:
        raise EiclError(f"run folder {run_dir} has no checkpoints yet (looked in "
                        f"{runs.checkpoint_dir(run_dir)} and {runs.dynamics_dir(run_dir)})")
    if every:
        return kept
    if step is None:
        return kept[-1:]
    chosen = [(s, p) for s, p in kept if s == step]
    if not chosen:
        steps = ", ".join(str(s) for s, _ in kept[:20]) + (", ..." if len(kept) > 20 else "")
        raise EiclError(f"--step {step}: {run_dir} kept no checkpoint at that step; "
                        f"its steps: {steps}")
    return chosen


# ---------------------------------------------------------------- scores

def token_indices(seq_len: int, concatenated: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token index of each context item's image and of its label (the same
    token when concatenated)."""
    items = np.arange(seq_len - 1)
    if concatenated:
        return items, items
    return 2 * items, 2 * items + 1


def attention_scores(weights: jax.Array, labels: jax.Array, concatenated: bool
                     ) -> dict[str, jax.Array]:
    """Per-sequence scores: weights (B, layers, H, T, T), labels (B, L) ->
    {score: (B, layers, H)} and 'has_match' (B,), whether the context holds
    the query's label. previous_token is NaN with concatenated tokens."""
    images, label_tokens = token_indices(labels.shape[1], concatenated)
    query = weights[..., -1, :]  # (B, layers, H, T): what the query attends to
    same = (labels[:, :-1] == labels[:, -1:]).astype(jnp.float32)[:, None, None, :]
    on_labels = query[..., label_tokens]
    scores = {
        "label_match": (on_labels * same).sum(-1),
        "label_other": (on_labels * (1 - same)).sum(-1),
        "image_match": (query[..., images] * same).sum(-1),
    }
    if concatenated:
        scores["previous_token"] = jnp.full(scores["label_match"].shape, jnp.nan)
    else:
        scores["previous_token"] = weights[..., label_tokens, images].mean(-1)
    scores["has_match"] = same[:, 0, 0, :].max(-1)
    return scores


# ---------------------------------------------------------------- the device work

@eqx.filter_jit
def _encode(model: Any, state: Any, data: DeviceData, batch: dict[str, jax.Array],
            key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One evaluation batch's images, encoded as `eicl eval` encodes them;
    and the key its sequence model draws dropout from."""
    k_inputs, k_model = jax.random.split(key)
    examples = materialise(data, batch, k_inputs)
    n = batch["label"].shape[0]
    h, _ = model.encode(examples.reshape(-1, *examples.shape[2:]), state, inference=True)
    return h.reshape(n, -1, *h.shape[1:]), k_model


@eqx.filter_jit
def _forward(model: Any, h: jax.Array, labels: jax.Array, key: jax.Array, scale: jax.Array,
             fill: jax.Array, masks: dict[str, jax.Array], polysemy: int,
             concatenated: bool) -> dict[str, jax.Array]:
    """Sums over one batch: correct answers, scores (over the sequences with
    a match, previous_token over all), matches, and every head's output."""
    from .metrics import batch_metrics
    from .model import logits_batch
    logits, (weights, heads) = logits_batch(model, h, labels, key=key, inference=True,
                                            query_only=True, intervene=(scale, fill),
                                            record=True)
    n = labels.shape[0]
    m = batch_metrics(logits, labels, masks, polysemy=polysemy)
    scores = attention_scores(weights, labels, concatenated)
    match = scores["has_match"][:, None, None]
    out = {k: n * m[k] for k in ACCURACIES}
    out.update({k: (scores[k] * match).sum(0) for k in ("label_match", "label_other",
                                                        "image_match")})
    out["previous_token"] = scores["previous_token"].sum(0)
    out["matches"] = scores["has_match"].sum()
    out["heads"] = heads.sum(0)  # (layers, T, H, D)
    return out


def _mode_batches(restored: Restored, data: DeviceData, generator: Any, mode: str, n: int
                  ) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
    cfg = restored.cfg
    base = mode_key(cfg.eval.seed, mode)
    encoded = []
    for i, batch in enumerate(generator.eval_batches(mode, n, cfg.eval.batch_size)):
        device_batch = to_device(batch)
        h, key = _encode(restored.model, restored.state, data, device_batch,
                         jax.random.fold_in(base, i))
        encoded.append((h, device_batch["label"], key))
    return encoded


def _probe_mode(restored: Restored, data: DeviceData, generator: Any, mode: str, n: int,
                ablation: str) -> dict[str, Any]:
    model = restored.model
    core = model.core
    layers, heads = core.num_layers, core.blocks.num_heads
    concatenated = model.tokenizer.concatenate_labels
    masks = device_label_masks(generator, mode)
    polysemy = polysemy_factor(restored.cfg, mode)
    encoded = _mode_batches(restored, data, generator, mode, n)
    width = model.tokenizer.width
    tokens = n_tokens(encoded[0][0].shape[1], concatenated)
    zeros = jnp.zeros((layers, tokens, heads, width // heads), jnp.float32)

    def run(scale: np.ndarray, fill: jax.Array) -> dict[str, np.ndarray]:
        total: dict[str, Any] | None = None
        for h, labels, key in encoded:
            sums = _forward(model, h, labels, key, jnp.asarray(scale, jnp.float32), fill,
                            masks, polysemy, concatenated)
            total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
        return jax.device_get(total)

    keep = np.ones((layers, heads), np.float32)
    base = run(keep, zeros)
    count = sum(int(labels.shape[0]) for _, labels, _ in encoded)
    accuracy = {k: float(base[k]) / count for k in ACCURACIES}
    matches = float(base["matches"])
    scores: dict[str, Any] = {}
    def mean(total: np.ndarray, over: float) -> list:
        return np.round(np.asarray(total, np.float64) / over, 6).tolist()

    for k in ("label_match", "label_other", "image_match"):
        scores[k] = mean(base[k], matches) if matches else None
    scores["previous_token"] = None if concatenated else mean(base["previous_token"], count)
    fill = jnp.asarray(base["heads"] / count) if ablation == "mean" else zeros

    def ablated(scale: np.ndarray) -> dict[str, float]:
        sums = run(scale, fill)
        return {k: float(sums[k]) / count for k in ACCURACIES}

    per_head = []
    for layer in range(layers):
        row = []
        for head in range(heads):
            scale = keep.copy()
            scale[layer, head] = 0.0
            row.append(ablated(scale))
        per_head.append(row)
    per_layer = []
    for layer in range(layers):
        scale = keep.copy()
        scale[layer, :] = 0.0
        per_layer.append(ablated(scale))
    return {"role": role(mode), "sequences": count, "matched_sequences": int(matches),
            "accuracy": accuracy, "scores": scores,
            "head_ablated": per_head, "layer_ablated": per_layer}


def probe_run(run_dir: Path, *, step: int | None = None, every: bool = False,
              modes: list[str] | None = None, sequences: int | None = None,
              ablation: str = "mean", dataset_loader=None,
              warn: Callable[[str], None] | None = None) -> Iterator[ProbeResult]:
    """Probe the chosen checkpoints of a run, oldest first (see the module
    docstring). `modes` default to the run's eval.modes, `sequences` to its
    eval.train_sequences (the sets its training evaluations used). With
    `every` and `warn`, a corrupt checkpoint is skipped with a warning; one
    of another model or config is always refused."""
    if ablation not in ABLATIONS:
        raise EiclError(f"--ablation {ablation!r} is not allowed; choose one of: "
                        f"{', '.join(ABLATIONS)}")
    if sequences is not None and sequences < 1:
        raise EiclError(f"--sequences {sequences} is not allowed; give at least 1")
    run_dir = Path(run_dir)
    chosen = select(run_dir, step, every)
    cfg = runs.read_config(run_dir)
    if cfg.model.kind != "transformer":
        raise EiclError(f"eicl probe reads attention heads, and {run_dir} is a "
                        f"{cfg.model.kind} (model.kind = {cfg.model.kind!r}); probe a "
                        "transformer run")
    load = checkpoint_loader(run_dir, dataset_loader)
    for _, path in chosen:
        started = time.perf_counter()
        try:
            restored, data, generator = load(path)
        except CheckpointMismatch:
            raise
        except CheckpointError as e:
            # Over training, one damaged file costs one point of the curves,
            # not the rest of them; a checkpoint asked for by step is the answer.
            if not every or warn is None:
                raise
            warn(f"skipped {path.name}: {e}")
            continue
        use = list(modes or restored.cfg.eval.modes)
        n = sequences or restored.cfg.eval.train_sequences
        results = {m: _probe_mode(restored, data, generator, m, n, ablation) for m in use}
        layout = "concatenated" if restored.model.tokenizer.concatenate_labels else "interleaved"
        yield ProbeResult(restored.step, path, layout, ablation, results,
                          time.perf_counter() - started)


# ---------------------------------------------------------------- ranking

def ranked_heads(result: ProbeResult) -> list[dict[str, Any]]:
    """Every (layer, head) with its scores on the run's ICL mode (else the
    first mode that has them) and the change each mode's accuracies take
    when it is ablated, most important first: the largest fall in strict
    ICL, then in closed ICL, then the highest label attention."""
    modes = result.modes
    scored = next((m for m in modes if modes[m]["role"] == "ICL"), None) or \
        next((m for m in modes if modes[m]["scores"]["label_match"] is not None),
             next(iter(modes)))
    s = modes[scored]["scores"]
    layers = len(modes[scored]["head_ablated"])
    heads = len(modes[scored]["head_ablated"][0])
    rows = []
    for layer in range(layers):
        for head in range(heads):
            row = {"layer": layer, "head": head, "scores_mode": scored}
            for k in SCORES:
                row[k] = None if s[k] is None else s[k][layer][head]
            for mode, m in modes.items():
                row[mode] = {k: m["head_ablated"][layer][head][k] - m["accuracy"][k]
                             for k in ACCURACIES}
            rows.append(row)
    icl = modes[scored]

    def importance(row):
        drop = row[scored]
        return (drop["accuracy_query"], drop["accuracy_closed"],
                -(row["label_match"] or 0.0))

    if icl["role"] == "ICL":
        rows.sort(key=importance)
    else:
        rows.sort(key=lambda r: -(r["label_match"] or 0.0))
    return rows


def top_heads(results: list[ProbeResult], k: int) -> list[tuple[int, int]]:
    """Up to k heads to follow over training, alternating between the heads
    whose ablation costs strict ICL most at any checkpoint (a previous-token
    head, say) and those with the highest label attention at any checkpoint
    (the copying heads); scores as ranked_heads takes them."""
    cost: dict[tuple[int, int], float] = {}
    attention: dict[tuple[int, int], float] = {}
    for result in results:
        for row in ranked_heads(result):
            key = (row["layer"], row["head"])
            drop = -row[row["scores_mode"]]["accuracy_query"]
            cost[key] = max(cost.get(key, 0.0), drop)
            attention[key] = max(attention.get(key, 0.0), row["label_match"] or 0.0)
    by_cost = sorted(cost, key=lambda h: (-cost[h], h))
    by_attention = sorted(attention, key=lambda h: (-attention[h], h))
    chosen: list[tuple[int, int]] = []
    for pair in zip(by_cost, by_attention):
        for head in pair:
            if head not in chosen and len(chosen) < k:
                chosen.append(head)
    return chosen
