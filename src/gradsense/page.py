"""The exported HTML paper as a page: offline (no CDN scripts), titled, with a table of contents of its sections."""

from __future__ import annotations

import re

from jinja2 import DictLoader

# nbconvert's lab template loads require.js, MathJax and Mermaid from a CDN; the paper uses none: it needs no network.
TEMPLATE = "gradsense_page.html.j2"
LOADER = DictLoader(
    {
        TEMPLATE: "{%- extends 'lab/index.html.j2' -%}"
        "{%- block html_head_js_requirejs -%}{%- endblock -%}"
        "{%- block html_head_js_mathjax -%}{%- endblock -%}"
        "{%- block html_head_js_mermaidjs -%}{%- endblock -%}"
    }
)
HEADING = re.compile(r'<h2 id="([^"]+)">(.*?)</h2>', re.DOTALL)
ANCHOR = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>', re.DOTALL)


def sections(html: str) -> list[tuple[str, str]]:
    """(id, inner HTML without nbconvert's ¶ anchor) of every level-2 heading, in page order."""
    return [(anchor, ANCHOR.sub("", inner).strip()) for anchor, inner in HEADING.findall(html)]


def add_contents(html: str) -> str:
    """Insert a linked table of contents of the level-2 headings just before the first of them."""
    found = sections(html)
    if not found:
        return html
    items = "".join(f'<li><a href="#{anchor}">{inner}</a></li>' for anchor, inner in found)
    nav = f'<nav class="gs-contents" aria-label="Contents"><p><strong>Contents</strong></p><ol>{items}</ol></nav>\n'
    first = HEADING.search(html).start()
    return html[:first] + nav + html[first:]


def title(notebook) -> str | None:
    """The text of the notebook's first `# ` heading (the page's <title>), or None."""
    for cell in notebook.cells:
        found = re.search(r"^# (.+)$", cell.source, re.MULTILINE) if cell.cell_type == "markdown" else None
        if found:
            return found.group(1).strip()
    return None
