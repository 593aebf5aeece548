"""The HTML page as a browser shows it: contents links, images loaded, no errors (headless Chromium via Playwright)."""

import base64
import io
import os
import re

import matplotlib
import nbformat
import pytest

from gradsense import browser, page
from gradsense.errors import GradsenseError
from gradsense.pipeline import export_html

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MISSING = browser.unavailable()
# CI installs Chromium (.ci/run), so there a missing browser is a failure; elsewhere these tests are skipped.
needs_chromium = pytest.mark.skipif(
    MISSING is not None and not os.environ.get("CI"), reason=f"browser check unavailable: {MISSING}"
)


def _png() -> str:
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [0, 1, 0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def good_page(tmp_path_factory):
    """A tiny executed notebook (two sections, one matplotlib figure with its caption) exported by `export_html`."""
    nb = nbformat.v4.new_notebook()
    figure = nbformat.v4.new_code_cell("figure()")
    figure.outputs = [
        nbformat.v4.new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"}),
        nbformat.v4.new_output("display_data", data={"text/markdown": "**Figure (tiny/curve).** A tent."}),
    ]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A tiny paper\n\nIntro."),
        nbformat.v4.new_markdown_cell("## 1 · First section (stage `tiny`)"),
        figure,
        nbformat.v4.new_markdown_cell("## Parameters"),
    ]
    folder = tmp_path_factory.mktemp("page")
    nbformat.write(nb, folder / "tiny.ipynb")
    return export_html(folder / "tiny.ipynb", folder / "tiny.html")


def test_export_adds_contents_title_and_no_network(good_page):
    html = good_page.read_text()
    assert [inner for _, inner in page.sections(html)] == ["1 · First section (stage <code>tiny</code>)", "Parameters"]
    nav = html[html.index('<nav class="gs-contents"') :]
    assert nav.index("<nav") < nav.index("<h2")  # before the first section
    for anchor, _ in page.sections(html):
        assert f'<li><a href="#{anchor}">' in html and f'id="{anchor}"' in html
    assert "<title>A tiny paper</title>" in html
    assert not re.search(r'src="https?://|import\("https?://', html)  # no CDN script: the page works offline


def test_add_contents_leaves_a_page_without_sections_alone():
    assert page.add_contents("<h1 id='x'>x</h1><p>y</p>") == "<h1 id='x'>x</h1><p>y</p>"


def test_a_missing_chromium_is_a_one_line_error(good_page, tmp_path):
    with pytest.raises(GradsenseError, match="no Chromium found") as info:
        browser.check_page(good_page, chromium=str(tmp_path / "no-such-chromium"))
    assert "\n" not in str(info.value)
    assert browser.main([str(good_page), "--chromium", str(tmp_path / "no-such-chromium")]) == 2


@needs_chromium
def test_a_good_page_passes_and_is_screenshot(good_page, tmp_path):
    shot = tmp_path / "shot" / "page.png"
    report = browser.check_page(good_page, shot)
    assert report.ok, report.summary()
    assert report.n_images == 1 and report.n_links == 5  # two contents links, the ¶ anchors of three headings
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000
    assert browser.main([str(good_page)]) == 0


@needs_chromium
def test_a_broken_image_or_link_fails_and_is_named(good_page, tmp_path, capsys):
    html = good_page.read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace('src="data:image/png;base64,', 'src="missing.png" data-was="', 1))
    report = browser.check_page(broken)
    assert not report.ok and len(report.broken_images) == 1
    assert "Figure (tiny/curve)" in report.broken_images[0] and "Figure (tiny/curve)" in report.summary()
    assert browser.main([str(broken)]) == 1
    assert "did not load: **Figure" not in capsys.readouterr().err  # named by its rendered caption

    anchor = page.sections(html)[0][0]
    dead = tmp_path / "dead-link.html"
    dead.write_text(html.replace(f'<li><a href="#{anchor}">', '<li><a href="#nowhere">', 1))
    report = browser.check_page(dead)
    assert report.broken_links == ["link to #nowhere"] and not report.ok
