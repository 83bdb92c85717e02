"""Section ``inputs``: every kind of bad input the harness knows of, given to the real command line in
a subprocess (``run_bench.py`` exactly as a user runs it), with what happened: the exit status, the
message, whether it was one line without a traceback, and whether anything was written.

    python -m bench.reliability --only inputs                  # all cases (6-12 min on 2 CPU cores)
    python -m bench.reliability --only inputs --cases trials,bomb   # the cases whose name holds a word

"Written" compares the case's results folder (and, for ``--data``, the prepared-data cache) before and
after the command: a refusal must leave both as they were.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.reliability import bad_images

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ["--suite", "shapes", "--preset", "smoke", "--targets", "qv", "--vision", "frozen", "--limit", "24"]
CHART = ["--suite", "chartqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen"]
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: a refused connection, at once


@dataclasses.dataclass
class Case:
    name: str  # the input, as the table shows it
    args: list[str]  # run_bench.py arguments; {out}, {data}, {d} (the case's folder) are filled in
    setup: Callable[[Path], None] | None = None  # writes the case's files under its folder
    env: dict = dataclasses.field(default_factory=dict)
    expect: str = "refused"  # refused: exit 2, one line, nothing written; runs: exit 0 (a converted input); either


# ----------------------------------------------------------------------------- setups


def _chart_with(kind: str, name: str = "train3"):
    return lambda d: bad_images.chartqa_dataset(d / "data", {name: kind})


def _chart_edit(edit):
    def setup(d: Path) -> None:
        bad_images.chartqa_dataset(d / "data")
        path = d / "data" / "test" / "test_human.json"
        rows = json.loads(path.read_text())
        edit(d / "data", rows)
        path.write_text(json.dumps(rows))

    return setup


def _file(name: str, content: bytes):
    def setup(d: Path) -> None:
        (d / "data").mkdir(parents=True, exist_ok=True)
        (d / "data" / name).write_bytes(content)

    return setup


def _images_folder(kind: str | None, n: int = 12):
    def setup(d: Path) -> None:
        from PIL import Image

        folder = d / "data"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 30), (20 * i, 10, 200)).save(folder / f"{i:02d}.png")
        if kind:
            bad_images.write(kind, folder, "zz-bad")

    return setup


def _checkpoint(damage):
    def setup(d: Path) -> None:
        from bench.models.tiny_minicpmv import ASSET_DIR

        shutil.copytree(ASSET_DIR, d / "ckpt")
        damage(d / "ckpt")

    return setup


def _zero_header(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\x00" * 64 + weights.read_bytes()[64:])


def _blocked_out(d: Path) -> None:
    (d / "blocker").write_text("a file where a folder should be\n")


def _out_is_file(d: Path) -> None:
    (d / "out").write_text("not a folder\n")


def _earlier_run(d: Path, env: dict) -> None:
    """A finished smoke run in {out}: the folder the next cases find."""
    done = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), *SMOKE, "--out", str(d / "out")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"error: the earlier run for a results-folder case failed: {done.stderr.strip().splitlines()[-1:]}")


def _previous_schema(d: Path, env: dict) -> None:
    """The earlier run's records rewritten as the previous schema (1) wrote them: no validation split."""
    _earlier_run(d, env)
    for path in (d / "out" / "records").glob("*/*.json.gz"):
        record = json.loads(gzip.decompress(path.read_bytes()))
        record["schema"] = 1
        for key in ("val_score", "val_items", "val_curve", "val_predictions"):
            record.pop(key, None)
        path.write_bytes(gzip.compress(json.dumps(record).encode(), mtime=0))


def _broken_record(d: Path, env: dict) -> None:
    _earlier_run(d, env)
    victim = sorted((d / "out" / "records").glob("*/*.json.gz"))[-1]
    victim.write_bytes(b"\x1f\x8b not gzip at all")


def _schema_from_the_future(d: Path, env: dict) -> None:
    _earlier_run(d, env)
    for path in (d / "out" / "records").glob("*/*.json.gz"):
        record = json.loads(gzip.decompress(path.read_bytes()))
        record["schema"] = 99
        path.write_bytes(gzip.compress(json.dumps(record).encode(), mtime=0))


NEEDS_ENV = {_previous_schema, _broken_record, _schema_from_the_future}


# ----------------------------------------------------------------------------- the cases


def cases() -> list[Case]:
    out = ["--out", "{out}"]
    c = [
        # flags
        Case("`--search optuna --trials 0` (used to run 20 trials)", [*SMOKE, "--search", "optuna", "--trials", "0", *out]),
        Case("`--steps -1`", [*SMOKE, "--steps=-1", *out]),
        Case("`--batch-size 2.5`", [*SMOKE, "--batch-size", "2.5", *out]),
        Case("`--lr nan`", [*SMOKE, "--lr", "nan", *out]),
        Case("`--lr inf`", [*SMOKE, "--lr", "inf", *out]),
        Case("`--lora-dropout 1`", [*SMOKE, "--lora-dropout", "1", *out]),
        Case("`--ranks 4,2.5`", [*SMOKE, "--ranks", "4,2.5", *out]),
        Case("`--seeds -1`", [*SMOKE, "--seeds=-1", *out]),
        Case("`--alpha nanr`", [*SMOKE, "--alpha", "nanr", *out]),
        Case("`--memory-budget 16XB`", [*SMOKE, "--memory-budget", "16XB", *out]),
        Case("`--sampler-seed 4294967296`", [*SMOKE, "--search", "optuna", "--sampler-seed", "4294967296", *out]),
        Case("`--samples 5` (similarity)", ["--similarity", "--data", "shapes", "--samples", "5", *out]),
        Case("an unknown flag (`--stepz 5`)", [*SMOKE, "--stepz", "5", *out]),
        Case("a flag without its value (`--steps`)", [*SMOKE, *out, "--steps"]),
        Case("an unknown suite", ["--suite", "mathvista", "--preset", "smoke", *out]),
        Case("an unknown preset", ["--suite", "shapes", "--preset", "huge", *out]),
        Case("an unknown target set", [*SMOKE[:4], "--targets", "qz", *out]),
        Case("an unknown vision policy", [*SMOKE[:4], "--vision", "vit", *out]),
        Case("`--param-budget` with `--ranks`", [*SMOKE, "--param-budget", "1000", "--ranks", "4", *out]),
        Case("`--protocol` with `--search`", [*SMOKE, "--search", "optuna", "--protocol", "exhaustive", *out]),
        Case("`--device cuda` (no GPU here)" if not _has_cuda() else "`--device cuda:99`",
             [*SMOKE, "--device", "cuda" if not _has_cuda() else "cuda:99", *out]),
        # storage
        Case("`--storage redis://host/0` (not a database URL)", [*SMOKE, "--storage", "redis://host/0", *out]),
        Case("`--storage` unreachable, `user:password@`", [*SMOKE, "--storage", f"postgresql://u:topsecret@{UNREACHABLE}/x", *out]),
        Case("`--storage` unreachable, `?password=`", [*SMOKE, "--storage", f"postgresql://u@{UNREACHABLE}/x?password=topsecret", *out]),
        Case("`--storage` with a raw `@` in the password", [*SMOKE, "--storage", f"postgresql://u:p@ss-word@{UNREACHABLE}/x", *out]),
        Case("`--storage mysql+pymysql://` unreachable, `%40` and `?passwd=`",
             [*SMOKE, "--storage", f"mysql+pymysql://u:top%40secret@{UNREACHABLE}/x?passwd=other-secret", *out]),
        Case("`--worker` with no study to join", [*SMOKE, "--worker", *out]),
        # data folders and files
        Case("`--data` that does not exist", [*CHART, "--data", "{d}/nowhere", *out]),
        Case("`--data` a text file", [*CHART, "--data", "{data}/notes.txt", *out], _file("notes.txt", b"hello\n")),
        Case("`--data` an empty JSON file", [*CHART, "--data", "{data}/empty.json", *out], _file("empty.json", b"")),
        Case("`--data` invalid JSON", [*CHART, "--data", "{data}/bad.json", *out], _file("bad.json", b'{"data": [')),
        Case("`--data` JSON of no known format", [*CHART, "--data", "{data}/odd.json", *out], _file("odd.json", b'{"hello": 1}')),
        Case("`--data` a damaged parquet shard", [*CHART, "--data", "{data}", *out], _file("train-0.parquet", b"PAR1 not really")),
        Case("`--data` a row without its answer", [*CHART, "--data", "{data}", *out], _chart_edit(lambda root, rows: rows[2].pop("label"))),
        Case("`--data` a row whose image is missing", [*CHART, "--data", "{data}", *out],
             _chart_edit(lambda root, rows: (root / "test" / "png" / rows[1]["imgname"]).unlink())),
        Case("`--data` with two suites", ["--suite", "chartqa,docvqa", "--preset", "smoke", "--data", "{data}", *out], _chart_with("grayscale (L)")),
        Case("`--data` of another suite's format", ["--suite", "textvqa", "--preset", "smoke", "--data", "{data}", *out], _chart_with("grayscale (L)")),
    ]
    # images inside a dataset
    for kind in bad_images.REFUSED:
        c.append(Case(f"`--data`: an image that is {kind}" if kind != "20000 x 20000 page" else "`--data`: a 20000 x 20000 page (400 MP)",
                      [*CHART, "--data", "{data}", *out], _chart_with(kind)))
    c += [
        Case("`--data`: images in 16-bit, CMYK, palette + transparency, LA, L, RGBA modes", [*CHART, "--data", "{data}", *out],
             lambda d: bad_images.chartqa_dataset(d / "data", dict(zip(["train0", "train1", "train2", "train3", "test0", "test1"],
                                                                      bad_images.CONVERTED))), expect="runs"),
        Case("`BENCH_MAX_IMAGE_PIXELS=lots`", [*CHART, "--data", "{data}", *out], _chart_with("grayscale (L)"),
             env={"BENCH_MAX_IMAGE_PIXELS": "lots"}),
        # similarity
        Case("`--similarity` without `--data`", ["--similarity", *out]),
        Case("`--similarity --data` an empty folder", ["--similarity", "--data", "{data}", *out], lambda d: (d / "data").mkdir()),
        Case("`--similarity --data`: a truncated JPEG among 12 images", ["--similarity", "--data", "{data}", "--samples", "20", *out],
             _images_folder("truncated JPEG")),
        Case("`--similarity --data`: a decompression bomb among 12 images", ["--similarity", "--data", "{data}", "--samples", "20", *out],
             _images_folder("decompression bomb (header: 100000 x 100000)")),
        Case("`--similarity --data`: a 20000 x 20000 page, `BENCH_MAX_IMAGE_PIXELS=400000000`",
             ["--similarity", "--data", "{data}", "--samples", "20", *out], _images_folder("20000 x 20000 page"),
             env={"BENCH_MAX_IMAGE_PIXELS": "400000000"}, expect="runs"),
        Case("`--recommend --results` a missing folder", ["--recommend", "--data", "shapes", "--results", "{d}/nowhere", *out]),
        # models
        Case("`--model gpt-17` (unknown)", [*SMOKE[:4], "--model", "gpt-17", *out]),
        Case("`--model`: a checkpoint without model.safetensors", [*SMOKE, "--model", "{d}/ckpt", *out],
             _checkpoint(lambda ckpt: (ckpt / "model.safetensors").unlink())),
        Case("`--model`: a checkpoint with a corrupted safetensors header", [*SMOKE, "--model", "{d}/ckpt", *out], _checkpoint(_zero_header)),
        Case("`--model`: a checkpoint whose config.json is not JSON", [*SMOKE, "--model", "{d}/ckpt", *out],
             _checkpoint(lambda ckpt: (ckpt / "config.json").write_text("{oops"))),
        # output folders
        Case("`--out` below a regular file (unwritable)", [*SMOKE, "--out", "{d}/blocker/out"], _blocked_out),
        Case("`--out` is a file", [*SMOKE, "--out", "{d}/out"], _out_is_file),
        Case("`--out` holding records of the previous schema (1)", [*SMOKE, *out], _previous_schema, expect="either"),
        Case("`--out` holding records of a newer schema (99)", [*SMOKE, *out], _schema_from_the_future),
        Case("`--out` holding a damaged record file", [*SMOKE, *out], _broken_record, expect="either"),
    ]
    return c


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- running


def _snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    if folder.is_file():
        st = folder.stat()
        return {".": (st.st_size, st.st_mtime_ns)}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _written(before: dict, after: dict) -> list[str]:
    return sorted(k for k, v in after.items() if before.get(k) != v) + sorted(f"(removed) {k}" for k in before if k not in after)


@dataclasses.dataclass
class Outcome:
    case: Case
    rc: int
    lines: list[str]
    traceback: bool
    written: list[str]
    prepared: list[str]
    seconds: float

    @property
    def message(self) -> str:
        return self.lines[-1] if self.lines else ""

    @property
    def one_line(self) -> bool:
        return len(self.lines) == 1 and self.lines[0].startswith("error: ") and not self.traceback

    @property
    def verdict(self) -> str:
        refused = self.rc == 2 and self.one_line and not self.written and not self.prepared
        if self.case.expect == "refused":
            return "refused cleanly" if refused else "**NOT clean**"
        if self.case.expect == "runs":
            return "handled (ran)" if self.rc == 0 else "**failed**"
        return "refused cleanly" if refused else "handled (ran)" if self.rc == 0 and not self.traceback else "**NOT clean**"


def run_case(case: Case, folder: Path, cache: Path) -> Outcome:
    folder.mkdir(parents=True)
    env = {**os.environ, "BENCH_CACHE_DIR": str(cache), "TQDM_DISABLE": "1", **case.env}
    if case.setup in NEEDS_ENV:
        case.setup(folder, {k: v for k, v in env.items() if k not in case.env})
    elif case.setup is not None:
        case.setup(folder)
    fill = {"out": str(folder / "out"), "data": str(folder / "data"), "d": str(folder)}
    args = [a.format(**fill) for a in case.args]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else folder / "out"
    before, cache_before = _snapshot(out), set(os.listdir(cache)) if cache.exists() else set()
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), *args], cwd=folder, capture_output=True, text=True,
                              env=env, timeout=1800)
        rc, stderr, stdout = done.returncode, done.stderr, done.stdout
    except subprocess.TimeoutExpired as exc:
        rc, stderr, stdout = "timeout", str(exc.stderr or ""), str(exc.stdout or "")
    seconds = time.perf_counter() - start
    cache_after = set(os.listdir(cache)) if cache.exists() else set()
    prepared = sorted(n for n in cache_after - cache_before if "-data-" in n)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return Outcome(case, rc, lines, "Traceback" in stderr + stdout, _written(before, _snapshot(out)), prepared, seconds)


def _cell(text: str, root: str) -> str:
    return text.replace(root, "<tmp>").replace("|", "\\|").replace("\n", " ")


def table(outcomes: list[Outcome], root: str) -> str:
    rows = ["| # | input | exit | one line, no traceback | what it said | written | outcome |", "|---|---|---|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        written = "nothing" if not o.written and not o.prepared else \
            "; ".join(filter(None, [f"{len(o.written)} file(s) in --out" if o.written else "",
                                    f"prepared data {', '.join(o.prepared)}" if o.prepared else ""]))
        said = o.message if o.rc != 0 else "(ran to the end)"
        rows.append(f"| {i} | {_cell(o.case.name, root)} | {o.rc} | {'yes' if o.one_line else 'no' if o.rc != 0 else '-'} | "
                    f"{_cell(said, root)} | {written} | {o.verdict} |")
    return "\n".join(rows)


def machine_line() -> str:
    from bench.machine import versions

    v = versions()
    try:
        import PIL

        v["pillow"] = PIL.__version__
    except ImportError:
        pass
    return (f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores; {platform.platform()}; versions: "
            + ", ".join(f"{k} {v[k]}" for k in v))


def section(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.reliability --only inputs")
    p.add_argument("--cases", help="comma-separated words: only the cases whose name holds one of them")
    args = p.parse_args(argv)
    chosen = cases()
    if args.cases:
        words = [w.strip().lower() for w in args.cases.split(",") if w.strip()]
        chosen = [c for c in chosen if any(w in c.name.lower() for w in words)]
    root = Path(tempfile.mkdtemp(prefix="bench-inputs-"))
    outcomes = []
    try:
        for i, case in enumerate(chosen, 1):
            outcome = run_case(case, root / f"case-{i:02d}", root / "cache")
            print(f"[{i}/{len(chosen)}] {case.name}: exit {outcome.rc} in {outcome.seconds:.1f} s: {outcome.message[:160]}", file=sys.stderr)
            outcomes.append(outcome)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    clean = sum(o.verdict in ("refused cleanly", "handled (ran)") for o in outcomes)
    command = "python -m bench.reliability --only inputs" + (f" --cases {args.cases}" if args.cases else "")
    lines = [
        "## Bad inputs: every kind tried, and what the harness did", "",
        f"Command: `{command}` ({sum(o.seconds for o in outcomes) / 60:.1f} min: each case is `run_bench.py` in its own "
        "process, in a fresh temporary folder; `<tmp>` below is that folder)", "",
        machine_line(), "",
        f"**{len(outcomes)} kinds of bad input; {clean} handled as designed** (refused: exit status 2, one line `error: "
        "<problem>; <fix>`, no traceback, nothing written in the results folder or the prepared-data cache; or, for a "
        "valid input in an awkward form, converted and run). \"written\" lists what changed in `--out` (and any prepared "
        "dataset) compared with before the command.", "",
        table(outcomes, str(root)), "",
        *([f"Not as designed: {', '.join(f'#{i} ({outcomes[i - 1].case.name})' for i in bad)}.", ""] if (bad := [
            i for i, o in enumerate(outcomes, 1) if o.verdict not in ("refused cleanly", "handled (ran)")]) else []),
        "Images (bench/images.py): every file is decoded in full once when a dataset is prepared (JPEG at 1/8 scale, "
        "which still reads every byte) and checked against a deliberate limit of 100,000,000 pixels (PIL's own guard, "
        "89.5 MP and a warning only up to twice that, is replaced): a 20000 x 20000 page (400 MP, 1.2 GB as RGB) is over it "
        "and refused from its header, with the setting that admits it (`BENCH_MAX_IMAGE_PIXELS`); with the limit raised it "
        "is decoded and used. 16-bit images are scaled to 8 bits (PIL's `convert` clips them to white), transparency "
        "is laid over white (dropping alpha shows black), CMYK/palette/grayscale go through PIL's conversion.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(section(sys.argv[1:]))
