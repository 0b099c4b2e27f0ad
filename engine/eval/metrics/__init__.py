"""Evaluation metrics: likelihood of the person's text, stylometry, embedding similarity,
win rates with intervals. Each module is pure apart from the model calls it names;
import the submodule you need (``embedding`` loads torch and transformers lazily)."""

from engine.eval.metrics.likelihood import Nll, mean_nll, sequence_nll, target_nll, target_nlls
from engine.eval.metrics.stats import (
    WinRate,
    aggregate_human_picks,
    agreement,
    human_pick_records,
    matrix_as_dict,
    wilson_interval,
    win_rate,
    win_rate_matrix,
)
from engine.eval.metrics.stylometry import (
    FEATURES,
    profile_of,
    spread_of,
    style_distance,
    style_distance_by_feature,
    text_profile,
)

__all__ = [
    "FEATURES",
    "Nll",
    "WinRate",
    "aggregate_human_picks",
    "agreement",
    "human_pick_records",
    "matrix_as_dict",
    "mean_nll",
    "profile_of",
    "sequence_nll",
    "spread_of",
    "style_distance",
    "style_distance_by_feature",
    "target_nll",
    "target_nlls",
    "text_profile",
    "wilson_interval",
    "win_rate",
    "win_rate_matrix",
]
