"""The sequence generator of docs/experiment.md §3-5: class split, pools, and whole batches.

The original draws one sequence at a time in Python; here every kind of
sequence is drawn for a whole batch at once with vectorised NumPy, and a batch
holds indices (class, drawing, label), never pixels: images are gathered,
augmented and noised where they are used (on device for training).

Streams: a training batch is a pure function of (run.seed, step), an
evaluation set a pure function of (eval.seed, mode), and `eicl sample` has a
stream of its own, so none of them can perturb another.

Choices where the original is silent or inconsistent (see docs):
- drawings are distinct across the WHOLE sequence (remainder + few-shot part);
  a class occurring more often than it has drawings cycles through a random
  permutation of its drawings (with one drawing, the same image repeats);
- labels are a property of the class: `ordered` is the class's position in
  rare + common + holdout, and with labeling_rare = ordered_polysemyX rare
  class i owns labels i*X .. i*X+X-1 and common labels start at n_rare*X,
  whatever pool the class was drawn from; within a few-shot part each of the
  `ways` classes keeps one of its X labels for the whole sequence (as the
  original), in random parts each occurrence draws its own;
- `unfixed` labels exist only for few-shot parts; a random / no-support part
  under an unfixed labeling gets the class's ordered label;
- `is_rare` marks membership in the rare list (the original marked items by
  the pool they came from, so rare classes drawn from the Zipfian pool were 0);
- the `random` kind is random(zipfian, seq_len) with labeling_common;
- sequences.all_unique makes every random(pool, L) part draw L distinct
  classes (docs/experiment.md §5): the `random` kind, non-bursty `zipfian` and
  `common_uniform` sequences, a bursty sequence's remainder and `mixed`'s
  common part (the original applies it to the `random` kind only).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import EVAL_MODES, TRAIN_KINDS, Config, num_classes, parse_labeling
from ..errors import EiclError
from .split import ClassSplit, make_split

KINDS = tuple(dict.fromkeys(TRAIN_KINDS + EVAL_MODES + ("random",)))
FEWSHOT_KINDS = ("fewshot_common", "fewshot_rare", "fewshot_zipfian", "fewshot_holdout")
NO_SUPPORT_KINDS = ("no_support_common", "no_support_rare", "no_support_zipfian")
# The pool a bursty sequence's remainder comes from, by the pool of its burst
# (docs/experiment.md §5).
REMAINDER_POOL = {"zipfian": "zipfian", "common": "rare", "rare": "common"}


def _all_unique_error(length: int, pool: str, size: int) -> EiclError:
    return EiclError(f"sequences.all_unique needs {length} distinct classes for a random part "
                     f"of a sequence but the {pool} pool has only {size}; set it to false or "
                     f"give the pool more classes")

# The least share of a pool's draws that the classes other than a
# no-support query may hold: below it, redrawing the context would take a
# million tries or more, or never end.
_REDRAW_FLOOR = 1e-6

# Independent random streams: the second entry of every seed sequence.
STREAM_TRAIN, STREAM_EVAL, STREAM_SAMPLE = 0, 1, 2
# Evaluation sets are drawn in chunks of this many sequences, so a set does not
# depend on the evaluation batch size and a small set is a prefix of a larger one.
EVAL_CHUNK = 1000


# ---------------------------------------------------------------- the batch

@dataclass(frozen=True)
class Batch:
    """B sequences of length L; all arrays (B, L) except is_bursty (B,)."""

    image_index: np.ndarray  # int32: row into dataset.images
    variant: np.ndarray  # int8: dataset.class_variant of the class
    class_index: np.ndarray  # int32: dataset class
    source_id: np.ndarray  # int32: Omniglot character id (dataset.class_source)
    label: np.ndarray  # int32: the target at each position
    is_rare: np.ndarray  # bool: the class is one of the rare classes
    rare_slot: np.ndarray  # int16: first position of this rare class if randomly generated, else -1
    is_bursty: np.ndarray  # (B,) bool: the sequence holds a few-shot problem

    @property
    def size(self) -> int:
        return int(self.label.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.label.shape[1])

    def __len__(self) -> int:
        return self.size

    def take(self, index: Any) -> "Batch":
        """Select sequences (a slice, an index array or a boolean mask)."""
        return Batch(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @staticmethod
    def concatenate(batches: list["Batch"]) -> "Batch":
        if len({b.seq_len for b in batches}) > 1:
            raise ValueError("cannot concatenate batches of different sequence lengths")
        return Batch(**{f.name: np.concatenate([getattr(b, f.name) for b in batches])
                        for f in dataclasses.fields(Batch)})


@dataclass(frozen=True)
class _Pool:
    name: str
    classes: np.ndarray  # (n,) int32 dataset classes
    cum: np.ndarray | None  # cumulative weights ending at exactly 1.0; None = uniform
    weights: np.ndarray

    @property
    def size(self) -> int:
        return int(self.classes.size)


def _make_pool(name: str, classes: np.ndarray, weights: np.ndarray) -> _Pool:
    uniform = classes.size == 0 or np.allclose(weights, weights[0], rtol=0, atol=1e-15)
    cum = None
    if not uniform:
        cum = np.cumsum(weights)
        cum /= cum[-1]
        cum[-1] = 1.0
    return _Pool(name, classes.astype(np.int32), cum, weights)


def _check_redraw_can_end(pool: _Pool, queries: np.ndarray) -> None:
    """Refuse to redraw a no-support context that a draw can (nearly) never
    fill, where the classes other than the query hold under _REDRAW_FLOOR
    of the pool's CDF. Config validation refuses such steep weights; this
    keeps a pool it did not see from hanging."""
    below = np.concatenate([[0.0], pool.cum[:-1]])[queries]
    others = below + (1.0 - pool.cum[queries])
    if (others < _REDRAW_FLOOR).any():
        raise EiclError(f"no-support sequences cannot draw a context class other than the "
                        f"query from the {pool.name} pool: its most frequent class takes "
                        f"nearly all its draws (classes.zipf_exponent is too steep)")


def _shuffle_positions(rng: np.random.Generator, n: int, length: int) -> np.ndarray:
    """(n, length) independent random permutations of 0..length-1."""
    return rng.random((n, length), dtype=np.float32).argsort(axis=1)


def _mode_id(mode: str) -> int:
    return zlib.crc32(mode.encode())


# ---------------------------------------------------------------- the generator

class SequenceGenerator:
    """Seeded batches of every sequence kind for one dataset and config."""

    def __init__(self, dataset: Any, cfg: Config) -> None:
        self.cfg = cfg
        self.dataset = dataset
        s = cfg.sequences
        self._class_images = np.asarray(dataset.class_images, dtype=np.int32)
        n_cls, self._n_exemplars = self._class_images.shape
        self.split: ClassSplit = make_split(n_cls, cfg.classes)
        self.num_classes = num_classes(cfg)
        self._variant = np.asarray(dataset.class_variant, dtype=np.int8)
        self._source = np.asarray(dataset.class_source, dtype=np.int32)

        sp = self.split
        self._pools = {
            "rare": _make_pool("rare", sp.rare, sp.rare_weights),
            "common": _make_pool("common", sp.common, sp.common_weights),
            "holdout": _make_pool("holdout", sp.holdout, sp.holdout_weights),
            "zipfian": _make_pool("zipfian", sp.non_holdout, sp.zipf),
        }
        self._is_rare = np.zeros(n_cls, dtype=bool)
        self._is_rare[sp.rare] = True

        # Polysemy (docs/experiment.md §4) reshapes the whole ordered label layout.
        kind_rare, x = parse_labeling(s.labeling_rare)
        self._poly = x if kind_rare == "polysemy" else 1
        # Labels per rare class (ordered_polysemyX): rare label r belongs to rare class r // X.
        self.polysemy = self._poly
        n_rare, n_common = sp.rare.size, sp.common.size
        self._ordered = np.full(n_cls, -1, dtype=np.int32)
        self._ordered[sp.rare] = np.arange(n_rare) * self._poly
        self._ordered[sp.common] = n_rare * self._poly + np.arange(n_common)
        self._ordered[sp.holdout] = n_rare * self._poly + n_common + np.arange(sp.holdout.size)
        self._lower = {}  # seq_len -> (L, L) bool, q < p
        self._check_label_range()
        self._check_all_unique()

    # ------------------------------------------------------------ public API

    def batch(self, kind: str, batch_size: int, rng: np.random.Generator) -> Batch:
        """`batch_size` fresh sequences of `kind` drawn from `rng`."""
        if kind not in KINDS:
            raise EiclError(f"unknown sequence kind {kind!r}; choose one of: {', '.join(KINDS)}")
        if batch_size < 1:
            raise EiclError(f"batch size {batch_size} must be >= 1")
        s = self.cfg.sequences
        rgr = s.randomly_generate_rare
        if kind == "bursty":
            classes, labels, bursty = self._bursty(batch_size, rng)
        elif kind == "mixed":
            classes, labels, bursty = self._mixed(batch_size, rng)
            rgr = False  # the original never randomises rare images in mixed sequences
        elif kind in FEWSHOT_KINDS:
            pool = self._pool(kind.removeprefix("fewshot_"), kind)
            classes, labels = self._fewshot(pool, batch_size, s.fs_shots, "unfixed", rng,
                                            shuffle=True)
            bursty = np.ones(batch_size, dtype=bool)
            rgr = rgr and kind != "fewshot_common"  # as the original
        elif kind in NO_SUPPORT_KINDS:
            pool = self._pool(kind.removeprefix("no_support_"), kind)
            classes = self._no_support(pool, batch_size, s.seq_len, rng)
            labels = self._label(classes, s.labeling_common, rng)
            bursty = np.zeros(batch_size, dtype=bool)
        else:  # random
            classes = self._random(self._pool("zipfian", kind), batch_size, s.seq_len, rng,
                                   all_unique=s.all_unique)
            labels = self._label(classes, s.labeling_common, rng)
            bursty = np.zeros(batch_size, dtype=bool)
        return self._finish(classes, labels, bursty, rgr, rng)

    def train_batch(self, step: int, batch_size: int | None = None) -> Batch:
        """The training batch of `step`: a pure function of (run.seed, step)."""
        rng = np.random.default_rng([self.cfg.run.seed, STREAM_TRAIN, step])
        return self.batch(self.cfg.sequences.train_kind,
                          batch_size or self.cfg.train.batch_size, rng)

    def eval_batches(self, mode: str, n: int, batch_size: int) -> Iterator[Batch]:
        """The fixed evaluation set of `mode`: n sequences, identical every time,
        in batches of batch_size (the last may be smaller)."""
        if mode not in KINDS:
            raise EiclError(f"unknown eval mode {mode!r}; choose one of: {', '.join(EVAL_MODES)}")
        if batch_size < 1:
            raise EiclError(f"eval batch size {batch_size} must be >= 1")
        pending: list[Batch] = []
        have = done = chunk = 0
        while done < n:
            while have < min(batch_size, n - done):
                rng = np.random.default_rng([self.cfg.eval.seed, STREAM_EVAL, _mode_id(mode), chunk])
                pending.append(self.batch(mode, EVAL_CHUNK, rng))
                have += EVAL_CHUNK
                chunk += 1
            joined = pending[0] if len(pending) == 1 else Batch.concatenate(pending)
            take = min(batch_size, n - done)
            yield joined.take(slice(0, take))
            rest = joined.take(slice(take, None))
            pending, have, done = ([rest] if rest.size else []), rest.size, done + take

    def sample_batch(self, mode: str, n: int, seed: int) -> Batch:
        """Sequences for `eicl sample`: their own stream, seeded by (seed, mode)."""
        rng = np.random.default_rng([seed, STREAM_SAMPLE, _mode_id(mode)])
        return self.batch(mode, n, rng)

    def seq_len(self, kind: str) -> int:
        """Sequence length of a kind: few-shot and mixed sequences are fs_shots * ways + 1."""
        s = self.cfg.sequences
        if kind in FEWSHOT_KINDS or kind == "mixed":
            return s.fs_shots * s.ways + 1
        return s.seq_len

    def label_masks(self, mode: str) -> dict[str, np.ndarray]:
        """(num_classes,) bool masks for the metrics of docs/experiment.md §8."""
        s, sp = self.cfg.sequences, self.split
        common = self._mask(self._label_values(sp.common, s.labeling_common))
        rare = self._mask(self._label_values(sp.rare, s.labeling_rare))
        fewshot = self._mask(np.arange(s.ways))
        if mode in FEWSHOT_KINDS:
            closed = fewshot
        elif mode in NO_SUPPORT_KINDS:
            # The labels this mode's queries actually carry (labeling_common,
            # docs/experiment.md §5).
            pools = {"common": [sp.common], "rare": [sp.rare],
                     "zipfian": [sp.common, sp.rare]}[mode.removeprefix("no_support_")]
            closed = self._mask(np.concatenate(
                [self._label_values(p, s.labeling_common) for p in pools]))
        else:
            closed = np.ones(self.num_classes, dtype=bool)
        return {"common": common, "rare": rare, "fewshot": fewshot, "closed": closed}

    # ------------------------------------------------------------ sequence kinds

    def _pool(self, name: str, kind: str) -> _Pool:
        pool = self._pools[name]
        if pool.size == 0:
            n_key = {"zipfian": "n_rare + n_common"}.get(name, f"n_{name}")
            raise EiclError(f"sequence kind {kind!r} draws from the {name} classes, but "
                            f"classes.{n_key} = 0; give it at least 1 class")
        return pool

    def _draw(self, pool: _Pool, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """Pool positions drawn i.i.d. with the pool's weights."""
        if pool.cum is None:
            return rng.integers(0, pool.size, shape)
        idx = np.searchsorted(pool.cum, rng.random(shape), side="right")
        return np.minimum(idx, pool.size - 1, out=idx)

    def _random(self, pool: _Pool, n: int, length: int, rng: np.random.Generator,
                all_unique: bool = False) -> np.ndarray:
        if not all_unique:
            return pool.classes[self._draw(pool, (n, length), rng)]
        if length > pool.size:
            raise _all_unique_error(length, pool.name, pool.size)
        # Weighted sampling without replacement = top-k of log-weights + Gumbel noise.
        keys = rng.gumbel(size=(n, pool.size)) + np.log(pool.weights)[None, :]
        top = np.argpartition(-keys, length - 1, axis=1)[:, :length]
        top = np.take_along_axis(top, _shuffle_positions(rng, n, length), axis=1)
        return pool.classes[top]

    def _no_support(self, pool: _Pool, n: int, length: int,
                    rng: np.random.Generator) -> np.ndarray:
        """Context from the pool without the query's class (weights renormalised); query last."""
        if pool.size < 2:
            raise EiclError(f"no-support sequences need at least 2 {pool.name} classes, "
                            f"the pool has {pool.size}")
        q = self._draw(pool, (n, 1), rng)
        if pool.cum is None:
            ctx = rng.integers(0, pool.size - 1, (n, length - 1))
            ctx += ctx >= q  # skip the query's position: uniform over the others
        else:
            # Draw u on [0, 1 - w_q) and step over the query's interval of the CDF.
            wq = pool.weights[q]
            lo = pool.cum[q] - wq
            u = rng.random((n, length - 1)) * (1.0 - wq)
            u += wq * (u >= lo)
            ctx = np.minimum(np.searchsorted(pool.cum, u, side="right"), pool.size - 1)
            bad = ctx == q
            if bad.any():
                _check_redraw_can_end(pool, q[bad.any(axis=1), 0])
            while bad.any():  # float round-off at an interval edge: redraw those few
                redraw = self._draw(pool, (int(bad.sum()),), rng)
                ctx[bad] = redraw
                bad = ctx == q
        return pool.classes[np.concatenate([ctx, q], axis=1)]

    def _fewshot(self, pool: _Pool, n: int, shots: int, labeling: str,
                 rng: np.random.Generator, shuffle: bool) -> tuple[np.ndarray, np.ndarray]:
        """`ways` classes (with replacement), each `shots` times, then a query among them."""
        ways = self.cfg.sequences.ways
        chosen = self._draw(pool, (n, ways), rng)
        ctx_way = np.tile(np.arange(ways), shots)[None, :].repeat(n, axis=0)
        if shuffle:
            keys = rng.random((n, shots * ways), dtype=np.float32)
            if self.cfg.sequences.grouped:  # each block of `ways` items holds every class once
                keys += np.repeat(np.arange(shots, dtype=np.float32), ways)[None, :]
            ctx_way = np.take_along_axis(ctx_way, keys.argsort(axis=1), axis=1)
        way = np.concatenate([ctx_way, rng.integers(0, ways, (n, 1))], axis=1)
        classes = pool.classes[np.take_along_axis(chosen, way, axis=1)]
        if parse_labeling(labeling)[0] == "unfixed":
            return classes, way.astype(np.int32)
        sense = None
        if self._poly > 1:  # one of its X labels per chosen class, for the whole sequence
            sense = np.take_along_axis(rng.integers(0, self._poly, (n, ways)), way, axis=1)
        return classes, self._label(classes, labeling, rng, sense=sense)

    def _bursty(self, n: int, rng: np.random.Generator):
        s = self.cfg.sequences
        length, shots = s.seq_len, s.bursty_shots
        n_rem = length - shots * s.ways - 1
        if n_rem < 0:
            raise EiclError(f"sequences.seq_len = {length} is too short for bursty sequences of "
                            f"bursty_shots x ways = {shots} x {s.ways}; it must be >= "
                            f"{shots * s.ways + 1}")
        u = rng.random(n)
        v = rng.random(n)
        is_bursty = u < s.p_bursty
        # 0 non-bursty, 1 zipfian burst, 2 common burst, 3 rare burst
        branch = np.where(~is_bursty, 0, np.where(v < s.p_bursty_zipfian, 1,
                          np.where(v < s.p_bursty_zipfian + s.p_bursty_common, 2, 3)))
        classes = np.empty((n, length), dtype=np.int32)
        labels = np.empty((n, length), dtype=np.int32)
        for b in np.unique(branch):
            rows = np.flatnonzero(branch == b)
            m = rows.size
            if b == 0:
                c, lab = self._non_bursty(m, rng)
            else:
                burst, lab_burst, lab_rem = {
                    1: ("zipfian", s.labeling_rare, s.labeling_rare),
                    2: ("common", s.labeling_common, s.labeling_rare),
                    3: ("rare", s.labeling_rare, s.labeling_common),
                }[int(b)]
                rem = REMAINDER_POOL[burst]
                # The final shuffle below is uniform, so the few-shot part needs none.
                fc, fl = self._fewshot(self._pool(burst, "bursty"), m, shots, lab_burst, rng,
                                       shuffle=False)
                if n_rem:
                    rc = self._random(self._pool(rem, "bursty"), m, n_rem, rng,
                                      all_unique=s.all_unique)
                    rl = self._label(rc, lab_rem, rng)
                    fc, fl = np.concatenate([rc, fc], axis=1), np.concatenate([rl, fl], axis=1)
                order = np.concatenate(
                    [_shuffle_positions(rng, m, length - 1), np.full((m, 1), length - 1)], axis=1)
                c = np.take_along_axis(fc, order, axis=1)
                lab = np.take_along_axis(fl, order, axis=1)
            if m == n:
                classes, labels = c, lab
            else:
                classes[rows], labels[rows] = c, lab
        return classes, labels, is_bursty

    def _non_bursty(self, m: int, rng: np.random.Generator):
        s = self.cfg.sequences
        if s.non_bursty_type == "zipfian":
            c = self._random(self._pool("zipfian", "bursty"), m, s.seq_len, rng,
                             all_unique=s.all_unique)
        elif s.non_bursty_type == "common_uniform":
            c = self._random(self._pool("common", "bursty"), m, s.seq_len, rng,
                             all_unique=s.all_unique)
        else:  # common_no_support
            c = self._no_support(self._pool("common", "bursty"), m, s.seq_len, rng)
        return c, self._label(c, s.labeling_common, rng)

    def _mixed(self, n: int, rng: np.random.Generator):
        s = self.cfg.sequences
        length = s.fs_shots * s.ways + 1
        fewshot = rng.random(n) < s.p_fewshot
        classes = np.empty((n, length), dtype=np.int32)
        labels = np.empty((n, length), dtype=np.int32)
        k = int(fewshot.sum())
        if k:
            classes[fewshot], labels[fewshot] = self._fewshot(
                self._pool("rare", "mixed"), k, s.fs_shots, "unfixed", rng, shuffle=True)
        if k < n:
            c = self._random(self._pool("common", "mixed"), n - k, length, rng,
                             all_unique=s.all_unique)
            classes[~fewshot], labels[~fewshot] = c, self._label(c, "ordered", rng)
        return classes, labels, fewshot

    # ------------------------------------------------------------ labels

    def _label(self, classes: np.ndarray, labeling: str, rng: np.random.Generator,
               sense: np.ndarray | None = None) -> np.ndarray:
        """Fixed labels of drawn classes (unfixed is handled by the few-shot part)."""
        kind, k = parse_labeling(labeling)
        if kind == "original":
            return classes.astype(np.int32, copy=True)
        lab = self._ordered[classes]
        if kind == "ordered" and k:
            lab += k
        if self._poly > 1:
            if sense is None:
                sense = rng.integers(0, self._poly, classes.shape)
            lab += (sense * self._is_rare[classes]).astype(np.int32)
        return lab

    def _label_values(self, classes: np.ndarray, labeling: str) -> np.ndarray:
        """Every label these classes can carry under a fixed labeling."""
        kind, k = parse_labeling(labeling)
        if kind == "original":
            return classes
        lab = self._ordered[classes] + (k if kind == "ordered" else 0)
        if self._poly > 1:
            spread = np.where(self._is_rare[classes], self._poly, 1)
            lab = np.concatenate([lab[spread > j] + j for j in range(self._poly)])
        return lab

    def _mask(self, labels: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.num_classes, dtype=bool)
        mask[labels] = True
        return mask

    def _check_all_unique(self) -> None:
        """Refuse at once a random part that all_unique cannot fill: one of
        training's bursty sequences, or of the `random` / `mixed` kinds where
        the config evaluates them (else the run would stop at that batch)."""
        s = self.cfg.sequences
        if not s.all_unique:
            return
        needs = []  # (pool, classes in one random part)
        n_rem = s.seq_len - s.bursty_shots * s.ways - 1
        p_rare = 1.0 - s.p_bursty_common - s.p_bursty_zipfian
        if s.p_bursty > 0 and n_rem > 0:
            needs += [(REMAINDER_POOL[burst], n_rem)
                      for p, burst in ((s.p_bursty_zipfian, "zipfian"),
                                       (s.p_bursty_common, "common"), (p_rare, "rare"))
                      if p > 1e-12]
        if s.p_bursty < 1 and s.non_bursty_type != "common_no_support":
            needs.append(("zipfian" if s.non_bursty_type == "zipfian" else "common", s.seq_len))
        if "random" in self.cfg.eval.modes:
            needs.append(("zipfian", s.seq_len))
        if "mixed" in self.cfg.eval.modes and s.p_fewshot < 1:
            needs.append(("common", s.fs_shots * s.ways + 1))
        for name, length in needs:
            pool = self._pools[name]
            if 0 < pool.size < length:  # an empty pool has its own error, where it is drawn
                raise _all_unique_error(length, name, pool.size)

    def _check_label_range(self) -> None:
        s, sp = self.cfg.sequences, self.split
        used = [self._label_values(sp.non_holdout, s.labeling_common),
                self._label_values(sp.non_holdout, s.labeling_rare), np.arange(s.ways)]
        top = max(int(u.max()) for u in used if u.size)
        if top >= self.num_classes:
            raise EiclError(
                f"labels reach {top} but the model has num_classes = {self.num_classes} outputs "
                f"(labeling_common = {s.labeling_common!r}, labeling_rare = {s.labeling_rare!r}, "
                f"{self._class_images.shape[0]} dataset classes); change the labeling or classes")

    # ------------------------------------------------------------ drawings

    def _finish(self, classes: np.ndarray, labels: np.ndarray, is_bursty: np.ndarray,
                randomly_generate_rare: bool, rng: np.random.Generator) -> Batch:
        """Distinct drawings per class within each sequence, and the per-position extras."""
        n, length = classes.shape
        lower = self._lower.get(length)
        if lower is None:
            lower = self._lower[length] = np.tri(length, k=-1, dtype=bool)
        same = classes[:, :, None] == classes[:, None, :]
        first = same.argmax(axis=2)  # first position of this class in the sequence
        rank = (same & lower).sum(axis=2)  # how many earlier occurrences
        e = self._n_exemplars
        if e == 1:
            slot = np.zeros_like(classes)
        else:
            # One random permutation of the drawings per (sequence, class), read by
            # occurrence rank: distinct drawings, cycling when a class outnumbers them.
            perm = rng.random((n, length, e), dtype=np.float32).argsort(axis=2)
            slot = perm[np.arange(n)[:, None], first, rank % e]
        is_rare = self._is_rare[classes]
        rare_slot = np.full((n, length), -1, dtype=np.int16)
        if randomly_generate_rare:
            rare_slot = np.where(is_rare, first, -1).astype(np.int16)
        return Batch(
            image_index=self._class_images[classes, slot],
            variant=self._variant[classes],
            class_index=classes.astype(np.int32, copy=False),
            source_id=self._source[classes],
            label=labels.astype(np.int32, copy=False),
            is_rare=is_rare,
            rare_slot=rare_slot,
            is_bursty=is_bursty,
        )


# The Batch fields the training step needs on the device; the rest stay on the host.
DEVICE_FIELDS = ("image_index", "variant", "label", "rare_slot")


def host_fields(batch: Batch) -> dict[str, np.ndarray]:
    """The Batch's index arrays the step needs, as int32 host arrays."""
    return {name: np.asarray(getattr(batch, name), np.int32) for name in DEVICE_FIELDS}


def train_fields(generator: SequenceGenerator, step: int, n: int = 1) -> dict[str, np.ndarray]:
    """The generator's training batches of steps step .. step + n - 1 as host
    arrays: one step's as they are, n > 1 steps' on a new leading axis (for
    FlatStep.steps, which loops over it)."""
    if n == 1:
        return host_fields(generator.train_batch(step))
    fields = [host_fields(generator.train_batch(s)) for s in range(step, step + n)]
    return {name: np.stack([f[name] for f in fields]) for name in fields[0]}


def batch_records(batch: Batch, dataset: Any) -> list[dict]:
    """One JSON-ready dict per sequence (for `eicl sample --json`)."""
    drawers = np.asarray(dataset.image_drawer)[batch.image_index]
    alph_idx = np.asarray(dataset.image_alphabet)[batch.image_index]
    names = list(dataset.alphabet_names)
    out = []
    for i in range(batch.size):
        out.append({
            "sequence": i,
            "bursty": bool(batch.is_bursty[i]),
            "classes": batch.class_index[i].tolist(),
            "omniglot_ids": batch.source_id[i].tolist(),
            "variants": batch.variant[i].tolist(),
            "labels": batch.label[i].tolist(),
            "image_index": batch.image_index[i].tolist(),
            "drawers": drawers[i].tolist(),
            "alphabets": [names[a] if 0 <= a < len(names) else "" for a in alph_idx[i].tolist()],
            "is_rare": batch.is_rare[i].tolist(),
        })
    return out
