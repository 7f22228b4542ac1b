"""Evaluation on fixed, seeded sets of sequences per mode, in large batches.

Every metric of docs/experiment.md §8 is computed per batch on the device
(metrics.py) as a mean; here the batch means are weighted by batch size and
summed on the device, so the result is the exact mean over all n sequences
whatever the batch size, with one device->host transfer per mode.

Which mode stands for ICL and which for IWL, and the ceiling reported
beside a few-shot accuracy, are the rules of eval_modes.py.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, environment, runs
from . import config as config_mod
from .config import Config
from .errors import EiclError
from .inputs import DeviceData, materialise, to_device
from .eval_modes import mode_ceiling, polysemy_factor, role
from .metrics import METRIC_NAMES as METRICS  # the §8 metrics, in display order
from .optim import evaluation_model, make_optimizer


def mode_key(seed: int, mode: str) -> jax.Array:
    """The key of `mode`'s fixed evaluation set; batch i draws its inputs
    and dropout from fold_in(key, i)."""
    return jax.random.fold_in(jax.random.key(seed), zlib.crc32(mode.encode()) & 0x7FFFFFFF)


@eqx.filter_jit
def _eval_batch(model: Any, state: Any, data: DeviceData, batch: dict[str, jax.Array],
                masks: dict[str, jax.Array], key: jax.Array, sums: dict[str, jax.Array],
                polysemy: int):
    """Add one batch's metrics, weighted by its size, to the running sums."""
    from .metrics import batch_metrics
    from .model import forward_batch
    k_inputs, k_model = jax.random.split(key)
    examples = materialise(data, batch, k_inputs)
    logits, _ = forward_batch(model, state, examples, batch["label"], key=k_model,
                              inference=True, query_only=True)
    m = batch_metrics(logits, batch["label"], masks, polysemy=polysemy)
    n = batch["label"].shape[0]
    return {k: sums[k] + n * jnp.asarray(m[k], jnp.float32) for k in METRICS}


def device_label_masks(generator: Any, kind: str) -> dict[str, jax.Array]:
    """The generator's label masks for `kind` sequences (the label ranges the
    metrics split answers by), on the device."""
    return {k: jnp.asarray(v) for k, v in generator.label_masks(kind).items()
            if isinstance(v, np.ndarray)}


def evaluate_modes(model: Any, state: Any, data: DeviceData, generator: Any, modes: list[str],
                   n: int, batch_size: int, seed: int) -> dict[str, dict[str, float]]:
    """{mode: {metric: mean over the mode's fixed n sequences, 'sequences': n}}."""
    out = {}
    for mode in modes:
        polysemy = polysemy_factor(generator.cfg, mode)
        masks = device_label_masks(generator, mode)
        base = mode_key(seed, mode)
        sums = {k: jnp.zeros((), jnp.float32) for k in METRICS}
        count = 0
        for i, batch in enumerate(generator.eval_batches(mode, n, batch_size)):
            sums = _eval_batch(model, state, data, to_device(batch), masks,
                               jax.random.fold_in(base, i), sums, polysemy)
            count += batch.size
        host = jax.device_get(sums)
        out[mode] = {k: float(host[k]) / count for k in METRICS}
        out[mode]["sequences"] = count
    return out


def table_rows(cfg: Config, results: dict[str, dict[str, float]]) -> list[dict]:
    """Rows for display.eval_table / the JSON output: headline role and ceiling per mode."""
    rows = []
    for mode, m in results.items():
        rows.append({
            "mode": mode, "role": role(mode), "ceiling": mode_ceiling(cfg, mode),
            "sequences": m["sequences"],
            "accuracy_query": m["accuracy_query"], "accuracy_closed": m["accuracy_closed"],
            "loss_query": m["loss_query"],
            "metrics": {k: m[k] for k in METRICS},
        })
    return rows


# ---------------------------------------------------------------- eval from disk

@dataclass
class Restored:
    cfg: Config
    model: Any
    state: Any
    step: int
    path: Path


def build_skeleton(cfg: Config, image_shape: tuple[int, ...]):
    """A freshly initialised (model, state) of the config's shapes, to load into."""
    from .model import build_model
    return build_model(cfg, jax.random.key(cfg.run.seed), image_shape)


def resolve_checkpoint(target: Path) -> Path | None:
    """A run folder -> the folder (after checking it has checkpoints); a
    checkpoint file -> None (its own errors are the answer)."""
    target = Path(target)
    if target.is_dir():
        if not runs.is_run_dir(target):
            raise EiclError(f"{target} is not a run folder (no {runs.CONFIG_FILE}) "
                            "and not a checkpoint file")
        if not runs.list_checkpoints(target):
            raise EiclError(f"run folder {target} has no checkpoints yet "
                            f"(looked in {runs.checkpoint_dir(target)})")
        return target
    if target.is_file():
        return None
    raise EiclError(f"{target} does not exist; give a run folder or a .safetensors checkpoint")


def restore_for_eval(target: Path, dataset_loader=None):
    """Load the model of a run folder (its newest intact checkpoint; corrupt
    ones are skipped with a warning) or of one checkpoint file, with the
    dataset and generator its config describes. A run folder's checkpoint
    must belong to the run: one written under another model or config is
    refused in one line. Each checkpoint is read once, before the data
    loads, so a trainer pruning it meanwhile takes nothing away."""
    from . import display
    run_dir = resolve_checkpoint(target)
    load = checkpoint_loader(run_dir, dataset_loader)
    if run_dir is None:  # one file: its error is the answer
        return load(Path(target))
    found = checkpoint.load_newest(lambda: runs.iter_newest_first(run_dir),
                                   runs.checkpoint_dir(run_dir), display.warn, load)
    if found is None:  # every one listed was deleted before it could be read
        raise EiclError(f"run folder {run_dir} has no checkpoints any more "
                        f"(looked in {runs.checkpoint_dir(run_dir)})")
    return found


def checkpoint_loader(run_dir: Path | None, dataset_loader=None):
    """A function: checkpoint path -> (Restored, device data, generator), as
    restore_for_eval returns them. With `run_dir`, each checkpoint must
    belong to that run. Checkpoints sharing a config share one loaded
    dataset; a dynamics checkpoint (weights only) loads as well as a
    resume checkpoint."""
    from . import display
    from .data.dataset import load_dataset
    from .data.sequences import SequenceGenerator
    from .inputs import device_data

    def prepare(cfg: Config):
        environment.enable_compile_cache()
        dataset = (dataset_loader or load_dataset)(cfg)
        if cfg.data.cache_sha256 and dataset.cache_sha256 and \
                dataset.cache_sha256 != cfg.data.cache_sha256:
            display.warn(f"the data cache {dataset.cache_file} differs from the one the run "
                         "was trained with (sha256 changed)")
        skeleton = build_skeleton(cfg, tuple(dataset.images.shape[1:]))
        return cfg, SequenceGenerator(dataset, cfg), device_data(dataset, cfg), skeleton

    prepared: list = []
    run_cfg = runs.read_config(run_dir) if run_dir is not None else None

    def load(path: Path):
        snapshot = checkpoint.read_snapshot(path)
        cfg = checkpoint.recorded_config(snapshot)
        if run_cfg is not None:
            checkpoint.check_config(snapshot, run_cfg, str(run_dir / runs.CONFIG_FILE),
                                    "it is not this run's; give the file itself to evaluate "
                                    "it under the config recorded in it")
        # The checkpoints of one run share a config: load its data once.
        if not prepared or prepared[0][0] != cfg:
            prepared[:] = [prepare(cfg)]
        _, generator, data, (model, state) = prepared[0]
        # The parameters' moving average, if the run kept one, lives in the
        # optimizer state: load that too, and evaluate the average. Its
        # skeleton is abstract (shapes only): nothing is allocated for the
        # Adam moments before the checkpoint's arrive.
        opt_state = None
        if cfg.train.ema_decay > 0 and not checkpoint.is_dynamics(snapshot):
            opt_state = jax.eval_shape(make_optimizer(cfg).init,
                                       eqx.filter(model, eqx.is_inexact_array))
        loaded = checkpoint.load(snapshot, model=model, state=state, opt_state=opt_state)
        model = evaluation_model(loaded.model, loaded.opt_state)
        return Restored(cfg, model, loaded.state, loaded.step, path), data, generator

    return load


def check_modes(modes: list[str]) -> None:
    for m in modes:
        if m not in config_mod.EVAL_MODES:
            raise EiclError(f"unknown eval mode {m!r}; choose from: "
                            f"{', '.join(config_mod.EVAL_MODES)}")
