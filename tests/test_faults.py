"""Faults and bad input an independent fault campaign found: eval beside a trainer
that prunes, a damaged or foreign config or checkpoint, files that are not
UTF-8 or are folders, a full disk, an out-of-memory model, a start killed
before its config was written, and steps past 10^8. Each gives one line
naming the file or value, and leaves no half-written file behind."""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.numpy as st
from safetensors import safe_open
from typer.testing import CliRunner

from eicl_cli import checkpoint, evaluate, runs
from eicl_cli import config as config_mod
from eicl_cli.cli import app
from eicl_cli.errors import EiclError
from train_support import TINY, tiny, train_run

runner = CliRunner()
NOT_UTF8 = b"\xff\xfe not text \xc3\x28"


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory) -> Path:
    """A tiny run of 20 steps: checkpoints at 10 and 20 (final), an evaluation at 20."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    train_run(tiny(data_dir, "run.steps=20"), run)
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run, for a test to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture(autouse=True)
def _env(data_dir: Path, monkeypatch):
    monkeypatch.setenv("EICL_DATA_DIR", str(data_dir))


def one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def resave(src: Path, dst: Path, **metadata: str) -> Path:
    """`src`'s tensors under changed metadata (the tensors' checksum still holds)."""
    with safe_open(str(src), framework="np") as f:
        meta = {**f.metadata(), **metadata}
    st.save_file(st.load(src.read_bytes()), str(dst), metadata=meta)
    return dst


def recorded(path: Path) -> config_mod.Config:
    return checkpoint.recorded_config(checkpoint.read_snapshot(path))


# ---------------------------------------------------------------- eval beside training

def test_eval_keeps_the_checkpoint_it_read_when_the_trainer_prunes_it(run: Path, capsys):
    # While eval loads the data, the trainer (keep_checkpoints = 1) writes
    # step 30 and deletes 10 and 20: the checkpoint eval chose is gone.
    def trainer_meanwhile(cfg):
        resave(runs.checkpoint_path(run, 20), runs.checkpoint_path(run, 30), step="30")
        for step in (10, 20):
            runs.checkpoint_path(run, step).unlink()
        from eicl_cli.data.dataset import load_dataset
        return load_dataset(cfg)

    restored, _, _ = evaluate.restore_for_eval(run, dataset_loader=trainer_meanwhile)
    assert restored.step == 20 and restored.path.name == "step_00000020.safetensors"
    assert "skipping" not in capsys.readouterr().err


def test_a_checkpoint_gone_since_the_listing_sends_the_search_to_the_newer_one(tmp_path: Path):
    listed = [(20, tmp_path / "step_00000020.safetensors"),
              (10, tmp_path / "step_00000010.safetensors")]
    now = [(30, tmp_path / "step_00000030.safetensors"), listed[1]]
    listings = iter([listed, now])
    warned: list[str] = []

    def load(path: Path) -> Path:
        if path == listed[0][1]:
            raise checkpoint.CheckpointVanished(f"checkpoint not found: {path}")
        return path

    got = checkpoint.load_newest(lambda: next(listings), tmp_path, warned.append, load)
    assert got == now[0][1] and warned == []


@pytest.mark.slow  # a real trainer beside eval, in its own process
def test_eval_beside_a_real_trainer_that_keeps_one_checkpoint(data_dir: Path, tmp_path: Path):
    # One checkpoint kept, as the quickstart keeps it, and replaced every 10
    # steps: far more often than eval takes to load its data.
    out = tmp_path / "live"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "eicl_cli", "train", "--config", str(TINY), "--out", str(out),
         "--set", "run.steps=1000000", "--set", "run.checkpoint_every=10", "--set",
         "run.keep_checkpoints=1", "--set", "run.eval_every=1000000"],
        env={**os.environ, "EICL_DATA_DIR": str(data_dir)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not runs.list_checkpoints(out):
            assert trainer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        steps = [evaluate.restore_for_eval(out)[0].step for _ in range(3)]
        assert trainer.poll() is None, "the trainer must still be writing"
    finally:
        trainer.kill()
        trainer.wait()
    assert all(s >= 10 for s in steps) and steps == sorted(steps)


# ---------------------------------------------------------------- checkpoint names

def test_checkpoints_from_step_10_to_the_8_on_are_found_in_step_order(tmp_path: Path):
    steps = [7, 99_999_999, 10 ** 8, 10 ** 8 + 5, 12_345_678_901]
    for step in reversed(steps):
        path = runs.checkpoint_path(tmp_path, step)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    assert [s for s, _ in runs.list_checkpoints(tmp_path)] == steps
    assert next(runs.iter_newest_first(tmp_path))[0] == 12_345_678_901


# ---------------------------------------------------------------- damaged or foreign config

def _cut(path: Path, before: str | None = None, drop_lines: int = 0) -> bytes:
    """Cut config.toml short at a line boundary, as a crash or a full disk would."""
    text = path.read_text()
    text = text[:text.index(before)] if before else "".join(
        text.splitlines(keepends=True)[:-drop_lines])
    path.write_text(text)
    return path.read_bytes()


@pytest.mark.parametrize("checkpoints", [True, False], ids=["with checkpoints", "none yet"])
@pytest.mark.parametrize("cut", [{"before": "[optimizer]"}, {"drop_lines": 3}],
                         ids=["sections lost", "last keys lost"])
def test_resume_refuses_a_config_cut_short_and_leaves_it_alone(run: Path, cut: dict,
                                                               checkpoints: bool):
    if not checkpoints:
        shutil.rmtree(runs.checkpoint_dir(run))
        runs.checkpoint_dir(run).mkdir()
    damaged = _cut(run / "config.toml", **cut)
    metrics = (run / "metrics.jsonl").read_bytes()
    res = runner.invoke(app, ["train", "--resume", str(run), "--set", "run.steps=30"])
    one_line_error(res, f"{run / 'config.toml'} is damaged")
    assert (run / "config.toml").read_bytes() == damaged
    assert (run / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize("change, keys", [
    ({"optimizer": {"max_lr": 3e-4, "warmup_steps": 4000}},
     ["optimizer.max_lr = 0.0003 there, 0.001 here",
      "optimizer.warmup_steps = 4000 there, 20 here"]),
    ({"run": {"seed": 7}}, ["run.seed = 7 there, 0 here"]),
], ids=["another config", "another seed"])
def test_resume_refuses_a_checkpoint_copied_from_another_run(run: Path, change: dict,
                                                             keys: list[str]):
    theirs = recorded(runs.checkpoint_path(run, 20))
    for section, values in change.items():
        theirs = theirs.replace(**{section: dataclasses.replace(getattr(theirs, section),
                                                                **values)})
    resave(runs.checkpoint_path(run, 20), runs.checkpoint_path(run, 30), step="30",
           config=config_mod.to_toml(theirs))
    before = {name: (run / name).read_bytes() for name in ("config.toml", "metrics.jsonl")}
    res = runner.invoke(app, ["train", "--resume", str(run), "--set", "run.steps=40"])
    one_line_error(res, "step_00000030.safetensors was trained under another config", *keys)
    assert {name: (run / name).read_bytes() for name in before} == before
    assert [s for s, _ in runs.list_checkpoints(run)] == [10, 20, 30]


def test_eval_refuses_a_newest_checkpoint_of_another_model(run: Path):
    wider = recorded(runs.checkpoint_path(run, 20))
    wider = wider.replace(embedding=dataclasses.replace(wider.embedding, emb_dim=48))
    model, state = evaluate.build_skeleton(wider, (28, 28))
    checkpoint.save(runs.checkpoint_path(run, 30), step=30, model=model, state=state,
                    opt_state=(), config_toml=config_mod.to_toml(wider))
    one_line_error(runner.invoke(app, ["eval", str(run), "-n", "8"]),
                   "step_00000030.safetensors was trained under another config",
                   "embedding.emb_dim = 48 there, 32 here")
    # The file alone is its own config: evaluated as what it is.
    assert runner.invoke(app, ["eval", str(runs.checkpoint_path(run, 30)), "-n", "8"]
                         ).exit_code == 0


# ---------------------------------------------------------------- unreadable files

@pytest.mark.parametrize("where, args", [
    ("config.toml", ["train", "--resume", "{run}"]),
    ("config.toml", ["eval", "{run}"]),
    ("config.toml", ["report", "{run}"]),
    ("metrics.jsonl", ["report", "{run}"]),
    ("metrics.jsonl", ["train", "--resume", "{run}", "--set", "run.steps=30"]),
    ("given.toml", ["train", "--config", "{run}/given.toml"]),
    ("given.toml", ["sweep", "{run}/given.toml", "--dry-run"]),
])
def test_a_file_that_is_not_utf8_is_named_in_one_line(run: Path, where: str, args: list[str]):
    (run / where).write_bytes(NOT_UTF8)
    one_line_error(runner.invoke(app, [a.format(run=run) for a in args]),
                   f"{run / where} is not UTF-8 text")


@pytest.mark.parametrize("line, needle", [
    ('{"kind": "eval", "step": "twenty", "mode": "fewshot_holdout"}',
     "line {n}: step is 'twenty'; it must be a whole number"),
    ('{"kind": "eval", "step": 20, "mode": "fewshot_holdout", "accuracy_query": "high"}',
     "line {n}: accuracy_query is 'high'; it must be a number"),
    ('[1, 2]', "line {n} is [1, 2]; each line must be a JSON object"),
])
def test_a_metrics_line_with_a_wrong_type_is_named_in_one_line(run: Path, line: str,
                                                              needle: str):
    with open(run / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    needle = needle.format(n=len((run / "metrics.jsonl").read_text().splitlines()))
    one_line_error(runner.invoke(app, ["report", str(run)]), str(run / "metrics.jsonl"), needle)
    one_line_error(runner.invoke(app, ["train", "--resume", str(run), "--set", "run.steps=30"]),
                   needle)


@pytest.mark.parametrize("args", [["report", "{run}"],
                                  ["train", "--resume", "{run}", "--set", "run.steps=30"]])
def test_a_folder_where_the_metrics_belong_is_named_in_one_line(run: Path, args: list[str]):
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    one_line_error(runner.invoke(app, [a.format(run=run) for a in args]),
                   f"{run / 'metrics.jsonl'} is a folder")


def test_a_folder_where_a_png_or_checkpoint_goes_is_one_line_and_leaves_no_temp(
        run: Path, tmp_path: Path):
    png = tmp_path / "grid.png"
    png.mkdir()
    one_line_error(runner.invoke(app, ["sample", "--config", str(TINY), "--png", str(png)]),
                   f"cannot write {png}: a folder is in the way")
    assert list(tmp_path.glob("*.tmp")) == []
    loaded = evaluate.restore_for_eval(run)[0]
    target = runs.checkpoint_path(run, 30)
    target.mkdir()
    with pytest.raises(EiclError, match=f"cannot write {target}: a folder is in the way"):
        checkpoint.save(target, step=30, model=loaded.model, state=loaded.state, opt_state=(),
                        config_toml="")
    assert list(runs.checkpoint_dir(run).glob("*.tmp")) == []


# ---------------------------------------------------------------- a full disk

def test_a_full_disk_while_logging_is_one_line(run: Path):
    # /dev/full fails every write with ENOSPC: the kernel's error, not a mock.
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to("/dev/full")
    with pytest.raises(EiclError, match=f"cannot write {run / 'metrics.jsonl'}: the disk is full"):
        runs.append_metrics(run, {"kind": "train", "step": 30, "loss": 1.0})


def test_a_checkpoint_that_does_not_fit_is_one_line_and_leaves_no_temp(run: Path):
    # A limit on the size of files this process writes (ulimit -f) makes the
    # kernel fail the checkpoint's write (EFBIG) as a full disk would.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        res = runner.invoke(app, ["train", "--resume", str(run), "--set", "run.steps=30",
                                  "--set", "run.eval_every=100"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, ignored)
    one_line_error(res, f"cannot write {runs.checkpoint_path(run, 30)}")
    assert list(runs.checkpoint_dir(run).glob("*.tmp")) == []
    assert [s for s, _ in runs.list_checkpoints(run)] == [10, 20]
    checkpoint.read_snapshot(runs.checkpoint_path(run, 20))  # intact


# ---------------------------------------------------------------- starting a run

def test_an_out_of_memory_model_is_one_line_and_leaves_no_folder(tmp_path: Path):
    out = tmp_path / "big"
    # An MLP of 2^36 x 32 units: far past any machine's memory, refused at once.
    res = runner.invoke(app, ["train", "--config", str(TINY), "--out", str(out), "--set",
                              "transformer.widening_factor=68719476736"])
    one_line_error(res, "out of memory building the model")
    assert not out.exists()


def test_a_start_killed_before_its_config_was_written_leaves_no_husk(
        data_dir: Path, tmp_path: Path):
    out = tmp_path / "killed"
    # SIGKILL at the moment the new run's config.toml is written.
    script = ("import os, signal, sys\n"
              "from eicl_cli import runs\n"
              "from eicl_cli.cli import run_app\n"
              "runs.write_config = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
              "sys.exit(run_app(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "train", "--config", str(TINY),
                           "--out", str(out)], env={**os.environ, "EICL_DATA_DIR": str(data_dir)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # No folder that is neither a run nor empty: --out can start it again.
    assert not out.exists() or not any(out.iterdir())
    cfg = tiny(data_dir)
    assert runs.new_run_dir(cfg, None, out) == out and runs.is_run_dir(out)
    assert runs.read_config(out) == cfg


def test_a_resume_may_change_the_run_keys_but_not_what_the_run_computes():
    from eicl_cli.experiment_keys import continuation_difference
    base = config_mod.from_dict({})
    changed = base.replace(
        run=dataclasses.replace(base.run, steps=10, checkpoint_every=7, name="x"),
        eval=dataclasses.replace(base.eval, sequences=5),
        train=dataclasses.replace(base.train, steps_per_call=3),
        rnn=dataclasses.replace(base.rnn, hidden_size=8))  # unused by a transformer
    assert continuation_difference(base, changed) == []
    other = changed.replace(run=dataclasses.replace(changed.run, seed=1),
                            train=dataclasses.replace(changed.train, batch_size=8))
    assert continuation_difference(base, other) == ["train.batch_size", "run.seed"]
