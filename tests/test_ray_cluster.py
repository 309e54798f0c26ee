"""`--ray` on a real multi-node cluster (nodes as local processes, 1 CPU each): both nodes work, and a worker node
removed mid-run is survived with an index equal to a local one (nothing lost, nothing doubled)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .test_ray_index import MODEL, assert_same_vectors, cli, run_json, vectors_by_path
from .test_resume import committed, noise_images


def test_two_nodes_share_the_work_and_a_node_lost_mid_run_is_survived(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from ray.cluster_utils import Cluster

    for name in ("first", "later", "library"):
        (tmp_path / name).mkdir()
    first = noise_images(tmp_path / "first", 64, 11, ".jpg")
    later = noise_images(tmp_path / "later", 320, 12, ".jpg")
    folder = tmp_path / "library"
    for p in first.iterdir():
        shutil.copy(p, folder / f"a-{p.name}")
    want_index = tmp_path / "local"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        index = tmp_path / "idx"
        out = run_json("index", folder, "--index", index, *MODEL, "--ray", cluster.address, "--commit-every", "8")
        assert out["added"] == 64 and out["ray"]["nodes"] == 2
        assert len(out["ray"]["shards_per_node"]) == 2  # both nodes embedded shards

        for p in later.iterdir():
            shutil.copy(p, folder / f"b-{p.name}")
        proc = subprocess.Popen([*cli("index", folder, "--index", index, *MODEL, "--ray", cluster.address,
                                      "--commit-every", "8", "--json")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 180
        while committed(index) <= 64 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the node could be removed"
        cluster.remove_node(worker)  # mid-run: Ray restarts its actor on the head and retries its shards
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        again = json.loads(stdout)
        assert again["added"] == 320 and again["skipped"] == []
    finally:
        cluster.shutdown()
    run_json("index", folder, "--index", want_index, *MODEL)
    assert_same_vectors(vectors_by_path(index), vectors_by_path(want_index))  # nothing lost, nothing doubled
