"""Stand-in for OpenBMB's perceiver resampler (test remote code; written for this project).

Like 2.6's resampler it takes ``List`` from a star import of torch.nn.functional, and it keeps its 2D and
temporal sin-cos position tables as non-persistent buffers, which transformers 5 loads as garbage.
"""

import numpy as np
import torch
from torch import nn
from torch.nn.functional import *  # noqa: F401,F403


def _code(dim, positions):
    """sin then cos of positions / 10000^(i / (dim/2)), in float64 (numpy: a CPU array even while
    transformers builds the model on the meta device)."""
    freqs = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.asarray(positions, dtype=np.float64)[..., None] * freqs
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def grid_table(dim, rows, cols, layout):
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    first, second = (c, r) if layout == "columns-first" else (r, c)
    return torch.from_numpy(np.concatenate([_code(dim // 2, first), _code(dim // 2, second)], axis=-1)).float()  # rows, cols, dim


def split_by_length(x: torch.Tensor, lengths) -> List[torch.Tensor]:  # noqa: F405  (List from the star import)
    return [x[i, :n] for i, n in enumerate(lengths)]


class StandInResampler(nn.Module):
    def __init__(self, num_queries, embed_dim, num_heads, kv_dim, max_size=(6, 9), max_temporal_size=16, layout="columns-first"):
        super().__init__()
        self.embed_dim, self.layout = embed_dim, layout
        self.query = nn.Parameter(0.02 * torch.randn(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q, self.ln_kv, self.ln_post = nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim), nn.LayerNorm(embed_dim)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))
        self.max_size = list(max_size)
        self.max_temporal_size = max_temporal_size
        self._set_2d_pos_cache(self.max_size)
        self._set_temporal_pos_cache(self.max_temporal_size)

    def _set_2d_pos_cache(self, max_size, device="cpu"):
        table = grid_table(self.embed_dim, max_size[0], max_size[1], self.layout)
        self.register_buffer("pos_embed", table.to(device), persistent=False)

    def _set_temporal_pos_cache(self, size, device="cpu"):
        self.register_buffer("temporal_pos_embed", torch.from_numpy(_code(self.embed_dim, np.arange(size))).float().to(device),
                             persistent=False)

    def forward(self, x, tgt_sizes):
        rows, cols = int(tgt_sizes[:, 0].max()), int(tgt_sizes[:, 1].max())
        if rows > self.max_size[0] or cols > self.max_size[1]:
            self.max_size = [max(rows, self.max_size[0]), max(cols, self.max_size[1])]
            self._set_2d_pos_cache(self.max_size, x.device)
        lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).tolist()
        longest = max(lengths)
        pos = torch.zeros((x.shape[0], longest, self.embed_dim), dtype=x.dtype, device=x.device)
        padding = torch.ones((x.shape[0], longest), dtype=torch.bool, device=x.device)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            pos[i, : h * w] = self.pos_embed[:h, :w].reshape(h * w, -1).to(x.dtype)
            padding[i, : h * w] = False
        kv = self.ln_kv(self.kv_proj(x[:, :longest]))
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[0], -1)
        out = self.attn(q, (kv + pos).transpose(0, 1), kv.transpose(0, 1), key_padding_mask=padding, need_weights=False)[0]
        return self.ln_post(out.transpose(0, 1)) @ self.proj
