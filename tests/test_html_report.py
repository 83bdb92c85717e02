"""results.html: one file that opens offline, embeds its figures and sorts its tables (checked in
headless Chromium when one is installed)."""

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from bench import html_report, report
from tests.test_report import RECORDS, record

REPORT = """# Tiny report

Intro with a [link](https://example.org/page) and `code`.

## Scores

| cell | score | interval |
|:-----|------:|:---------|
| b    | 0.943* | [0.9, 0.96] |
| a    | +0.012 [-0.01, +0.03] | x |
| c    | -3.5 [-4, -3] | y |
| e    | -20 | w |
| d    | 10.5 | z |

![scores plot](plot.png)

## Scores

<script>alert(1)</script>

![gone](missing.png)
"""


def png(path: Path, size=(120, 80)) -> bytes:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path.read_bytes()


def headings(text: str, pattern: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", h)).strip() for h in re.findall(pattern, text, re.S)]


def test_tables_become_sortable_tables_and_headings_get_a_contents(tmp_path):
    page = html_report.to_html(REPORT, tmp_path, "results.md")
    assert page.count("<table>") == 1 and "<th" in page and "<td" in page
    assert "data-sortable" in page and 'addEventListener("click"' in page
    assert "<title>Tiny report</title>" in page
    assert headings(page, r"<h2[^>]*>(.*?)</h2>") == ["Scores", "Scores"]
    ids = re.findall(r'<h2 id="([^"]+)"', page)
    assert ids == ["scores", "scores-2"]  # repeated titles stay distinct anchors
    nav = re.search(r'<nav class="toc">(.*?)</nav>', page, re.S).group(1)
    assert re.findall(r'href="#([^"]+)"', nav) == ids


def test_local_images_are_embedded_and_a_missing_one_is_noted(tmp_path):
    data = png(tmp_path / "plot.png")
    page = html_report.to_html(REPORT, tmp_path)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [data]
    assert 'src="plot.png"' not in page and 'alt="scores plot"' in page
    assert re.search(r'class="missing">image missing\.png missing', page)
    assert 'src="missing.png"' not in page


def test_nothing_is_loaded_from_the_network_and_raw_html_stays_text(tmp_path):
    png(tmp_path / "plot.png")
    text = REPORT + "\n![remote](https://example.org/a.png)\n"
    page = html_report.to_html(text, tmp_path)
    assert not re.search(r"""src\s*=\s*["']?(https?:)?//""", page, re.I)
    assert not re.search(r"<link\b|@import|url\(", page, re.I)  # no stylesheets or fonts from anywhere
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "(external image, not embedded)" in page
    assert 'href="https://example.org/page"' in page  # a link is navigation, not a load
    assert "default-src 'none'" in page  # and the browser enforces it


def test_write_next_to_writes_the_page_beside_the_markdown(tmp_path):
    png(tmp_path / "plot.png")
    (tmp_path / "results.md").write_text(REPORT)
    path = html_report.write_next_to(tmp_path / "results.md", REPORT)
    assert path == tmp_path / "results.html"
    assert path.read_text() == html_report.to_html(REPORT, tmp_path, "results.md")
    assert not list(tmp_path.glob("*.tmp"))


def test_the_kill_soak_accepts_a_whole_page_and_no_torn_one(tmp_path):
    from bench.reliability.kill import _parses

    page = html_report.write_next_to(tmp_path / "results.md", REPORT)
    assert _parses(page)
    page.write_text(page.read_text()[:2000])
    assert not _parses(page)


def write_report(out: Path) -> None:
    """results.md and results.html through the real path: heatmap, findings, sweep."""
    from types import SimpleNamespace

    records = RECORDS + [record("all", "frozen", 0, 0.5), record("qv", "resampler", 0, 0.6)]
    train = SimpleNamespace(steps=1, batch_size=1, lr=1e-3, lr_connector=1e-4, lr_vision=1e-4, lora_dropout=0.0)
    spec = SimpleNamespace(out=out, alpha_rule="2r", train=train, settings=[train], margin=0.01, search=None,
                           suites=("docvqa",))
    report.write_all(records, spec, Console(file=io.StringIO()))


def test_write_all_writes_results_html_with_the_same_sections(tmp_path):
    write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    page = (tmp_path / "results.html").read_text()
    assert page == html_report.to_html(md, tmp_path, "results.md")
    for level in (1, 2, 3):
        in_md = [line[level + 1:].strip() for line in md.splitlines() if line.startswith("#" * level + " ")]
        assert in_md and headings(page, rf"<h{level}[^>]*>(.*?)</h{level}>") == in_md
    heatmap = (tmp_path / "heatmap-docvqa.png").read_bytes()
    assert base64.b64encode(heatmap).decode() in page
    rules = [line for line in md.splitlines() if re.fullmatch(r"\|[-:| ]+\|", line)]  # one per Markdown table
    assert rules and page.count("<table>") == len(rules)


# ----------------------------------------------------------------------------- in a browser


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium package)")


def dump_dom(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console message (any: the page logs none)."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return result.stdout, console


# Clicks a header the way a reader does and records what the reader would see, for the dumped DOM.
CLICK = """<script>
var th = Array.prototype.find.call(document.querySelectorAll("th"), function (h) { return h.textContent.trim() === "%s"; });
var table = th.closest("table"), col = Array.prototype.indexOf.call(th.parentNode.cells, th), seen = [];
function column() { return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[col].textContent.trim(); }); }
th.click(); seen.push(column()); th.click(); seen.push(column());
document.body.setAttribute("data-seen", JSON.stringify(seen));
</script>
"""


def with_clicks(page: Path, header: str) -> Path:
    clicked = page.with_name("clicked.html")
    clicked.write_text(page.read_text().replace("</body>", CLICK % header + "</body>"))
    return clicked


def seen(dom: str) -> list[list[str]]:
    return json.loads(html.unescape(re.search(r'data-seen="([^"]*)"', dom).group(1)))


def test_the_page_sorts_by_leading_numbers_in_chromium(tmp_path):
    chromium()
    png(tmp_path / "plot.png")
    page = html_report.write_next_to(tmp_path / "results.md", REPORT)
    dom, console = dump_dom(with_clicks(page, "score"), tmp_path / "profile")
    assert console == []
    ascending, descending = seen(dom)
    assert ascending == ["-20", "-3.5 [-4, -3]", "+0.012 [-0.01, +0.03]", "0.943*", "10.5"]  # not as text: -3.5 < -20
    assert descending == ascending[::-1]
    dom, _ = dump_dom(with_clicks(page, "cell"), tmp_path / "profile")
    assert seen(dom) == [["a", "b", "c", "d", "e"], ["e", "d", "c", "b", "a"]]


def test_a_written_report_loads_in_chromium_without_console_messages(tmp_path):
    chromium()
    write_report(tmp_path)
    md = (tmp_path / "results.md").read_text()
    dom, console = dump_dom(tmp_path / "results.html", tmp_path / "profile")
    assert console == []
    assert headings(dom, r"<h2[^>]*>(.*?)</h2>") == [line[3:].strip() for line in md.splitlines() if line.startswith("## ")]
    tables = re.findall(r"<table[^>]*>", dom)
    assert tables and all('data-sortable="true"' in t for t in tables)  # the script ran on every table
    assert 'class="sortable"' in dom
