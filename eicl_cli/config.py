"""Typed experiment configuration: TOML in, validated dataclasses out, TOML back.

Every knob of docs/experiment.md has a field here. A config is loaded once, at the edge
(the CLI), validated, and then passed around as a frozen tree of dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from . import class_weights
from .errors import EiclError
from .files import read_text


class ConfigError(EiclError):
    """A config that cannot be used; the message is one line for the user."""


# Allowed values, named once so validation, docs and the CLI agree.
DATASETS = ("omniglot", "synthetic", "symbolic")
SPLITS = ("train", "test", "all")
EXEMPLARS = ("all", "single", "separated")
TRAIN_KINDS = ("bursty", "mixed", "random", "no_support_common", "no_support_rare",
               "no_support_zipfian", "fewshot_common", "fewshot_rare",
               "fewshot_zipfian", "fewshot_holdout")
EVAL_MODES = ("no_support_common", "no_support_rare", "no_support_zipfian",
              "fewshot_common", "fewshot_rare", "fewshot_zipfian", "fewshot_holdout",
              "bursty", "mixed")
NON_BURSTY_TYPES = ("zipfian", "common_uniform", "common_no_support")
ENCODERS = ("resnet", "linear", "embedding", "conv")
SEQ_MODELS = ("transformer", "lstm", "vanilla_rnn")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop", "lamb", "lion")
SCHEDULES = ("rsqrt", "constant", "cosine")
# dense: the paper's head; tied: logits through the label table; both: their sum.
LABEL_HEADS = ("dense", "tied", "both")
CONV_IMPLS = ("xla", "gemm")
# auto: blocked on a CPU, whole-map elsewhere; pallas: the fused kernels on a GPU.
STEM_IMPLS = ("auto", "pallas")
DTYPES = ("float32", "bfloat16")

# Omniglot class counts per split, before exemplar and augmentation changes.
OMNIGLOT_CLASSES = {"train": 964, "test": 659, "all": 1623}
OMNIGLOT_DRAWERS = 20
AUGMENT_FACTOR = 8
# Experiment trackers a run can also log to (eicl_cli/tracking.py).
TRACKERS = ("tensorboard", "wandb")


# Every field carries its description (and, where validation limits it, its
# allowed values) in its metadata: `python -m eicl_cli.config_doc` renders
# them as docs/config.md.
def _knob(default: Any, doc: str, allowed: Any = None) -> Any:
    """A config field with its description for docs/config.md."""
    meta = {"doc": doc, "allowed": allowed}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _knob(
        "omniglot", "`omniglot`: the cache `eicl prepare-data` builds; `synthetic`: the "
        "procedurally drawn Omniglot-shaped set; `symbolic`: integer tokens, no images "
        "(needs `embedding.example_encoder = \"embedding\"`).", DATASETS)
    data_dir: str = _knob(
        "", "Where dataset caches live; empty means `$EICL_DATA_DIR`, else `~/.cache/eicl`.")
    split: str = _knob(
        "all", "Omniglot set: `train` (background, 964 classes), `test` (evaluation, 659), "
        "`all` (both, 1,623; the paper's).", SPLITS)
    exemplars: str = _knob(
        "all", "`all`: 20 drawings per class; `single`: drawer 01 only; `separated`: each "
        "drawing becomes its own class (class x 20 + drawer - 1).", EXEMPLARS)
    augment_images: bool = _knob(
        False, "Every class becomes 8: flip left-right (no, yes) x rotate by 0, 90, 180, "
        "270 degrees.")
    n_to_keep: int = _knob(
        0, "Keep only the first n classes (before augmentation); 0 keeps all.", ">= 0")
    symbolic_classes: int = _knob(
        1000, "Number of classes of the `symbolic` dataset.", ">= 1")
    cache_file: str = _knob(
        "", "Filled in by `eicl train`: the dataset cache file the run read.")
    cache_sha256: str = _knob(
        "", "Filled in by `eicl train`: the SHA-256 of that cache file.")


@dataclass(frozen=True)
class PreprocConfig:
    downsample: bool = _knob(
        False, "Resize images from 105 x 105 to 28 x 28 (bilinear, no antialiasing) "
        "before the model.")
    invert: bool = _knob(
        False, "Feed the model 1 - pixel (ink 1.0 on a 0.0 background), applied after "
        "noise. Not in the paper: the quickstart's small conv encoder needs it to learn "
        "image matching reliably (docs/reproduction.md).")


@dataclass(frozen=True)
class ClassesConfig:
    split_seed: int = _knob(
        1337, "Seed of the permutation that assigns classes to rare, common and holdout "
        "(1337 in every paper config).")
    n_rare: int = _knob(1603, "Rare classes: the first n_rare of the permuted list.", ">= 0")
    n_common: int = _knob(10, "Common classes: the next n_common of the permuted list.",
                          ">= 0")
    n_holdout: int = _knob(
        10, "Holdout classes, never trained on: the LAST n_holdout of the permuted list.",
        ">= 0")
    zipf_exponent: float = _knob(
        0.0, "Zipf exponent of the class frequencies over rare + common classes; 0 is "
        "uniform.", ">= 0, and no class may take more than 99.9% of a pool's draws "
        "(about 10 at most with the paper's classes)")
    use_zipf_for_common_rare: bool = _knob(
        False, "Rare-only and common-only draws use the matching slice of the Zipf weights "
        "(renormalised) instead of uniform weights.")
    preserve_ordering_every_n: int = _knob(
        0, "Permute blocks of n consecutive classes as wholes (8 keeps an augmented "
        "character's variants together); 0 permutes single classes.",
        ">= 0; must divide the available classes")


_LABELINGS = "ordered, orderedK, original, unfixed"


@dataclass(frozen=True)
class SequencesConfig:
    train_kind: str = _knob(
        "bursty", "Kind of training sequence: `bursty`, `mixed`, `random`, or any "
        "`no_support_*` / `fewshot_*` evaluation kind.", TRAIN_KINDS)
    seq_len: int = _knob(9, "Items per sequence, the query included.", ">= 1")
    fs_shots: int = _knob(4, "Shots per class in few-shot evaluation sequences.", ">= 1")
    bursty_shots: int = _knob(
        3, "Shots per class in the few-shot part (burst) of a bursty training sequence.",
        ">= 1; bursty_shots x ways + 1 <= seq_len")
    ways: int = _knob(2, "Classes per few-shot task.", ">= 1")
    p_bursty: float = _knob(0.9, "Probability that a training sequence is bursty.",
                            "[0, 1]")
    p_bursty_common: float = _knob(
        0.0, "Probability that a burst draws from the common classes.",
        "[0, 1]; p_bursty_common + p_bursty_zipfian <= 1")
    p_bursty_zipfian: float = _knob(
        1.0, "Probability that a burst draws from the Zipfian pool (rare + common); "
        "otherwise, and not common, it draws from the rare classes.", "[0, 1]")
    p_fewshot: float = _knob(
        0.1, "In `mixed` sequences, the probability of a few-shot sequence (rare classes, "
        "unfixed labels).", "[0, 1]")
    non_bursty_type: str = _knob(
        "zipfian", "What a non-bursty training sequence is: `zipfian` (random classes from "
        "the Zipfian pool), `common_uniform` (random common classes), `common_no_support` "
        "(common classes, the query's class absent from the context).", NON_BURSTY_TYPES)
    labeling_common: str = _knob(
        "ordered", "Labels of common draws and of non-bursty sequences. `original` is the "
        "class's raw Omniglot id (0..1622) with `data.split = \"all\"` or `\"train\"`; with "
        "`\"test\"` it is the class's position in the test set, so labels fit the model's "
        "outputs.", _LABELINGS)
    labeling_rare: str = _knob(
        "ordered", "Labels of rare and Zipfian bursts: as `labeling_common`, or "
        "`ordered_polysemyX` (rare class i owns X labels).",
        _LABELINGS + ", ordered_polysemyX")
    randomly_generate_rare: bool = _knob(
        False, "Each rare class in a sequence gets one fresh random binary image, shared by "
        "its occurrences; as in the original, not in `mixed` sequences (nor "
        "`fewshot_common`, which has no rare classes).")
    grouped: bool = _knob(
        False, "Few-shot contexts in blocks of `ways` items that each hold every class "
        "once.")
    all_unique: bool = _knob(
        False, "Every random part of a sequence draws distinct classes: the `random` kind, "
        "non-bursty `zipfian` and `common_uniform` sequences, a burst's remainder, "
        "`mixed`'s common part (the original: the `random` kind only). A part longer than "
        "its pool is refused before a run starts.")
    noise_scale: float = _knob(
        0.0, "Standard deviation of Gaussian noise added to every pixel.", ">= 0")


@dataclass(frozen=True)
class EmbeddingConfig:
    emb_dim: int = _knob(
        64, "Token width.", "even, >= 2, divisible by transformer.num_heads")
    example_encoder: str = _knob(
        "resnet", "`resnet` (the paper's), `linear` (one dense layer), `conv` (small and "
        "fast, for CPUs; not in the paper), `embedding` (symbolic data).", ENCODERS)
    flatten_superpixels: bool = _knob(
        False, "Flatten the ResNet's output positions instead of mean-pooling them.")
    example_dropout_prob: float = _knob(
        0.0, "Dropout on example embeddings in training.", "[0, 1]")
    concatenate_labels: bool = _knob(
        False, "One token per item, concat(image, label), instead of interleaved image and "
        "label tokens.")
    normalize_examples: bool = _knob(
        False, "A LayerNorm (scale and offset) on every example embedding before it becomes "
        "a token. Not in the paper: it keeps ink-heavy characters from dominating a small "
        "encoder's tokens (docs/reproduction.md).")
    label_head: str = _knob(
        "dense", "`dense`: the paper's dense layer to num_classes; `tied`: logits = learned "
        "scale x output . label-table row + bias; `both`: their sum (the tied part's scale "
        "starts at 0). Not in the paper; `tied` and `both` need interleaved tokens and, "
        "for RNNs, `rnn.hidden_size = emb_dim`.", LABEL_HEADS)
    use_positional_encodings: bool = _knob(
        True, "Add sinusoidal positional encodings (timescale base 30).")
    positional_dropout_prob: float = _knob(
        0.0, "Dropout after the positional encodings in training.", "[0, 1]")
    resnet_blocks_per_group: list[int] = _knob(
        [2, 2, 2, 2], "Bottleneck blocks in each ResNet group.", "entries >= 1")
    resnet_channels_per_group: list[int] = _knob(
        [16, 32, 32], "Channels of every ResNet group but the last, which has `emb_dim`.",
        "one entry fewer than resnet_blocks_per_group; entries >= 1")
    conv_channels: list[int] = _knob(
        [32, 32, 32], "Channels of the `conv` encoder's 3 x 3 stride-2 layers.",
        "entries >= 1")
    conv_impl: str = _knob(
        "xla", "How the `resnet` and `conv` encoders compute k x k convolutions: `xla` "
        "(XLA's convolution) or `gemm` (the shifted windows side by side times the kernel "
        "as one matrix). Same model and results within float rounding; only speed differs "
        "(`gemm` helps `sweep --stack`; docs/performance.md).", CONV_IMPLS)
    stem_impl: str = _knob(
        "auto", "How the `resnet` stem (7 x 7 convolution, batch-norm moments, 3 x 3 max "
        "pool) runs on a CUDA GPU: `auto` (XLA, the whole map in memory) or `pallas` (two "
        "fused Pallas kernels that never write the map). Same results within float "
        "rounding; on a CPU both run the blocked stem. `eicl train` refuses `pallas` on "
        "several GPUs. Not yet timed on a GPU, hence not the default.", STEM_IMPLS)


@dataclass(frozen=True)
class ModelConfig:
    kind: str = _knob("transformer", "The sequence model.", SEQ_MODELS)
    dtype: str = _knob(
        "float32", "`bfloat16` runs activations in bfloat16; parameters, logits and loss "
        "stay float32.", DTYPES)


@dataclass(frozen=True)
class TransformerConfig:
    num_layers: int = _knob(12, "Transformer blocks.", ">= 1")
    num_heads: int = _knob(8, "Attention heads.", ">= 1")
    widening_factor: int = _knob(4, "The MLP's width is this times `emb_dim`.", ">= 1")
    dropout_prob: float = _knob(
        0.0, "Dropout on attention and MLP outputs in training.", "[0, 1]")
    unroll: int = _knob(
        0, "Blocks per iteration of the loop over layers: `num_layers` or more means no "
        "loop; 0 means a loop when compiled for a CPU and none for a GPU. Same model and "
        "results up to rounding; only compile time and step time change.", ">= 0")


@dataclass(frozen=True)
class RNNConfig:
    num_layers: int = _knob(12, "Stacked recurrent layers (`lstm`, `vanilla_rnn`).", ">= 1")
    hidden_size: int = _knob(64, "Width of the recurrent state.", ">= 1")
    dropout_prob: float = _knob(
        0.0, "Dropout between recurrent layers in training (the original accepts it but "
        "never applies it).", "[0, 1]")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = _knob("adam", "The optax optimizer.", OPTIMIZERS)
    max_lr: float = _knob(3e-4, "Peak learning rate.", "> 0")
    warmup_steps: int = _knob(4000, "Linear warm-up from 0 to `max_lr`.", ">= 0")
    schedule: str = _knob(
        "rsqrt", "After warm-up: `rsqrt` (max_lr x sqrt(warmup / step), the paper's), "
        "`constant`, `cosine` (to 0 at `run.steps`).", SCHEDULES)
    clip_level: float = _knob(
        0.0, "Global-norm gradient clipping; 0 = none (the original names 0.25 but never "
        "applies it).", ">= 0")
    weight_decay: float = _knob(
        0.0, "Decoupled weight decay (`adamw`, `lamb`).", ">= 0")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _knob(
        32, "Sequences per training step; with several devices it must split evenly "
        "over them.", ">= 1")
    w_interim: float = _knob(
        0.0, "Loss weight spread evenly over the context images' predictions; the query "
        "gets 1 - w. Needs interleaved tokens.", "[0, 1]")
    ema_decay: float = _knob(
        0.0, "Evaluate an exponential moving average of the parameters (ema <- d x ema + "
        "(1 - d) x params after every update) instead of the parameters; 0 = off. Training "
        "is unchanged; the average is checkpointed and resumed with the optimizer state. "
        "Not in the paper.", "[0, 1)")
    # Used by train.py; 0 is resolved by flat_step.steps_per_call.
    steps_per_call: int = _knob(
        0, "Training steps per device call: K > 1 runs K steps in one jitted loop, so the "
        "host's fixed price per call is paid once per K steps; 0 = 10 on a GPU, 1 on a "
        "CPU. A call never crosses a log, evaluation or checkpoint step. The same updates, "
        "possibly rounded differently. Not in the paper.", ">= 0")
    # -1 is resolved by data.batch_workers.
    draw_workers: int = _knob(
        -1, "Processes that draw stacked runs' training batches (`sweep --stack`, "
        "`bench --stack`), two calls ahead of the step; -1 = one per run up to the usable "
        "cores less one on a GPU, none on a CPU; 0 = drawn in the training process. The "
        "batches are the same either way. Not in the paper.", ">= -1")


@dataclass(frozen=True)
class EvalConfig:
    modes: list[str] = _knob(
        ["no_support_zipfian", "fewshot_zipfian", "fewshot_holdout"],
        "Evaluation sequence kinds (docs/experiment.md §5, §8).", "non-empty list of: "
        + ", ".join(EVAL_MODES))
    sequences: int = _knob(10000, "Sequences per mode for `eicl eval`.", ">= 1")
    train_sequences: int = _knob(
        1000, "Sequences per mode at each evaluation during training.", ">= 1")
    batch_size: int = _knob(
        250, "Sequences per evaluation batch; the numbers do not depend on it, the memory "
        "an evaluation needs does (docs/performance.md).", ">= 1")
    seed: int = _knob(0, "Seed of the fixed evaluation sets, independent of training.")


@dataclass(frozen=True)
class RunConfig:
    steps: int = _knob(500_000, "Training steps.", ">= 0")
    seed: int = _knob(0, "Seed of initialisation, training data and dropout.")
    log_every: int = _knob(100, "Steps between training log lines.", ">= 1")
    eval_every: int = _knob(1000, "Steps between evaluations.", ">= 1")
    checkpoint_every: int = _knob(5000, "Steps between checkpoints.", ">= 1")
    keep_checkpoints: int = _knob(
        3, "Checkpoints kept; the final one is always kept too.", ">= 1")
    checkpoint_schedule: list[int] = _knob(
        [], "Steps at which the model is also kept for training dynamics (`eicl probe "
        "--all`), in RUN/dynamics/: weights and batch-norm state only, never pruned.",
        "list of distinct steps >= 1")
    checkpoints_per_decade: int = _knob(
        0, "Also keep the model at this many log-spaced steps per decade of training "
        "(1, 2, 3, 6, 10, 18, 32, ... with 4), in RUN/dynamics/ as `checkpoint_schedule`; "
        "0 = none.", "0 to 100")
    out_dir: str = _knob("runs", "Folder in which run folders are made.")
    name: str = _knob(
        "", "Run folder name; empty = the config file's name and the time.",
        "one folder name: no `/` or `\\`, not `.` or `..`")
    trackers: list[str] = _knob(
        [], "Experiment trackers that also show the run's metrics.jsonl records "
        "(docs/usage.md, Tracking); each needs its extra, e.g. `pip install "
        "'eicl[tensorboard]'`.", "list of: " + ", ".join(TRACKERS))
    wandb_project: str = _knob(
        "", "Weights & Biases project; empty = $WANDB_PROJECT, else `eicl`.")
    wandb_entity: str = _knob(
        "", "Weights & Biases entity (user or team); empty = $WANDB_ENTITY or your default.")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preproc: PreprocConfig = field(default_factory=PreprocConfig)
    classes: ClassesConfig = field(default_factory=ClassesConfig)
    sequences: SequencesConfig = field(default_factory=SequencesConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    rnn: RNNConfig = field(default_factory=RNNConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # Derived quantities: computed, never stored, so they cannot go stale.
    @property
    def num_classes(self) -> int:
        return num_classes(self)

    def replace(self, **sections: Any) -> "Config":
        return dataclasses.replace(self, **sections)


_SECTION_TYPES = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------- labels

def parse_labeling(name: str) -> tuple[str, int]:
    """'ordered' -> ('ordered', 0), 'ordered5' -> ('ordered', 5),
    'ordered_polysemy3' -> ('polysemy', 3), 'original'/'unfixed' -> (name, 0)."""
    if name in ("ordered", "original", "unfixed"):
        return name, 0
    if name.startswith("ordered_polysemy"):
        tail = name[len("ordered_polysemy"):]
        if tail.isdigit() and int(tail) >= 1:
            return "polysemy", int(tail)
    elif name.startswith("ordered"):
        tail = name[len("ordered"):]
        if tail.isdigit():
            return "ordered", int(tail)
    raise ConfigError(
        f"unknown labeling {name!r}; allowed: ordered, orderedK, original, unfixed, "
        "ordered_polysemyX")


def num_classes(cfg: Config) -> int:
    """The model's output size (docs/experiment.md §4)."""
    c = cfg.classes
    kind, x = parse_labeling(cfg.sequences.labeling_rare)
    if kind == "polysemy":
        return x * c.n_rare + c.n_common
    n = c.n_rare + c.n_common + c.n_holdout
    if "original" in (cfg.sequences.labeling_rare, cfg.sequences.labeling_common):
        n = max(n, available_classes(cfg))
    offsets = [parse_labeling(l)[1] for l in (cfg.sequences.labeling_rare,
                                              cfg.sequences.labeling_common)]
    return n + max(offsets)


def available_classes(cfg: Config) -> int:
    """Classes the configured dataset provides after split, exemplars,
    n_to_keep and augmentation (in that order). Synthetic caches may hold fewer; the loader
    checks those against the cache."""
    d = cfg.data
    if d.dataset == "symbolic":
        n = d.symbolic_classes
    else:
        n = OMNIGLOT_CLASSES[d.split]
        if d.exemplars == "separated":
            n *= OMNIGLOT_DRAWERS
    # As in the original: keep the first n classes, then augment.
    if d.n_to_keep:
        n = min(n, d.n_to_keep)
    if d.augment_images and d.dataset != "symbolic":
        n *= AUGMENT_FACTOR
    return n


# ---------------------------------------------------------------- loading

def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


def _suggest_key(section: str, key: str, options: list[str]) -> str:
    """_suggest within the section, else the closest keys of the other
    sections (`train.num_steps` -> run.steps)."""
    if difflib.get_close_matches(key, options, n=1, cutoff=0.5):
        return _suggest(key, options)
    elsewhere: dict[str, list[str]] = {}
    for name, cls in _SECTION_TYPES.items():
        for k in typing.get_type_hints(cls) if name != section else ():
            elsewhere.setdefault(k, []).append(f"{name}.{k}")
    close = difflib.get_close_matches(key, list(elsewhere), n=3, cutoff=0.6)
    if not close:
        return _suggest(key, options)
    return f"; did you mean {' or '.join([q for k in close for q in elsewhere[k]][:3])}?"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_toml_file(path: Path, what: str = "config") -> dict:
    """Parse one TOML file; a missing file or a syntax error (with its line)
    is a one-line ConfigError."""
    if not path.exists():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return tomllib.loads(read_text(path, f"{what} file"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error in {path}: {e}") from None


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file, resolving its `base` chain (relative to the file)."""
    raw = read_toml_file(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file path string, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to {base_path}")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base file not found: {base_path}")
    return _merge(_read_toml(base_path, seen + (path.resolve(),)), raw)


def read_with_bases(path: str | Path) -> dict:
    """A config file's raw TOML with its `base` chain merged in."""
    return _read_toml(Path(path).resolve())


def parse_override(item: str) -> tuple[str, Any]:
    """'section.key=value' with value a TOML literal; a bare word is a string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, value = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"--set {item!r}: key must be section.key, e.g. sequences.p_bursty")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for item in overrides:
        key, value = parse_override(item)
        section, name = key.split(".")
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"--set {item!r}: {section!r} is not a section")
        out[section][name] = value
    return out


def _coerce(where: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin is list:
        (inner,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {inner.__name__}, got {value!r}")
        return [_coerce(f"{where}[{i}]", v, inner) for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ!r}")  # a bug in this file


def coerce_value(key: str, value: Any) -> Any:
    """`value` as the config key `section.key` holds it (1 -> 1.0 for a float
    key); ConfigError when it has the wrong type."""
    section, name = key.split(".", 1)
    return _coerce(key, value, typing.get_type_hints(_SECTION_TYPES[section])[name])


# The top-level keys of a sweep file (sweep.py) besides `base`, which a
# config has too: a config holding one is a sweep file given as a config.
SWEEP_KEYS = ("description", "seeds", "set", "grid", "zip", "slurm")


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from a plain dict (parsed TOML)."""
    raw = dict(raw)
    raw.pop("base", None)
    sections = {}
    sweep_keys = [k for k in SWEEP_KEYS if k in raw]
    if sweep_keys:
        raise ConfigError(f"{sweep_keys[0]!r} is a sweep file's key, not a config's: run a "
                          f"sweep file with `eicl sweep FILE`")
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise ConfigError(f"unknown config section {name!r}" + _suggest(name, list(_SECTION_TYPES)))
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table of keys, got {value!r}")
        cls = _SECTION_TYPES[name]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, v in value.items():
            if key not in hints:
                raise ConfigError(f"unknown key {name}.{key}" + _suggest_key(name, key, list(hints)))
            kwargs[key] = _coerce(f"{name}.{key}", v, hints[key])
        sections[name] = cls(**kwargs)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a TOML config (with its base chain) and apply --set overrides."""
    raw = _read_toml(Path(path))
    return from_dict(apply_overrides(raw, overrides or []))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def from_toml(text: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"TOML syntax error: {e}") from None
    return from_dict(raw)


def data_dir(cfg: Config | None = None, explicit: str | None = None) -> Path:
    """--data-dir, else data.data_dir, else $EICL_DATA_DIR, else ~/.cache/eicl."""
    for candidate in (explicit, cfg.data.data_dir if cfg else None, os.environ.get("EICL_DATA_DIR")):
        if candidate:
            return Path(candidate).expanduser()
    return Path("~/.cache/eicl").expanduser()


# ---------------------------------------------------------------- validation

def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _prob(where: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where} = {value} must be a probability in [0, 1]")


def _at_least(where: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{where} = {value} must be >= {low}")


def _finite(cfg: Config) -> None:
    """Refuse NaN and infinities in every float key: each comparison below
    is false for NaN, so it would pass them all."""
    for sname, scls in _SECTION_TYPES.items():
        section = getattr(cfg, sname)
        for f in dataclasses.fields(scls):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                allowed = f.metadata.get("allowed")
                raise ConfigError(f"{sname}.{f.name} = {value} is not a finite number"
                                  + (f"; allowed: {allowed}" if allowed else ""))


def _zipf_usable(c: ClassesConfig) -> None:
    """Refuse an exponent so steep that a pool's most frequent class takes
    (nearly) all its draws: no-support sequences would then redraw forever."""
    steep = class_weights.too_steep(c.n_rare, c.n_common, c.zipf_exponent,
                                    c.use_zipf_for_common_rare)
    if steep is None:
        return
    pool, share = steep
    top = class_weights.steepest_exponent(c.n_rare, c.n_common, c.use_zipf_for_common_rare)
    what = (f"its most frequent class would take {100 * share:.6g}% of the draws"
            if math.isfinite(share) else "its weights underflow to nothing in float64")
    raise ConfigError(
        f"classes.zipf_exponent = {c.zipf_exponent:g} is too steep for the "
        f"{class_weights.POOL_LABELS[pool]} pool: {what}, and a no-support sequence needs "
        f"the other classes; at most {100 * class_weights.MAX_SHARE:g}% is allowed, an "
        f"exponent of at most {top:g} with n_rare = {c.n_rare}, n_common = {c.n_common}"
        + (", use_zipf_for_common_rare = true" if c.use_zipf_for_common_rare else ""))


def validate(cfg: Config) -> None:
    """Refuse configs that cannot run; each message names the value and what is allowed."""
    _finite(cfg)
    d, c, s, e = cfg.data, cfg.classes, cfg.sequences, cfg.embedding
    _choice("data.dataset", d.dataset, DATASETS)
    _choice("data.split", d.split, SPLITS)
    _choice("data.exemplars", d.exemplars, EXEMPLARS)
    _at_least("data.n_to_keep", d.n_to_keep, 0)
    _at_least("data.symbolic_classes", d.symbolic_classes, 1)

    for name in ("n_rare", "n_common", "n_holdout", "preserve_ordering_every_n"):
        _at_least(f"classes.{name}", getattr(c, name), 0)
    _at_least("classes.zipf_exponent", c.zipf_exponent, 0.0)
    needed = c.n_rare + c.n_common + c.n_holdout
    have = available_classes(cfg)
    if needed > have:
        raise ConfigError(
            f"classes.n_rare + n_common + n_holdout = {needed} exceeds the {have} classes "
            f"that data.dataset={d.dataset!r} (split {d.split!r}, exemplars {d.exemplars!r}, "
            f"augment_images={d.augment_images}) provides")
    _zipf_usable(c)
    g = c.preserve_ordering_every_n
    if g > 1 and have % g:
        raise ConfigError(
            f"classes.preserve_ordering_every_n = {g} must divide the {have} available classes")

    _choice("sequences.train_kind", s.train_kind, TRAIN_KINDS)
    _choice("sequences.non_bursty_type", s.non_bursty_type, NON_BURSTY_TYPES)
    for name in ("p_bursty", "p_bursty_common", "p_bursty_zipfian", "p_fewshot"):
        _prob(f"sequences.{name}", getattr(s, name))
    if s.p_bursty_common + s.p_bursty_zipfian > 1.0 + 1e-9:
        raise ConfigError(
            f"sequences.p_bursty_common + p_bursty_zipfian = "
            f"{s.p_bursty_common + s.p_bursty_zipfian} must be <= 1")
    for name in ("seq_len", "fs_shots", "bursty_shots", "ways"):
        _at_least(f"sequences.{name}", getattr(s, name), 1)
    _at_least("sequences.noise_scale", s.noise_scale, 0.0)
    if s.train_kind == "bursty" and s.seq_len < s.bursty_shots * s.ways + 1:
        raise ConfigError(
            f"sequences.seq_len = {s.seq_len} is too short for bursty_shots x ways = "
            f"{s.bursty_shots} x {s.ways}; it must be >= {s.bursty_shots * s.ways + 1}")
    for name in ("labeling_common", "labeling_rare"):
        parse_labeling(getattr(s, name))
    if parse_labeling(s.labeling_common)[0] == "polysemy":
        raise ConfigError("sequences.labeling_common cannot be ordered_polysemyX; "
                          "polysemy applies to rare classes only")

    _choice("embedding.example_encoder", e.example_encoder, ENCODERS)
    _choice("embedding.label_head", e.label_head, LABEL_HEADS)
    _choice("embedding.conv_impl", e.conv_impl, CONV_IMPLS)
    _choice("embedding.stem_impl", e.stem_impl, STEM_IMPLS)
    if e.emb_dim < 2 or e.emb_dim % 2:
        raise ConfigError(f"embedding.emb_dim = {e.emb_dim} must be even and >= 2 "
                          "(sinusoidal positional encodings pair sines and cosines)")
    _prob("embedding.example_dropout_prob", e.example_dropout_prob)
    _prob("embedding.positional_dropout_prob", e.positional_dropout_prob)
    if len(e.resnet_channels_per_group) != len(e.resnet_blocks_per_group) - 1:
        raise ConfigError(
            f"embedding.resnet_channels_per_group has {len(e.resnet_channels_per_group)} entries; "
            f"it needs one fewer than resnet_blocks_per_group "
            f"({len(e.resnet_blocks_per_group)}), the last group having emb_dim channels")
    if any(v < 1 for v in e.resnet_blocks_per_group + e.resnet_channels_per_group + e.conv_channels):
        raise ConfigError("embedding resnet/conv block and channel counts must be >= 1")
    if (e.example_encoder == "embedding") != (d.dataset == "symbolic"):
        raise ConfigError(
            f"embedding.example_encoder = {e.example_encoder!r} does not fit data.dataset = "
            f"{d.dataset!r}; symbolic data needs 'embedding', images need resnet, linear or conv")
    if cfg.preproc.invert and d.dataset == "symbolic":
        raise ConfigError("preproc.invert = true needs images; data.dataset = 'symbolic' has none "
                          "(use omniglot or synthetic)")

    _choice("model.kind", cfg.model.kind, SEQ_MODELS)
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    t = cfg.transformer
    _at_least("transformer.num_layers", t.num_layers, 1)
    _at_least("transformer.num_heads", t.num_heads, 1)
    _at_least("transformer.widening_factor", t.widening_factor, 1)
    _prob("transformer.dropout_prob", t.dropout_prob)
    _at_least("transformer.unroll", t.unroll, 0)
    if e.emb_dim % t.num_heads:
        raise ConfigError(f"embedding.emb_dim = {e.emb_dim} must be divisible by "
                          f"transformer.num_heads = {t.num_heads}")
    _at_least("rnn.num_layers", cfg.rnn.num_layers, 1)
    _at_least("rnn.hidden_size", cfg.rnn.hidden_size, 1)
    _prob("rnn.dropout_prob", cfg.rnn.dropout_prob)
    if e.label_head != "dense":
        # The tied readout multiplies the head's input by label-table rows.
        head_in = (cfg.rnn.hidden_size if cfg.model.kind != "transformer"
                   else e.emb_dim * (2 if e.concatenate_labels else 1))
        if head_in != e.emb_dim:
            raise ConfigError(
                f"embedding.label_head = {e.label_head!r} needs the head's input to be emb_dim "
                f"wide ({e.emb_dim}), not {head_in}; use \"dense\", or interleaved tokens "
                "(and rnn.hidden_size = emb_dim for RNNs)")

    o = cfg.optimizer
    _choice("optimizer.name", o.name, OPTIMIZERS)
    _choice("optimizer.schedule", o.schedule, SCHEDULES)
    if o.max_lr <= 0:
        raise ConfigError(f"optimizer.max_lr = {o.max_lr} must be > 0")
    _at_least("optimizer.warmup_steps", o.warmup_steps, 0)
    _at_least("optimizer.clip_level", o.clip_level, 0.0)
    _at_least("optimizer.weight_decay", o.weight_decay, 0.0)

    _at_least("train.batch_size", cfg.train.batch_size, 1)
    _at_least("train.steps_per_call", cfg.train.steps_per_call, 0)
    if cfg.train.draw_workers < -1:
        raise ConfigError(f"train.draw_workers = {cfg.train.draw_workers} must be >= 0, "
                          "or -1 (chosen for the machine)")
    _prob("train.w_interim", cfg.train.w_interim)
    if cfg.embedding.concatenate_labels and cfg.train.w_interim > 0:
        # Each concatenated token holds its own image's label, so a loss on the
        # context predictions would be trivial; the original refuses it too.
        raise ConfigError(f"train.w_interim = {cfg.train.w_interim} needs interleaved tokens; "
                          "set it to 0 or embedding.concatenate_labels = false")
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay = {cfg.train.ema_decay} must be in [0, 1) "
                          "(0 = no moving average)")

    if not cfg.eval.modes:
        raise ConfigError(f"eval.modes is empty; choose from: {', '.join(EVAL_MODES)}")
    for m in cfg.eval.modes:
        _choice("eval.modes entry", m, EVAL_MODES)
    for name in ("sequences", "train_sequences", "batch_size"):
        _at_least(f"eval.{name}", getattr(cfg.eval, name), 1)

    r = cfg.run
    _at_least("run.steps", r.steps, 0)
    # The name is one folder inside run.out_dir: a path would put the run elsewhere.
    if r.name and (r.name in (".", "..") or "/" in r.name or "\\" in r.name):
        raise ConfigError(f"run.name = {r.name!r} is not allowed: one folder name inside "
                          f"run.out_dir (no '/' or '\\', not '.' or '..'); set run.out_dir "
                          f"or --out to put the run elsewhere")
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _at_least(f"run.{name}", getattr(r, name), 1)
    for t in r.trackers:
        _choice("run.trackers entry", t, TRACKERS)
    if not 0 <= r.checkpoints_per_decade <= 100:
        raise ConfigError(f"run.checkpoints_per_decade = {r.checkpoints_per_decade} is not "
                          "allowed; allowed: 0 (none) to 100")
    for step in r.checkpoint_schedule:
        _at_least("run.checkpoint_schedule entry", step, 1)
    if len(set(r.checkpoint_schedule)) != len(r.checkpoint_schedule):
        twice = sorted(x for x in set(r.checkpoint_schedule) if r.checkpoint_schedule.count(x) > 1)
        raise ConfigError(f"run.checkpoint_schedule lists step {twice[0]} twice; give each "
                          "step once")


def dynamics_steps(r: RunConfig) -> list[int]:
    """The steps, up to run.steps, at which the model is kept for training
    dynamics: the explicit schedule and N log-spaced steps per decade
    (10 ** (k / N) rounded, k = 0, 1, ...), merged and sorted."""
    steps = {s for s in r.checkpoint_schedule if s <= r.steps}
    n = r.checkpoints_per_decade
    if n:
        k = 0
        while (step := round(10 ** (k / n))) <= r.steps:
            steps.add(step)
            k += 1
    return sorted(steps)


def field_docs() -> list[tuple[str, str, Any]]:
    """(section.key, type, default) for every key: used by docs tests."""
    rows = []
    for sname, scls in _SECTION_TYPES.items():
        hints = typing.get_type_hints(scls)
        inst = scls()
        for f in dataclasses.fields(scls):
            typ = hints[f.name]
            tname = typ.__name__ if isinstance(typ, type) else str(typ)
            rows.append((f"{sname}.{f.name}", tname, getattr(inst, f.name)))
    return rows
