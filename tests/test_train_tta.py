"""Test-time augmentation built into trained models: mirror invariance, agreement with training, old model dirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from simsearch.cli import app

from .test_training import make_labelled


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random .keras backbone (fast to convert), a labelled set, and a model trained on it per TTA mode."""
    import keras

    from simsearch import train

    root = tmp_path_factory.mktemp("tta")
    keras.utils.set_random_seed(5)
    inp = keras.Input((40, 40, 3))
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = keras.layers.Conv2D(12, 5, strides=2, activation="relu")(x)
    bb = root / "tiny.keras"
    keras.Model(inp, keras.layers.Conv2D(24, 3, activation="relu")(x)).save(bb)
    data = make_labelled(root / "items", n_labels=10, per_label=4, seed=3)
    out = {"data": data, "backbone": str(bb)}
    for tta in ("none", "flip-crop"):
        out[tta] = train(data, root / tta, backbone=str(bb), dim=8, epochs=3, seed=0, refit=False, tta=tta)
    return out


def _mirrored(src: Path, dst: Path) -> Path:
    with Image.open(src) as im:
        ImageOps.mirror(im.convert("RGB")).save(dst)
    return dst


def test_a_flip_model_gives_an_image_and_its_mirror_the_same_vector(tiny: dict, tmp_path: Path) -> None:
    from simsearch import Embedder

    srcs = sorted(tiny["data"].rglob("*.jpg"))[:3]
    pngs = [tmp_path / f"{i}.png" for i in range(3)]
    for s, p in zip(srcs, pngs, strict=True):
        Image.open(s).save(p)  # lossless, so the mirror is exactly the mirrored pixels
    mirrors = [_mirrored(p, tmp_path / f"m{i}.png") for i, p in enumerate(pngs)]
    for engine in ("tflite", "keras"):
        e = Embedder(tiny["flip-crop"].model_dir, engine=engine)
        a, b = e.embed([str(p) for p in pngs]).vectors, e.embed([str(p) for p in mirrors]).vectors
        assert np.allclose(a, b, atol=2e-5), (engine, np.abs(a - b).max())
    # without test-time views the same kind of model is not mirror-invariant: the property above is the TTA's
    plain = Embedder(tiny["none"].model_dir)
    a, b = plain.embed([str(p) for p in pngs]).vectors, plain.embed([str(p) for p in mirrors]).vectors
    assert np.abs(a - b).max() > 1e-3


def test_the_exported_model_averages_the_views_training_scored(tiny: dict) -> None:
    """The TTA layers compute exactly what training's held-out figures average: each view through the same net."""
    from simsearch.models.backbones import resolve_backbone
    from simsearch.models.tta import average_views, view_pixels, views_of

    spec = resolve_backbone(tiny["flip-crop"].model_dir)
    model = spec.build().model
    core = model.get_layer("simsearch_embed")
    x = np.random.default_rng(0).uniform(-1, 1, (4, 40, 40, 3)).astype(np.float32)
    want = average_views([np.asarray(core(view_pixels(x, v))) for v in views_of("flip-crop")])
    assert np.allclose(np.asarray(model(x)), want, atol=1e-5)
    assert not np.allclose(np.asarray(core(x)), want, atol=1e-3)  # the views change the vector


def test_eval_of_held_out_files_matches_training_with_tta(tiny: dict) -> None:
    from simsearch import evaluate

    res = tiny["flip-crop"]
    row = evaluate(tiny["data"], [res.model_dir], heldout=res.model_dir)[0]
    assert row["tta"] == "flip-crop"
    assert row["map"] == pytest.approx(res.manifest["metrics"]["val_map"], abs=1e-3)
    assert row["p_at_1"] == pytest.approx(res.manifest["metrics"]["val_p_at_1"], abs=1e-3)


def test_tta_is_recorded_and_none_keeps_the_plain_model(tiny: dict) -> None:
    from simsearch.models.backbones import resolve_backbone

    for tta, views in (("none", ["plain"]), ("flip-crop", ["plain", "flip", "crop", "crop-flip"])):
        res = tiny[tta]
        man = json.loads((Path(res.model_dir) / "simsearch-model.json").read_text())
        assert man["tta"] == tta and man["tta_views"] == views
        assert res.chosen["tta"] == tta and res.to_json()["chosen"]["tta"] == tta
    names = [layer.name for layer in resolve_backbone(tiny["none"].model_dir).build().model.layers]
    assert "simsearch_embed" not in names and not any(n.startswith("tta_") for n in names)


def test_a_model_dir_from_before_tta_loads_and_embeds_as_before(tiny: dict, tmp_path: Path) -> None:
    import shutil

    from simsearch import Embedder, evaluate

    old = tmp_path / "old"
    shutil.copytree(tiny["none"].model_dir, old)
    mfile = old / "simsearch-model.json"
    man = json.loads(mfile.read_text())
    for key in ("tta", "tta_views"):
        del man[key]
    del man["training"]["chosen"]["tta"]
    mfile.write_text(json.dumps(man))
    paths = [str(p) for p in sorted(tiny["data"].rglob("*.jpg"))[:4]]
    got = Embedder(str(old)).embed(paths).vectors
    assert np.allclose(got, Embedder(tiny["none"].model_dir).embed(paths).vectors, atol=1e-6)
    assert evaluate(tiny["data"], [str(old)])[0]["tta"] == "none"


def test_cli_refuses_an_unknown_tta_in_one_line(tiny: dict, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["train", str(tiny["data"]), "--out", str(tmp_path / "m"), "--tta", "rotate"])
    assert r.exit_code != 0 and "flip-crop" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
