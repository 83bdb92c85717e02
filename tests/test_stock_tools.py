"""Stock tools on the harness's artefacts: lm-eval's own ``hf-multimodal`` model scores a saved adapter
on our suite, and ``--export merged`` folders load with from_pretrained alone and give the adapter's answers.

One tiny random LLaVA checkpoint (its processor needs no torchvision, which stock lm-eval would need for
the Qwen-like families' video processors), one run with the connector trained fully, so both the LoRA
and a ``modules_to_save`` copy are merged.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_families
from bench import export, suites
from bench.store import read_record, record_files
from bench.suite_data import cache_root
from conftest import ROOT, run_cli

FAMILY = "llava"
LIMIT = 4  # test items the stock command scores


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-cell matrix on a tiny LLaVA with --save-adapters best --export merged."""
    from bench.cli import main

    root = tmp_path_factory.mktemp("stock")
    model = root / FAMILY
    hf_families.save(FAMILY, model)
    out = root / "out"
    code = main(["--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "resampler", "--seeds", "0",
                 "--limit", "16", "--model", str(model), "--save-adapters", "best", "--export", "merged", "--out", str(out)])
    assert code == 0
    (record,) = [r for r in map(read_record, record_files(out / "records")) if r["kind"] == "cell"]
    assert record["status"] == "ok"
    return {"model": model, "out": out, "record": record}


def test_every_saved_adapter_has_its_merged_folder_and_command(run):
    record, out = run["record"], run["out"]
    assert record["adapter"] == f"adapters/docvqa/{record['key']}" and record["merged"] == f"merged/docvqa/{record['key']}"
    merged = out / record["merged"]
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in merged.iterdir()}
    assert not list((out / "merged" / "docvqa").glob(".*")), "no temporary left behind"
    script = out / record["adapter"] / "lm_eval.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "--model hf-multimodal" in text and f"peft={(out / record['adapter']).resolve()}" in text
    assert json.dumps({"data_dir": str(cache_root() / record["data"])}) in text
    assert f"max_gen_toks={record['max_gen_toks']}" in text and "--apply_chat_template" in text


def _stock(args: list[str], output) -> tuple[dict, dict]:
    """Run a stock lm-eval command line; its docvqa result and its answers by item id."""
    result = subprocess.run([*args, "--limit", str(LIMIT), "--device", "cpu", "--output_path", str(output), "--log_samples"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)})  # this checkout's bench
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (results,) = output.glob("*/results_*.json")
    (samples,) = output.glob("*/samples_docvqa_*.jsonl")
    answers = {s["doc"]["id"]: s["filtered_resps"][0].strip() for s in map(json.loads, samples.read_text().splitlines())}
    return json.loads(results.read_text())["results"]["docvqa"], answers


def test_stock_lm_eval_scores_the_saved_adapter_with_the_harness_s_answers(run, tmp_path):
    """The command written next to the adapter (lm-eval's hf-multimodal, peft=, our suite and data) exits 0,
    writes a score, and answers each item as the harness's own evaluation recorded it."""
    record = run["record"]
    score, answers = _stock([str(run["out"] / record["adapter"] / "lm_eval.sh")], tmp_path / "lm_eval")
    recorded = {i["id"]: i for i in record["items"]}
    assert len(answers) == LIMIT
    assert answers == {key: recorded[key]["prediction"] for key in answers}
    assert score["anls,none"] == pytest.approx(np.mean([recorded[key]["score"] for key in answers]))


def test_merged_folder_loads_with_from_pretrained_alone_and_reproduces_the_adapter(run):
    """AutoModelForImageTextToText + AutoProcessor on the merged folder, scored through the harness's own
    evaluation: every test answer is the adapter's recorded one; and the merged weights are not the base's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from bench.evaluate import evaluate
    from bench.models import get_adapter

    record, merged = run["record"], run["out"] / run["record"]["merged"]
    AutoProcessor.from_pretrained(merged)
    model = AutoModelForImageTextToText.from_pretrained(merged)
    base = AutoModelForImageTextToText.from_pretrained(run["model"]).state_dict()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    lora = {k for k in changed if ".language_model." in k}
    connector = {k for k in changed if ".multi_modal_projector." in k}
    assert lora and connector and changed == lora | connector
    assert all(k.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")) for k in lora)
    assert not any("lora" in k or "modules_to_save" in k for k in model.state_dict())

    adapter = get_adapter(str(merged))  # the harness's loader: the two from_pretrained calls above
    adapter.load(torch.device("cpu"))
    result = evaluate(adapter, adapter.model, suites.get("docvqa"), cache_root() / record["data"], torch.device("cpu"),
                      max_gen_toks=record["max_gen_toks"])
    assert result.items == record["items"]


def test_merged_folder_scores_in_stock_lm_eval_without_peft(run, tmp_path):
    """A tool that loads no adapter: lm-eval's hf-multimodal on the merged folder alone gives the same answers."""
    from bench import stock_eval

    record = run["record"]
    merged = run["out"] / record["merged"]
    args = stock_eval.command(merged, suites.get("docvqa"), cache_root() / record["data"], record["max_gen_toks"],
                              python=sys.executable)
    _, answers = _stock(args, tmp_path / "merged")
    recorded = {i["id"]: i["prediction"] for i in record["items"]}
    assert answers == {key: recorded[key] for key in answers}


def test_merged_folders_follow_the_kept_adapters(tmp_path):
    """--save-adapters best replaces a suite's adapter folder; the merged folder of the replaced run goes too."""
    for name in ("old", "new"):
        (tmp_path / "merged" / "docvqa" / name).mkdir(parents=True)
    (tmp_path / "adapters" / "docvqa" / "new").mkdir(parents=True)
    export.prune(tmp_path, "docvqa")
    assert [p.name for p in (tmp_path / "merged" / "docvqa").iterdir()] == ["new"]


@pytest.mark.parametrize("max_pixels", [16384, 256])  # above and below the checkpoint's min_pixels (1024)
def test_run_s_image_resolution_reaches_the_merged_folder_and_the_stock_command(tmp_path, max_pixels):
    """A run at --resolutions N: the merged folder's processor, and the processor hf-multimodal builds from
    the command's model arguments, resize as the run did, not as the base checkpoint does."""
    from transformers import AutoProcessor

    from bench import stock_eval
    from bench.models.hf import HFAdapter

    base, merged = tmp_path / "qwen2_vl", tmp_path / "merged"
    hf_families.save("qwen2_vl", base)
    merged.mkdir()
    export.copy_processor(base, merged)
    assert not list(merged.glob("*.safetensors")) and not (merged / "config.json").exists()
    adapter = HFAdapter(base)
    adapter.set_resolution(max_pixels)
    run_size = adapter.processor.image_processor.size
    assert AutoProcessor.from_pretrained(base).image_processor.size != run_size
    export.keep_resolution(adapter, merged)
    assert AutoProcessor.from_pretrained(merged).image_processor.size == run_size
    pixels = stock_eval.processor_args(adapter)  # hf-multimodal: AutoProcessor.from_pretrained(pretrained, **pixels)
    assert AutoProcessor.from_pretrained(base, **pixels).image_processor.size == run_size


def test_requests_carry_images_the_harness_never_decodes(tiny):
    """doc_to_image hands lm-eval lazy images: PIL images for hf-multimodal, read on first use as the
    harness reads files; the harness's own evaluation reads their paths and leaves them unread."""
    from PIL import Image

    from bench.evaluate import evaluate, load_task
    from bench.images import LazyImage, open_rgb

    suite = suites.get("docvqa")
    folder = suite.prepare(train_items=16, test_items=8, val_items=8)
    evaluate(tiny, tiny.model, suite, folder, torch.device("cpu"), batch_size=8)
    instances = load_task(suite, folder)["tasks"]["docvqa"]._instances  # the requests evaluate() used
    visuals = [i.args[2]["visual"][0] for i in instances]
    assert len(visuals) == 8 and all(isinstance(v, LazyImage) and not v.decoded for v in visuals)
    image = visuals[0]
    assert isinstance(image, Image.Image) and image.size == open_rgb(image.path).size and image.decoded
    assert np.array_equal(np.asarray(image), np.asarray(open_rgb(image.path)))


def test_merged_export_refuses_checkpoints_from_pretrained_cannot_load_alone(tmp_path):
    """OpenBMB's MiniCPM-V loads only with the harness's fixes to its shipped code: refused before any work."""
    from test_cli_errors import check_clean_failure

    folder = tmp_path / "minicpmv"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "minicpmv", "query_num": 4, "slice_config": {}}))
    out = tmp_path / "out"
    result = run_cli("--preset", "smoke", "--model", str(folder), "--trust-remote-code", "--export", "merged", "--out", str(out))
    check_clean_failure(result, "is a MiniCPM-V checkpoint whose shipped code loads only with the harness's fixes", out)
