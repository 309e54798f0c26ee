"""The web page in a real headless browser (Debian's chromium driven by Playwright, offline): search by upload,
drop and paste, "more like this", and a duplicate group resolved and undone."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import edited
from .serve_util import build_index, build_library, live_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip("chromium is not installed", allow_module_level=True)

from simsearch.serve.app import create_app  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
ALL_LOADED = "sel => { const im = [...document.querySelectorAll(sel)]; return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0); }"  # noqa: E501


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def site(photos: Path, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    folder = build_library(photos, tmp_path / "lib")
    index = build_index(folder, tmp_path / "idx")
    with live_server(create_app(index)) as base:
        yield base, folder, index


@pytest.fixture
def page(browser, site) -> Iterator[object]:  # noqa: ANN001
    ctx = browser.new_context()
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.goto(site[0] + "/")
    pg.wait_for_selector("body[data-ready='1']")
    yield pg
    ctx.close()
    assert errors == []


def result_names(pg) -> list[str]:  # noqa: ANN001
    return pg.eval_on_selector_all(".result .name", "els => els.map(e => e.textContent)")


def test_upload_shows_results_with_thumbnails_and_more_like_this(page, site, photos: Path, tmp_path: Path) -> None:  # noqa: ANN001
    base, folder, _ = site
    q = edited(photos / "rocket.jpg", tmp_path / "query-rocket.jpg", scale=0.5, quality=50)
    page.set_input_files("#file", str(q))
    page.wait_for_selector(".result")
    page.wait_for_function(ALL_LOADED, arg=".result img", timeout=20_000)
    assert result_names(page)[0] == "rocket.jpg"
    assert "query-rocket.jpg" in page.inner_text("#query")
    assert len(result_names(page)) == 11  # k=20 asks for more than the index holds
    scores = page.eval_on_selector_all(".result .score", "els => els.map(e => parseFloat(e.textContent))")
    assert scores == sorted(scores, reverse=True) and 0.5 < scores[0] <= 1.0

    # click the coffee result: more like this, by id
    page.click(".result[title$='/coffee.jpg']")
    page.wait_for_function("() => document.querySelector('#query').innerText.includes('coffee.jpg')")
    page.wait_for_function(ALL_LOADED, arg=".result img", timeout=20_000)
    assert result_names(page)[:2] == ["coffee.jpg", "coffee-small.jpg"]


def test_drop_and_paste_search(page, site) -> None:  # noqa: ANN001
    base, folder, _ = site
    for event in ("drop", "paste"):
        page.evaluate(
            """async ([event, url]) => {
                 const blob = await (await fetch(url)).blob();
                 const dt = new DataTransfer();
                 dt.items.add(new File([blob], "from-" + event + ".jpg", { type: "image/jpeg" }));
                 const opts = { bubbles: true, cancelable: true };
                 if (event === "drop") {
                   const drop = new DragEvent("drop", { dataTransfer: dt, ...opts });
                   document.querySelector("#drop").dispatchEvent(drop);
                 } else {
                   document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, ...opts }));
                 }
               }""",
            [event, f"/api/images/{_id_of(page, 'chelsea.jpg')}"],
        )
        page.wait_for_function(f"() => document.querySelector('#query').innerText.includes('from-{event}.jpg')")
        page.wait_for_function(ALL_LOADED, arg=".result img", timeout=20_000)
        assert sorted(result_names(page)[:2]) == ["chelsea-copy.jpg", "chelsea.jpg"]


def _id_of(page, name: str) -> int:  # noqa: ANN001
    return page.evaluate(
        """async (name) => {
             const rep = await (await fetch("/api/duplicates?threshold=-1&group=star&limit=1000")).json();
             for (const g of rep.groups) for (const m of g.members) if (m.path.endsWith("/" + name)) return m.id;
             return null;
           }""",
        name,
    )


def test_duplicate_group_resolved_and_undone(page, site) -> None:  # noqa: ANN001
    base, folder, index = site
    loser = folder / "copies" / "coffee-small.jpg"
    page.click("#tab-dups")
    page.wait_for_selector(".group")
    assert page.locator(".group").count() == 2
    page.wait_for_function(ALL_LOADED, arg=".group img", timeout=20_000)
    group = page.locator(".group", has=page.locator(".member[title$='/coffee-small.jpg']"))
    keep_box = group.locator(".member[title$='/coffee.jpg'] .trash-box")
    lose_box = group.locator(".member[title$='/coffee-small.jpg'] .trash-box")
    assert not keep_box.is_checked() and lose_box.is_checked()  # preselected by the keep rules
    text = group.inner_text()
    assert "600×400" in text and "480×320" in text  # both resolutions, side by side
    assert "score" in text and "KB" in text

    page.once("dialog", lambda d: d.dismiss())  # cancelled: nothing happens
    group.locator(".apply").click()
    page.wait_for_timeout(300)
    assert loser.is_file()

    page.once("dialog", lambda d: d.accept())
    group.locator(".apply").click()
    page.wait_for_selector(".note.done")
    assert not loser.exists() and (folder / "coffee.jpg").is_file()
    assert list((index / "trash").rglob("coffee-small.jpg"))

    group.locator(".undo").click()
    page.wait_for_function("() => document.querySelector('.note.done').innerText.includes('undone')")
    assert loser.is_file() and not list((index / "trash").rglob("coffee-small.jpg"))
    page.click("#dups-load")
    page.wait_for_function("() => document.querySelectorAll('.group').length === 2")


def test_page_with_token_on_a_read_only_server(browser, photos: Path, tmp_path: Path) -> None:  # noqa: ANN001
    folder = build_library(photos, tmp_path / "lib")
    index = build_index(folder, tmp_path / "idx")
    with live_server(create_app(index, token="page-token", read_only=True)) as base:
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.goto(base + "/")  # no token: the page loads, the API refuses
        pg.wait_for_selector("#status.error")
        assert "token" in pg.inner_text("#status")
        pg.goto(base + "/#token=page-token")
        pg.wait_for_selector("body[data-ready='1']")
        assert "token" not in pg.url  # taken out of the address bar
        assert "read-only" in pg.inner_text("#info")
        pg.set_input_files("#file", str(folder / "coffee.jpg"))
        pg.wait_for_function(ALL_LOADED, arg=".result img", timeout=20_000)  # thumbnails fetched with the header
        assert result_names(pg)[:2] == ["coffee.jpg", "coffee-small.jpg"]
        pg.click("#tab-dups")
        pg.wait_for_selector(".group")
        assert pg.locator(".apply").count() == 2
        assert all(pg.locator(".apply").nth(i).is_disabled() for i in range(2))
        assert all(f.is_file() for f in folder.rglob("*.jpg"))
        ctx.close()


def test_other_shots_are_shown_apart_and_never_ticked(browser, photos: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """Issue 26: a similar group (three shots of one scene) is listed with its best shot, nothing ticked, Apply off
    until "include other shots in Apply" is on."""
    from .conftest import skimage_photo
    from .test_dedup_tiers import make_burst

    folder = build_library(photos, tmp_path / "lib")
    shots = make_burst(skimage_photo("astronaut"), skimage_photo("coffee"), "astronaut", folder, 1)
    index = build_index(folder, tmp_path / "idx")
    with live_server(create_app(index)) as base:
        ctx = browser.new_context()
        pg = ctx.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(base + "/")
        pg.wait_for_selector("body[data-ready='1']")
        pg.click("#tab-dups")
        pg.fill("#threshold", "0.85")
        pg.click("#dups-load")  # the tab's own load (default threshold) may still be on its way: it must not draw
        pg.wait_for_selector("#groups[data-threshold='0.85'] .group[data-kind='similar']")
        group = pg.locator(".group[data-kind='similar']")
        boxes = group.locator(".trash-box")
        n = boxes.count()  # the three shots, and the photo they were rendered from when it scores high enough
        titles = [group.locator(".member").nth(k).get_attribute("title") or "" for k in range(n)]
        assert n in (3, 4) and sum(t.endswith(tuple(p.name for p in shots)) for t in titles) == 3
        assert not any(boxes.nth(k).is_checked() for k in range(n))
        assert all(boxes.nth(k).is_disabled() for k in range(n)) and group.locator(".apply").is_disabled()
        assert "best shot" in group.inner_text() and "sharpness" in group.inner_text()
        pg.check("#include-similar")
        pg.wait_for_function("() => !document.querySelector(\".group[data-kind='similar'] .apply\").disabled")
        group = pg.locator(".group[data-kind='similar']")
        assert not any(group.locator(".trash-box").nth(k).is_checked() for k in range(n))  # still nothing ticked
        cards = group.locator(".member")  # re-drawn: read the members again
        pick = next(k for k in range(cards.count()) if (cards.nth(k).get_attribute("title") or "").endswith(
            tuple(p.name for p in shots)) and "best shot" not in cards.nth(k).inner_text())  # fmt: skip
        other = cards.nth(pick).locator(".trash-box")
        other.check()
        pg.once("dialog", lambda d: d.accept())
        group.locator(".apply").click()
        pg.wait_for_selector(".note.done")
        assert sum(p.exists() for p in shots) == 2
        ctx.close()
        assert errors == []
