"""Open an HTML page in headless Chromium: every image loaded, every in-page link resolves, no errors; a screenshot.

Usage: python -m gradsense.browser PAGE [--screenshot OUT.png] [--chromium PATH]
Playwright drives the system Chromium (Debian's `chromium`, or $GRADSENSE_CHROMIUM); it never downloads a browser.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gradsense.errors import GradsenseError

# Every <img> that did not load, named by the caption that follows it (the paper's "Figure (stage/name)") or its src.
BROKEN_IMAGES = """() => Array.from(document.images).flatMap((img, i) => {
  if (img.complete && img.naturalWidth > 0) return [];
  const next = img.closest('.jp-OutputArea-child')?.nextElementSibling?.innerText?.trim();
  const name = next ? next.split('\\n')[0].slice(0, 80) : (img.getAttribute('src') || '').slice(0, 80);
  return [`image ${i + 1} of ${document.images.length} did not load: ${name}`];
})"""
# Every in-page link (href="#...") whose target id is not on the page (tried as written, then percent-decoded).
BROKEN_LINKS = """() => Array.from(document.querySelectorAll('a[href^="#"]')).flatMap(a => {
  const id = a.getAttribute('href').slice(1);
  let decoded = id;
  try { decoded = decodeURIComponent(id); } catch (e) {}
  return id === '' || document.getElementById(id) || document.getElementById(decoded) ? [] : [`link to #${id}`];
})"""


@dataclass
class PageReport:
    """What the browser saw: images, in-page links, console and page errors, and the screenshot written."""

    page: Path
    n_images: int = 0
    n_links: int = 0
    broken_images: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        """True when every image loaded, every in-page link resolves and nothing was logged as an error."""
        return not (self.broken_images or self.broken_links or self.errors)

    def problems(self) -> list[str]:
        """Every problem found, one line each."""
        return self.broken_images + [f"broken {link}" for link in self.broken_links] + self.errors

    def summary(self) -> str:
        """One line: the verdict and the counts, or the first problem and how many there are."""
        if self.ok:
            return f"{self.page}: ok, {self.n_images} images loaded, {self.n_links} in-page links resolve, no errors"
        problems = self.problems()
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return f"{self.page}: {problems[0]}{more}"


def find_chromium(chromium: str | None = None) -> str:
    """The Chromium executable: the argument, else $GRADSENSE_CHROMIUM, else `chromium` on PATH."""
    name = chromium or os.environ.get("GRADSENSE_CHROMIUM") or "chromium"
    found = shutil.which(name)
    if found is None:
        raise GradsenseError(
            f"no Chromium found ({name!r}): install it (`apt-get install -y chromium`) or set GRADSENSE_CHROMIUM"
        )
    return found


def unavailable(chromium: str | None = None) -> str | None:
    """Why the browser check cannot run here (no Chromium, no playwright), in one line; None when it can."""
    try:
        find_chromium(chromium)
    except GradsenseError as exc:
        return str(exc)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (it is pinned in requirements.txt: run `make venv`)"
    return None


def check_page(html: Path, screenshot: Path | None = None, chromium: str | None = None) -> PageReport:
    """Load a page in headless Chromium, check its images, links and errors, and save a full-page screenshot."""
    html = Path(html)
    if not html.is_file():
        raise GradsenseError(f"page {html} does not exist")
    missing = unavailable(chromium)
    if missing:
        raise GradsenseError(missing)
    from playwright.sync_api import Error, sync_playwright

    try:
        return _check(html, screenshot, find_chromium(chromium), sync_playwright)
    except Error as exc:
        raise GradsenseError(f"Chromium could not check {html}: {str(exc).splitlines()[0]}") from None


def _check(html: Path, screenshot: Path | None, executable: str, sync_playwright) -> PageReport:
    """The browser session of `check_page`."""
    report = PageReport(html)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"], headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: msg.type == "error" and report.errors.append(f"console error: {msg.text}"))
            page.on("pageerror", lambda exc: report.errors.append(f"page error: {exc}"))
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.wait_for_load_state("networkidle")
            report.n_images = page.evaluate("() => document.images.length")
            report.n_links = page.evaluate("() => document.querySelectorAll('a[href^=\"#\"]').length")
            report.broken_images = page.evaluate(BROKEN_IMAGES)
            report.broken_links = page.evaluate(BROKEN_LINKS)
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
                report.screenshot = Path(screenshot)
        finally:
            browser.close()
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI: print the one-line summary; exit 1 when the page has a problem, 2 when it cannot be checked."""
    parser = argparse.ArgumentParser(prog="python -m gradsense.browser", description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path, help="the HTML page to open")
    parser.add_argument("--screenshot", type=Path, default=None, help="write a full-page PNG screenshot here")
    parser.add_argument("--chromium", default=None, help="Chromium executable (default: $GRADSENSE_CHROMIUM, chromium)")
    args = parser.parse_args(argv)
    try:
        report = check_page(args.page, args.screenshot, args.chromium)
    except GradsenseError as exc:
        print(f"browser check: {exc}", file=sys.stderr)
        return 2
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
