"""The Python API: build or open an index, sync folders into it, search it, find duplicates.

from simsearch import SimIndex
idx = SimIndex.open_or_create("indexes/photos")
idx.add_folder("~/Photos")
for m in idx.search("query.jpg", k=5):
    print(m.score, m.path)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError, IndexMismatchError
from .index.store import IndexStore
from .index.sync import ProgressFn, SyncReport, sync_folder
from .index.videos import align, frame_owner, frame_vectors, search_frames, video_shas, videos
from .models.backbones import DEFAULT_BACKBONE, DEFAULT_POOLING
from .sources import is_url


@dataclass
class Match:
    """One search hit: the indexed file, its cosine similarity to the query, and its index id."""

    path: str
    score: float
    id: int
    inliers: int | None = None  # RANSAC inliers against the query, when re-ranked
    time_s: float | None = None  # a video: seconds into it of the frame that matched best
    stage: str | None = None  # re-ranked searches: the first stage that found it, "global", "words" or "both"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "score": round(self.score, 6)}
        if self.inliers is not None:
            out["inliers"] = self.inliers
        if self.stage is not None:
            out["stage"] = self.stage
        if self.time_s is not None:
            out["time_s"] = round(self.time_s, 3)
        return out


def default_index_path(folder: str | Path) -> Path:
    """`indexes/<folder name>` under the current directory (for a URL, its last path part)."""
    from .sources import is_url

    if is_url(folder):
        name = str(folder).rstrip("/").rsplit("/", 1)[-1] or "bucket"
    else:
        name = Path(os.path.abspath(Path(folder).expanduser())).name or "root"
    return Path.cwd() / "indexes" / name


MAX_HASHED_QUERY = 256 << 20  # a bigger query file (a video is handled apart) is embedded without a look-up


class SimIndex:
    """An index directory plus the embedder that made it (built lazily: only new images need the model)."""

    def __init__(self, store: IndexStore, embedder_options: dict[str, Any] | None = None) -> None:
        self.store = store
        self._embedder: Any = None
        self._options = embedder_options or {}
        self._features: Any = None  # spatial.rerank.FeatureSource, made on the first re-ranked search
        self._words: Any = None  # spatial.words.WordIndex, opened on the first re-ranked search that has one
        self._video_cache: tuple[int, set[str]] | None = None

    # ---- construction -----------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        backbone: str = DEFAULT_BACKBONE,
        weights: str | Path | None = "imagenet",
        pooling: str = DEFAULT_POOLING,
        fit: str | None = None,
        precision: str | None = None,
        engine: str = "auto",
        batch_size: int = 32,
        seed: int = 0,
        input_size: int | None = None,
        representative: list[str] | None = None,
        index_type: str = "auto",
        memory_budget: int | str | None = None,
    ) -> SimIndex:
        """Create an empty index for a backbone (builds the model to learn its signature).

        `representative`: image paths that calibrate `precision="int8"` (a sample of the images to index).
        `index_type`: auto, flat, hnsw, ivf, ivfpq or a FAISS factory string (see `simsearch.index.ann`);
        `memory_budget` (bytes or "2GB") steers `auto` towards compressed codes.
        """
        from .index.ann import parse_budget
        from .models.embedder import Embedder

        kw = _embed_kwargs(fit, precision or "auto")
        calibration = list(representative or []) if precision == "int8" else []
        emb = Embedder(backbone, weights=weights, pooling=pooling, batch_size=batch_size, engine=engine,
                       seed=seed, input_size=input_size, representative=calibration or None, **kw)  # fmt: skip
        extra = {"calibration": calibration} if calibration else {}
        store = IndexStore.create(path, {**emb.signature(), "seed": seed, **extra}, index_type=index_type,
                                  memory_budget=parse_budget(memory_budget))  # fmt: skip
        idx = cls(store)
        idx._embedder = emb
        return idx

    @classmethod
    def open(cls, path: str | Path, engine: str = "auto", batch_size: int = 32) -> SimIndex:
        """Open an existing index; the embedder is rebuilt from its manifest when first needed."""
        return cls(IndexStore.open(path), {"engine": engine, "batch_size": batch_size})

    @classmethod
    def open_or_create(cls, path: str | Path, **create_options: Any) -> SimIndex:
        if IndexStore.exists(path):
            idx = cls.open(path, engine=create_options.get("engine", "auto"),
                           batch_size=create_options.get("batch_size", 32))  # fmt: skip
            idx.check_backbone(create_options)
            return idx
        return cls.create(path, **create_options)

    def check_backbone(self, options: dict[str, Any]) -> None:
        """Refuse options that would change the model of an existing index."""
        sig = self.store.signature
        from .models.backbones import resolve

        if options.get("backbone") and resolve(options["backbone"]).name != sig["backbone"]:
            raise IndexMismatchError(
                f"index {self.store.path} was built with backbone {sig['backbone']}, not {options['backbone']}; "
                f"use --rebuild to re-index it with {options['backbone']}, or choose another --index"
            )
        for key in ("pooling", "fit", "precision", "input_size"):
            if key == "precision" and options.get(key) == "auto":
                continue  # whatever the index was built with
            if options.get(key) and options[key] != sig.get(key):
                raise IndexMismatchError(
                    f"index {self.store.path} uses {key}={sig.get(key)}, not {options[key]}; use --rebuild to change it"
                )
        w = options.get("weights")
        if w is not None and str(w).lower() not in ("imagenet", "none", "random"):
            from .models.backbones import file_digest

            p = Path(w).expanduser()
            if not p.is_file():
                raise BadInputError(f"weights file not found: {p}")
            if file_digest(p) != sig.get("weights_digest"):
                raise IndexMismatchError(
                    f"index {self.store.path} was built with other weights ({sig.get('weights')}); "
                    "use --rebuild to re-index with these weights"
                )
        elif w is not None and _weights_label(w) != sig.get("weights"):
            raise IndexMismatchError(
                f"index {self.store.path} was built with weights {sig.get('weights')}, not {w}; use --rebuild"
            )

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            from .models.embedder import Embedder

            sig = self.store.signature
            if sig.get("weights") == "external":
                raise BadInputError(
                    f"index {self.store.path} holds vectors imported from elsewhere ({sig.get('backbone')}): it cannot "
                    "embed images; search it by id or with vectors (SimIndex.search_vectors)"
                )
            weights = None if sig["weights"] == "none" else sig["weights"]
            self._embedder = Embedder(
                sig["backbone"], weights=weights, pooling=sig["pooling"], fit=sig["fit"],
                precision=sig.get("precision", "fp32"),
                representative=sig.get("calibration"), input_size=sig["input_size"], seed=sig.get("seed", 0),
                **self._options,
            )  # fmt: skip
            self.store.check_signature(self._embedder.signature())
        return self._embedder

    def close(self) -> None:
        if self._words is not None:
            self._words.close()
            self._words = None
        if self._features is not None:
            self._features.close()
            self._features = None
        self.store.close()

    def __enter__(self) -> SimIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing ----------------------------------------------------------------------------------------------
    def add_folder(
        self,
        folder: str | Path,
        progress: ProgressFn | None = None,
        commit_every: int = 256,
        ray: str | None = None,
        workers: int | None = None,
        local_features: bool | None = None,
        features_progress: ProgressFn | None = None,
    ) -> SyncReport:
        """Sync a folder into the index (add new, re-embed changed, drop deleted files); holds the write lock.

        `ray` ("local", "auto" or a cluster address) embeds on Ray Data actors, `workers` of them (default one per
        node); planning, commits and resume are the same as a local run. `local_features=True` also stores local
        features for spatial re-ranking, and from then on every sync keeps them up to date.
        """
        if workers is not None and ray is None:
            raise BadInputError("workers= goes with ray=")
        from .spatial.feature_store import FeatureStore

        keep_features = local_features or (local_features is None and FeatureStore.exists(self.store.path))
        if keep_features:
            from .spatial.local_features import require_cv2

            require_cv2()
        self.store.acquire_lock()
        try:
            from .dedup.journal import recover

            recovered = recover(self.store)  # a move cut short is put back first, so sync drops none of its files
            emb = self._embedder or (lambda: self.embedder)
            if ray is not None:
                from .index.distributed import sync_with_ray

                report = sync_with_ray(self.store, emb, folder, ray, workers, progress, commit_every)
            else:
                report = sync_folder(self.store, emb, folder, progress=progress, commit_every=commit_every)
            report.recovered = recovered or None
            if keep_features:
                self._sync_features(report, features_progress)
            return report
        finally:
            self.store.release_lock()

    def _sync_features(self, report: SyncReport, progress: ProgressFn | None) -> None:
        import time

        from .index.sync import SyncInterrupted
        from .spatial.feature_store import FEATURES_DB, sync_features

        t0 = time.perf_counter()
        try:
            counts = sync_features(self.store.path, self.store.all_rows(), progress)
        except KeyboardInterrupt:
            report.interrupted = True
            raise SyncInterrupted(report) from None
        size = sum(f.stat().st_size for f in self.store.path.glob(FEATURES_DB + "*"))
        counts["bytes_per_image"] = round(size / max(1, counts["stored"]))
        from .spatial.words import sync_words

        try:
            words = sync_words(self.store.path, progress)
        except KeyboardInterrupt:
            report.interrupted = True
            raise SyncInterrupted(report) from None
        counts["words"] = words
        counts["seconds"] = round(time.perf_counter() - t0, 3)
        report.local_features = counts
        report.seconds += counts["seconds"]

    def rebuild(self, backbone_options: dict[str, Any]) -> None:
        """Empty the index and adopt a (possibly new) model; the next `add_folder` re-embeds everything."""
        from .models.embedder import Embedder

        opts = {k: v for k, v in backbone_options.items() if v is not None}
        seed = opts.pop("seed", 0)
        self.store.acquire_lock()
        try:
            sig = self.store.signature
            opts.setdefault("backbone", sig["backbone"])
            if opts["backbone"] == sig["backbone"]:
                opts.setdefault("input_size", sig["input_size"])
            opts.setdefault("pooling", sig["pooling"])
            opts.setdefault("fit", sig["fit"])
            opts.setdefault("precision", sig.get("precision", "fp32"))
            if "weights" not in opts:
                opts["weights"] = None if sig["weights"] == "none" else sig["weights"]
            self._embedder = Embedder(**opts, seed=seed, **self._options)
            from .index.videos import clear as clear_frames

            clear_frames(self.store)
            self.store.reset({**self._embedder.signature(), "seed": seed})
        finally:
            self.store.release_lock()

    # ---- reading ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.store.count()

    def vector_for(self, query: Any) -> np.ndarray:
        """The embedding of a query: an indexed id, an indexed unchanged file (stored vector), or any image."""
        if isinstance(query, (int, np.integer)):
            try:
                return self.store.vectors([int(query)])[0]
            except KeyError:
                raise BadInputError(f"no image with id {query} in the index") from None
        if isinstance(query, str) and is_url(query):
            row = self._query_row(query)
            if row is not None:
                return self.store.vectors([row.id])[0]
            from .sources.remote import read_object

            try:
                query = read_object(query)[0]
            except (OSError, ValueError) as e:
                raise BadInputError(f"cannot read {query}: {e}") from None
        elif isinstance(query, (str, Path)):
            p = Path(query).expanduser()
            if not p.exists():
                raise BadInputError(f"query image not found: {p}")
            _require_file(p)  # a FIFO, device or folder: said at once, before the model is even built
            row = self._query_row(p)
            if row is not None:
                return self.store.vectors([row.id])[0]
            query = str(p)
        stored = self.known_vector(query)
        if stored is not None:
            return stored
        return self.embedder.embed_one(query)

    def known_vector(self, query: Any) -> np.ndarray | None:
        """The stored vector of an indexed file with the same bytes as `query` (a local path or bytes), or None:
        the same content gets the same vector, as in a sync, whatever arithmetic embedded the index."""
        data = query if isinstance(query, (bytes, bytearray)) else None
        if isinstance(query, str) and not is_url(query):
            try:
                with open(query, "rb") as f:
                    data = f.read(MAX_HASHED_QUERY + 1)
            except OSError:
                return None
        if data is None or len(data) > MAX_HASHED_QUERY:
            return None
        return self.vector_of_content(hashlib.sha256(data).hexdigest())

    def vector_of_content(self, sha256: str) -> np.ndarray | None:
        """The stored vector of an indexed file whose content has this sha256, or None."""
        rows = self.store.rows_by_sha([sha256])
        return self.store.vectors([rows[0].id])[0] if rows else None

    def search(
        self,
        query: Any,
        k: int = 10,
        min_score: float | None = None,
        nprobe: int | None = None,
        exact: bool = False,
        rerank: int = 0,
    ) -> list[Match]:
        """The k nearest indexed images to `query` (path, PIL image, array or id), best first.

        `nprobe` overrides the index's tuned search parameter (IVF lists, or HNSW efSearch); `exact` searches
        every vector. Scores are always exact cosines from the stored vectors. `rerank=N` verifies the top N
        geometrically (local features + RANSAC, needs OpenCV): views of the same object or scene move first, and
        each match carries its `inliers`.
        """
        if rerank < 0:
            raise BadInputError("rerank must be 0 (off) or a number of candidates")
        if self._is_video(query):
            return self.search_video(query, k, min_score)[:k]
        vec = self.vector_for(query)
        matches = self.search_vectors(vec[None], max(k, rerank), min_score, self._self_id(query), nprobe, exact)[0]
        if not rerank:
            return matches[:k]
        qf = self.query_features(query) if self.has_words() else None
        found = self.first_stage(vec, matches, rerank, qf, min_score)
        return self.prepare_rerank(query, found, qf=qf).run(k)[0]

    def has_words(self) -> bool:
        """Whether the index keeps visual words (built with local features): re-ranked searches then use them."""
        from .spatial.words import WordIndex

        return WordIndex.exists(self.store.path)

    def _word_index(self) -> Any:
        from .spatial.words import WordIndex

        if self._words is None:
            self._words = WordIndex.open(self.store.path)
        return self._words

    def query_features(self, query: Any, may_read: Callable[[str], bool] | None = None) -> Any:
        """Local features of a query: stored ones for an unchanged indexed file, else extracted from the image."""
        from .images import ImageLoadError
        from .spatial.local_features import require_cv2
        from .spatial.rerank import FeatureSource

        require_cv2()
        if self._features is None:
            self._features = FeatureSource(self.store.path)
        row = self._query_row(query)
        if row is not None:
            f = self._features.features([(row.sha256, row.path)], may_read)[0]
            if f is not None:
                return f
        if isinstance(query, (int, np.integer)):
            raise BadInputError(f"image {query}: its file cannot be read for re-ranking (gone, changed or not "
                                "served); search without rerank")  # fmt: skip
        source = query
        if isinstance(query, str) and is_url(query):
            from .sources.remote import read_object

            try:
                source = read_object(query)[0]
            except (OSError, ValueError) as e:
                raise BadInputError(f"cannot read {query}: {e}") from None
        elif isinstance(query, (str, Path)):
            source = str(Path(query).expanduser())
        try:
            return self._features.extract(source)
        except ImageLoadError as e:
            raise BadInputError(str(e)) from None

    def word_matches(self, query_features: Any, n: int, vector: np.ndarray | None = None) -> list[Match]:
        """The n indexed images sharing the most visual words with a query (its local features), best first, each
        with its cosine to `vector` (the query's embedding; 0 without it) and stage "words". Empty without words."""
        if not self.has_words() or query_features is None:
            return []
        hits = self._word_index().search_descriptors(query_features.unit_descriptors(), n)
        rank = {sha: r for r, (sha, _) in enumerate(hits)}
        rows = sorted(self.store.rows_by_sha(list(rank)), key=lambda r: (rank[r.sha256], r.id))[:n]
        if not rows:
            return []
        if vector is not None:
            scores = self.store.vectors([r.id for r in rows]) @ _checked_vectors(vector, self.store.dim, "query")[0]
        else:
            scores = np.zeros(len(rows), np.float32)
        return [Match(r.path, float(min(1.0, max(-1.0, s))), r.id, stage="words")
                for r, s in zip(rows, scores, strict=True)]  # fmt: skip

    def first_stage(
        self,
        vector: np.ndarray,
        global_matches: list[Match],
        n: int,
        query_features: Any = None,
        min_score: float | None = None,
    ) -> list[Match]:
        """Candidates for re-ranking: the global matches fused (reciprocal-rank fusion) with the top n of the visual
        words when the index keeps them, each with its `stage`; the first max(n, len(global_matches)) of the fusion
        (so re-ranking N costs what it did without words); without visual words, the global matches."""
        from .spatial.fusion import fuse

        words = self.word_matches(query_features, n, vector)
        if min_score is not None:
            words = [m for m in words if m.score >= min_score]
        by_id = {m.id: m for m in words}
        by_id.update({m.id: m for m in global_matches})
        out = []
        for c in fuse([m.id for m in global_matches], [m.id for m in words], max(n, len(global_matches))):
            m = by_id[c.id]
            out.append(Match(m.path, m.score, m.id, m.inliers, m.time_s, c.stage))
        return out

    def rerank(self, query: Any, matches: list[Match], k: int | None = None) -> list[Match]:
        """`matches` re-ordered by geometric verification against `query` (a path, bytes, PIL image, array or
        id), each with its `inliers`; the first `k` are returned."""
        return self.prepare_rerank(query, matches).run(k)[0]

    def prepare_rerank(
        self, query: Any, matches: list[Match], may_read: Callable[[str], bool] | None = None, qf: Any = None
    ) -> RerankJob:
        """The index reads of a re-ranking (candidates' rows, the query's stored features), so that the slow part,
        `RerankJob.run`, needs no access to the store (a server runs it without holding its lock). `may_read(path)`
        says which indexed files may be read for features that are not stored; `qf`: the query's features when
        they are at hand."""
        from .spatial.local_features import require_cv2
        from .spatial.rerank import FeatureSource

        require_cv2()
        if self._features is None:
            self._features = FeatureSource(self.store.path)
        self._features._db()  # opened here, by the thread that owns the store
        rows = self.store.rows([m.id for m in matches])
        live = [m for m in matches if m.id in rows]
        items = [(rows[m.id].sha256, rows[m.id].path) for m in live]
        if qf is None:
            qrow = self._query_row(query)
            qf = self._features.features([(qrow.sha256, qrow.path)], may_read)[0] if qrow is not None else None
        return RerankJob(self._features, query, qf, live, items, may_read)

    def _query_row(self, query: Any) -> Any:
        """The index row a query names: an id, or the path (or URL) of an indexed file that has not changed since."""
        if isinstance(query, (int, np.integer)):
            return self.store.rows([int(query)]).get(int(query))
        if isinstance(query, str) and is_url(query):
            from .sources.remote import stat_object

            row = self.store.row_by_path(query.rstrip("/"))
            try:
                return row if row is not None and stat_object(query) == (row.size, row.mtime_ns) else None
            except (OSError, ValueError):
                return None
        if isinstance(query, (str, Path)):
            p = Path(query).expanduser()
            row = self.store.row_by_path(os.path.abspath(p))
            if row is not None and p.exists():
                st = p.stat()
                if st.st_size == row.size and st.st_mtime_ns == row.mtime_ns:
                    return row
        return None

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        min_score: float | None = None,
        first_id: int | None = None,
        nprobe: int | None = None,
        exact: bool = False,
    ) -> list[list[Match]]:
        """The k nearest indexed images to each query vector (n, dim); normalised here if they are not."""
        if k < 1:
            raise BadInputError("k must be at least 1")
        gen = self.store.generation  # read once: the checks below and the search see one committed state
        vectors = _checked_vectors(queries, int(self.store.signature_at(gen)["dim"]), "query vectors")
        shas = self._videos(gen)
        fetch = k + min(len(shas), 4 * k)  # whole-video rows are dropped from the hits: room for them
        scores, ids = self.store.search(vectors, fetch, param=nprobe, exact=exact, gen=gen)
        paths = self.store.paths(set(ids[ids >= 0].tolist()))
        out = []
        for srow, irow in zip(scores.tolist(), ids.tolist(), strict=True):
            hits = [
                Match(paths[i], min(1.0, max(-1.0, s)), i)
                for s, i in zip(srow, irow, strict=True)
                if i >= 0 and i in paths and (min_score is None or s >= min_score)
            ]
            # Exact duplicates tie at 1.0: the query's own entry goes first.
            hits.sort(key=lambda m: (-round(m.score, 6), m.id != first_id, m.path))
            out.append(hits)
        return self._with_video_frames(vectors, k, min_score, out, first_id) if shas else out

    def _videos(self, gen: int | None = None) -> set[str]:
        """Content hashes of the indexed videos, read once per generation (`gen`, when the caller just read it)."""
        gen = self.store.generation if gen is None else gen
        if self._video_cache is None or self._video_cache[0] != gen:
            self._video_cache = (gen, video_shas(self.store))
        return self._video_cache[1]

    def _is_video(self, query: Any) -> bool:
        """Whether a query (an id or a path) is a video: it is then answered by aligning frame sequences."""
        if isinstance(query, (int, np.integer)):
            row = self.store.rows([int(query)]).get(int(query))
            return row is not None and row.sha256 in self._videos()
        if not isinstance(query, (str, Path)):
            return False
        from .images import sniff_format

        try:
            return sniff_format(Path(query).expanduser()) == "VIDEO"
        except OSError:
            return False

    def _with_video_frames(
        self, vectors: np.ndarray, k: int, min_score: float | None, hits: list[list[Match]], first_id: int | None
    ) -> list[list[Match]]:
        """Image hits without whole-video rows, merged with the best frame of each video (its time in `time_s`)."""
        shas = self._videos()
        scores, fids = search_frames(self.store, vectors, k * 5)
        owners = frame_owner(self.store, [int(f) for f in np.unique(fids) if f >= 0])
        live: dict[str, list[Any]] = {}
        for r in self.store.rows_by_sha({sha for sha, _ in owners.values()}):
            live.setdefault(r.sha256, []).append(r)
        rows = self.store.rows({m.id for h in hits for m in h})
        out = []
        for h, srow, frow in zip(hits, scores, fids, strict=True):
            merged = [m for m in h if m.id in rows and rows[m.id].sha256 not in shas]
            seen: set[int] = set()
            for sc, f in zip(srow, frow, strict=True):
                if f < 0 or int(f) not in owners or (min_score is not None and sc < min_score):
                    continue
                sha, t = owners[int(f)]
                for r in live.get(sha, []):
                    if r.id not in seen:  # frames come best first: the first one of a video is its best
                        seen.add(r.id)
                        merged.append(Match(r.path, float(min(1.0, max(-1.0, sc))), r.id, time_s=t))
            merged.sort(key=lambda m: (-round(m.score, 6), m.id != first_id, m.path))
            out.append(merged[:k])
        return out

    def search_video(self, query: str | Path | int, k: int = 10, min_score: float | None = None) -> list[Match]:
        """Indexed videos that are copies of (or contain) the query video, best aligned first.

        Each candidate found by frame similarity is aligned with the query (see `index.videos.align`): its score is
        the share of the shorter video's frames that match at one time offset times their mean similarity, and its
        `time_s` is where the query starts in it."""
        row = self._query_row(query)
        stored = videos(self.store, [row.sha256]) if row is not None else {}
        if row is not None and row.sha256 in stored:
            qt, qv = stored[row.sha256].times, frame_vectors(self.store, stored[row.sha256].frame_ids)
        else:
            if not isinstance(query, (str, Path)):
                raise BadInputError(f"no video with id {query} in the index")
            _, times, qv = self.embedder.embed_video(Path(query).expanduser())
            qt = np.asarray(times)
        _, fids = search_frames(self.store, qv, 10)
        owners = frame_owner(self.store, [int(f) for f in np.unique(fids) if f >= 0])
        cands = videos(self.store, {sha for sha, _ in owners.values()})
        scored = []
        for sha, v in cands.items():
            a = align(qt, qv, v.times, frame_vectors(self.store, v.frame_ids))
            if a.coverage > 0 and (min_score is None or a.score >= min_score):
                scored.append((sha, a))
        rows = self.store.rows_by_sha({sha for sha, _ in scored})
        by_sha: dict[str, list[Any]] = {}
        for r in rows:
            by_sha.setdefault(r.sha256, []).append(r)
        out = [Match(r.path, a.score, r.id, time_s=max(0.0, a.offset))
               for sha, a in scored for r in by_sha.get(sha, [])]  # fmt: skip
        out.sort(key=lambda m: (-round(m.score, 6), m.id != (row.id if row else None), m.path))
        return out[:k]

    def _self_id(self, query: Any) -> int | None:
        if isinstance(query, (int, np.integer)):
            return int(query)
        if isinstance(query, str) and is_url(query):
            row = self.store.row_by_path(query)
            return row.id if row else None
        if isinstance(query, (str, Path)):
            row = self.store.row_by_path(os.path.abspath(Path(query).expanduser()))
            return row.id if row else None
        return None

    def add_vectors(
        self, paths: list[str], vectors: np.ndarray, roots: list[str | Path] | None = None
    ) -> dict[str, int]:
        """Add embeddings computed elsewhere: `vectors` (n, dim) float32 for `paths` (which need not exist here).

        Vectors are L2-normalised if they are not; a path already in the index has its vector replaced. Wrong
        shapes, NaNs or a path count that differs: a clear error and nothing written. Holds the write lock.
        `roots`: the folders the paths belong to, recorded as the index's roots (the server serves files inside
        its roots only); a path outside them is refused and nothing is written.
        """
        import hashlib

        paths = [str(p) for p in paths]
        if roots is not None:
            check_within_roots(paths, roots)
        arr = np.asarray(vectors)  # may be a memory map: checked and normalised chunk by chunk, never copied whole
        if arr.ndim != 2 or arr.shape[1] != self.store.dim:
            raise BadInputError(f"vectors have shape {tuple(arr.shape)}; this index takes (n, {self.store.dim})")
        if len(paths) != len(arr):
            raise BadInputError(f"{len(paths)} paths for {len(arr)} vectors")
        if len(set(paths)) != len(paths):
            raise BadInputError("the same path is given twice")
        if any(not p for p in paths):
            raise BadInputError("empty path")
        step = 50_000
        for a in range(0, len(arr), step):  # everything is checked before anything is written
            _checked_vectors(arr[a : a + step], self.store.dim, "vectors")
        self.store.acquire_lock()
        added = replaced = 0
        try:
            if roots:
                self.store.add_roots([str(r) for r in roots])
            for a in range(0, len(paths), step):
                chunk = _checked_vectors(arr[a : a + step], self.store.dim, "vectors")
                with self.store.transaction() as txn:
                    for p, v in zip(paths[a : a + step], chunk, strict=True):
                        row = self.store.row_by_path(p)
                        digest = "vector:" + hashlib.sha256(v.tobytes()).hexdigest()[:56]
                        if row is not None:
                            txn.replace_vector(row.id, 0, 0, digest, None, None, v)
                            replaced += 1
                        else:
                            txn.insert(p, 0, 0, digest, None, None, v)
                            added += 1
            self.store.save()
        finally:
            self.store.release_lock()
        return {"added": added, "replaced": replaced, "total": self.store.count()}

    def info(self) -> dict[str, Any]:
        m = dict(self.store.manifest)
        m["path"] = str(self.store.path)
        m["counts"] = {"images": self.store.count(), "failed": self.store.failed_count()}
        m["generation_committed"] = self.store.generation
        m["roots"] = self.store.roots
        search = m.get("search") or {}
        m["faiss_index"] = search.get("factory") or "Flat"  # the key format 1 had: the structure's FAISS type
        files = {f.name: f.stat().st_size for f in self.store.path.iterdir() if f.is_file()}
        n = max(1, m["counts"]["images"])
        total = sum(files.values())
        m["disk"] = {"total_bytes": total, "bytes_per_image": round(total / n), "files": files}
        from .spatial.feature_store import FEATURES_DB

        lf = sum(size for name, size in files.items() if name.startswith(FEATURES_DB))
        m["local_features"] = {"bytes": lf, "bytes_per_image": round(lf / n)} if lf else None
        if self.has_words():
            wi = self._word_index()
            m["visual_words"] = {**wi.settings(), **wi.disk_bytes()}
        return m


def _checked_vectors(x: Any, dim: int, what: str) -> np.ndarray:
    """(n, dim) float32, finite and L2-normalised, or a one-line BadInputError."""
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != dim:
        raise BadInputError(f"{what} have shape {tuple(np.shape(x))}; this index takes (n, {dim})")
    if a.dtype == np.float32 and len(a) == 1 and a.flags.c_contiguous:
        with np.errstate(over="ignore", invalid="ignore"):  # huge values overflow here: the full check scales them
            n2 = float(np.dot(a[0], a[0]))  # one query of our models' kind: finite and of unit length, checked at once
        if abs(n2 - 1.0) < 1e-6:  # (a NaN or an infinity fails this too)
            return a
    if not np.issubdtype(a.dtype, np.number):
        raise BadInputError(f"{what} are not numbers ({a.dtype})")
    a = np.ascontiguousarray(a, dtype=np.float32)
    # one pass, in float64 so that no finite float32 overflows: a NaN or infinity makes its row's sum non-finite
    sq = np.einsum("ij,ij->i", a, a, dtype=np.float64)
    if not np.isfinite(sq).all():
        raise BadInputError(f"{what} contain NaN or infinite values")
    if not sq.all():
        raise BadInputError(f"{what} contain an all-zero vector")
    unit = np.abs(sq - 1.0) < 1e-6  # rows already of unit length (our models' vectors) keep their exact bytes
    if unit.all():
        return a
    return np.ascontiguousarray(np.where(unit[:, None], a, a / np.sqrt(sq)[:, None]), dtype=np.float32)


class RerankJob:
    """One re-ranking, prepared by `SimIndex.prepare_rerank`: verifies candidates in order, in small chunks, so a
    time limit can stop it between chunks; unchecked candidates then keep their global order (no `inliers`)."""

    CHUNK = 16

    def __init__(self, features: Any, query: Any, qf: Any, live: list[Match], items: list[tuple[str, str]],
                 may_read: Callable[[str], bool] | None = None) -> None:  # fmt: skip
        self.features, self.query, self.qf, self.live, self.items = features, query, qf, live, items
        self.may_read = may_read

    def run(self, k: int | None = None, seconds: float | None = None) -> tuple[list[Match], dict[str, Any]]:
        """(re-ranked matches, first `k`; {"candidates", "checked", "complete"}). With `seconds`, candidates not
        reached by then are left unchecked, after the verified ones, in their global order."""
        import time

        from .images import ImageLoadError
        from .spatial.rerank import rerank_order, verify_candidates

        deadline = None if seconds is None else time.monotonic() + seconds
        qf = self.qf
        if qf is None and isinstance(self.query, (int, np.integer)):
            raise BadInputError(f"image {self.query}: its file cannot be read for re-ranking (gone, changed or not "
                                "served); search without rerank")  # fmt: skip
        if qf is None:
            source = str(Path(self.query).expanduser()) if isinstance(self.query, (str, Path)) else self.query
            try:
                qf = self.features.extract(source)
            except ImageLoadError as e:
                raise BadInputError(str(e)) from None
        inliers: list[int | None] = [None] * len(self.live)
        for a in range(0, len(self.live), self.CHUNK):
            if deadline is not None and time.monotonic() > deadline:
                break
            cands = self.features.features(self.items[a : a + self.CHUNK], self.may_read)
            for i, v in enumerate(verify_candidates(qf, cands), a):
                inliers[i] = v.inliers
        fused = any(m.stage is not None for m in self.live)  # unverified fused candidates: back in cosine order
        order = rerank_order([m.score for m in self.live], [n or 0 for n in inliers], rest_by_score=fused)
        out = [Match(self.live[i].path, self.live[i].score, self.live[i].id, inliers[i], stage=self.live[i].stage)
               for i in order]  # fmt: skip
        checked = sum(n is not None for n in inliers)
        info = {"candidates": len(self.live), "checked": checked, "complete": checked == len(self.live)}
        return (out if k is None else out[:k]), info


def check_within_roots(paths: list[str], roots: list[str | Path]) -> None:
    """A one-line BadInputError unless every root is an existing folder (or file) and every path, resolved (symlinks
    followed, relative to the current folder), lies inside one of them."""
    real_roots = []
    for r in roots:
        p = Path(r).expanduser()
        if not p.exists():
            raise BadInputError(f"root not found: {r}")
        real_roots.append(os.path.realpath(p))
    from .index.store import root_of

    for path in paths:
        if root_of(os.path.realpath(os.path.expanduser(path)), real_roots) is None:
            raise BadInputError(f"{path} is outside the given roots ({', '.join(real_roots)}); nothing imported")


def _require_file(path: Path) -> None:
    from .images import ImageLoadError, require_regular_file

    try:
        require_regular_file(path)
    except ImageLoadError as e:
        raise BadInputError(str(e)) from None


def _weights_label(w: str) -> str:
    return "none" if str(w).lower() in ("none", "random") else str(w).lower()


def _embed_kwargs(fit: str | None, precision: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if fit:
        kw["fit"] = fit
    if precision:
        kw["precision"] = precision
    return kw


def match_dicts(matches: list[Match]) -> list[dict[str, Any]]:
    return [m.to_json() for m in matches]


__all__ = ["SimIndex", "Match", "default_index_path", "SyncReport"]
