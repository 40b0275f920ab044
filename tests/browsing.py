"""Debian's chromium driven by Playwright (never Playwright's own browser download), for the page's tests and
bench/page.py; and what they read off the page."""
import base64
import io
import os
import shutil

from PIL import Image

CHROMIUM = os.environ.get("STABLEDIFF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless, and none of the browser's own traffic (updates, sync, safe browsing): this machine's network is closed,
# and the tests check that the page itself asks nothing of any other origin.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions"]


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)


def have_chromium() -> bool:
    return os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)


# The picture an <img> shows, as the browser decoded it: drawn on a canvas and read back as a PNG.
_PIXELS = """img => { const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png'); }"""


def shown_image(locator) -> Image.Image:
    """The pixels of the <img> that `locator` finds, as the page shows them."""
    locator.wait_for()
    locator.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=locator.element_handle())
    url = locator.evaluate(_PIXELS)
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def drop_file(page, selector: str, data: bytes, name: str, mime: str = "image/png") -> None:
    """A file dropped on the element, as a drag from the desktop gives it."""
    transfer = page.evaluate_handle("""([b64, name, mime]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: mime})); return dt; }""",
                                    [base64.b64encode(data).decode(), name, mime])
    page.dispatch_event(selector, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})
