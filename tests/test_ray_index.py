"""`simsearch index --ray`: vectors equal local indexing, sync, per-file errors, resume, errors, the JSON entry.

A local Ray with 2 CPUs is started once for the module; the CLI runs in child processes that join it by address.
Skipped when the `ray` extra is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simsearch
from simsearch.errors import BadInputError
from simsearch.images import scan_images
from simsearch.index.distributed import (
    INSTALL_HINT,
    RayEmbedder,
    WorkerPathError,
    _timings,
    make_shards,
    plan_workers,
)
from simsearch.index.store import IndexStore

from .test_resume import committed, noise_images

ROOT = Path(simsearch.__file__).resolve().parents[1]
MODEL = ["--weights", "none", "--input-size", "64"]
N_IMAGES = 48


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "simsearch.cli", *map(str, args)]


def run(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def run_json(*args: str | Path) -> dict:
    r = run(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def ray_address() -> str:
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    here = {"py_modules": [str(ROOT / "simsearch")]}  # the workers run this checkout, like a CLI-started job
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env=here)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = noise_images(tmp_path_factory.mktemp("ray-images"), N_IMAGES, 5, ".jpg")
    good = (d / "img-000.jpg").read_bytes()
    (d / "broken.jpg").write_bytes(good[: len(good) // 3])  # a JPEG header, then nothing: fails to decode
    return d


@pytest.fixture(scope="module")
def local(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, np.ndarray]]:
    index = tmp_path_factory.mktemp("local") / "idx"
    out = run_json("index", folder, "--index", index, *MODEL)
    return out, vectors_by_path(index)


def vectors_by_path(index: Path) -> dict[str, np.ndarray]:
    with IndexStore.open(index) as store:
        rows = {r.id: r.path for r in store.all_rows()}
        return {rows[int(i)]: v for ids, vecs in store.iter_vectors() for i, v in zip(ids, vecs, strict=True)}


def assert_same_vectors(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    cos = {p: float(np.dot(got[p], want[p])) for p in want}
    assert min(cos.values()) >= 0.9999, min(cos.items(), key=lambda kv: kv[1])


def test_cli_on_ray_equals_local_and_reports_ray(ray_address: str, folder: Path, local: tuple, tmp_path: Path) -> None:
    want_json, want = local
    index = tmp_path / "idx"
    # `--ray local`: the CLI starts its own Ray (the laptop case) and shuts it down at the end
    out = run_json("index", folder, "--index", index, *MODEL, "--ray", "local", "--workers", "2",
                   "--commit-every", "8")  # fmt: skip
    shards = len(make_shards(list(range(N_IMAGES + 1)), 8, 2))
    assert out["ray"].pop("start_s") > 0 and out["ray"].pop("steady_img_s") > 0
    assert out["ray"].pop("address") not in ("local", ray_address)
    assert out["ray"].pop("nodes") == 1 and sum(out["ray"].pop("shards_per_node").values()) == shards
    assert out["ray"] == {"workers": 2, "shards": shards}
    assert_same_vectors(vectors_by_path(index), want)
    # the broken file is skipped with the same reason as locally, and the run still succeeds
    assert out["skipped"] == want_json["skipped"]
    assert [s["path"] for s in out["skipped"]] == [str(folder / "broken.jpg")]
    for key in ("added", "embedded", "total", "indexed"):
        assert out[key] == want_json[key]
    # a no-op sync needs no worker at all
    again = run_json("index", folder, "--index", index, "--ray", ray_address)
    assert again["unchanged"] == N_IMAGES and again["embedded"] == 0
    assert again["ray"] == {"address": ray_address, "workers": 0, "shards": 0}


def test_ivf_filled_from_per_shard_sub_indexes_equals_the_serial_build(
    ray_address: str, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simsearch.api import SimIndex

    kind = ["--index-type", "IVF4,Flat"]
    assert run("index", folder, "--index", tmp_path / "serial", *MODEL, *kind).returncode == 0
    monkeypatch.setenv("SIMSEARCH_RAY_MERGE", "1")  # a 2-CPU local Ray would otherwise leave the fill to the driver
    out = run_json("index", folder, "--index", tmp_path / "merged", *MODEL, *kind, "--ray", ray_address,
                   "--workers", "2")  # fmt: skip
    assert out["ray"]["merge"]["shards"] == 1 and out["ray"]["merge"]["fill_s"] > 0
    with SimIndex.open(tmp_path / "serial") as a, SimIndex.open(tmp_path / "merged") as b:
        fill = b.store.manifest["search"]["fill"]
        assert fill["by"] == "ray" and a.store.manifest["search"]["fill"]["by"] == "driver"
        assert b.store.faiss_index.ntotal == a.store.faiss_index.ntotal == N_IMAGES
        queries = np.stack([v for _, v in sorted(vectors_by_path(tmp_path / "serial").items())])
        sa, ia = a.store.search(queries, 5, param=1)
        sb, ib = b.store.search(queries, 5, param=1)
    assert np.array_equal(ia, ib) and np.allclose(sa, sb)


def test_sync_new_changed_removed_through_ray(ray_address: str, folder: Path, tmp_path: Path) -> None:
    from simsearch.api import SimIndex

    work = tmp_path / "photos"
    shutil.copytree(folder, work)
    idx = SimIndex.create(tmp_path / "idx", weights="none", input_size=64)
    first = idx.add_folder(work, ray=ray_address, workers=1, commit_every=16)
    assert first.added == N_IMAGES and first.ray["workers"] == 1
    (work / "img-001.jpg").unlink()
    with Image.open(work / "img-002.jpg") as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(work / "img-002.jpg", quality=90)
    shutil.copy(work / "img-003.jpg", work / "sub-copy.jpg")  # same bytes as an indexed file: its vector is reused
    Image.fromarray(np.full((90, 120, 3), 200, np.uint8)).save(work / "new.png")
    second = idx.add_folder(work, ray=ray_address, commit_every=16)
    assert (second.added, second.updated, second.removed, second.embedded) == (2, 1, 1, 2)
    assert second.ray["shards"] >= 1
    idx.close()
    ref = tmp_path / "ref"
    assert run("index", work, "--index", ref, *MODEL).returncode == 0
    assert_same_vectors(vectors_by_path(tmp_path / "idx"), vectors_by_path(ref))


def test_killed_run_resumes_without_reembedding_committed_shards(
    ray_address: str, folder: Path, local: tuple, tmp_path: Path
) -> None:
    index = tmp_path / "idx"
    args = ["index", folder, "--index", index, *MODEL, "--ray", ray_address, "--workers", "1", "--commit-every", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(cli(*args, "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    deadline = time.time() + 120
    while committed(index) < 8 and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = committed(index)
    assert 8 <= before < N_IMAGES
    with IndexStore.open(index) as store:  # what is committed is whole shards, in order
        done = {r.path for r in store.all_rows()} | {f[0] for f in store.failures()}
    shards = make_shards([str(p) for p in scan_images(folder)[0]], 2, 1)
    assert done == {q for s in shards[: -(-len(done) // 2)] for q in s}
    out = run_json(*args)
    assert out["unchanged"] == before and out["embedded"] == N_IMAGES - before
    assert_same_vectors(vectors_by_path(index), local[1])


def test_worker_that_cannot_read_the_folder_is_one_clear_error(ray_address: str, local: tuple, tmp_path: Path) -> None:
    from simsearch.models.embedder import Embedder

    emb = Embedder("efficientnet-lite0", weights=None, input_size=64)
    missing = tmp_path / "not-mounted"
    with pytest.raises(WorkerPathError) as e:
        list(RayEmbedder(emb, ray_address, workers=1).embed_files([str(missing / "a.jpg"), str(missing / "b.jpg")]))
    msg = str(e.value)
    assert f"cannot read {missing}" in msg and "mounts at the same path" in msg and "\n" not in msg


def test_without_ray_the_error_says_how_to_install(folder: Path, tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None; from simsearch.cli import main; "
        f"sys.argv = ['simsearch', 'index', {str(folder)!r}, '--index', {str(tmp_path / 'i')!r}, '--ray', 'local']; "
        "main()"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and INSTALL_HINT in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "i").exists()  # refused before any work
    r = run("index", folder, "--index", tmp_path / "i", "--workers", "2")
    assert r.returncode == 1 and "--workers goes with --ray" in r.stderr


def test_worker_plan_and_shards() -> None:
    node = {"Alive": True, "Resources": {"CPU": 8.0}}
    assert plan_workers([node, node, {"Alive": False, "Resources": {"CPU": 8.0}}], None) == (2, 8)
    assert plan_workers([node, node], 4) == (4, 4)
    assert plan_workers([{"Alive": True, "Resources": {"CPU": 2.0}}], 1) == (1, 2)
    with pytest.raises(BadInputError, match="needs 17 CPUs"):
        plan_workers([node, node], 17)
    paths = [f"/p/{i}" for i in range(1000)]
    shards = make_shards(paths, 256, 2)
    assert [p for s in shards for p in s] == paths and max(map(len, shards)) == 125  # >= 4 shards per worker
    assert max(map(len, make_shards(paths, 64, 1))) == 64 and make_shards([], 8, 1) == []
    assert _timings(100.0, 104.5, 110.5, 30) == {"start_s": 4.5, "steady_img_s": 5.0}
