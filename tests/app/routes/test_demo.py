"""GET / (``app/routes/demo.py``): the demo page's HTML, in process; and the page (and /docs)
driven in headless Chromium (Debian's) through Playwright against a real server, since a
browser needs a real URL to load the page, its script and its fetches from."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.app.support import CLASS_NAMES, PATIENCE_S, Server, chromium, encode, shapes_image


@pytest.mark.anyio
async def test_page_is_self_contained_html(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert '<input id="file" type="file"' in page and 'type="range"' in page
    assert "<script src=" not in page and "http://" not in page and "https://" not in page


# Playwright counts in milliseconds; a busy machine may take a while to answer.
WAIT_MS = PATIENCE_S * 1000


def test_upload_draws_boxes(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "shapes.png"
    image.write_bytes(encode(shapes_image(), "PNG"))
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.goto(server.url + "/")
        canvas = page.locator("#stage")
        assert canvas.get_attribute("data-state") == "empty"
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#stage[data-state=drawn]", timeout=WAIT_MS)
        assert (canvas.get_attribute("width"), canvas.get_attribute("height")) == ("480", "360")

        # Random weights: move the slider to 0 so every fetched detection is drawn.
        page.locator("#threshold").fill("0")
        drawn = int(canvas.get_attribute("data-drawn"))
        items = page.locator("#detections li.detection")
        assert drawn > 0
        assert items.count() == drawn
        labels = {items.nth(i).get_attribute("data-label") for i in range(drawn)}
        assert labels <= set(CLASS_NAMES)
        # Boxes are really on the canvas: some pixels differ from the uploaded image.
        painted = page.evaluate(
            """() => {
                const c = document.getElementById('stage');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let coloured = 0;
                for (let i = 0; i < d.length; i += 4) {
                    if (d[i] > 200 && d[i + 1] > 200 && d[i + 2] > 200) continue;
                    coloured++;
                }
                return coloured;
            }"""
        )
        assert painted > 0
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

        # A higher threshold hides boxes without a new request.
        page.locator("#threshold").fill("1")
        assert canvas.get_attribute("data-drawn") == "0"
        assert items.count() == 0
        assert (tmp_path / "demo.png").stat().st_size > 0


def test_error_is_shown(server: Server, tmp_path: Path) -> None:
    gif = tmp_path / "anim.gif"
    gif.write_bytes(encode(shapes_image(), "GIF"))
    with chromium() as browser:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.set_input_files("#file", str(gif))
        page.wait_for_selector("#stage[data-state=error]", state="attached", timeout=WAIT_MS)
        assert "unsupported_type" in page.locator("#status").inner_text()


def test_docs_page_renders_offline(server: Server) -> None:
    """/docs loads its scripts from the service itself: with every other host blocked, Swagger
    UI still renders the API."""
    with chromium() as browser:
        page = browser.new_page()
        elsewhere: list[str] = []

        def only_the_service(route) -> None:  # type: ignore[no-untyped-def]
            if route.request.url.startswith(server.url):
                route.continue_()
            else:
                elsewhere.append(route.request.url)
                route.abort()

        page.route("**/*", only_the_service)
        page.goto(server.url + "/docs")
        title = page.wait_for_selector(".swagger-ui .info .title", timeout=WAIT_MS)
        assert title is not None and "SSD detection service" in title.inner_text()
        page.wait_for_selector("#operations-detection-detect_detect_post", timeout=WAIT_MS)
        assert elsewhere == []
