"""Properties of the class split and the sequence generator (docs/experiment.md §3-5),
checked exactly where they are deterministic and by statistics where random."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from eicl_cli import config as config_mod
from eicl_cli.class_weights import zipf_weights
from eicl_cli.data.dataset import Dataset
from eicl_cli.data.sequences import KINDS, Batch, SequenceGenerator
from eicl_cli.data.split import make_split, permute_classes
from eicl_cli.errors import EiclError
from train_support import deadline

PAPER_COMMON = [580, 243, 1316, 493, 171, 1006, 524, 864, 387, 170]
PAPER_HOLDOUT = [198, 184, 1152, 480, 336, 583, 614, 575, 168, 585]


def fake_dataset(n_classes: int, n_exemplars: int = 20, augment: bool = False) -> Dataset:
    """A Dataset with every (class, drawing) its own image row; pixels are irrelevant here."""
    n_src = n_classes // 8 if augment else n_classes
    rows = np.arange(n_src * n_exemplars, dtype=np.int32).reshape(n_src, n_exemplars)
    variant = np.zeros(n_classes, np.int8)
    source = np.arange(n_classes, dtype=np.int32)
    if augment:
        rows = np.repeat(rows, 8, axis=0)
        variant = np.tile(np.arange(8, dtype=np.int8), n_src)
        source = np.repeat(np.arange(n_src, dtype=np.int32), 8)
    n_img = n_src * n_exemplars
    return Dataset(kind="synthetic", images=np.ones((n_img, 4, 4), np.uint8), class_images=rows,
                   class_variant=variant, class_source=source,
                   image_drawer=np.tile(np.arange(1, n_exemplars + 1), n_src).astype(np.int8),
                   image_alphabet=np.zeros(n_img, np.int16), alphabet_names=["A"],
                   synthetic=True, cache_file="", cache_sha256="")


def make_cfg(**sections: dict) -> config_mod.Config:
    return config_mod.from_dict(sections)


def gen(n_classes: int = 60, n_exemplars: int = 20, **sections: dict) -> SequenceGenerator:
    classes = {"n_rare": 40, "n_common": 10, "n_holdout": 10} | sections.pop("classes", {})
    return SequenceGenerator(fake_dataset(n_classes, n_exemplars), make_cfg(classes=classes, **sections))


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- the split

def test_paper_split_matches_the_original() -> None:
    split = make_split(1623, config_mod.ClassesConfig())
    assert split.common.tolist() == PAPER_COMMON
    assert split.holdout.tolist() == PAPER_HOLDOUT
    assert split.rare.size == 1603
    assert np.array_equal(split.non_holdout, np.concatenate([split.rare, split.common]))
    # A permutation: rare, common and holdout never overlap.
    assert len(set(split.non_holdout) | set(split.holdout)) == 1623


def test_holdout_is_taken_from_the_end_and_does_not_move() -> None:
    a = make_split(1623, config_mod.ClassesConfig(n_rare=1603))
    b = make_split(1623, config_mod.ClassesConfig(n_rare=500, n_common=20))
    assert np.array_equal(a.holdout, b.holdout)
    assert np.array_equal(a.order[:500], b.rare)


def test_grouped_permutation_keeps_blocks_whole() -> None:
    order = permute_classes(96, 1337, group=8)
    blocks = np.random.default_rng(1337).choice(12, size=12, replace=False)
    assert np.array_equal(order, (blocks[:, None] * 8 + np.arange(8)).reshape(-1))
    split = make_split(96, config_mod.ClassesConfig(n_rare=70, n_common=10, n_holdout=16,
                                                    preserve_ordering_every_n=8))
    # The augmented variants of one character never straddle train and holdout.
    assert set(split.holdout // 8).isdisjoint(set(split.non_holdout // 8))
    with pytest.raises(EiclError, match="must divide the 90"):
        permute_classes(90, 0, group=8)


def test_zipf_weights() -> None:
    w = zipf_weights(5, 1.0)
    expect = 1 / np.array([5, 4, 3, 2, 1.0])
    assert np.allclose(w, expect / expect.sum())
    assert np.allclose(zipf_weights(7, 0.0), 1 / 7)
    split = make_split(100, config_mod.ClassesConfig(n_rare=60, n_common=20, n_holdout=20,
                                                     zipf_exponent=2.0,
                                                     use_zipf_for_common_rare=True))
    assert np.allclose(split.rare_weights, split.zipf[:60] / split.zipf[:60].sum())
    assert np.allclose(split.common_weights, split.zipf[60:] / split.zipf[60:].sum())


def test_too_many_classes_names_both_numbers() -> None:
    with pytest.raises(EiclError, match=r"1623.*exceeds the 100 classes"):
        SequenceGenerator(fake_dataset(100), config_mod.Config())


# ---------------------------------------------------------------- bursty

def test_fraction_bursty_matches_p_bursty() -> None:
    g = gen(sequences={"p_bursty": 0.7})
    b = g.batch("bursty", 20000, rng())
    k = int(b.is_bursty.sum())
    assert stats.binomtest(k, 20000, 0.7).pvalue > 1e-3


@pytest.mark.parametrize("burst,p_common", [("rare", 0.0), ("common", 1.0)])
def test_bursty_sequence_structure(burst: str, p_common: float) -> None:
    shots, ways, length = 3, 2, 11  # remainder of 4
    g = gen(sequences={"p_bursty": 1.0, "p_bursty_zipfian": 0.0, "p_bursty_common": p_common,
                       "seq_len": length, "bursty_shots": shots, "ways": ways})
    b = g.batch("bursty", 3000, rng(1))
    assert b.is_bursty.all() and b.label.shape == (3000, length)
    burst_pool = set((g.split.rare if burst == "rare" else g.split.common).tolist())
    in_burst = np.isin(b.class_index, list(burst_pool))
    # shots x ways items of the burst pool in the context, the rest is remainder.
    assert (in_burst[:, :-1].sum(axis=1) == shots * ways).all()
    assert in_burst[:, -1].all()  # the query is one of the burst's classes
    for row in b.class_index[:300]:
        ctx = row[:-1]
        burst_classes, counts = np.unique(ctx[np.isin(ctx, list(burst_pool))], return_counts=True)
        # each of the ways classes `shots` times (2 x shots when a class was drawn twice)
        assert (counts % shots == 0).all() and counts.sum() == shots * ways
        assert row[-1] in burst_classes
    # positions of the burst are shuffled over the whole context
    assert in_burst[:, 0].mean() == pytest.approx(shots * ways / (length - 1), abs=0.05)


def test_bursty_labels_use_rare_and_common_labelings() -> None:
    g = gen(sequences={"p_bursty": 1.0, "p_bursty_zipfian": 0.0, "seq_len": 11,
                       "labeling_common": "original", "labeling_rare": "ordered"})
    b = g.batch("bursty", 500, rng(2))
    rare_pos = b.is_rare
    rare_index = {c: i for i, c in enumerate(g.split.rare.tolist())}
    assert all(lab == rare_index[c] for c, lab in zip(b.class_index[rare_pos], b.label[rare_pos]))
    assert np.array_equal(b.label[~rare_pos], b.class_index[~rare_pos])  # original = class id


@pytest.mark.parametrize("kind", ["zipfian", "common_uniform", "common_no_support"])
def test_non_bursty_types(kind: str) -> None:
    g = gen(sequences={"p_bursty": 0.0, "non_bursty_type": kind})
    b = g.batch("bursty", 2000, rng(3))
    assert not b.is_bursty.any()
    if kind == "zipfian":
        assert b.is_rare.mean() > 0.5  # 40 of 50 classes are rare, uniform weights
    else:
        assert np.isin(b.class_index, g.split.common).all()
    if kind == "common_no_support":
        assert not (b.class_index[:, :-1] == b.class_index[:, -1:]).any()


# ---------------------------------------------------------------- no-support / few-shot

@pytest.mark.parametrize("exponent", [0.0, 1.0])
@pytest.mark.parametrize("pool", ["common", "rare", "zipfian"])
def test_no_support_never_shows_the_query_class(pool: str, exponent: float) -> None:
    g = gen(classes={"zipf_exponent": exponent, "use_zipf_for_common_rare": True})
    b = g.batch(f"no_support_{pool}", 4000, rng(4))
    assert b.seq_len == g.cfg.sequences.seq_len
    assert not (b.class_index[:, :-1] == b.class_index[:, -1:]).any()
    members = {"common": g.split.common, "rare": g.split.rare, "zipfian": g.split.non_holdout}[pool]
    assert np.isin(b.class_index, members).all()


@pytest.mark.parametrize("zipf_for_common_rare", [False, True])
def test_no_support_ends_at_the_steepest_exponent_validation_allows(
        zipf_for_common_rare: bool) -> None:
    # Steeper weights than this are refused by config validation: the
    # context's redraw loop would not end (zipf_exponent = 1100 hung
    # `eicl sample` and the evaluation after training).
    from eicl_cli.class_weights import steepest_exponent
    top = steepest_exponent(40, 10, zipf_for_common_rare)
    g = gen(classes={"zipf_exponent": top, "use_zipf_for_common_rare": zipf_for_common_rare},
            sequences={"p_bursty": 0.0, "non_bursty_type": "common_no_support"})
    with deadline(10):
        for pool in ("common", "rare", "zipfian"):
            b = g.batch(f"no_support_{pool}", 2000, rng(4))
            assert not (b.class_index[:, :-1] == b.class_index[:, -1:]).any()
        g.batch("bursty", 2000, rng(5))
    with pytest.raises(config_mod.ConfigError, match="is too steep"):
        gen(classes={"zipf_exponent": top + 0.02,
                     "use_zipf_for_common_rare": zipf_for_common_rare})


@pytest.mark.parametrize("exponent", [60.0, 1100.0, float("inf")])
def test_no_support_from_a_pool_no_draw_can_fill_is_an_error_not_a_hang(exponent: float) -> None:
    # A config that skipped validation: the generator itself refuses.
    cfg = make_cfg(classes={"n_rare": 40, "n_common": 10, "n_holdout": 10})
    cfg = cfg.replace(classes=dataclasses.replace(cfg.classes, zipf_exponent=exponent))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        g = SequenceGenerator(fake_dataset(60), cfg)
    with deadline(10), pytest.raises(EiclError, match="cannot draw a context class other than "
                                                      "the query from the zipfian pool"):
        g.batch("no_support_zipfian", 100, rng(0))


def test_no_support_context_follows_renormalised_weights() -> None:
    # Zipf 2 over 5 common classes: the context given the query is the pool minus the query.
    g = gen(classes={"n_rare": 5, "n_common": 5, "n_holdout": 5, "zipf_exponent": 2.0,
                     "use_zipf_for_common_rare": True}, n_classes=15)
    b = g.batch("no_support_common", 20000, rng(5))
    common = g.split.common
    w = g.split.common_weights
    q0 = b.class_index[:, -1] == common[-1]  # the most frequent class as query
    ctx = b.class_index[q0, :-1].ravel()
    counts = np.array([(ctx == c).sum() for c in common[:-1]])
    expect = w[:-1] / w[:-1].sum() * counts.sum()
    assert stats.chisquare(counts, expect).pvalue > 1e-3


def test_fewshot_holdout() -> None:
    shots, ways = 4, 3
    g = gen(sequences={"fs_shots": shots, "ways": ways, "seq_len": 10})
    b = g.batch("fewshot_holdout", 3000, rng(6))
    assert b.seq_len == shots * ways + 1
    assert np.isin(b.class_index, g.split.holdout).all()
    assert set(np.unique(b.label)) == set(range(ways))
    n_query = (b.class_index[:, :-1] == b.class_index[:, -1:]).sum(axis=1)
    # exactly fs_shots times, or a multiple when the class was drawn more than once
    assert set(np.unique(n_query)) <= {shots, 2 * shots, 3 * shots}
    assert (n_query == shots).mean() > 0.5
    # each label appears shots times in the context, and the query's label is in it
    for lab in range(ways):
        assert ((b.label[:, :-1] == lab).sum(axis=1) == shots).all()
    same = b.label[:, :-1] == b.label[:, -1:]
    assert (b.class_index[:, :-1][same] == np.repeat(b.class_index[:, -1], shots)).all()


def test_grouped_fewshot_blocks_hold_every_class_once() -> None:
    g = gen(sequences={"grouped": True, "fs_shots": 3, "ways": 4, "seq_len": 13})
    b = g.batch("fewshot_rare", 500, rng(7))
    blocks = b.label[:, :-1].reshape(500, 3, 4)
    assert (np.sort(blocks, axis=2) == np.arange(4)).all()
    ungrouped = gen(sequences={"fs_shots": 3, "ways": 4, "seq_len": 13}).batch("fewshot_rare", 500, rng(7))
    assert not (np.sort(ungrouped.label[:, :-1].reshape(500, 3, 4), axis=2) == np.arange(4)).all()


def test_mixed() -> None:
    g = gen(sequences={"p_fewshot": 0.3})
    b = g.batch("mixed", 10000, rng(8))
    assert b.seq_len == g.cfg.sequences.fs_shots * g.cfg.sequences.ways + 1
    assert stats.binomtest(int(b.is_bursty.sum()), 10000, 0.3).pvalue > 1e-3
    fs = b.take(b.is_bursty)
    sup = b.take(~b.is_bursty)
    assert fs.is_rare.all() and (fs.label < g.cfg.sequences.ways).all()
    assert np.isin(sup.class_index, g.split.common).all()
    assert ((sup.label >= 40) & (sup.label < 50)).all()  # ordered common labels


# ---------------------------------------------------------------- Zipf frequencies

@pytest.mark.parametrize("exponent", [0.0, 1.0, 2.0])
def test_class_frequencies_follow_zipf(exponent: float) -> None:
    g = gen(n_classes=25, classes={"n_rare": 15, "n_common": 5, "n_holdout": 5,
                                   "zipf_exponent": exponent})
    b = g.batch("random", 6000, rng(9))
    pos = {c: i for i, c in enumerate(g.split.non_holdout.tolist())}
    counts = np.bincount([pos[c] for c in b.class_index.ravel().tolist()], minlength=20)
    assert stats.chisquare(counts, g.split.zipf * counts.sum()).pvalue > 1e-3


def test_zipf_slices_for_common_and_rare() -> None:
    g = gen(n_classes=25, classes={"n_rare": 15, "n_common": 5, "n_holdout": 5,
                                   "zipf_exponent": 1.0, "use_zipf_for_common_rare": True})
    b = g.batch("fewshot_common", 5000, rng(10))
    first_pos = b.class_index[:, :-1]
    # per sequence, the classes drawn (with replacement) for the ways
    counts = np.array([(first_pos == c).sum() for c in g.split.common])
    expect = g.split.common_weights * counts.sum()
    assert stats.chisquare(counts, expect).pvalue > 1e-3
    uniform = gen(n_classes=25, classes={"n_rare": 15, "n_common": 5, "n_holdout": 5,
                                         "zipf_exponent": 1.0})
    assert np.allclose(uniform.split.common_weights, 0.2)


# ---------------------------------------------------------------- labels

def _ordered_label(g: SequenceGenerator) -> dict[int, int]:
    lst = np.concatenate([g.split.rare, g.split.common, g.split.holdout]).tolist()
    return {c: i for i, c in enumerate(lst)}


@pytest.mark.parametrize("kind", ["bursty", "no_support_zipfian", "random"])
def test_ordered_and_ordered_k_labels(kind: str) -> None:
    for lab, k in [("ordered", 0), ("ordered7", 7)]:
        g = gen(sequences={"labeling_common": lab, "labeling_rare": lab})
        b = g.batch(kind, 500, rng(11))
        want = _ordered_label(g)
        assert all(l == want[c] + k for c, l in zip(b.class_index.ravel().tolist(),
                                                     b.label.ravel().tolist()))
        assert b.label.max() < g.num_classes


def test_original_labels_are_class_ids() -> None:
    g = gen(sequences={"labeling_common": "original", "labeling_rare": "original"})
    b = g.batch("bursty", 500, rng(12))
    assert np.array_equal(b.label, b.class_index)


def test_unfixed_labels_follow_draw_order_per_sequence() -> None:
    g = gen(sequences={"labeling_rare": "unfixed", "p_bursty": 1.0, "ways": 3, "seq_len": 10})
    b = g.batch("bursty", 500, rng(13))
    assert b.label.max() < 3
    # the same class keeps one label within a sequence (unless drawn for two ways)
    for row_c, row_l in zip(b.class_index, b.label):
        by_class = {}
        for c, l in zip(row_c.tolist(), row_l.tolist()):
            by_class.setdefault(c, set()).add(l)
        assert sum(len(v) for v in by_class.values()) == 3


def _repeats(classes: np.ndarray) -> np.ndarray:
    """(B,) bool: the row holds some class twice."""
    ordered = np.sort(classes, axis=1)
    return (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)


@pytest.mark.parametrize("case", ["random", "non_bursty_zipfian", "common_uniform",
                                  "bursty_remainder", "mixed"])
def test_all_unique_draws_distinct_classes_in_every_random_part(case) -> None:
    # docs/experiment.md §5: random(pool, L) draws L distinct classes under all_unique, and
    # non-bursty sequences, a burst's remainder and mixed's common part are
    # random(...) parts. 10 common classes, 50 in the Zipfian pool.
    kind, seqs = {
        "random": ("random", {"seq_len": 11}),
        "non_bursty_zipfian": ("bursty", {"p_bursty": 0.0, "seq_len": 11}),
        "common_uniform": ("bursty", {"p_bursty": 0.0, "non_bursty_type": "common_uniform",
                                      "seq_len": 10}),
        # Rare bursts of 3 x 2: a remainder of 8 common classes.
        "bursty_remainder": ("bursty", {"p_bursty": 1.0, "p_bursty_common": 0.0,
                                        "p_bursty_zipfian": 0.0, "seq_len": 15}),
        "mixed": ("mixed", {"p_fewshot": 0.0, "fs_shots": 4}),
    }[case]

    def part(unique: bool) -> np.ndarray:
        b = gen(sequences=seqs | {"all_unique": unique}).batch(kind, 2000, rng(21))
        if case == "bursty_remainder":
            assert (~b.is_rare).sum(axis=1).min() == 8
            return np.where(b.is_rare, -np.arange(15), b.class_index)  # rare: all distinct
        return b.class_index

    assert _repeats(part(True)).sum() == 0
    assert _repeats(part(False)).mean() > 0.5  # i.i.d. draws do repeat


def test_all_unique_refuses_a_random_part_longer_than_its_pool_when_made() -> None:
    unique = {"all_unique": True, "seq_len": 11}
    with pytest.raises(EiclError, match="all_unique needs 11 distinct classes .* common pool "
                                        "has only 10"):
        gen(sequences=unique | {"p_bursty": 0.0, "non_bursty_type": "common_uniform"})
    # A common burst's remainder (11 - 3 x 2 - 1 = 4) comes from 40 rare classes.
    gen(sequences=unique | {"p_bursty": 1.0, "p_bursty_common": 1.0, "p_bursty_zipfian": 0.0})
    # mixed, where evaluated: 4 x 2 + 1 common classes.
    with pytest.raises(EiclError, match="needs 9 distinct classes .* common pool has only 5"):
        gen(classes={"n_common": 5}, sequences={"all_unique": True}, eval={"modes": ["mixed"]})


def test_polysemy_labels() -> None:
    x = 3
    g = gen(sequences={"labeling_rare": f"ordered_polysemy{x}", "p_bursty": 0.8,
                       "p_bursty_zipfian": 0.5, "seq_len": 11})
    assert g.num_classes == x * 40 + 10
    b = g.batch("bursty", 3000, rng(14))
    rare_index = {c: i for i, c in enumerate(g.split.rare.tolist())}
    common_index = {c: i for i, c in enumerate(g.split.common.tolist())}
    c, lab, rare = b.class_index.ravel(), b.label.ravel(), b.is_rare.ravel()
    assert all(l // x == rare_index[k] for k, l in zip(c[rare].tolist(), lab[rare].tolist()))
    assert all(l == 40 * x + common_index[k] for k, l in zip(c[~rare].tolist(), lab[~rare].tolist()))
    assert set(np.unique(lab[rare] % x)) == set(range(x))  # every sense is used
    assert b.label.max() < g.num_classes
    # inside a rare burst a class keeps one sense for the whole sequence, the query included
    bursty_rows = b.take(b.is_bursty)
    q = bursty_rows.class_index[:, -1:]
    same = bursty_rows.class_index == q
    assert (bursty_rows.label[same] == np.repeat(bursty_rows.label[:, -1], same.sum(1))).mean() > 0.9


def test_labels_beyond_num_classes_are_refused() -> None:
    with pytest.raises(EiclError, match="num_classes"):
        gen(sequences={"labeling_rare": "ordered_polysemy2", "labeling_common": "ordered5"})


def test_label_masks() -> None:
    g = SequenceGenerator(fake_dataset(1623), config_mod.Config())
    m = g.label_masks("no_support_zipfian")
    assert all(v.shape == (1623,) and v.dtype == bool for v in m.values())
    assert np.flatnonzero(m["common"]).tolist() == list(range(1603, 1613))
    assert np.flatnonzero(m["rare"]).tolist() == list(range(1603))
    assert np.flatnonzero(m["fewshot"]).tolist() == [0, 1]
    assert np.flatnonzero(m["closed"]).tolist() == list(range(1613))
    assert np.array_equal(g.label_masks("no_support_common")["closed"], m["common"])
    assert np.array_equal(g.label_masks("no_support_rare")["closed"], m["rare"])
    assert np.array_equal(g.label_masks("fewshot_holdout")["closed"], m["fewshot"])
    assert g.label_masks("bursty")["closed"].all()
    p = gen(sequences={"labeling_rare": "ordered_polysemy2"}).label_masks("no_support_rare")
    assert np.flatnonzero(p["rare"]).tolist() == list(range(80))
    assert np.flatnonzero(p["common"]).tolist() == list(range(80, 90))


# ---------------------------------------------------------------- drawings

@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_distinct_drawings_and_a_query_last(kind: str) -> None:
    g = gen(sequences={"p_bursty": 0.5})
    b = g.batch(kind, 400, rng(15))
    assert b.image_index.dtype == np.int32 and b.variant.dtype == np.int8
    assert b.rare_slot.dtype == np.int16 and b.is_bursty.shape == (400,)
    srt = np.sort(b.image_index, axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all()  # no drawing twice in a sequence
    cls = g._class_images  # the drawing really belongs to its class
    assert (cls[b.class_index] == b.image_index[:, :, None]).any(axis=2).all()
    if kind.startswith("fewshot") or (kind in ("bursty", "mixed")):
        in_ctx = (b.class_index[:, :-1] == b.class_index[:, -1:]).any(axis=1)
        assert in_ctx[b.is_bursty].all()  # the query (last) is answered by the context


def test_drawings_are_uniform_and_cycle_when_too_few() -> None:
    g = gen(n_exemplars=20)
    b = g.batch("fewshot_rare", 4000, rng(16))
    slot = b.image_index % 20
    assert stats.chisquare(np.bincount(slot.ravel(), minlength=20)).pvalue > 1e-3
    few = gen(n_exemplars=2, sequences={"fs_shots": 4})  # 5 occurrences of the query class, 2 drawings
    b = few.batch("fewshot_rare", 200, rng(17))
    for row_c, row_i in zip(b.class_index, b.image_index):
        for c in np.unique(row_c):
            imgs = row_i[row_c == c]
            _, counts = np.unique(imgs, return_counts=True)
            assert counts.max() - counts.min() <= 1 and len(counts) == min(2, len(imgs))
    single = gen(n_exemplars=1).batch("fewshot_holdout", 50, rng(18))
    assert np.array_equal(single.image_index, single.class_index)  # same image repeats


def test_augmented_classes_share_images_with_their_variant() -> None:
    ds = fake_dataset(160, augment=True)
    cfg = make_cfg(data={"augment_images": True}, classes={"n_rare": 120, "n_common": 16, "n_holdout": 24,
                            "preserve_ordering_every_n": 8})
    b = SequenceGenerator(ds, cfg).batch("bursty", 300, rng(19))
    assert np.array_equal(b.variant, b.class_index % 8)
    assert np.array_equal(b.source_id, b.class_index // 8)
    assert np.array_equal(b.image_index // 20, b.class_index // 8)


def test_rare_slot_marks_first_occurrence_of_rare_classes() -> None:
    g = gen(sequences={"randomly_generate_rare": True, "p_bursty": 1.0, "p_bursty_zipfian": 0.0,
                       "seq_len": 11})
    b = g.batch("bursty", 300, rng(20))
    assert (b.rare_slot[~b.is_rare] == -1).all()
    for row_c, row_s, rare in zip(b.class_index, b.rare_slot, b.is_rare):
        for p in np.flatnonzero(rare):
            assert row_s[p] == np.flatnonzero(row_c == row_c[p])[0]
    assert (g.batch("fewshot_common", 50, rng(0)).rare_slot == -1).all()
    assert (gen().batch("bursty", 50, rng(0)).rare_slot == -1).all()


# ---------------------------------------------------------------- streams

def test_training_batches_are_a_pure_function_of_seed_and_step() -> None:
    a, b = gen(), gen()
    x, y = a.train_batch(5), b.train_batch(5)
    assert all(np.array_equal(getattr(x, f), getattr(y, f)) for f in ("image_index", "label"))
    assert not np.array_equal(a.train_batch(6).image_index, x.image_index)
    other_seed = gen(run={"seed": 1}).train_batch(5)
    assert not np.array_equal(other_seed.image_index, x.image_index)
    assert a.train_batch(0, batch_size=7).size == 7


def test_eval_sets_are_fixed_and_independent_of_batch_size() -> None:
    g = gen()
    one = Batch.concatenate(list(g.eval_batches("fewshot_holdout", 2500, 1000)))
    again = Batch.concatenate(list(g.eval_batches("fewshot_holdout", 2500, 300)))
    sizes = [b.size for b in g.eval_batches("fewshot_holdout", 2500, 1000)]
    assert sizes == [1000, 1000, 500]
    assert np.array_equal(one.image_index, again.image_index)
    assert np.array_equal(one.label, again.label)
    prefix = Batch.concatenate(list(g.eval_batches("fewshot_holdout", 700, 700)))
    assert np.array_equal(prefix.image_index, one.image_index[:700])
    # different modes and the training stream do not share draws
    rare = Batch.concatenate(list(g.eval_batches("fewshot_rare", 700, 700)))
    assert not np.array_equal(rare.label, prefix.label)
    seeded = gen(eval={"seed": 3})
    assert not np.array_equal(
        next(seeded.eval_batches("fewshot_holdout", 50, 50)).image_index, prefix.image_index[:50])


def test_unknown_kind_is_a_user_error() -> None:
    with pytest.raises(EiclError, match="unknown sequence kind"):
        gen().batch("burst", 4, rng())
    with pytest.raises(EiclError, match="n_common = 0"):
        gen(classes={"n_common": 0}, sequences={"non_bursty_type": "common_uniform",
                                                "p_bursty": 0.0}).batch("bursty", 4, rng())
