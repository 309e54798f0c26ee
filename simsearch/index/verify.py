"""`simsearch verify`: check every part of an index without trusting any of it, and optionally repair it.

Opening an index only checks sizes and generations (O(1)); this reads everything: SQLite's integrity check, each
row's vector against its CRC-32, the search structure against its sha256 and its row count. `repair` rebuilds
a damaged or stale search structure from the stored vectors (the vectors themselves can only be re-embedded).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SimsearchError


def verify(path: str | Path, repair: bool = False) -> dict[str, Any]:
    """{"path", "ok", "checks": [{"name", "ok", "detail"}], "repaired"} for the index at `path`."""
    from ..models.backbones import file_digest
    from .store import DATABASE, MANIFEST, VECTORS_FILE, IndexStore, _connect

    path = Path(path).expanduser().absolute()
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> bool:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return ok

    if not check("manifest", (path / MANIFEST).is_file(), str(path / MANIFEST)):
        return {"path": str(path), "ok": False, "checks": checks, "repaired": False}
    manifest = json.loads((path / MANIFEST).read_text())
    conn = _connect(path / DATABASE)
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    check("database", integrity == "ok", f"{DATABASE}: {integrity}")
    dim = int(manifest["dim"])
    vfile = path / VECTORS_FILE
    size = vfile.stat().st_size if vfile.is_file() else -1
    max_id = conn.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
    vectors_ok = check("vector file size", size >= (max_id + 1) * dim * 4 if max_id else size >= 0,
                       f"{VECTORS_FILE}: {size} bytes for rows up to id {max_id}")  # fmt: skip
    if vectors_ok and max_id:
        vec = np.memmap(vfile, dtype=np.float32, mode="r", shape=(size // (dim * 4), dim))
        bad, n = [], 0
        for rid, crc in conn.execute("SELECT id, vcrc FROM images ORDER BY id"):
            n += 1
            if zlib.crc32(np.ascontiguousarray(vec[rid]).tobytes()) != crc:
                bad.append(rid)
        vectors_ok = check("vectors", not bad, f"{n} rows, {len(bad)} with a damaged vector"
                           + (f" (ids {bad[:5]})" if bad else ""))  # fmt: skip
        del vec
    search = manifest.get("search") or {}
    search_ok = True
    if search.get("kind", "flat") != "flat":
        f = path / str(search.get("file"))
        digest = file_digest(f) if f.is_file() else None
        state = "checksum matches" if digest == search.get("sha256") else "missing or damaged"
        search_ok = check("search structure", digest == search.get("sha256"),
                          f"{f.name} ({search.get('factory')}): {state}")  # fmt: skip
    else:
        check("search structure", True, "flat: exact search over the vectors, no structure to check")
    conn.close()
    repaired = _check_local_features(path, check, repair)
    repaired = _check_visual_words(path, check, repair) or repaired
    if repair and not search_ok and vectors_ok:
        m = dict(manifest, search={"kind": "flat", "factory": None})
        (path / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
        store = IndexStore.open(path)
        try:
            store.acquire_lock()
            store._index_dirty = True
            store.save()
            repaired = True
            built = store.manifest["search"].get("factory") or "flat"
            checks.append({"name": "repair", "ok": True, "detail": f"search structure rebuilt ({built})"})
        except SimsearchError as e:
            checks.append({"name": "repair", "ok": False, "detail": str(e)})
        finally:
            store.close()
    fixed = ("search structure", "local features", "visual words")
    ok = all(c["ok"] for c in checks if not (repaired and c["name"] in fixed))
    return {"path": str(path), "ok": ok, "checks": checks, "repaired": repaired}


def _check_visual_words(path: Path, check: Any, repair: bool) -> bool:
    """The visual-words inverted file is sound; `repair` removes a damaged one (the next index run rebuilds it)."""
    import shutil

    from ..spatial.words import WORDS_DIR, check_words

    found = check_words(path)
    if found is None or check("visual words", *found) or not repair:
        return False
    shutil.rmtree(path / WORDS_DIR)
    check("repair", True, f"removed the damaged {WORDS_DIR}; `simsearch index` rebuilds it")
    return True


def _check_local_features(path: Path, check: Any, repair: bool) -> bool:
    """Every stored local-features record decodes; `repair` drops damaged ones (the next index run redoes them)."""
    import sqlite3

    from ..spatial.feature_store import FEATURES_DB
    from ..spatial.local_features import LocalFeatures

    db = path / FEATURES_DB
    if not db.is_file():
        return False
    try:
        conn = sqlite3.connect(db)
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        bad, n = [], 0
        for sha, data in conn.execute("SELECT sha256, data FROM features"):
            n += 1
            try:
                LocalFeatures.from_bytes(data)
            except (ValueError, TypeError):
                bad.append(sha)
    except sqlite3.DatabaseError as e:
        check("local features", False, f"{FEATURES_DB}: {e} (delete it; `simsearch index` rebuilds it)")
        return False
    ok = check("local features", integrity == "ok" and not bad,
               f"{FEATURES_DB}: {n} records, {len(bad)} damaged; database {integrity}")  # fmt: skip
    if ok or not repair or integrity != "ok":
        conn.close()
        return False
    with conn:
        conn.executemany("DELETE FROM features WHERE sha256=?", ((s,) for s in bad))
    conn.close()
    check("repair", True, f"dropped {len(bad)} damaged local-features records; `simsearch index` redoes them")
    return True
