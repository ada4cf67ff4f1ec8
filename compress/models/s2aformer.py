"""S2AFormer: Strip Self-Attention for Efficient Vision Transformer (re-implementation)

Paper: `S2AFormer: Strip Self-Attention for Efficient Vision Transformer` - https://arxiv.org/abs/2505.22195 (v1)

No official code or weights have been published. This is a re-implementation from the paper text and is labelled
as one: nothing here has reproduced the paper's accuracy, and every pretrained tag is `untrained`.

Taken from the paper:
* Stem of three 3x3 convs, the first with stride 2; four stages of patch embedding + Hybrid Perception Blocks
  (HPBs) with features at strides 4/8/16/32; channels and depths per variant from Table II.
* HPB (Eq. 1-4): x + DWConv(x), then pre-norm residual SSA, LIM and MLP, each behind its own LayerNorm. No
  position embedding (the depthwise-conv residual stands in for one).
* Strip self-attention (Alg. 1, Eq. 13-16): Q and K are projected straight to one scalar per head ("channel
  squeeze" = Linear(C, h), as Eq. 13's projection cost N*d*(h + h/k^2 + d/k^2) requires; a Linear(C, C) followed
  by a per-head mean would add 2 C^2 per block). K and V come from a k x k depthwise conv with stride k (CSR). V
  keeps C/h channels per head: out = proj(softmax(Q K^T * scale) V).
* LIM (Eq. 6-7): PW -> ReLU -> DW -> SE -> ReLU -> PW, with no norms.

Where the paper is ambiguous, the reading chosen and why. Per-HPB costs are in units of C^2 (params) and C^2*H*W
(MACs); MACs are conv + linear MACs at 224 (the paper's convention, first item):
* FLOPs convention. The paper counts conv and linear MACs only. Each variant's 256-px MACs equal its 224-px MACs
  times (256/224)^2, to within rounding. If the SSA matmuls were counted (they grow as N * N_s), T's 0.655 G at
  224 would become 0.866 G at 256, not the reported 0.855 G. `eval.complexity.count_macs` includes those matmuls,
  which adds 2-5 %.
* MLP: ratio 4 with GELU ("standard MLP"). The XS - T difference (four stage-3 HPBs, C = 128 at 14x14; 0.74 M and
  0.131 G) fixes one HPB at 11.29 +- 0.15 C^2 params and 10.20 +- 0.08 C^2*H*W MACs. Ratio 5 alone exceeds the
  params. Ratio 3 would leave the LIM more MACs (2.8) than two dense pointwise convs have.
* LIM widths and groups are not given; the introduction says "depth-wise separable and grouped convolutions".
  - The MAC difference leaves 0.75 +- 0.08 C^2*H*W for the two pointwise convs.
  - S - T (4.89 M over 434k C^2 of blocks, with stem and head shared) leaves 0.92 +- 0.03 C^2 params for the
    pointwise convs plus SE.
  - Dense pointwise convs (2.0) are ruled out. Groups (2, 4) give 0.75, and an SE with reduction 1/16 (timm's
    SEModule, with its 8-channel floor) gives 0.13, so S - T comes to 4.875 M. Groups (4, 4) or (2, 2) miss the
    MAC difference by 3 sigma.
  - Table VII (RetinaNet +0.10 M on mini and +0.15 M on T with the LIM) implies ~0.55 C^2 per LIM. That cannot be
    reconciled with Table II, which this reading follows: here the LIMs hold 0.17 M on mini and 0.24 M on T.
* Heads h = (1, 2, 4, 8) and sr_ratio k = (8, 4, 2, 1), PVT's values, are not given. With these, N_s = 49 at
  every stage at 224. Table VIII ("Conv -> Pooling" drops 0.01 M on mini and T) confirms a depthwise CSR; a dense
  PVT-style reduction would hold 0.39 M on mini. The heads only change the 2*h*C q/k params (< 0.1 %).
* Scale. Alg. 1 divides the logits by an unnamed "Scale". A squeezed key has d_k = 1, so Eq. 5's sqrt(d_k) would
  be 1. PVT, where CSR comes from, multiplies by (C/h)^-0.5, and that is used here. It has no effect on cost.
* Smaller details, none of which changes cost: LayerNorm after the CSR conv (as PVT does); qkv bias on;
  LayerNorm eps 1e-6; 3x3 depthwise kernels for the conv residual and the LIM; no layer scale; stochastic depth
  rises linearly over all blocks.
* Patch embeddings: LayerNorm -> 2x2 conv with stride 2, as EdgeNeXt does (the paper follows EdgeNeXt's recipe).
  On mini, 3x3 stride-2 convs would add 0.2 M params (+4 %) and 36 M MACs (+8 %).
* Classifier head: not described.
  - Blocks, patch embeddings and stem leave 2.88-2.91 M params for the head in all five variants. That is 3.1 M
    outside the blocks when C4 = 256 and 3.6 M for M, so the head hardly grows with C4.
  - Chosen: after pooling, a 1x1 conv to 1280 + GELU (as in MobileNetV3), feeding two Linear(1280, 1000)
    classifiers that are averaged at inference. This is DeiT / EfficientFormer's distillation head;
    `set_distilled_training` returns both.
  - A single classifier leaves mini 25 % short. Putting the 1x1 conv before pooling would add 16 M MACs
    (+3.6 %) on mini.
* Stem widths: not given.
  - Outside the blocks there are ~163 M MACs on mini and ~177 M on T / XS / S (C1 = 32 vs 48), so the stem cannot
    scale with C1: widths C1/2 -> C1/2 -> C1 give stem + first patch embedding 105 M on mini and 232 M on T.
  - Chosen: fixed widths 24 -> 24 -> 24, with BN + GELU as in EfficientFormerV2's stem (which the paper cites).
* M is the worst fit: +1.3 % params (the 1x1 head conv grows with C4; the paper's head budget does not) and
  +2.4 % MACs. The per-HPB costs shared by the four C4 = 256 variants leave M only ~0.16 G outside its blocks,
  less than T's ~0.18 G although M's widths are twice T's, so any design shared by all five overshoots M.
  tests/test_s2aformer.py checks every count against Tables II / III.

Implementation notes:
* Blocks run on NHWC tokens. Convs see them through permuted (channels-last) views, without copies.
* Attention runs through scaled_dot_product_attention with q/k head dim 1 and v head dim C/h, and an explicit scale
  (SDPA's default would be 1). It exports with a dynamic batch and compiles without graph breaks.

@article{xu2025s2aformer,
  title={S2AFormer: Strip Self-Attention for Efficient Vision Transformer},
  author={Xu, Guoan and Huang, Wenfeng and Jia, Wenjing and Li, Jiamao and Gao, Guangwei and Qi, Guo-Jun},
  journal={arXiv preprint arXiv:2505.22195},
  year={2025}
}
"""
import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm2d, Mlp, SEModule, SelectAdaptivePool2d, calculate_drop_path_rates, get_device_dtype,
    trunc_normal_, use_fused_attn,
)
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model

__all__ = ['S2AFormer']


class StripAttention(nn.Module):
    """Strip self-attention on NHWC tokens: scalar Q/K per head, K/V from a strided depthwise reduction."""
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 1,
            sr_ratio: int = 1,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        # channel squeeze: the projections emit one scalar per head directly (Eq. 13 costs them N * d * h)
        self.q = nn.Linear(dim, num_heads, bias=qkv_bias, **dd)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim, **dd)
            self.norm = norm_layer(dim, **dd)
        else:
            self.sr = None
            self.norm = None
        self.k = nn.Linear(dim, num_heads, bias=qkv_bias, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        q = self.q(x).reshape(B, H * W, self.num_heads, 1).transpose(1, 2)
        if self.sr is not None:
            x = self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        k = self.k(x).reshape(B, -1, self.num_heads, 1).transpose(1, 2)
        # value width from the projection (-1), so a pruned `v` needs no attribute update
        v = self.v(x).reshape(B, k.shape[2], self.num_heads, -1).transpose(1, 2)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0., scale=self.scale)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, H, W, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class LocalInteraction(nn.Module):
    """LIM (Eq. 6-7): grouped PW -> ReLU -> DW -> SE -> ReLU -> grouped PW, on NHWC tokens."""

    def __init__(
            self,
            dim: int,
            groups: Tuple[int, int] = (2, 4),
            se_ratio: float = 1 / 16,
            kernel_size: int = 3,
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.pw1 = nn.Conv2d(dim, dim, 1, groups=groups[0], **dd)
        self.act1 = act_layer()
        self.dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)
        self.se = SEModule(dim, rd_ratio=se_ratio, **dd)
        self.act2 = act_layer()
        self.pw2 = nn.Conv2d(dim, dim, 1, groups=groups[1], **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        x = self.dw(self.act1(self.pw1(x)))
        x = self.pw2(self.act2(self.se(x)))
        return x.permute(0, 2, 3, 1)


class HybridPerceptionBlock(nn.Module):
    """HPB (Eq. 1-4) on NHWC tokens: depthwise-conv residual, then pre-norm residual SSA, LIM and MLP."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 1,
            sr_ratio: int = 1,
            mlp_ratio: float = 4.,
            lim_groups: Tuple[int, int] = (2, 4),
            se_ratio: float = 1 / 16,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        # Eq. 1: a conditional position encoding (the model has no position embeddings)
        self.pos_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = StripAttention(
            dim, num_heads=num_heads, sr_ratio=sr_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop,
            proj_drop=proj_drop, norm_layer=norm_layer, **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.lim = LocalInteraction(dim, groups=lim_groups, se_ratio=se_ratio, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm3 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.lim(self.norm2(x)))
        x = x + self.drop_path3(self.mlp(self.norm3(x)))
        return x


class ConvBnAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 3,
            stride: int = 1,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding=kernel_size // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Stem(nn.Module):
    """Three 3x3 convs, the first with stride 2 (stride-2 output; stage 0's patch embedding makes it 4)."""

    def __init__(
            self,
            in_chans: int,
            widths: Tuple[int, int, int] = (24, 24, 24),
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = ConvBnAct(in_chans, widths[0], stride=2, act_layer=act_layer, **dd)
        self.conv2 = ConvBnAct(widths[0], widths[1], act_layer=act_layer, **dd)
        self.conv3 = ConvBnAct(widths[1], widths[2], act_layer=act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class PatchEmbed(nn.Module):
    """LayerNorm -> 2x2 conv with stride 2 (EdgeNeXt / ConvNeXt downsampling); NCHW in, NHWC out."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm = LayerNorm2d(in_chs, **dd)
        self.proj = nn.Conv2d(in_chs, out_chs, 2, stride=2, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)).permute(0, 2, 3, 1)


class S2AFormerStage(nn.Module):
    """Patch embedding + HPBs. NCHW in, NCHW out."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int = 1,
            sr_ratio: int = 1,
            mlp_ratio: float = 4.,
            lim_groups: Tuple[int, int] = (2, 4),
            se_ratio: float = 1 / 16,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchEmbed(in_chs, out_chs, **dd)
        self.blocks = nn.Sequential(*[
            HybridPerceptionBlock(
                out_chs,
                num_heads=num_heads,
                sr_ratio=sr_ratio,
                mlp_ratio=mlp_ratio,
                lim_groups=lim_groups,
                se_ratio=se_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
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
        return x.permute(0, 3, 1, 2)


class S2AFormer(nn.Module):
    """S2AFormer (re-implementation from the paper; no official code exists)."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (48, 64, 128, 256),
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (1, 2, 4, 8),
            sr_ratios: Tuple[int, ...] = (8, 4, 2, 1),
            mlp_ratio: float = 4.,
            lim_groups: Tuple[int, int] = (2, 4),
            se_ratio: float = 1 / 16,
            qkv_bias: bool = True,
            stem_widths: Tuple[int, int, int] = (24, 24, 24),
            head_hidden_size: Optional[int] = 1280,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Callable = partial(nn.LayerNorm, eps=1e-6),
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
            embed_dims: Channels per stage (Table II).
            depths: HPBs per stage (Table II).
            num_heads: SSA heads per stage (one scalar query / key per head).
            sr_ratios: Kernel and stride of the depthwise K/V spatial reduction per stage (1 = none).
            mlp_ratio: MLP expansion.
            lim_groups: Groups of the LIM's first and second pointwise conv.
            se_ratio: Reduction of the LIM's squeeze-excite.
            qkv_bias: Bias on the q / k / v projections.
            stem_widths: Output channels of the three stem convs.
            head_hidden_size: Width of the 1x1 conv after pooling (None: classifiers read the pooled features).
            act_layer: Activation of MLP, stem and head.
            norm_layer: Norm of the blocks and the K/V reduction (LayerNorm, eps 1e-6).
            drop_rate: Head dropout rate.
            proj_drop_rate: Dropout after the attention projection and in the MLP.
            attn_drop_rate: Attention dropout rate.
            drop_path_rate: Stochastic depth rate, linear over all blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.distilled_training = False  # True: training returns both classifiers' logits
        self.feature_info = []

        self.stem = Stem(in_chans, stem_widths, act_layer=act_layer, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=False)
        dpr = [dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        stages = []
        prev_chs = stem_widths[-1]
        for i in range(num_stages):
            stages.append(S2AFormerStage(
                prev_chs,
                embed_dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                sr_ratio=sr_ratios[i],
                mlp_ratio=mlp_ratio,
                lim_groups=lim_groups,
                se_ratio=se_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            ))
            prev_chs = embed_dims[i]
            self.feature_info.append(dict(num_chs=prev_chs, reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        # the residual stream leaves the last stage unnormalized (pre-norm blocks)
        self.norm = LayerNorm2d(prev_chs, **dd)

        self.num_features = prev_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        if head_hidden_size:
            # 1x1 conv after pooling (not before): 1280 * C4 MACs instead of 1280 * C4 * H * W
            self.conv_head = nn.Conv2d(prev_chs, head_hidden_size, 1, **dd)
            self.act_head = act_layer()
            self.head_hidden_size = head_hidden_size
        else:
            self.conv_head = nn.Identity()
            self.act_head = nn.Identity()
            self.head_hidden_size = prev_chs
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()  # don't flatten if pooling disabled
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # PVT's init, the lineage of the attention: trunc-normal linears, fan-out normal convs, zero biases
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0., math.sqrt(2. / fan_out))
            if m.bias is not None:
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
    def set_distilled_training(self, enable: bool = True):
        self.distilled_training = enable

    @torch.jit.ignore
    def get_classifier(self) -> Tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
            self.global_pool.train(self.training)
            self.flatten = nn.Flatten(1) if global_pool else nn.Identity()
            self.flatten.train(self.training)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)
        self.head_dist.train(self.training)

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
            norm: Apply the final norm to the last stage's intermediate (the others have no norm).
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
            # the final norm is sized for the last stage
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.conv_head = nn.Identity()
            self.act_head = nn.Identity()
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)  # grad checkpointing is applied inside each stage
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        x = self.global_pool(x)
        x = self.act_head(self.conv_head(x))
        x = self.flatten(x)
        x = self.head_drop(x)
        if pre_logits:
            return x
        x, x_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        # the paper trains without a teacher: both classifiers see the labels and are averaged
        return (x + x_dist) / 2

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unwrap a checkpoint of this module (no official weights exist, so there is no foreign layout to remap)."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    return {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1.conv', 'classifier': ('head', 'head_dist'),
        'paper_ids': 'arXiv:2505.22195',
        'paper_name': 'S2AFormer: Strip Self-Attention for Efficient Vision Transformer',
        **kwargs,
    }


# no official code or weights: every tag is 'untrained'
default_cfgs = generate_default_cfgs({
    's2aformer_mini.untrained': _cfg(),
    's2aformer_t.untrained': _cfg(),
    's2aformer_xs.untrained': _cfg(),
    's2aformer_s.untrained': _cfg(),
    's2aformer_m.untrained': _cfg(),
    'test_s2aformer.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_s2aformer(variant: str, pretrained: bool = False, **kwargs: Any) -> S2AFormer:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    model = build_model_with_cfg(
        S2AFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=True),
        **kwargs,
    )
    return model


@register_model
def s2aformer_mini(pretrained: bool = False, **kwargs: Any) -> S2AFormer:
    model_args = dict(embed_dims=(32, 64, 128, 256), depths=(2, 2, 2, 2))
    return _create_s2aformer('s2aformer_mini', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def s2aformer_t(pretrained: bool = False, **kwargs: Any) -> S2AFormer:
    model_args = dict(embed_dims=(48, 64, 128, 256), depths=(2, 2, 6, 2))
    return _create_s2aformer('s2aformer_t', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def s2aformer_xs(pretrained: bool = False, **kwargs: Any) -> S2AFormer:
    model_args = dict(embed_dims=(48, 64, 128, 256), depths=(2, 2, 10, 2))
    return _create_s2aformer('s2aformer_xs', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def s2aformer_s(pretrained: bool = False, **kwargs: Any) -> S2AFormer:
    model_args = dict(embed_dims=(48, 64, 128, 256), depths=(2, 4, 24, 4))
    return _create_s2aformer('s2aformer_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def s2aformer_m(pretrained: bool = False, **kwargs: Any) -> S2AFormer:
    model_args = dict(embed_dims=(96, 128, 256, 512), depths=(2, 4, 20, 2))
    return _create_s2aformer('s2aformer_m', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_s2aformer(pretrained: bool = False, **kwargs: Any) -> S2AFormer:
    model_args = dict(
        embed_dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), stem_widths=(8, 8, 8),
        head_hidden_size=128)
    return _create_s2aformer('test_s2aformer', pretrained=pretrained, **dict(model_args, **kwargs))
