"""GET /: the demo page, one static HTML file with its script inline."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["demo"])


@cache
def _page() -> str:
    return files("app").joinpath("static/index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
async def demo_page() -> HTMLResponse:
    """The demo page: pick or drop an image, see its boxes, move the score threshold."""
    return HTMLResponse(_page())
