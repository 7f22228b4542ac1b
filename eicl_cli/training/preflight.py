"""What `eicl train` and a stacked sweep task check before a run folder
exists, and how the folder is made: a refusal (a missing data cache, a batch
the devices cannot split, labels the data cannot give) leaves no folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax

from .. import config as config_mod, environment, runs
from ..config import Config
from ..errors import EiclError
from ..parallel import Placement, is_writer, process_count


def with_cache_identity(cfg: Config, cache_file: str, cache_sha256: str) -> Config:
    """The config with data.cache_file / cache_sha256 filled in (what a run records)."""
    return cfg.replace(data=dataclasses.replace(cfg.data, cache_file=cache_file,
                                                cache_sha256=cache_sha256))


def resolved_config(cfg: Config) -> Config:
    """The config as a new run records it, without loading the images: the
    cache's path and checksum are filled in when the cache exists."""
    if cfg.data.dataset == "symbolic":
        return with_cache_identity(cfg, "", "")
    from ..data.cache import cache_path, sha256_file
    path = cache_path(config_mod.data_dir(cfg), cfg.data.dataset)
    if not path.is_file():
        return cfg
    return with_cache_identity(cfg, str(path.resolve()), sha256_file(path))


def check_stem_impl(cfg: Config, n_devices: int, backend: str) -> None:
    """Refuse the stem's Pallas kernels on a data mesh of GPUs: XLA cannot
    split a kernel's batch over devices the way it splits its own ops, and
    that has not been tried on a GPU."""
    e = cfg.embedding
    if (e.example_encoder == "resnet" and e.stem_impl == "pallas" and n_devices > 1
            and backend == "gpu"):
        raise EiclError(f"embedding.stem_impl = 'pallas' runs on one GPU per run, not split "
                        f"over {n_devices} devices; use 'auto' here (or one GPU per run, "
                        "e.g. CUDA_VISIBLE_DEVICES=0)")


def placement(cfg: Config) -> Placement:
    """Where one run's arrays go on this process's devices (one device: as
    is; several: a data mesh), or a one-line refusal of what cannot run there."""
    place = Placement.for_batch(cfg.train.batch_size)
    check_stem_impl(cfg, place.n_devices, jax.default_backend())
    return place


def train_config(config: Path | None, out: Path | None, overrides: list[str],
                 resume: Path | None) -> Config:
    """The config `eicl train` runs: a resumed run's own (with --set changes),
    a config file's, or the defaults (the paper's experiment)."""
    if resume is not None:
        if config is not None or out is not None:
            raise EiclError("--resume continues a run with its own config and folder; "
                            "drop --config/--out (change keys with --set)")
        if not (resume / runs.CONFIG_FILE).exists():
            raise EiclError(f"--resume {resume}: not a run folder (no {runs.CONFIG_FILE})")
        return runs.read_config(resume, overrides)
    if config is not None:
        return config_mod.load(config, overrides)
    return config_mod.from_dict(config_mod.apply_overrides({}, overrides))


@dataclass
class Start:
    """Runs ready to train: their configs, folders and the loaded dataset."""
    cfgs: list[Config]
    run_dirs: list[Path]
    dataset: Any
    resume: bool


def _load_checked(cfgs: list[Config]) -> Any:
    """The dataset, after every check that needs it: before any folder is made."""
    from ..data.dataset import load_dataset
    from ..data.sequences import SequenceGenerator
    environment.enable_compile_cache()
    dataset = load_dataset(cfgs[0])
    for cfg in cfgs:  # labels or all_unique parts the data cannot give
        SequenceGenerator(dataset, cfg)
    return dataset


def start_run(cfg: Config, config_path: Path | None, out: Path | None,
              resume: Path | None) -> Start:
    """Check a run, then make its folder and write its config (a new run),
    or take the folder to resume."""
    if process_count() > 1 and resume is None and out is None:
        # A default name holds the start time, which the hosts would not agree on.
        raise EiclError("multi-host training needs --out RUN (a folder on a filesystem every "
                        "host shares) or --resume RUN, so that all processes name one folder")
    dataset = _load_checked([cfg])
    placement(cfg)  # a batch or stem the devices refuse
    if resume is not None:
        return Start([cfg], [resume], dataset, resume=True)
    cfg = with_cache_identity(cfg, dataset.cache_file, dataset.cache_sha256)
    if is_writer():  # process 0 makes the folder; the others write nothing
        run_dir = runs.new_run_dir(cfg, config_path, out)
    else:
        run_dir = out
    return Start([cfg], [run_dir], dataset, resume=False)


def start_stack(sweep_dir: Path, names: list[str]) -> Start:
    """Sweep runs to train in one stacked step: each run's folder if it has
    one, else its config from the sweep's configs/ (its folder made here)."""
    from .trainer import check_stackable
    dirs = [sweep_dir / name for name in names]
    cfgs = [runs.read_config(d) if (d / runs.CONFIG_FILE).exists()
            else config_mod.load(sweep_dir / "configs" / f"{name}.toml")
            for name, d in zip(names, dirs)]
    check_stackable(cfgs, names)
    dataset = _load_checked(cfgs)
    for i, run_dir in enumerate(dirs):
        if not (run_dir / runs.CONFIG_FILE).exists():
            cfgs[i] = with_cache_identity(cfgs[i], dataset.cache_file, dataset.cache_sha256)
            runs.new_run_dir(cfgs[i], None, run_dir)
    return Start(cfgs, dirs, dataset, resume=True)


def discard_if_unstarted(start: Start) -> None:
    """After a failure before training began (an out-of-memory model, say),
    remove the new run folders this start made that hold nothing but their
    config, so the same --out starts afresh; resumed folders stay."""
    if not start.resume and is_writer():
        for run_dir in start.run_dirs:
            runs.discard_unstarted(run_dir)
