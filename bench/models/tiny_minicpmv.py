"""The embedded tiny MiniCPM-V-shaped VLM: ``vpm`` (SigLIP) + ``resampler`` + ``llm`` (Qwen2).

Module names follow MiniCPM-V so the same role patterns (``llm\\..*self_attn\\.q_proj``, ``vpm``,
``resampler``) select the same parts here as in a real checkpoint. The weights shipped in
``bench/assets/tiny-minicpmv`` come from ``python -m bench.pretrain`` (see that module).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from bench.errors import BenchError
from bench.images import to_rgb
from bench.models.adapter import RoleMap, VLMAdapter

IMAGE_START, IMAGE_END, IMAGE_PAD = "<image>", "</image>", "<unk>"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_START, IMAGE_END]
# Printable ASCII and newline: every character a suite can ask or answer about.
CHARACTERS = [chr(c) for c in range(32, 127)] + ["\n"]
# The field's standard short-answer instruction as one token, like a BPE merge of a frequent phrase:
# spelled out in characters it would be 51 tokens, most of a prompt's length and cost.
PHRASES = ["Answer the question using a single word or phrase."]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (plus :data:`PHRASES`), deterministic, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from tokenizers import AddedToken

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_tokens([AddedToken(p, normalized=False, single_word=False) for p in PHRASES])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=[IMAGE_START, IMAGE_END],
        padding_side="left",
    )


@dataclass
class TinyMiniCPMVConfig:
    """Sizes of the three parts; serialized as ``config.json`` beside the weights."""

    image_size: int = 64
    patch_size: int = 8
    query_num: int = 64  # one visual token per patch: 64x64 px holds nothing to compress
    vision: dict = field(
        default_factory=lambda: dict(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
        )
    )
    text: dict = field(
        default_factory=lambda: dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    )
    model_type: str = "tiny-minicpmv"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TinyMiniCPMVConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """2D sin-cos position table (h*w, dim), as MiniCPM-V's resampler builds it."""
    if dim % 4:
        raise ValueError(f"resampler width {dim} must be divisible by 4")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for grid in (ys.reshape(-1), xs.reshape(-1)):
        out = grid[:, None] * omega[None, :]
        parts += [torch.sin(out), torch.cos(out)]
    return torch.cat(parts, dim=1).float()


class Resampler(nn.Module):
    """MiniCPM-V's perceiver resampler: learnable queries cross-attend to vision tokens + 2D sin-cos.

    Initialisation differs from a plain random one on purpose: each query starts as the position code
    of one cell of a coarse grid and the attention's q/k projections start near identity, so a query
    first attends to its own image region. A randomly initialised resampler pools almost uniformly and
    cannot learn where things are from small data (measured while building the embedded model).
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int):
        super().__init__()
        self.num_queries, self.embed_dim = num_queries, embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

    @torch.no_grad()
    def init_local(self, grid_hw: tuple[int, int], sharpness: float = 2.0, content_gain: float = 0.1) -> None:
        """Start every query attending to one cell of a coarse grid over the patches.

        Keys read the four highest sin-cos frequencies of their position (a selection in ``k``),
        queries are solved so that ``q`` holds the same code for the cell centre; per head the score is
        then ``sum(cos(dy*w) + cos(dx*w))``, peaked at the query's own cell. Content enters keys scaled
        by ``content_gain`` so position dominates at first and training can raise it.
        """
        side = math.isqrt(self.num_queries)
        if side * side != self.num_queries:
            raise ValueError(f"query_num {self.num_queries} must be a square for the local init")
        d, heads = self.embed_dim, self.attn.num_heads
        head_dim, quarter = d // heads, d // 4
        freqs = 4
        if 4 * freqs > head_dim:
            raise ValueError(f"head width {head_dim} too small for the local init")
        # Columns of the sin-cos table that carry the `freqs` highest frequencies (see sincos_2d).
        cols = [q * quarter + i for q in range(4) for i in range(freqs)]
        h, w = grid_hw
        centres = torch.tensor(
            [((i + 0.5) * h / side - 0.5, (j + 0.5) * w / side - 0.5) for i in range(side) for j in range(side)],
            dtype=torch.float64,
        )
        omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        code = []  # (Q, 4*freqs): the key-side code of each query's centre
        for axis in (0, 1):
            ang = centres[:, axis : axis + 1] * omega[None, :freqs]
            code += [torch.sin(ang), torch.cos(ang)]
        code = torch.cat([code[0], code[1], code[2], code[3]], dim=1)
        w_k = torch.zeros(d, d, dtype=torch.float64)
        targets = torch.zeros(self.num_queries, d, dtype=torch.float64)
        scale = sharpness * math.sqrt(head_dim)  # attention divides by sqrt(head_dim)
        for head in range(heads):
            for slot, col in enumerate(cols):
                w_k[head * head_dim + slot, col] = 1.0
            targets[:, head * head_dim : head * head_dim + 4 * freqs] = code * scale
        self.query.normal_()
        normed = self.ln_q(self.query).double()  # (Q, d)
        w_q = targets.T @ torch.linalg.pinv(normed.T)  # min-norm solution of w_q @ normed.T = targets.T
        self.attn.in_proj_weight[:d].copy_(w_q.float())
        self.attn.in_proj_weight[d : 2 * d].copy_(w_k.float())
        self.attn.in_proj_bias.zero_()
        self.ln_kv.weight.fill_(content_gain)

    def pos_embed(self, h: int, w: int, device, dtype) -> torch.Tensor:
        key = (h, w)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.embed_dim, h, w)
        return self._pos_cache[key].to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        batch = x.shape[0]
        x = self.ln_kv(self.kv_proj(x))  # B, P, D
        pos = self.pos_embed(*grid_hw, x.device, x.dtype)
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, batch, -1)  # Q, B, D
        kv = x.transpose(0, 1)  # P, B, D
        out = self.attn(q, kv + pos.unsqueeze(1), kv, need_weights=False)[0]
        return self.ln_post(out.transpose(0, 1)) @ self.proj


class TinyMiniCPMV(nn.Module):
    """vpm -> resampler -> llm, with image features scattered into the ``<unk>`` slots of the prompt."""

    base_model_prefix = ""  # peft reads this from transformers-like models (those with config.model_type)

    def __init__(self, config: TinyMiniCPMVConfig, vocab_size: int, special_ids: dict[str, int]):
        super().__init__()
        self.config = config
        vcfg = SiglipVisionConfig(
            image_size=config.image_size,
            patch_size=config.patch_size,
            vision_use_head=False,
            **config.vision,
        )
        tcfg = Qwen2Config(
            vocab_size=vocab_size,
            tie_word_embeddings=True,
            pad_token_id=special_ids["pad"],
            bos_token_id=special_ids["bos"],
            eos_token_id=special_ids["eos"],
            **config.text,
        )
        self.vpm = SiglipVisionModel(vcfg)
        self.resampler = Resampler(
            config.query_num, tcfg.hidden_size, tcfg.num_attention_heads, vcfg.hidden_size
        )
        self.llm = Qwen2ForCausalLM(tcfg)
        self.image_pad_id = special_ids["image_pad"]
        self.resampler.init_local(self.grid_hw(config.image_size, config.image_size))

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        return height // self.config.patch_size, width // self.config.patch_size

    def vision_embedding(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h, w = pixel_values.shape[-2:]
        native = h == w == self.config.image_size
        feats = self.vpm(pixel_values=pixel_values, interpolate_pos_encoding=not native).last_hidden_state
        return self.resampler(feats, self.grid_hw(h, w))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.llm.get_input_embeddings()(input_ids)
        vision = self.vision_embedding(pixel_values).to(embeds.dtype)
        slots = (input_ids == self.image_pad_id).unsqueeze(-1)
        return embeds.masked_scatter(slots, vision)

    def forward(self, input_ids, attention_mask, pixel_values, labels=None, **kwargs):
        embeds = self.embed(input_ids, pixel_values)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values, **gen_kwargs) -> torch.Tensor:
        """Greedy decoding through the LLM's own ``generate`` (KV cache); returns new tokens only."""
        embeds = self.embed(input_ids, pixel_values)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **gen_kwargs)


def special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "image_pad": tokenizer.convert_tokens_to_ids(IMAGE_PAD),
    }


def build_model(config: TinyMiniCPMVConfig, tokenizer: PreTrainedTokenizerFast) -> TinyMiniCPMV:
    return TinyMiniCPMV(config, len(tokenizer), special_ids(tokenizer))


MINICPMV_ROLES = RoleMap(
    vision="vpm",
    connector="resampler",
    llm_layer=r"llm\.model\.layers\.\d+",
    attention={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
    mlp={"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    vision_linear=r"vpm\..*\.(?:q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
    extra={"embeddings": "llm.model.embed_tokens"},  # trained fully by MiniCPM-V's own recipe (minicpmv-recipe)
)

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-minicpmv"
WEIGHTS = "model.safetensors"


def save_checkpoint(model: TinyMiniCPMV, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save(folder / "config.json")
    tokenizer.save_pretrained(folder)
    save_model(model, str(folder / WEIGHTS), metadata={"format": "pt"})


def load_checkpoint(folder: Path) -> tuple[TinyMiniCPMV, PreTrainedTokenizerFast]:
    """Build the model from ``config.json`` and load ``model.safetensors`` (never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    folder = Path(folder)
    for name in ("config.json", "tokenizer.json", WEIGHTS):
        if not (folder / name).is_file():
            raise BenchError(
                f"checkpoint file {folder / name} is missing; regenerate the embedded model with "
                f"`python -m bench.pretrain` or pass --model with a complete checkpoint folder"
            )
    try:
        config = TinyMiniCPMVConfig.from_dict(json.loads((folder / "config.json").read_text()))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        model = build_model(config, tokenizer)
        load_model(model, str(folder / WEIGHTS), strict=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BenchError(
            f"checkpoint {folder} cannot be loaded ({first}); regenerate it with "
            f"`python -m bench.pretrain` or restore it with `git checkout -- {folder}`"
        ) from exc
    return model, tokenizer


class TinyMiniCPMVAdapter(VLMAdapter):
    family = "tiny-minicpmv"
    roles = MINICPMV_ROLES
    control_suites = ("shapes",)  # held-out scenes of its pretraining (bench/pretrain.py)

    def __init__(self, source: Path | None = None):
        self.source = Path(source) if source else ASSET_DIR

    def display_name(self) -> str:
        return self.family if self.source == ASSET_DIR else f"{self.family} ({self.source})"

    def load(self, device: torch.device) -> None:
        model, tokenizer = load_checkpoint(self.source)
        self.attach(model.to(device).eval(), tokenizer)

    def attach(self, model: TinyMiniCPMV, tokenizer: PreTrainedTokenizerFast) -> None:
        """Use an in-memory model (the pretraining recipe builds one before any checkpoint exists)."""
        self.model, self.tokenizer = model, tokenizer
        self.image_size = model.config.image_size
        self._image_prefix = (
            [tokenizer.convert_tokens_to_ids(IMAGE_START)]
            + [model.image_pad_id] * model.config.query_num
            + [tokenizer.convert_tokens_to_ids(IMAGE_END)]
        )

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._image_prefix + self.tokenizer.encode(prompt + "\n", add_special_tokens=False)

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer.encode(answer, add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def image_array(self, image: Image.Image) -> np.ndarray:
        image = to_rgb(image)
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    def pixel_values(self, arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
        x = torch.from_numpy(np.stack(arrays)).to(device)
        dtype = next(self.model.parameters()).dtype
        return (x.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0).contiguous()

    def forward_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).loss

    def image_tokens(self) -> int:
        config = self.skeleton().config
        return (config.image_size // config.patch_size) ** 2

    def visual_tokens(self, image=None) -> int:
        """The placeholder slots of the prompt's image prefix (fixed: every image is resized to one size)."""
        if getattr(self, "model", None) is None:
            self.load(torch.device("cpu"))
        return self._image_prefix.count(self.model.image_pad_id)

    def pretraining_reference(self, n: int, seed: int) -> list[Image.Image]:
        """Scenes from the pretraining generator, at seeds the recipe and the shapes suite never used."""
        return [item["image"] for item in _pretraining_items(n, seed)]

    def pretraining_questions(self, n: int, seed: int) -> list[str]:
        """Questions and answers of the pretraining generator, at the seeds of :meth:`pretraining_reference`."""
        return [f"{item['question']} {item['answers'][0]}" for item in _pretraining_items(n, seed)]

    def generate_ids(self, model: torch.nn.Module, batch: dict, max_new_tokens: int) -> torch.Tensor:
        return model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )


@functools.lru_cache(maxsize=2)
def _pretraining_items(n: int, seed: int) -> tuple[dict, ...]:
    """Items of the pretraining generator at seeds the recipe and the shapes suite never used; drawn once
    for both the reference images and the reference questions."""
    from suites.shapes.generate import generate

    return tuple(itertools.islice(generate(n, seed=90_000 + seed), n))
