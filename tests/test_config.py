"""The typed config: every shipped file loads and round-trips; bad configs are
refused with one line naming the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eicl_cli import config as C

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_round_trips(path: Path) -> None:
    cfg = C.load(path)
    text = C.to_toml(cfg)
    again = C.from_toml(text)
    assert again == cfg
    assert C.to_toml(again) == text


def test_paper_values() -> None:
    cfg = C.load(ROOT / "configs/images_all_exemplars.toml")
    assert (cfg.classes.n_rare, cfg.classes.n_common, cfg.classes.n_holdout) == (1603, 10, 10)
    assert cfg.classes.split_seed == 1337
    assert cfg.num_classes == 1623
    assert cfg.sequences.seq_len == 9 and cfg.sequences.bursty_shots == 3 and cfg.sequences.ways == 2
    assert cfg.eval.modes == ["no_support_zipfian", "fewshot_zipfian", "fewshot_holdout"]
    aug = C.load(ROOT / "configs/images_augmented.toml")
    assert aug.data.augment_images and aug.classes.preserve_ordering_every_n == 8
    assert (aug.classes.n_rare, aug.classes.n_common, aug.classes.n_holdout) == (12700, 100, 80)
    assert aug.sequences.p_bursty == 0.9  # inherited from the base file
    ident = C.load(ROOT / "configs/images_identical.toml")
    assert ident.data.exemplars == "single"


def test_num_classes_labelings() -> None:
    cfg = C.load(ROOT / "configs/images_all_exemplars.toml",
                 ["sequences.labeling_rare='ordered_polysemy3'"])
    assert cfg.num_classes == 3 * 1603 + 10
    cfg = C.load(ROOT / "configs/images_all_exemplars.toml", ["sequences.labeling_common='ordered5'"])
    assert cfg.num_classes == 1623 + 5


def test_overrides_are_toml_literals() -> None:
    cfg = C.load(ROOT / "configs/images_all_exemplars.toml", [
        "sequences.p_bursty=0.5", "data.dataset=synthetic", "eval.modes=['fewshot_holdout']",
        "run.steps=10", "model.kind=\"lstm\""])
    assert cfg.sequences.p_bursty == 0.5
    assert cfg.data.dataset == "synthetic"
    assert cfg.eval.modes == ["fewshot_holdout"]
    assert cfg.run.steps == 10 and cfg.model.kind == "lstm"


def test_base_chain_resolves_relative_to_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.toml").write_text("[sequences]\np_bursty = 0.25\n")
    (tmp_path / "sub/b.toml").write_text('base = "../a.toml"\n[run]\nsteps = 7\n')
    cfg = C.load(tmp_path / "sub/b.toml")
    assert cfg.sequences.p_bursty == 0.25 and cfg.run.steps == 7


def test_base_loop_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(C.ConfigError, match="loops"):
        C.load(tmp_path / "a.toml")


BAD = {
    "misspelt_key": ("[sequences]\np_burst = 0.5\n", "unknown key sequences.p_burst; did you mean 'p_bursty'"),
    "misspelt_section": ("[sequencs]\np_bursty = 0.5\n", "did you mean 'sequences'"),
    "key_of_another_section": ("[train]\nnum_steps = 5\n",
                               "unknown key train.num_steps; did you mean run.steps or"),
    "key_of_two_sections": ("[train]\nseed = 5\n", "did you mean eval.seed or run.seed?"),
    "probability": ("[sequences]\np_bursty = 1.5\n", "sequences.p_bursty = 1.5 must be a probability in [0, 1]"),
    "prob_sum": ("[sequences]\np_bursty_common = 0.6\np_bursty_zipfian = 0.6\n", "must be <= 1"),
    "seq_len": ("[sequences]\nseq_len = 3\nbursty_shots = 3\nways = 2\n", "sequences.seq_len = 3 is too short"),
    "wrong_type": ("[run]\nsteps = \"many\"\n", "run.steps must be an integer"),
    "heads": ("[transformer]\nnum_heads = 5\n", "must be divisible by transformer.num_heads = 5"),
    "odd_emb": ("[embedding]\nemb_dim = 63\n[transformer]\nnum_heads = 1\n", "emb_dim = 63 must be even"),
    "model": ("[model]\nkind = \"gru\"\n", "model.kind = 'gru' is not allowed; choose one of: transformer, lstm, vanilla_rnn"),
    "encoder": ("[embedding]\nexample_encoder = \"vit\"\n", "embedding.example_encoder = 'vit' is not allowed"),
    "labeling": ("[sequences]\nlabeling_rare = \"sorted\"\n", "unknown labeling 'sorted'"),
    "train_kind": ("[sequences]\ntrain_kind = \"bursti\"\n", "sequences.train_kind = 'bursti' is not allowed"),
    "too_many_classes": ("[classes]\nn_rare = 1700\n", "exceeds the 1623 classes"),
    "eval_mode": ("[eval]\nmodes = [\"fewshot_holdouts\"]\n", "eval.modes entry = 'fewshot_holdouts' is not allowed"),
    "nan_zipf": ("[classes]\nzipf_exponent = nan\n",
                 "classes.zipf_exponent = nan is not a finite number; allowed: >= 0"),
    "inf_max_lr": ("[optimizer]\nmax_lr = inf\n",
                   "optimizer.max_lr = inf is not a finite number; allowed: > 0"),
    "steep_zipf": ("[classes]\nzipf_exponent = 1100\n",
                   "classes.zipf_exponent = 1100 is too steep for the zipfian (rare + common) "
                   "pool: its most frequent class would take 100% of the draws, and a no-support "
                   "sequence needs the other classes; at most 99.9% is allowed, an exponent of "
                   "at most 9.98 with n_rare = 1603, n_common = 10"),
    "invert_symbolic": ("[data]\ndataset = \"symbolic\"\nsymbolic_classes = 1623\n[embedding]\nexample_encoder = \"embedding\"\n"
                        "[preproc]\ninvert = true\n", "preproc.invert = true needs images"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_config_refused(tmp_path: Path, name: str) -> None:
    text, message = BAD[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(C.ConfigError) as info:
        C.load(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


FLOAT_KEYS = [key for key, typ, _ in C.field_docs() if typ == "float"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-nan"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_values(key: str, value: str) -> None:
    # Every range check compares, and every comparison with NaN is false: NaN
    # passed them all (max_lr, noise_scale, clip_level, zipf_exponent).
    with pytest.raises(C.ConfigError) as info:
        C.from_dict(C.apply_overrides({}, [f"{key}={value}"]))
    message = str(info.value)
    assert message.startswith(f"{key} = {value.lstrip('-') if 'nan' in value else value} "
                              "is not a finite number; allowed: ")
    assert "\n" not in message


def test_the_float_keys_are_all_checked() -> None:
    assert len(FLOAT_KEYS) >= 14 and "classes.zipf_exponent" in FLOAT_KEYS


@pytest.mark.parametrize("zipf_for_common_rare", [False, True])
@pytest.mark.parametrize("classes", [(1603, 10), (40, 10), (1, 1), (600, 1000), (12700, 100)])
def test_zipf_exponent_bound_is_the_one_in_the_message(classes: tuple[int, int],
                                                      zipf_for_common_rare: bool) -> None:
    import re

    from eicl_cli import class_weights
    n_rare, n_common = classes
    top = class_weights.steepest_exponent(n_rare, n_common, zipf_for_common_rare)
    assert top > 9  # far above the paper's 0..3

    def check(exponent: float) -> None:
        C.validate(C.Config(
            data=C.DataConfig(augment_images=True),  # 12,984 classes: room for every split
            classes=C.ClassesConfig(n_rare=n_rare, n_common=n_common, n_holdout=0,
                                    use_zipf_for_common_rare=zipf_for_common_rare,
                                    zipf_exponent=exponent)))

    check(top)
    for steeper in (top + 0.02, 1e6):
        with pytest.raises(C.ConfigError, match=re.escape(f"zipf_exponent = {steeper:g} is too steep")
                           + ".*" + re.escape(f"at most {top:g} with n_rare = {n_rare}")):
            check(steeper)


def test_missing_base_and_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('base = "nowhere.toml"\n')
    with pytest.raises(C.ConfigError, match="base file not found: .*nowhere.toml"):
        C.load(path)
    path.write_text("[run]\nsteps = 10\nseed = = 3\n")
    with pytest.raises(C.ConfigError, match="line 3"):
        C.load(path)


def test_bad_override_refused() -> None:
    with pytest.raises(C.ConfigError, match="unknown key run.step; did you mean 'steps'"):
        C.load(ROOT / "configs/images_all_exemplars.toml", ["run.step=3"])
    with pytest.raises(C.ConfigError, match="section.key=value"):
        C.load(ROOT / "configs/images_all_exemplars.toml", ["run.steps"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eicl_cli", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_lists_subcommands() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("prepare-data", "train", "eval", "sweep", "report"):
        assert name in out.stdout


def test_cli_print_config_is_resolved_toml() -> None:
    out = run_cli("train", "--config", "configs/images_augmented.toml", "--print-config",
                  "--set", "run.steps=5")
    assert out.returncode == 0, out.stderr
    cfg = C.from_toml(out.stdout)
    assert cfg.run.steps == 5 and cfg.data.augment_images and cfg.sequences.seq_len == 9


@pytest.mark.parametrize("case", [
    ("misspelt_key", "p_burst"), ("probability", "1.5"), ("seq_len", "seq_len = 3")])
def test_cli_bad_config_one_line_exit_2(tmp_path: Path, case: tuple[str, str]) -> None:
    name, needle = case
    path = tmp_path / "bad.toml"
    path.write_text(BAD[name][0])
    out = run_cli("train", "--config", str(path), "--print-config")
    assert out.returncode == 2
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_cli_set_nan_is_one_line_exit_2() -> None:
    from typer.testing import CliRunner

    from eicl_cli.cli import app
    out = CliRunner().invoke(app, ["train", "--print-config", "--set", "optimizer.clip_level=nan"])
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == [
        "error: optimizer.clip_level = nan is not a finite number; allowed: >= 0"]


def test_cli_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[run]\nsteps = 10\nseed = = 3\n")
    out = run_cli("train", "--config", str(path), "--print-config")
    assert out.returncode == 2 and "line 3" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_every_key_documented_in_config_reference() -> None:
    reference = (ROOT / "docs" / "config.md").read_text()
    missing = [key for key, _, _ in C.field_docs() if f"`{key}`" not in reference]
    assert not missing, f"docs/config.md lacks: {missing}"


def test_cli_print_model_needs_no_data(tmp_path: Path) -> None:
    import os
    out = subprocess.run([sys.executable, "-m", "eicl_cli", "train", "--config",
                          "configs/images_all_exemplars.toml", "--print-model"],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "EICL_DATA_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert "831,479" in out.stdout and "103,872" in out.stdout and "105,495" in out.stdout
