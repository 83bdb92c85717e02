"""The bad-input catalogue (python -m bench.reliability --only inputs): enough kinds, and a section
that a selection of them renders (the whole catalogue, ~10 min, is the published run)."""

from bench.reliability import inputs


def test_the_catalogue_covers_at_least_25_kinds():
    names = [c.name for c in inputs.cases()]
    assert len(names) >= 25 and len(set(names)) == len(names)
    for word in ("--trials 0", "password", "--data", "bomb", "20000", "--model", "--out", "schema", "--similarity"):
        assert any(word in n for n in names), word


def test_a_selection_renders_its_section():
    text = inputs.section(["--cases", "trials 0,flag without"])
    assert text.startswith("## Bad inputs")
    assert "Command: `python -m bench.reliability --only inputs --cases trials 0,flag without`" in text
    assert "Machine: " in text and "torch " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 2
    assert all("| 2 | yes |" in row and "| nothing | refused cleanly |" in row for row in rows), rows
    assert "**2 kinds of bad input; 2 handled as designed**" in text
