"""Bad input: one line naming the problem and the fix, exit status 2, no traceback, no results folder."""

import os
import shutil

import pytest

from bench.models.tiny_minicpmv import ASSET_DIR
from conftest import run_cli

CASES = {
    "unknown suite": (["--suite", "mathvista"], "unknown suite 'mathvista'"),
    "unknown model": (["--model", "gpt-17"], "unknown model 'gpt-17'"),
    "unknown target set": (["--targets", "qz"], "unknown target set 'qz'"),
    "unknown vision policy": (["--vision", "vit"], "unknown vision policy 'vit'"),
    "rank zero": (["--ranks", "0"], "--ranks has '0': each value must be a whole number >= 1"),
    "rank not a number": (["--ranks", "four"], "--ranks has 'four'"),
    "empty factor": (["--targets", ","], "--targets is empty"),
    "unknown LoRA variant": (["--variants", "lora,qlora"], "unknown LoRA variant 'qlora'; choose from lora, dora, rslora, pissa, loraplus"),
    "empty variants": (["--variants", ","], "--variants is empty"),
    "unknown preset": (["--preset", "huge"], "unknown preset 'huge'"),
    "cuda without gpu": (["--device", "cuda"], "no CUDA GPU is available"),
    "negative steps": (["--steps", "-1"], "--steps must be a whole number >= 1"),
    "rate not a number": (["--lrs", "1e-3,fast"], "--lrs has 'fast'"),
    "negative rate": (["--lrs", "1e-3,-1e-2"], "--lrs has '-1e-2': each value must be a finite number > 0"),
    "zero connector rate": (["--lr-connector", "0"], "--lr-connector must be a finite number > 0"),
    "budget with ranks": (["--param-budget", "1000", "--ranks", "4"], "--param-budget derives each target set's rank"),
    "zero budget": (["--param-budget", "0"], "--param-budget must be a whole number >= 1"),
    "margin out of range": (["--equivalence-margin", "2"], "--equivalence-margin must be a number in (0, 1)"),
    "worker without a study": (["--worker"], "--worker joins a study, but"),  # used to leave an empty study.journal
    "unknown export": (["--export", "gguf"], "--export 'gguf' is unknown; choose merged"),
    "export without saved adapters": (["--export", "merged", "--save-adapters", "none"], "--save-adapters none saves none"),
    "merged export of the embedded model": (["--export", "merged"], "tiny-minicpmv is the harness's own model class"),
}


def check_clean_failure(result, message, out):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not out.exists()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path):
    args, message = CASES[name]
    if name == "cuda without gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    result = run_cli("--preset", "smoke", *args, "--out", str(out))
    check_clean_failure(result, message, out)


def test_unwritable_output_folder(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a path below a regular file is unwritable for everyone
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "out"
        message = "not writable"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "out"
        message = "not writable"
    result = run_cli("--preset", "smoke", "--out", str(out))
    check_clean_failure(result, message, out)


def smoke_with_broken_checkpoint(tmp_path, damage, message):
    """Copy the embedded checkpoint, let ``damage`` edit the copy, and expect a clean failure."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ASSET_DIR, ckpt)
    damage(ckpt)
    out = tmp_path / "out"
    result = run_cli("--preset", "smoke", "--model", str(ckpt), "--out", str(out))
    check_clean_failure(result, message, out)


def test_missing_checkpoint_file(tmp_path):
    smoke_with_broken_checkpoint(tmp_path, lambda ckpt: (ckpt / "model.safetensors").unlink(), "model.safetensors is missing")


def test_corrupted_checkpoint_file(tmp_path):
    def zero_header(ckpt):
        weights = ckpt / "model.safetensors"
        weights.write_bytes(b"\x00" * 64 + weights.read_bytes()[64:])

    smoke_with_broken_checkpoint(tmp_path, zero_header, "cannot be loaded")


def test_target_set_matching_no_module(tmp_path):
    """A checkpoint whose LLM has no layers: every target set matches nothing."""
    import json

    from safetensors.torch import load_file, save_file

    def drop_llm_layers(ckpt):
        config = json.loads((ckpt / "config.json").read_text())
        config["text"]["num_hidden_layers"] = 0
        (ckpt / "config.json").write_text(json.dumps(config))
        weights = load_file(ckpt / "model.safetensors")
        kept = {k: v for k, v in weights.items() if not (k.startswith("llm.") and ".layers." in k)}
        save_file(kept, ckpt / "model.safetensors", metadata={"format": "pt"})

    smoke_with_broken_checkpoint(tmp_path, drop_llm_layers, "matches no module")
