"""PartialFormer: Efficient Vision Transformers with Partial Attention (re-implementation from the text)

Source: X.-T. Vo, "Efficient Vision Transformers with Multi-Scale and Partial Attentions for Object Recognition",
PhD dissertation, University of Ulsan, 2023, Chapter 5 (published as Vo, Nguyen, Priadana, Jo, "Efficient Vision
Transformers with Partial Attention", ECCV 2024).

There is no official code and there are no released weights. This is a RE-IMPLEMENTATION written from the
dissertation's text and tables only; its figures (block layout, Figs 5.3-5.5) are missing from the source, so every
detail that lives only in a figure is a reading, listed below. Nothing here is copied from any implementation.

Partial attention (eqs 5.4-5.7), per block, on tokens X (N x d, h heads, d_h = d / h):
* token separation: context score c = channel mean of every token; the N_F highest-scoring tokens are the foreground
  set X_F, the rest the background set X_B. `torch.topk` + `gather` pick the foreground (static k, so it exports
  with a dynamic batch); the background is never gathered, SQA masks the foreground keys out instead (same result,
  no N x d copy).
* shared projections: one Linear d -> 3d (W_Q, W_K, W_V) over all N tokens and the learnable abstract token Q_A.
* MMSA on [Q_A; X_F] (N_F + 1 tokens): logits Q K^T / sqrt(d_h), HeadMLP across the head axis (FC h -> e*h,
  softmax, FC e*h -> h), A V per head, heads concatenated, W_O -> O_F.
* SQA: the abstract token's MMSA output (per head, d_h) is the single query over the background keys/values
  (the same W_K / W_V projections); Y_B (1 x d) -> ChannelMLP (FC d -> d/r, LayerNorm, ReLU, FC d/r -> d) and is
  broadcast-added to every background token.
* O_F and O_B are written back to the tokens' original positions (a scatter of the N_F foreground rows).

Architecture: conv stem to stride 4, four stages of partial Transformer blocks at strides 4/8/16/32 with a strided
conv patch embedding in front of stages 2-4, final LayerNorm, global average pooling, a 1280-wide pre-logits layer
and the linear classifier.

Ambiguities in the text, the reading chosen, and why. Params / GMACs are at 224, measured with
`eval.complexity.count_params` / `count_macs` by swapping one choice at a time; tests/test_partialformer.py pins the
chosen configuration's counts against Table 5.1 (5.3 / 8.2 / 21.1 / 36.1 / 64.5 M, 0.4 / 0.7 / 1.9 / 3.4 / 6.8 G):
1. Channel widths: the text says channels are "doubled as {C, 2C, 3C, 4C}" (self-contradictory). Read as
   {C, 2C, 4C, 8C}: "doubled", the head counts of Table 5.1 (head dim 16 in every stage of B1-B4, 12 in B0) and the
   params all say so; {C, 2C, 3C, 4C} gives B1 3.64 M / 0.41 G and B4 23.3 M / 3.94 G (-56 % / -64 % params).
2. Classifier head: "global average pooling and linear layers" (plural). With one Linear B0 / B1 / B2 come out
   -26.7 % / -17.2 % / -6.7 % short of the published params; a 1280-wide pre-logits layer (Linear 8C -> 1280, GELU,
   Linear 1280 -> classes; the width of MobileNetV3 / MAT-style heads) brings every variant within 1.5 %. Its
   activation is not stated (GELU, the network's MLP activation). Effect: +1.34 M (B0) ... +1.50 M (B4) params,
   +0.0015 G MACs. `reset_classifier` keeps it (it is part of the body of the head, as in timm's MobileNetV3) unless
   pooling is disabled.
3. Patch embeddings: "convolution-based", kernels not stated. Stem = 3x3/2 conv (3 -> C/2) + BN + GELU + 3x3/2 conv
   (C/2 -> C) + BN, the usual two-conv stride-4 stem; stages 2-4 downsample with a 2x2 stride-2 conv + LayerNorm.
   The 2x2 kernel (rather than the notes' 3x3) is what the published params say once the 1280 head is in: with 3x3
   every variant is +0.8 % (B0) ... +2.8 % (B4) over its published count, growing with width exactly as the
   3x3 - 2x2 kernel difference does, while with 2x2 B2 / B3 / B4 land on -0.1 % / +0.2 % / -0.2 %. Effect of 2x2 vs
   3x3: -0.12 M / -0.014 G (B0) ... -1.94 M / -0.22 G (B4).
4. N_F (foreground count) is never given. Read as a fixed count of 49 tokens (one 7x7 window) per block in every
   stage, capped at N - 1 so at least one background token remains (stage 4 at 224 has N = 49, so it runs 48
   foreground + 1 background). A fixed count keeps the MMSA cost independent of resolution, as the text's
   "N_F << N" and "SQA linear in N_B" argument needs, and keeps shapes static for export. Evidence: the text's cost
   example (one module, stage 1, H = W = 56, d = 64, h = 8: 40.1 MFLOPs) counts 39.8 / 40.1 / 40.8 M in this module
   at N_F = 49 for e = 1 / 2 / 4; Table 5.1's GMACs: N_F = 24 gives -7 % ... -9 %, N_F = 98 gives +4 % ... +12 %,
   N_F = 49 gives -1.7 % ... +2.1 %. N_F and e (note 5) are confounded in the GMACs; (49, 4) fits both.
5. HeadMLP expansion e (not given): e = 4 ("increases the number of heads and also mixes attention maps in higher
   dimensions"). Softmax axis (not stated): the key axis, so each of the e*h intermediate maps is a distribution;
   no softmax after the second FC (the text puts it only between the FCs). Both FCs have bias. Effect: e = 1 gives
   -4.5 % ... -5.8 % GMACs, e = 2 -2.6 % ... -4.5 %, e = 4 -1.7 % ... +2.1 % (the stage-4 HeadMLP grows as
   e * h^2 * (N_F + 1)^2); params change by < 0.2 %.
6. ChannelMLP reduction r (not given): r = 4. r = 2 gives +1.2 % ... +3.9 % params (B4 +2.4 M), MACs unchanged
   (it runs on one token).
7. MLP ratio (not given; "two FC layers and GELU inserted between them"): 4, the ViT / PVT default; ratio 3 gives
   -12 % ... -15 % params and -12 % ... -16 % GMACs.
8. Which X the context score c = Mean(X) is taken from: the residual stream entering the attention branch (after
   the PEG), not the LayerNorm output, whose channel mean is its bias mean plus a gamma-weighted sum that is
   identically zero at init (gamma = 1), so ranking on it would be arbitrary. The ranking carries no gradient
   (sorting is not differentiable; gradients reach the gathered values). No params/MACs effect.
9. Eq 5.7 O_B = X_B + Y'_B vs the block residual: the partial attention returns the update (O_F on foreground
   rows, Y'_B broadcast on background rows) and the block residual supplies "+ X_B", so the background is not
   added twice. No params/MACs effect.
10. The single query Q_A: the abstract token's per-head MMSA output (A_F V_F, row 0; 1 x d_h per head, the shape
   the text gives Q_A) is used directly, not re-projected through W_Q: eq 5.10 has no d^2 term for it. Q_A is a
   separate learnable d-vector per block (the text adds "a learnable abstract token" in each attention; carrying
   one across blocks/stages would need projections it never mentions). The abstract row skips W_O (only the
   foreground rows are written back). +d params per block.
11. W_O is applied to the N_F foreground rows only (eq 5.9 counts d^2 N_F; background rows go through the
   ChannelMLP instead). SQA masks foreground keys with -inf instead of gathering X_B, so its two 1-query matmuls
   run over N rather than N_B keys: +2 N_F d MACs per block, < 0.001 G in every variant.
12. CPVT positional encoding, placement not stated: a PEG (x + depthwise 3x3 conv) at the start of every block, as
   in works the text cites with it (CMT, EdgeViT), since the text says it is there "to learn local features".
   Effect vs one PEG per stage: +0.3 % (B0) ... +0.1 % (B4) params, +0.6 % ... +0.2 % MACs.
13. Block: pre-norm, x + PEG(x); x + PartialAttention(LN(x)); x + MLP(LN(x)) ("similar to the meta-design in the
   original ViT"); LayerNorm eps 1e-6; qkv with bias; final LayerNorm before pooling. Norm types, stem
   activation and init are not stated (no measurable params/MACs effect).

Complexity conventions: `count_macs` counts conv, linear and every matmul/einsum (attention included) and no
norms/activations. The dissertation's "FLOPs" are multiply-accumulates (its own stage-1 attention examples for PVT
and Swin, 58.6 M and 71.1 M, reproduce as MAC counts), so they are compared with `count_macs` directly.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerNorm2d, SelectAdaptivePool2d, calculate_drop_path_rates, trunc_normal_
from timm.layers import get_device_dtype
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model

__all__ = ['PartialFormer']


class HeadMLP(nn.Module):
    """Mixes attention logits across heads: FC h -> e*h, softmax over keys, FC e*h -> h (eq 5.5)."""

    def __init__(self, num_heads: int, expand_ratio: int = 4, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.expand = nn.Linear(num_heads, num_heads * expand_ratio, **dd)
        self.reduce = nn.Linear(num_heads * expand_ratio, num_heads, **dd)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        # (B, h, queries, keys) -> heads last, so both FCs are plain Linear layers over the head axis. Contiguous: a
        # Linear on the permuted view exports as expand + bmm, which int8 lowering leaves a float matmul
        x = self.expand(logits.permute(0, 2, 3, 1).contiguous())
        x = x.softmax(dim=2)  # key axis of (B, queries, keys, e*h)
        x = self.reduce(x)
        return x.permute(0, 3, 1, 2)


class ChannelMLP(nn.Module):
    """SQA output transform: FC d -> d/r, LayerNorm, ReLU, FC d/r -> d (eq 5.7)."""

    def __init__(self, dim: int, reduction: int = 4, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.norm = nn.LayerNorm(hidden, **dd)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


class PartialAttention(nn.Module):
    """Partial attention: MMSA over the top-N_F tokens plus an abstract token, SQA over the rest.

    `forward(x, scores)` takes the normalized tokens x (B, N, d) and one context score per token (B, N); it returns
    the residual update (B, N, d): O_F on the foreground rows, ChannelMLP(Y_B) on every background row.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            num_foreground: int = 49,
            head_expand_ratio: int = 4,
            channel_reduction: int = 4,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        self.num_foreground = num_foreground
        self.abstract_token = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)  # W_Q, W_K, W_V shared by MMSA and SQA
        self.head_mlp = HeadMLP(num_heads, head_expand_ratio, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)  # W_O, foreground rows only
        self.proj_drop = nn.Dropout(proj_drop)
        self.channel_mlp = ChannelMLP(dim, channel_reduction, **dd)
        self.abstract_qkv: Optional[nn.Parameter] = None  # the deploy form's (`fuse`)
        trunc_normal_(self.abstract_token, std=.02)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, L, d) -> (B, h, L, d_h); head_dim from the width (-1), so head-dim pruning needs no attribute edits
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    @staticmethod
    def _split_qkv(t: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        # (B, L, 3d) -> three (B, L, d)
        return t.reshape(t.shape[0], t.shape[1], 3, -1).permute(2, 0, 1, 3).unbind(0)

    def forward(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        # at least one background token must remain for SQA (N is static under a dynamic-batch export)
        num_fg = min(self.num_foreground, N - 1)
        fg_index = scores.topk(num_fg, dim=1).indices  # (B, N_F), descending context score

        # q / k / v: the same split as `chunk(3, -1)`, written as an unbind of a leading dim whose every output has
        # one reader (its head reshape), the form graph tracers such as structured pruners map onto the qkv rows
        q, k, v = (self._heads(t) for t in self._split_qkv(self.qkv(x)))  # (B, h, N, d_h), all tokens

        # MMSA operands: the abstract token's projections, then the foreground rows gathered from the projections
        abstract_qkv = self.qkv(self.abstract_token) if self.abstract_qkv is None else self.abstract_qkv
        qa, ka, va = (self._heads(t).expand(B, -1, -1, -1) for t in self._split_qkv(abstract_qkv))
        gather_index = fg_index[:, None, :, None].expand(-1, self.num_heads, -1, q.shape[-1])
        q_f = torch.cat([qa, q.gather(2, gather_index)], dim=2)
        k_f = torch.cat([ka, k.gather(2, gather_index)], dim=2)
        v_f = torch.cat([va, v.gather(2, gather_index)], dim=2)  # (B, h, N_F + 1, d_h)

        scale = q.shape[-1] ** -0.5
        attn = self.head_mlp((q_f * scale) @ k_f.transpose(-2, -1))
        attn = self.attn_drop(attn)
        out_f = attn @ v_f  # (B, h, N_F + 1, d_h)
        query_a = out_f[:, :, :1]  # the abstract token after abstracting the foreground: SQA's single query
        out_f = self.proj(out_f[:, :, 1:].transpose(1, 2).reshape(B, num_fg, -1))
        out_f = self.proj_drop(out_f)

        # SQA over the background: all keys, foreground ones masked out (same as gathering X_B, without the copy)
        # a tensor source, not a scalar: TorchScript (OpenVINO's converter) has no bool-scalar scatter overload
        is_fg = torch.zeros_like(scores, dtype=torch.bool).scatter(
            1, fg_index, torch.ones_like(fg_index, dtype=torch.bool))
        logits = (query_a * scale) @ k.transpose(-2, -1)  # (B, h, 1, N)
        logits = logits.masked_fill(is_fg[:, None, None, :], float('-inf'))
        y_b = logits.softmax(dim=-1) @ v  # (B, h, 1, d_h)
        y_b = self.channel_mlp(y_b.transpose(1, 2).reshape(B, 1, -1))  # (B, 1, d)

        # background rows get the broadcast Y'_B, foreground rows their MMSA output, at their original positions
        return y_b.expand(B, N, -1).scatter(1, fg_index.unsqueeze(-1).expand(-1, -1, out_f.shape[-1]), out_f)

    @torch.no_grad()
    def fuse(self) -> 'PartialAttention':
        """Deploy form, same function (`timm.models.reparameterize_model` calls it; inference only).

        The abstract token's q / k / v depend on weights alone, so they are computed once here. Besides saving a
        one-token Linear per call, this leaves `qkv` with a single caller: inductor's X86 int8 Linear pattern
        matches a weight dequantize with one user only, so with two callers the block's widest Linear ran in float,
        on a weight dequantized at every call. They become a parameter in place of the token, so QAT on the deploy
        form trains them.
        """
        self.abstract_qkv = nn.Parameter(self.qkv(self.abstract_token))
        self.abstract_token = None
        return self


class Mlp(nn.Module):
    """FC -> GELU -> FC on NHWC tokens."""

    def __init__(self, dim: int, hidden_dim: int, act_layer: Type[nn.Module] = nn.GELU, drop: float = 0.,
                 device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PartialBlock(nn.Module):
    """x + PEG(x); x + PartialAttention(LN(x)); x + MLP(LN(x)) on NHWC tokens."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_foreground: int = 49,
            head_expand_ratio: int = 4,
            channel_reduction: int = 4,
            mlp_ratio: float = 4.,
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
        # CPVT positional encoding generator: depthwise 3x3 with a residual
        self.pos_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = PartialAttention(
            dim, num_heads=num_heads, num_foreground=num_foreground, head_expand_ratio=head_expand_ratio,
            channel_reduction=channel_reduction, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x + self.pos_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        tokens = x.reshape(B, H * W, C)
        # context score from the residual stream (see module docstring, note 8); ranking carries no gradient
        scores = tokens.detach().mean(dim=-1)
        update = self.attn(self.norm1(tokens), scores)
        x = x + self.drop_path1(update.reshape(B, H, W, C))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class Stem(nn.Module):
    """3x3/2 conv (C/2) -> BN -> GELU -> 3x3/2 conv (C) -> BN: stride 4, NCHW."""

    def __init__(self, in_chans: int, dim: int, act_layer: Type[nn.Module] = nn.GELU, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        mid = dim // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=2, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid, **dd)
        self.act = act_layer()
        self.conv2 = nn.Conv2d(mid, dim, 3, stride=2, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class Downsample(nn.Module):
    """Strided conv patch embedding (kernel = stride = 2 by default) -> LayerNorm; NCHW in, NHWC out."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 2, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride=2, padding=(kernel_size - 1) // 2, **dd)
        self.norm = nn.LayerNorm(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PartialFormerStage(nn.Module):
    """(Downsample) + partial Transformer blocks; NCHW in, NCHW out."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            num_heads: int,
            downsample: bool = True,
            downsample_kernel_size: int = 2,
            num_foreground: int = 49,
            head_expand_ratio: int = 4,
            channel_reduction: int = 4,
            mlp_ratio: float = 4.,
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
        self.downsample = Downsample(in_chs, out_chs, downsample_kernel_size, **dd) if downsample else None
        self.blocks = nn.Sequential(*[
            PartialBlock(
                out_chs,
                num_heads=num_heads,
                num_foreground=num_foreground,
                head_expand_ratio=head_expand_ratio,
                channel_reduction=channel_reduction,
                mlp_ratio=mlp_ratio,
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
        x = self.downsample(x) if self.downsample is not None else x.permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class PartialFormer(nn.Module):
    """PartialFormer (re-implementation from the dissertation text, see the module docstring)."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (32, 64, 128, 256),
            depths: Tuple[int, ...] = (2, 2, 6, 6),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            num_foreground: Tuple[int, ...] = (49, 49, 49, 49),
            head_expand_ratio: int = 4,
            channel_reduction: int = 4,
            mlp_ratio: float = 4.,
            downsample_kernel_size: int = 2,
            head_hidden_size: Optional[int] = 1280,
            qkv_bias: bool = True,
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
            embed_dims: Channels per stage (C, 2C, 4C, 8C).
            depths: Blocks per stage.
            num_heads: Attention heads per stage.
            num_foreground: Foreground tokens N_F per block in each stage (capped at tokens - 1).
            head_expand_ratio: HeadMLP expansion e.
            channel_reduction: SQA ChannelMLP reduction r.
            mlp_ratio: Block MLP expansion.
            downsample_kernel_size: Kernel of the stride-2 patch embeddings in front of stages 2-4.
            head_hidden_size: Width of the pre-logits layer between pooling and classifier (None: no layer).
            qkv_bias: Bias on the shared qkv projection.
            act_layer: Activation of the stem, block MLPs and pre-logits layer.
            norm_layer: Norm of blocks (LayerNorm, eps 1e-6).
            drop_rate: Head dropout rate.
            proj_drop_rate: Dropout after attention output and MLP projections.
            attn_drop_rate: Attention dropout rate (MMSA weights).
            drop_path_rate: Stochastic depth rate, linear over all blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info = []

        self.stem = Stem(in_chans, embed_dims[0], act_layer=act_layer, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=False)
        dpr = [dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        stages = []
        for i in range(num_stages):
            stages.append(PartialFormerStage(
                embed_dims[i - 1] if i > 0 else embed_dims[0],
                embed_dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                downsample=i > 0,
                downsample_kernel_size=downsample_kernel_size,
                num_foreground=num_foreground[i],
                head_expand_ratio=head_expand_ratio,
                channel_reduction=channel_reduction,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = embed_dims[-1]
        self.norm = LayerNorm2d(self.num_features, eps=1e-6, **dd)
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        if head_hidden_size:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module('fc', nn.Linear(self.num_features, head_hidden_size, **dd))
            self.pre_logits.add_module('act', act_layer())
            self.head_hidden_size = head_hidden_size
        else:
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0., (2. / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set:
        # the abstract tokens are learned embeddings (like a cls token), 3-D so timm would otherwise decay them
        return {name for name, _ in self.named_parameters() if name.endswith(('abstract_token', 'abstract_qkv'))}

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
        # the pre-logits layer is kept: it belongs to the pretrained body of the head, like timm's MobileNetV3
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
            self.global_pool.train(self.training)
            if not global_pool:
                # unpooled maps cannot go through a Linear over channels-first tensors
                self.pre_logits = nn.Identity()
                self.head_hidden_size = self.num_features
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
            norm: Apply the final norm to the last stage's intermediate.
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
            # the final norm (and the head after it) are sized for the last stage
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)  # grad checkpointing is applied inside each stage
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        x = self.pre_logits(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """No official weights exist: unwrap common trainer containers / DDP prefixes and pass keys through."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    return {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head',
        'paper_name': 'Efficient Vision Transformers with Partial Attention (ECCV 2024); Vo, PhD dissertation, '
                      'University of Ulsan 2023, Ch. 5',
        **kwargs,
    }


# no official code or weights: every tag is untrained
default_cfgs = generate_default_cfgs({
    'partialformer_b0.untrained': _cfg(),
    'partialformer_b1.untrained': _cfg(),
    'partialformer_b2.untrained': _cfg(),
    'partialformer_b3.untrained': _cfg(),
    'partialformer_b4.untrained': _cfg(),
    'test_partialformer.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_partialformer(variant: str, pretrained: bool = False, **kwargs: Any) -> PartialFormer:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    model = build_model_with_cfg(
        PartialFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=True),
        **kwargs,
    )
    return model


def _widths(base: int) -> Tuple[int, ...]:
    return base, base * 2, base * 4, base * 8


@register_model
def partialformer_b0(pretrained: bool = False, **kwargs: Any) -> PartialFormer:
    model_args = dict(embed_dims=_widths(24), depths=(2, 2, 6, 6), num_heads=(2, 4, 8, 16))
    return _create_partialformer('partialformer_b0', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def partialformer_b1(pretrained: bool = False, **kwargs: Any) -> PartialFormer:
    model_args = dict(embed_dims=_widths(32), depths=(2, 2, 6, 6), num_heads=(2, 4, 8, 16))
    return _create_partialformer('partialformer_b1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def partialformer_b2(pretrained: bool = False, **kwargs: Any) -> PartialFormer:
    model_args = dict(embed_dims=_widths(48), depths=(2, 2, 8, 8), num_heads=(3, 6, 12, 24))
    return _create_partialformer('partialformer_b2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def partialformer_b3(pretrained: bool = False, **kwargs: Any) -> PartialFormer:
    model_args = dict(embed_dims=_widths(64), depths=(2, 2, 8, 8), num_heads=(4, 8, 16, 32))
    return _create_partialformer('partialformer_b3', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def partialformer_b4(pretrained: bool = False, **kwargs: Any) -> PartialFormer:
    model_args = dict(embed_dims=_widths(96), depths=(2, 2, 8, 6), num_heads=(6, 12, 24, 48))
    return _create_partialformer('partialformer_b4', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_partialformer(pretrained: bool = False, **kwargs: Any) -> PartialFormer:
    # 64 px input: 256 / 64 / 16 / 4 tokens per stage
    model_args = dict(
        embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), num_foreground=(16, 8, 4, 2),
        mlp_ratio=2., head_hidden_size=64)
    return _create_partialformer('test_partialformer', pretrained=pretrained, **dict(model_args, **kwargs))
