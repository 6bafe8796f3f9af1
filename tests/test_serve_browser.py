"""The page in a real browser: headless Chromium (Debian's package) driven by Playwright opens cbir-serve's page,
uploads a query and sees its neighbours; then the database page. A screenshot of each is saved."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbir.serve import ServeConfig
from redis_processes import live_redis_servers_under
from serve_server import TOKEN, LiveServer, index_collection

CHROMIUM = Path("/usr/bin/chromium")
# Playwright's own browser download cannot work offline; Debian's chromium runs headless with these.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -e '.[test]')"
    if why is None and not CHROMIUM.exists():
        why = f"no browser at {CHROMIUM} (apt-get install chromium)"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {why}; .ci/run installs chromium")
        pytest.skip(why)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.mark.slow
def test_the_page_searches_by_image_and_shows_the_database(browser, synthetic_data, tmp_path):
    collection = index_collection(tmp_path, synthetic_data)
    config = ServeConfig(db_name="cells", home=collection["home"], token=TOKEN)
    query = sorted((synthetic_data["index"] / "shapes_ring").iterdir())[1]
    with LiveServer(config) as live:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems = []
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(live.url + "/")
        page.wait_for_selector("#examples img")
        page.select_option("#query-class", "shapes_ring")
        page.set_input_files("#file", str(query))
        page.wait_for_selector(".card")
        cards = page.locator(".card")
        assert cards.count() == 10
        first = cards.nth(0).inner_text()
        assert "#1" in first and "shapes_ring" in first and "distance 0.000" in first
        assert "same" in cards.nth(0).get_attribute("class")  # framed: the query's class is known
        frames = [cards.nth(i).get_attribute("class") for i in range(10)]
        assert all(("same" in f) != ("other" in f) for f in frames)
        assert "suggested class\nshapes_" in page.inner_text("#summary").lower()
        page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

        cards.nth(0).click()
        page.wait_for_selector("#viewer:not([hidden])")
        assert page.inner_text("#viewer-title") == "shapes_ring"
        assert page.evaluate("document.getElementById('viewer-image').naturalWidth") > 0
        page.keyboard.press("Escape")
        assert page.locator("#viewer").is_hidden()

        page.goto(live.url + "/db/cells")
        page.wait_for_selector("#samples img")
        assert page.locator("#class-table tbody tr").count() == 4
        assert page.locator("#samples .row").count() == 4
        assert "24" in page.inner_text("#db-facts")
        page.screenshot(path=str(tmp_path / "database.png"), full_page=True)
        assert problems == []
    assert (tmp_path / "search.png").stat().st_size > 10_000
    assert live_redis_servers_under(collection["home"]) == []
