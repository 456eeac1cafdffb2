"""Latent-space realignment (LatentMAS, Eq. 3): maps a last-layer hidden state back into the
input-embedding space so it can be fed to the model as the next `inputs_embeds`.

W_a = (W_outᵀ W_out + λI)⁻¹ W_outᵀ W_in is the ridge solution of min ‖W_out W_a - W_in‖² + λ‖W_a‖²:
a hidden state h that the output head reads as a distribution over tokens is mapped to the matching
mixture of input embeddings, h W_a. It is solved once per model in fp32 (the Gram matrix is badly
conditioned in half precision) and the result is rescaled to the mean input-embedding norm, as in the
reference code, so latent inputs have the magnitude the first layer was trained on."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_LAMBDA = 1e-5


@dataclass(frozen=True)
class Alignment:
    """The realignment matrix [d, d] (fp32) and the target norm of a realigned vector."""

    matrix: torch.Tensor
    target_norm: torch.Tensor
    lam: float


def solve_alignment(w_in: torch.Tensor, w_out: torch.Tensor, lam: float = DEFAULT_LAMBDA) -> Alignment:
    """Solves the normal equations (W_outᵀW_out + λI) W_a = W_outᵀ W_in in fp32."""
    if w_in.shape != w_out.shape:
        raise ValueError(f"input embeddings {tuple(w_in.shape)} and output head {tuple(w_out.shape)} differ in shape")
    w_in32 = w_in.detach().to(torch.float32)
    w_out32 = w_out.detach().to(torch.float32)
    gram = w_out32.T @ w_out32
    gram = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    matrix = torch.linalg.solve(gram, w_out32.T @ w_in32)
    return Alignment(matrix=matrix, target_norm=w_in32.norm(dim=1).mean(), lam=lam)


def identity_alignment(w_in: torch.Tensor) -> Alignment:
    """No realignment, only the norm rescaling (the reference code's ablation without realign)."""
    w_in32 = w_in.detach().to(torch.float32)
    eye = torch.eye(w_in32.shape[1], dtype=torch.float32, device=w_in32.device)
    return Alignment(matrix=eye, target_norm=w_in32.norm(dim=1).mean(), lam=0.0)


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[float, bool], Alignment]] = weakref.WeakKeyDictionary()


def alignment_for(model: nn.Module, lam: float = DEFAULT_LAMBDA, realign: bool = True) -> Alignment:
    """The alignment of `model` (a HF causal LM, PEFT-wrapped or not), computed once and cached.

    Adapters never touch the embeddings or the output head here, so one matrix serves every expert."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    w_in_module = get_in() if get_in else None
    w_out_module = get_out() if get_out else None
    if w_in_module is None or w_out_module is None:
        raise RuntimeError("latent realignment needs a causal LM with input embeddings and an output head")
    per_model = _CACHE.setdefault(w_in_module, {})
    key = (lam, realign)
    if key not in per_model:
        w_in = w_in_module.weight
        per_model[key] = solve_alignment(w_in, w_out_module.weight, lam) if realign else identity_alignment(w_in)
    return per_model[key]


def realign(hidden: torch.Tensor, alignment: Alignment) -> torch.Tensor:
    """h W_a rescaled to the target norm, in fp32, returned in the hidden state's dtype."""
    aligned = hidden.to(torch.float32) @ alignment.matrix.to(hidden.device)
    norm = aligned.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    aligned = aligned * (alignment.target_norm.to(hidden.device) / norm)
    return aligned.to(hidden.dtype)
