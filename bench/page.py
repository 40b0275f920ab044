"""How fast the page at / of `stablediff serve` is ready, measured in the browser: Debian's chromium driven by
Playwright against the server (demo model, its own process, loopback), with a history of 12 jobs to show, read off
the page's own marks: "stablediff-form" (signed in, the form built from /v1/tasks, models, samplers, LoRAs and
embeddings) and "stablediff-ready" (the queue read and the first history page's images fetched and shown too).
Cold: a new browser context (nothing cached, signed in by its stored token); warm: a reload of the same tab.

    python bench/page.py [--loads 20]

Puts a section at the top of BENCHMARKS.md.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browsing import launch  # noqa: E402
from report import machine, percentile, prepend  # noqa: E402
from server import submit, wait  # noqa: E402
from serving import Server  # noqa: E402

READY = """() => { const mark = (name) => performance.getEntriesByName(name)[0].startTime;
  const nav = performance.getEntriesByType('navigation')[0];
  return {form: mark('stablediff-form'), ready: mark('stablediff-ready'), dom: nav.domContentLoadedEventEnd,
          requests: performance.getEntriesByType('resource').length}; }"""


def fill_history(server: Server, jobs: int) -> None:
    with httpx.Client(base_url=server.url, auth=("bench", "bench"), timeout=60) as http:
        ids = [submit(http, {"task": "txt2img", "prompt": f"a red circle {i}", "steps": 4, "seed": i})
               for i in range(jobs)]
        for job_id in ids:
            wait(http, job_id)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loads", type=int, default=20)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(tempfile.mkdtemp(prefix="sd-bench-page-")) / "out"
    cold, warm = [], []
    with Server(out, "--auth", "bench:bench") as server, sync_playwright() as p:
        fill_history(server, 12)
        token = httpx.post(server.url + "/v1/tokens", auth=("bench", "bench")).json()["token"]
        browser = launch(p)
        for _ in range(args.loads):
            context = browser.new_context()
            context.add_init_script(f"localStorage.setItem('stablediff.token', {token!r})")
            page = context.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("body[data-ready='1']")
            cold.append(page.evaluate(READY))
            page.reload()
            page.wait_for_selector("body[data-ready='1']")
            warm.append(page.evaluate(READY))
            context.close()
        browser.close()
    rows = []
    for name, runs in (("cold (new context)", cold), ("warm (reload)", warm)):
        times = {k: [r[k] for r in runs] for k in ("dom", "form", "ready")}
        rows.append(f"| {name} | " + " | ".join(f"{statistics.median(v):.0f} ms (p95 {percentile(v, 95):.0f})"
                                                 for v in times.values()) + f" | {runs[0]['requests']} |")
    lines = [f"Machine: {machine()}; Debian chromium (headless) driven by Playwright.",
             f"Command: `python bench/page.py {' '.join(sys.argv[1:])}`. {args.loads} loads each of `/` from "
             "`stablediff serve` (demo model, --auth, loopback) with 12 jobs in the history; times from navigation "
             "start, read off the browser's Performance API.", "",
             "| load | DOM ready, median | form ready, median | all shown, median | requests |", "|---|---|---|---|---|",
             *rows, "",
             "Form ready: signed in, the form built from the server's task table, models, samplers, LoRAs and "
             "embeddings (the page can be used). All shown: also the queue read and the first history page's 12 "
             "images fetched, decoded and shown. The browser, its driver and the server share the machine's 2 cores."]
    prepend("The page: load time in the browser", lines)


if __name__ == "__main__":
    main()
