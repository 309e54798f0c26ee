"""The two additions to dedup/actions.py that the server needs: plan exactly the chosen files, keep a held lock."""

from __future__ import annotations

from pathlib import Path

import pytest

from simsearch.dedup.actions import apply_plan, plan_action, plan_files, undo
from simsearch.dedup.finder import find_duplicates
from simsearch.errors import BadInputError, IndexLockedError
from simsearch.index.store import IndexStore

from .serve_util import build_index, build_library


@pytest.fixture
def lib(photos: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = build_library(photos, tmp_path / "lib")
    return folder, build_index(folder, tmp_path / "idx")


def test_plan_files_gives_plan_action_destinations_for_the_chosen_files(lib: tuple[Path, Path], tmp_path: Path) -> None:
    folder, index = lib
    with IndexStore.open(index) as store:
        report = find_duplicates(store)
        whole = plan_action(report, "move", tmp_path / "dupes", store)
        losers = [s for s, _ in whole.moves]
        assert len(losers) == 2
        assert plan_files(losers, "move", tmp_path / "dupes", store).moves == whole.moves
        one = plan_files(losers[:1], "move", tmp_path / "dupes", store)
        assert one.moves == whole.moves[:1] and one.action == "move"
        trash = plan_files(losers[:1], "delete", None, store).moves[0][1]
        assert trash is not None and Path(trash).is_relative_to(index / "trash")
        assert plan_files(losers, "delete", None, store, permanent=True).moves == [(f, None) for f in losers]
        with pytest.raises(BadInputError, match="--to"):
            plan_files(losers, "move", None, store)
        with pytest.raises(BadInputError, match="unknown action"):
            plan_files(losers, "report", None, store)


def test_apply_plan_keeps_the_lock_its_caller_holds(lib: tuple[Path, Path]) -> None:
    folder, index = lib
    copy = folder / "copies" / "chelsea-copy.jpg"
    with IndexStore.open(index) as store:
        plan = plan_files([str(copy)], "delete", None, store)
        store.acquire_lock()
        manifest = apply_plan(plan, store)
        assert store.holds_lock  # still ours: no other writer could slip in
        with IndexStore.open(index) as other, pytest.raises(IndexLockedError):
            other.acquire_lock()
        store.release_lock()
        assert not store.holds_lock and not copy.exists() and store.row_by_path(str(copy)) is None
        # without a held lock apply_plan takes and releases it itself, as before
        plan = plan_files([str(folder / "copies" / "coffee-small.jpg")], "delete", None, store)
        assert apply_plan(plan, store) is not None and not store.holds_lock
    assert manifest is not None and undo(manifest)["restored"] == 1 and copy.is_file()
