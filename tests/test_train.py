"""The training loop: learning, exact resume, corrupt checkpoints, divergence."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from eicl_cli import checkpoint, config, runs
from eicl_cli import training
from eicl_cli.errors import EiclError
from train_support import tensors, tiny, train_run


def _with_steps(cfg: config.Config, steps: int) -> config.Config:
    return cfg.replace(run=dataclasses.replace(cfg.run, steps=steps))


@pytest.mark.slow
def test_loss_falls_and_query_accuracy_rises(data_dir: Path, tmp_path: Path):
    # Non-bursty sequences only: the query's label must come from the weights,
    # which a tiny model learns in a few hundred steps.
    cfg = tiny(data_dir, "run.steps=300", "run.log_every=50", "run.eval_every=300",
               "run.checkpoint_every=300", "sequences.p_bursty=0.0",
               "optimizer.schedule=\"constant\"", "train.batch_size=32")
    out = train_run(cfg, tmp_path / "run")
    assert out.status == "finished" and out.step == 300
    train = runs.read_metrics(tmp_path / "run", kind="train")
    assert [r["step"] for r in train] == [50, 100, 150, 200, 250, 300]
    first, last = train[0], train[-1]
    chance = 1 / cfg.num_classes
    assert first["loss"] > 3.0  # about ln(40) = 3.7 at the start
    assert last["loss"] < first["loss"] - 1.0, (first["loss"], last["loss"])
    assert last["accuracy_query"] > max(first["accuracy_query"] + 0.25, 5 * chance), train
    evals = runs.read_metrics(tmp_path / "run", kind="eval")
    assert {r["mode"] for r in evals} == set(cfg.eval.modes)
    iwl = next(r for r in evals if r["mode"] == "no_support_zipfian")
    assert iwl["accuracy_query"] > 5 * chance and iwl["sequences"] == cfg.eval.train_sequences


@pytest.mark.slow  # compiling the ResNet step dominates
def test_resume_is_bit_exact(data_dir: Path, tmp_path: Path):
    # Dropout and pixel noise on, so the per-step keys are exercised too, and a
    # one-group ResNet, so batch-norm state is carried through the checkpoint.
    cfg = tiny(data_dir, "transformer.dropout_prob=0.1", "sequences.noise_scale=0.1",
               'embedding.example_encoder="resnet"', "embedding.resnet_blocks_per_group=[1]",
               "embedding.resnet_channels_per_group=[]",
               "run.steps=12", "run.checkpoint_every=3", "run.eval_every=100",
               "run.log_every=3", "eval.train_sequences=32", "eval.batch_size=32")
    whole = train_run(cfg, tmp_path / "whole")
    half = train_run(_with_steps(cfg, 6), tmp_path / "split")
    assert (whole.step, half.step) == (12, 6)
    resumed = train_run(cfg, tmp_path / "split", resume=True)
    assert resumed.step == 12
    a = tensors(runs.checkpoint_path(tmp_path / "whole", 12))
    b = tensors(runs.checkpoint_path(tmp_path / "split", 12))
    assert sorted(a) == sorted(b) and any(k.startswith("state.") for k in a)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    # The metrics after the resume point are the same numbers too.
    def numbers(run):
        return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s",
                                                        "sequences_per_s")}
                for r in runs.read_metrics(run) if r["step"] != 6 or r["kind"] == "train"]
    assert numbers(tmp_path / "whole") == numbers(tmp_path / "split")
    assert [r["step"] for r in runs.read_metrics(tmp_path / "split", kind="train")] == [3, 6, 9, 12]
    # What each start ran on, so runs that differ in rounding can be told apart.
    env = runs.read_environment(tmp_path / "split")
    assert [e["step"] for e in env] == [0, 6]
    import jax
    import platform
    assert env[1]["packages"]["jax"] == jax.__version__ and env[1]["packages"]["eicl"]
    assert env[1]["backend"] == "cpu" and env[1]["python"] == platform.python_version()
    assert env[1]["cpu"] and env[1]["cpus"] >= 1 and len(env[1]["devices"]) == jax.device_count()
    assert env[1]["steps_per_call"] == 1  # the default (0) as run on a CPU


def test_resume_skips_a_corrupt_newest_checkpoint(data_dir: Path, tmp_path: Path, capsys):
    cfg = tiny(data_dir, "run.steps=20", "run.checkpoint_every=10", "run.eval_every=100")
    run = tmp_path / "run"
    train_run(cfg, run)
    newest = runs.checkpoint_path(run, 20)
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    (runs.checkpoint_dir(run) / "step_00000030.safetensors.tmp").write_bytes(b"half")
    capsys.readouterr()
    out = train_run(_with_steps(cfg, 30), run, resume=True)
    printed = capsys.readouterr()
    err = printed.err
    assert "skipping step_00000020.safetensors" in err and "corrupt or truncated" in err
    assert f"resuming {run} from step 10 (step_00000010.safetensors)" in " ".join(
        printed.out.split())
    assert out.step == 30
    assert not list(runs.checkpoint_dir(run).glob("*.tmp"))
    # It went on from step 10: the rerun steps 11..20 were logged afresh, once.
    assert [r["step"] for r in runs.read_metrics(run, kind="train")] == [10, 20, 30]


def test_resume_with_a_different_model_is_refused(data_dir: Path, tmp_path: Path):
    cfg = tiny(data_dir, "run.steps=10", "run.eval_every=100")
    train_run(cfg, tmp_path / "run")
    wider = tiny(data_dir, "run.steps=20", "embedding.emb_dim=48")
    with pytest.raises(checkpoint.CheckpointMismatch) as e:
        train_run(wider, tmp_path / "run", resume=True)
    assert "embedding.emb_dim = 32 there, 48 here" in str(e.value)
    assert "\n" not in str(e.value)


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(data_dir: Path, tmp_path: Path):
    # A learning rate of 1e30 after warm-up blows the weights up within a few steps.
    cfg = tiny(data_dir, "optimizer.max_lr=1e30", "optimizer.warmup_steps=4",
               "optimizer.schedule=\"constant\"", "run.steps=40", "run.log_every=1",
               "run.checkpoint_every=1", "run.eval_every=100")
    with pytest.raises(training.TrainingDiverged) as e:
        train_run(cfg, tmp_path / "run")
    msg = str(e.value)
    assert "non-finite" in msg and "step" in msg and "\n" not in msg
    assert isinstance(e.value, EiclError)
    kept = runs.list_checkpoints(tmp_path / "run")
    assert kept, "the checkpoints written before the blow-up are kept"
    for _, path in kept:
        for name, value in tensors(path).items():
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), (path.name, name)


def test_checkpoints_are_pruned_to_keep_plus_final(data_dir: Path, tmp_path: Path):
    cfg = tiny(data_dir, "run.steps=45", "run.checkpoint_every=10", "run.keep_checkpoints=2",
               "run.eval_every=100")
    train_run(cfg, tmp_path / "run")
    assert [s for s, _ in runs.list_checkpoints(tmp_path / "run")] == [40, 45]
    assert checkpoint.read_metadata(runs.checkpoint_path(tmp_path / "run", 45))["final"] == "true"
    train_run(_with_steps(cfg, 80), tmp_path / "run", resume=True)
    # 45 was a final checkpoint: it survives later pruning.
    assert [s for s, _ in runs.list_checkpoints(tmp_path / "run")] == [45, 70, 80]


def test_live_display_on_a_terminal(data_dir: Path, tmp_path: Path, monkeypatch):
    """On a terminal: a progress bar and, per evaluation, a table naming IWL and ICL."""
    import io

    from rich.console import Console

    from eicl_cli import display
    buf = io.StringIO()
    monkeypatch.setattr(display, "console", Console(file=buf, force_terminal=True, width=140))
    cfg = tiny(data_dir, "run.steps=20", "run.eval_every=20")
    cfg = training.resolved_config(cfg)
    runs.new_run_dir(cfg, None, tmp_path / "run")
    runs.write_config(tmp_path / "run", cfg)
    assert training.train_runs([cfg], [tmp_path / "run"], live=True).step == 20
    text = buf.getvalue()
    assert "evaluation at step 20" in text
    for needle in ("no_support_zipfian", "IWL", "fewshot_holdout", "ICL", "accuracy_query",
                   "accuracy_closed", "ceiling", "steps/s", "train acc"):
        assert needle in text, needle


def test_all_unique_beyond_a_pool_is_refused_before_a_run_folder(data_dir: Path, tmp_path: Path):
    from train_support import TINY, eicl
    run = tmp_path / "run"
    out = eicl("train", "--config", str(TINY), "--out", str(run),
               "--set", "sequences.all_unique=true", "--set", "sequences.p_bursty=0.0",
               "--set", 'sequences.non_bursty_type="common_uniform"', data_dir=data_dir)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: sequences.all_unique needs 9 distinct classes for a random part of a sequence "
        "but the common pool has only 8; set it to false or give the pool more classes"]
    assert not run.exists()


def test_symbolic_config_trains_and_evaluates(tmp_path):
    """The shipped symbolic config (integer examples, embedding encoder) runs end to end."""
    from train_support import eicl
    run = tmp_path / "sym"
    out = eicl("train", "--config", "configs/symbolic.toml", "--out", str(run),
               "--set", "transformer.num_layers=1", "--set", "transformer.num_heads=2",
               "--set", "run.steps=4", "--set", "run.eval_every=4", "--set", "run.log_every=2",
               "--set", "eval.train_sequences=16", "--set", "eval.batch_size=16",
               data_dir=tmp_path, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in records if r["kind"] == "eval"} == {
        "no_support_zipfian", "fewshot_zipfian", "fewshot_holdout"}
