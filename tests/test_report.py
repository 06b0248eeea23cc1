"""Run reporting helpers that need no Prefect server."""

from __future__ import annotations

import gc

import pytest

from tasks.report import gc_frozen


def test_gc_frozen_keeps_objects_out_of_collections_only_inside_the_block() -> None:
    assert gc.get_freeze_count() == 0
    kept = [object() for _ in range(100)]
    with gc_frozen():
        assert gc.get_freeze_count() >= len(kept)
    assert gc.get_freeze_count() == 0


def test_gc_frozen_unfreezes_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), gc_frozen():
        raise RuntimeError("run failed")
    assert gc.get_freeze_count() == 0


def test_gc_frozen_freezes_objects_made_inside_when_asked() -> None:
    with gc_frozen() as freeze_more:
        before = gc.get_freeze_count()
        made = [[i] for i in range(1000)]  # lists: tracked by the collector
        freeze_more()
        assert gc.get_freeze_count() >= before + len(made)
    assert gc.get_freeze_count() == 0
