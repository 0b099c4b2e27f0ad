"""Cross-validation: every demonstration held out once (``persona crossval``).

k folds (engine.crossval.folds), each a workspace of its own under ``runs/crossval-<time>/``
running the normal stages through the normal runner (engine.crossval.run), recorded in a plan
(engine.crossval.plan); then pooled per demonstration with paired comparisons between methods
(engine.crossval.pool, engine.eval.paired) into results/crossval.json and crossval_report.md
(engine.crossval.report).
"""

from engine.crossval.folds import CrossvalError, deal_folds, stages_for
from engine.crossval.plan import CrossvalPlan, choose_plan, list_plans, load_plan
from engine.crossval.run import Crossval, FoldEvent, pending

__all__ = [
    "Crossval",
    "CrossvalError",
    "CrossvalPlan",
    "FoldEvent",
    "choose_plan",
    "deal_folds",
    "list_plans",
    "load_plan",
    "pending",
    "stages_for",
]
