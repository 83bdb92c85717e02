"""MiniCPM-V's code ships inside its checkpoints: refused without --trust-remote-code, loaded through
AutoModel(trust_remote_code=True) with it. The remote code here is a small module written for the test
that builds the embedded model (same module names, same role map as MiniCPM-V)."""

import json
import shutil

from bench.models.tiny_minicpmv import ASSET_DIR
from bench.store import read_record, record_files
from conftest import run_cli

CONFIG = '''from transformers import PretrainedConfig


class TinyRemoteConfig(PretrainedConfig):
    model_type = "minicpmv"
'''

MODELING = '''from pathlib import Path

from transformers import PreTrainedModel

from bench.models.tiny_minicpmv import load_checkpoint

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteModel(PreTrainedModel):
    config_class = TinyRemoteConfig

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        model, _ = load_checkpoint(Path(path) / "weights")
        return model
'''


def remote_checkpoint(folder):
    folder.mkdir()
    shutil.copytree(ASSET_DIR, folder / "weights")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET_DIR / name, folder / name)
    (folder / "configuration_tinyremote.py").write_text(CONFIG)
    (folder / "modeling_tinyremote.py").write_text(MODELING)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "minicpmv", "architectures": ["TinyRemoteModel"],
        "auto_map": {"AutoConfig": "configuration_tinyremote.TinyRemoteConfig", "AutoModel": "modeling_tinyremote.TinyRemoteModel"},
    }))
    return folder


def test_remote_code_is_refused_without_the_flag(tmp_path, capsys):
    from bench.cli import main

    folder = remote_checkpoint(tmp_path / "minicpmv")
    out = tmp_path / "out"
    assert main(["--suite", "docvqa", "--preset", "smoke", "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    assert not (out / "records").exists()


def test_remote_code_smoke_matrix_with_the_flag(tmp_path):
    folder = remote_checkpoint(tmp_path / "minicpmv")
    out = tmp_path / "out"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,resampler+vpm",
                     "--model", str(folder), "--trust-remote-code", "--out", str(out),
                     env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [read_record(p) for p in record_files(out / "records" / "docvqa", "")]
    cells = [r for r in records if r["kind"] == "cell"]
    assert len(cells) == 2 and all(r["status"] == "ok" for r in cells)
    assert {tuple(r["resolution"]["full"]) for r in cells} == {(), ("resampler", "vpm")}
    assert "minicpmv" in result.stdout
