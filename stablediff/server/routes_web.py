"""The page at / and its files under /web/, shipped in the package (stablediff/web): fetched without signing in (the
page signs in against /v1 itself), under a content security policy that lets it load and run nothing from anywhere
else, and no inline script at all."""
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).resolve().parent.parent / "web"
POLICY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                               "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated by ETag: a new version of the package is seen at once
}

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
def page():
    return FileResponse(WEB / "index.html", media_type="text/html", headers=POLICY)


def mount(app: FastAPI) -> None:
    """The page's route and files (app.py's one middleware gives the files under /web/ the same POLICY)."""
    app.include_router(router)
    app.mount("/web", StaticFiles(directory=WEB), name="web")
