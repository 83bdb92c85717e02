"""transformers-native VLM families, loaded from a local folder with the Auto classes.

Each family is one entry of :data:`FAMILIES` (its role map and a few quirk flags); one adapter drives them
all through the family's own processor and chat template: the prompt is the user turn with one image,
the training target is what the chat template renders for the assistant turn (answer + end-of-turn),
the processor expands the image placeholders, and labels cover the answer tokens only.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.errors import BenchError
from bench.images import open_rgb, to_rgb
from bench.models.adapter import RoleMap, VLMAdapter

ATTENTION = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
LANGUAGE_LAYER = r"model\.language_model\.layers\.\d+"
TEXT_LAYER = r"model\.text_model\.layers\.\d+"  # Idefics3 / SmolVLM name their LLM text_model
ENCODER_LINEAR = r"\.encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"  # CLIP / SigLIP towers
INTERN_VIT_LINEAR = r"\.encoder\.layer\.\d+\.(?:attention\.(?:q_proj|k_proj|v_proj|projection_layer)|mlp\.fc[12])"  # InternViT


def _roles(vision: str, connector: str, llm_layer: str, vision_linear: str) -> RoleMap:
    return RoleMap(vision=vision, connector=connector, llm_layer=llm_layer, attention=dict(ATTENTION), mlp=dict(MLP),
                   vision_linear=vision_linear)


@dataclass(frozen=True)
class Knob:
    """A family's own image-resolution setting, held by its image processor.

    ``name`` is what the family calls it (the values ``--resolutions`` takes); it is the processor's
    ``size[key]`` when ``key`` is given, else its attribute ``name``. ``at_most``: a ``size`` key that is
    lowered to the knob when above it (Qwen's min_pixels would otherwise outrank a smaller max_pixels on
    small images). ``needs``: the processor flag without which the knob changes nothing (Idefics3 /
    SmolVLM resize to longest_edge only to cut tiles; MiniCPM-V slices only in slice mode). ``minimum``:
    the smallest value that means something, read off the processor."""

    name: str
    key: str | None = None
    at_most: str | None = None
    needs: str | None = None
    minimum: Callable[[object], int] | None = None


# Qwen2-VL / 2.5-VL / 3-VL: the image is resized to at most max_pixels pixels, in whole merged patches
MAX_PIXELS = Knob("max_pixels", key="longest_edge", at_most="shortest_edge",
                  minimum=lambda ip: (ip.patch_size * ip.merge_size) ** 2)
# Idefics3 / SmolVLM: the longest edge is resized to longest_edge, then cut into max_image_size tiles (+ a global view)
LONGEST_EDGE = Knob("longest_edge", key="longest_edge", needs="do_image_splitting")
# MiniCPM-V: a global view plus up to max_slice_nums slices of about scale_resolution^2 pixels
MAX_SLICE_NUMS = Knob("max_slice_nums", needs="slice_mode")


@dataclass(frozen=True)
class Family:
    roles: RoleMap
    nested_images: bool = False  # the processor wants one list of images per sample (SmolVLM, Gemma 3, Mllama)
    suffix_labels: bool = False  # the processor builds prompt + answer + labels itself from ``suffix`` (PaliGemma)
    template_bos: bool = False  # the chat template renders <bos> itself: the tokenizer must not add another (Gemma 3)
    string_answer: bool = False  # the chat template prints the assistant's content as is: give it a string (GLM-4.1V)
    resolution: Knob | None = None  # the family's image-resolution knob, for families with dynamic resolution


_CLIP_LIKE = {"vision": "model.vision_tower", "connector": "model.multi_modal_projector"}
# MiniCPM-V 4.6 / 4.7 / OCR: a SigLIP-like NaViT tower (its window-attention token merger, vit_merger, sits
# inside it after layer insert_layer_id) and an MLP merger into the Qwen3.5 LLM; vision LoRA on the encoder layers.
# Its Qwen3.5 LLM is hybrid: three of four layers are Gated DeltaNet (linear_attn) with one fused
# in_proj_qkv and an out_proj. A role means the module computing it in either kind of layer (q, k and v:
# the fused in_proj_qkv; o: out_proj), as GLM's fused gate_up_proj stands for gate and up; the DeltaNet
# gates (in_proj_z/a/b) are in no role.
HYBRID_ATTENTION = {r: rf"(?:self_attn\.{r}_proj|linear_attn\.in_proj_qkv)" for r in "qkv"} | {
    "o": r"(?:self_attn\.o_proj|linear_attn\.out_proj)"}
_MINICPM = RoleMap(vision="model.vision_tower", connector="model.merger", llm_layer=LANGUAGE_LAYER,
                   attention=HYBRID_ATTENTION, mlp=dict(MLP), names_are_regex=True,
                   vision_linear=r"model\.vision_tower" + ENCODER_LINEAR)

# model_type -> family. Qwen's connector (the patch merger) sits inside its vision tower, and its
# vision MLP uses gate/up/down_proj too: the LLM patterns are anchored on the decoder layers.
FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family(_roles("model.visual", "model.visual.merger", LANGUAGE_LAYER,
                              r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.fc[12])"), resolution=MAX_PIXELS),
    "qwen2_5_vl": Family(_roles("model.visual", "model.visual.merger", LANGUAGE_LAYER,
                                r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate|up|down)_proj)"),
                         resolution=MAX_PIXELS),
    "llava": Family(_roles(**_CLIP_LIKE, llm_layer=LANGUAGE_LAYER, vision_linear=r"model\.vision_tower" + ENCODER_LINEAR)),
    "llava_onevision": Family(_roles(**_CLIP_LIKE, llm_layer=LANGUAGE_LAYER, vision_linear=r"model\.vision_tower" + ENCODER_LINEAR)),
    "paligemma": Family(_roles(**_CLIP_LIKE, llm_layer=LANGUAGE_LAYER, vision_linear=r"model\.vision_tower" + ENCODER_LINEAR),
                        suffix_labels=True),
    "idefics3": Family(_roles("model.vision_model", "model.connector", TEXT_LAYER, r"model\.vision_model" + ENCODER_LINEAR),
                       resolution=LONGEST_EDGE),
    "smolvlm": Family(_roles("model.vision_model", "model.connector", TEXT_LAYER, r"model\.vision_model" + ENCODER_LINEAR),
                      nested_images=True, resolution=LONGEST_EDGE),
    "gemma3": Family(_roles(**_CLIP_LIKE, llm_layer=LANGUAGE_LAYER, vision_linear=r"model\.vision_tower" + ENCODER_LINEAR),
                     nested_images=True, template_bos=True),
    "internvl": Family(_roles(**_CLIP_LIKE, llm_layer=LANGUAGE_LAYER, vision_linear=r"model\.vision_tower" + INTERN_VIT_LINEAR)),
    # Llama 3.2 Vision: the image enters through cross-attention layers interleaved with the self-attention
    # layers (one or the other per decoder layer): each attention role means that layer's attention of either kind.
    "mllama": Family(RoleMap(
        vision="model.vision_model", connector="model.multi_modal_projector", llm_layer=LANGUAGE_LAYER,
        attention={r: rf"(?:self_attn|cross_attn)\.{r}_proj" for r in "qkvo"}, mlp=dict(MLP), names_are_regex=True,
        vision_linear=r"model\.vision_model\.(?:global_)?transformer\.layers\.\d+\.(?:self_attn\.[qkvo]_proj|mlp\.fc[12])"),
        nested_images=True),
    # Qwen3-VL's DeepStack mergers (model.visual.deepstack_merger_list) have no module path in common with
    # model.visual.merger but the tower: they count as vision encoder (trained fully by resampler+vpm only)
    "qwen3_vl": Family(_roles("model.visual", "model.visual.merger", LANGUAGE_LAYER,
                              r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.linear_fc[12])"),
                       resolution=MAX_PIXELS),
    # GLM-4.1V's LLM MLP is one fused gate_up_proj: LoRA on it stands for both gate and up
    "glm4v": Family(RoleMap(vision="model.visual", connector="model.visual.merger", llm_layer=LANGUAGE_LAYER,
                            attention=dict(ATTENTION), mlp={"gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj",
                                                            "down": "mlp.down_proj"},
                            vision_linear=r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate|up|down)_proj)"),
                    string_answer=True),
    "minicpmv4_6": Family(_MINICPM, resolution=MAX_SLICE_NUMS),
    "minicpmv4_7": Family(_MINICPM, resolution=MAX_SLICE_NUMS),
    "minicpm_ocr": Family(_MINICPM, resolution=MAX_SLICE_NUMS),
}


def resolution_families() -> str:
    """The families with an image-resolution knob, and its name: for one-line errors."""
    from bench.models.minicpmv import OpenBMBAdapter

    by_knob: dict[str, list[str]] = {}
    for model_type, family in FAMILIES.items():
        if family.resolution is not None:
            by_knob.setdefault(family.resolution.name, []).append(model_type)
    by_knob.setdefault(OpenBMBAdapter.resolution_knob, []).append("OpenBMB's minicpmv")
    return "; ".join(f"{knob} ({', '.join(types)})" for knob, types in by_knob.items())


@dataclass
class Item:
    """One training example: the chat-formatted prompt, the assistant continuation, and the image path."""

    prompt: str
    continuation: str
    image: str | Image.Image


class HFAdapter(VLMAdapter):
    keeps_paths = True  # training images are opened per batch, not held in memory
    loads_bf16_on_cuda = True

    def __init__(self, source: Path):
        self.source = Path(source)
        self.model_type = json.loads((self.source / "config.json").read_text())["model_type"]
        self.family = self.model_type
        self.spec = FAMILIES[self.model_type]
        self.roles = self.spec.roles
        self.resolution_knob = self.spec.resolution.name if self.spec.resolution else None
        self.resolution = None
        self.processor = None

    def _cannot_load(self, exc: Exception) -> BenchError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return BenchError(f"cannot load {self.model_type} checkpoint {self.source} ({first}); "
                          "point --model at a complete local checkpoint folder (config, weights, processor files)")

    def load(self, device: torch.device) -> None:
        import transformers
        from transformers import AutoModelForImageTextToText

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # our own progress bars report the work
        dtype = self._load_dtype(device)
        try:
            model = AutoModelForImageTextToText.from_pretrained(self.source, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise self._cannot_load(exc) from None
        self._load_processor()
        self.model = model.to(device).eval()
        self._forward_keys = set(inspect.signature(self.model.forward).parameters)

    def _load_processor(self) -> None:
        """The checkpoint's processor (once: a resolution set before :meth:`load` stays on it). Counting
        visual tokens needs it alone, so a checkpoint's tokens can be counted without its weights."""
        if self.processor is not None:
            return
        import transformers
        from transformers import AutoProcessor
        from transformers.processing_utils import ProcessorMixin

        transformers.logging.set_verbosity_error()
        register_image_only_processors()
        try:
            processor = AutoProcessor.from_pretrained(self.source)
        except (OSError, ValueError) as exc:
            raise self._cannot_load(exc) from None
        if not isinstance(processor, ProcessorMixin):
            raise BenchError(f"{self.source} has no image processor (AutoProcessor gave a {type(processor).__name__}); "
                             "save the checkpoint's processor next to its weights")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        knob = self.spec.resolution
        if knob is not None:  # the checkpoint's own setting, restored by set_resolution(None)
            image_processor = processor.image_processor
            self._knob_saved = image_processor.size if knob.key else getattr(image_processor, knob.name)

    # ---------------------------------------------------------------- resolution
    def default_resolution(self) -> int | None:
        knob = self.spec.resolution
        if knob is None:
            return None
        self._load_processor()
        value = _size_get(self._knob_saved, knob.key) if knob.key else self._knob_saved
        return None if value is None else int(value)

    def set_resolution(self, value: int | None) -> None:
        """Set the family's knob on its image processor, for every later batch (training, evaluation and
        vision features all go through it); None puts the checkpoint's own setting back."""
        knob = self.spec.resolution
        if knob is None:
            super().set_resolution(value)
            return
        self._load_processor()
        image_processor = self.processor.image_processor
        if value is None:
            if knob.key:
                image_processor.size = self._knob_saved
            else:
                setattr(image_processor, knob.name, self._knob_saved)
            self.resolution = None
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BenchError(f"{knob.name} must be a whole number >= 1 (got {value!r})")
        if knob.needs and not getattr(image_processor, knob.needs, False):
            raise BenchError(f"{self.source}'s image processor has {knob.needs} off, so {knob.name} changes nothing; "
                             f"drop --resolutions for this checkpoint (or turn {knob.needs} on in its processor config)")
        low = knob.minimum(image_processor) if knob.minimum else 1
        if value < low:
            raise BenchError(f"{knob.name} {value} is below one merged patch of {self.model_type} ({low} pixels): "
                             f"give at least {low}")
        if knob.key:
            changes = {knob.key: value}
            floor = _size_get(self._knob_saved, knob.at_most) if knob.at_most else None
            if floor is not None and floor > value:
                changes[knob.at_most] = value
            image_processor.size = _size_with(self._knob_saved, changes)
        else:
            setattr(image_processor, knob.name, value)
        self.resolution = value

    def _one_image(self, image) -> dict:
        """The processor's output for a prompt holding one image, at the current resolution."""
        self._load_processor()
        return self.processor(text=[self.encode_prompt("?")], images=self._images([image]), return_tensors="pt",
                              **self._specials())

    def _image_token_id(self) -> int:
        token_id = getattr(self.processor, "image_token_id", None)
        if token_id is None and getattr(self.processor, "image_token", None) is not None:
            token_id = self.tokenizer.convert_tokens_to_ids(self.processor.image_token)
        if token_id is None:
            config = json.loads((self.source / "config.json").read_text())
            token_id = config.get("image_token_id", config.get("image_token_index"))
        if token_id is None:
            raise BenchError(f"{self.source}: cannot tell which token holds the image (no image_token_id in the processor or config)")
        return int(token_id)

    def visual_tokens(self, image) -> int:
        """The image tokens the processor puts in the prompt for one image (every tile, slice or merged
        patch), at the current resolution."""
        return int((self._one_image(image)["input_ids"] == self._image_token_id()).sum())

    def vision_patches(self, image) -> int:
        """Patches the vision encoder runs over for one image at the current resolution, from the
        processor's output: Qwen/GLM's ``image_grid_thw``, MiniCPM-V's per-slice ``target_sizes``, else
        tiles x (side / patch)^2 of the pixel tensor."""
        out = self._one_image(image)
        if "image_grid_thw" in out:
            return int(out["image_grid_thw"].prod(-1).sum())
        if "target_sizes" in out:
            return int(out["target_sizes"].prod(-1).sum())
        pixels = out.get("pixel_values")
        vision = getattr(self.skeleton().config, "vision_config", None)
        patch = getattr(vision, "patch_size", None)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        if not torch.is_tensor(pixels) or not isinstance(patch, int) or pixels.dim() < 4:
            return self.image_tokens() or 0
        if "aspect_ratio_mask" in out:  # Mllama: [batch, images, tiles, C, H, W], unused tiles masked
            tiles = int(out["aspect_ratio_mask"].sum())
        else:  # [images or tiles, C, H, W], or [batch, tiles, C, H, W]
            tiles = int(np.prod(pixels.shape[:-3]))
        return tiles * (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)

    def skeleton(self) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForImageTextToText

        if getattr(self, "model", None) is not None:
            return self.model
        if getattr(self, "_skeleton", None) is not None:
            return self._skeleton
        try:
            config = AutoConfig.from_pretrained(self.source)
        except (OSError, ValueError) as exc:
            raise BenchError(f"cannot read the config of {self.source} ({str(exc).strip().splitlines()[0]}); "
                             "point at a checkpoint folder with a valid config.json") from None
        with torch.device("meta"):  # shapes only: no memory, no weights read
            self._skeleton = AutoModelForImageTextToText.from_config(config)
        return self._skeleton

    def image_tokens(self) -> int | None:
        vision = getattr(self.skeleton().config, "vision_config", None)
        size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if isinstance(size, (list, tuple)):
            size = size[0]
        if isinstance(patch, (list, tuple)):  # InternViT keeps (height, width) for both
            patch = patch[0]
        tiles = getattr(vision, "max_num_tiles", 1)  # Mllama encodes up to this many tiles of each image
        return tiles * (size // patch) ** 2 if isinstance(size, int) and isinstance(patch, int) and patch else None

    # ---------------------------------------------------------------- text
    def _messages(self, prompt: str, answer: str | None = None) -> list[dict]:
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        if answer is not None:
            content = answer if self.spec.string_answer else [{"type": "text", "text": answer}]
            turns.append({"role": "assistant", "content": content})
        return turns

    def encode_prompt(self, prompt: str) -> str:
        if self.spec.suffix_labels:
            return prompt
        return self.processor.apply_chat_template(self._messages(prompt), add_generation_prompt=True, tokenize=False)

    def continuation(self, prompt: str, answer: str) -> str:
        """What the chat template renders after the generation prompt for this answer, ending with an
        end-of-turn token (the tokenizer's EOS when the template itself does not close the turn)."""
        if self.spec.suffix_labels:
            return answer
        head = self.encode_prompt(prompt)
        full = self.processor.apply_chat_template(self._messages(prompt, answer), tokenize=False)
        tail = full[len(head):] if full.startswith(head) else answer
        tail = tail.rstrip()
        specials = set(self.tokenizer.all_special_tokens)
        if not any(tail.endswith(t) for t in specials if t):
            tail += self.tokenizer.eos_token or ""
        return tail

    def answer_tokens(self, prompt: str, answer: str) -> int:
        return len(self.tokenizer(self.continuation(prompt, answer), add_special_tokens=False)["input_ids"])

    def example(self, prompt: str, image, answer: str) -> Item:
        return Item(self.encode_prompt(prompt), self.continuation(prompt, answer), image)

    def image_array(self, image: Image.Image) -> np.ndarray:
        return np.asarray(to_rgb(image), dtype=np.uint8)

    # ---------------------------------------------------------------- batches
    def _images(self, images: list) -> list:
        opened = []
        for im in images:
            if isinstance(im, np.ndarray):
                im = Image.fromarray(im)
            elif not isinstance(im, Image.Image):
                im = open_rgb(im)
            opened.append(to_rgb(im))
        return [[im] for im in opened] if self.spec.nested_images else opened

    def _specials(self) -> dict:
        return {"add_special_tokens": False} if self.spec.template_bos else {}

    def _to(self, batch, device) -> dict:
        return {k: v.to(device) for k, v in batch.items() if k in self._forward_keys and hasattr(v, "to")}

    def train_batch(self, examples: list[Item], device: torch.device) -> dict:
        images = self._images([e.image for e in examples])
        if self.spec.suffix_labels:
            batch = self.processor(text=[e.prompt for e in examples], images=images, suffix=[e.continuation for e in examples],
                                   padding="longest", padding_side="left", return_tensors="pt")
            return self._to(batch, device)
        full = self.processor(text=[e.prompt + e.continuation for e in examples], images=images, padding="longest",
                              padding_side="left", return_tensors="pt", **self._specials())
        labels = torch.full_like(full["input_ids"], -100)
        tails = [self.tokenizer(e.continuation, add_special_tokens=False)["input_ids"] for e in examples]
        starts = []
        for row, tail in enumerate(tails):
            real = full["attention_mask"][row].nonzero().flatten()
            ids = full["input_ids"][row, real].tolist()
            # the answer is the tokens after the prompt; when the continuation tokenizes the same alone
            # (no merge across the boundary), they are the row's last len(tail) tokens
            starts.append(len(ids) - len(tail) if tail and ids[-len(tail):] == tail else None)
        if None in starts:  # a merge across the boundary: count the prompt's own tokens (images processed again)
            head = self.processor(text=[e.prompt for e in examples], images=images, padding="longest",
                                  padding_side="left", return_tensors="pt", **self._specials())
            starts = [int(head["attention_mask"][row].sum()) for row in range(len(examples))]
        for row, start in enumerate(starts):
            real = full["attention_mask"][row].nonzero().flatten()
            labels[row, real[start:]] = full["input_ids"][row, real[start:]]
        full["labels"] = labels
        return self._to(full, device)

    def prompt_batch(self, prompts: list[str], arrays: list[np.ndarray], device) -> dict:
        batch = self.processor(text=prompts, images=self._images(arrays), padding="longest", padding_side="left",
                               return_tensors="pt", **self._specials())
        return self._to(batch, device)

    def forward_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def generate_ids(self, model: torch.nn.Module, batch: dict, max_new_tokens: int) -> torch.Tensor:
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=self.tokenizer.pad_token_id)
        return out[:, batch["input_ids"].shape[1]:]

    def decode(self, new_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.processor.batch_decode(new_ids, skip_special_tokens=True)]

    def vision_features(self, arrays, device):
        """Mean-pooled states of an early and the last layer of the family's own vision encoder, each image
        preprocessed by the family's own image processor (tiles, slices or native resolution as the model
        sees them in training). One image per call: families batch images differently (Qwen concatenates
        patches, tilers add views), one at a time their tokens are that image's alone."""
        layers = _encoder_layers(self.model.get_submodule(self.roles.vision))
        picked = {"early": layers[max(0, len(layers) // 4 - 1)], "final": layers[-1]}  # as the embedded model pools
        run, names = _image_encoder(self.model, self.roles.vision)
        dtype = next(self.model.parameters()).dtype
        out: dict[str, list[torch.Tensor]] = {"early": [], "final": []}
        seen: dict[str, torch.Tensor] = {}

        def keep(label):
            def hook(_module, _args, output):
                hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
                seen[label] = hidden.float().reshape(-1, hidden.shape[-1]).mean(0)
            return hook

        handles = [module.register_forward_hook(keep(label)) for label, module in picked.items()]
        try:
            for array in arrays:
                inputs = self.processor.image_processor(images=[Image.fromarray(array).convert("RGB")], return_tensors="pt")
                kwargs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                          for k, v in inputs.items() if k in names and isinstance(v, torch.Tensor)}
                seen.clear()
                with torch.no_grad():
                    run(**kwargs)
                for label in out:
                    out[label].append(seen[label])
        finally:
            for h in handles:
                h.remove()
        return {label: torch.stack(rows) for label, rows in out.items()}


def _size_get(size, key: str):
    """A key of an image processor's ``size`` (a SizeDict or a plain dict); None when absent."""
    return size.get(key) if size is not None else None


def _size_with(size, changes: dict):
    """``size`` with ``changes``, of the same kind (a new SizeDict or dict; the original is kept)."""
    if isinstance(size, dict):
        return {**size, **changes}
    return replace(size, **changes)


def _encoder_layers(vision: torch.nn.Module) -> torch.nn.ModuleList:
    """The vision encoder's stack of layers: its longest ModuleList (blocks, layers; not a list of
    deepstack mergers or of the global stage's few layers)."""
    lists = [m for m in vision.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise BenchError(f"cannot find the layers of the vision encoder ({type(vision).__name__}) to pool features from")
    return max(lists, key=len)


def _image_encoder(model: torch.nn.Module, vision_path: str):
    """What runs the vision encoder on the image processor's outputs, and the input names it takes: the
    family's ``get_image_features`` (it knows the keyword names, e.g. Qwen's grid), else the tower itself."""
    for owner in (getattr(model, "model", None), model):
        fn = getattr(owner, "get_image_features", None)
        if fn is not None:
            names = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
            if "pixel_values" in names:
                return fn, names
    tower = model.get_submodule(vision_path)
    return tower, set(inspect.signature(tower.forward).parameters)


def register_image_only_processors() -> None:
    """Without torchvision, transformers 5 cannot build processors that declare a video processor
    (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4.1V, LLaVA-OneVision, SmolVLM, InternVL, MiniCPM-V 4.6/4.7/OCR):
    the constructor type-checks the empty video slot against a torchvision-only class. Image+text subclasses, registered with
    AutoProcessor, load the same saved files. With torchvision installed nothing is changed."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    import transformers
    from transformers import AutoProcessor

    try:
        from transformers.models.smolvlm import processing_smolvlm

        if getattr(processing_smolvlm, "num2words", None) is None:  # only video frame counts are spelled out
            processing_smolvlm.num2words = str
    except ImportError:
        pass
    for proc_name, config_name in (("Qwen2VLProcessor", "Qwen2VLConfig"), ("Qwen2_5_VLProcessor", "Qwen2_5_VLConfig"),
                                   ("LlavaOnevisionProcessor", "LlavaOnevisionConfig"), ("SmolVLMProcessor", "SmolVLMConfig"),
                                   ("InternVLProcessor", "InternVLConfig"), ("Qwen3VLProcessor", "Qwen3VLConfig"),
                                   ("Glm4vProcessor", "Glm4vConfig"),
                                   ("MiniCPMV4_6Processor", "MiniCPMV4_6Config"), ("MiniCPMV4_7Processor", "MiniCPMV4_7Config"),
                                   ("MiniCPMOcrProcessor", "MiniCPMOcrConfig")):
        parent, config = getattr(transformers, proc_name), getattr(transformers, config_name)
        AutoProcessor.register(config, image_only(parent), exist_ok=True)


_IMAGE_ONLY: dict[type, type] = {}


class _NoVideoProcessor:
    """Stands in for the absent video processor while a parent's ``__init__`` runs (MiniCPM's reads its
    slice mode and downsample mode there): every setting read off it is None."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def image_only(parent: type) -> type:
    """``parent`` without its ``video_processor`` argument. The subclass's ``__init__`` names every other
    parameter explicitly: ProcessorMixin saves and restores only the attributes its signature names
    (a ``**kwargs`` catch-all silently drops the chat template and token counts on reload). A base class
    between ``parent`` and ProcessorMixin names the sub-processors ``parent`` hands on positionally by
    ``parent``'s own order (Qwen: image, tokenizer, video; MiniCPM: image, video, tokenizer) and drops the
    video one."""
    if parent in _IMAGE_ONLY:
        return _IMAGE_ONLY[parent]
    from transformers.processing_utils import ProcessorMixin

    order = parent.get_attributes()

    def drop_video(self, *args, **kwargs):
        kwargs.update(zip(order, args))
        kwargs.pop("video_processor", None)
        ProcessorMixin.__init__(self, **kwargs)
        self.video_processor = _NoVideoProcessor()  # removed again once parent.__init__ returns

    params = [p for n, p in inspect.signature(parent.__init__).parameters.items()
              if n not in ("self", "image_processor", "tokenizer", "video_processor") and p.kind is p.POSITIONAL_OR_KEYWORD]
    defaults = {p.name: None if p.default is p.empty else p.default for p in params}
    head = "".join(f", {p.name}=_d[{p.name!r}]" for p in params)
    call = "".join(f", {p.name}={p.name}" for p in params)
    namespace = {"_parent": parent, "_d": defaults}
    exec(f"def __init__(self, image_processor=None, tokenizer=None{head}, **kwargs):\n"  # noqa: S102 - generated signature
         f"    _parent.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None{call},"
         f" **kwargs)\n"
         f"    self.__dict__.pop('video_processor', None)\n", namespace)
    attrs = {"__init__": namespace["__init__"], "__module__": __name__}
    if "apply_chat_template" in parent.__dict__:  # SmolVLM's reads the (absent) video processor's settings
        attrs["apply_chat_template"] = ProcessorMixin.apply_chat_template
    shim = type(f"_{parent.__name__}WithoutVideo", (ProcessorMixin,), {"__init__": drop_video, "__module__": __name__})
    sub = type(parent.__name__.replace("Processor", "ImageOnlyProcessor"), (parent, shim), attrs)
    _IMAGE_ONLY[parent] = sub
    globals()[sub.__name__] = sub
    return sub
