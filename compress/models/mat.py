"""MAT: Mixing Abstract Tokens (re-implementation from the text, no official code)

Source: X.-T. Vo, "Efficient Vision Transformers with Multi-Scale and Partial Attentions for Object Recognition",
PhD dissertation, University of Ulsan, 2023, Chapter 4 ("Exchanging Information across Non-overlapped Local
Self-Attentions via Mixing Abstract Tokens"). No official code or weights exist: this is a re-implementation from
the text (figures 4.1-4.3 are lost in the available copy), built so that the dissertation's own tables - variant
params / GFLOPs (Tables 4.3, 4.12) and the ablations of Tables 4.2 and 4.9 - check every reading below.
tests/test_mat.py compares every variant and ablation row with those tables.

Architecture (stated): a 3-conv stem to stride 4; stages 1-2 of "pure MLP" blocks (no spatial token mixer);
stages 3-4 of MAT blocks (MAT attention + MLP, ratio 4); a Bilinear PE before stages 2-4 (stride 2, channels x2);
channels C, 2C, 4C, 8C; window 7; MAT attention = token merging, token abstraction, mixing abstract tokens, token
fusion (Sec. 4.3.1). GFLOPs in the text are MACs.

Implementation notes: where the text is ambiguous, the reading chosen, and why. Effects are measured with
`eval.complexity` at 224 on MAT-2 unless stated; "fvcore MACs" = `count_macs(..., include_norms=True)`.
* Q/K/V projections: the text gives W^{Q,K,V} in R^{C/h x C/h} "shared across merged tokens and heads". Taken as
  the usual C -> 3C Linear (`qkv`), because the params need it: Table 4.9 "+Window Attn" adds 2.103 M to the pure
  MLP model, 4.28 C^2 per block, i.e. full C x C q/k/v and output projections (shared C/h x C/h q/k/v plus an
  output projection would add about 1 C^2), and the Limitations section blames the q/k/v matrices for the high
  parameter count.
* Extra projections of MAT over window attention: the text's equations reuse the symbols W^K, W^V in the token
  fusion (eq. 4.5) and show no output projections (eqs. 4.1, 4.3 are plain Concat). Table 4.9 says MAT adds
  2.965 M params over window attention (6.03 C^2 per block) but only +0.007 GFLOPs. Chosen: the mixing MHSA has
  its own q/k/v and output projection (`mix_qkv`, `mix_proj`, 4 C^2) and the fusion its own key / value projection
  of the mixed tokens (`fuse_kv`, 2 C^2); all three act only on the N_w abstract tokens, which keeps the MACs low.
  Measured: MAT - window = 2.9652 M params (published 2.965 M), +0.0094 GMACs (published +0.007 +- 0.001; the
  attention matmuls of the extra token and of the fusion are 0.0023 of it).
* Fusion queries: Q_I = W^Q X is read as the window attention's own queries of the image tokens, reused (no new
  projection). A separate C x C query projection over all image tokens would add 0.49 M params (4.6 %) and
  +0.039 GMACs, five times the published MAT - window difference.
* Fusion output: "element-wise addition between the output of local self-attention X' and the enhanced feature".
  X' and the cross-attention output are both head-concatenated (eqs. 4.1, 4.5 have no W_O), so they are summed
  first and one output projection (`proj`, as in any MHSA block) follows. Projecting X' alone and adding the
  cross-attention afterwards costs the same params and MACs.
* Mixing: taken literally, A~' = MHSA(A') - no residual, norm or FFN around it ("Transformer encoder" in the prose,
  one MHSA in the equations). The mixed tokens only feed `fuse_kv`, a linear map, so a residual would add little.
* Abstract tokens: the text defines A in R^{N_w x h x 1 x C/h}, one per window, but also "N_w is changed according
  to the image size" (and trains detectors at 1333x800). Chosen: one learned C-vector per block, broadcast to every
  window, so any input size works. A learned N_w-row table would have to be resized for every other input size.
  Table 4.2 agrees: MAT in stage 1 adds 22 +- 1 k params, and 64 window tokens x 32 ch x 2 blocks would add 4 k
  more. Effect of a per-window table: +0.02 % params, no MACs. Tokens are created fresh in every block (not
  carried from block to block); the abstract-token output of a block is used only for mixing, then dropped.
* Relative position bias: not mentioned in the text; added (Swin-style (2w-1)^2 x h table per block, zero bias on
  the abstract token's row and column). The chapter extends Swin's window attention, and Table 4.2's per-stage
  param costs of MAT in stages 1 / 2 / 3 exceed this reconstruction without the bias by 0.7 / 1.4 / 7 (+-1) k,
  which are the bias tables' sizes (0.68 / 1.35 / 8.1 k with head width 16). Effect: +24.3 k params (+0.23 %)
  for MAT-2 (+36.5 / 32.4 / 48.7 / 64.9 k for MAT-1/3/4/5), no MACs counted (it is an add).
* Padding: the text assumes H, W are multiples of w. Inputs that are not multiples are zero-padded bottom / right
  after the norm and cropped before `proj`, without an attention mask (as Swin's detection backbones pad W-MSA);
  padded keys stay visible to the window's tokens and to its abstract token. At 224 there is no padding, and
  stage 4 is a single 7x7 window (N_w = 1): mixing is then trivial and the fusion broadcasts one vector.
* Attention scale 1/sqrt(C/h) as stated; q/k/v bias on (unstated; Swin's default). Stage 1-2 heads (used only by
  the Table 4.2 ablation, `stage_mixers`) keep the stage-3 head width (16 for MAT-2).
* Bilinear PE (Fig. 4.3 caption + Table 4.12 rows "3x3 DWconv s2, C; 1x1 conv, 2C; bilinear interpolation"; which
  conv is in which path is not stated): offsets are predicted by the stride-2 depthwise 3x3 conv followed by a tiny
  1x1 conv to (dx, dy) (`offset_head`, C -> 2, zero-initialised: at init the PE is a 2x2 average pool); the input
  is sampled at the 2x2-cell centres + offset (in input pixels) by `grid_sample` (bilinear, zero padding,
  align_corners=False); the 1x1 conv C -> 2C (`proj`, the table's "1x1 conv, 2C") then BN on the sampled
  features. The other reading (the 1x1 C -> 2C conv gives per-channel offsets) cannot double the channels without
  a further weight. Check against Table 4.9, replacing this PE in MAT-2: a 3x3 stride-2 conv + BN adds 341.8 k
  params / 38.1 M fvcore MACs (published 340 k / 37 M); Swin patch merging adds 127.2 k / 14.7 M
  (published 125 k / 13 M). Offsets are unbounded (DAT-style tanh scaling is not mentioned).
* Stem (Table 4.12 gives only kernels, strides, widths): conv 3x3/2 -> BN -> GELU -> depthwise 3x3 -> BN -> GELU
  -> conv 3x3/2 -> BN, no conv bias. Blocks: pre-norm LayerNorm, x + mixer(LN(x)), x + MLP(LN(x)), GELU MLP,
  no layer scale (none stated). A final LayerNorm over channels precedes the head (not stated).
* Head (not described): GAP + Linear alone leaves every variant 1.3-1.4 M params short (MAT-2 pure MLP 4.34 M vs
  5.699 M). Chosen: a 1280-wide pre-logits layer (`pre_logits`: 1x1 conv -> BN -> GELU) run at the final 7x7
  resolution *before* pooling, as MobileNetV2/V3 and MobileViT do, then the classifier. Run after pooling it
  would give the same params but leave the pure-MLP ablation (0.461 G) 16 M MACs short; before pooling, the
  pure-MLP model has 5.695 M params / 0.4593 fvcore GMACs (published 5.699 / 0.461). Effect of the whole layer on
  MAT-2: +1.354 M params, +17.1 M MACs.
* FLOPs convention: the text's GFLOPs are MACs counted like fvcore (conv + linear + attention matmuls + norms and
  pooling), i.e. `count_macs(model, include_norms=True)`: with norms, the per-stage MAC costs of MAT in
  stages 1 / 2 / 3 (Table 4.2: 76 / 41 / 98 M) come out 74.6 / 40.9 / 98.0 M; without, 73.6 / 40.4 / 97.2 M.
* Not reproduced: with attention in stage 4 (window or MAT), the published MAT-2 counts carry about +100 k params
  and +20 M fvcore MACs more than this reconstruction, in every row of Tables 4.2 and 4.9 that has stage-4
  attention, and not in the pure-MLP row (+4 k / +1.6 M). No reading of the text found explains it. Totals at
  224 (tests/test_mat.py): params -0.5 ... -1.0 % for all variants; fvcore MACs -1.2 % (MAT-5) ... -3.8 % (MAT-1,
  the one variant outside 3 %).
* Training defaults (Table 4.10): drop path 0.05, no EMA; `drop_path_rate` defaults to 0 here as in timm.
"""
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerNorm2d, Mlp, SelectAdaptivePool2d, calculate_drop_path_rates, get_device_dtype, trunc_normal_,
    use_fused_attn,
)
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model

__all__ = ['MAT']

MIXERS = ('mlp', 'window', 'mat')


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor], fused: bool,
            attn_drop: nn.Dropout) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + bias) v over the last two dims (q, k, v: ... x tokens x head_dim)."""
    if fused:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn_drop.p if attn_drop.training else 0.)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn_drop(attn.softmax(dim=-1))
    return attn @ v


def relative_position_index(window_size: int) -> torch.Tensor:
    """(w*w, w*w) index into a ((2w - 1)^2)-row table: row of the offset (dy, dx) between two tokens of a window."""
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij')
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + window_size - 1  # 0 .. 2w - 2
    dx = xs[:, None] - xs[None, :] + window_size - 1
    return dy * (2 * window_size - 1) + dx


class MATAttention(nn.Module):
    """Window attention with one abstract token per window, abstract-token mixing and token fusion, on NHWC.

    With `mix_abstract_tokens=False` this is plain non-overlapping window attention (the paper's "Window Attn"
    baseline of Table 4.9). Steps (Sec. 4.3.1):

    1. token merging: pad H, W to multiples of the window, partition, prepend the block's learned abstract token
       to every window (w*w + 1 tokens);
    2. token abstraction: multi-head self-attention inside every window (`qkv`, relative position bias on the
       image-image pairs);
    3. mixing abstract tokens: multi-head self-attention over the N_w abstract-token outputs of the whole image
       (`mix_qkv`, `mix_proj`), the only cross-window path;
    4. token fusion: cross-attention of every image token (its window-attention query, reused) over the N_w mixed
       tokens (keys / values by `fuse_kv`), added to the window-attention output before the shared `proj`.
    """
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int = 7,
            mix_abstract_tokens: bool = True,
            rel_pos_bias: bool = True,
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
        self.window_size = window_size
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
            # non-persistent: derived from window_size, so checkpoints carry only the table
            self.register_buffer(
                'relative_position_index', relative_position_index(window_size).to(device), persistent=False)
        else:
            self.relative_position_bias_table = None
        if mix_abstract_tokens:
            # one learned token per block, shared by all windows (N_w changes with the input size: module docstring)
            self.abstract_token = nn.Parameter(torch.zeros(1, 1, dim, **dd))
            self.mix_qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
            self.mix_proj = nn.Linear(dim, dim, **dd)
            self.fuse_kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        else:
            self.abstract_token = None
        self.mix_abstract_tokens = mix_abstract_tokens
        self.token_qkv = None  # deploy form (`reparameterize`): the abstract token's q / k / v
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def init_non_persistent_buffers(self) -> None:
        """Recompute the relative position index (after `to_empty` from the meta device)."""
        if self.relative_position_bias_table is not None:
            self.relative_position_index.copy_(relative_position_index(self.window_size))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Deploy form: the abstract token's q / k / v row, the same in every window, computed once.

        `qkv` then reads the image tokens alone, one tensor that an int8 backend quantizes as a whole (OpenVINO kept
        `qkv` in float while its input was a concat of the quantized tokens and the float abstract token). The row
        stays a parameter, so QAT on the deploy form still trains it.
        """
        if self.abstract_token is None:
            return
        self.token_qkv = nn.Parameter(self.qkv(self.abstract_token))
        self.abstract_token = None

    def _window_bias(self, with_token: bool) -> Optional[torch.Tensor]:
        if self.relative_position_bias_table is None:
            return None
        num_tokens = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(num_tokens, num_tokens, -1).permute(2, 0, 1)  # heads, w*w, w*w
        if with_token:
            # the abstract token has no position: zero bias on its row and column (token is index 0)
            bias = F.pad(bias, (1, 0, 1, 0))
        return bias.unsqueeze(0)

    def _mix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the abstract tokens of one image: B x N_w x C -> B x N_w x C."""
        B, N, C = tokens.shape
        q, k, v = self.mix_qkv(tokens).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = _attend(q, k, v, None, self.fused_attn, self.attn_drop)
        return self.mix_proj(x.transpose(1, 2).reshape(B, N, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        # attention width and head width from the weights, not stored attributes (pruning-friendly)
        width = self.qkv.out_features // 3
        head_dim = width // self.num_heads
        pad_h, pad_w = (-H) % ws, (-W) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # bottom / right, cropped again below
        grid_h, grid_w = (H + pad_h) // ws, (W + pad_w) // ws
        num_windows = grid_h * grid_w
        x = x.reshape(B, grid_h, ws, grid_w, ws, C).transpose(2, 3).reshape(B * num_windows, ws * ws, C)
        with_token = self.mix_abstract_tokens
        if self.abstract_token is not None:
            x = torch.cat([self.abstract_token.expand(x.shape[0], -1, -1), x], dim=1)
        qkv = self.qkv(x)
        if self.token_qkv is not None:
            qkv = torch.cat([self.token_qkv.expand(qkv.shape[0], -1, -1), qkv], dim=1)
        num_tokens = qkv.shape[1]

        # token abstraction: window self-attention, the abstract token (index 0) attends to its window and back
        # q / k / v are split before the heads, so each comes out of the unbind with one reader (q is read twice,
        # by this attention and the fusion): graph tracers such as structured pruners size unbind chunks by readers
        q, k, v = (t.reshape(-1, num_tokens, self.num_heads, head_dim).transpose(1, 2)
                   for t in qkv.reshape(-1, num_tokens, 3, width).permute(2, 0, 1, 3).unbind(0))
        x = _attend(q, k, v, self._window_bias(with_token), self.fused_attn, self.attn_drop)  # B*N_w, h, n, d

        if with_token:
            # mixing: the N_w abstract tokens of one image attend to each other (the only cross-window path)
            mixed = self._mix(x[:, :, 0].reshape(B, num_windows, width))
            k_a, v_a = self.fuse_kv(mixed).reshape(B, num_windows, 2, self.num_heads, head_dim).permute(
                2, 0, 3, 1, 4).unbind(0)  # B, h, N_w, d
            # token fusion: every image token's window query attends over all mixed tokens; the token order of
            # the queries is irrelevant to the attention, so they stay in window order
            q_img = q[:, :, 1:].reshape(B, num_windows, self.num_heads, ws * ws, head_dim).transpose(1, 2)
            fused = _attend(
                q_img.reshape(B, self.num_heads, num_windows * ws * ws, head_dim), k_a, v_a, None, self.fused_attn,
                self.attn_drop,
            )
            fused = fused.reshape(B, self.num_heads, num_windows, ws * ws, head_dim).transpose(1, 2)
            x = x[:, :, 1:] + fused.reshape(B * num_windows, self.num_heads, ws * ws, head_dim)

        x = x.transpose(1, 2).reshape(B, grid_h, grid_w, ws, ws, width).transpose(2, 3)
        x = x.reshape(B, grid_h * ws, grid_w * ws, width)
        if pad_h or pad_w:
            x = x[:, :H, :W].contiguous()
        x = self.proj(x)  # after the crop: padded positions are never projected
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    """Pre-norm residual block on NHWC: optional token mixer ('window' / 'mat'), then the MLP.

    `mixer='mlp'` is the paper's "pure MLP" block of stages 1-2 (no spatial token mixer).
    """

    def __init__(
            self,
            dim: int,
            mixer: str = 'mat',
            num_heads: int = 8,
            window_size: int = 7,
            mlp_ratio: float = 4.,
            rel_pos_bias: bool = True,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert mixer in MIXERS, f'unknown mixer {mixer}'
        if mixer == 'mlp':
            self.norm1 = nn.Identity()
            self.attn = None
            self.drop_path1 = nn.Identity()
        else:
            self.norm1 = norm_layer(dim, **dd)
            self.attn = MATAttention(
                dim, num_heads, window_size=window_size, mix_abstract_tokens=mixer == 'mat',
                rel_pos_bias=rel_pos_bias, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd,
            )
            self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path1(self.attn(self.norm1(x)))
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x


class Stem(nn.Module):
    """Conv 3x3/2 -> depthwise 3x3 -> conv 3x3/2 (widths C/2, C/2, C), each followed by BN (+ GELU between)."""

    def __init__(self, in_chans: int, dim: int, act_layer: Type[nn.Module] = nn.GELU, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        mid = dim // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=2, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(mid, **dd)
        self.act1 = act_layer()
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(mid, **dd)
        self.act2 = act_layer()
        self.conv3 = nn.Conv2d(mid, dim, 3, stride=2, padding=1, bias=False, **dd)
        self.bn3 = nn.BatchNorm2d(dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


class BilinearPatchEmbed(nn.Module):
    """Bilinear PE: stride-2 downsampling by bilinear sampling at learned, input-conditioned offsets; NCHW.

    Reference points P are the centres of the 2x2 input cells (one per output position). Offsets (in input pixels)
    come from a stride-2 depthwise 3x3 conv followed by a 1x1 conv to (dx, dy); the input is sampled at P + offset
    by bilinear interpolation (`grid_sample`, zero padding outside), then a 1x1 conv doubles the channels and BN
    normalises. The offset head starts at zero, so at init the sampling is a 2x2 average pool.
    """

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.offset_dw = nn.Conv2d(in_chs, in_chs, 3, stride=2, padding=1, groups=in_chs, **dd)
        self.offset_head = nn.Conv2d(in_chs, 2, 1, **dd)
        self.proj = nn.Conv2d(in_chs, out_chs, 1, bias=False, **dd)
        self.norm = nn.BatchNorm2d(out_chs, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_head.weight)
        nn.init.zeros_(self.offset_head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        offsets = self.offset_head(self.offset_dw(x))  # B, 2 (dx, dy), ceil(H / 2), ceil(W / 2)
        out_h, out_w = offsets.shape[-2:]
        # grid_sample's normalised coordinates (align_corners=False): pixel centre i lies at (2i + 1) / size - 1,
        # so the centre of cell j (input pixel 2j + 0.5) lies at (4j + 2) / size - 1
        ref_x = (torch.arange(out_w, device=x.device, dtype=x.dtype) * 4 + 2) / W - 1
        ref_y = (torch.arange(out_h, device=x.device, dtype=x.dtype) * 4 + 2) / H - 1
        grid_x = ref_x.reshape(1, 1, out_w) + offsets[:, 0] * (2 / W)  # one input pixel = 2 / size
        grid_y = ref_y.reshape(1, out_h, 1) + offsets[:, 1] * (2 / H)
        x = F.grid_sample(
            x, torch.stack([grid_x, grid_y], dim=-1), mode='bilinear', padding_mode='zeros', align_corners=False)
        return self.norm(self.proj(x))


class MATStage(nn.Module):
    """Optional Bilinear PE + blocks. NCHW in and out, NHWC inside the blocks."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            mixer: str = 'mat',
            downsample: bool = True,
            num_heads: int = 8,
            window_size: int = 7,
            mlp_ratio: float = 4.,
            rel_pos_bias: bool = True,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: Union[List[float], float] = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = BilinearPatchEmbed(in_chs, out_chs, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(
                out_chs,
                mixer=mixer,
                num_heads=num_heads,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                rel_pos_bias=rel_pos_bias,
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
        x = self.downsample(x).permute(0, 2, 3, 1)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x.permute(0, 3, 1, 2)


class MAT(nn.Module):
    """MAT Transformer: conv stem, pure-MLP early stages, MAT-attention late stages, Bilinear PE between stages."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 32,
            depths: Tuple[int, ...] = (2, 2, 6, 6),
            num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            stage_mixers: Tuple[str, ...] = ('mlp', 'mlp', 'mat', 'mat'),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            rel_pos_bias: bool = True,
            qkv_bias: bool = True,
            head_hidden_size: int = 1280,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.LayerNorm,
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
            embed_dim: Channels of stage 1 ("#dim"); stage i has embed_dim * 2 ** i.
            depths: Blocks per stage.
            num_heads: Attention heads per stage (used by 'window' / 'mat' stages only).
            stage_mixers: Token mixer per stage: 'mlp' (none, the paper's pure MLP), 'window' or 'mat'.
            window_size: Side of the attention windows.
            mlp_ratio: MLP expansion (4 in every stage of every variant).
            rel_pos_bias: Swin-style relative position bias inside the windows.
            qkv_bias: Bias on the q/k/v projections.
            head_hidden_size: Width of the pre-logits layer between pooling and classifier (0 disables it).
            act_layer: Activation of MLPs, stem and pre-logits.
            norm_layer: Norm of the blocks and the final norm (LayerNorm).
            drop_rate: Head dropout rate.
            proj_drop_rate: Dropout after attention and MLP projections.
            attn_drop_rate: Attention dropout rate.
            drop_path_rate: Stochastic depth rate, linear over all blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        assert len(num_heads) == len(stage_mixers) == num_stages
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info = []

        dims = [embed_dim * 2 ** i for i in range(num_stages)]
        self.stem = Stem(in_chans, dims[0], act_layer=act_layer, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=False)
        dpr = [dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        stages = []
        for i in range(num_stages):
            stages.append(MATStage(
                dims[i - 1] if i > 0 else dims[0],
                dims[i],
                depth=depths[i],
                mixer=stage_mixers[i],
                downsample=i > 0,
                num_heads=num_heads[i],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                rel_pos_bias=rel_pos_bias,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(dims[-1], **dd)

        self.num_features = dims[-1]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        # pre-logits: 1x1 conv -> BN -> act at the final resolution, before pooling (MobileNet / MobileViT style)
        if head_hidden_size:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module('conv', nn.Conv2d(self.num_features, head_hidden_size, 1, bias=False, **dd))
            self.pre_logits.add_module('norm', nn.BatchNorm2d(head_hidden_size, **dd))
            self.pre_logits.add_module('act', act_layer())
            self.head_hidden_size = head_hidden_size
        else:
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.num_features
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()  # don't flatten if pooling disabled
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, MATAttention):
            if m.relative_position_bias_table is not None:
                trunc_normal_(m.relative_position_bias_table, std=.02)
            if m.abstract_token is not None:
                trunc_normal_(m.abstract_token, std=.02)
        elif isinstance(m, BilinearPatchEmbed):
            m.reset_parameters()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set:
        # position-bias tables and abstract tokens are embeddings; 1-D params are excluded by timm's optimizer factory
        return {n for n, _ in self.named_parameters() if 'relative_position_bias_table' in n or 'abstract_token' in n}

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
            norm: Apply the final norm to the last stage's intermediate (if taken).
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
        x = self.pre_logits(x)  # 1x1 conv at the final resolution, before pooling
        x = self.global_pool(x)
        x = self.flatten(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unwrap a training checkpoint of this model (no official weights exist to remap)."""
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
                      '(X.-T. Vo, PhD dissertation, University of Ulsan, 2023), Chapter 4',
        'notes': ('re-implementation from the text; no official code or weights',),
        **kwargs,
    }


# no official weights exist: every tag is untrained
default_cfgs = generate_default_cfgs({
    'mat_1.untrained': _cfg(),
    'mat_2.untrained': _cfg(),
    'mat_3.untrained': _cfg(),
    'mat_4.untrained': _cfg(),
    'mat_5.untrained': _cfg(),
    'test_mat.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_mat(variant: str, pretrained: bool = False, **kwargs: Any) -> MAT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    model = build_model_with_cfg(
        MAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=True),
        **kwargs,
    )
    return model


# Table 4.12: #dim, blocks per stage, heads of stages 3 / 4. Heads of stages 1 / 2 (only used when those stages get
# attention, e.g. the Table 4.2 ablation) keep the stage-3 head width.
@register_model
def mat_1(pretrained: bool = False, **kwargs: Any) -> MAT:
    model_args = dict(embed_dim=24, depths=(2, 2, 6, 6), num_heads=(3, 6, 12, 24))
    return _create_mat('mat_1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mat_2(pretrained: bool = False, **kwargs: Any) -> MAT:
    model_args = dict(embed_dim=32, depths=(2, 2, 6, 6), num_heads=(2, 4, 8, 16))
    return _create_mat('mat_2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mat_3(pretrained: bool = False, **kwargs: Any) -> MAT:
    model_args = dict(embed_dim=36, depths=(2, 2, 8, 8), num_heads=(2, 4, 8, 16))
    return _create_mat('mat_3', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mat_4(pretrained: bool = False, **kwargs: Any) -> MAT:
    model_args = dict(embed_dim=48, depths=(3, 3, 8, 8), num_heads=(3, 6, 12, 24))
    return _create_mat('mat_4', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def mat_5(pretrained: bool = False, **kwargs: Any) -> MAT:
    model_args = dict(embed_dim=64, depths=(2, 2, 8, 8), num_heads=(4, 8, 16, 32))
    return _create_mat('mat_5', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_mat(pretrained: bool = False, **kwargs: Any) -> MAT:
    # window 2 at 64 px gives stage 3 four windows and stage 4 one, as MAT at 224 with window 7
    model_args = dict(
        embed_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 1, 2, 4), window_size=2, head_hidden_size=256)
    return _create_mat('test_mat', pretrained=pretrained, **dict(model_args, **kwargs))
