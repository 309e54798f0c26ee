"""Catalog lookup quality: phone photos (queries) against a catalog of clean images, measured per search stage.

A catalog folder holds one image per item (its file stem names the item, or a CSV maps queries to catalog images);
the queries folder holds photos of those items. Each query is searched the way `query --rerank N` searches, and
every stage is scored: the global ranking, the visual-words ranking, their fusion (what the re-ranker sees) and
the re-ranked result; optionally the old pipeline too (re-ranking the global top N only). Metrics: P@1, R@10,
R@50 (the right catalog image among the first 10 / 50) and milliseconds per query for each step.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BadInputError

STAGES = ("global", "words", "fused", "reranked", "reranked_global")
KS = (1, 10, 50)


@dataclass
class CatalogQuery:
    """One query image and the catalog paths that are right answers for it."""

    path: Path
    relevant: set[str]
    label: str = ""


@dataclass
class StageScores:
    """Ranks of the first right answer per query (None: not found) for one stage."""

    ranks: list[int | None] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        n = max(1, len(self.ranks))
        out: dict[str, Any] = {"queries": len(self.ranks)}
        for k in KS:
            hit = sum(r is not None and r < k for r in self.ranks) / n
            out["p_at_1" if k == 1 else f"r_at_{k}"] = round(hit, 4)
        out["found"] = round(sum(r is not None for r in self.ranks) / n, 4)  # anywhere in the list
        if self.candidates:
            out["candidates"] = round(float(np.mean(self.candidates)), 1)
        return out


def pair_by_stem(catalog: list[Path], queries: list[Path], mapping: Path | None = None) -> list[CatalogQuery]:
    """Queries paired with catalog images: the same file stem, or the CSV `mapping` (query,catalog per row, each a
    file name, stem or path); queries without a catalog image are refused with a one-line error."""
    by_stem: dict[str, set[str]] = {}
    for p in catalog:
        by_stem.setdefault(p.stem, set()).add(str(p))
    want: dict[str, str] = {}
    if mapping is not None:
        try:
            with open(mapping.expanduser(), newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            raise BadInputError(f"cannot read mapping {mapping}: {e}") from None
        if rows and [c.strip().lower() for c in rows[0][:2]] == ["query", "catalog"]:
            rows = rows[1:]
        for r in rows:
            if len(r) < 2:
                raise BadInputError(f"mapping {mapping}: each row needs query,catalog (got {','.join(r)!r})")
            want[Path(r[0].strip()).stem] = Path(r[1].strip()).stem
    out, missing = [], []
    for q in queries:
        label = want.get(q.stem, q.stem if mapping is None else "")
        rel = by_stem.get(label)
        if rel:
            out.append(CatalogQuery(q, rel, label))
        else:
            missing.append(q.name)
    if missing:
        how = f"in mapping {mapping}" if mapping else "with the same file stem in the catalog"
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInputError(f"{len(missing)} queries have no catalog image {how}: {', '.join(missing[:3])}{more}")
    if not out:
        raise BadInputError("no queries to evaluate")
    return out


def _first_hit(matches: list[Any], relevant: set[str]) -> int | None:
    return next((i for i, m in enumerate(matches) if m.path in relevant), None)


def evaluate_catalog(
    index: Any,
    queries: list[CatalogQuery],
    rerank: int = 50,
    baseline: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score each stage of a re-ranked search over `queries` against an open SimIndex (with local features).

    Returns {"stages": {stage: {p_at_1, r_at_10, r_at_50, found, ...}}, "ms_per_query": {...}, "queries": n}.
    `baseline` also re-ranks the global top `rerank` alone (the pipeline without visual words), for comparison.
    """
    stages = {s: StageScores() for s in STAGES if baseline or s != "reranked_global"}
    if not index.has_words():
        stages.pop("words")
    ms: dict[str, list[float]] = {"global": [], "words": [], "rerank": [], "total": []}
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        vec = index.vector_for(q.path)
        glob = index.search_vectors(vec[None], rerank)[0]
        t1 = time.perf_counter()
        qf = index.query_features(q.path)
        words = index.word_matches(qf, rerank, vec)
        t2 = time.perf_counter()
        fused = index.first_stage(vec, glob, rerank, qf)
        reranked = index.prepare_rerank(q.path, fused, qf=qf).run()[0]
        t3 = time.perf_counter()
        ms["global"].append(1000 * (t1 - t0))
        ms["words"].append(1000 * (t2 - t1))
        ms["rerank"].append(1000 * (t3 - t2))
        ms["total"].append(1000 * (t3 - t0))
        lists = {"global": glob, "words": words, "fused": fused, "reranked": reranked}
        if baseline:
            lists["reranked_global"] = index.prepare_rerank(q.path, glob, qf=qf).run()[0]
        me = os.path.abspath(q.path)  # a query that is itself indexed does not count as its own answer
        lists = {name: [m for m in found if m.path != me] for name, found in lists.items()}
        for name, st in stages.items():
            st.ranks.append(_first_hit(lists[name], q.relevant))
            st.candidates.append(len(lists[name]))
        if progress:
            progress(i + 1, len(queries))
    return {
        "queries": len(queries),
        "rerank": rerank,
        "stages": {name: st.summary() for name, st in stages.items()},
        "ms_per_query": {k: round(float(np.mean(v)), 1) if v else None for k, v in ms.items()},
    }


def format_table(result: dict[str, Any], title: str = "") -> str:
    """A text table: one row per stage with P@1, R@10, R@50 and the mean number of candidates."""
    lines = [title] if title else []
    lines.append(f"{'stage':<18}{'P@1':>8}{'R@10':>8}{'R@50':>8}{'found':>8}{'cands':>8}")
    for name, s in result["stages"].items():
        lines.append(f"{name:<18}{s['p_at_1']:>8.3f}{s['r_at_10']:>8.3f}{s['r_at_50']:>8.3f}{s['found']:>8.3f}"
                     f"{s.get('candidates', 0):>8.1f}")  # fmt: skip
    t = result["ms_per_query"]
    lines.append(f"ms per query (indicative): global {t['global']}, words {t['words']}, fuse+rerank {t['rerank']}, "
                 f"total {t['total']}")  # fmt: skip
    return "\n".join(lines)


def eval_catalog_cli(
    catalog: Path | None,
    queries: Path | None,
    mapping: Path | None = None,
    distractors: Path | None = None,
    index: Path | None = None,
    rerank: int = 50,
    backbone: list[str] | None = None,
    weights: str = "imagenet",
    folder: Path | None = None,
    as_json: bool = False,
) -> None:
    """`simsearch eval --catalog DIR --queries DIR`: index the catalog (with local features, so visual words too;
    in a temporary folder unless `index` is given), then print P@1, R@10, R@50 per stage."""
    import json
    import tempfile

    import typer

    from .api import SimIndex
    from .images import find_images
    from .progress import display

    if catalog is None or queries is None:
        raise BadInputError("catalog mode needs both --catalog DIR and --queries DIR")
    if folder is not None:
        raise BadInputError("catalog mode takes no FOLDER argument (use --catalog and --queries)")
    if backbone and len(backbone) > 1:
        raise BadInputError("catalog mode evaluates one --backbone at a time")
    dirs = [("catalog", catalog), ("queries", queries)] + ([("distractors", distractors)] if distractors else [])
    for what, d in dirs:
        if not d.expanduser().is_dir():
            raise BadInputError(f"{what} folder not found: {d}")
    if mapping is not None and not mapping.expanduser().is_file():
        raise BadInputError(f"mapping not found: {mapping}")
    catalog = Path(os.path.abspath(catalog.expanduser()))
    with tempfile.TemporaryDirectory(prefix="simsearch-catalog-") as tmp:
        path = index.expanduser() if index is not None else Path(tmp) / "index"
        items = list(find_images(catalog, exclude=[path]))
        photos = list(find_images(Path(os.path.abspath(queries.expanduser())), exclude=[path]))
        if not items or not photos:
            raise BadInputError(f"no images in {catalog if not items else queries}")
        pairs = pair_by_stem(items, photos, mapping)
        opts = {"backbone": backbone[0]} if backbone else {}
        if (path / "manifest.json").is_file():
            idx = SimIndex.open(path)
            idx.check_backbone({**opts, "weights": weights})
        else:
            idx = SimIndex.create(path, **opts, weights=weights)
        with idx, display() as shown:
            for d in [catalog] + ([distractors] if distractors else []):
                lf = lambda a, b: shown.update("local features", a, b, unit="img")  # noqa: E731
                idx.add_folder(d, progress=shown.images, local_features=True, features_progress=lf)
            res = evaluate_catalog(idx, pairs, rerank,
                                   progress=lambda a, b: shown.update("queries", a, b, unit="img"))  # fmt: skip
            res["catalog_images"] = len(idx)
    if as_json:
        typer.echo(json.dumps({"catalog": str(catalog), **res}))
        return
    title = f"catalog {catalog}: {res['catalog_images']} images, {res['queries']} queries, rerank {rerank}"
    typer.echo(format_table(res, title))
