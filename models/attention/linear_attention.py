"""Linear attention (Katharopoulos et al. 2020) with a configurable feature map, as MAD's `mh-linear-attention`.

Per head, with feature maps phi_q, phi_k:

    o_t = sum_{s<=t} (phi_q(q_t) . phi_k(k_s)) v_s  /  (phi_q(q_t) . sum_{s<=t} phi_k(k_s) + eps)

(the denominator only with `normalize`; without it the scores are scaled by 1/sqrt(F)). The state is
sum_s phi_k(k_s) v_s^T, `[F, V]` per head. The core op is fla-core's `chunk_linear_attn` on CUDA and
`naive_chunk_linear_attn` (time zero-padded to its chunk of 64) elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.fla_ops import BACKENDS, check_choice, fla, pad_time, reference_precision, split_heads, use_kernel

FEATURE_MAPS = ("elementwise_product", "identity", "relu", "elu", "hedgehog", "t2r", "dpfp")
DPFP_NU = 4


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, normalize: bool, backend: str = "auto"
) -> torch.Tensor:
    """Featurised q, k `[B, T, H, F]`, v `[B, T, H, V]` -> o `[B, T, H, V]` in v's dtype; scale 1/sqrt(F)."""
    scale = q.shape[-1] ** -0.5
    if use_kernel(q, backend):
        q, k, v = (t.contiguous() for t in (q, k, v))  # its normaliser's cumsum kernel has no contiguity guard
        o, _ = fla("linear_attn").chunk_linear_attn(q=q, k=k, v=v, scale=scale, normalize=normalize)
        return o
    T, dtype = q.shape[1], v.dtype
    with reference_precision(q):
        q, k, v = (pad_time(t.float(), 64) for t in (q, k, v))
        o = fla("linear_attn.naive").naive_chunk_linear_attn(q=q, k=k, v=v, scale=scale, normalize=normalize)
    return o[:, :T].to(dtype)


class FeatureMap(nn.Module):
    """`[B, T, H, D] -> [B, T, H, F]`, shared by the heads.

    `elementwise_product` (MAD's default): W1 x * W2 x, learned, F = D. `identity`, `relu`, `elu` (elu + 1): F = D.
    `hedgehog`: softmax([2 W x, -2 W x]), W initialised to the identity (kept by the backbone), F = 2D.
    `t2r`: relu(W x), F = D. `dpfp` (nu = 4): products of [relu(x), relu(-x)] with its rolls, F = 8D.
    """

    def __init__(self, kind: str, head_dim: int) -> None:
        super().__init__()
        self.kind = check_choice("feature_map", kind, FEATURE_MAPS)
        self.out_dim = {"hedgehog": 2 * head_dim, "dpfp": 2 * DPFP_NU * head_dim}.get(kind, head_dim)
        if kind == "elementwise_product":
            self.layer1 = nn.Linear(head_dim, head_dim)
            self.layer2 = nn.Linear(head_dim, head_dim)
        elif kind in ("hedgehog", "t2r"):
            self.layer = nn.Linear(head_dim, head_dim)
            if kind == "hedgehog":
                nn.init.eye_(self.layer.weight)
                nn.init.zeros_(self.layer.bias)
                self.layer.keep_init = True  # an identity start is the point of Hedgehog's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "elementwise_product":
            return self.layer1(x) * self.layer2(x)
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "elu":
            return F.elu(x) + 1
        if self.kind == "hedgehog":
            y = 2 * self.layer(x)
            return torch.cat((y, -y), dim=-1).softmax(dim=-1)
        if self.kind == "t2r":
            return F.relu(self.layer(x))
        if self.kind == "dpfp":
            x = torch.cat((F.relu(x), F.relu(-x)), dim=-1)  # [..., 2D]
            return torch.cat([x * x.roll(shifts=j, dims=-1) for j in range(1, DPFP_NU + 1)], dim=-1)
        return x  # identity


class LinearAttention(nn.Module):
    """Multi-head linear attention, `[B, T, dim] -> [B, T, dim]`, causal.

    Args:
        dim (int): model width.
        num_heads (int): heads. Default: 8.
        head_dim (int): q/k/v dim per head before the feature map. Default: 16.
        feature_map (str): one of FEATURE_MAPS. Default: `elementwise_product` (MAD's).
        tie_feature_map_qk (bool): one feature map for q and k. Default: False.
        normalize (bool): divide by the running key-sum normaliser (MAD's linear attention). Default: True.
        output_norm (bool): per-head RMSNorm on the output (fla's default layer). Default: False.
        norm_eps (float): epsilon of that RMSNorm. Default: 1e-5.
        backend (str): `auto`, `kernel` or `reference`. Default: `auto`.

    Init: PyTorch's Linear init (hedgehog: identity). State per layer: H * F * V, F from the feature map.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        head_dim: int = 16,
        feature_map: str = "elementwise_product",
        tie_feature_map_qk: bool = False,
        normalize: bool = True,
        output_norm: bool = False,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = check_choice("backend", backend, BACKENDS)
        self.num_heads, self.head_dim, self.normalize = num_heads, head_dim, normalize
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.feature_map_q = FeatureMap(feature_map, head_dim)
        self.feature_map_k = self.feature_map_q if tie_feature_map_qk else FeatureMap(feature_map, head_dim)
        self.o_norm = nn.RMSNorm(head_dim, eps=norm_eps) if output_norm else nn.Identity()
        self.o_proj = nn.Linear(inner, dim, bias=False)

    @property
    def state_size(self) -> int:
        """Recurrent state per layer: H * F * V."""
        return self.num_heads * self.feature_map_q.out_dim * self.head_dim

    def inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """`x [B, T, dim]` -> featurised q, k `[B, T, H, F]` and v `[B, T, H, V]`."""
        q = self.feature_map_q(split_heads(self.q_proj(x), self.head_dim))
        k = self.feature_map_k(split_heads(self.k_proj(x), self.head_dim))
        return dict(q=q, k=k, v=split_heads(self.v_proj(x), self.head_dim))

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(self.o_norm(o).flatten(-2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(linear_attention(**self.inputs(x), normalize=self.normalize, backend=self.backend), x)
