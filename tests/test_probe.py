"""`eicl probe`: a transformer whose weights are set by hand, so that head 0
copies the label of the context items that show the query's symbol, is
probed; its scores and the accuracies with each head ablated are compared
with the numbers worked out from the weights. Then the probe of a trained
run, the checkpoints kept for dynamics, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from eicl_cli import checkpoint, config, probe, runs
from eicl_cli.cli import app
from train_support import TINY, tiny, train_run

runner = CliRunner()

# The hand-set model: symbolic items, concatenated tokens [symbol, label] of
# width 2E, one layer of two heads, no positional encodings.
E = 40  # one-hot dims: symbols and labels 0..31, the blank label at E - 1
VOCAB = 32
S = 3.0  # the query and key projections of head 0 scale the symbol half by S


def _hand_config() -> config.Config:
    raw = config.read_with_bases(Path(__file__).parent.parent / "configs" / "symbolic.toml")
    raw = config.apply_overrides(raw, [
        f"data.symbolic_classes={VOCAB}", "classes.n_rare=16", "classes.n_common=8",
        "classes.n_holdout=8", f"embedding.emb_dim={E}", "embedding.concatenate_labels=true",
        "embedding.use_positional_encodings=false", "transformer.num_layers=1",
        "transformer.num_heads=2", 'eval.modes=["fewshot_holdout"]',
        "eval.train_sequences=300", "eval.batch_size=100"])
    return config.from_dict(raw)


def _one_hot_rows(n_rows: int, dims: int, blank: bool) -> np.ndarray:
    table = np.zeros((n_rows, dims), np.float32)
    for i in range(n_rows - (1 if blank else 0)):
        table[i, i] = 1.0
    if blank:
        table[-1, dims - 1] = 1.0
    return table


def _hand_model(cfg: config.Config):
    """Head 0 attends from the query to the items showing its symbol and
    reads their labels into the residual stream; head 1 and the MLP do
    nothing; the dense head reads the label half back out."""
    from eicl_cli.model import build_model
    model, state = build_model(cfg, jax.random.key(0))
    width, d = 2 * E, E  # head_dim = width / 2 heads
    qkv = np.zeros((1, width, 3 * width), np.float32)
    for i in range(E):
        qkv[0, i, i] = S  # query of head 0 <- the symbol half
        qkv[0, i, width + i] = S  # key of head 0 <- the symbol half
        qkv[0, E + i, 2 * width + i] = 1.0  # value of head 0 <- the label half
    out = np.zeros((1, width, width), np.float32)
    for i in range(d):
        out[0, i, E + i] = 1.0  # head 0's output -> the label half
    head = np.zeros((width, model.num_classes), np.float32)
    for j in range(model.num_classes):
        head[E + j, j] = 1.0
    blocks = model.core.blocks
    zero = jnp.zeros_like
    model = eqx.tree_at(
        lambda m: (m.encoder.table, m.tokenizer.label_table, m.core.blocks.qkv.weight,
                   m.core.blocks.qkv.bias, m.core.blocks.out.weight, m.core.blocks.out.bias,
                   m.core.blocks.mlp_in.weight, m.core.blocks.mlp_in.bias,
                   m.core.blocks.mlp_out.weight, m.core.blocks.mlp_out.bias,
                   m.head.weight, m.head.bias),
        model,
        (jnp.asarray(_one_hot_rows(VOCAB, E, blank=False)),
         jnp.asarray(_one_hot_rows(model.num_classes + 1, E, blank=True)),
         jnp.asarray(qkv), zero(blocks.qkv.bias), jnp.asarray(out), zero(blocks.out.bias),
         zero(blocks.mlp_in.weight), zero(blocks.mlp_in.bias), zero(blocks.mlp_out.weight),
         zero(blocks.mlp_out.bias), jnp.asarray(head), zero(model.head.bias)))
    return model, state


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory) -> tuple[Path, config.Config]:
    cfg = _hand_config()
    run_dir = tmp_path_factory.mktemp("probe") / "hand"
    runs.new_run_dir(cfg, None, run_dir)
    runs.write_config(run_dir, cfg)
    model, state = _hand_model(cfg)
    checkpoint.save(runs.checkpoint_path(run_dir, 7), step=7, model=model, state=state,
                    opt_state=None, config_toml=config.to_toml(cfg))
    return run_dir, cfg


def _sequences(cfg: config.Config) -> tuple[np.ndarray, np.ndarray]:
    """The symbols and labels of the probe's fewshot_holdout sequences."""
    from eicl_cli.data.dataset import load_dataset
    from eicl_cli.data.sequences import SequenceGenerator
    dataset = load_dataset(cfg)
    batches = list(SequenceGenerator(dataset, cfg).eval_batches(
        "fewshot_holdout", cfg.eval.train_sequences, cfg.eval.batch_size))
    symbols = np.concatenate([dataset.images[b.image_index] for b in batches])
    labels = np.concatenate([b.label for b in batches])
    return symbols, labels


def _by_hand(cfg: config.Config) -> dict:
    """What head 0's attention and the model's answers must be.

    Every token is one 1 in the symbol half and one 1 in the label half (the
    query's label is the blank row, a 1 at E - 1), so LayerNorm maps each to
    a * t + c alike, a = 1 / sqrt(var + eps). The score of key i is then
    (S a)^2 [same symbol] / sqrt(head_dim) plus a term equal for all keys:
    the query puts e^beta on itself and on each of the k items showing its
    symbol, 1 on the others. The copied labels decide the answer, except in
    a tie (the query's class drawn for both ways), which rounding decides."""
    width = 2 * E
    mean = 2 / width
    var = 2 * (1 - mean) ** 2 / width + (width - 2) * mean ** 2 / width
    a = 1 / math.sqrt(var + 1e-5)
    beta = (S * a) ** 2 / math.sqrt(E)
    symbols, labels = _sequences(cfg)
    n = symbols.shape[1] - 1
    match, other, uniform_match, right, ties = [], [], [], [], []
    for sym, lab in zip(symbols, labels):
        same_symbol = sym[:-1] == sym[-1]
        same_label = lab[:-1] == lab[-1]
        k, m = int(same_symbol.sum()), int(same_label.sum())
        z = (k + 1) * math.exp(beta) + (n - k)
        match.append(m * math.exp(beta) / z)
        other.append((k - m) * math.exp(beta) / z + (n - k) / z)
        uniform_match.append(m / (n + 1))
        votes = [int(((lab[:-1] == j) & same_symbol).sum()) for j in (0, 1)]
        right.append(votes[lab[-1]] > votes[1 - lab[-1]])
        ties.append(votes[0] == votes[1])
    return {"label_match": np.mean(match), "label_other": np.mean(other),
            "uniform_match": np.mean(uniform_match), "accuracy": np.mean(right),
            "ties": np.mean(ties),
            "label0": np.mean(labels[:, -1] == 0)}


def test_the_probe_names_the_copying_head_with_the_scores_worked_out_by_hand(hand_run):
    run_dir, cfg = hand_run
    want = _by_hand(cfg)
    result, = probe.probe_run(run_dir, ablation="zero")
    m = result.modes["fewshot_holdout"]
    assert result.step == 7 and result.layout == "concatenated"
    assert m["matched_sequences"] == m["sequences"] == 300
    # float32 softmax and LayerNorm against float64 by hand (the math kind)
    assert m["scores"]["label_match"][0][0] == pytest.approx(want["label_match"], abs=2e-5)
    assert m["scores"]["label_other"][0][0] == pytest.approx(want["label_other"], abs=2e-5)
    # head 1's query and key are zero: it attends uniformly to all 9 tokens
    assert m["scores"]["label_match"][0][1] == pytest.approx(want["uniform_match"], abs=2e-5)
    # concatenated tokens: match attention is label attention; no previous token
    assert m["scores"]["image_match"] == m["scores"]["label_match"]
    assert m["scores"]["previous_token"] is None
    for k in ("accuracy_query", "accuracy_closed"):
        assert want["accuracy"] - 1e-9 <= m["accuracy"][k] <= want["accuracy"] + want["ties"] + 1e-9
    assert want["accuracy"] > 0.8 and want["ties"] < 0.2  # 8 holdout classes: 1 in 8 ties
    # Without head 0 every label's logit is equal: argmax answers 0 to every query.
    assert m["head_ablated"][0][0]["accuracy_query"] == pytest.approx(want["label0"], abs=1e-9)
    assert m["layer_ablated"][0]["accuracy_closed"] == pytest.approx(want["label0"], abs=1e-9)
    # Head 1 contributes nothing: ablating it changes nothing.
    assert m["head_ablated"][0][1] == m["accuracy"]
    top = probe.ranked_heads(result)[0]
    assert (top["layer"], top["head"]) == (0, 0)
    assert top["fewshot_holdout"]["accuracy_query"] == pytest.approx(
        want["label0"] - m["accuracy"]["accuracy_query"], abs=1e-9)


def test_mean_ablation_answers_one_label_to_every_query(hand_run):
    run_dir, cfg = hand_run
    want = _by_hand(cfg)
    result, = probe.probe_run(run_dir, ablation="mean")
    ablated = result.modes["fewshot_holdout"]["head_ablated"][0][0]["accuracy_query"]
    # head 0's mean output favours one of labels 0 and 1 for every sequence alike
    assert ablated == pytest.approx(want["label0"], abs=1e-9) or \
        ablated == pytest.approx(1 - want["label0"], abs=1e-9)


def test_probe_results_repeat_exactly(hand_run):
    run_dir, _ = hand_run
    first = [r.to_json() for r in probe.probe_run(run_dir)]
    second = [r.to_json() for r in probe.probe_run(run_dir)]
    for r in first + second:
        r.pop("seconds")
    assert first == second


def test_interleaved_scores_read_the_right_tokens():
    # 3 items: context (image, label) x 2, then the query: tokens x0 y0 x1 y1 xq
    labels = jnp.asarray([[1, 0, 1]])
    w = np.zeros((1, 1, 1, 5, 5), np.float32)
    w[0, 0, 0, 4] = [0.1, 0.2, 0.3, 0.15, 0.25]  # the query's row
    w[0, 0, 0, 1, 0] = 0.6  # label y0 on its image x0
    w[0, 0, 0, 3, 2] = 0.4  # label y1 on x1
    s = probe.attention_scores(jnp.asarray(w), labels, concatenated=False)
    assert float(s["label_match"][0, 0, 0]) == pytest.approx(0.2)  # y0 carries label 1
    assert float(s["label_other"][0, 0, 0]) == pytest.approx(0.15)
    assert float(s["image_match"][0, 0, 0]) == pytest.approx(0.1)
    assert float(s["previous_token"][0, 0, 0]) == pytest.approx(0.5)
    assert float(s["has_match"][0]) == 1.0


# ---------------------------------------------------------------- a trained run

@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("probe") / "tiny"
    cfg = tiny(data_dir, "run.steps=30", "run.keep_checkpoints=1", "run.checkpoints_per_decade=2",
               "run.checkpoint_schedule=[15]")
    train_run(cfg, run_dir)
    return run_dir


def test_dynamics_checkpoints_are_kept_apart_and_never_pruned(trained: Path):
    assert [s for s, _ in runs.list_dynamics(trained)] == [1, 3, 10, 15]
    assert [s for s, _ in runs.list_checkpoints(trained)] == [30]
    assert [s for s, _ in probe.checkpoints(trained)] == [1, 3, 10, 15, 30]
    snapshot = checkpoint.read_snapshot(runs.dynamics_path(trained, 10))
    assert checkpoint.is_dynamics(snapshot)
    assert not any(name.startswith("opt.") for name in
                   __import__("safetensors.numpy").numpy.load(snapshot.data))


def test_dynamics_steps_rule():
    r = config.RunConfig(steps=1000, checkpoints_per_decade=4, checkpoint_schedule=[5, 2000])
    assert config.dynamics_steps(r) == [1, 2, 3, 5, 6, 10, 18, 32, 56, 100, 178, 316, 562, 1000]
    assert config.dynamics_steps(config.RunConfig(steps=50)) == []


def test_probe_all_through_the_cli(trained: Path, data_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EICL_DATA_DIR", str(data_dir))
    png = tmp_path / "probe.png"
    res = runner.invoke(app, ["probe", str(trained), "--all", "--json", "--plot", str(png)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [c["step"] for c in out["checkpoints"]] == [1, 3, 10, 15, 30]
    last = out["checkpoints"][-1]
    assert last["layout"] == "interleaved" and len(last["ranked_heads"]) == 4
    for mode in ("no_support_zipfian", "fewshot_holdout"):
        m = last["modes"][mode]
        assert len(m["head_ablated"]) == 2 and len(m["head_ablated"][0]) == 2
        assert all(0 <= v <= 1 for row in m["scores"]["previous_token"] for v in row)
    # The probe's sets and draws are the training evaluations': same accuracies.
    evals = {r["mode"]: r for r in runs.read_metrics(trained, "eval") if r["step"] == 30}
    for mode, m in last["modes"].items():
        assert m["accuracy"]["accuracy_query"] == pytest.approx(evals[mode]["accuracy_query"],
                                                                abs=1e-9)
    # no query of a no-support sequence has its label in the context
    assert last["modes"]["no_support_zipfian"]["scores"]["label_match"] is None
    assert png.stat().st_size > 20_000 and png.read_bytes()[:4] == b"\x89PNG"
    table = runner.invoke(app, ["probe", str(trained), "--step", "15"])
    assert table.exit_code == 0, table.output
    assert "step 15: the 4 heads that matter most" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--step", "7"], "--step 7: "),
    (["--step", "3", "--all"], "give --step or --all, not both"),
    (["--ablation", "half"], "--ablation 'half' is not allowed; choose one of: mean, zero"),
    (["--mode", "nope"], "unknown eval mode 'nope'"),
    (["--plot", "x.svg"], "the plot is written as PNG"),
])
def test_bad_probe_arguments_get_one_line(trained: Path, args, message):
    res = runner.invoke(app, ["probe", str(trained), *args])
    assert res.exit_code == 2
    assert message in res.output and res.output.count("\n") == 1


def test_a_recurrent_run_is_refused_in_one_line(data_dir: Path, tmp_path: Path):
    cfg = tiny(data_dir, 'model.kind="lstm"', "rnn.num_layers=1", "rnn.hidden_size=16")
    run_dir = tmp_path / "lstm"
    runs.new_run_dir(cfg, None, run_dir)
    runs.write_config(run_dir, cfg)
    runs.make_dir(runs.checkpoint_dir(run_dir), "checkpoints")
    runs.checkpoint_path(run_dir, 5).write_bytes(b"")
    res = runner.invoke(app, ["probe", str(run_dir)])
    assert res.exit_code == 2
    assert "eicl probe reads attention heads" in res.output and "lstm" in res.output


@pytest.mark.parametrize("override, message", [
    ("run.checkpoints_per_decade=-1", "run.checkpoints_per_decade = -1 is not allowed"),
    ("run.checkpoint_schedule=[0]", "run.checkpoint_schedule entry"),
    ("run.checkpoint_schedule=[5, 5]", "lists step 5 twice"),
])
def test_bad_schedules_are_refused(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.validate(config.load(TINY, [override]))


def test_dynamics_checkpoints_change_nothing_the_run_computes(data_dir: Path, tmp_path: Path):
    # Several steps per device call: the kept steps split calls, which must not
    # change a bit of the training (same program, exact).
    digests = []
    for name, extra in (("plain", []), ("dynamics", ["run.checkpoints_per_decade=3",
                                                     "run.checkpoint_schedule=[7]"])):
        cfg = tiny(data_dir, "run.steps=20", "train.steps_per_call=4", *extra)
        train_run(cfg, tmp_path / name)
        digests.append(checkpoint.read_metadata(
            runs.checkpoint_path(tmp_path / name, 20))["sha256"])
        losses = [r["loss"] for r in runs.read_metrics(tmp_path / name, "train")]
        digests.append(losses)
    assert digests[0] == digests[2] and digests[1] == digests[3]
    assert [s for s, _ in runs.list_dynamics(tmp_path / "dynamics")] == [1, 2, 5, 7, 10]


def test_probe_all_skips_a_corrupt_checkpoint_with_a_warning(trained: Path, data_dir: Path,
                                                             tmp_path: Path, monkeypatch):
    import shutil
    monkeypatch.setenv("EICL_DATA_DIR", str(data_dir))
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    damaged = runs.dynamics_path(run, 3)
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF  # a flipped bit in the last tensor
    damaged.write_bytes(bytes(data))
    res = runner.invoke(app, ["probe", str(run), "--all", "--json"])
    assert res.exit_code == 0, res.output
    assert [c["step"] for c in json.loads(res.stdout)["checkpoints"]] == [1, 10, 15, 30]
    assert "warning: skipped step_00000003.safetensors" in res.stderr
    one = runner.invoke(app, ["probe", str(run), "--step", "3"])
    assert one.exit_code == 2 and "is corrupt" in one.output
