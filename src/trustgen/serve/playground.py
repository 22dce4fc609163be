"""The playground page at `/`: static HTML, script and style (no data; it asks for the API key)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; media-src data:; "
               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
async def playground() -> HTMLResponse:
    # As a header (not only the page's meta tag) so that it can forbid framing too.
    return HTMLResponse(_static("playground.html"), headers={"Content-Security-Policy": PAGE_POLICY,
                                                             "X-Content-Type-Options": "nosniff"})


@router.get("/playground.js")
async def playground_script() -> Response:
    return Response(_static("playground.js"), media_type="text/javascript")


@router.get("/playground.css")
async def playground_style() -> Response:
    return Response(_static("playground.css"), media_type="text/css")


def _static(name: str) -> str:
    return resources.files("trustgen.serve").joinpath("static", name).read_text(encoding="utf-8")
