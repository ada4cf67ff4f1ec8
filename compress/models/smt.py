"""SMT: Scale-Aware Modulation Transformer

Paper: `Scale-Aware Modulation Meet Transformer` - https://arxiv.org/abs/2307.08579

Code: https://github.com/AFeng-x/SMT (MIT). Where paper and code disagree this port follows the code, since the
code produced the released weights: the MSA blocks add a depthwise 3x3 conv of V to the attention output, the SAM
mixer ends in a Linear projection and its aggregation is grouped 1x1 -> BN -> GELU -> 1x1, every stage ends in its
own LayerNorm, and SMT-L uses layer scale (init 1e-4).

Implementation notes:
* Multi-head mixed conv (MHMC): the per-head 3/5/7/9 depthwise kernels are stored per head exactly as in the
  official code (`local_conv_1..4`, one level down in `attn.mhmc`), so parameter counts equal the official ones.
  The forward zero-pads them to 9x9, interleaves them into one depthwise kernel and runs ONE conv; the weight
  assembly depends on parameters only, so inductor freezing folds it into a constant 9x9 weight.
* Head shuffle: the paper's "one channel from each head per group" interleave is folded into the output channel
  order of `s`, so the MHMC channels are head-interleaved (channel c * num_heads + i is channel c of head i) and
  no activation transpose is needed. `checkpoint_filter_fn` permutes `s` once at load time; the official
  `local_conv_{i}` tensors load unchanged, only their key prefix is remapped.
* Blocks run on NHWC tensors; convs see them through permuted (channels-last) views without copies.
* `drop_rate` is timm's head dropout; the official `drop_rate` (projection / MLP dropout) is `proj_drop_rate`.
* Structured pruning: what Torch-Pruning must be told about the MHMC, the grouped aggregation and the MSA heads is
  declared in `compress.stages.families.smt`.

Complexity: params are the official counts exactly. MACs come in two conventions that differ only in the MHMC:
"executed" (`eval.complexity.count_macs`, what runs: the fused MHMC is a 9x9 depthwise conv over all C channels,
including the zero taps padded around the 3/5/7 heads) and "tap-exact" (the official per-head convs: executed minus
`MultiHeadMixedConv.num_padded_taps` per output position), the architecture's cost; tap-exact conv + linear (no
attention matmuls, ptflops-like) reproduces the paper's FLOPs at 224 (SMT-S's paper 20.5 M params is a misprint of
the code's count; SMT-L's 17.7 GFLOPs matches no convention). tests/test_smt.py pins every count per variant;
`python -m compress.benchmark smt_t` prints them next to the paper's.

@inproceedings{lin2023smt,
  title={Scale-Aware Modulation Meet Transformer},
  author={Lin, Weifeng and Wu, Ziheng and Chen, Jiayu and Huang, Jun and Jin, Lianwen},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2023}
}
"""
import math
import re
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath, LayerScale, SelectAdaptivePool2d, calculate_drop_path_rates, get_device_dtype, trunc_normal_,
    use_fused_attn,
)
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from timm.models._registry import generate_default_cfgs, register_model

__all__ = ['SMT']


class MultiHeadMixedConv(nn.Module):
    """Multi-head mixed conv: head i of `num_heads` is a depthwise (3 + 2i) conv with bias, run as ONE fused conv.

    Parameters are stored per head exactly as the official code stores them (`local_conv_{i+1}`, shape
    (C/h, 1, 3 + 2i, 3 + 2i), with bias), so the parameter count and the key suffixes are the official ones.
    `forward` zero-pads every head's kernel to K = 2 * num_heads + 1, interleaves the heads into one (C, 1, K, K)
    depthwise kernel and runs one conv: no Python loop over activations, and with inductor freezing the kernel
    assembly is folded into a constant. The fused conv still executes the zero taps, so executed MACs exceed the
    official tap-exact MACs by `num_padded_taps` per output position (see the module docstring).

    Channels are head-interleaved: channel c * num_heads + i is channel c of head i (the official head shuffle,
    folded into the output order of `s`). Widths are read from the weights at call time, so a pruner that removes
    channel c from every head (one proj0 group) only slices the per-head weights.
    """

    def __init__(self, dim: int, num_heads: int = 4, bias: bool = True, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.num_heads = num_heads
        head_chs = dim // num_heads
        for i in range(num_heads):
            # NOTE: the per-head Conv2d modules are parameter holders (official names, official init via
            # SMT._init_weights); they are never called, so their static shape attributes are never read
            self.add_module(f'local_conv_{i + 1}', nn.Conv2d(
                head_chs, head_chs, 3 + 2 * i, padding=1 + i, groups=head_chs, bias=bias, **dd))
        self.reset_parameters()

    def head_convs(self) -> List[nn.Conv2d]:
        return [getattr(self, f'local_conv_{i + 1}') for i in range(self.num_heads)]

    @property
    def num_padded_taps(self) -> int:
        """Zero taps the fused conv executes per output position (pure shape arithmetic, works on meta)."""
        weights = [conv.weight for conv in self.head_convs()]
        k = max(w.shape[-1] for w in weights)
        return sum(w.shape[0] * (k * k - w.shape[-2] * w.shape[-1]) for w in weights)

    def reset_parameters(self) -> None:
        # official init: normal(0, sqrt(2 / fan_out)), fan_out = k * k for a depthwise conv; zero bias
        for conv in self.head_convs():
            nn.init.normal_(conv.weight, 0., math.sqrt(2. / (conv.weight.shape[-2] * conv.weight.shape[-1])))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def fused_weight_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The head-interleaved (C, 1, K, K) kernel (heads zero-padded to K) and (C,) bias the forward runs."""
        convs = self.head_convs()
        # head i has kernel 3 + 2i: pad it by num_heads - 1 - i to 2 * num_heads + 1 (geometry from num_heads, not
        # from tensor shapes, so tracing exporters such as openvino.convert_model see plain constants)
        weights = [F.pad(conv.weight, [self.num_heads - 1 - i] * 4) for i, conv in enumerate(convs)]
        # stack on dim 1 then flatten: (C/h, h, 1, K, K) -> (C, 1, K, K), channel c * h + i = channel c of head i
        weight = torch.stack(weights, dim=1).flatten(0, 1)
        bias = None
        if convs[0].bias is not None:
            bias = torch.stack([conv.bias for conv in convs], dim=1).flatten()
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.fused_weight_bias()
        return F.conv2d(x, weight, bias, padding=self.num_heads, groups=weight.shape[0])

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """The same function as one plain depthwise conv (for ``timm.utils.reparameterize_model`` before export).

        Quantizers annotate convs whose weight is a parameter; here the weight is assembled in the forward, so
        PT2E would leave this conv in float without the fused module.
        """
        weight, bias = self.fused_weight_bias()
        conv = nn.Conv2d(weight.shape[0], weight.shape[0], weight.shape[-1], padding=self.num_heads,
                         groups=weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
        return conv


class ScaleAwareModulation(nn.Module):
    """SAM mixer: out = proj(SAA(MHMC(s(x))) * v(x)) on NHWC tokens."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 4,
            expand_ratio: int = 2,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % num_heads == 0, f'dim {dim} must be divisible by num_heads {num_heads}'
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.s = nn.Linear(dim, dim, bias=qkv_bias, **dd)  # output channels in head-interleaved order
        self.mhmc = MultiHeadMixedConv(dim, num_heads, **dd)
        # scale-aware aggregation: grouped 1x1 mixes the num_heads channels of one group (W_intra), 1x1 (W_inter)
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=dim // num_heads, **dd)
        self.bn = nn.BatchNorm2d(dim * expand_ratio, **dd)
        self.act = act_layer()
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v(x)
        s = self.mhmc(self.s(x).permute(0, 3, 1, 2))
        s = self.proj1(self.act(self.bn(self.proj0(s))))
        x = s.permute(0, 2, 3, 1) * v
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Attention(nn.Module):
    """Global multi-head self-attention plus a depthwise 3x3 conv of V (inherited from Shunted), on NHWC."""
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
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
        self.fused_attn = use_fused_attn()
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.local_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        # head_dim comes from the projections' output width (-1), not from a stored attribute
        q = self.q(x).reshape(B, H * W, self.num_heads, -1).transpose(1, 2)
        # split k / v on a leading dim (a view, same tensors as unbind(2)): Torch-Pruning maps unbind(0) outputs to
        # the k and v halves of the kv output channels, so pruning keeps k, v, local_conv and proj aligned
        k, v = self.kv(x).reshape(B, H * W, 2, -1).permute(2, 0, 1, 3).unbind(0)
        v = v.reshape(B, H, W, -1)  # one consumer per unbind output, so the tracer counts two chunks
        # the local conv sees V in the projection's own (head-major) channel order, as in the official code
        v_local = self.local_conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        k = k.reshape(B, H * W, self.num_heads, -1).transpose(1, 2)
        v = v.reshape(B, H * W, self.num_heads, -1).transpose(1, 2)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            q = q * q.shape[-1] ** -0.5
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, H, W, -1) + v_local
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class DetailMlp(nn.Module):
    """Shunted "detail-specific" FFN: fc2(act(h + dwconv3x3(h))), h = fc1(x), on NHWC."""

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
        self.fc1 = nn.Linear(dim, hidden_dim, **dd)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        x = self.drop1(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


class Block(nn.Module):
    """Pre-norm residual block with a SAM (`use_attn=False`) or MSA (`use_attn=True`) mixer."""

    def __init__(
            self,
            dim: int,
            use_attn: bool = False,
            ca_num_heads: int = 4,
            sa_num_heads: int = 8,
            mlp_ratio: float = 4.,
            expand_ratio: int = 2,
            qkv_bias: bool = True,
            layer_scale_init_value: Optional[float] = None,
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
        self.norm1 = norm_layer(dim, **dd)
        # NOTE: both mixers are called `attn`, as in the official code, to keep state dict keys aligned
        if use_attn:
            self.attn = Attention(
                dim, num_heads=sa_num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            self.attn = ScaleAwareModulation(
                dim, num_heads=ca_num_heads, expand_ratio=expand_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                act_layer=act_layer, **dd,
            )
        self.ls1 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = DetailMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class Stem(nn.Module):
    """Conv k/2 -> BN -> ReLU -> conv 2x2/2 -> LayerNorm; NCHW image in, NHWC stride-4 tokens out."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int = 3, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim, kernel_size, stride=2, padding=kernel_size // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(dim, **dd)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(dim, dim, 2, stride=2, **dd)
        self.norm = nn.LayerNorm(dim, **dd)  # eps 1e-5, unlike the block norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.act(self.bn(self.conv1(x))))
        return self.norm(x.permute(0, 2, 3, 1))


class PatchEmbed(nn.Module):
    """Overlapping 3x3/2 conv -> LayerNorm; NCHW in, NHWC out."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, **dd)
        self.norm = nn.LayerNorm(out_chs, **dd)  # eps 1e-5, unlike the block norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SMTStage(nn.Module):
    """Downsample + blocks + the stage's own LayerNorm. Returns NCHW."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            mixer: str = 'sam',
            downsample: bool = True,
            ca_num_heads: int = 4,
            sa_num_heads: int = 8,
            mlp_ratio: float = 4.,
            expand_ratio: int = 2,
            qkv_bias: bool = True,
            layer_scale_init_value: Optional[float] = None,
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
        assert mixer in ('sam', 'msa', 'hybrid'), f'unknown mixer {mixer}'
        self.grad_checkpointing = False
        # stage 0 gets NHWC tokens from the stem, later stages NCHW maps from the previous stage
        self.downsample = PatchEmbed(in_chs, out_chs, **dd) if downsample else nn.Identity()
        # evolutionary hybrid stage: SAM at even block index, MSA at odd (the code's layout, starting with SAM)
        use_attn = [mixer == 'msa' or (mixer == 'hybrid' and j % 2 == 1) for j in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(
                out_chs,
                use_attn=use_attn[j],
                ca_num_heads=ca_num_heads,
                sa_num_heads=sa_num_heads,
                mlp_ratio=mlp_ratio,
                expand_ratio=expand_ratio,
                qkv_bias=qkv_bias,
                layer_scale_init_value=layer_scale_init_value,
                proj_drop=proj_drop,
                attn_drop=attn_drop,
                drop_path=drop_path[j] if isinstance(drop_path, (list, tuple)) else drop_path,
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            )
            for j in range(depth)
        ])
        self.norm = norm_layer(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return x.permute(0, 3, 1, 2)


class SMT(nn.Module):
    """Scale-Aware Modulation Transformer."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Tuple[int, ...] = (64, 128, 256, 512),
            depths: Tuple[int, ...] = (2, 2, 8, 1),
            mlp_ratios: Tuple[float, ...] = (4., 4., 4., 2.),
            stage_mixers: Tuple[str, ...] = ('sam', 'sam', 'hybrid', 'msa'),
            ca_num_heads: Tuple[int, ...] = (4, 4, 4, 4),
            sa_num_heads: Tuple[int, ...] = (2, 4, 8, 16),
            expand_ratio: int = 2,
            qkv_bias: bool = True,
            stem_kernel_size: int = 3,
            layer_scale_init_value: Optional[float] = None,
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
            embed_dims: Channels per stage.
            depths: Blocks per stage.
            mlp_ratios: FFN expansion per stage.
            stage_mixers: 'sam', 'msa' or 'hybrid' (SAM/MSA alternating, SAM first) per stage.
            ca_num_heads: MHMC heads per stage (only used by SAM blocks).
            sa_num_heads: Attention heads per stage (only used by MSA blocks).
            expand_ratio: Channel expansion of the scale-aware aggregation.
            qkv_bias: Bias on v/s and q/kv projections.
            stem_kernel_size: Kernel of the first stem conv (3 for T/S, 7 for B/L).
            layer_scale_init_value: Layer scale init, None disables layer scale (only SMT-L uses it).
            act_layer: Activation of FFN and aggregation.
            norm_layer: Norm of blocks and stage ends (LayerNorm, eps 1e-6).
            drop_rate: Head dropout rate.
            proj_drop_rate: Dropout after mixer and FFN projections (the official `drop_rate`).
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

        self.stem = Stem(in_chans, embed_dims[0], stem_kernel_size, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=False)
        dpr = [dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(num_stages)]
        stages = []
        for i in range(num_stages):
            stages.append(SMTStage(
                embed_dims[i - 1] if i > 0 else embed_dims[0],
                embed_dims[i],
                depth=depths[i],
                mixer=stage_mixers[i],
                downsample=i > 0,
                ca_num_heads=ca_num_heads[i],
                sa_num_heads=sa_num_heads[i],
                mlp_ratio=mlp_ratios[i],
                expand_ratio=expand_ratio,
                qkv_bias=qkv_bias,
                layer_scale_init_value=layer_scale_init_value,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
                **dd,
            ))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        # every stage ends in its own norm (as the official norm1..norm4), so there is no separate final norm
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool)
        self.flatten = nn.Flatten(1) if global_pool else nn.Identity()  # don't flatten if pooling disabled
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # MHMC per-head kernels take the Conv2d branch: fan_out = k * k, the official per-head init
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
        # no position embeddings; 1-D params (norms, biases, layer scale) are excluded by timm's optimizer factory
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.norm', (99999,)),
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
            norm: Unused, every stage output is already normalized by the stage's own norm.
            stop_early: Stop iterating over stages when last desired intermediate hit.
            output_fmt: Shape of intermediate feature outputs, only 'NCHW'.
            intermediates_only: Only return intermediate features.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)

        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
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
        if prune_end:
            # features now end at the last kept stage, the head is sized for the final stage so it goes too
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)  # grad checkpointing is applied inside each stage
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


def _interleave_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder dim 0 from head-major (i * C/h + c) to head-interleaved (c * h + i): the official head shuffle."""
    return t.reshape(num_heads, t.shape[0] // num_heads, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Remap an official AFeng-x/SMT checkpoint to this model."""
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    state_dict = {k[7:] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    if 'stem.conv1.weight' in state_dict:
        return state_dict

    out_dict = {}
    mhmc_heads = {}  # SAM mixer prefix -> number of per-head convs (= MHMC heads)
    for k, v in state_dict.items():
        k = re.sub(r'^patch_embed1\.conv\.0\.', 'stem.conv1.', k)
        k = re.sub(r'^patch_embed1\.conv\.1\.', 'stem.bn.', k)
        k = re.sub(r'^patch_embed1\.conv\.3\.', 'stem.conv2.', k)
        k = re.sub(r'^patch_embed1\.norm\.', 'stem.norm.', k)
        k = re.sub(r'^patch_embed(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.', k)
        k = re.sub(r'^block(\d+)\.(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.', k)
        k = re.sub(r'^norm(\d+)\.', lambda m: f'stages.{int(m.group(1)) - 1}.norm.', k)
        k = re.sub(r'\.gamma_(\d)$', r'.ls\1.gamma', k)
        k = k.replace('mlp.dwconv.dwconv.', 'mlp.dwconv.')
        k = k.replace('attn.dw_conv.', 'attn.local_conv.')  # name used by some official revisions
        # per-head MHMC kernels keep their official names and values, one level down in `mhmc`
        m = re.match(r'^(.*\.attn)\.(local_conv_(\d+)\.(?:weight|bias))$', k)
        if m is not None:
            mhmc_heads[m.group(1)] = max(mhmc_heads.get(m.group(1), 0), int(m.group(3)))
            k = f'{m.group(1)}.mhmc.{m.group(2)}'
        out_dict[k] = v

    # the head shuffle is folded into `s`: reorder its output channels from head-major to head-interleaved
    for prefix, num_heads in mhmc_heads.items():
        for name in ('weight', 'bias'):
            key = f'{prefix}.s.{name}'
            if key in out_dict:
                out_dict[key] = _interleave_heads(out_dict[key], num_heads)
    return out_dict


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'head',
        'paper_ids': 'arXiv:2307.08579',
        'paper_name': 'Scale-Aware Modulation Meet Transformer',
        'origin_url': 'https://github.com/AFeng-x/SMT', 'license': 'mit',
        **kwargs,
    }


# The authors' GitHub release v1.0.0 (official state-dict layout, mapped by checkpoint_filter_fn). Offline, download
# the file elsewhere and pass it as a local checkpoint.
_RELEASE = 'https://github.com/AFeng-x/SMT/releases/download/v1.0.0/'
default_cfgs = generate_default_cfgs({
    'smt_t.in1k': _cfg(url=_RELEASE + 'smt_tiny.pth'),
    'smt_s.in1k': _cfg(url=_RELEASE + 'smt_small.pth'),
    'smt_b.in1k': _cfg(url=_RELEASE + 'smt_base.pth'),
    # the official 384 fine-tune evaluates a straight 384x384 resize (Swin TEST.CROP False)
    'smt_l.in22k_ft_in1k_384': _cfg(
        url=_RELEASE + 'smt_large_22k_384_ft.pth', input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0,
        crop_mode='squash'),
    'smt_l.in22k_ft_in1k': _cfg(url=_RELEASE + 'smt_large_22k_224_ft.pth'),
    'smt_l.in22k': _cfg(url=_RELEASE + 'smt_large_22k.pth', num_classes=21841),
    'test_smt.untrained': _cfg(input_size=(3, 160, 160), pool_size=(5, 5)),
})


def _create_smt(variant: str, pretrained: bool = False, **kwargs: Any) -> SMT:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    model = build_model_with_cfg(
        SMT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, flatten_sequential=True),
        **kwargs,
    )
    return model


@register_model
def smt_t(pretrained: bool = False, **kwargs: Any) -> SMT:
    model_args = dict(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 1), mlp_ratios=(4, 4, 4, 2), stem_kernel_size=3)
    return _create_smt('smt_t', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smt_s(pretrained: bool = False, **kwargs: Any) -> SMT:
    model_args = dict(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 2), mlp_ratios=(4, 4, 4, 2), stem_kernel_size=3)
    return _create_smt('smt_s', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smt_b(pretrained: bool = False, **kwargs: Any) -> SMT:
    model_args = dict(
        embed_dims=(64, 128, 256, 512), depths=(4, 6, 28, 2), mlp_ratios=(8, 6, 4, 2), stem_kernel_size=7)
    return _create_smt('smt_b', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def smt_l(pretrained: bool = False, **kwargs: Any) -> SMT:
    # layer scale is on in every official L config (the official registry fn omits it, its checkpoints need it)
    model_args = dict(
        embed_dims=(96, 192, 384, 768), depths=(4, 6, 28, 4), mlp_ratios=(8, 6, 4, 2), stem_kernel_size=7,
        layer_scale_init_value=1e-4,
    )
    return _create_smt('smt_l', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_smt(pretrained: bool = False, **kwargs: Any) -> SMT:
    model_args = dict(
        embed_dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), mlp_ratios=(2, 2, 2, 2), sa_num_heads=(1, 2, 2, 4))
    return _create_smt('test_smt', pretrained=pretrained, **dict(model_args, **kwargs))
