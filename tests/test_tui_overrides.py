"""The Train tab's override line: values may hold spaces."""

from __future__ import annotations

from engine.store.config import load_config
from tui.train import split_overrides


def test_values_with_spaces_stay_whole_and_load():
    items = split_overrides('synth_outputs.signoff="— Maya"  prompting.only=[0, 3] sft.lr=1e-4')
    assert items == ['synth_outputs.signoff="— Maya"', "prompting.only=[0, 3]", "sft.lr=1e-4"]
    cfg = load_config(None, items)
    assert cfg.synth_outputs.signoff == "— Maya" and cfg.prompting.only == (0, 3)
    assert split_overrides("   ") == []
