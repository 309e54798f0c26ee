"""Dedup actions users can trust: plans before --yes, no overwrites, undo, --prefer, keep rules, rotations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app

from .conftest import edited

runner = CliRunner()


def run_json(*args: str | Path) -> dict:
    r = runner.invoke(app, [*map(str, args), "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def lib(photos: Path, tmp_path: Path) -> tuple[Path, Path]:
    """photos/ with a byte copy of chelsea in sub/ and a re-encoded coffee in ref/; a fresh index."""
    folder = tmp_path / "lib"
    shutil.copytree(photos, folder)
    (folder / "sub").mkdir()
    shutil.copy(folder / "chelsea.jpg", folder / "sub" / "chelsea.jpg")
    (folder / "ref").mkdir()
    edited(folder / "coffee.jpg", folder / "ref" / "coffee-ref.jpg", scale=0.8, quality=60)
    index = tmp_path / "idx"
    run_json("index", folder, "--index", index)
    return folder, index


def test_move_plans_first_keeps_layout_never_overwrites_and_undoes(lib: tuple[Path, Path], tmp_path: Path) -> None:
    folder, index = lib
    dest = tmp_path / "dupes"
    plan = run_json("dedup", "--index", index, "--action", "move", "--to", dest)
    assert plan["action"]["applied"] is False and not dest.exists()
    moves = {m["from"]: m["to"] for m in plan["action"]["moves"]}
    # the resized coffee (lower resolution) and the chelsea copy with the longer path go
    assert moves == {str(folder / "ref" / "coffee-ref.jpg"): str(dest / "ref" / "coffee-ref.jpg"),
                     str(folder / "sub" / "chelsea.jpg"): str(dest / "sub" / "chelsea.jpg")}  # fmt: skip
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "chelsea.jpg").write_bytes(b"someone else's file")
    done = run_json("dedup", "--index", index, "--action", "move", "--to", dest, "--yes")
    assert done["action"]["applied"] is True
    assert (dest / "sub" / "chelsea.jpg").read_bytes() == b"someone else's file"  # not overwritten
    assert (dest / "sub" / "chelsea-1.jpg").is_file() and (dest / "ref" / "coffee-ref.jpg").is_file()
    assert not (folder / "sub" / "chelsea.jpg").exists()
    assert run_json("info", "--index", index)["counts"]["images"] == 8
    assert run_json("dedup", "--index", index)["groups"] == []

    undone = run_json("undo", done["action"]["undo"])
    assert undone["restored"] == 2 and undone["reindexed"] == 2
    assert (folder / "sub" / "chelsea.jpg").is_file() and (folder / "ref" / "coffee-ref.jpg").is_file()
    assert run_json("info", "--index", index)["counts"]["images"] == 10
    again = run_json("index", folder, "--index", index)
    assert again["unchanged"] == 10 and again["embedded"] == 0


def test_delete_goes_to_trash_and_permanent_needs_its_flag(lib: tuple[Path, Path]) -> None:
    folder, index = lib
    r = runner.invoke(app, ["dedup", "--index", str(index), "--permanent"])
    assert r.exit_code == 1 and "--permanent only goes with --action delete" in r.stderr
    out = run_json("dedup", "--index", index, "--action", "delete", "--exact-only", "--yes")
    (move,) = out["action"]["moves"]
    assert move["from"] == str(folder / "sub" / "chelsea.jpg") and move["to"].startswith(str(index / "trash"))
    assert Path(move["to"]).is_file() and not Path(move["from"]).exists()
    plan = run_json("dedup", "--index", index, "--action", "delete", "--permanent")
    assert plan["action"]["moves"] == [{"from": str(folder / "ref" / "coffee-ref.jpg"), "to": None}]
    assert (folder / "ref" / "coffee-ref.jpg").exists()  # only a plan without --yes


def test_prefer_folders_are_kept_and_keep_rules_are_ordered(lib: tuple[Path, Path]) -> None:
    folder, index = lib
    out = run_json("dedup", "--index", index, "--prefer", folder / "ref")
    near = next(g for g in out["groups"] if g["kind"] == "near")
    assert near["keep"] == str(folder / "ref" / "coffee-ref.jpg")
    out = run_json("dedup", "--index", index, "--keep", "longest-path", "--exact-only")
    assert out["groups"][0]["keep"] == str(folder / "sub" / "chelsea.jpg")
    r = runner.invoke(app, ["dedup", "--index", str(index), "--keep", "prettiest"])
    assert r.exit_code == 1 and "unknown keep rule" in r.stderr


def test_rotations_option_finds_rotated_and_mirrored_copies(photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "rot"
    shutil.copytree(photos, folder)
    with Image.open(folder / "astronaut.jpg") as im:
        im.transpose(Image.Transpose.ROTATE_90).save(folder / "astronaut-rot90.jpg", quality=90)
    with Image.open(folder / "rocket.jpg") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "rocket-mirror.jpg", quality=90)
    index = tmp_path / "idx"
    run_json("index", folder, "--index", index)
    plain = run_json("dedup", "--index", index)
    assert not any("astronaut-rot90.jpg" in f for g in plain["groups"] for f in g["files"])
    rot = run_json("dedup", "--index", index, "--rotations")
    groups = sorted(sorted(Path(f).name for f in g["files"]) for g in rot["groups"])
    assert ["astronaut-rot90.jpg", "astronaut.jpg"] in groups and ["rocket-mirror.jpg", "rocket.jpg"] in groups
