"""The high-level guiding network (HLGN): fMRI tokens -> the UNet's cross-attention context.

Input: the encoder tokens ``F`` of shape ``(B, T, D)`` (257 x 1024 at full size). The
``Conv1d`` layers treat the ``T`` tokens as channels and the ``D`` features as the length
axis, so a kernel-1 convolution is a linear mixing of tokens shared across feature positions
(spec ``neuropictor.md`` §3)::

    branch(F) = LayerNorm(Linear_D->E(Conv1d(h->L, k1)(Conv1d(T->h, k1)(F)))))   # no nonlinearity
    main(F)   = branch_main(F)
    aux(F)    = ZeroConv1d(L->L, k3, pad 1)(branch_aux(F))                    # along the E axis
    C         = main(F) + aux(F)                                              # (B, L, E)

with ``h = 128``, ``L = 77`` context tokens and ``E = 1024`` (the text encoder's width). The
zero convolution makes ``aux`` exactly zero at initialisation; it is trained only in the
single-subject stage, so it is a no-op at the start of fine-tuning. ``main(F)`` alone is
pulled towards the caption's text embedding by the semantic loss.
"""

from __future__ import annotations

import torch
from torch import nn


class _Branch(nn.Module):
    def __init__(self, n_tokens: int, dim: int, context_tokens: int, context_dim: int, hidden: int):
        super().__init__()
        self.token_mix1 = nn.Conv1d(n_tokens, hidden, kernel_size=1)
        self.token_mix2 = nn.Conv1d(hidden, context_tokens, kernel_size=1)
        self.linear = nn.Linear(dim, context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(self.token_mix2(self.token_mix1(tokens))))


class SemanticNetwork(nn.Module):
    """High-level guiding network (main + zero-initialised auxiliary branch).

    Parameters
    ----------
    n_tokens : int
        Encoder tokens ``T`` (257).
    dim : int
        Encoder width ``D`` (1024).
    context_tokens : int
        Context length ``L`` (77, the tokenizer's maximum length).
    context_dim : int
        Context width ``E`` (1024, the UNet's ``cross_attention_dim``).
    hidden : int
        Intermediate token count (128).
    """

    def __init__(self, *, n_tokens: int = 257, dim: int = 1024, context_tokens: int = 77,
                 context_dim: int = 1024, hidden: int = 128):
        super().__init__()
        self.main = _Branch(n_tokens, dim, context_tokens, context_dim, hidden)
        self.aux = _Branch(n_tokens, dim, context_tokens, context_dim, hidden)
        self.aux_zero = nn.Conv1d(context_tokens, context_tokens, kernel_size=3, padding=1)
        nn.init.zeros_(self.aux_zero.weight)
        nn.init.zeros_(self.aux_zero.bias)

    def aux_parameters(self):
        """Parameters of the auxiliary branch (frozen and outside the optimiser in pre-training)."""
        return list(self.aux.parameters()) + list(self.aux_zero.parameters())

    def forward(self, tokens: torch.Tensor, use_aux: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Map encoder tokens to the cross-attention context.

        Parameters
        ----------
        tokens : torch.Tensor
            ``(B, T, D)``.
        use_aux : bool
            Add the auxiliary branch (single-subject stages); multi-subject pre-training
            bypasses it.

        Returns
        -------
        context : torch.Tensor
            ``(B, L, E)``, ``main + aux`` (or ``main`` alone).
        context_main : torch.Tensor
            ``(B, L, E)``, the main branch, target of the semantic loss.
        """
        main = self.main(tokens)
        if not use_aux:
            return main, main
        return main + self.aux_zero(self.aux(tokens)), main
