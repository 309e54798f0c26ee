"""Visual words: an inverted file over the stored RootSIFT features, the first stage of catalog lookup.

A global descriptor puts a clean catalog scan far from phone photos of the same object (perspective, glare,
background), so geometric re-ranking of the global top N never sees it. Local features survive those changes:
each descriptor is quantised to a visual word of a vocabulary tree (two levels of k-means, `k1 x k2` words,
trained with FAISS on a sample of the index's own descriptors), and an image becomes the set of its words
(one vote per word: burstiness normalisation). Scoring is tf-idf: sum of idf^2 over shared words, divided by the
square root of the image's word count.

Storage, in `visual-words/` of the index directory:
- `vocab.npz`: the vocabulary (k1 x 128 and k1 x k2 x 128 float32) and its settings;
- `words.sqlite`: one row per distinct file content (sha256 -> doc number, word count) and the segments;
- `seg-NNNNNN.offsets.npy` / `seg-NNNNNN.postings.npy`: immutable CSR segments (per word, uint32 doc numbers),
  read through memory maps, so a query reads only the postings of its own words.
Each sync appends one segment; removed contents are dropped from the table (their postings are skipped) and
segments are merged when there are many or when many of their postings are dead. Cost per image: 4 bytes per
distinct word (~1.5 KB for 512 features) on disk, 2 bytes in memory (word counts, cached per process).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexCorruptError

WORDS_DIR = "visual-words"
K1, K2 = 128, 128  # 16,384 words
TRAIN_SAMPLE = 200_000  # descriptors the vocabulary is trained on (at most)
RETRAIN_GROWTH = 2.0  # a vocabulary trained on fewer than TRAIN_SAMPLE descriptors is retrained at this growth
MAX_SEGMENTS = 8
DEAD_FRACTION = 0.25  # segments are merged when this share of their postings belongs to removed images
STOP_FRACTION = 0.05  # query words in more than this share of the images are skipped (cost; they say little)
MAX_POSTINGS = 4_000_000  # a query reads at most this many postings (its rarest words first): bounded cost at scale
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS docs (doc INTEGER PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL, nwords INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS segs (seg INTEGER PRIMARY KEY, postings INTEGER NOT NULL);
"""


@dataclass
class Vocabulary:
    """A two-level vocabulary tree: `top` (k1, 128) centroids, `sub` (k1, k2, 128); word = top * k2 + sub."""

    top: np.ndarray
    sub: np.ndarray
    trained_on: int  # descriptors in the training sample

    @property
    def size(self) -> int:
        return int(self.sub.shape[0] * self.sub.shape[1])

    def assign(self, desc: np.ndarray) -> np.ndarray:
        """Distinct word ids (sorted int64) of unit-norm float32 descriptors (n, 128)."""
        if len(desc) == 0:
            return np.zeros(0, np.int64)
        desc = np.ascontiguousarray(desc, np.float32)
        top = _nearest(desc, self.top, self._top_sq)
        order = np.argsort(top, kind="stable")  # descriptors grouped by branch: one small product per branch
        top, desc = top[order], desc[order]
        cuts = np.flatnonzero(np.diff(top)) + 1
        k2 = self.sub.shape[1]
        starts, ends = np.r_[0, cuts], np.r_[cuts, len(top)]
        words = [u * k2 + _nearest(desc[a:b], self.sub[u], self._sub_sq[u])
                 for a, b, u in zip(starts, ends, top[starts], strict=True)]  # fmt: skip
        return np.unique(np.concatenate(words))

    def __post_init__(self) -> None:
        self._top_sq = (self.top**2).sum(1)
        self._sub_sq = (self.sub**2).sum(2)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, top=self.top, sub=self.sub, trained_on=np.int64(self.trained_on))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        with np.load(path) as z:
            return cls(z["top"].astype(np.float32), z["sub"].astype(np.float32), int(z["trained_on"]))


def _nearest(x: np.ndarray, centroids: np.ndarray, c_sq: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (L2) of each row of x: argmin |c|^2 - 2 x.c."""
    try:  # OpenCV's GEMM: numpy's threaded BLAS is many times slower on small products when the cores are busy
        import cv2

        dots = cv2.gemm(x, centroids, 1.0, None, 0.0, flags=cv2.GEMM_2_T)
    except ImportError:
        dots = x @ centroids.T
    return np.argmin(c_sq[None, :] - 2.0 * dots, axis=1)


def train_vocabulary(desc: np.ndarray, k1: int = K1, k2: int = K2, seed: int = 0) -> Vocabulary:
    """A vocabulary tree trained on unit-norm descriptors (n, 128); small samples get fewer words per branch."""
    import faiss

    desc = np.ascontiguousarray(desc, np.float32)
    n, d = desc.shape
    k1 = max(1, min(k1, round(math.sqrt(n / 12))))  # small samples: fewer, fuller branches (and fast)
    km = faiss.Kmeans(d, k1, niter=15, seed=seed, min_points_per_centroid=1, max_points_per_centroid=256)
    km.train(desc)
    top = km.centroids.astype(np.float32)
    assigned = _nearest(desc, top, (top**2).sum(1))
    sub = np.full((k1, k2, d), 1e3, np.float32)  # unused slots: far from every unit descriptor
    for u in range(k1):
        pts = desc[assigned == u]
        kk = min(k2, len(pts) // 4)
        if kk <= 1:
            sub[u, 0] = pts.mean(0) if len(pts) else top[u]
            continue
        s = faiss.Kmeans(d, kk, niter=10, seed=seed + u, min_points_per_centroid=1, max_points_per_centroid=256)
        s.train(pts)
        sub[u, :kk] = s.centroids
    return Vocabulary(top, sub, n)


class WordIndex:
    """The visual-words inverted file of one index directory."""

    def __init__(self, root: Path, conn: sqlite3.Connection, vocab: Vocabulary | None) -> None:
        self.root = root
        self.conn = conn
        self.vocab = vocab
        self._cache: tuple[int, dict[str, Any]] | None = None
        self._vocab_version = int(self._meta("vocab_version", 0))

    @staticmethod
    def exists(index_dir: str | Path) -> bool:
        root = Path(index_dir) / WORDS_DIR
        return (root / "vocab.npz").is_file() and (root / "words.sqlite").is_file()

    @classmethod
    def open(cls, index_dir: str | Path, create: bool = False) -> WordIndex:
        root = Path(index_dir) / WORDS_DIR
        if not create and not cls.exists(index_dir):
            raise FileNotFoundError(root)
        root.mkdir(exist_ok=True)
        conn = sqlite3.connect(root / "words.sqlite", check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=10000")
            with conn:
                conn.executescript(_SCHEMA)
            vocab = Vocabulary.load(root / "vocab.npz") if (root / "vocab.npz").is_file() else None
        except (sqlite3.DatabaseError, ValueError, OSError, KeyError) as e:
            conn.close()
            raise IndexCorruptError(f"visual words in {root} are damaged ({e}); delete the folder and re-index") from e
        return cls(root, conn, vocab)

    def close(self) -> None:
        self.conn.close()

    # ---- bookkeeping ----------------------------------------------------------------------------------------
    def _meta(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def _set_meta(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    @property
    def generation(self) -> int:
        return int(self._meta("generation", 0))

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    def keys(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT sha256 FROM docs")}

    def settings(self) -> dict[str, Any]:
        v = self.vocab
        return {"words": v.size if v else 0, "trained_on": v.trained_on if v else 0, "docs": len(self),
                "segments": len(self._segments()), "stop_fraction": STOP_FRACTION,
                "max_postings": MAX_POSTINGS}  # fmt: skip

    def _segments(self) -> list[tuple[int, int]]:
        return [(int(s), int(n)) for s, n in self.conn.execute("SELECT seg, postings FROM segs ORDER BY seg")]

    def _seg_paths(self, seg: int) -> tuple[Path, Path]:
        return self.root / f"seg-{seg:06d}.offsets.npy", self.root / f"seg-{seg:06d}.postings.npy"

    def disk_bytes(self) -> dict[str, int]:
        """Bytes on disk: all, the vocabulary (fixed), and per image (postings and table rows: what grows)."""
        total = sum(f.stat().st_size for f in self.root.iterdir() if f.is_file())
        vocab = (self.root / "vocab.npz").stat().st_size if (self.root / "vocab.npz").is_file() else 0
        return {"bytes": total, "vocab_bytes": vocab, "bytes_per_image": round((total - vocab) / max(1, len(self)))}

    # ---- writing --------------------------------------------------------------------------------------------
    def set_vocabulary(self, vocab: Vocabulary) -> None:
        """Adopt a (new) vocabulary: every stored word list is dropped, callers add all images again."""
        for seg, _ in self._segments():
            for p in self._seg_paths(seg):
                p.unlink(missing_ok=True)
        with self.conn:
            self.conn.execute("DELETE FROM docs")
            self.conn.execute("DELETE FROM segs")
        vocab.save(self.root / "vocab.npz")
        with self.conn:
            self._set_meta("vocab_version", int(self._meta("vocab_version", 0)) + 1)
            self._set_meta("generation", self.generation + 1)
        self.vocab = vocab
        self._cache = None

    def add(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        """Add images as one new segment: (sha256, distinct word ids) each; contents already present are replaced."""
        if not items:
            return
        assert self.vocab is not None
        self.remove([sha for sha, _ in items])
        first = int(self._meta("next_doc", 0))  # never reused: old segments may still hold a removed doc's postings
        seg = int(self.conn.execute("SELECT COALESCE(MAX(seg), 0) + 1 FROM segs").fetchone()[0])
        docs = [(first + i, sha, int(len(w))) for i, (sha, w) in enumerate(items)]
        self._write_segment(seg, [(d, w) for (d, _, _), (_, w) in zip(docs, items, strict=True)])
        with self.conn:
            self.conn.executemany("INSERT INTO docs VALUES (?, ?, ?)", docs)
            self.conn.execute("INSERT INTO segs VALUES (?, ?)", (seg, sum(n for _, _, n in docs)))
            self._set_meta("next_doc", first + len(docs))
            self._set_meta("generation", self.generation + 1)
        self._cache = None
        self.compact()

    def _write_segment(self, seg: int, docs: Sequence[tuple[int, np.ndarray]]) -> None:
        """CSR postings of (doc, words) pairs: per word, the doc numbers holding it (ascending)."""
        assert self.vocab is not None
        size = self.vocab.size
        words = np.concatenate([w for _, w in docs]) if docs else np.zeros(0, np.int64)
        owners = np.repeat(np.array([d for d, _ in docs], np.int64), [len(w) for _, w in docs])
        order = np.lexsort((owners, words))
        offsets = np.zeros(size + 1, np.int64)
        np.cumsum(np.bincount(words, minlength=size), out=offsets[1:])
        off_path, post_path = self._seg_paths(seg)
        _save(post_path, owners[order].astype(np.uint32))
        _save(off_path, offsets)  # last: a segment without offsets is not read

    def remove(self, shas: Iterable[str]) -> int:
        shas = list(shas)
        if not shas:
            return 0
        with self.conn:
            cur = self.conn.executemany("DELETE FROM docs WHERE sha256=?", ((s,) for s in shas))
            n = cur.rowcount
            if n:
                self._set_meta("generation", self.generation + 1)
        self._cache = None
        return max(0, n)

    def compact(self, force: bool = False) -> bool:
        """Merge segments (tiered: the small ones into one while there are too many; all of them when many postings
        are dead or `force`); True if anything was merged."""
        segs = self._segments()
        total = sum(n for _, n in segs)
        live = int(self.conn.execute("SELECT COALESCE(SUM(nwords), 0) FROM docs").fetchone()[0])
        if force or total - live > DEAD_FRACTION * max(1, total):
            merge = segs
        elif len(segs) > MAX_SEGMENTS:
            biggest = max(segs, key=lambda s: s[1])
            rest = [s for s in segs if s != biggest]
            merge = rest if sum(n for _, n in rest) < biggest[1] else segs
        else:
            return False
        if not merge or (len(merge) == 1 and total == live):
            return False
        self._merge([s for s, _ in merge])
        return True

    def _merge(self, segs: list[int]) -> None:
        """Write the live postings of `segs` as one new segment, word by word (bounded memory), then drop them."""
        state = self._state()
        alive = state["nwords"] > 0
        size = self.vocab.size if self.vocab else 0
        parts = [state["segments"][s] for s in segs]
        counts = np.zeros(size, np.int64)
        for w in range(size):
            for off, post in parts:
                if off[w + 1] > off[w]:
                    counts[w] += int(alive[post[off[w] : off[w + 1]]].sum())
        offsets = np.zeros(size + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        new = int(self.conn.execute("SELECT COALESCE(MAX(seg), 0) + 1 FROM segs").fetchone()[0])
        off_path, post_path = self._seg_paths(new)
        tmp = post_path.with_name(post_path.name + ".tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint32, shape=(max(1, int(offsets[-1])),))
        for w in range(size):
            at = int(offsets[w])
            for off, post in parts:
                if off[w + 1] > off[w]:
                    p = post[off[w] : off[w + 1]]
                    p = p[alive[p]]
                    out[at : at + len(p)] = p
                    at += len(p)
        out.flush()
        del out
        os.replace(tmp, post_path)
        _save(off_path, offsets)
        self._cache = None
        with self.conn:
            self.conn.executemany("DELETE FROM segs WHERE seg=?", ((s,) for s in segs))
            self.conn.execute("INSERT INTO segs VALUES (?, ?)", (new, int(offsets[-1])))
            self._set_meta("generation", self.generation + 1)
        for seg in segs:
            for p in self._seg_paths(seg):
                p.unlink(missing_ok=True)

    # ---- reading --------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """Word counts per doc (0 = removed), document frequencies and memory-mapped segments; per generation.

        Read as one snapshot; a segment deleted meanwhile by a merge in another process means a newer generation,
        so the state is read again (a merge deletes old segments only after committing the new one)."""
        for attempt in range(3):
            gen = self.generation
            if self._cache is not None and self._cache[0] == gen:
                return self._cache[1]
            try:
                state = self._read_state()
            except IndexCorruptError:
                if attempt == 2 or self.generation == gen:
                    raise
                continue
            self._cache = (state["generation"], state)
            return state
        raise AssertionError("unreachable")

    def _read_state(self) -> dict[str, Any]:
        version = int(self._meta("vocab_version", 0))
        if version != self._vocab_version:  # retrained by another process
            path = self.root / "vocab.npz"
            self.vocab = Vocabulary.load(path) if path.is_file() else None
            self._vocab_version = version
        self.conn.execute("BEGIN")  # one snapshot of documents, segments and generation
        try:
            gen = self.generation
            rows = np.array(self.conn.execute("SELECT doc, nwords FROM docs").fetchall(), np.int64).reshape(-1, 2)
            top = int(self._meta("next_doc", 0))
            segs = self._segments()
        finally:
            self.conn.commit()
        nwords = np.zeros(max(top, 1), np.uint16)
        nwords[rows[:, 0]] = np.minimum(rows[:, 1], 65535)
        size = self.vocab.size if self.vocab else 0
        segments, df = {}, np.zeros(size, np.int64)
        for seg, _ in segs:
            off_path, post_path = self._seg_paths(seg)
            try:
                off = np.load(off_path, mmap_mode="r")
                post = np.load(post_path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise IndexCorruptError(f"visual words segment {post_path} is damaged ({e}); re-index") from e
            segments[seg] = (off, post)
            df += np.diff(off)
        n = max(1, len(rows))
        idf = np.log((n + 1) / (df + 1)).astype(np.float64)
        return {"nwords": nwords, "segments": segments, "idf2": idf**2, "df": df, "n": n, "generation": gen}

    def search(self, words: np.ndarray, k: int) -> list[tuple[str, float]]:
        """The k images sharing the most idf-weighted words with a query's distinct `words`: (sha256, score)."""
        if self.vocab is None or len(words) == 0 or k < 1:
            return []
        st = self._state()
        words = np.asarray(words, np.int64)
        df = st["df"][words]
        keep = df <= max(10, STOP_FRACTION * st["n"])  # stop words: long lists, little say
        words, df = words[keep], df[keep]
        order = np.argsort(df, kind="stable")  # the rarest words first, until the postings budget is spent
        words = words[order[np.cumsum(df[order]) <= max(MAX_POSTINGS, int(df.min()) if len(df) else 0)]]
        if len(words) == 0:
            return []
        docs, weights = [], []
        for off, post in st["segments"].values():
            starts, ends = off[words], off[words + 1]
            lens = ends - starts
            if not lens.sum():
                continue
            docs.extend(post[a:b] for a, b in zip(starts, ends, strict=True) if b > a)
            weights.append(np.repeat(st["idf2"][words], lens))
        if not docs:
            return []
        d = np.concatenate(docs).astype(np.int64)
        nw = st["nwords"]
        scores = np.bincount(d, np.concatenate(weights), minlength=len(nw))
        scores = np.where(nw > 0, scores / np.sqrt(np.maximum(nw, 1)), 0.0)
        k = min(k, int((scores > 0).sum()))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        shas = dict(self._shas([int(t) for t in top]))
        return [(shas[int(t)], float(scores[t])) for t in top if int(t) in shas]

    def search_descriptors(self, desc: np.ndarray, k: int) -> list[tuple[str, float]]:
        """`search` for a query's unit-norm descriptors (n, 128), quantised with the current vocabulary."""
        self._state()  # reloads a vocabulary retrained by another process
        return self.search(self.vocab.assign(desc), k) if self.vocab is not None else []

    def _shas(self, docs: list[int]) -> list[tuple[int, str]]:
        out = []
        for a in range(0, len(docs), 500):
            chunk = docs[a : a + 500]
            q = f"SELECT doc, sha256 FROM docs WHERE doc IN ({','.join('?' * len(chunk))})"
            out.extend((int(d), s) for d, s in self.conn.execute(q, chunk))
        return out


def check_words(index_dir: Path) -> tuple[bool, str] | None:
    """(ok, detail) for an index's visual words (None if it has none): the vocabulary loads, every segment's offsets
    run from 0 to its postings' length without going back, and every posting names a document ever given out."""
    root = Path(index_dir) / WORDS_DIR
    if not root.is_dir():
        return None
    try:
        wi = WordIndex.open(index_dir)
    except (FileNotFoundError, IndexCorruptError) as e:
        return False, f"{WORDS_DIR}: {e}"
    try:
        if wi.vocab is None:
            return False, f"{WORDS_DIR}: no vocabulary"
        bad = []
        next_doc = int(wi._meta("next_doc", 0))
        for seg, n in wi._segments():
            off_path, post_path = wi._seg_paths(seg)
            try:
                off = np.load(off_path, mmap_mode="r")
                post = np.load(post_path, mmap_mode="r")
                shape_ok = len(off) == wi.vocab.size + 1 and off[0] == 0 and off[-1] == len(post) == n
                sound = shape_ok and bool(np.all(np.diff(off) >= 0)) and (not len(post) or int(post.max()) < next_doc)
            except (OSError, ValueError):
                sound = False
            if not sound:
                bad.append(post_path.name)
        detail = f"{WORDS_DIR}: {len(wi)} images, {len(wi._segments())} segments, {len(bad)} damaged"
        return not bad, detail + (f" ({', '.join(bad[:3])})" if bad else "")
    except sqlite3.DatabaseError as e:
        return False, f"{WORDS_DIR}: {e}"
    finally:
        wi.close()


def _save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sync_words(index_dir: Path, progress: Callable[[int, int], None] | None = None, seed: int = 0) -> dict[str, Any]:
    """Bring the visual words in line with the local-features store: train (or outgrow) the vocabulary, add images
    that have features but no words, drop images that lost them. Returns counts for the sync report."""
    from .feature_store import FeatureStore

    t0 = time.perf_counter()
    fs = FeatureStore.open(index_dir)
    wi = WordIndex.open(index_dir, create=True)
    try:
        have = fs.keys()
        v = wi.vocab
        trained = False
        if have and (v is None or v.trained_on < TRAIN_SAMPLE):  # only a small vocabulary is ever retrained
            total_desc = int(fs.conn.execute("SELECT COALESCE(SUM((LENGTH(data) - 12) / 132), 0) FROM features")
                             .fetchone()[0])  # fmt: skip
            if v is None or total_desc >= RETRAIN_GROWTH * v.trained_on:
                wi.set_vocabulary(train_vocabulary(_sample(fs, sorted(have), TRAIN_SAMPLE, seed), seed=seed))
                trained = True
        dropped = wi.remove(wi.keys() - have)
        todo = sorted(have - wi.keys())
        if progress:
            progress(0, len(todo))
        added = 0
        for a in range(0, len(todo), 2048):
            chunk = todo[a : a + 2048]
            feats = fs.get(chunk)
            assert wi.vocab is not None
            wi.add([(sha, wi.vocab.assign(feats[sha].unit_descriptors())) for sha in chunk if sha in feats])
            added += len(chunk)
            if progress:
                progress(added, len(todo))
        return {"added": len(todo), "dropped": dropped, "trained": trained, **wi.settings(),
                **wi.disk_bytes(), "seconds": round(time.perf_counter() - t0, 3)}  # fmt: skip
    finally:
        wi.close()
        fs.close()


def _sample(fs: Any, shas: list[str], n: int, seed: int) -> np.ndarray:
    """Up to n unit descriptors drawn evenly from the stored images (a random subset of images, then of rows)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(shas))
    out, have = [], 0
    for a in range(0, len(order), 500):
        feats = fs.get([shas[i] for i in order[a : a + 500]])
        for f in feats.values():
            if len(f):
                out.append(f.unit_descriptors())
                have += len(f)
        if have >= 2 * n:
            break
    if not out:
        return np.zeros((0, 128), np.float32)
    d = np.concatenate(out)
    return d[rng.choice(len(d), n, replace=False)] if len(d) > n else d
