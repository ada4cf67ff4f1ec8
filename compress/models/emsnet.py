"""EMSNet: Efficient Multi-scale Spatial Interactions (a re-implementation from the text)

Source: X.-T. Vo, `Efficient Vision Transformers with Multi-Scale and Partial Attentions for Object Recognition`,
PhD dissertation (supervisor K.-H. Jo), University of Ulsan, 2023, Chapter 3. No official code or weights exist; this
file is built from the chapter's text and tables alone (its architecture figures 3.2-3.4 did not survive), so every
detail that lived only in a figure is a reading, listed below. It is not the authors' network and has no weights.

Network: stem (two 3x3 stride-2 convs) -> 4 stages of EMS blocks at strides 4/8/16/32. EMS block = MSI token mixer +
channel MLP (1x1 expand by the stage's MLP ratio, 1x1 back). MSI slices the channels into a static and a dynamic part:
* static (eqs. 3.1-3.5): 1x1 conv, whiten (subtract the mean), DWConv, split 1/4 : 1/2 : 1/4; the quarters go through
  PE (p x p max-pool + 1x1 conv) -> coordinate DWConv (1 x k_d then k_d x 1) -> Prop (depthwise transposed conv,
  kernel = stride = p) with p = 2 and 4, the half passes unchanged; concat -> 1x1 conv -> sigmoid gates a 1x1 conv of
  the static input.
* dynamic (eqs. 3.6-3.10): halves through PE (p x p average pool + 1x1 conv) -> C-MHSA (p = 4) or G-MHSA (p = 6) ->
  Prop; concat -> 1x1 conv. C-MHSA: a 3x3 stride-2 DWConv shrinks the map, a linear map M gives per position h
  attention matrices of k^2 x k^2 (k = 3), softmax; values = linear map N of the unfolded 3x3 / stride-2 windows;
  attended windows are folded back (overlaps summed). G-MHSA: plain multi-head self-attention over the pooled tokens.

Implementation notes:
* Patch sizes that do not divide the map (p = 4 and 6 at 14 x 14 and 7 x 7, p = 6 at 56 x 56, any p at odd sizes) are
  handled by padding bottom / right to the next multiple of p and cropping after Prop. The pad is `ceil_mode`
  pooling, so padded pixels never enter a max or an average (edge tokens are not pulled towards zero), and Prop's
  p * ceil(H / p) rows are cropped back to H. Identical to plain pooling where p divides; any input size works.
* C-MHSA applies N (no bias) per pixel before unfolding: the same function as projecting the unfolded, zero-padded
  windows (eq. 3.10's order), at fewer MACs (eq. 3.10's order would add 0.2-0.6 M MACs per variant).
* The channel split is slicing (views), as the text prescribes, not torch.split or a 1x1 conv.
* Conv layout (NCHW) and BatchNorm throughout, so every norm folds into the neighbouring conv for deployment.

Ambiguities (reading chosen, why, and the measured effect on params / GMACs at 224 for XXTiny / XTiny / Tiny):
1. C_s : C_d split ratio (never stated): 3 : 1 (C_s = 3C / 4). 1 : 1 changes params by < 1 % but gives 0.502 /
   0.675 / 1.771 GMACs (-7.1 / -3.6 / -6.8 % vs published: XXTiny and Tiny out of 5 %). 3 : 1 also tracks the ablation
   path (Table 3.5): static branch on all channels 2.78 M / 0.587 G here vs published 2.68 / 0.59, then the full block
   2.55 / 0.532 vs 2.56 / 0.54 (1 : 1 would give 2.56 / 0.502).
2. PE expansion ("a 1x1 conv to map the input to a higher dimension", factor not stated): each PE maps its slice back
   to its operator's width (static quarter C_s / 4 -> C_s, x4; dynamic half C_d / 2 -> C_d, x2). No expansion gives
   -11 / -12 / -10 % params and -7 / -4 / -7 % GMACs vs published; x2 for both -5.4 / -6.6 / -4.7 % params and
   -4.9 / -1.3 / -4.7 % GMACs.
3. EMSNet-XTiny width: C_4 = 192, not Table 3.1's 128. With 128 the model has 2.33 M params / 0.690 G (-22 % params
   vs the published 3.0 M, GMACs fine), and no unstated part of the head can explain it: RetinaNet (Table 3.3:
   11.7 / 12.4 / 14.7 M), with the neck + head size taken from the PVTv2-B0 row, puts the XXTiny and Tiny backbones
   within 0.1 M of ours but the XTiny backbone ~0.95 M above ours with C_4 = 128 (~0.2 M with 192). Only the last
   stage (7 x 7) can hold that many parameters at unchanged GMACs; 192 (XXTiny's C_4) gives 2.96 M / 0.717 G
   (published 3.0 / 0.7), 160 would give 2.62 M. Pass embed_dims=(32, 64, 96, 128) for the table's literal widths.
4. Whitening mean (eq. 3.1 text: "along the channel axis"; appendix eq. 3.12 and Fig. 3.8: over all pixels):
   per-channel spatial mean. Its stated purpose is removing the global (DC) component and raising high frequencies,
   which a spatial mean does and a channel mean does not. No effect on counts.
5. Whiten 1x1 conv and gate 1x1 conv (eqs. 3.1, 3.5) are separate layers (the text calls the gate's a "linear
   projection" of its own). Sharing them would give -0.09 / -0.10 / -0.19 M, -0.016 / -0.023 / -0.056 G.
6. How Y_s and Y_d form the output (figure only): channel concat -> 1x1 fusion conv C -> C (Table 3.9 has a "w/o
   fusion" row). Without it: -0.15 / -0.18 / -0.34 M, -0.029 / -0.041 / -0.099 G.
7. Kernel sizes (not stated; "analysed in the appendices" but they are not): static DWConv 3x3 (the static branch is
   the high-frequency one), coordinate k_d = 7 (strip kernels are the point of the decomposition). k_d = 3: -0.01 /
   -0.02 / -0.03 M, -0.001 G; DWConv 7x7: +0.03 / +0.05 / +0.07 M, +0.013 / +0.020 / +0.033 G.
8. Heads (not stated): C-MHSA 1 head in every stage (its M costs 81 * h * C_1 parameters per block; 1 / 2 / 4 / 8
   heads by stage would add +0.09 / +0.12 / +0.16 M, Tiny then +3.5 %), G-MHSA 1 / 2 / 4 / 8 heads by stage (no
   effect on counts). Dynamic pooling is average ("adaptive pooling", type not stated).
9. C-MHSA details beyond eqs. 3.9-3.10: window padding 1 (so the DWConv positions are the unfold windows), softmax over
   the k^2 keys of each query, no logit scale (the logits come from a linear map, not a dot product), no output
   projection (eq. 3.10 has none; the dynamic fusion conv follows). Structurally VOLO's outlook attention with the
   average pool replaced by the stride-2 DWConv. Counts: only the head choice above matters.
10. Stem (two 3x3 stride-2 convs, widths not stated): 3 -> C_1 -> C_1, BN, GELU between. C_1 / 2 in the middle gives
    -0.020 / -0.020 / -0.069 G. Stage downsampling (figure only): 3x3 stride-2 conv + BN; 2x2 would give -0.17 /
    -0.13 / -0.26 M, -0.022 / -0.019 / -0.044 G.
11. Block wiring and norms (figure only): pre-norm residual x + MSI(BN(x)), x + MLP(BN(x)), GELU in the MLP, no layer
    scale, no positional encoding (none mentioned); a final BN, global average pool and a linear classifier (the head is
    not described; a plain one fits all three variants once items 1-3 are set).
12. Published numbers: "GFLOPs" are MACs (notes: the chapter's own attention-cost examples reproduce as MACs).
    Table 3.1's 2.5 M / 0.5 G for XXTiny truncate 2.56 M / 0.54 G (Tables 3.5, 3.7, 3.9, full model), which are the
    precise values and the reference used here.
13. Initialisation (not stated): linears trunc-normal std 0.02, convolutions normal with std sqrt(2 / fan-out), as
    PVT (the lineage S2AFormer's init follows too), biases zero. Trunc-normal 0.02 on the convolutions as well (the
    ViT habit) left XXTiny at chance on the quickstart recipe, even with the token mixers removed (likely: every conv
    here feeds a BatchNorm, which makes its weights scale-free, and AdamW's fixed-size steps on weights that small
    turn them too far each step). No effect on counts.

Complexity (eval.complexity.count_macs: conv + linear + attention matmuls; norms would add < 1 %), 224 x 224:
    XXTiny 2.550 M / 0.532 GMACs (published 2.56 / 0.54); XTiny 2.964 M / 0.717 G (3.0 / 0.7); Tiny 5.430 M / 1.871 G
    (5.4 / 1.9). Not reproduced: the ablation's identity-mixer baseline (2.09 M / 0.48 G published, 1.81 / 0.417 here);
    some undocumented skeleton part is heavier and the mixer lighter than read here, which only the figures could
    settle. tests/test_emsnet.py pins every count.
"""
import math
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, SelectAdaptivePool2d, calculate_drop_path_rates, get_device_dtype, trunc_normal_, use_fused_attn,
)
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model

__all__ = ['EMSNet']


def _pool_to_grid(x: torch.Tensor, patch_size: int, mode: str) -> torch.Tensor:
    """Pool p x p patches onto the ceil(H / p) x ceil(W / p) grid.

    A map whose size is not a multiple of p is padded on the bottom / right to the next multiple; `ceil_mode` does
    exactly that without materialising the pad, and the padded pixels take no part in the statistic (a max over the
    real pixels of an edge patch, an average that divides by their number), so edge tokens are not biased towards
    zero. Identical to plain pooling when p divides the size.
    """
    # a map smaller than p is one patch: pooling it whole is the same window, and OpenVINO rejects a kernel larger
    # than the map even in ceil mode. Plain ints: a traced (TorchScript) kernel size would not be a constant.
    height, width = x.shape[-2:]
    kernel = (patch_size if height >= patch_size else int(height), patch_size if width >= patch_size else int(width))
    if mode == 'max':
        return F.max_pool2d(x, kernel, kernel, ceil_mode=True)
    return F.avg_pool2d(x, kernel, kernel, ceil_mode=True, count_include_pad=False)


class CoordDWConv(nn.Module):
    """Coordinate depthwise conv: 1 x k then k x 1 depthwise (2k taps per pixel instead of k^2, eq. 3.11)."""

    def __init__(self, dim: int, kernel_size: int = 7, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        pad = kernel_size // 2
        self.conv_h = nn.Conv2d(dim, dim, (1, kernel_size), padding=(0, pad), groups=dim, **dd)
        self.conv_v = nn.Conv2d(dim, dim, (kernel_size, 1), padding=(pad, 0), groups=dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_v(self.conv_h(x))


class ConvAttention(nn.Module):
    """C-MHSA (sec. 3.3.2, eqs. 3.9-3.10): attention over the k x k neighbours of overlapping windows, stride 2.

    Attention map: a 3x3 stride-2 depthwise conv shrinks the map, the linear map M turns each of its positions into
    h attention matrices of k^2 x k^2 (every window position attends to every position of the same window), softmax
    over the keys. Values: the linear map N, unfolded into the same k x k / stride-2 windows as the attention
    positions. Each window's attended values are folded back, overlapping windows summed. No output projection
    (eq. 3.10 has none; the dynamic operator's fusion conv follows).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 1,
            kernel_size: int = 3,
            stride: int = 2,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        # the attention positions must be the unfold windows: same kernel / stride / padding
        self.shrink = nn.Conv2d(dim, dim, kernel_size, stride, self.padding, groups=dim, **dd)
        self.attn = nn.Conv2d(dim, kernel_size ** 4 * num_heads, 1, **dd)  # M
        # N has no bias, so projecting before unfolding equals eq. 3.10's projection of the unfolded (zero padded)
        # windows, at stride^2 / k^2 of the cost
        self.v = nn.Conv2d(dim, dim, 1, bias=False, **dd)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        k2 = self.kernel_size ** 2
        logits = self.attn(self.shrink(x))  # B, h * k2 * k2, Hw, Ww
        num_windows = logits.shape[-2] * logits.shape[-1]
        attn = logits.reshape(B, self.num_heads, k2, k2, num_windows).permute(0, 1, 4, 2, 3).softmax(dim=-1)
        attn = self.attn_drop(attn)  # B, h, L, k2 (queries), k2 (keys)
        # value width from N's weights (-1), not from the input: the two need not match
        v = F.unfold(self.v(x), self.kernel_size, padding=self.padding, stride=self.stride)  # B, C_v * k2, L
        v = v.reshape(B, self.num_heads, -1, k2, num_windows).permute(0, 1, 4, 3, 2)
        # one 3-D batched product over (B, h, L): the bmm a 5-D matmul runs, without the 5-D broadcast (expand) it
        # records, which autograd-tracing tools read as a grouped-query repeat
        out = torch.bmm(attn.flatten(0, 2), v.flatten(0, 2)).unflatten(0, attn.shape[:3])  # B, h, L, k2, C_v / h
        out = out.permute(0, 1, 4, 3, 2).reshape(B, -1, num_windows)
        return F.fold(out, (H, W), self.kernel_size, padding=self.padding, stride=self.stride)


class GlobalAttention(nn.Module):
    """G-MHSA: vanilla multi-head self-attention over all tokens of the (pooled) map, NCHW in and out."""
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5  # a constant of the layer, as trained (pruned head dims keep it)
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B, N, C
        q, k, v = self.qkv(tokens).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        # widths from the weights (-1): attention and output width need not equal the input's
        out = self.proj(out.transpose(1, 2).reshape(B, H * W, -1))
        return out.transpose(1, 2).reshape(B, -1, H, W)


class PatchMixer(nn.Module):
    """PE (p x p pooling + 1x1 conv) -> token mixer on the sparse grid -> Prop (depthwise transposed conv p / p).

    The propagation restores p * ceil(H / p) rows and columns, which is cropped back to H x W (the pad added by the
    pooling is removed again, so any input size works).
    """

    def __init__(
            self,
            in_chs: int,
            embed_chs: int,
            patch_size: int,
            pool: str,
            mixer: nn.Module,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert pool in ('max', 'avg'), f'unknown pool {pool}'
        self.patch_size = patch_size
        self.pool = pool
        self.embed = nn.Conv2d(in_chs, embed_chs, 1, **dd)
        self.mixer = mixer
        self.prop = nn.ConvTranspose2d(embed_chs, embed_chs, patch_size, patch_size, groups=embed_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        x = self.embed(_pool_to_grid(x, self.patch_size, self.pool))
        x = self.prop(self.mixer(x))
        return x[..., :H, :W]


class StaticOperator(nn.Module):
    """Input-independent branch (eqs. 3.1-3.5): whiten -> DWConv -> {p=2 mixer, identity, p=4 mixer} -> gate."""

    def __init__(
            self,
            dim: int,
            patch_sizes: Tuple[int, int] = (2, 4),
            pe_ratio: float = 4.,
            dw_kernel_size: int = 3,
            coord_kernel_size: int = 7,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % 4 == 0, f'static width {dim} must be divisible by 4 (1/4 : 1/2 : 1/4 split)'
        embed_chs = int(dim // 4 * pe_ratio)
        self.whiten = nn.Conv2d(dim, dim, 1, **dd)
        self.dwconv = nn.Conv2d(dim, dim, dw_kernel_size, padding=dw_kernel_size // 2, groups=dim, **dd)
        self.mixer_fine = PatchMixer(
            dim // 4, embed_chs, patch_sizes[0], 'max', CoordDWConv(embed_chs, coord_kernel_size, **dd), **dd)
        self.mixer_coarse = PatchMixer(
            dim // 4, embed_chs, patch_sizes[1], 'max', CoordDWConv(embed_chs, coord_kernel_size, **dd), **dd)
        self.pass_through = nn.Identity()  # X_m2, the half that passes unchanged (a named branch, no parameters)
        # not `fuse`: timm's reparameterize_model calls `fuse()` on every child that has one
        self.merge = nn.Conv2d(2 * embed_chs + dim // 2, dim, 1, **dd)
        self.gate_proj = nn.Conv2d(dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.whiten(x)
        # remove each channel's spatial mean (its DC / global component), see the module docstring
        w = w - w.mean(dim=(2, 3), keepdim=True)
        m = self.dwconv(w)
        # X_m1 | X_m2 | X_m3 = 1/4 | 1/2 | 1/4 of the channels, by slicing. Widths read from the weights, bounds
        # non-negative: any split (a pruned one too) slices right
        c, c1, c3 = m.shape[1], self.mixer_fine.embed.in_channels, self.mixer_coarse.embed.in_channels
        y = torch.cat(
            [self.mixer_fine(m[:, :c1]), self.pass_through(m[:, c1:c - c3]), self.mixer_coarse(m[:, c - c3:])], dim=1)
        y = self.merge(y)
        return self.gate_proj(x) * y.sigmoid()


class DynamicOperator(nn.Module):
    """Input-dependent branch (eqs. 3.6-3.8): half C-MHSA at p=4, half G-MHSA at p=6, fused by a 1x1 conv."""

    def __init__(
            self,
            dim: int,
            patch_sizes: Tuple[int, int] = (4, 6),
            pe_ratio: float = 2.,
            local_heads: int = 1,
            global_heads: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % 2 == 0, f'dynamic width {dim} must be even'
        half = dim // 2
        embed_chs = int(half * pe_ratio)
        self.local_mixer = PatchMixer(
            half, embed_chs, patch_sizes[0], 'avg', ConvAttention(embed_chs, local_heads, attn_drop=attn_drop, **dd),
            **dd)
        self.global_mixer = PatchMixer(
            half, embed_chs, patch_sizes[1], 'avg',
            GlobalAttention(embed_chs, global_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, **dd), **dd)
        self.merge = nn.Conv2d(2 * embed_chs, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.local_mixer.embed.in_channels  # read from the weights: the halves need not stay equal
        return self.merge(torch.cat([self.local_mixer(x[:, :half]), self.global_mixer(x[:, half:])], dim=1))


class MultiScaleInteraction(nn.Module):
    """MSI token mixer: slice channels into static / dynamic parts, mix each, concatenate, fuse with a 1x1 conv."""

    def __init__(
            self,
            dim: int,
            static_ratio: float = 0.75,
            patch_sizes: Tuple[int, int, int, int] = (2, 4, 4, 6),
            pe_ratios: Tuple[float, float] = (4., 2.),
            dw_kernel_size: int = 3,
            coord_kernel_size: int = 7,
            local_heads: int = 1,
            global_heads: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        static_chs = int(dim * static_ratio)
        self.static = StaticOperator(
            static_chs, patch_sizes[:2], pe_ratios[0], dw_kernel_size, coord_kernel_size, **dd)
        self.dynamic = DynamicOperator(
            dim - static_chs, patch_sizes[2:], pe_ratios[1], local_heads, global_heads, qkv_bias, attn_drop, **dd)
        self.proj = nn.Conv2d(dim, dim, 1, **dd)

    @property
    def static_chs(self) -> int:
        return self.static.whiten.in_channels  # read from the weights: true after pruning too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # split by slicing (views), as the text prescribes, not by a split conv
        y = torch.cat([self.static(x[:, :self.static_chs]), self.dynamic(x[:, self.static_chs:])], dim=1)
        return self.proj(y)


class ConvMlp(nn.Module):
    """Channel MLP: 1x1 conv expand -> GELU -> 1x1 conv back."""

    def __init__(
            self,
            dim: int,
            hidden_dim: int,
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1, **dd)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class EMSBlock(nn.Module):
    """x + MSI(norm(x)), then x + MLP(norm(x)); NCHW."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            mixer_kwargs: Optional[Dict[str, Any]] = None,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.mixer = MultiScaleInteraction(dim, **(mixer_kwargs or {}), **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class Stem(nn.Module):
    """PE1: conv 3x3/2 -> BN -> GELU -> conv 3x3/2 -> BN (stride 4)."""

    def __init__(
            self,
            in_chans: int,
            out_chs: int,
            mid_chs: int,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, mid_chs, 3, stride=2, padding=1, bias=False, **dd)
        self.norm1 = norm_layer(mid_chs, **dd)
        self.act = act_layer()
        self.conv2 = nn.Conv2d(mid_chs, out_chs, 3, stride=2, padding=1, bias=False, **dd)
        self.norm2 = norm_layer(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))


class Downsample(nn.Module):
    """Stage transition: conv 3x3/2 -> BN."""

    def __init__(self, in_chs: int, out_chs: int, norm_layer: Callable = nn.BatchNorm2d, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False, **dd)
        self.norm = norm_layer(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class EMSStage(nn.Module):
    """Optional downsample + EMS blocks; NCHW in and out."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            downsample: bool = True,
            mlp_ratio: float = 4.,
            mixer_kwargs: Optional[Dict[str, Any]] = None,
            proj_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_chs, out_chs, norm_layer, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            EMSBlock(
                out_chs,
                mlp_ratio=mlp_ratio,
                mixer_kwargs=mixer_kwargs,
                proj_drop=proj_drop,
                drop_path=drop_path[j] if isinstance(drop_path, (list, tuple)) else drop_path,
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            )
            for j in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class EMSNet(nn.Module):
    """EMSNet: 4-stage pyramid of EMS blocks (multi-scale static + dynamic token mixers and a channel MLP)."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (32, 64, 128, 192),
            depths: Tuple[int, ...] = (2, 2, 4, 2),
            mlp_ratios: Tuple[float, ...] = (8., 8., 4., 4.),
            local_heads: Tuple[int, ...] = (1, 1, 1, 1),
            global_heads: Tuple[int, ...] = (1, 2, 4, 8),
            static_ratio: float = 0.75,
            patch_sizes: Tuple[int, int, int, int] = (2, 4, 4, 6),
            pe_ratios: Tuple[float, float] = (4., 2.),
            dw_kernel_size: int = 3,
            coord_kernel_size: int = 7,
            stem_chs: Optional[int] = None,
            qkv_bias: bool = True,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = nn.BatchNorm2d,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chans: Number of input image channels.
            num_classes: Number of classifier classes.
            global_pool: Global pooling type ('' disables pooling).
            embed_dims: Channels per stage (C_1..C_4).
            depths: EMS blocks per stage (L_1..L_4).
            mlp_ratios: Channel-MLP expansion per stage.
            local_heads: C-MHSA heads per stage.
            global_heads: G-MHSA heads per stage.
            static_ratio: Fraction of channels sliced to the static operator (C_s / C).
            patch_sizes: PE patch sizes of the (static p, static p, C-MHSA, G-MHSA) branches.
            pe_ratios: Channel expansion of the branch PE 1x1 convs (static, dynamic): 4 maps a static quarter
                back to C_s, 2 maps a dynamic half back to C_d.
            dw_kernel_size: Kernel of the static operator's DWConv.
            coord_kernel_size: k_d of the coordinate depthwise convs.
            stem_chs: Width of the first stem conv (default C_1).
            qkv_bias: Bias on the G-MHSA qkv projection.
            act_layer: Activation of stem, MLP and pre-logits.
            norm_layer: Norm of stem, downsamples, blocks and the final feature norm.
            drop_rate: Head dropout rate.
            proj_drop_rate: Dropout inside the channel MLP.
            attn_drop_rate: Attention dropout rate.
            drop_path_rate: Stochastic depth rate, linear over all blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info = []

        self.stem = Stem(in_chans, embed_dims[0], stem_chs or embed_dims[0], act_layer, norm_layer, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=False)
        dpr = [dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        stages = []
        for i in range(num_stages):
            mixer_kwargs = dict(
                static_ratio=static_ratio, patch_sizes=patch_sizes, pe_ratios=pe_ratios, dw_kernel_size=dw_kernel_size,
                coord_kernel_size=coord_kernel_size, local_heads=local_heads[i], global_heads=global_heads[i],
                qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
            )
            stages.append(EMSStage(
                embed_dims[i - 1] if i > 0 else embed_dims[0],
                embed_dims[i],
                depth=depths[i],
                downsample=i > 0,
                mlp_ratio=mlp_ratios[i],
                mixer_kwargs=mixer_kwargs,
                proj_drop=proj_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # pre-norm blocks leave the residual stream un-normalized: one norm closes the trunk
        self.norm = norm_layer(embed_dims[-1], **dd)

        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()  # don't flatten if pooling disabled
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # ambiguity 13: trunc-normal linears, fan-out normal convs (PVT's init), zero biases
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0., math.sqrt(2. / fan_out))
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set:
        # no position embeddings; 1-D params (norms, biases) are excluded by timm's optimizer factory
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.global_pool.train(self.training)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
            self.flatten.train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward features that returns intermediates.

        Args:
            x: Input image tensor.
            indices: Take last n stages if int, all if None, select matching indices if sequence.
            norm: Apply the final norm to the last intermediate (if it is the last stage's output).
            stop_early: Stop iterating over stages when last desired intermediate hit.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1

        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)

        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """Prune layers not required for specified intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            # the final norm closes the last stage (and is sized for it)
            self.norm = nn.Identity()
        if prune_end:
            # features now end at the last kept stage, the head is sized for the final stage so it goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)  # grad checkpointing is applied inside each stage
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.flatten(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """No official weights exist; accept this model's own checkpoints (optionally wrapped / DDP-prefixed)."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    return {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head',
        'paper_name': 'Efficient Vision Transformers with Multi-Scale and Partial Attentions for Object Recognition '
                      '(PhD dissertation, Univ. of Ulsan, 2023), Chapter 3',
        **kwargs,
    }


# no official code or weights: every entry is untrained
default_cfgs = generate_default_cfgs({
    'emsnet_xxtiny.untrained': _cfg(),
    'emsnet_xtiny.untrained': _cfg(),
    'emsnet_tiny.untrained': _cfg(),
    'test_emsnet.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_emsnet(variant: str, pretrained: bool = False, **kwargs: Any) -> EMSNet:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    model = build_model_with_cfg(
        EMSNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=True),
        **kwargs,
    )
    return model


@register_model
def emsnet_xxtiny(pretrained: bool = False, **kwargs: Any) -> EMSNet:
    model_args = dict(embed_dims=(32, 64, 128, 192), depths=(2, 2, 4, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_emsnet('emsnet_xxtiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def emsnet_xtiny(pretrained: bool = False, **kwargs: Any) -> EMSNet:
    # C_4 = 192, not Table 3.1's 128: see the module docstring (published params need a wider last stage)
    model_args = dict(embed_dims=(32, 64, 96, 192), depths=(3, 3, 10, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_emsnet('emsnet_xtiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def emsnet_tiny(pretrained: bool = False, **kwargs: Any) -> EMSNet:
    model_args = dict(embed_dims=(64, 96, 128, 256), depths=(3, 3, 10, 2), mlp_ratios=(8, 8, 4, 4))
    return _create_emsnet('emsnet_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_emsnet(pretrained: bool = False, **kwargs: Any) -> EMSNet:
    model_args = dict(
        embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), mlp_ratios=(2, 2, 2, 2), global_heads=(1, 1, 2, 2))
    return _create_emsnet('test_emsnet', pretrained=pretrained, **dict(model_args, **kwargs))
