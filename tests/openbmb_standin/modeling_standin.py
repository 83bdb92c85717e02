"""Stand-in for OpenBMB's MiniCPM-V remote code (written for this project's tests, not copied).

Same contract as OpenBMB's 2.6 / 4.0 / 4.5: ``forward(data=...)`` with per-sample lists of patch-laid-out
slices (``[3, 14, h*w*14]``), ``tgt_sizes`` and ``image_bound``; ``position_ids`` from ``data`` and every
other keyword (``attention_mask``, ``use_cache``) handed to the LLM; no loss of its own use (labels in the
data are pre-shifted); ``generate(input_ids, pixel_values, tgt_sizes, image_bound, attention_mask,
tokenizer, **kwargs)`` decodes from the embeddings, padding finished rows with token 0. And the same
pitfalls under transformers 5: a bare ``import torchvision``, ``transformers.modeling_attn_mask_utils``,
no ``post_init()``, and non-persistent sin-cos tables in the resampler.
"""

import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (unused, as in OpenBMB's file)
from torch import nn
from transformers import Qwen2ForCausalLM, Qwen2PreTrainedModel
from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask
from transformers.modeling_outputs import BaseModelOutput

from .configuration_standin import StandInConfig
from .resampler_standin import StandInResampler


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, mask):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn, self.mlp = Attention(dim, heads), Mlp(dim, hidden)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"])
                                    for _ in range(cfg["num_hidden_layers"]))


class StandInVision(nn.Module):
    """A small ViT over variable-size slices: patch embedding, bucketed learned positions, masked attention."""

    def __init__(self, cfg):
        super().__init__()
        self.patch, self.side = cfg["patch_size"], cfg["image_size"] // cfg["patch_size"]
        self.embed_dim = cfg["hidden_size"]
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, self.patch, stride=self.patch)
        self.position_embedding = nn.Embedding(self.side * self.side, self.embed_dim)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(self.embed_dim)

    def forward(self, pixel_values, patch_attention_mask=None, tgt_sizes=None, output_hidden_states=False):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # batch, patches, dim
        b, n, _ = x.shape
        if tgt_sizes is None:
            tgt_sizes = torch.tensor([[pixel_values.shape[2] // self.patch, pixel_values.shape[3] // self.patch]] * b)
        valid = torch.ones((b, n), dtype=torch.bool, device=x.device) if patch_attention_mask is None else patch_attention_mask.view(b, -1)
        positions = torch.zeros((b, n), dtype=torch.long, device=x.device)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            rows = torch.arange(h, device=x.device) * self.side // h
            cols = torch.arange(w, device=x.device) * self.side // w
            positions[i, : h * w] = (rows[:, None] * self.side + cols[None, :]).flatten()
        x = x + self.position_embedding(positions)
        mask = None if bool(valid.all()) else _prepare_4d_attention_mask(valid, x.dtype)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x, mask)
            states.append(x)
        return BaseModelOutput(last_hidden_state=self.post_layernorm(x), hidden_states=tuple(states) if output_hidden_states else None)


class StandInMiniCPMV(Qwen2PreTrainedModel):
    config_class = StandInConfig

    def __init__(self, config):
        super().__init__(config)
        self.llm = Qwen2ForCausalLM(config)
        self.vpm = StandInVision(config.vision_config)
        self.resampler = StandInResampler(config.query_num, config.hidden_size, max(1, config.hidden_size // 32),
                                          self.vpm.embed_dim, layout=config.table_layout)
        self.terminators = ["<|im_end|>", "<|endoftext|>"]
        # no self.post_init(), as in OpenBMB's model

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def embed(self, data):
        embeds = self.llm.model.embed_tokens(data["input_ids"])
        slices = [t for sample in data["pixel_values"] for t in sample]
        if not slices:
            return embeds
        sizes = torch.cat([s for s in data["tgt_sizes"] if len(s)]).to(torch.int32)
        lengths = (sizes[:, 0] * sizes[:, 1]).tolist()
        pixels = torch.zeros((len(slices), 3, self.vpm.patch, max(lengths) * self.vpm.patch), dtype=embeds.dtype, device=embeds.device)
        valid = torch.zeros((len(slices), 1, max(lengths)), dtype=torch.bool, device=embeds.device)
        for i, (t, n) in enumerate(zip(slices, lengths)):
            pixels[i, :, :, : t.shape[-1]] = t.to(embeds.dtype)
            valid[i, 0, :n] = True
        features = self.resampler(self.vpm(pixels, patch_attention_mask=valid, tgt_sizes=sizes).last_hidden_state, sizes)
        rows, used = [], 0
        for b, sample in enumerate(data["pixel_values"]):
            row = embeds[b]
            if len(sample):
                slots = torch.cat([torch.arange(int(s), int(e)) for s, e in data["image_bound"][b]]).to(row.device)
                row = row.index_put((slots,), features[used : used + len(sample)].reshape(-1, row.shape[-1]).to(row.dtype))
                used += len(sample)
            rows.append(row)
        return torch.stack(rows)

    def forward(self, data, **kwargs):
        return self.llm(input_ids=None, position_ids=data["position_ids"].long(), inputs_embeds=self.embed(data), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, tgt_sizes=None, image_bound=None, attention_mask=None, tokenizer=None, **kwargs):
        embeds = self.embed({"input_ids": input_ids, "pixel_values": pixel_values, "tgt_sizes": tgt_sizes, "image_bound": image_bound})
        stops = [tokenizer.convert_tokens_to_ids(t) for t in self.terminators]
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, pad_token_id=0, eos_token_id=stops, **kwargs)
