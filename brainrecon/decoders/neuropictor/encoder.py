"""The fMRI encoder: a ViT autoencoder on 2-D cortical surface maps (fMRI-PTE, stage i).

The encoder cuts a ``(1, S, S)`` surface map into ``(S / p)^2`` patches, prepends a learnable
CLS token, adds fixed 2-D sine-cosine positions and runs pre-norm ViT blocks followed by a
final LayerNorm. NeuroPictor uses **all** tokens after that LayerNorm — ``(B, 1 + (S/p)^2, D)``,
257 x 1024 at full size — and fine-tunes the encoder in every later stage.

For its own training stage the encoder is paired with :class:`FMRIAutoencoderHead`: the CLS
token alone is projected to a bottleneck vector (``pred``, 1024 -> 2048), which a small ViT
decoder expands back into the map (one token plus ``(S/p)^2`` mask tokens). It is a one-token
bottleneck autoencoder, not a random-masking MAE (fMRI-PTE, Qian et al. 2023; official
``fmrienc_src/transformer_layers.py``).

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``blocks.i.attn.qkv``,
``blocks.i.mlp.fc1`` ...), the naming of the released fMRI-PTE checkpoint, so that weights
converted from it load with strict key checking.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# The official fMRI autoencoder builds every LayerNorm as ``nn.LayerNorm(dim)``, torch's default
# eps 1e-5 (``fmrienc_src/transformer_layers.py``, ``fMRI_Autoencoder``). brainrecon's saves
# before NeuroPictor layout 2 used the MAE value 1e-6; they keep it when loaded.
LAYER_NORM_EPS = 1e-5
LEGACY_LAYER_NORM_EPS = 1e-6


def sincos_position_embedding(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding.

    Half of the channels encode the row, half the column, each as sines and cosines of
    geometrically spaced frequencies (MAE's recipe); the CLS row, when present, is zeros.

    Parameters
    ----------
    dim : int
        Embedding width; a multiple of 4.
    grid_size : int
        Patches per side.
    cls_token : bool
        Prepend a zero row for the CLS token.

    Returns
    -------
    torch.Tensor
        float32 of shape ``(1, cls_token + grid_size**2, dim)``.
    """
    if dim % 4:
        raise ValueError(f"The position embedding width must be a multiple of 4, got {dim}.")
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                             np.arange(grid_size, dtype=np.float64), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1, 1) * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # MAE puts the column ("w") coordinate first.
    emb = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: ``(B, C, S, S) -> (B, (S/p)^2, D)``."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"surface_size {image_size} is not a multiple of patch_size {patch_size}."
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Width {dim} is not divisible by {heads} heads.")
        self.heads = heads
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability ``p`` (rescaled by ``1 - p``)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block``: mlp_ratio 4, qkv bias).

    ``drop`` (after the attention projection and in the MLP), ``attn_drop`` (attention
    weights) and ``drop_path`` (stochastic depth) are timm's three rates; the official
    autoencoder sets all three to the yaml's ``drop_rate``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, *, eps: float = LAYER_NORM_EPS,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for block in blocks:
        if use_checkpoint and torch.is_grad_enabled() and x.requires_grad:
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class FMRIEncoder(nn.Module):
    """ViT encoder of surface maps; returns all tokens after the final LayerNorm.

    Parameters
    ----------
    surface_size : int
        Side of the square input map (256 in NeuroPictor).
    patch_size : int
        Patch side (16).
    dim, depth, heads : int
        Width (1024), number of blocks (24) and attention heads (16).
    in_chans : int
        Input channels (1).
    eps : float
        LayerNorm eps (1e-5, the official value).
    drop, attn_drop, drop_path : float
        Dropout, attention dropout and stochastic-depth rates of every block (0; the official
        code sets all three to ``drop_rate`` of ``fMRI_AutoEncoder.yaml``). Active in training
        only.

    Notes
    -----
    ``pos_embed`` is a persistent buffer: it is fixed, but stored with the weights (as in the
    released checkpoint), so it is checked on load.
    """

    def __init__(self, *, surface_size: int = 256, patch_size: int = 16, dim: int = 1024,
                 depth: int = 24, heads: int = 16, in_chans: int = 1, eps: float = LAYER_NORM_EPS,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.surface_size = surface_size
        self.patch_embed = PatchEmbed(surface_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "pos_embed", sincos_position_embedding(dim, self.patch_embed.grid_size), persistent=True
        )
        self.blocks = nn.ModuleList([
            Block(dim, heads, eps=eps, drop=drop, attn_drop=attn_drop, drop_path=drop_path)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.gradient_checkpointing = False
        self._init_weights()

    @property
    def num_tokens(self) -> int:
        return 1 + self.patch_embed.num_patches

    def _init_weights(self) -> None:
        # MAE's initialisation: xavier for linear layers and the patch projection.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, surfaces: torch.Tensor) -> torch.Tensor:
        """Encode surface maps.

        Parameters
        ----------
        surfaces : torch.Tensor
            ``(B, S, S)`` or ``(B, 1, S, S)``.

        Returns
        -------
        torch.Tensor
            ``(B, 1 + (S/p)^2, dim)``: CLS token and patch tokens after the final LayerNorm.
        """
        if surfaces.ndim == 3:
            surfaces = surfaces.unsqueeze(1)
        x = self.patch_embed(surfaces)
        x = x + self.pos_embed[:, 1:].to(x.dtype)
        cls = (self.cls_token + self.pos_embed[:, :1]).to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = _run_blocks(self.blocks, x, self.gradient_checkpointing)
        return self.norm(x)


class FMRIAutoencoderHead(nn.Module):
    """Bottleneck and decoder used only to train the encoder (stage ``"encoder"``).

    ``pred`` projects the CLS token to a ``bottleneck``-d vector; the decoder embeds it,
    appends one mask token per patch, adds fixed sin-cos positions, runs its blocks and
    predicts every patch's pixels.
    """

    def __init__(self, *, surface_size: int = 256, patch_size: int = 16, encoder_dim: int = 1024,
                 bottleneck: int = 2048, dim: int = 512, depth: int = 8, heads: int = 16,
                 in_chans: int = 1, eps: float = LAYER_NORM_EPS, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = surface_size // patch_size
        self.in_chans = in_chans
        self.pred = nn.Linear(encoder_dim, bottleneck)
        self.decoder_embed = nn.Linear(bottleneck, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_position_embedding(dim, self.grid_size), persistent=True
        )
        self.decoder_blocks = nn.ModuleList([
            Block(dim, heads, eps=eps, drop=drop, attn_drop=attn_drop, drop_path=drop_path)
            for _ in range(depth)
        ])
        self.decoder_norm = nn.LayerNorm(dim, eps=eps)
        self.decoder_pred = nn.Linear(dim, patch_size**2 * in_chans)
        self.gradient_checkpointing = False
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Reconstruct maps from encoder tokens ``(B, 1 + N, D)``; returns ``(B, S, S)``."""
        z = self.pred(tokens[:, :1])
        x = self.decoder_embed(z)
        n = self.grid_size**2
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(x.shape[0], n, -1)], dim=1)
        x = x + self.decoder_pos_embed.to(x.dtype)
        x = _run_blocks(self.decoder_blocks, x, self.gradient_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return unpatchify(x, self.patch_size, self.in_chans)


def unpatchify(x: torch.Tensor, patch_size: int, in_chans: int = 1) -> torch.Tensor:
    """``(B, N, p*p*C)`` patch predictions -> ``(B, S, S)`` maps (``C = 1``) or ``(B, C, S, S)``."""
    B, N, _ = x.shape
    g = int(math.isqrt(N))
    x = x.reshape(B, g, g, patch_size, patch_size, in_chans)
    x = torch.einsum("bhwpqc->bchpwq", x).reshape(B, in_chans, g * patch_size, g * patch_size)
    return x[:, 0] if in_chans == 1 else x
