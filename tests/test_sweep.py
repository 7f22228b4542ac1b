"""`eicl sweep`: sweep files are checked and expanded into named, validated
points; the manifest is written once and guarded; the runner skips finished
runs, resumes interrupted ones and records failures. The runner tests use a
tiny stand-in trainer (stdlib only) with the run-folder layout of runs.py, so
they take a second; tests/test_sweep_e2e.py runs the real `eicl train`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from eicl_cli import runs, sweep
from eicl_cli.cli import app
from eicl_cli.errors import EiclError

ROOT = Path(__file__).resolve().parents[1]
PAPER_SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.toml"))


def write_sweep(tmp_path: Path, body: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    base = (ROOT / "configs" / "images_all_exemplars.toml").as_posix()
    path.write_text(f'base = "{base}"\n' + textwrap.dedent(body))
    return path


SMALL = """
seeds = [0, 1]
[set]
"run.steps" = 20
"run.eval_every" = 5
"run.checkpoint_every" = 5
[grid]
"sequences.p_bursty" = [0.0, 0.9]
"""


# ---------------------------------------------------------------- expansion

def test_grid_zip_seeds_expand_to_named_validated_points(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, """
        seeds = [3, 4]
        [set]
        "run.steps" = 10
        [grid]
        "sequences.p_bursty" = [0.0, 0.5]
        transformer.num_layers = [1, 2]          # unquoted dotted keys work too
        [zip]
        label = ["small", "paper"]
        "classes.n_rare" = [100, 1603]
        "classes.n_holdout" = [10, 10]
        """)
    spec = sweep.load_sweep(path)
    points = sweep.expand(spec)
    assert len(points) == 2 * 2 * 2 * 2
    first = points[0]
    assert first.name == "p_bursty=0.0__num_layers=1__small__seed=3"
    assert first.point == "p_bursty=0.0__num_layers=1__small"
    assert first.config.sequences.p_bursty == 0.0
    assert first.config.transformer.num_layers == 1
    assert first.config.classes.n_rare == 100
    assert first.config.run.seed == 3 and first.config.run.steps == 10
    assert first.config.run.name == first.name
    assert first.values == {"sequences.p_bursty": 0.0, "transformer.num_layers": 1,
                            "label": "small", "classes.n_rare": 100, "classes.n_holdout": 10}
    last = points[-1]
    assert last.name == "p_bursty=0.5__num_layers=2__paper__seed=4"
    assert last.config.classes.n_rare == 1603
    assert len({p.name for p in points}) == len(points)
    # Stable: expanding again gives the same names in the same order.
    assert [p.name for p in sweep.expand(sweep.load_sweep(path))] == [p.name for p in points]
    assert sweep.swept_keys(spec) == ["sequences.p_bursty", "transformer.num_layers", "label"]


def test_zip_without_label_and_safe_names(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, """
        [zip]
        "eval.modes" = [["no_support_zipfian", "fewshot_holdout"], ["fewshot_holdout"]]
        "run.out_dir" = ["a/b", "c d"]
        """)
    points = sweep.expand(sweep.load_sweep(path))
    assert [p.name for p in points] == [
        "modes=no_support_zipfian+fewshot_holdout__out_dir=a-b__seed=0",
        "modes=fewshot_holdout__out_dir=c-d__seed=0"]


def test_command_line_set_applies_to_every_point(tmp_path: Path) -> None:
    points = sweep.expand(sweep.load_sweep(write_sweep(tmp_path, SMALL)), ["run.steps=7"])
    assert {p.config.run.steps for p in points} == {7}
    with pytest.raises(EiclError, match="swept"):
        sweep.expand(sweep.load_sweep(write_sweep(tmp_path, SMALL)), ["sequences.p_bursty=0.1"])


@pytest.mark.parametrize("body, message", [
    ('[grid]\n"sequences.p_burst" = [0.1]\n', "did you mean 'sequences.p_bursty'"),
    ('[grid]\n"p_bursty" = [0.1]\n', "did you mean 'sequences.p_bursty'"),
    ('[grid]\n"nosuch.key" = [1]\n', "is not a config key"),
    ("[grid]\n", "the grid is empty"),
    ('[grid]\n"sequences.p_bursty" = []\n', "empty list of values"),
    ('[grid]\n"sequences.p_bursty" = 0.5\n', "must be a list of values"),
    ('[zip]\n"classes.n_rare" = [1, 2]\n"classes.n_common" = [1]\n', "equal lengths"),
    ('[zip]\nlabel = ["a"]\n"classes.n_rare" = [1, 2]\n', "label must be a list of 2"),
    ('grids = 1\n', "unknown sweep key 'grids'; did you mean 'grid'"),
    ('seeds = []\n[grid]\n"sequences.p_bursty" = [0.1]\n', "seeds must be a non-empty list"),
    ('[set]\n"sequences.p_bursty" = 0.2\n[grid]\n"sequences.p_bursty" = [0.1]\n',
     "in both [set] and [grid]"),
    ('[grid]\n"run.seed" = [1, 2]\n', "top-level `seeds"),
    ('[grid]\n"sequences.p_bursty" = [0.5, 1.5]\n',
     "point p_bursty=1.5__seed=0: sequences.p_bursty = 1.5 must be a probability"),
    # The same validation as a config's: non-finite and absurd values.
    ('[grid]\n"optimizer.max_lr" = [3e-4, nan]\n',
     "point max_lr=nan__seed=0: optimizer.max_lr = nan is not a finite number; allowed: > 0"),
    ('[zip]\n"classes.zipf_exponent" = [1.0, 1100.0]\n"run.steps" = [1, 2]\n',
     "point zipf_exponent=1100.0__steps=2__seed=0: classes.zipf_exponent = 1100 is too steep"),
    # One point twice, once read as the config reads it.
    ('[grid]\n"classes.zipf_exponent" = [1.0, 1]\n',
     "[grid]: 'classes.zipf_exponent' lists 1.0 and 1, the same value; give each value once"),
    ('[grid]\n"sequences.p_bursty" = [0.5, 0.9, 0.5]\n',
     "[grid]: 'sequences.p_bursty' lists 0.5 twice; give each value once"),
    ('[zip]\nlabel = ["a", "b"]\n"classes.zipf_exponent" = [0, 0.0]\n"run.steps" = [5, 5]\n',
     "[zip]: entries 1 and 2 are the same point (classes.zipf_exponent = 0.0, run.steps = 5); "
     "give each once"),
])
def test_bad_sweep_files_give_one_line_errors(tmp_path: Path, body: str, message: str) -> None:
    path = write_sweep(tmp_path, body)
    with pytest.raises(EiclError) as err:
        sweep.expand(sweep.load_sweep(path))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_bad_key_is_one_line_exit_2(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, '[grid]\n"sequences.p_burst" = [0.1]\n')
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "p_bursty" in lines[0]


@pytest.mark.parametrize("path", PAPER_SWEEPS, ids=lambda p: p.name)
def test_paper_sweep_dry_run_lists_points(path: Path, tmp_path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("#")
    if not path.name.startswith("quickstart"):  # the quickstart is a CPU miniature, not one figure
        assert "Figure" in first, "say which paper figure it reproduces"
    spec = sweep.load_sweep(path)
    points = sweep.expand(spec)
    # a quickstart miniature may name its partner points in another sweep
    assert len(points) >= (2 if path.name.startswith("quickstart") else 3)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run", "--out", str(out),
                                      "--steps-per-s", "10"],  # no measuring here
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert f"{len(points)} runs" in result.output
    assert result.output.count("pending") >= len(points)
    assert not out.exists(), "a dry run writes nothing"


def test_paper_sweep_values() -> None:
    by_name = {p.stem: sweep.expand(sweep.load_sweep(p)) for p in PAPER_SWEEPS}
    assert {p.config.sequences.p_bursty for p in by_name["burstiness"]} == {0.0, 0.5, 0.9, 1.0}
    recurrent = by_name.pop("recurrent")  # tuned: one seed per point of a 5 x 3 grid each
    assert {p.config.model.kind for p in recurrent} == {"transformer", "lstm", "vanilla_rnn"}
    for kind in ("transformer", "lstm", "vanilla_rnn"):
        tried = {(p.config.optimizer.max_lr, p.config.optimizer.warmup_steps)
                 for p in recurrent if p.config.model.kind == kind}
        assert len(tried) == 15 and (3e-4, 4000) in tried  # the original's setting among them
    assert {p.seed for p in recurrent} == {0}
    assert {p.config.run.steps for p in recurrent} == {500_000}
    assert {p.config.sequences.labeling_rare for p in by_name["label_multiplicity"]} == {
        "ordered", "ordered_polysemy3", "ordered_polysemy10"}
    classes = {p.config.classes.n_rare + p.config.classes.n_common for p in by_name["num_classes"]}
    assert max(classes) == 12800 and min(classes) == 200
    assert all(p.config.data.augment_images for p in by_name["num_classes"])
    wcv = {p.values["label"]: p.config for p in by_name["within_class_variation"]}
    assert wcv["identical"].data.exemplars == "single" and wcv["augmented"].data.augment_images
    assert 0.0 in {p.config.classes.zipf_exponent for p in by_name["zipf"]}
    assert 1.0 in {p.config.classes.zipf_exponent for p in by_name["zipf"]}
    for name in [n for n in by_name if n.startswith("quickstart")]:
        by_name.pop(name)  # the CPU miniatures: tests/test_quickstart_config.py
    quick = by_name.pop("burstiness_quick")  # the README plot's short version of Fig. 2
    assert {p.config.sequences.p_bursty for p in quick} == {0.0, 0.5, 0.9, 1.0}
    assert {p.config.run.steps for p in quick} == {30000}
    for points in by_name.values():  # every paper run trains on the real data, seeds 0..2
        assert {p.config.data.dataset for p in points} == {"omniglot"}
        assert {p.seed for p in points} == {0, 1, 2}
        assert {p.config.run.steps for p in points} == {500_000}


@pytest.mark.parametrize("path", [p for p in PAPER_SWEEPS if not p.name.startswith("quickstart")],
                         ids=lambda p: p.name)
def test_paper_sweep_header_states_its_seeds(path: Path) -> None:
    stated = [line for line in path.read_text().splitlines() if line.startswith("# Seeds: ")]
    assert len(stated) == 1, "say in the header how many seeds each point runs"
    seeds = sweep.load_sweep(path).seeds
    assert stated[0].startswith(f"# Seeds: {len(seeds)} ({', '.join(map(str, seeds))}) per point")


# ---------------------------------------------------------------- manifest

def test_manifest_written_and_guarded(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, SMALL)
    spec = sweep.load_sweep(path)
    points = sweep.expand(spec)
    out = tmp_path / "out"
    out.mkdir()
    sweep.write_manifest(out, spec, points)
    m = sweep.read_manifest(out)
    assert [r["name"] for r in m["runs"]] == [p.name for p in points]
    assert m["swept_keys"] == ["sequences.p_bursty"]
    assert m["runs"][0]["overrides"]["run.steps"] == 20
    assert (out / "configs" / f"{points[0].name}.toml").is_file()
    assert not list(out.rglob("*.tmp"))
    # The same sweep again is fine; a changed config for an existing run is refused.
    sweep.write_manifest(out, spec, points)
    with pytest.raises(EiclError, match="different config .*run.steps was 20, now 30.*"
                                        "give the --set values it started with"):
        sweep.write_manifest(out, spec, sweep.expand(spec, ["run.steps=30"]))
    # --dry-run says so too, instead of listing the runs as if it would go on.
    with pytest.raises(EiclError, match="different config .*run.steps was 20, now 30"):
        sweep.dry_run_statuses(out, spec, sweep.expand(spec, ["run.steps=30"]))
    assert [s.state for s in sweep.dry_run_statuses(out, spec, points)] == ["pending"] * len(points)
    # A folder that cannot be made is one error naming it.
    (tmp_path / "file").write_text("")
    with pytest.raises(EiclError, match=f"cannot create the sweep folder {tmp_path / 'file'}"):
        sweep.write_manifest(tmp_path / "file" / "sweep", spec, points)
    with pytest.raises(EiclError, match="not a sweep folder"):
        sweep.read_manifest(tmp_path)


# ---------------------------------------------------------------- runner (stand-in trainer)

FAKE_TRAIN = r'''
import atexit, json, os, signal, sys, time, tomllib
from pathlib import Path

args = sys.argv[1:]
assert args[0] == "train"
if args[1] == "--resume":
    run = Path(args[2])
else:
    config, run = Path(args[2]), Path(args[4])
    if run.exists() and any(run.iterdir()):
        sys.exit("not empty")
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(config.read_text())
cfg = tomllib.loads((run / "config.toml").read_text())
started = time.time()

@atexit.register
def _record_devices():  # which GPUs this attempt saw, and when it ran
    with open(run / "devices.jsonl", "a") as f:
        f.write(json.dumps({"gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "mem": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                            "start": started, "end": time.time()}) + "\n")

if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in run.name:
    sys.exit(3)
ckpts = sorted(int(p.stem[5:]) for p in (run / "checkpoints").glob("step_*.safetensors"))
step = ckpts[-1] if ckpts else 0
stop = []
signal.signal(signal.SIGINT, lambda *a: stop.append(1))

def save(s):
    tmp = run / "checkpoints" / f"step_{s:08d}.safetensors.tmp"
    tmp.write_bytes(b"x")
    os.replace(tmp, run / "checkpoints" / f"step_{s:08d}.safetensors")

p = cfg["sequences"]["p_bursty"]
with open(run / "metrics.jsonl", "a") as f:
    while step < cfg["run"]["steps"]:
        if stop:
            save(step)
            sys.exit(130)
        slow = os.environ.get("FAKE_SLOW") and os.environ["FAKE_SLOW"] in run.name
        time.sleep(float(os.environ.get("FAKE_DELAY", "0.01")) * (5 if slow else 1))
        step += 1
        if step % cfg["run"]["eval_every"] == 0:
            for mode in cfg["eval"]["modes"]:
                acc = p * step / 20 if mode == "fewshot_holdout" else (1 - p) * step / 20
                f.write(json.dumps({"kind": "eval", "step": step, "mode": mode,
                                    "accuracy_query": acc, "accuracy_closed": 0.5 + acc / 2}) + "\n")
                f.flush()
        if step % cfg["run"]["checkpoint_every"] == 0 or step == cfg["run"]["steps"]:
            save(step)
'''


@pytest.fixture
def fake_sweep(tmp_path: Path):
    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAIN)
    spec = sweep.load_sweep(write_sweep(tmp_path, SMALL))
    out = tmp_path / "out"
    out.mkdir()
    sweep.write_manifest(out, spec, sweep.expand(spec))

    def command(sweep_dir: Path, name: str, resume: bool) -> list[str]:
        real = sweep.train_command(sweep_dir, name, resume)
        return [sys.executable, str(trainer)] + real[real.index("train"):]

    return out, command


def attempts(out: Path, name: str) -> list[str]:
    log = out / "logs" / f"{name}.log"
    return [l for l in log.read_text().splitlines() if l.startswith("=== ")] if log.exists() else []


def test_runner_interrupt_then_restart_skips_finished(fake_sweep, monkeypatch) -> None:
    out, command = fake_sweep
    manifest = sweep.read_manifest(out)
    names = [r["name"] for r in manifest["runs"]]
    monkeypatch.setenv("FAKE_DELAY", "0.01")
    monkeypatch.setenv("FAKE_SLOW", "seed=1")  # so seed 0 finishes first, alone
    sent = []

    def on_change(statuses, message):  # Ctrl+C as soon as the first run has finished
        if "finished" in message and not sent:
            sent.append(message)
            os.kill(os.getpid(), signal.SIGINT)

    result = sweep.run_sweep(out, manifest, jobs=2, on_change=on_change, poll_s=0.05,
                             command=command)
    assert result.interrupted
    states = {s.name: s.state for s in result.statuses}
    assert states == {"p_bursty=0.0__seed=0": "finished",
                      "p_bursty=0.0__seed=1": "interrupted",  # saved where it stopped
                      "p_bursty=0.9__seed=0": "pending",      # never launched after the stop
                      "p_bursty=0.9__seed=1": "pending"}
    finished = ["p_bursty=0.0__seed=0"]
    interrupted = ["p_bursty=0.0__seed=1"]
    for n in interrupted:  # it checkpointed where it stopped, before the end
        assert 0 < sweep.run_progress(out / n) < 20
    assert json.loads((out / "state.json").read_text())[interrupted[0]]["state"] == "interrupted"
    assert not (out / sweep.LOCK_FILE).exists()

    dry = sweep.statuses(out)
    assert {s.name: s.state for s in dry} == states

    result = sweep.run_sweep(out, manifest, jobs=2, poll_s=0.05, command=command)
    assert not result.interrupted
    assert all(s.state == "finished" for s in result.statuses)
    assert result.launched == len(names) - len(finished)
    for n in finished:  # never relaunched
        assert len(attempts(out, n)) == 1
    for n in interrupted:  # relaunched once, with --resume
        tries = attempts(out, n)
        assert len(tries) == 2 and "--resume" in tries[1] and "--config" in tries[0]
        steps = [r["step"] for r in runs.read_metrics(out / n, mode="fewshot_holdout")]
        assert steps[-1] == 20
    s0 = next(s for s in result.statuses if s.values["sequences.p_bursty"] == 0.9)
    assert s0.icl == pytest.approx(0.9) and s0.iwl == pytest.approx(0.1)

    # A third start finds nothing to do.
    result = sweep.run_sweep(out, manifest, jobs=2, poll_s=0.05, command=command)
    assert result.launched == 0


def _attempt_devices(out: Path, names: list[str]) -> list[dict]:
    return [json.loads(line) for n in names
            for line in (out / n / "devices.jsonl").read_text().splitlines()]


def test_jobs_get_gpus_of_their_own(fake_sweep, monkeypatch) -> None:
    """With 2 visible GPUs and --jobs 2, each run sees one GPU and no two runs
    use one GPU at the same time; with --jobs 4 two share each GPU, with half
    the memory fraction each."""
    out, command = fake_sweep
    manifest = sweep.read_manifest(out)
    names = [r["name"] for r in manifest["runs"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.setenv("FAKE_DELAY", "0.02")
    result = sweep.run_sweep(out, manifest, jobs=2, poll_s=0.02, command=command)
    assert all(s.state == "finished" for s in result.statuses)
    spans = _attempt_devices(out, names)
    assert len(spans) == 4 and {s["gpus"] for s in spans} == {"3", "5"}
    assert all(s["mem"] is None for s in spans)  # one job per GPU: JAX's default
    for i, a in enumerate(spans):
        for b in spans[i + 1:]:
            if a["gpus"] == b["gpus"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"], (a, b)
    assert "[CUDA_VISIBLE_DEVICES=3]" in attempts(out, names[0])[0]

    for n in names:  # train them again, four at once
        shutil.rmtree(out / n)
    (out / "state.json").unlink()
    result = sweep.run_sweep(out, manifest, jobs=4, poll_s=0.02, command=command)
    assert all(s.state == "finished" for s in result.statuses)
    spans = _attempt_devices(out, names)
    assert sorted(s["gpus"] for s in spans) == ["3", "3", "5", "5"]
    assert {s["mem"] for s in spans} == {"0.450"}


def test_gpu_slots_and_where_gpus_come_from(tmp_path, monkeypatch) -> None:
    from eicl_cli.sweep import devices as sd
    assert sd.device_slots(3, []) == [None] * 3 and sd.device_slots(2, ["0"]) == [None] * 2
    assert sd.device_slots(2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert sd.device_slots(3, ["0", "1", "2", "3"]) == ["0", "1", "2"]  # equal shares only
    six = [str(i) for i in range(6)]
    assert sd.device_slots(2, six, [32]) == ["0,1", "2,3"]  # 3 GPUs would not split 32
    assert sd.device_slots(2, six, [24, 48]) == ["0,1,2", "3,4,5"]
    assert sd.device_slots(5, ["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert [sd.jobs_per_device(j, g) for j, g in ((4, []), (4, ["0"]), (5, ["0", "1"]))] == [4, 4, 3]
    env = sd.child_env({"PATH": "x"}, "1", 2)
    assert env == {"PATH": "x", "CUDA_VISIBLE_DEVICES": "1", sd.MEM_FRACTION: "0.450"}
    assert sd.child_env({sd.MEM_FRACTION: "0.2"}, None, 4) == {sd.MEM_FRACTION: "0.2"}

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-8f1c,-1,4")
    assert sd.visible_gpus() == ["2", "GPU-8f1c"]  # CUDA stops at an invalid entry
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sd.visible_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(smi.parent))
    assert sd.visible_gpus() == ["0", "1", "2"]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
    assert sd.visible_gpus() == []
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert sd.visible_gpus() == []


def test_runner_records_failures_and_retries_them(fake_sweep, monkeypatch) -> None:
    out, command = fake_sweep
    manifest = sweep.read_manifest(out)
    monkeypatch.setenv("FAKE_FAIL", "p_bursty=0.0__seed=1")
    result = sweep.run_sweep(out, manifest, jobs=3, poll_s=0.05, command=command)
    states = {s.name: (s.state, s.returncode) for s in result.statuses}
    assert states["p_bursty=0.0__seed=1"] == ("failed", 3)
    assert sum(s == "finished" for s, _ in states.values()) == 3
    assert sweep.statuses(out)[1].state == "failed"  # remembered after the sweep ends
    monkeypatch.delenv("FAKE_FAIL")
    result = sweep.run_sweep(out, manifest, jobs=3, poll_s=0.05, command=command)
    assert result.launched == 1 and all(s.state == "finished" for s in result.statuses)
    assert "--resume" in attempts(out, "p_bursty=0.0__seed=1")[1]


def test_one_sweep_process_per_folder(fake_sweep) -> None:
    out, command = fake_sweep
    (out / sweep.LOCK_FILE).write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(EiclError, match=r"sweep folder .* is in use by pid \d+; wait"):
        sweep.run_sweep(out, sweep.read_manifest(out), jobs=1, command=command)
    (out / sweep.LOCK_FILE).write_text("999999999")  # a dead one: taken over
    name = sweep.read_manifest(out)["runs"][0]["name"]
    sweep.write_state(out, {name: {"state": "running", "pid": os.getppid()}})
    assert sweep.statuses(out)[0].state == "running"
    with pytest.raises(EiclError, match=f"run {name} is still being trained by pid"):
        sweep.run_sweep(out, sweep.read_manifest(out), jobs=1, command=command)
    sweep.write_state(out, {name: {"state": "running", "pid": 999999999}})
    assert sweep.statuses(out)[0].state == "interrupted"  # its trainer died early
    result = sweep.run_sweep(out, sweep.read_manifest(out), jobs=4, poll_s=0.05, command=command)
    assert all(s.state == "finished" for s in result.statuses)


def test_more_seeds_later_train_only_the_new_runs_and_pool_in_report(fake_sweep, tmp_path) -> None:
    from eicl_cli import report
    out, command = fake_sweep
    result = sweep.run_sweep(out, sweep.read_manifest(out), jobs=2, poll_s=0.05, command=command)
    assert result.launched == 4
    # The same sweep file with a third seed, into the same folder.
    spec = sweep.load_sweep(write_sweep(tmp_path, SMALL.replace("[0, 1]", "[0, 1, 2]")))
    sweep.write_manifest(out, spec, sweep.expand(spec))
    manifest = sweep.read_manifest(out)
    assert len(manifest["runs"]) == 6
    result = sweep.run_sweep(out, manifest, jobs=2, poll_s=0.05, command=command)
    assert result.launched == 2 and all(s.state == "finished" for s in result.statuses)
    assert all(len(attempts(out, r["name"])) == 1 for r in manifest["runs"])
    rows, _ = report.collect([out])
    assert [len(r.runs) for r in rows] == [3, 3]


def test_the_command_that_continues_a_sweep_repeats_its_set_values():
    # Without the --set values the sweep would be refused as a different config.
    assert sweep.continue_command("configs/sweeps/s.toml", None, ["run.steps=600",
                                                                  'run.name="a b"']) == \
        "eicl sweep configs/sweeps/s.toml --set run.steps=600 --set 'run.name=\"a b\"'"
    assert sweep.continue_command(Path("s.toml"), Path("out dir"), [], stack=4, jobs=1) == \
        "eicl sweep s.toml --out 'out dir' --stack=4"
