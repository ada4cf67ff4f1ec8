""" SpaRTAN

Paper: `SpaRTAN: Spatial Reinforcement Token-based Aggregation Network for Visual Recognition` (IJCNN 2025)
    - https://arxiv.org/abs/2507.10999

Original code: https://github.com/henry-pay/SpaRTAN (Apache-2.0), `src/model/spartan.py` at 60d8b1e.

@inproceedings{pay2025spartan,
  title={SpaRTAN: Spatial Reinforcement Token-based Aggregation Network for Visual Recognition},
  author={Pay, Quan Bi and Baskaran, Vishnu Monn and Loo, Junn Yong and Wong, KokSheik and See, Simon},
  booktitle={International Joint Conference on Neural Networks (IJCNN)},
  year={2025}
}

Where the paper and the official code disagree, this file follows the code, which is the network the paper measured:
GroupNorm(1) (not a per-pixel LayerNorm) before each mixer, GELU in the stem and SiLU only in the 2x2 downsamples,
a half-width SMixer, layer scale 1e-5, the drop-path schedule p * k / N, and a CMixer 3x3 conv that is depthwise in
stages 1-2 and has group width 2 in stages 3-4 (the inverse of the SMixer's full / depthwise split).

The CMixer's complex modulation (interleaved channel pairs times a learnable complex weight) is written as the
equivalent real 2x2 mix per pair, so torch.export, pruning and quantization only meet ordinary real ops. The weight
keeps the official `(1, 1, 1, n / 2, 2)` (real, imag) layout, so official checkpoints load unchanged.

Complexity (`eval.complexity.count_macs`): by default conv + linear MACs only (SpaRTAN has no attention matmuls; the
element-wise products, GELU / SiLU / sigmoid and argmax / gather are not counted, as in fvcore), which is the
notes' conv + linear convention and the paper's Table VIII. With `include_norms=True, train_mode=True` fvcore's
norm and pooling rules are added, which is the paper's Table II. tests/test_spartan.py pins both, per variant.

Deploy form (`CMixer.fuse()`, reached through timm's `reparameterize_model`; same function, same parameters and
official keys, tested equal): the official CMixer interleaves complex channel pairs, and under torch.compile and
OpenVINO that interleave, the argmax gather and the stacked pair mix became strided copies and reorders around
every mixer, while oneDNN's int8 convs have no GELU post-op. The deploy form keeps the pairs as re / im halves from
their own 1x1 convs, does the complex mix element-wise (depthwise stages) or folds it into the group-width-2 conv
(which becomes 4 depthwise convs), folds BN, splits the SE squeeze and proj_out per half, computes the argmax as
amax + first-index amin (torch's tie rule) and writes the products as `addcmul` (the X86 quantizer's same-shape
`mul` rule would otherwise fake-quantize amplitude and phase apart). `GroupNorm1` takes its statistics with
`var_mean` over (C, H, W) under compile / export, a reshape-free form valid in any memory layout. What NNCF must
leave in float for this form is declared in `compress.stages.families.spartan`. Measured speed of both forms:
`python -m compress.benchmark spartan_xt spartan_t` (results/benchmarks/seed_backbones.json) and, per layer,
`python -m compress.layer_profile spartan_t --reparameterize`.

Modifications and timm integration for the compress project.
"""
import math
import re
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, SelectAdaptivePool2d, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

__all__ = ['SpaRTAN']

_BatchNorm = partial(nn.BatchNorm2d, eps=1e-6)


def complex_pair_mix(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Multiply interleaved channel pairs (2k, 2k + 1) = re + i * im by complex weights, with real ops only.

    Args:
        x: NCHW tensor with an even number of channels.
        weight: (..., C / 2, 2) tensor of (real, imag) parts, the official parameter layout.
    """
    dtype = x.dtype
    # NOTE: the official code runs this step in fp32 with autocast off; element-wise ops are not autocast, so
    # upcasting is enough. Cast back so a half / bf16 model stays in its dtype.
    compute_dtype = torch.promote_types(dtype, torch.float32)
    a, b = weight.to(compute_dtype).flatten(0, -2).unbind(-1)
    a, b = a[:, None, None], b[:, None, None]
    re, im = x.to(compute_dtype).unflatten(1, (-1, 2)).unbind(2)
    x = torch.stack((a * re - b * im, b * re + a * im), dim=2).flatten(1, 2)
    return x.to(dtype)


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group (the official block norm), with a layout-agnostic form for compiled graphs.

    `F.group_norm` reshapes the map to (B, 1, C * H * W), which only is a view of an NCHW-contiguous tensor. Inside a
    compiled PT2E int8 graph (no inductor layout optimisation there) that pinned the whole residual stream to NCHW
    while every oneDNN conv reads and writes channels-last: each norm became a scalar (non-vectorised) Welford pass
    plus 16x16 transposes. Under `torch.compile` / `torch.export` the same statistics are taken with `var_mean` over
    (C, H, W), which is a plain reduction in any memory layout. Eager mode and TorchScript tracing (OpenVINO's
    converter, which maps `group_norm` to its fused MVN) keep `F.group_norm`. Same parameters, same keys.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6, **kwargs):
        super().__init__(1, num_channels, eps=eps, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return group_norm1(x, self.weight, self.bias, self.eps)
        return F.group_norm(x, 1, self.weight, self.bias, self.eps)


def group_norm1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """`F.group_norm(x, 1, weight, bias, eps)` for NCHW input, written without reshapes."""
    var, mean = torch.var_mean(x, dim=(1, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def _folded_conv(
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        groups: int = 1,
        padding: int = 0,
) -> nn.Conv2d:
    """A Conv2d holding the given (already folded) weight and bias."""
    out_chs, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(
        in_per_group * groups, out_chs, (kh, kw), padding=padding, groups=groups, bias=bias is not None,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _bn_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


class ConvNormAct(nn.Module):
    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int = 1,
            padding: int = 0,
            dilation: int = 1,
            groups: int = 1,
            norm_layer: Optional[Callable[..., nn.Module]] = _BatchNorm,
            act_layer: Optional[Type[nn.Module]] = nn.GELU,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=False, **dd,
        )
        self.norm = norm_layer(out_chs, **dd) if norm_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, dim: int, rd_dim: int, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.squeeze = nn.Conv2d(dim, rd_dim, 1, **dd)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(rd_dim, dim, 1, **dd)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # adaptive pool (not mean) keeps the op fvcore counts, as the official code uses it
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.gate(self.expand(self.act(self.squeeze(s))))
        return x * s


class SMixer(nn.Module):
    """Spatial mixer: feature decomposition, then a 3x3 and a stacked dilated 3x3 branch, each with SE, at C / 2."""

    def __init__(self, dim: int, depthwise: bool = False, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert dim % 8 == 0, 'SMixer needs dim divisible by 8 (half width, SE squeezes a further 4x)'
        mid = dim // 2
        groups = mid if depthwise else 1
        self.gamma = nn.Parameter(1e-5 * torch.ones(1, mid, 1, 1, **dd))
        self.proj_in = nn.Conv2d(dim, mid, 1, **dd)
        self.h_conv = ConvNormAct(mid, mid, 3, padding=1, groups=groups, **dd)
        # two stacked dilation-2 3x3s cover a 5x5 dilation-2 field; the first one is bare in the official code
        self.l_conv = nn.Sequential(
            ConvNormAct(mid, mid, 3, padding=2, dilation=2, groups=groups, norm_layer=None, act_layer=None, **dd),
            ConvNormAct(mid, mid, 3, padding=2, dilation=2, groups=groups, **dd),
        )
        self.h_attn = SqueezeExcite(mid, mid // 4, **dd)
        self.l_attn = SqueezeExcite(mid, mid // 4, **dd)
        self.proj_out = nn.Conv2d(dim, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)
        # no activation after FD, unlike MogaNet
        x = x + self.gamma * (x - F.adaptive_avg_pool2d(x, 1))
        x = torch.cat([self.h_attn(self.h_conv(x)), self.l_attn(self.l_conv(x))], dim=1)
        return self.proj_out(x)


class CMixer(nn.Module):
    """Wave-based channel mixer: amplitude * phase plus the argmax-channel term, complex pair modulation, refine."""

    def __init__(self, dim: int, expand_ratio: int = 4, depthwise: bool = False, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert expand_ratio > 1
        hidden = dim * expand_ratio
        self.theta = nn.Conv2d(dim, hidden, 1, **dd)
        self.theta_act = nn.GELU()
        self.proj = nn.Conv2d(dim, hidden, 1, **dd)
        # (real, imag) per interleaved channel pair, official layout and randn init (the model init skips it)
        self.complex = nn.Parameter(torch.randn(1, 1, 1, hidden // 2, 2, **dd))
        # NOTE: official grouping is inverted w.r.t. the stage label: depthwise in "full" stages, group width
        # `expand_ratio` (one complex pair at r = 2) in depthwise stages. It reproduces the paper's params / FLOPs.
        self.conv = ConvNormAct(hidden, hidden, 3, padding=1, groups=dim if depthwise else hidden, **dd)
        self.attn = SqueezeExcite(hidden, dim // 4, **dd)
        self.proj_out = nn.Conv2d(hidden, dim, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # argmax over the C input channels indexes the first C expanded channels (ties -> first index)
        idx = x.argmax(dim=1, keepdim=True)
        theta = self.theta_act(self.theta(x))
        amp = self.proj(x)
        x = amp * theta + amp.gather(1, idx) * theta.gather(1, idx)
        x = complex_pair_mix(x, self.complex)
        x = self.conv(x)
        x = self.attn(x)
        return self.proj_out(x)

    @torch.no_grad()
    def fuse(self) -> 'CMixerDeploy':
        """Inference form with the same function (BN statistics frozen); `timm.models.reparameterize_model` calls it."""
        return CMixerDeploy(self)


class CMixerDeploy(nn.Module):
    """Inference form of :class:`CMixer` (built by `CMixer.fuse()`): the same function, laid out for CPU / int8.

    The r*C hidden channels are kept as two tensors, `re` (official channels 0, 2, 4, ...) and `im` (1, 3, 5, ...),
    the real and imaginary parts of the complex pairs, each produced by its own 1x1 convs (the rows of `theta` /
    `proj`) and consumed by its own slice of everything after them (an exact relabelling of hidden channels):

    * the complex pair mix needs no channel interleave: `a * re - b * im`, `b * re + a * im` on whole tensors.
      The interleaved form (stack + flatten) compiled to a scalar strided-store loop plus a transposing copy,
      ~35-40 % of the network's time in fp32 and int8 alike;
    * stages with group width 2 (one complex pair per group of the 3x3 conv): the mix is folded into that conv, and
      the grouped conv (which oneDNN runs at ~4 GMAC/s) becomes four depthwise convs re->re, im->re, re->im, im->im;
      depthwise stages: one depthwise conv per half, after the element-wise mix;
    * BN folded into those convs; the SE squeeze and `proj_out` take the halves (`proj_out(cat(u, v))` is
      `proj_out_re(u) + proj_out_im(v)`), so no r*C-wide concat or split is ever materialised (a PT2E graph writes a
      concat of float tensors in fp32 and quantizes it in a second pass; OpenVINO runs split / gather in planar
      layout and reorders the r*C-wide maps around them);
    * the argmax channel is found as the smallest index attaining the channel max (`amax`, then `amin` over the
      matches: torch's first-index tie rule; OpenVINO's TopK for `argmax` cost more than all int8 convs together),
      and the "F_max" term is a one-hot masked sum over the C channels it can come from, instead of a gather;
    * `addcmul` for the products keeps the X86 quantizer from fake-quantizing `amp` and `theta` separately (its
      same-shape `mul` rule). What NNCF must leave in float: `compress.stages.families.spartan`.
    """

    def __init__(self, cmixer: CMixer):
        super().__init__()
        n = cmixer.theta.out_channels
        h = n // 2
        c = cmixer.theta.in_channels
        assert c % 2 == 0 and c <= n
        dtype = cmixer.theta.weight.dtype
        compute_dtype = torch.promote_types(dtype, torch.float32)  # the official complex step runs in fp32
        a, b = cmixer.complex.detach().to(compute_dtype).reshape(h, 2).unbind(-1)
        theta, proj = cmixer.theta, cmixer.proj
        self.theta_re = _folded_conv(theta.weight[0::2], theta.bias[0::2])
        self.theta_im = _folded_conv(theta.weight[1::2], theta.bias[1::2])
        self.theta_act = nn.GELU()
        self.proj_re = _folded_conv(proj.weight[0::2], proj.bias[0::2])
        self.proj_im = _folded_conv(proj.weight[1::2], proj.bias[1::2])
        # official channel index of the first C / 2 channels of each half (the ones the argmax can select)
        self.register_buffer('chan_re', torch.arange(0, c, 2).reshape(-1, 1, 1), persistent=False)
        self.register_buffer('chan_im', torch.arange(1, c, 2).reshape(-1, 1, 1), persistent=False)
        self.register_buffer('chan', torch.arange(c).reshape(-1, 1, 1), persistent=False)

        scale, shift = _bn_scale_shift(cmixer.conv.norm)
        weight = cmixer.conv.conv.weight
        self.mix_in_conv = cmixer.conv.conv.groups != n
        if self.mix_in_conv:
            # group k holds complex pair k: W'[k] = diag(bn scale) W[k] M_k, M_k = [[a, -b], [b, a]]
            assert cmixer.conv.conv.groups == h, 'CMixer 3x3 conv must be depthwise or one complex pair per group'
            mix = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], -2)  # (h, out, in)
            w = torch.einsum('kojxy,kji->koixy', weight.to(compute_dtype).reshape(h, 2, 2, *weight.shape[2:]), mix)
            w = (w * scale.reshape(h, 2)[:, :, None, None, None]).to(dtype)
            shift = shift.reshape(h, 2)
            self.conv_rr = _folded_conv(w[:, 0, 0, None], shift[:, 0], groups=h, padding=1)
            self.conv_ri = _folded_conv(w[:, 0, 1, None], None, groups=h, padding=1)
            self.conv_ir = _folded_conv(w[:, 1, 0, None], shift[:, 1], groups=h, padding=1)
            self.conv_ii = _folded_conv(w[:, 1, 1, None], None, groups=h, padding=1)
        else:
            w = weight * scale[:, None, None, None]
            self.conv_re = _folded_conv(w[0::2], shift[0::2], groups=h, padding=1)
            self.conv_im = _folded_conv(w[1::2], shift[1::2], groups=h, padding=1)
            self.register_buffer('mix_a', a[:, None, None].to(dtype).contiguous(), persistent=False)
            self.register_buffer('mix_b', b[:, None, None].to(dtype).contiguous(), persistent=False)
        self.act = nn.GELU()

        attn = cmixer.attn
        re_im = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])
        self.squeeze = _folded_conv(attn.squeeze.weight[:, re_im], attn.squeeze.bias)
        self.squeeze_act = nn.ReLU()
        self.expand_re = _folded_conv(attn.expand.weight[0::2], attn.expand.bias[0::2])
        self.expand_im = _folded_conv(attn.expand.weight[1::2], attn.expand.bias[1::2])
        self.proj_out_re = _folded_conv(cmixer.proj_out.weight[:, 0::2], cmixer.proj_out.bias)
        self.proj_out_im = _folded_conv(cmixer.proj_out.weight[:, 1::2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # first index of the channel max (argmax's tie rule); clamped so a NaN map (no match) still indexes safely
        idx = torch.where(x == x.amax(dim=1, keepdim=True), self.chan, x.shape[1]).amin(dim=1, keepdim=True)
        idx = idx.clamp_max(x.shape[1] - 1)
        theta_re, theta_im = self.theta_act(self.theta_re(x)), self.theta_act(self.theta_im(x))
        amp_re, amp_im = self.proj_re(x), self.proj_im(x)
        k = self.chan_re.shape[0]
        # amp * theta at official channel idx: exactly one term of the masked sum is selected
        zero = amp_re.new_zeros(())
        peak = (torch.where(self.chan_re == idx, torch.addcmul(zero, amp_re[:, :k], theta_re[:, :k]), zero)
                + torch.where(self.chan_im == idx, torch.addcmul(zero, amp_im[:, :k], theta_im[:, :k]), zero))
        peak = peak.sum(dim=1, keepdim=True)
        re = torch.addcmul(peak, amp_re, theta_re)
        im = torch.addcmul(peak, amp_im, theta_im)
        if self.mix_in_conv:
            y_re = self.act(self.conv_rr(re) + self.conv_ri(im))
            y_im = self.act(self.conv_ir(re) + self.conv_ii(im))
        else:
            y_re = self.act(self.conv_re(self.mix_a * re - self.mix_b * im))
            y_im = self.act(self.conv_im(self.mix_b * re + self.mix_a * im))
        s = torch.cat([F.adaptive_avg_pool2d(y_re, 1), F.adaptive_avg_pool2d(y_im, 1)], dim=1)
        s = self.squeeze_act(self.squeeze(s))
        y_re = y_re * torch.sigmoid(self.expand_re(s))
        y_im = y_im * torch.sigmoid(self.expand_im(s))
        return self.proj_out_re(y_re) + self.proj_out_im(y_im)


class SpaRTANBlock(nn.Module):
    def __init__(
            self,
            dim: int,
            expand_ratio: int = 4,
            depthwise: bool = False,
            drop_path: float = 0.,
            ls_init_value: float = 1e-5,
            norm_layer: Callable[..., nn.Module] = GroupNorm1,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.norm_1 = norm_layer(dim, **dd)
        self.smixer = SMixer(dim, depthwise=depthwise, **dd)
        self.scale_1 = nn.Parameter(ls_init_value * torch.ones(1, dim, 1, 1, **dd))
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm_2 = norm_layer(dim, **dd)
        self.cmixer = CMixer(dim, expand_ratio=expand_ratio, depthwise=depthwise, **dd)
        self.scale_2 = nn.Parameter(ls_init_value * torch.ones(1, dim, 1, 1, **dd))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.scale_1 * self.smixer(self.norm_1(x)))
        x = x + self.drop_path2(self.scale_2 * self.cmixer(self.norm_2(x)))
        return x


class SpaRTANStage(nn.Module):
    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            depth: int,
            expand_ratio: int = 4,
            depthwise: bool = False,
            downsample: bool = True,
            drop_path_rates: Optional[List[float]] = None,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = ConvNormAct(in_chs, out_chs, 2, stride=2, act_layer=nn.SiLU, **dd)
        else:
            assert in_chs == out_chs
            self.downsample = nn.Identity()
        drop_path_rates = drop_path_rates or [0.] * depth
        self.blocks = nn.Sequential(*[
            SpaRTANBlock(out_chs, expand_ratio, depthwise=depthwise, drop_path=drop_path_rates[i], **dd)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class SpaRTAN(nn.Module):
    """SpaRTAN: 4-stage conv pyramid of SMixer + wave CMixer blocks.

    `full_stages` sets the hybrid split (official: the first `len(depths) // 2` stages use full SMixer convs);
    `full_stages=len(depths)` / `0` give the paper's Table VIII "F" / "D" variants.

    Deployment: `timm.models.reparameterize_model(model)` returns the inference form (every CMixer replaced by
    :class:`CMixerDeploy`, same outputs); see the module docstring's deploy form.
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            dims: Tuple[int, ...] = (32, 64, 128, 256),
            depths: Tuple[int, ...] = (3, 3, 12, 2),
            expand_ratios: Tuple[int, ...] = (4, 4, 2, 2),
            full_stages: Optional[int] = None,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        assert len(dims) == len(depths) == len(expand_ratios)
        num_stages = len(depths)
        full_stages = num_stages // 2 if full_stages is None else full_stages
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.feature_info = []

        self.stem = nn.Sequential(
            ConvNormAct(in_chans, dims[0] // 2, 3, stride=2, padding=1, **dd),
            ConvNormAct(dims[0] // 2, dims[0], 3, stride=2, padding=1, **dd),
        )

        # official schedule p * k / N stops short of p (timm's linspace would reach it)
        total = sum(depths)
        dpr = [drop_path_rate * k / total for k in range(total)]
        stages = []
        prev_chs = dims[0]
        cur = 0
        for i in range(num_stages):
            stages.append(SpaRTANStage(
                prev_chs,
                dims[i],
                depth=depths[i],
                expand_ratio=expand_ratios[i],
                depthwise=i >= full_stages,
                downsample=i > 0,
                drop_path_rates=dpr[cur:cur + depths[i]],
                **dd,
            ))
            cur += depths[i]
            prev_chs = dims[i]
            self.feature_info.append(dict(num_chs=prev_chs, reduction=2 ** (i + 2), module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        # no final norm and no head dropout in the official model (drop_rate defaults to 0)
        self.num_features = self.head_hidden_size = prev_chs
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module):
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0., math.sqrt(2. / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1.)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
        if isinstance(getattr(m, 'bias', None), torch.Tensor):
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set:
        # official optimiser skips names containing 'gamma' (FD scale); layer scales and complex weights are decayed
        return {n for n, _ in self.named_parameters() if n.endswith('.gamma')}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
            ],
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
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=True)
            self.global_pool.train(self.training)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
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
        """ Forward features that returns intermediates.

        Args:
            x: Input image tensor
            indices: Take last n stages if int, all if None, select matching indices if sequence
            norm: Unused, the model has no final norm
            stop_early: Stop iterating over stages when last desired intermediate hit
            output_fmt: Shape of intermediate feature outputs
            intermediates_only: Only return intermediate features
        Returns:
            List of stage outputs (taken after each stage's blocks, before the next downsample), or the final
            features and that list.
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
        """ Prune layers not required for specified intermediates.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if max_index < len(self.feature_info) - 1:
            # the head is sized for the final stage, so it goes with it
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
            prune_head = True
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate > 0.:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SpaRTAN) -> Dict[str, torch.Tensor]:
    """Map an official SpaRTAN state dict (stem `conv`, one flat `layers` Sequential, `linear`) to this layout."""
    # official training checkpoints are dicts with the weights under 'model'
    for wrapper in ('model', 'state_dict'):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    state_dict = {re.sub(r'^(module\.|_orig_mod\.)+', '', k): v for k, v in state_dict.items()}
    if 'stem.0.conv.weight' in state_dict:
        return state_dict

    # official `layers` holds each stage's blocks followed by its downsample; here the downsample opens the next stage
    flat_to_ours = {}
    idx = 0
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            flat_to_ours[idx] = f'stages.{s}.downsample'
            idx += 1
        for b in range(len(stage.blocks)):
            flat_to_ours[idx] = f'stages.{s}.blocks.{b}'
            idx += 1

    out_dict = {}
    for k, v in state_dict.items():
        k = re.sub(r'^conv\.', 'stem.', k)
        k = re.sub(r'^linear\.', 'head.', k)
        m = re.match(r'^layers\.(\d+)\.(.+)$', k)
        if m is not None:
            k = f'{flat_to_ours[int(m.group(1))]}.{m.group(2)}'
        out_dict[k] = v
    return out_dict


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 256, 256), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0.conv', 'classifier': 'head',
        'paper_ids': 'arXiv:2507.10999',
        'paper_name': 'SpaRTAN: Spatial Reinforcement Token-based Aggregation Network for Visual Recognition',
        'origin_url': 'https://github.com/henry-pay/SpaRTAN', 'license': 'apache-2.0',
        **kwargs,
    }


# NOTE: no T / XT weights are published; load a local checkpoint with pretrained_cfg_overlay=dict(file=...)
default_cfgs = generate_default_cfgs({
    'spartan_xt.in1k': _cfg(),
    'spartan_t.in1k': _cfg(),
    'test_spartan.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_spartan(variant: str, pretrained: bool = False, **kwargs: Any) -> SpaRTAN:
    model = build_model_with_cfg(
        SpaRTAN, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )
    return model


@register_model
def spartan_xt(pretrained: bool = False, **kwargs: Any) -> SpaRTAN:
    model_args = dict(dims=(32, 64, 96, 192), depths=(3, 3, 10, 2), expand_ratios=(4, 4, 2, 2))
    return _create_spartan('spartan_xt', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def spartan_t(pretrained: bool = False, **kwargs: Any) -> SpaRTAN:
    # the official T recipe trains with drop_path_rate=0.1
    model_args = dict(dims=(32, 64, 128, 256), depths=(3, 3, 12, 2), expand_ratios=(4, 4, 2, 2))
    return _create_spartan('spartan_t', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_spartan(pretrained: bool = False, **kwargs: Any) -> SpaRTAN:
    model_args = dict(dims=(16, 24, 32, 48), depths=(1, 1, 2, 1), expand_ratios=(4, 4, 2, 2))
    return _create_spartan('test_spartan', pretrained=pretrained, **dict(model_args, **kwargs))
