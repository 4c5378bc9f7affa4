"""The built book in headless Chromium: pages render, images load, MathJax typesets, nothing leaves the machine,
and a reader at 1280 × 800 sees results first: code collapsed, nothing wider than the page, no machine paths, every
figure captioned and its smallest text at least about 9 pt at the width the page shows it.

Serves book/_build/html on 127.0.0.1 from a background thread and drives Debian's Chromium through
Playwright. It checks the test book (tests/tiny_book.py, fixture `built_book`: tiny-model notebooks), and also the
repository's own book when `lllm book` has built it (book/_build/html). Every request the pages make
is recorded; any to another host is blocked and fails the test.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tiny_book import REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = REPO / "book" / "_build" / "screenshots"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
MIN_TEXT_PX = 11.5  # about 9 pt (12 CSS px), with room for rounding: the smallest text a figure may show

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static file handler that does not log every request to stderr."""

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def serve():
    """serve(html_dir) -> base URL of a 127.0.0.1 server for that directory; all stopped at the end."""
    servers = []

    def start(html_dir: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=html_dir))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def is_local(url: str) -> bool:
    """True for the local server, and for data:/blob: URLs, which never reach the network."""
    parts = urlsplit(url)
    return parts.scheme in ("data", "blob") or (parts.scheme in ("http", "https") and parts.hostname in LOCAL_HOSTS)


def open_page(browser, url: str) -> tuple:
    """(page, every requested URL, the non-local ones, JS errors) after `url` loaded and MathJax finished."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    requested, external, errors = [], [], []

    def route(route):
        requested.append(route.request.url)
        if is_local(route.request.url):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("websocket", lambda ws: external.append(ws.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, wait_until="networkidle")
    if page.locator('script[src*="mathjax"]').count():  # Sphinx adds MathJax only to pages with math
        page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20_000)
        page.evaluate("() => MathJax.startup.promise")
    # load every image now (a lazy one below the fold would otherwise still be empty)
    page.evaluate("""() => Promise.all([...document.images].map(img => {
        img.loading = 'eager'; return img.decode().catch(() => null); }))""")
    page.wait_for_load_state("networkidle")
    return page, requested, external, errors


def check_page(browser, url: str, *, min_images: int, min_math: int, machine_paths: tuple[str, ...] = (),
               no_sideways_scroll: bool = False):
    """Open `url` and assert that it rendered completely and locally, readable at page width, with its code
    collapsed and none of `machine_paths` in its text (and with no_sideways_scroll, no output that the reader must
    scroll sideways: a wide table may scroll inside the column, the claims table must not); the page."""
    page, requested, external, errors = open_page(browser, url)
    assert not external, f"{url} tried to reach other machines: {external}"
    assert requested and all(is_local(r) for r in requested)
    assert not errors, f"{url} raised JavaScript errors: {errors}"
    images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.currentSrc || i.src, i.naturalWidth])")
    assert len(images) >= min_images, f"{url} shows {len(images)} images, expected at least {min_images}"
    broken = [src for src, width in images if width == 0]
    assert not broken, f"{url}: images that did not load: {broken}"
    math = page.locator("mjx-container").count()
    assert math >= min_math, f"{url}: {math} typeset formulas, expected at least {min_math}"
    text = page.inner_text("article")
    for raw in ("$$", "\\(", "\\[", "\\begin{"):
        assert raw not in text, f"{url}: untypeset math {raw!r} is visible"
    widths = page.evaluate("""() => {
        const column = document.querySelector('.bd-article') || document.querySelector('article');
        return [column.scrollWidth, column.clientWidth, document.documentElement.scrollWidth, window.innerWidth]; }""")
    assert widths[0] <= widths[1] + 1 and widths[2] <= widths[3], f"{url}: content wider than the page: {widths}"
    figures = page.evaluate("""() => [...document.querySelectorAll('.cell_output img')].map(img => {
        const caption = img.closest('.cell_output').querySelector('.lllm-caption');
        const pt = caption ? parseFloat(caption.dataset.fontPt) : NaN, dpi = caption ? parseFloat(caption.dataset.dpi) : NaN;
        return [img.currentSrc || img.src, !!caption, pt * dpi / 72 * img.width / img.naturalWidth]; })""")
    uncaptioned = [src for src, captioned, _ in figures if not captioned]
    assert not uncaptioned, f"{url}: figures without a caption: {uncaptioned}"
    small = [(src, round(px, 1)) for src, _, px in figures if px == px and px < MIN_TEXT_PX]  # px == px: not NaN
    assert not small, f"{url}: figure text smaller than about 9 pt at page width (CSS px): {small}"
    if no_sideways_scroll:
        scrolled = page.evaluate("""() => [...document.querySelectorAll('.cell_output *')]
            .filter(e => e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== 'visible')
            .map(e => [e.tagName, e.className, e.scrollWidth, e.clientWidth])""")
        assert not scrolled, f"{url}: outputs cut off at the page's width (scroll sideways): {scrolled}"
    cells = page.locator("div.cell_input")
    shown_code = sum(cells.nth(i).is_visible() for i in range(cells.count()))  # collapsed: inside a closed <details>
    assert shown_code == 0, f"{url}: {shown_code} code cells are shown before the reader asks for them"
    source = page.text_content("article")  # collapsed code included: a reader may open it
    for path in machine_paths:
        assert path not in source, f"{url}: the page shows a path of the build machine ({path})"
    return page


def figure_pages(html: Path) -> list[Path]:
    """Executed-notebook pages (generated/<chapter>/<model>.html) that contain an image."""
    pages = sorted(p for p in html.glob("generated/*/*.html") if p.parent.name != "chapters")
    return [p for p in pages if "<img" in p.read_text()]


def screenshot(page, name: str) -> Path:
    """Save a full-page screenshot under book/_build/screenshots and print where."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")
    return path


def test_test_book_renders_offline(built_book, serve, browser):
    assert built_book["report"].built, "\n".join(built_book["report"].build_errors)
    base = serve(built_book["book_dir"] / "_build" / "html")
    paths = (str(built_book["book_dir"]), str(REPO))
    check_page(browser, base + "index.html", min_images=0, min_math=2, machine_paths=paths)
    check_page(browser, base + "method.html", min_images=0, min_math=20, machine_paths=paths)
    check_page(browser, base + "generated/compare/all-models.html", min_images=1, min_math=1, machine_paths=paths)
    page = check_page(browser, base + "generated/tiny-figure/tiny.html", min_images=1, min_math=2, machine_paths=paths)
    assert screenshot(page, "test-book-figure").stat().st_size > 10_000


@pytest.mark.skipif(not (REPO / "book" / "_build" / "html" / "index.html").exists(),
                    reason="the repository's book has not been built (run `lllm book --fast`)")
def test_repository_book_renders_offline(serve, browser):
    html = REPO / "book" / "_build" / "html"
    base = serve(html)
    check_page(browser, base + "index.html", min_images=0, min_math=2, machine_paths=(str(REPO),))
    pages = figure_pages(html)
    assert pages, "the built book has no executed notebook with a figure"
    for path in pages:  # a screenshot of each, e.g. book/_build/screenshots/fig3-smollm2-135m.png
        page = check_page(browser, base + path.relative_to(html).as_posix(), min_images=1, min_math=0,
                          machine_paths=(str(REPO),), no_sideways_scroll=path.parent.name == "paper_vs_book")
        screenshot(page, f"{path.parent.name}-{path.stem}")
