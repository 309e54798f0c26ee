"""Transfer learning: labelled folders, splits, training a head (and fine-tuning), MODEL_DIR as a backbone, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import BadInputError
from simsearch.training.labels import load_labelled, split
from simsearch.training.metrics import retrieval_metrics

SIZE = 64
BASE = {"backbone": "efficientnet-lite0", "weights": None, "input_size": SIZE}


def _object(rng: np.random.Generator) -> list[tuple]:
    """An 'object': a few coloured shapes at fixed places, drawn the same in every photo of it."""
    shapes = []
    for _ in range(4):
        x, y = rng.integers(0, 40, 2)
        w, h = rng.integers(8, 24, 2)
        shapes.append((int(rng.integers(0, 2)), (int(x), int(y), int(x + w), int(y + h)),
                       tuple(int(c) for c in rng.integers(0, 256, 3))))  # fmt: skip
    return shapes


def _photo(shapes: list[tuple], rng: np.random.Generator) -> Image.Image:
    """The object at a random place and scale over a random cluttered background."""
    bg = rng.integers(0, 256, 3)
    grad = np.linspace(0, 1, 96)[None, :, None] * rng.integers(-80, 80, 3)
    canvas = np.clip(bg + grad + rng.normal(0, 12, (96, 96, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(canvas)
    d = ImageDraw.Draw(im)
    for _ in range(3):  # clutter
        x, y = rng.integers(0, 90, 2)
        d.ellipse((int(x), int(y), int(x + 12), int(y + 12)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    obj = Image.new("RGB", (64, 64), (255, 255, 255))
    od = ImageDraw.Draw(obj)
    for kind, box, colour in shapes:
        (od.rectangle if kind else od.ellipse)(box, fill=colour)
    s = int(rng.integers(44, 64))
    obj = obj.resize((s, s))
    ox, oy = rng.integers(0, 96 - s, 2)
    im.paste(obj, (int(ox), int(oy)))
    return im


def make_labelled(root: Path, n_labels: int = 12, per_label: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for li in range(n_labels):
        shapes = _object(rng)
        d = root / f"item{li:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_label):
            _photo(shapes, rng).save(d / f"{k}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labelled(tmp_path_factory.mktemp("labelled") / "items", n_labels=24)


@pytest.fixture(scope="module")
def trained(labelled: Path, tmp_path_factory: pytest.TempPathFactory):
    """A head on the offline ImageNet Lite0 at 96 px: held-out objects are found better after training."""
    from simsearch import train

    out = tmp_path_factory.mktemp("models") / "head"
    return train(
        labelled, out, backbone="efficientnet-lite0", input_size=96, dim=32, epochs=40, seed=1, refit=False, whiten=0.0
    )


# ---- labelled sets and splits -----------------------------------------------------------------------------------
def test_labels_are_first_level_folders_and_nested_folders_are_allowed(tmp_path: Path) -> None:
    root = make_labelled(tmp_path / "set", n_labels=3, per_label=3)
    nested = root / "item00" / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(nested / "x.png")
    Image.new("RGB", (32, 32)).save(root / "unlabelled.png")  # directly in the root: no label
    data = load_labelled(root)
    assert len(data) == 10 and data.label_names == ["item00", "item01", "item02"]
    assert data.labels[data.paths.index(str(nested / "x.png"))] == "item00"


def test_single_image_labels_are_skipped_with_a_warning(tmp_path: Path) -> None:
    root = make_labelled(tmp_path / "set", n_labels=3, per_label=3)
    (root / "lonely").mkdir()
    Image.new("RGB", (32, 32)).save(root / "lonely" / "only.png")
    data = load_labelled(root)
    assert "lonely" not in data.labels and len(data) == 9
    assert any("fewer than 2 images" in w and "lonely" in w for w in data.warnings)


def test_csv_labels(tmp_path: Path) -> None:
    root = make_labelled(tmp_path / "set", n_labels=2, per_label=3)
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{'a' if i % 2 else 'b'}"
                             for i, p in enumerate(sorted(root.rglob("*.jpg")))]  # fmt: skip
    (tmp_path / "labels.csv").write_text("\n".join(rows + ["nowhere.jpg,a"]) + "\n")
    data = load_labelled(root, tmp_path / "labels.csv")
    assert len(data) == 6 and sorted(set(data.labels)) == ["a", "b"]


def test_label_split_holds_out_whole_labels_and_image_split_every_label(labelled: Path) -> None:
    data = load_labelled(labelled)
    sp = split(data, "labels", 0.25, seed=3)
    tr, va = {data.labels[i] for i in sp.train}, {data.labels[i] for i in sp.val}
    assert not tr & va and len(va) == 6 and len(tr) == 18
    assert split(data, "labels", 0.25, seed=3).val.tolist() == sp.val.tolist()  # seeded
    sp = split(data, "images", 0.25, seed=3)
    assert {data.labels[i] for i in sp.val} == set(data.labels) == {data.labels[i] for i in sp.train}
    assert not set(sp.val) & set(sp.train)


def test_fewer_than_two_labels_is_an_error(tmp_path: Path) -> None:
    root = make_labelled(tmp_path / "set", n_labels=1, per_label=4)
    with pytest.raises(BadInputError, match="at least 2 labels"):
        load_labelled(root)


# ---- metrics against brute force --------------------------------------------------------------------------------
def _brute(x: np.ndarray, lab: np.ndarray, target: float) -> dict:
    n = len(x)
    s = x @ x.T
    aps, p1, rec = [], [], {1: [], 5: [], 10: []}
    for q in range(n):
        others = [j for j in range(n) if j != q]
        ranked = sorted(others, key=lambda j: -s[q, j])
        rel = [lab[j] == lab[q] for j in ranked]
        if not any(rel):
            continue
        hits, prec = 0, []
        for r, ok in enumerate(rel, 1):
            if ok:
                hits += 1
                prec.append(hits / r)
        aps.append(sum(prec) / sum(rel))
        p1.append(rel[0])
        for k in rec:
            rec[k].append(any(rel[:k]))
    pairs = [(s[i, j], lab[i] == lab[j]) for i in range(n) for j in range(i + 1, n)]
    best = (None, 0.0)
    total = sum(same for _, same in pairs)
    for t in sorted({sc for sc, _ in pairs}):
        kept = [same for sc, same in pairs if sc >= t]
        if sum(kept) / len(kept) >= target:
            best = (t, sum(kept) / total)
            break
    return {"map": np.mean(aps), "p1": np.mean(p1), "rec": {k: np.mean(v) for k, v in rec.items()}, "thr": best}


@pytest.mark.parametrize("target", [0.5, 0.8, 1.0])
def test_metrics_equal_a_brute_force_computation(target: float) -> None:
    rng = np.random.default_rng(7)
    lab = rng.integers(0, 5, 40)
    centres = rng.normal(size=(5, 8))
    x = centres[lab] + rng.normal(scale=1.0, size=(40, 8))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    lab[0] = 99  # a label with one image: not a query, only a distractor
    m = retrieval_metrics(x, lab, target_precision=target, block=7)
    b = _brute(x, lab, target)
    assert m.queries == 39
    assert m.map == pytest.approx(b["map"], abs=1e-9) and m.p_at_1 == pytest.approx(b["p1"])
    for k in (1, 5, 10):
        assert m.recall_at[k] == pytest.approx(b["rec"][k])
    if b["thr"][0] is None:
        assert m.threshold["value"] is None
    else:
        assert m.threshold["value"] == pytest.approx(b["thr"][0], abs=1e-6)
        assert m.threshold["recall"] == pytest.approx(b["thr"][1], abs=1e-6)


# ---- training -----------------------------------------------------------------------------------------------------
def test_training_improves_held_out_map_over_the_untrained_projection(trained) -> None:
    m = trained.manifest["metrics"]
    first = trained.history[0]
    assert trained.history and not trained.interrupted
    # held-out labels: objects never trained on are retrieved better than by the untrained head and the raw features
    assert m["val_map"] > m["val_map_untrained_head"] + 0.03, m
    assert m["val_map"] > m["val_map_before"] + 0.02, m
    assert m["val_map"] >= max(h["val_map"] for h in trained.history) - 1e-6  # the best epoch is what was kept
    assert first["epoch"] == 1 and {"loss", "train_map", "val_map", "val_p_at_1"} <= set(first)


def test_model_dir_is_self_describing(trained) -> None:
    d = Path(trained.model_dir)
    assert {p.name for p in d.iterdir()} >= {"model.keras", "simsearch-model.json", "history.json", "training.png",
                                             "split.json"}  # fmt: skip
    man = json.loads((d / "simsearch-model.json").read_text())
    assert man["base"]["backbone"] == "efficientnet-lite0" and man["base"]["weights"] == "imagenet"
    assert len(man["base"]["weights_digest"]) == 64
    assert man["input_size"] == 96 and man["dim"] == 32 and man["preprocess"] == "lite"
    assert man["training"]["split"]["kind"] == "labels" and len(man["training"]["files_digest"]) == 64
    assert json.loads((d / "history.json").read_text()) == trained.history
    assert Image.open(d / "training.png").size[0] > 200


def test_saved_model_embeds_identically_on_keras_and_tflite(trained, labelled: Path) -> None:
    from simsearch import Embedder, embed

    paths = sorted(str(p) for p in labelled.rglob("*.jpg"))[:10]
    lite = Embedder(trained.model_dir).embed(paths).vectors
    keras_v = Embedder(trained.model_dir, engine="keras").embed(paths).vectors
    assert lite.shape == (10, 32)
    assert np.min(np.sum(lite * keras_v, axis=1)) > 0.999
    again = embed(paths, backbone=trained.model_dir).vectors
    assert np.allclose(again, lite, atol=1e-6)


def test_eval_of_the_held_out_files_matches_what_training_reported(trained, labelled: Path) -> None:
    from simsearch import evaluate

    res = evaluate(labelled, [trained.model_dir], heldout=trained.model_dir)[0]
    split_info = trained.manifest["training"]["split"]
    assert res["images"] == split_info["val_images"] and res["labels"] == split_info["val_labels"]
    assert res["map"] == pytest.approx(trained.manifest["metrics"]["val_map"], abs=0.01)


def test_index_and_query_with_a_trained_model(trained, labelled: Path, tmp_path: Path) -> None:
    from simsearch import SimIndex

    idx = SimIndex.create(tmp_path / "idx", backbone=trained.model_dir)
    idx.add_folder(labelled)
    assert idx.store.signature["backbone"] == trained.model_dir and idx.store.dim == 32
    q = sorted(labelled.rglob("*.jpg"))[3]
    assert idx.search(str(q), k=1)[0].path == str(q)
    idx.close()
    reopened = SimIndex.open(tmp_path / "idx")
    assert reopened.embedder.dim == 32  # rebuilt from the manifest's MODEL_DIR
    reopened.close()


def test_cli_train_eval_index_and_mixing_is_refused(trained, labelled: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["eval", str(labelled), "--backbone", trained.model_dir, "--weights", "none",
                                 "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)["results"][0]
    assert set(out) >= {"backbone", "images", "labels", "map", "p_at_1", "recall_at", "threshold"}
    assert set(out["recall_at"]) == {"1", "5", "10"} and set(out["threshold"]) == {"target_precision", "value",
                                                                                      "recall"}  # fmt: skip
    idx = tmp_path / "idx"
    r = CliRunner().invoke(app, ["index", str(labelled), "--index", str(idx), "--input-size", "96"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["index", str(labelled), "--index", str(idx), "--backbone", trained.model_dir])
    assert r.exit_code == 2 and "rebuild" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_existing_out_is_refused_without_overwrite(trained, labelled: Path) -> None:
    r = CliRunner().invoke(app, ["train", str(labelled), "--out", trained.model_dir, "--weights", "none"])
    assert r.exit_code == 1 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unreadable_files_are_skipped_and_counted(labelled: Path, tmp_path: Path) -> None:
    import shutil

    from simsearch import train

    root = tmp_path / "set"
    shutil.copytree(labelled, root)
    (root / "item00" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    res = train(root, tmp_path / "m", **BASE, dim=8, epochs=1)
    assert [Path(s["path"]).name for s in res.skipped] == ["broken.jpg"]
    assert any("unreadable" in w for w in res.warnings)


def test_damaged_or_foreign_model_dirs_give_one_line(trained, tmp_path: Path, labelled: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained.model_dir, bad)
    with open(bad / "model.keras", "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    r = CliRunner().invoke(app, ["index", str(labelled), "--index", str(tmp_path / "i"), "--backbone", str(bad)])
    assert r.exit_code == 1 and "damaged" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    man = json.loads((bad / "simsearch-model.json").read_text())
    man["version"] = 99
    (bad / "simsearch-model.json").write_text(json.dumps(man))
    r = CliRunner().invoke(app, ["eval", str(labelled), "--backbone", str(bad)])
    assert r.exit_code == 1 and "version 99" in r.stderr
    r = CliRunner().invoke(app, ["eval", str(labelled), "--backbone", str(tmp_path)])
    assert r.exit_code == 1 and "not a simsearch model directory" in r.stderr


def test_cli_one_label_is_an_error(tmp_path: Path) -> None:
    root = make_labelled(tmp_path / "set", n_labels=1, per_label=4)
    r = CliRunner().invoke(app, ["train", str(root), "--out", str(tmp_path / "m"), "--weights", "none"])
    assert r.exit_code == 1 and "at least 2 labels" in r.stderr and "Traceback" not in r.output


def test_finetune_trains_the_last_block_and_keeps_the_best(labelled: Path, tmp_path: Path) -> None:
    from simsearch import train
    from simsearch.models.backbones import load_backbone
    from simsearch.training.finetune import split_backbone

    bb = load_backbone("efficientnet-lite0", weights=None, input_size=SIZE)
    lower, upper, cut = split_backbone(bb.model)
    assert cut == "block14_add"  # the last block and the head conv are trained
    x = bb.preprocess(np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8))
    assert np.allclose(np.asarray(upper(lower(x))), np.asarray(bb.model(x)), atol=1e-5)
    res = train(labelled, tmp_path / "ft", **BASE, mode="finetune", dim=32, epochs=1, views=2, seed=1, unfreeze=0.25)
    t = res.manifest["training"]
    assert t["mode"] == "finetune" and t["cut"] == "block14_add"
    phases = [h["phase"] for h in res.history]
    assert "finetune" in phases and phases[-1] == f"refit-{res.chosen['mode']}"  # selection, then the refit
    best = max(h["val_map"] for h in res.history if h["val_map"] is not None)
    assert res.manifest["metrics"]["val_map"] == pytest.approx(best, abs=0.02)


def test_ctrl_c_keeps_the_best_model(labelled: Path, tmp_path: Path) -> None:
    """A real SIGINT in the middle of training: the best epoch so far is saved, exit code 130."""
    code = f"""
import os, signal, sys
from simsearch.training import trainer
calls = 0
orig = trainer._Loop._check_overfit
def interrupt_at_third(self):
    orig(self)
    if len(self.history) == 3:
        os.kill(os.getpid(), signal.SIGINT)
trainer._Loop._check_overfit = interrupt_at_third
from simsearch.cli import main
sys.argv = ["simsearch", "train", {str(labelled)!r}, "--out", {str(tmp_path / "m")!r}, "--weights", "none",
            "--input-size", "{SIZE}", "--epochs", "50", "--dim", "16"]
main()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 130, p.stderr
    assert "best model so far is saved" in p.stderr
    man = json.loads((tmp_path / "m" / "simsearch-model.json").read_text())
    assert man["training"]["interrupted"] is True and man["training"]["epochs_run"] == 3


# ---- refit, losses, whitening -------------------------------------------------------------------------------------


def test_refit_trains_the_chosen_epochs_on_every_label(tmp_path: Path) -> None:
    """Selection on held-out labels, then the same settings on all labels: the exported model is the refit one."""
    from simsearch import Embedder, train

    root = make_labelled(tmp_path / "set", n_labels=10, per_label=4, seed=5)
    kw = {**BASE, "dim": 16, "epochs": 4, "seed": 2}
    sel = train(root, tmp_path / "sel", **kw, refit=False)
    res = train(root, tmp_path / "refit", **kw)
    t, c = res.manifest["training"], res.chosen
    assert t["refit"] == {"done": True, "images": 40, "labels": 10, "head_epochs": c["head_epochs"],
                          "finetune_epochs": None}  # fmt: skip
    assert c["mode"] == "head" and c["refit"] is True and 1 <= c["head_epochs"] <= 4
    refit_rows = [h for h in res.history if h["phase"] == "refit-head"]
    assert len(refit_rows) == c["head_epochs"] and all(h["val_map"] is None for h in refit_rows)
    # the selection run is the same in both: same held-out figures, same chosen epochs
    assert res.manifest["metrics"]["val_map"] == pytest.approx(sel.manifest["metrics"]["val_map"], abs=1e-6)
    assert sel.chosen["refit"] is False and sel.manifest["training"]["refit"] == {"done": False}
    assert {"features", "select", "refit", "export"} <= set(res.timings) and "refit" not in sel.timings
    paths = sorted(str(p) for p in root.rglob("*.jpg"))[:6]
    a = Embedder(sel.model_dir, engine="keras").embed(paths).vectors
    b = Embedder(res.model_dir, engine="keras").embed(paths).vectors
    assert np.min(np.sum(a * b, axis=1)) < 0.999  # the refit model learnt from more labels: another model
    r = CliRunner().invoke(app, ["eval", str(root), "-b", res.model_dir, "--heldout", res.model_dir, "-w", "none",
                                 "--json"])  # fmt: skip
    assert r.exit_code == 0 and json.loads(r.stdout)["results"][0]["heldout_trained_on"] is True
    assert "not held-out ones" in r.stderr


def test_cli_train_reports_what_it_chose_and_phase_times(labelled: Path, tmp_path: Path) -> None:
    args = ["train", str(labelled), "--out", str(tmp_path / "m"), "--weights", "none", "--input-size", str(SIZE),
            "--dim", "8", "--epochs", "2", "--head-views", "1", "--loss", "proxy-anchor",
            "--whiten", "0.5"]  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["chosen"]["loss"] == "proxy-anchor" and out["chosen"]["whiten"] == 0.5 and out["refit"]["done"]
    assert all(v >= 0 for v in out["timings"].values()) and {"views", "select", "refit"} <= set(out["timings"])
    assert out["chosen"]["head_views"] == 1
    r = CliRunner().invoke(app, [*args[:-1], "2", "--overwrite"])
    assert r.exit_code == 1 and "--whiten must be in [0, 1]" in r.stderr and "Traceback" not in r.output
    r = CliRunner().invoke(app, [*args[:4], "--loss", "arcface"])
    assert r.exit_code == 1 and "unknown loss" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_whitening_init_decorrelates_the_training_features() -> None:
    from simsearch.training.heads import pca_init

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) * np.linspace(0.1, 3, 12)
    kernel, bias = pca_init(x, 6, whiten=1.0)
    cov = np.cov((x @ kernel + bias).T)
    assert np.allclose(cov, cov[0, 0] * np.eye(6), atol=1e-3 * cov[0, 0])  # equal variance, no correlation
    k0, _ = pca_init(x, 6)
    var0 = np.var(x @ k0, axis=0)
    assert var0[0] > 5 * var0[-1]  # without whitening the leading direction dominates


def test_proxy_anchor_loss_rewards_embeddings_near_their_own_proxies() -> None:
    from simsearch.models._keras import tensorflow
    from simsearch.training.heads import ProxyAnchorLoss, class_means

    tf = tensorflow()
    rng = np.random.default_rng(0)
    proxies = np.eye(8, dtype=np.float32)[:5]  # orthogonal labels
    y = np.repeat(np.arange(5), 4)
    near = proxies[y] + rng.normal(scale=0.1, size=(20, 8)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    loss = ProxyAnchorLoss(5, 8, init=class_means(near, y, 5))
    good = float(loss(tf.constant(near), tf.constant(y)))
    bad = float(loss(tf.constant(near), tf.constant(np.roll(y, 4))))
    assert np.isfinite(good) and good < bad / 3
    with tf.GradientTape() as tape:
        value = loss(tf.constant(near), tf.constant(np.roll(y, 4)))
    assert np.all(np.isfinite(tape.gradient(value, loss.proxies).numpy()))


def test_viewpoint_views_are_seeded_and_unfreeze_moves_the_cut(labelled: Path) -> None:
    from simsearch.models.backbones import load_backbone
    from simsearch.training.finetune import augmented_view, split_backbone

    p = str(sorted(labelled.rglob("*.jpg"))[0])
    a = augmented_view(p, 48, "resize", np.random.default_rng(3), "viewpoint")
    b = augmented_view(p, 48, "resize", np.random.default_rng(3), "viewpoint")
    c = augmented_view(p, 48, "resize", np.random.default_rng(3), "light")
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, c)
    bb = load_backbone("efficientnet-lite0", weights=None, input_size=SIZE)
    _, up25, cut25 = split_backbone(bb.model, 0.25)
    _, up50, cut50 = split_backbone(bb.model, 0.5)
    assert cut25 == "block14_add" and cut50 != cut25 and up50.count_params() > up25.count_params()


def test_unfreeze_auto_tries_each_cut_and_keeps_the_best_on_held_out_labels(labelled: Path, tmp_path: Path) -> None:
    from simsearch import train
    from simsearch.errors import BadInputError
    from simsearch.training.trainer import unfreeze_shares

    assert unfreeze_shares("auto") == (0.25, 0.5) and unfreeze_shares("0.3, 0.3,0.6") == (0.3, 0.6)
    assert unfreeze_shares(0.4) == (0.4,) and unfreeze_shares([0.25, 0.5]) == (0.25, 0.5)
    for bad in ("1.5", "x", "0.2,0"):
        with pytest.raises(BadInputError, match="unfreeze"):
            unfreeze_shares(bad)
    res = train(labelled, tmp_path / "ft", **BASE, mode="finetune", dim=32, epochs=1, views=2, seed=1,
                unfreeze="auto")  # fmt: skip
    tried = res.chosen["cuts_tried"]
    assert [t["unfreeze"] for t in tried] == [0.25, 0.5] and tried[0]["cut"] != tried[1]["cut"]
    phases = {h["phase"] for h in res.history}
    assert {"head", "finetune@0.25", "finetune@0.5"} <= phases
    best = [h for h in res.history if h["best"]][-1]  # the model's epoch (losing cuts' flags are cleared)
    assert all(h["best"] is False for h in res.history if h["phase"].startswith("finetune@")
               and h["phase"] != best["phase"])  # fmt: skip
    if res.chosen["mode"] == "finetune":  # the cut whose run holds the best held-out epoch is the one exported
        won = next(t for t in tried if f"finetune@{t['unfreeze']:g}" == best["phase"])
        assert (res.chosen["cut"], res.chosen["unfreeze"]) == (won["cut"], won["unfreeze"])
        assert won["val_map"] == max(t["val_map"] for t in tried) == best["val_map"]
        assert res.manifest["metrics"]["val_map"] == pytest.approx(won["val_map"], abs=0.02)
    else:
        assert best["phase"] == "head" and res.chosen["cut"] is None


def test_the_overfitting_warning_is_given_once_per_training() -> None:
    from simsearch.training.trainer import _Loop

    history: list[dict] = []
    warnings: list[str] = []
    for phase in ("head", "finetune@0.25", "finetune@0.5"):  # each phase (each cut) runs its own loop
        loop = _Loop(history, lambda *a: None, warnings)
        for val, tr in ((0.5, 0.1), (0.4, 0.2), (0.3, 0.3)):
            history.append({"epoch": len(history) + 1, "phase": phase, "val_map": val, "train_map": tr})
            loop._check_overfit()
    assert len(warnings) == 1 and "epoch 3" in warnings[0]
