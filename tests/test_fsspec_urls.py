"""Any fsspec URL, not only s3://: gs:// and az:// take the same path as this in-process memory:// store."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_dedup_actions import run_json

fsspec = pytest.importorskip("fsspec")


def test_index_sync_and_query_a_memory_url(photos: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    pics = sorted(photos.glob("*.jpg"))[:6]
    for p in pics:
        fs.pipe(f"/shelf-{tmp_path.name}/lib/{p.name}", p.read_bytes())
    fs.pipe(f"/shelf-{tmp_path.name}/lib/deep/{pics[0].name}", pics[0].read_bytes())
    url = f"memory://shelf-{tmp_path.name}/lib"
    index = tmp_path / "idx"
    rep = run_json("index", url, "--index", index)
    assert rep["added"] == 7 and not rep["skipped"]
    hit = run_json("query", pics[2], "--index", index)["results"][0]["matches"][0]
    assert hit["path"] == f"{url}/{pics[2].name}" and hit["score"] == pytest.approx(1.0, abs=1e-4)
    by_url = run_json("query", f"{url}/{pics[5].name}", "--index", index)["results"][0]["matches"][0]
    assert by_url["path"] == f"{url}/{pics[5].name}"
    groups = run_json("dedup", "--index", index)["groups"]
    assert [sorted(g["files"]) for g in groups] == [sorted([f"{url}/{pics[0].name}", f"{url}/deep/{pics[0].name}"])]

    fs.rm(f"/shelf-{tmp_path.name}/lib/{pics[1].name}")
    fs.pipe(f"/shelf-{tmp_path.name}/lib/{pics[3].name}", pics[4].read_bytes())  # overwritten with other bytes
    again = run_json("index", url, "--index", index)
    assert (again["removed"], again["updated"], again["added"]) == (1, 1, 0), again
    assert run_json("index", url, "--index", index)["unchanged"] == 6
