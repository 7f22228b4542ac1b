"""What each evaluation mode means for the paper's question (docs/experiment.md
§8): which mode measures in-context learning, which in-weights learning, and
the best accuracy a perfect learner can reach on it.

Pure rules on config values, without JAX, so that reports, sweep tables and
the evaluator read one definition.
"""

from __future__ import annotations

from .config import Config, parse_labeling

# In-context learning: classes never trained on, labelled afresh in each context.
ICL_MODE = "fewshot_holdout"
# In-weights learning: a trained class with no exemplar in the context; the
# first of these that a run evaluates is its headline IWL number.
IWL_MODES = ("no_support_zipfian", "no_support_common", "no_support_rare")


def role(mode: str) -> str:
    """'IWL' / 'ICL' for the paper's headline modes, '' for the others."""
    if mode in IWL_MODES:
        return "IWL"
    if mode == ICL_MODE:
        return "ICL"
    return ""


def iwl_mode(modes: list[str] | tuple[str, ...]) -> str | None:
    """The mode that stands for IWL among the modes a run evaluates."""
    return next((m for m in IWL_MODES if m in modes), None)


def fewshot_ceiling(n_pool: int, ways: int) -> float:
    """Best achievable few-shot accuracy when the `ways` classes are drawn
    uniformly WITH replacement from n_pool classes and labelled 0..ways-1 by
    draw order: if the query's class also fills K other slots, its label is one
    of K+1 equally plausible ones, so a perfect learner scores E[1/(K+1)] with
    K ~ Binomial(ways-1, 1/n). That mean is (1 - (1-p)^ways) / (ways * p);
    for n = 10 holdout classes and 2 ways it is 0.95."""
    if n_pool <= 0:
        return float("nan")
    p = 1.0 / n_pool
    return (1.0 - (1.0 - p) ** ways) / (ways * p)


def mode_ceiling(cfg: Config, mode: str) -> float | None:
    """The ceiling of a few-shot mode whose pool is uniform; None otherwise."""
    c, ways = cfg.classes, cfg.sequences.ways
    if mode == ICL_MODE:
        return fewshot_ceiling(c.n_holdout, ways)
    if mode in ("fewshot_common", "fewshot_rare") and (
            c.zipf_exponent == 0 or not c.use_zipf_for_common_rare):
        return fewshot_ceiling(c.n_common if mode == "fewshot_common" else c.n_rare, ways)
    if mode == "fewshot_zipfian" and c.zipf_exponent == 0:
        return fewshot_ceiling(c.n_common + c.n_rare, ways)
    return None


def polysemy_factor(cfg: Config, mode: str) -> int:
    """X when rare classes own X labels each (ordered_polysemyX) and the mode's
    queries may be rare: any of a class's X labels then counts as right."""
    kind, x = parse_labeling(cfg.sequences.labeling_rare)
    if kind == "polysemy" and mode in ("no_support_rare", "no_support_zipfian"):
        return x
    return 1
