"""The event loop's health during a run (tasks/runtime.py)."""

from __future__ import annotations

import gc

import pytest

from tasks.runtime import gc_frozen


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


def _collectable_ids() -> set[int]:
    # gc.get_objects() lists the three generations the collector walks, not the frozen ones.
    return {id(obj) for obj in gc.get_objects()}


def test_gc_frozen_freezes_objects_made_inside_when_asked() -> None:
    # Judged by membership, not by gc.get_freeze_count(): frozen objects freed by refcount
    # elsewhere (other tests' leftovers, threads) lower that count at any moment.
    with gc_frozen() as freeze_more:
        made = [[i] for i in range(1000)]  # lists: tracked by the collector
        assert {id(item) for item in made} <= _collectable_ids()
        freeze_more()
        assert not {id(item) for item in made} & _collectable_ids()
    assert id(made[0]) in _collectable_ids()
    assert gc.get_freeze_count() == 0
