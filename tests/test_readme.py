"""README's Python examples run as written (on generated images), and the public names stay what they are."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simsearch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_public_name_is_stable_after_importing_every_submodule() -> None:
    before = {name: getattr(simsearch, name) for name in simsearch.__all__}
    for mod in pkgutil.walk_packages(simsearch.__path__, "simsearch."):
        if not mod.name.endswith("__main__"):
            importlib.import_module(mod.name)
    for name in simsearch.__all__:
        assert getattr(simsearch, name) is before[name], name
    assert callable(simsearch.embed) and callable(simsearch.train) and callable(simsearch.evaluate)


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples() -> None:
    assert len(_blocks()) >= 2


@pytest.mark.parametrize("n", range(len(_blocks())))
def test_readme_python_block_runs(n: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_training import make_labelled

    home = tmp_path / "home"
    photos = home / "Photos"
    photos.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize((256, 192)).save(photos / f"{i}.jpg")
    Image.open(photos / "0.jpg").save(photos / "copy-of-0.jpg")
    make_labelled(home / "Labelled", n_labels=8, per_label=5)
    work = tmp_path / "work"
    work.mkdir()
    Image.open(photos / "1.jpg").save(work / "query.jpg")
    Image.open(photos / "2.jpg").save(work / "a.jpg")
    Image.open(photos / "3.jpg").save(work / "b.png")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    exec(compile(_blocks()[n], f"README.md python block {n + 1}", "exec"), {"__name__": "__readme__"})
