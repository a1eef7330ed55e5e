"""The routing explorer: a page served by the service itself (service/web/, no build step) that calls the /v1 JSON
routes from the browser. The page and its two assets carry no data, so they are open like /docs: a browser cannot
send an API key when it loads a page; the page asks for the key and sends it with every API call it makes."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import ErrorKind, ServiceError

WEB = Path(__file__).resolve().parent.parent / "web"
PAGE = "/explorer"
ASSETS = {"explorer.js": "text/javascript; charset=utf-8", "explorer.css": "text/css; charset=utf-8"}
PUBLIC_PATHS = frozenset({PAGE, *(f"{PAGE}/{name}" for name in ASSETS)})  # answered without the API key
# Revalidate each load: a page and script from different versions of the service would disagree on the API.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(include_in_schema=False)


@router.get(PAGE)
async def page() -> Response:
    return Response((WEB / "explorer.html").read_bytes(), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get(PAGE + "/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
        raise ServiceError(ErrorKind.NOT_FOUND, f"no explorer file {name!r}; there are {', '.join(ASSETS)}")
    return Response((WEB / name).read_bytes(), media_type=ASSETS[name], headers=HEADERS)
