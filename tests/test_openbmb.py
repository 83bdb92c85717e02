"""OpenBMB's MiniCPM-V checkpoints (forward(data=...)): batch format, the transformers-5 compat fixes, the
position tables, MiniCPM-V's own LoRA recipe and a smoke matrix. The checkpoint is a stand-in of the
project's own (tests/openbmb_standin/) with the same contract and the same pitfalls."""

import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.errors import BenchError
from bench.models.minicpmv_slices import SliceGeometry, best_grid, patch_tensor, slice_image
from bench.space import Cell
from bench.store import read_record, record_files
from conftest import run_cli
from openbmb_checkpoint import build_checkpoint

PROMPT = "{}\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def modules_cache(tmp_path_factory):
    """Remote code is copied to a per-test folder, never the user's Hugging Face cache."""
    from transformers import dynamic_module_utils

    folder = str(tmp_path_factory.mktemp("hf_modules"))
    saved = dynamic_module_utils.HF_MODULES_CACHE
    dynamic_module_utils.HF_MODULES_CACHE = folder
    yield folder
    dynamic_module_utils.HF_MODULES_CACHE = saved
    if folder in sys.path:
        sys.path.remove(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, modules_cache):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "minicpmv")


@pytest.fixture(scope="module")
def openbmb(checkpoint):
    from bench.models import get_adapter

    adapter = get_adapter(str(checkpoint), trust_remote_code=True)
    adapter.load(torch.device("cpu"))
    return adapter


@pytest.fixture(scope="module")
def items():
    from suites.docvqa.generate import generate

    return list(generate(4, seed=3))


def examples(adapter, items):
    return [adapter.example(PROMPT.format(it["question"]), it["image"], it["answers"][0]) for it in items]


# ------------------------------------------------------------------------------------------ slicing


def test_slice_grids_follow_the_area_and_the_aspect():
    geo = SliceGeometry(patch_size=14, scale_resolution=448, max_slice_nums=9)
    assert best_grid((448, 448), geo) is None  # one area: the whole image only
    assert best_grid((896, 448), geo) == (2, 1)  # two areas side by side: 2 columns, 1 row
    assert best_grid((448, 1344), geo) == (1, 3)
    assert best_grid((4000, 4000), geo) == (3, 3)  # capped at max_slice_nums
    sliced = slice_image(Image.new("RGB", (900, 460)), geo)
    assert sliced.grid == (2, 1) and len(sliced.images) == 3
    assert all(w % 14 == 0 and h % 14 == 0 for w, h in (im.size for im in sliced.images))
    small = slice_image(Image.new("RGB", (64, 48)), geo)  # upscaled to about 448^2, not cut
    assert small.grid is None and small.images[0].size == (518, 392)


def test_patch_layout_is_unfold_of_the_normalised_image():
    image = Image.fromarray((torch.rand(42, 56, 3) * 255).to(torch.uint8).numpy())
    pixels, (h, w) = patch_tensor(image, 14)
    assert pixels.shape == (3, 14, h * w * 14) and (h, w) == (3, 4)
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float()
    x = (x / 255 - 0.5) / 0.5  # mean = std = 0.5
    reference = F.unfold(x[None], (14, 14), stride=(14, 14))[0].reshape(3, 14, 14, -1).permute(0, 1, 3, 2).reshape(3, 14, -1)
    assert torch.allclose(pixels, reference, atol=1e-6)


# ------------------------------------------------------------------------------------------ batches


def test_batch_format_holds_query_num_placeholders_per_slice(openbmb, items):
    batch = openbmb.train_batch(examples(openbmb, items), torch.device("cpu"))
    ids, q = batch["input_ids"], openbmb.query_num
    marks = openbmb.ids
    for row in range(len(items)):
        pixels, sizes, bounds = batch["pixel_values"][row], batch["tgt_sizes"][row], batch["image_bound"][row]
        n = openbmb.slices(items[row]["image"]).n_slices + 1  # the whole image first, then the slices
        assert len(pixels) == len(sizes) == len(bounds) == n
        for t, (h, w) in zip(pixels, sizes.tolist()):
            assert t.shape == (3, 14, h * w * 14)
        for k, (start, end) in enumerate(bounds.tolist()):
            assert end - start == q and (ids[row, start:end] == marks["unk"]).all()
            assert ids[row, start - 1] == (marks["im_start"] if k == 0 else marks["slice_start"])
            assert ids[row, end] == (marks["im_end"] if k == 0 else marks["slice_end"])
        length = int(batch["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all()  # right-padded
        assert batch["position_ids"][row, :length].tolist() == list(range(length))
        assert (ids[row, length:] == 0).all() and (batch["labels"][row, length:] == -100).all()


def test_labels_are_shifted_once_and_the_loss_is_plain_cross_entropy(openbmb, items):
    batch = openbmb.train_batch(examples(openbmb, items), torch.device("cpu"))
    expected = torch.full_like(batch["labels"], -100)
    for row, it in enumerate(items):
        prompt = openbmb.prompt_ids(PROMPT.format(it["question"]), openbmb.slices(it["image"]))
        answer = openbmb.tokenizer.encode(it["answers"][0], add_special_tokens=False) + [openbmb.ids["chat_end"]]
        ids = batch["input_ids"][row].tolist()
        start = len(prompt)
        assert ids[:start] == prompt and ids[start : start + len(answer)] == answer  # generation sees the training prefix
        for p in range(start, start + len(answer)):
            expected[row, p - 1] = ids[p]  # position p-1 predicts token p
        expected[row, start + len(answer) - 1] = openbmb.tokenizer.eos_token_id  # after the answer's <|im_end|>
    assert torch.equal(batch["labels"], expected)
    with torch.no_grad():
        loss = openbmb.forward_loss(openbmb.model, batch)
        data = {k: v for k, v in batch.items() if k != "labels"}
        logits = openbmb.model(data=data, attention_mask=batch["attention_mask"], use_cache=False).logits
        logp = torch.log_softmax(logits.double(), -1)
        keep = expected != -100
        by_hand = -logp[keep].gather(1, expected[keep][:, None]).mean()
        shifted_again = openbmb.model(data=data, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert abs(shifted_again.item() - loss.item()) > 1e-3  # what labels= to the model would have trained


def test_batched_generation_matches_one_by_one(openbmb, items):
    prompts = [PROMPT.format(it["question"]) for it in items]
    arrays = [openbmb.image_array(it["image"]) for it in items]
    cpu = torch.device("cpu")
    together = openbmb.decode(openbmb.generate_ids(openbmb.model, openbmb.prompt_batch(prompts, arrays, cpu), 6))
    alone = [openbmb.decode(openbmb.generate_ids(openbmb.model, openbmb.prompt_batch([p], [a], cpu), 6))[0]
             for p, a in zip(prompts, arrays)]
    assert together == alone


def test_decode_stops_at_the_first_terminator(openbmb):
    tok = openbmb.tokenizer
    ids = tok.encode("42", add_special_tokens=False) + [openbmb.ids["chat_end"], 0, 0]  # rows end padded with token 0
    assert openbmb.decode(torch.tensor([ids])) == ["42"]


def test_vision_features_pool_every_slice(openbmb, items):
    feats = openbmb.vision_features([openbmb.image_array(it["image"]) for it in items], torch.device("cpu"))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"early": (len(items), 32), "final": (len(items), 32)}


# ------------------------------------------------------------------------------------------ compat


def test_every_compat_fix_is_applied_and_reported(openbmb):
    fixes = " | ".join(openbmb.fixes)
    for needle in ("torchvision", "modeling_attn_mask_utils", "typing.List", "post_init", "resampler.pos_embed",
                   "resampler.temporal_pos_embed", "apply_chat_template"):
        assert needle in fixes
    assert "torchvision" not in sys.modules or sys.modules["torchvision"].__spec__.origin is not None  # stub taken back
    assert not hasattr(F, "List")
    with pytest.raises(ImportError):
        __import__("transformers.modeling_attn_mask_utils")
    assert hasattr(openbmb.model, "all_tied_weights_keys")


def test_position_tables_are_garbage_after_loading_and_exact_after_the_refill(checkpoint, openbmb, items):
    from bench.models import minicpmv_compat as compat

    raw = compat.load(checkpoint, torch.float32, refill=False).model.eval()
    assert set(compat.table_errors(raw)) == {"resampler.pos_embed", "resampler.temporal_pos_embed"}
    assert all(not e <= 1e-2 for e in compat.table_errors(raw).values())  # transformers 5 left them unset
    batch = openbmb.train_batch(examples(openbmb, items[:2]), torch.device("cpu"))
    with torch.no_grad():
        before = openbmb.forward_loss(raw, batch)
        compat.refill_tables(raw)
        assert all(e <= compat.TABLE_TOLERANCE for e in compat.table_errors(raw).values())
        after = openbmb.forward_loss(raw, batch)
        assert after.item() == pytest.approx(openbmb.forward_loss(openbmb.model, batch).item(), rel=1e-6)
    assert abs(before.item() - after.item()) > 1e-4  # the garbage table changed the logits


def test_a_table_built_the_wrong_way_is_caught_in_one_line(tmp_path, modules_cache):
    from bench.models import get_adapter

    folder = build_checkpoint(tmp_path / "rows_first", table_layout="rows-first")
    with pytest.raises(BenchError) as err:
        get_adapter(str(folder), trust_remote_code=True).load(torch.device("cpu"))
    message = str(err.value)
    assert "pos_embed" in message and "sin-cos" in message and len(message.splitlines()) == 1


# ------------------------------------------------------------------------------------------ the recipe


def test_minicpmv_recipe_is_finetune_lora_sh(openbmb):
    """finetune_lora.sh: LoRA on llm\\..*layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj; finetune.py: modules_to_save
    embed_tokens and resampler, and vpm with tune_vision (true there)."""
    from bench.train import attach, detach, param_groups, resolve
    from bench.space import TrainSettings

    model = openbmb.model
    res = resolve(model, openbmb.roles, Cell("qkvo", 4, 8, "minicpmv-recipe"))
    theirs = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
    assert sorted(res.lora) == sorted(n for n, _ in model.named_modules() if re.fullmatch(theirs, n))
    assert res.full == ["llm.model.embed_tokens", "resampler", "vpm"]
    names = {n for n, _ in model.named_modules()}
    for short in ("embed_tokens", "resampler", "vpm"):  # peft matches their short names by suffix: the same modules
        assert [n for n in names if n == short or n.endswith("." + short)] == [m for m in res.full if m.endswith(short)]
    peft_model = attach(model, res, Cell("qkvo", 4, 8, "minicpmv-recipe"), 0.05, 0)
    try:
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert any(".embed_tokens.modules_to_save." in n for n in trainable)
        assert any(n.startswith("base_model.model.vpm.modules_to_save.") for n in trainable)
        assert not any(".lm_head." in n or (".llm." in n and "lora_" not in n and "embed_tokens" not in n) for n in trainable)
        settings = TrainSettings(steps=1, batch_size=1, lr=1e-2, lr_connector=3e-3, lr_vision=1e-3)
        parts = {g["part"]: g["lr"] for g in param_groups(peft_model, openbmb.roles, settings)}
        assert parts == {"lora": 1e-2, "connector": 3e-3, "vision": 1e-3, "embeddings": 1e-3}
    finally:
        openbmb.model = detach(peft_model)


def test_the_recipe_needs_a_minicpmv_family(tiny):
    from dataclasses import replace

    from bench.train import resolve

    other = replace(tiny.roles, extra={})
    with pytest.raises(BenchError, match="minicpmv-recipe"):
        resolve(tiny.model, other, Cell("qv", 4, 8, "minicpmv-recipe"))


# ------------------------------------------------------------------------------------------ command line


def test_openbmb_checkpoint_is_refused_without_the_flag(checkpoint, tmp_path, capsys):
    from bench.cli import main

    out = tmp_path / "out"
    assert main(["--suite", "docvqa", "--preset", "smoke", "--model", str(checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and len(err.strip().splitlines()) == 1
    assert not (out / "records").exists()


def test_openbmb_smoke_matrix_with_the_flag(checkpoint, tmp_path):
    out = tmp_path / "out"
    result = run_cli("--suite", "docvqa", "--preset", "smoke", "--targets", "qv", "--vision", "frozen,minicpmv-recipe",
                     "--model", str(checkpoint), "--trust-remote-code", "--out", str(out),
                     env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [read_record(p) for p in record_files(out / "records" / "docvqa", "")]
    cells = [r for r in records if r["kind"] == "cell"]
    assert len(cells) == 2 and all(r["status"] == "ok" for r in cells)
    assert {tuple(r["resolution"]["full"]) for r in cells} == {(), ("llm.model.embed_tokens", "resampler", "vpm")}
    fixes = [line for line in result.stdout.splitlines() if "MiniCPM-V compat fixes applied" in line]
    assert len(fixes) == 1 and "pos_embed" in fixes[0]
