import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Generated suite data goes to a per-session folder, never the user's cache."""
    os.environ["BENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    yield


@pytest.fixture(scope="session")
def tiny():
    """The shipped tiny-minicpmv adapter, loaded once (tests must hand its base model back intact)."""
    import torch

    from bench.models import get_adapter

    adapter = get_adapter("tiny-minicpmv")
    adapter.load(torch.device("cpu"))
    return adapter


def run_cli(*args, cwd=ROOT, timeout=600, env=None):
    """Run run_bench.py exactly as a user would."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_bench.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env,
    )
