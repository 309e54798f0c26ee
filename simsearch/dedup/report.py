"""Review files for dedup results: a self-contained static HTML page (thumbnails inlined) and a CSV."""

from __future__ import annotations

import base64
import csv
import html
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ..images import ImageLoadError, open_image
from ..index.store import IndexStore, atomic_write
from .finder import DedupReport

THUMB = 180

_CSS = """
body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em} .summary{color:#555;margin-bottom:1em}
.group{background:#fff;border:1px solid #ddd;border-radius:6px;margin:0 0 1em;padding:.6em .8em}
.group h2{font-size:1em;margin:.2em 0 .6em} .files{display:flex;flex-wrap:wrap;gap:.8em}
.file{width:200px;font-size:12px;word-break:break-all} .file img{max-width:180px;max-height:180px;display:block}
.keep{outline:3px solid #2a2;outline-offset:2px} .kept-label{color:#2a2;font-weight:bold}
.drop-label{color:#a22} .exact h2{color:#225} .near h2{color:#552}
.similar{border-style:dashed} .similar h2{color:#265} .best-label{color:#265;font-weight:bold}
.other-label{color:#555}
"""


def _thumb(path: str) -> str | None:
    try:
        im = open_image(path, target=THUMB)
    except ImageLoadError:
        return None
    im.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(report: DedupReport, store: IndexStore, out: str | Path, limit: int = 1000) -> Path:
    """Write a static page: one block per group, the kept file outlined, score/size/resolution under each."""
    out = Path(out).expanduser()
    groups = report.groups[:limit]
    rows = {r.path: r for r in store.all_rows()}
    paths = sorted({f for g in groups for f in g.files})
    with ThreadPoolExecutor(4) as pool:
        thumbs = dict(zip(paths, pool.map(_thumb, paths), strict=True))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>simsearch dedup report</title>",
        f"<style>{_CSS}</style></head><body><h1>simsearch dedup report</h1>",
        f"<p class='summary'>Index {html.escape(str(store.path))}; threshold {report.threshold}; "
        f"grouping {report.group_mode}; keep rules {', '.join(report.keep_rules)}; "
        f"<span id='n-groups'>{len(report.groups)}</span> groups, {report.duplicates} copies could be removed"
        + (
            f"; {report.similar_files} other shots in similar groups (not copies: kept unless asked)"
            if report.similar_files
            else ""
        )  # fmt: skip
        + (f" (first {limit} groups shown)" if len(report.groups) > limit else "")
        + ".</p>",
    ]
    for gi, g in enumerate(groups, 1):
        title = (f"other shots of one scene (similar, not copies), {len(g.files)} files, best shot first"
                 if g.kind == "similar" else f"{g.kind} copies, {len(g.files)} files")  # fmt: skip
        parts.append(
            f"<section class='group {g.kind}' data-kind='{g.kind}'><h2>Group {gi}: {title}, "
            f"min score {g.min_score:.4f}</h2><div class='files'>"
        )
        for k, (f, s) in enumerate(zip(g.files, g.scores, strict=True)):
            r = rows.get(f)
            keep = f == g.keep
            src = thumbs.get(f)
            img = f"<img src='{src}' alt='{html.escape(Path(f).name)}'>" if src else "<em>(unreadable)</em>"
            meta = f"{r.width}x{r.height}, {r.size / 1024:.0f} KiB" if r else ""
            shot = g.shots[k] if g.shots and g.shots[k] else None
            if shot:
                meta += f"<br>sharpness {shot['sharpness']:.0f}, clipped {shot['clipped']:.1%}"
            if g.kind == "similar":
                label = ("<span class='best-label'>BEST SHOT</span>" if keep
                         else "<span class='other-label'>other shot</span>")  # fmt: skip
            else:
                label = "<span class='kept-label'>KEEP</span>" if keep else "<span class='drop-label'>duplicate</span>"
            parts.append(
                f"<div class='file{' keep' if keep else ''}'>{img}{label} score {s:.4f}<br>{meta}<br>"
                f"<a href='file://{html.escape(f)}'>{html.escape(f)}</a></div>"
            )
        parts.append("</div></section>")
    parts.append(
        "<script>window.addEventListener('load',function(){var im=document.images,n=0;"
        "for(var k=0;k<im.length;k++){if(im[k].complete&&im[k].naturalWidth>0)n++;}"
        "document.body.dataset.imagesLoaded=n;"
        "document.body.dataset.groupsRendered=document.querySelectorAll('section.group').length;});</script>"
    )
    parts.append("</body></html>\n")
    atomic_write(out, "".join(parts).encode())
    return out


def write_csv(report: DedupReport, store: IndexStore, out: str | Path) -> Path:
    """One row per file of each group: group, kind, keep flag, score to the kept file, size, resolution, path."""
    out = Path(out).expanduser()
    rows = {r.path: r for r in store.all_rows()}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "kind", "keep", "score", "min_score", "size", "width", "height", "path"])
    for gi, g in enumerate(report.groups, 1):
        for f, s in zip(g.files, g.scores, strict=True):
            r = rows.get(f)
            w.writerow([gi, g.kind, int(f == g.keep), f"{s:.6f}", f"{g.min_score:.6f}", r.size if r else "",
                        r.width if r else "", r.height if r else "", f])  # fmt: skip
    atomic_write(out, buf.getvalue().encode())
    return out
