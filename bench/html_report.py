"""A Markdown report as one self-contained HTML page: ``results.md`` -> ``results.html``.

The Markdown stays the source of truth (it diffs well and GitHub renders it); the page is for reading
a report that has many wide tables: every table sorts by a click on its header, a table of contents
links the sections, and every local image is embedded as a data URI, so the one file can be mailed or
opened offline with nothing beside it. The page loads nothing from anywhere: its Content-Security-Policy
allows only inline styles and script and ``data:`` images.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from markdown_it import MarkdownIt

from bench.store import atomic_write_text

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml", ".webp": "image/webp"}
# Nothing leaves the file: no network, no other local file. Links (<a href>) are navigation, not loads.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

CSS = """
:root { color-scheme: light; --line: #d0d7de; --head: #f0f3f6; --stripe: #f8f9fb; --accent: #0b5cad; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0 auto; padding: 1.5rem 2rem 4rem; max-width: 110rem; }
h1 { font-size: 1.8rem; margin: 0 0 1rem; }
h2 { font-size: 1.4rem; margin: 2.5rem 0 .8rem; padding-bottom: .3rem; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.1rem; margin: 1.8rem 0 .6rem; }
h2, h3, h4 { scroll-margin-top: 1rem; }
p, li { max-width: 75rem; }
a { color: var(--accent); }
code { font: .88em/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eff1f3;
       padding: .1em .3em; border-radius: 4px; }
pre code { display: block; padding: .8em; overflow-x: auto; }
nav.toc { background: var(--stripe); border: 1px solid var(--line); border-radius: 6px; padding: .6rem 1.2rem;
          margin: 0 0 1.5rem; }
nav.toc ul { margin: .3rem 0; padding-left: 1.2rem; }
nav.toc.long ul { columns: 2 22rem; }
nav.toc li { break-inside: avoid; }
.table-wrap { overflow: auto; max-height: 85vh; margin: .6rem 0 1.2rem; border: 1px solid var(--line);
              border-radius: 6px; width: fit-content; max-width: 100%; }
table { border-collapse: separate; border-spacing: 0; font-size: .88rem; }
th, td { padding: .3rem .7rem; border-bottom: 1px solid var(--line); white-space: nowrap; }
td { font-variant-numeric: tabular-nums; }
th { position: sticky; top: 0; z-index: 1; background: var(--head); font-weight: 600; }
th.sortable { cursor: pointer; user-select: none; }
th.sortable:hover { background: #e2e7ec; }
th.sortable::after { content: " \\2195"; color: #8c959f; font-weight: 400; }
th[aria-sort=ascending]::after { content: " \\25B2"; color: var(--accent); }
th[aria-sort=descending]::after { content: " \\25BC"; color: var(--accent); }
tbody tr:nth-child(even) td { background: var(--stripe); }
tbody tr:hover td { background: #eaf2fb; }
tbody tr:last-child td { border-bottom: 0; }
img { max-width: 100%; height: auto; display: block; margin: .8rem 0; }
.missing { display: inline-block; color: #9a3412; background: #fff4e5; border: 1px dashed #e08a3c;
           border-radius: 4px; padding: .2rem .5rem; }
footer { margin-top: 3rem; color: #656d76; font-size: .85rem; }
@media print { .table-wrap { max-height: none; overflow: visible; } th { position: static; } }
"""

# Sorting: a column is numeric when every non-empty cell starts with a number ("0.943*",
# "+0.012 [-0.01, +0.03]", "4/4"), then compared on that leading number; otherwise as text with digits
# compared as numbers. Empty cells go last either way; ties keep their order (the report's order).
JS = """
(function () {
  var LEADING = /^\\s*([+\\-\\u2212]?(?:\\d+\\.?\\d*|\\.\\d+)(?:e[+\\-]?\\d+)?)/i;
  function number(text) {
    var m = LEADING.exec(text);
    return m ? parseFloat(m[1].replace("\\u2212", "-")) : null;
  }
  function sortBy(table, th, col) {
    var body = table.tBodies[0];
    if (!body) return;
    var rows = Array.prototype.slice.call(body.rows);
    var texts = rows.map(function (r) { return r.cells[col] ? r.cells[col].textContent.trim() : ""; });
    var numeric = texts.every(function (t) { return t === "" || number(t) !== null; });
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    var keyed = rows.map(function (r, i) {
      return { row: r, i: i, text: texts[i], num: numeric ? number(texts[i]) : null };
    });
    keyed.sort(function (a, b) {
      if (a.text === "" || b.text === "") return (a.text === "") - (b.text === "") || a.i - b.i;
      var c = numeric ? a.num - b.num : a.text.localeCompare(b.text, undefined, { numeric: true });
      return c * dir || a.i - b.i;
    });
    keyed.forEach(function (k) { body.appendChild(k.row); });
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table"), function (table) {
    var head = table.tHead && table.tHead.rows[0];
    if (!head) return;
    table.setAttribute("data-sortable", "true");
    Array.prototype.forEach.call(head.cells, function (th, col) {
      th.classList.add("sortable");
      th.tabIndex = 0;
      th.title = "sort by this column";
      th.addEventListener("click", function () { sortBy(table, th, col); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, th, col); }
      });
    });
  });
})();
"""


def _text(inline) -> str:
    """A heading's plain text: its words and code spans, without the Markdown around them."""
    return "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline"))


def slug(text: str, taken: set[str]) -> str:
    """A stable anchor for a heading, unique in the page (``-2``, ``-3`` for repeated titles)."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


def _image(self, tokens, idx, options, env) -> str:
    """A local image becomes a data URI; one that is missing becomes a visible note rather than a broken
    page; a network image is shown as a link only, so opening the page never fetches anything."""
    token = tokens[idx]
    src = token.attrGet("src") or ""
    alt = self.renderInlineAsText(token.children or [], options, env)
    if src.startswith("data:"):
        return self.image(tokens, idx, options, env)
    if re.match(r"^[a-z][a-z0-9+.-]*:", src, re.I):
        return f'<a href="{html.escape(src)}">{html.escape(alt or src)} (external image, not embedded)</a>'
    path = env["folder"] / src
    kind = IMAGE_TYPES.get(path.suffix.lower())
    if kind is None or not path.is_file():
        why = "missing" if kind else "not an image this page can embed"
        return f'<span class="missing">image {html.escape(src)} {why}: {html.escape(alt)}</span>'
    token.attrSet("src", f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}")
    return self.image(tokens, idx, options, env)


def _parser() -> MarkdownIt:
    # Raw HTML in the Markdown is shown as text: a report quotes commands and data names, never markup.
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.add_render_rule("image", _image)
    md.add_render_rule("table_open", lambda self, tokens, idx, options, env: '<div class="table-wrap"><table>\n')
    md.add_render_rule("table_close", lambda self, tokens, idx, options, env: "</table></div>\n")
    return md


def to_html(text: str, folder: Path, source: str = "") -> str:
    """The page for Markdown ``text`` whose relative image paths are under ``folder``: a pure function of
    the two (and the image files), so the same report always gives the same page."""
    md = _parser()
    env = {"folder": Path(folder)}
    tokens = md.parse(text, env)
    title, toc, taken = "", [], set()
    for i, token in enumerate(tokens):
        if token.type != "heading_open":
            continue
        words = _text(tokens[i + 1])
        anchor = slug(words, taken)
        token.attrSet("id", anchor)
        if token.tag == "h1" and not title:
            title = words
        elif token.tag == "h2":
            toc.append((anchor, words))
    body = md.renderer.render(tokens, md.options, env)
    nav = ""
    if len(toc) > 1:
        links = "".join(f'<li><a href="#{a}">{html.escape(w)}</a></li>' for a, w in toc)
        long = " long" if len(toc) > 8 else ""  # two columns only where one would push the report down
        nav = f'<nav class="toc{long}"><strong>Contents</strong><ul>{links}</ul></nav>\n'
    if nav and "</h1>" in body:  # the contents right under the title, before the first section
        head, rest = body.split("</h1>", 1)
        body = f"{head}</h1>\n{nav}{rest}"
    else:
        body = nav + body
    footer = f"<footer>Generated from {html.escape(source)}.</footer>\n" if source else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title or source or 'Report')}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"{body}{footer}<script>{JS}</script>\n</body>\n</html>\n")


def write_next_to(markdown_path: Path, text: str) -> Path:
    """Writes ``<name>.html`` beside ``<name>.md`` (whose content is ``text``), atomically like every
    other output, and returns its path."""
    markdown_path = Path(markdown_path)
    path = markdown_path.with_suffix(".html")
    atomic_write_text(path, to_html(text, markdown_path.parent, markdown_path.name))
    return path
