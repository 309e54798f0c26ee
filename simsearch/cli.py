"""The `simsearch` command line: a thin layer over the Python API.

Exit codes: 0 success, 1 bad usage or input, 2 index missing or not matching, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from .errors import BadInputError, IndexNotFoundError, SimsearchError


class _Group(TyperGroup):
    """Maps every failure to a one-line message and our exit codes (click would use 2 for usage errors).

    Typer may bundle its own copy of click, so its exceptions are recognised by shape, not by import.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except SimsearchError as e:
            print(f"simsearch: error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            print("simsearch: interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as e:
            name = type(e).__name__
            if name == "Exit" and hasattr(e, "exit_code"):
                sys.exit(e.exit_code)
            if name == "Abort":
                print("simsearch: interrupted", file=sys.stderr)
                sys.exit(130)
            if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # usage errors, on one line
                ctx = getattr(e, "ctx", None)
                where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
                if e.format_message():  # empty when the help was shown for a bare `simsearch`
                    print(f"simsearch: error: {e.format_message()}{where}", file=sys.stderr)
                sys.exit(1)
            if os.environ.get("SIMSEARCH_DEBUG"):
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hint = "SIMSEARCH_DEBUG=1 shows the traceback"
            print(f"simsearch: unexpected error: {name}: {msg} ({hint})", file=sys.stderr)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_Group,
    help="Image similarity search and duplicate finding: index a folder, query similar images, clean duplicates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _emit(obj: dict[str, Any]) -> None:
    typer.echo(json.dumps(obj, indent=None, ensure_ascii=False))


def _resolve_index(index: Path | None) -> Path:
    if index is not None:
        return index.expanduser()
    home = Path.cwd() / "indexes"
    found = sorted(p for p in home.glob("*") if (p / "manifest.json").is_file()) if home.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise IndexNotFoundError("no index given and none under ./indexes; pass --index PATH")
    raise BadInputError(f"several indexes under ./indexes ({', '.join(p.name for p in found)}); pass --index PATH")


JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
IndexPath = Annotated[
    Path | None, typer.Option("--index", "-i", help="Index directory (default: the only one under ./indexes).")
]


def _calibration_sample(folder: Path, n: int = 64) -> list[str]:
    """Evenly spaced images of the folder: the representative set for int8 calibration."""
    from .images import find_images

    found = [str(p) for p in find_images(folder.expanduser())]
    step = max(1, len(found) // n)
    return found[::step][:n]


@app.command("index")
def index_cmd(
    folder: Annotated[
        str, typer.Argument(help="Folder of images to index (recursively), or an object-storage URL (s3://...).")
    ],
    index: Annotated[
        Path | None, typer.Option("--index", "-i", help="Index directory (default ./indexes/<folder name>).")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option("--backbone", "-b", help="Backbone name, .keras file or trained MODEL_DIR.")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", "-w", help="'imagenet', 'none', or a local weights file.")
    ] = None,
    pooling: Annotated[str | None, typer.Option("--pooling", help="rmac (default), avg, max or gem.")] = None,
    fit: Annotated[str | None, typer.Option("--fit", help="resize (whole image), crop (centre) or pad.")] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="fp32, fp16, int8 or auto (TFLite engine). A new index defaults to auto: fp16 where the "
            "CPU computes float16 natively (AVX512-FP16, Arm FP16), else fp32.",
        ),
    ] = None,
    engine: Annotated[str, typer.Option("--engine", help="auto (TFLite, else Keras), tflite or keras.")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per inference batch.")] = 32,
    input_size: Annotated[
        int | None, typer.Option("--input-size", min=32, help="Model input size (default: native).")
    ] = None,
    commit_every: Annotated[int, typer.Option("--commit-every", min=1, help="Commit to disk every N files.")] = 256,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Discard the index contents and re-embed everything.")
    ] = False,
    index_type: Annotated[
        str | None,
        typer.Option("--index-type", help="auto (default), flat, hnsw, ivf, ivfpq, or a FAISS factory string."),
    ] = None,
    memory_budget: Annotated[
        str | None, typer.Option("--memory-budget", help="Memory for the search structure, e.g. 2GB (auto type).")
    ] = None,
    ray: Annotated[
        str | None, typer.Option("--ray", help="Embed on Ray: local, auto or a cluster ADDRESS (simsearch[ray]).")
    ] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Ray workers (default one per node).")] = None,
    local_features: Annotated[
        bool,
        typer.Option(
            "--local-features",
            help="Also store local features and visual words (faster `query --rerank`, catalog lookup); kept in sync.",
        ),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Build or update (sync) an index of FOLDER. Run it again to add new, changed and removed files."""
    from .api import SimIndex, default_index_path
    from .index.store import IndexStore
    from .index.sync import SyncInterrupted
    from .sources import is_url

    if not is_url(folder):
        folder = str(Path(folder).expanduser())
        if not Path(folder).exists():
            raise BadInputError(f"folder not found: {folder}")
    elif precision == "int8":
        raise BadInputError("--precision int8 calibrates on a local folder; index object storage with fp32 or fp16")
    if ray is not None:  # before any model is built: say at once when Ray is missing
        from .index.distributed import require_ray

        require_ray()
    elif workers is not None:
        raise BadInputError("--workers goes with --ray")
    path = (index or default_index_path(folder)).expanduser()
    opts = {"backbone": backbone, "weights": weights, "pooling": pooling, "fit": fit, "precision": precision,
            "input_size": input_size}  # fmt: skip
    from .index.ann import parse_budget

    budget = parse_budget(memory_budget)
    if rebuild and IndexStore.exists(path):
        from .errors import IndexCorruptError

        try:
            IndexStore.open(path).close()
        except IndexCorruptError as e:  # --rebuild discards the contents anyway: start from the empty index
            print(f"simsearch: warning: {e}; rebuilding it from scratch", file=sys.stderr)
            IndexStore.discard(path)
    if IndexStore.exists(path):
        idx = SimIndex.open(path, engine=engine, batch_size=batch_size)
        if rebuild:
            idx.rebuild(opts)
        else:
            idx.check_backbone(opts)
        if index_type is not None or memory_budget is not None:
            idx.store.set_index_type(index_type or idx.store.index_type, budget)
    else:
        rep = _calibration_sample(Path(folder)) if precision == "int8" else None
        idx = SimIndex.create(path, **{k: v for k, v in opts.items() if v is not None}, engine=engine,
                              batch_size=batch_size, representative=rep, index_type=index_type or "auto",
                              memory_budget=budget)  # fmt: skip
    from .progress import display

    with idx, display() as shown:
        try:
            report = idx.add_folder(
                folder,
                progress=shown.images,
                commit_every=commit_every,
                ray=ray,
                workers=workers,
                local_features=local_features or None,
                features_progress=lambda d, t: shown.update("local features", d, t, unit="img"),
            )
        except SyncInterrupted as e:
            r = e.report
            print(
                f"simsearch: interrupted; {r.indexed} images committed ({r.total} found). "
                f"Run the same command again to resume.",
                file=sys.stderr,
            )
            if as_json:
                _emit(r.to_json())
            raise typer.Exit(130) from None
    if report.recovered:
        from .dedup.journal import recovery_message

        for line in recovery_message(report.recovered):
            print(f"simsearch: {line}", file=sys.stderr)
    if as_json:
        _emit(report.to_json())
        return
    rate = report.embedded / report.seconds if report.seconds else 0.0
    typer.echo(
        f"Indexed {report.total} images in {report.seconds:.1f} s into {report.index}: "
        f"{report.added} added, {report.updated} updated, {report.removed} removed, "
        f"{report.unchanged} unchanged, {report.moved} moved, {len(report.skipped)} skipped "
        f"({report.embedded} embedded, {rate:.1f} img/s)."
    )
    if report.local_features:
        lf = report.local_features
        typer.echo(f"Local features: {lf['extracted']} extracted, {lf['pruned']} dropped, {lf['stored']} stored "
                   f"({lf['bytes_per_image']} bytes per image).")  # fmt: skip
        if lf.get("words"):
            w = lf["words"]
            trained = ", vocabulary trained" if w["trained"] else ""
            typer.echo(f"Visual words: {w['added']} added, {w['dropped']} dropped, {w['docs']} images, "
                       f"{w['words']} words ({w['bytes_per_image']} bytes per image{trained}).")  # fmt: skip
    if report.ray and report.ray["shards"]:
        typer.echo(f"Embedded on Ray at {report.ray['address']}: {report.ray['workers']} workers, "
                   f"{report.ray['shards']} shards.")  # fmt: skip
    for s in report.skipped[:20]:
        typer.echo(f"  skipped {s['path']}: {s['error']}", err=True)
    if len(report.skipped) > 20:
        typer.echo(f"  ... and {len(report.skipped) - 20} more (see --json)", err=True)


@app.command("query")
def query_cmd(
    images: Annotated[list[str], typer.Argument(help="Query image file(s) or object URLs, indexed or not.")],
    index: IndexPath = None,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Number of neighbours.")] = 10,
    min_score: Annotated[float | None, typer.Option("--min-score", help="Only matches with cosine >= this.")] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="auto, tflite or keras (for images not in the index).")
    ] = "auto",
    nprobe: Annotated[
        int | None, typer.Option("--nprobe", min=1, help="Lists (IVF) or efSearch (HNSW) to search; default: tuned.")
    ] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Search every stored vector exactly.")] = False,
    rerank: Annotated[
        int,
        typer.Option(
            "--rerank",
            min=0,
            help="Verify the top N geometrically (same object/scene first), plus the top N by visual words when the "
            "index keeps local features; 0 = off.",
        ),
    ] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Find the indexed images most similar to each IMAGE (cosine similarity, 1.0 = identical)."""
    from .api import SimIndex
    from .images import ImageLoadError, require_regular_file
    from .sources import is_url

    queries: list[str | Path] = [q if is_url(q) else Path(q).expanduser() for q in images]
    for img in queries:  # before the index and the model are loaded: a FIFO or a folder is refused at once
        if isinstance(img, str):
            continue
        try:
            require_regular_file(img)
        except ImageLoadError as e:
            raise BadInputError(f"query image {e}" if e.reason == "file not found" else str(e)) from None
    with SimIndex.open(_resolve_index(index), engine=engine) as idx:
        results = []
        for img in queries:
            matches = idx.search(img, k=k, min_score=min_score, nprobe=nprobe, exact=exact, rerank=rerank)
            shown = img if isinstance(img, str) else os.path.abspath(img)
            results.append({"query": shown, "matches": [m.to_json() for m in matches]})
    if as_json:
        _emit({"results": results})
        return
    for r in results:
        typer.echo(f"query: {r['query']}")
        if not r["matches"]:
            typer.echo("  (no matches)")
        for rank, m in enumerate(r["matches"], 1):
            inl = f"  {m['inliers']:>4} inliers" if "inliers" in m else ""
            stage = f"  {m['stage']:<6}" if "stage" in m else ""
            typer.echo(f"  {rank:>3}  {m['score']:.4f}{inl}{stage}  {m['path']}")


@app.command("info")
def info_cmd(
    index: IndexPath = None,
    as_json: JsonFlag = False,
) -> None:
    """Show an index's model, counts and files."""
    from .api import SimIndex

    with SimIndex.open(_resolve_index(index)) as idx:
        data = idx.info()
    if as_json:
        _emit(data)
        return
    for key in ("path", "backbone", "weights", "input_size", "pooling", "fit", "precision", "dim", "index_type",
                "created", "updated"):  # fmt: skip
        typer.echo(f"{key + ':':<13}{data.get(key)}")
    search = data.get("search") or {}
    tuned = (
        f", {search['param']} {search['value']} (recall@10 {search.get('recall_at_10')})" if search.get("param") else ""
    )
    typer.echo(f"{'search:':<13}{search.get('kind')} {search.get('factory') or ''}{tuned}".rstrip())
    typer.echo(f"{'disk:':<13}{data['disk']['bytes_per_image']} bytes per image ({data['disk']['total_bytes']} in all)")
    if data.get("local_features"):
        typer.echo(f"{'local feat.:':<13}{data['local_features']['bytes_per_image']} bytes per image (query --rerank)")
    if data.get("visual_words"):
        w = data["visual_words"]
        typer.echo(f"{'vis. words:':<13}{w['words']} words, {w['docs']} images, {w['bytes_per_image']} bytes per image")
    typer.echo(f"{'images:':<13}{data['counts']['images']}")
    typer.echo(f"{'failed:':<13}{data['counts']['failed']}")


@app.command("backbones")
def backbones_cmd(
    as_json: JsonFlag = False,
) -> None:
    """List the available backbones: name, embedding size, input size, weights available offline."""
    from .models.backbones import DEFAULT_BACKBONE, list_backbones

    rows = list_backbones()
    if as_json:
        _emit({"default": DEFAULT_BACKBONE, "backbones": [
            {"name": b.name, "family": b.family, "dim": b.dim, "input_size": b.input_size,
             "offline": b.offline} for b in rows]})  # fmt: skip
        return
    typer.echo(f"{'name':<22}{'dim':>6}{'input':>7}  weights offline")
    for b in rows:
        mark = "yes" if b.offline else "no (downloads on first use)"
        default = "  (default)" if b.name == DEFAULT_BACKBONE else ""
        typer.echo(f"{b.name:<22}{b.dim or '?':>6}{b.input_size:>7}  {mark}{default}")


@app.command("dedup")
def dedup_cmd(
    index: IndexPath = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", "-t", help="Near-duplicate cosine threshold.")
    ] = None,
    group: Annotated[
        str, typer.Option("--group", help="connected, or star: every member within T of the kept file.")
    ] = "connected",
    keep: Annotated[
        str | None, typer.Option("--keep", help="Ordered keep rules (default resolution,size,oldest,shortest-path).")
    ] = None,
    prefer: Annotated[
        list[Path] | None,
        typer.Option("--prefer", help="Folder whose files are always kept, never touched (repeatable)."),
    ] = None,
    exact_only: Annotated[bool, typer.Option("--exact-only", help="Only byte-identical copies.")] = False,
    rotations: Annotated[
        bool, typer.Option("--rotations", help="Also match copies rotated 90/180/270 or mirrored.")
    ] = False,
    verify: Annotated[
        bool | None,
        typer.Option(
            "--verify/--no-verify",
            help="--verify: confirm every near-duplicate pair geometrically (crops and edits kept, look-alikes "
            "dropped). --no-verify: cosine alone. Default: verify the uncertain band (see README).",
        ),
    ] = None,
    action: Annotated[
        str, typer.Option("--action", help="report, move (to --to DIR) or delete (into a trash folder).")
    ] = "report",
    to: Annotated[Path | None, typer.Option("--to", help="Destination folder for --action move.")] = None,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Carry out the action (without it only the plan is printed).")
    ] = False,
    permanent: Annotated[
        bool, typer.Option("--permanent", help="With --action delete: remove files for good (no undo).")
    ] = False,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write a static HTML review page.")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the groups as CSV.")] = None,
    explain: Annotated[
        tuple[str, str] | None,
        typer.Option("--explain", help="Score two files and say whether they are copies, other shots, or neither."),
    ] = None,
    similar: Annotated[
        bool,
        typer.Option("--similar/--no-similar", help="Also report other shots of one scene (bursts, re-shoots)."),
    ] = True,
    include_similar: Annotated[
        bool,
        typer.Option("--include-similar", help="--action also removes other shots, keeping each scene's best shot."),
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Find copies (exact and near) and other shots of one scene (similar); report them, or move/delete the extra
    copies (undoable). Other shots are only touched with --include-similar."""
    from .api import SimIndex
    from .dedup.actions import apply_plan, plan_action
    from .dedup.finder import explain_pair, find_duplicates

    prefer = prefer or []
    if permanent and action != "delete":
        raise BadInputError("--permanent only goes with --action delete")
    with SimIndex.open(_resolve_index(index)) as idx:
        if explain:
            text, data = explain_pair(idx, explain[0], explain[1], threshold, verify)
            _emit(data) if as_json else typer.echo(text)
            return
        prefs = [str(p) for p in prefer]
        from .progress import display

        with display() as shown:
            report = find_duplicates(idx.store, threshold, group=group, keep=keep, prefer=prefs, near=not exact_only,
                                     rotations=idx.embedder if rotations else None, progress=shown.stage,
                                     verify=verify, similar=similar or include_similar,
                                     verify_progress=lambda d, n: shown.update("comparing pairs", d, n,
                                                                               unit="pairs"))  # fmt: skip
        plan = plan_action(report, action, to, idx.store, prefer=prefs, permanent=permanent,
                           include_similar=include_similar)  # fmt: skip
        if html_out:
            from .dedup.report import write_html

            typer.echo(f"wrote {write_html(report, idx.store, html_out)}", err=True)
        if csv_out:
            from .dedup.report import write_csv

            typer.echo(f"wrote {write_csv(report, idx.store, csv_out)}", err=True)
        undo_file = apply_plan(plan, idx.store) if (yes and plan.moves) else None
    if as_json:
        out = report.to_json()
        if action != "report":
            out["action"] = {"name": action, "applied": undo_file is not None, "moves": plan.to_json(),
                             "undo": str(undo_file) if undo_file else None}  # fmt: skip
        _emit(out)
        return
    for g in report.groups:
        if g.kind == "similar":
            typer.echo(f"similar group: other shots of one scene, not copies ({len(g.files)} files, min score "
                       f"{g.min_score:.4f}; best shot first):")  # fmt: skip
        else:
            typer.echo(f"{g.kind} group ({len(g.files)} files, min score {g.min_score:.4f}):")
        for k, (f, sc) in enumerate(zip(g.files, g.scores, strict=True)):
            mark = ("best" if k == 0 else "    ") if g.kind == "similar" else ("keep" if f == g.keep else "    ")
            shot = g.shots[k] if g.shots and g.shots[k] else None
            extra = f"  (sharpness {shot['sharpness']:.0f}, clipped {shot['clipped']:.1%})" if shot else ""
            typer.echo(f"  {mark}  {sc:.4f}  {f}{extra}")
    n_exact = sum(g.kind == "exact" for g in report.groups)
    n_similar = sum(g.kind == "similar" for g in report.groups)
    if report.verified:
        v = report.verified
        above = ""
        if v["accept_above"] and v["accepted_unchecked"]:
            above = f"; {v['accepted_unchecked']} at {v['accept_above']} or more kept unchecked"
        typer.echo(f"verified {v['checked']} pairs: {v['confirmed']} confirmed, {v['dropped']} dropped "
                   f"({v['implied']} implied by confirmed pairs; {v['no_verdict']} without a verdict, judged by "
                   f"cosine{above}).")  # fmt: skip
    if report.tiers:
        t = report.tiers
        typer.echo(f"tiers of {t['pairs']} candidate pairs: {t['copies']} copies ({t['implied']} implied by other "
                   f"copies), {t['similar']} other shots of one scene; {t['local_features']} needed local "
                   f"features.")  # fmt: skip
    typer.echo(
        f"{len(report.groups)} groups ({n_exact} exact, {len(report.groups) - n_exact - n_similar} near at threshold "
        f"{report.threshold}, {n_similar} similar); {report.duplicates} files could be removed."
    )
    if n_similar:
        verb = "are included in the action" if include_similar else "are kept unless you add --include-similar"
        typer.echo(f"{report.similar_files} other shots (similar groups, not copies) {verb}.")
    if action != "report":
        verb = "deleted for good" if permanent else ("moved to the trash" if action == "delete" else f"moved to {to}")
        if undo_file:
            typer.echo(f"{len(plan.moves)} files {verb}. Undo with: simsearch undo {undo_file}")
        else:
            for src, dst in plan.moves:
                typer.echo(f"  would move {src} -> {dst}" if dst else f"  would delete {src}")
            typer.echo(f"Plan only: {len(plan.moves)} files would be {verb}. Add --yes to do it.")


@app.command("undo")
def undo_cmd(
    manifest: Annotated[Path, typer.Argument(help="Undo manifest written by dedup --action move/delete.")],
    as_json: JsonFlag = False,
) -> None:
    """Put back the files a dedup action moved or trashed, and their index entries."""
    from .dedup.actions import undo

    if not manifest.expanduser().is_file():
        raise BadInputError(f"undo manifest not found: {manifest}")
    res = undo(manifest)
    if as_json:
        _emit(res)
        return
    typer.echo(f"restored {res['restored']} files ({res['reindexed']} re-added to the index)")
    for m in res["missing"]:
        typer.echo(f"  missing, not restored: {m}", err=True)
    for c in res["conflicts"]:
        typer.echo(f"  left at {c['at']}, not restored to {c['path']}: {c['reason']}", err=True)
    if res["permanently_deleted"]:
        typer.echo(f"  {res['permanently_deleted']} files were deleted permanently and cannot be restored", err=True)


@app.command("import")
def import_cmd(
    vectors: Annotated[Path, typer.Argument(help="A .npy file of float32 vectors, shape (n, dim).")],
    paths: Annotated[Path, typer.Argument(help="A text file of n paths, one per line (they need not exist here).")],
    index: Annotated[Path, typer.Option("--index", "-i", help="Index directory (created if missing).")],
    backbone: Annotated[
        str, typer.Option("--backbone", help="Name recorded for a new index's vectors (they are not checked).")
    ] = "external",
    index_type: Annotated[str, typer.Option("--index-type", help="For a new index: auto, flat, ivf, ...")] = "auto",
    root: Annotated[
        list[Path] | None,
        typer.Option("--root", help="Folder of the paths (repeatable): recorded; paths outside are refused."),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Add embeddings computed elsewhere; a path already indexed gets the new vector."""
    import numpy as np

    from .api import SimIndex, check_within_roots
    from .index.store import IndexStore

    for f in (vectors, paths):
        if not f.expanduser().is_file():
            raise BadInputError(f"file not found: {f}")
    try:
        arr = np.load(vectors.expanduser(), mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot read {vectors} as a .npy array: {e}") from None
    names = [line.rstrip("\n") for line in paths.expanduser().read_text(encoding="utf-8").splitlines() if line.strip()]
    if arr.ndim != 2:
        raise BadInputError(f"{vectors} has shape {arr.shape}; expected (n, dim)")
    roots = [r.expanduser() for r in root] if root else None
    if roots:
        check_within_roots(names, roots)  # before the index is created: a refused import leaves nothing behind
    path = index.expanduser()
    if IndexStore.exists(path):
        idx = SimIndex.open(path)
    else:
        sig = {"backbone": backbone, "weights": "external", "weights_digest": f"external-{backbone}",
               "input_size": 0, "pooling": "external", "dim": int(arr.shape[1]), "fit": "external",
               "precision": "external"}  # fmt: skip
        from .index.ann import INDEX_TYPES, check_factory

        if index_type not in INDEX_TYPES:
            check_factory(index_type, int(arr.shape[1]))
        idx = SimIndex(IndexStore.create(path, sig, index_type=index_type))
    with idx:
        res = idx.add_vectors(names, arr, roots=roots)
    if as_json:
        _emit({"index": str(path.absolute()), **res})
    else:
        typer.echo(f"Imported {len(names)} vectors into {path.absolute()}: {res['added']} added, "
                   f"{res['replaced']} replaced; {res['total']} in the index.")  # fmt: skip


@app.command("verify")
def verify_cmd(
    index: IndexPath = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Rebuild a damaged search structure from the stored vectors.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Check every part of an index: database, vectors (per-row checksums), search structure (sha256)."""
    from .index.verify import verify

    res = verify(_resolve_index(index), repair=repair)
    if as_json:
        _emit(res)
    else:
        for c in res["checks"]:
            typer.echo(f"  {'ok ' if c['ok'] else 'BAD'}  {c['name']}: {c['detail']}")
        typer.echo(f"{'index is sound' if res['ok'] else 'index is damaged'}: {res['path']}")
    if not res["ok"]:
        raise typer.Exit(2)


@app.command("train")
def train_cmd(
    folder: Annotated[Path, typer.Argument(help="Labelled images: one subfolder per label (or --labels CSV).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="MODEL_DIR to write (refused if it exists).")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Base backbone name or .keras file.")] = (
        "efficientnet-lite0"
    ),
    weights: Annotated[str, typer.Option("--weights", "-w", help="'imagenet', 'none', or a weights file.")] = (
        "imagenet"
    ),
    mode: Annotated[str, typer.Option("--mode", help="head (backbone frozen) or finetune (also its last block).")] = (
        "head"
    ),
    dim: Annotated[int, typer.Option("--dim", min=2, help="Embedding size of the trained head.")] = 256,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Most epochs (default 60 head, 10 finetune).")
    ] = None,
    val_split: Annotated[float, typer.Option("--val-split", help="Share held out for validation.")] = 0.2,
    split_by: Annotated[
        str, typer.Option("--split", help="labels (hold out whole labels: new items) or images (of every label).")
    ] = "labels",
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV of path,label instead of subfolders.")] = None,
    loss: Annotated[
        str, typer.Option("--loss", help="ms (multi-similarity), proxy (normalised softmax) or proxy-anchor.")
    ] = "ms",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, initialisation and augmentation.")] = 0,
    input_size: Annotated[int | None, typer.Option("--input-size", min=32, help="Model input size.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    refit: Annotated[
        bool, typer.Option("--refit/--no-refit", help="After selection on held-out labels, retrain on all labels.")
    ] = True,
    whiten: Annotated[float, typer.Option("--whiten", help="PCA whitening of the head's start, 0 (off) to 1.")] = 1.0,
    augment: Annotated[
        str, typer.Option("--augment", help="finetune views: light (crop, flip, colour) or viewpoint (+ perspective).")
    ] = "light",
    unfreeze: Annotated[
        str,
        typer.Option(
            "--unfreeze",
            help="finetune: least share of weights trained (0.25: Lite0's last block); a comma list, or auto "
            "(0.25,0.5), tries each cut and keeps the best on held-out labels.",
        ),
    ] = "auto",
    views: Annotated[int, typer.Option("--views", min=1, help="finetune: cached views per image.")] = 4,
    head_views: Annotated[
        int, typer.Option("--head-views", min=0, help="head: augmented views per image (features cached).")
    ] = 0,
    pooling: Annotated[str, typer.Option("--pooling", help="Backbone pooling under the head: rmac, avg, max, gem.")] = (
        "rmac"
    ),
    tta: Annotated[
        str,
        typer.Option("--tta", help="Test-time views the model averages: none, flip, flip-crop (4x embed time)."),
    ] = "flip-crop",
    as_json: JsonFlag = False,
) -> None:
    """Adapt a backbone to your labelled images; the MODEL_DIR then works as --backbone everywhere."""
    from .progress import display
    from .training.trainer import train

    if not folder.expanduser().is_dir():
        raise BadInputError(f"folder not found: {folder}")
    with display() as shown:
        res = train(folder, out, backbone=backbone, weights=weights, mode=mode, dim=dim, epochs=epochs,
                    val_split=val_split, split_by=split_by, seed=seed, labels=labels, loss=loss,
                    overwrite=overwrite, input_size=input_size, progress=shown.train, refit=refit,
                    whiten=whiten, augment=augment, unfreeze=unfreeze, views=views,
                    head_views=head_views, pooling=pooling, tta=tta)  # fmt: skip
    if as_json:
        _emit(res.to_json())
    else:
        m, t = res.manifest["metrics"], res.manifest["training"]
        typer.echo(
            f"Trained {t['mode']} ({t['loss']} loss) on {t['split']['train_images']} images in {res.seconds:.1f} s "
            f"into {res.model_dir}: held-out mAP {m['val_map_before']:.4f} -> {m['val_map']:.4f}, "
            f"P@1 {m['val_p_at_1_before']:.4f} -> {m['val_p_at_1']:.4f} (best epoch {t['best_epoch']} of "
            f"{t['epochs_run']}, {t['best_phase']})."
        )
        c, r = res.chosen, t.get("refit") or {}
        ft = f" + finetune {c['finetune_epochs']} epochs (cut {c['cut']})" if c.get("finetune_epochs") else ""
        again = f"refit on all {r['images']} images of {r['labels']} labels" if r.get("done") else "no refit"
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in res.timings.items())
        views = "" if c.get("tta", "none") == "none" else f" Test-time views averaged: {c['tta']}."
        typer.echo(f"Chose {c['mode']}: head {c['head_epochs']} epochs{ft}; {again}.{views} Time per phase: {phases}.")
        for w in res.warnings:
            typer.echo(f"simsearch: warning: {w}", err=True)
        typer.echo(f"Index with it: simsearch index FOLDER --backbone {res.model_dir}")
    if res.interrupted:
        typer.echo(f"simsearch: interrupted; the best model so far is saved in {res.model_dir}", err=True)
        raise typer.Exit(130)


@app.command("eval")
def eval_cmd(
    folder: Annotated[
        Path | None, typer.Argument(help="Labelled images: one subfolder per label (or --labels CSV).")
    ] = None,
    backbone: Annotated[
        list[str] | None, typer.Option("--backbone", "-b", help="Backbone name or MODEL_DIR (repeatable).")
    ] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV of path,label instead of subfolders.")] = None,
    target_precision: Annotated[
        float, typer.Option("--target-precision", help="Precision the same-label threshold must reach.")
    ] = 0.99,
    weights: Annotated[str, typer.Option("--weights", "-w", help="Weights of registry backbones.")] = "imagenet",
    heldout: Annotated[
        Path | None, typer.Option("--heldout", help="Evaluate only the validation files of this MODEL_DIR.")
    ] = None,
    as_json: JsonFlag = False,
    catalog: Annotated[
        Path | None, typer.Option("--catalog", help="Catalog mode: folder of catalog images (file stem = item).")
    ] = None,
    queries: Annotated[
        Path | None, typer.Option("--queries", help="Catalog mode: folder of query photos (same stem as the item).")
    ] = None,
    mapping: Annotated[
        Path | None, typer.Option("--mapping", help="Catalog mode: CSV of query,catalog file names instead of stems.")
    ] = None,
    distractors: Annotated[
        Path | None, typer.Option("--distractors", help="Catalog mode: more catalog images that answer no query.")
    ] = None,
    index: Annotated[
        Path | None, typer.Option("--index", "-i", help="Catalog mode: keep (and reuse) the catalog index here.")
    ] = None,
    rerank: Annotated[int, typer.Option("--rerank", min=1, help="Catalog mode: candidates per stage.")] = 50,
) -> None:
    """Retrieval quality of backbones on labelled images, side by side: mAP, P@1, recall@k, threshold.

    Catalog mode (--catalog DIR --queries DIR): P@1, R@10, R@50 of each stage of `query --rerank N` (global,
    visual words, fused, re-ranked) for photos of catalog items, so you can measure your own catalog."""
    if catalog is not None or queries is not None:
        from .catalog import eval_catalog_cli

        eval_catalog_cli(catalog, queries, mapping=mapping, distractors=distractors, index=index, rerank=rerank,
                         backbone=backbone, weights=weights, folder=folder, as_json=as_json)  # fmt: skip
        return
    from .progress import display
    from .training.evaluation import evaluate

    if folder is None:
        raise BadInputError("give a FOLDER of labelled images, or --catalog DIR --queries DIR")
    if not folder.expanduser().is_dir():
        raise BadInputError(f"folder not found: {folder}")
    with display() as shown:
        results = evaluate(folder, backbone or ["efficientnet-lite0"], labels=labels, weights=weights,
                           target_precision=target_precision, heldout=heldout,
                           progress=lambda ph, d, t: shown.update(ph, d, t, unit="img"))  # fmt: skip
    for r in results:
        if r.get("heldout_trained_on"):
            typer.echo(f"simsearch: warning: {r['backbone']} was refit on all labels, its held-out files too: these "
                       "figures are not held-out ones (train --no-refit keeps them unseen)", err=True)  # fmt: skip
    if as_json:
        _emit({"results": results})
        return
    typer.echo(f"{'backbone':<40}{'images':>7}{'labels':>7}{'mAP':>8}{'P@1':>8}{'R@5':>8}{'R@10':>8}"
               f"  threshold@{target_precision:g} (recall)")  # fmt: skip
    for r in results:
        th = r["threshold"]
        thr = f"{th['value']:.4f} ({th['recall']:.3f})" if th.get("value") is not None else "not reached"
        name = r["backbone"] if len(r["backbone"]) <= 39 else "..." + r["backbone"][-36:]
        typer.echo(f"{name:<40}{r['images']:>7}{r['labels']:>7}{r['map']:>8.4f}{r['p_at_1']:>8.4f}"
                   f"{r['recall_at']['5']:>8.4f}{r['recall_at']['10']:>8.4f}  {thr}")  # fmt: skip


@app.command("demo")
def demo_cmd(
    folder: Annotated[
        Path | None, typer.Argument(help="A folder of your own images (default: generate a demo folder).")
    ] = None,
    index: Annotated[
        Path | None, typer.Option("--index", "-i", help="Index directory (default ./indexes/<folder name>).")
    ] = None,
) -> None:
    """Index a folder (or a generated demo folder), then show a query and the duplicates: the whole job in one go."""
    from .demo import make_demo_folder
    from .images import find_images

    if folder is None:
        folder = Path.cwd() / "simsearch-demo"
        make_demo_folder(folder)
        typer.echo(f"Generated demo pictures in {folder} (24 scenes + 5 edited copies)")
    if not folder.expanduser().exists():
        raise BadInputError(f"folder not found: {folder}")
    idx_path = index or None
    typer.echo(f"$ simsearch index {folder}")
    index_cmd(folder=folder, index=idx_path)
    from .api import default_index_path

    ipath = idx_path or default_index_path(folder)
    edited = folder / "edited" / "scene-00-small.jpg"
    q = edited if edited.exists() else next(iter(find_images(folder, exclude=[ipath])), None)
    if q is None:
        raise BadInputError(f"no images found in {folder}")
    typer.echo(f"\n$ simsearch query {q} --index {ipath} -k 5")
    query_cmd(images=[q], index=ipath, k=5)
    typer.echo(f"\n$ simsearch dedup --index {ipath}")
    dedup_cmd(index=ipath)


@app.command("serve")
def serve_cmd(
    index: IndexPath = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs --token.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    read_only: Annotated[bool, typer.Option("--read-only", help="Refuse every request that changes files.")] = False,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="SIMSEARCH_TOKEN", help="Require Authorization: Bearer TOKEN on /api."),
    ] = None,
    move_to: Annotated[
        Path | None, typer.Option("--move-to", help="Folder that resolve with action move moves files to.")
    ] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option("--ssl-certfile", help="Serve HTTPS with this certificate (PEM; with --ssl-keyfile).")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option("--ssl-keyfile", help="The certificate's private key (PEM).")] = (
        None
    ),
) -> None:
    """Serve an HTTP API (docs at /docs) and a web page to search the index and review duplicates."""
    from .serve.app import is_loopback, run

    if not is_loopback(host) and not token:
        raise BadInputError(f"--host {host} is reachable from other machines: pass --token TOKEN too")
    run(_resolve_index(index), host=host, port=port, read_only=read_only, token=token, move_to=move_to,
        ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)  # fmt: skip


def main() -> None:
    app()


if __name__ == "__main__":
    main()
