"""The CPU quickstart config and its sweep load, validate and expand (no training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from typer.testing import CliRunner

from eicl_cli import config as config_mod
from eicl_cli import sweep
from eicl_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.toml"
SWEEP = ROOT / "configs" / "sweeps" / "quickstart_burstiness.toml"
WITHIN_CLASS = ROOT / "configs" / "sweeps" / "quickstart_within_class.toml"
RECURRENT = ROOT / "configs" / "sweeps" / "quickstart_recurrent.toml"
LABELS = ["p_bursty=0", "p_bursty=0.5", "p_bursty=0.9", "p_bursty=1", "1623_classes", "zipf=1"]


def test_quickstart_config_is_the_cpu_model_on_augmented_omniglot() -> None:
    cfg = config_mod.load(QUICKSTART)
    assert cfg.data.dataset == "omniglot" and cfg.data.augment_images
    assert (cfg.classes.n_rare, cfg.classes.n_common, cfg.classes.n_holdout) == (12700, 100, 80)
    assert cfg.classes.preserve_ordering_every_n == 8
    assert cfg.preproc.downsample and cfg.preproc.invert
    assert cfg.embedding.example_encoder == "conv" and cfg.embedding.normalize_examples
    assert cfg.embedding.label_head == "dense"  # the paper's head
    assert cfg.sequences.p_bursty == 1.0
    # bursty training sequences have the few-shot evaluation's shape: 4 shots x 2 ways + query
    s = cfg.sequences
    assert s.bursty_shots == s.fs_shots == 4 and s.bursty_shots * s.ways + 1 == s.seq_len
    assert "fewshot_holdout" in cfg.eval.modes and "no_support_zipfian" in cfg.eval.modes
    assert 0 < cfg.run.steps <= 50_000
    # a resolved config written back to TOML reads back equal
    assert config_mod.from_toml(config_mod.to_toml(cfg)) == cfg


def test_quickstart_sweep_expands_to_its_six_points() -> None:
    spec = sweep.load_sweep(SWEEP)
    runs = sweep.expand(spec)
    assert [r.values["label"] for r in runs] == LABELS
    base = config_mod.load(QUICKSTART)
    by = {r.values["label"]: r.config for r in runs}
    assert [by[l].sequences.p_bursty for l in LABELS] == [0.0, 0.5, 0.9, 1.0, 0.9, 0.9]
    for cfg in by.values():
        # same model, steps and eval modes as the quickstart: only the data differ
        assert cfg.run.steps == base.run.steps
        assert cfg.embedding == base.embedding and cfg.transformer == base.transformer
        assert cfg.optimizer == base.optimizer and cfg.train == base.train
        assert cfg.eval.modes == base.eval.modes and cfg.preproc == base.preproc
    assert by["p_bursty=1"].replace(run=base.run) == base.replace(run=base.run)
    plain = by["1623_classes"]
    assert not plain.data.augment_images and plain.num_classes == 1623
    assert by["zipf=1"].classes.zipf_exponent == 1.0


def test_quickstart_sweep_dry_run_lists_its_points(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", str(SWEEP), "--dry-run", "--out", str(out),
                                      "--steps-per-s", "10"],  # no measuring here
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for label in LABELS:
        assert label in result.output
    assert "6 pending" in result.output
    assert not out.exists()  # a dry run writes nothing


def _points(path: Path) -> dict[str, config_mod.Config]:
    return {r.values["label"] if "label" in r.values else r.values["model.kind"]: r.config
            for r in sweep.expand(sweep.load_sweep(path))}


def test_within_class_sweep_differs_from_its_partners_only_in_exemplars() -> None:
    partners = _points(SWEEP)
    mine = _points(WITHIN_CLASS)
    assert sorted(mine) == ["identical", "identical_1623_classes"]
    for label, partner in [("identical", "p_bursty=0.9"), ("identical_1623_classes",
                                                           "1623_classes")]:
        cfg, other = mine[label], partners[partner]
        assert dataclasses.replace(cfg.data, exemplars="all") == other.data
        assert cfg.replace(data=other.data, run=other.run) == other
    assert mine["identical"].num_classes == 12880 and mine["identical_1623_classes"].num_classes == 1623


def test_recurrent_sweep_tunes_each_recurrent_model_of_the_quickstarts_depth() -> None:
    base = config_mod.load(QUICKSTART)
    runs = sweep.expand(sweep.load_sweep(RECURRENT))
    tried = {(r.config.model.kind, r.config.optimizer.max_lr, r.config.optimizer.warmup_steps)
             for r in runs}
    assert tried == {(k, lr, w) for k in ("lstm", "vanilla_rnn") for lr in (3e-4, 1e-3, 3e-3, 1e-2)
                     for w in (1000, 4000)}
    assert (base.optimizer.max_lr, base.optimizer.warmup_steps) == (1e-3, 1000)  # among them
    for r in runs:
        cfg = r.config
        assert (cfg.rnn.num_layers, cfg.rnn.hidden_size) == (base.transformer.num_layers,
                                                             base.embedding.emb_dim)
        assert cfg.replace(model=base.model, rnn=base.rnn, run=base.run,
                           optimizer=base.optimizer) == base


def _the_1623_class_point():
    by = {r.values["label"]: r.config for r in sweep.expand(sweep.load_sweep(SWEEP))}
    return by["1623_classes"]


def test_transience_sweep_is_the_1623_class_point_under_three_weight_decays() -> None:
    runs = sweep.expand(sweep.load_sweep(ROOT / "configs" / "sweeps" /
                                         "quickstart_transience.toml"))
    assert {r.seed for r in runs} == {0, 1, 2}
    assert sorted({r.config.optimizer.weight_decay for r in runs}) == [0.0, 0.1, 1.0]
    partner = _the_1623_class_point()
    for r in runs:
        cfg = r.config
        assert cfg.optimizer.name == "adamw" and cfg.run.checkpoints_per_decade == 8
        # only the optimizer's name and decay, and the run's length and dynamics, differ
        assert cfg.replace(optimizer=partner.optimizer, run=partner.run) == partner


def test_multiplicity_sweep_is_the_1623_class_point_with_1_3_10_labels() -> None:
    runs = sweep.expand(sweep.load_sweep(ROOT / "configs" / "sweeps" /
                                         "quickstart_multiplicity.toml"))
    assert {r.seed for r in runs} == {0, 1, 2}
    partner = _the_1623_class_point()
    outputs = {}
    for r in runs:
        cfg = r.config
        outputs[cfg.sequences.labeling_rare] = cfg.num_classes
        same = dataclasses.replace(cfg.sequences, labeling_rare="ordered")
        assert cfg.replace(sequences=same, run=partner.run) == partner
    # X labels for each of the 1,603 rare classes, one for each of the 10 common ones
    assert outputs == {"ordered": 1623, "ordered_polysemy3": 3 * 1603 + 10,
                       "ordered_polysemy10": 10 * 1603 + 10}
