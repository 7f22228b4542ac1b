"""train.ema_decay: a moving average of the parameters, kept in the optimizer
state, is what training-time evaluation, `eicl eval` and resumes use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eicl_cli import checkpoint, config, runs
from eicl_cli.evaluate import evaluate_modes, restore_for_eval
from eicl_cli.optim import ParamsEMA, evaluation_model, make_optimizer, track_params_ema
from train_support import eicl, tensors, tiny, train_run


def test_the_average_follows_its_recurrence_and_leaves_the_updates_alone():
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
    sgd = optax.sgd(0.1)
    with_ema = optax.chain(sgd, track_params_ema(0.9))
    s_plain, s_ema = sgd.init(params), with_ema.init(params)
    p_plain, p_ema = params, params
    expected = {k: np.asarray(v) for k, v in params.items()}
    for t in range(3):
        grads = {"w": jnp.array([0.3, 1.0]) * (t + 1), "b": jnp.array(-0.2)}
        u_plain, s_plain = sgd.update(grads, s_plain, p_plain)
        u_ema, s_ema = with_ema.update(grads, s_ema, p_ema)
        for k in params:
            np.testing.assert_array_equal(u_plain[k], u_ema[k])
        p_plain, p_ema = optax.apply_updates(p_plain, u_plain), optax.apply_updates(p_ema, u_ema)
        expected = {k: 0.9 * expected[k] + 0.1 * np.asarray(p_ema[k]) for k in params}
    ema = s_ema[1].ema
    for k in params:
        # Reordered: the average's update on the device against the same
        # recurrence in NumPy, a few roundings per step.
        np.testing.assert_allclose(ema[k], expected[k], rtol=1e-6)
        assert not np.allclose(ema[k], p_ema[k])  # it lags the parameters


def test_evaluation_model_swaps_in_the_average_only_where_one_is_kept(data_dir: Path):
    cfg = tiny(data_dir)
    from eicl_cli.model import build_model
    model, _ = build_model(cfg, jax.random.key(0), (28, 28))
    params = eqx.filter(model, eqx.is_inexact_array)
    plain = make_optimizer(cfg).init(params)
    assert evaluation_model(model, plain) is model
    ema_cfg = tiny(data_dir, "train.ema_decay=0.5")
    state = make_optimizer(ema_cfg).init(params)
    shifted = jax.tree_util.tree_map(lambda x: x + 1.0, state[1].ema)
    state = (state[0], ParamsEMA(shifted))
    swapped = evaluation_model(model, state)
    for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(swapped, eqx.is_inexact_array)),
                    jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, np.asarray(b) + 1.0)


def test_training_evaluates_the_average_and_eicl_eval_restores_it(data_dir: Path,
                                                                   tmp_path: Path):
    cfg = tiny(data_dir, "train.ema_decay=0.9", "run.steps=30", "run.eval_every=30",
               "run.checkpoint_every=30", "optimizer.schedule=\"constant\"")
    run = tmp_path / "run"
    assert train_run(cfg, run).step == 30
    restored, data, generator = restore_for_eval(run)
    names = tensors(runs.checkpoint_path(run, 30))
    ema_names = [k for k in names if k.startswith("opt.") and ".ema." in k]
    assert ema_names, sorted(names)[:20]
    # The restored model is the average, not the trained parameters.
    raw = checkpoint.load(runs.checkpoint_path(run, 30), model=restored.model,
                          state=restored.state).model
    leaves = lambda m: jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))  # noqa: E731
    assert any(not np.allclose(a, b) for a, b in zip(leaves(restored.model), leaves(raw)))
    # Training-time evaluation scored that same average model.
    resolved = config.load(run / runs.CONFIG_FILE)
    again = evaluate_modes(restored.model, restored.state, data, generator,
                           list(resolved.eval.modes), resolved.eval.train_sequences,
                           resolved.eval.batch_size, resolved.eval.seed)
    logged = {r["mode"]: r for r in runs.read_metrics(run, kind="eval") if r["step"] == 30}
    for mode, m in again.items():
        assert logged[mode]["accuracy_query"] == pytest.approx(m["accuracy_query"], abs=1e-6)
        assert logged[mode]["loss_query"] == pytest.approx(m["loss_query"], rel=1e-5)
    out = eicl("eval", str(run), "--mode", "fewshot_holdout", "--sequences", "64",
               data_dir=data_dir)
    assert out.returncode == 0, out.stderr


def test_resume_with_the_average_is_bit_exact(data_dir: Path, tmp_path: Path):
    cfg = tiny(data_dir, "train.ema_decay=0.95", "run.steps=12", "run.checkpoint_every=6",
               "run.eval_every=6", "run.log_every=3", "eval.train_sequences=32",
               "eval.batch_size=32")
    train_run(cfg, tmp_path / "whole")
    train_run(cfg.replace(run=dataclasses.replace(cfg.run, steps=6)), tmp_path / "split")
    train_run(cfg, tmp_path / "split", resume=True)
    a = tensors(runs.checkpoint_path(tmp_path / "whole", 12))
    b = tensors(runs.checkpoint_path(tmp_path / "split", 12))
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    evals = lambda run: [(r["step"], r["mode"], r["accuracy_query"], r["loss_query"])  # noqa: E731
                         for r in runs.read_metrics(run, kind="eval")]
    assert evals(tmp_path / "whole") == evals(tmp_path / "split")


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_a_decay_outside_zero_to_one_is_refused_in_one_line(value):
    with pytest.raises(config.ConfigError, match=r"train\.ema_decay = .* must be in \[0, 1\)"):
        config.load(Path(__file__).parent / "configs" / "tiny.toml", [f"train.ema_decay={value}"])
