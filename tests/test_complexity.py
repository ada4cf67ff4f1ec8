"""The MAC counter: hand-computable nets, attention matmuls included, fvcore's norm rules on request."""
import timm
import torch.nn.functional as F
from torch import nn

from eval.complexity import count_macs, count_params, serialized_size_mb


class TinyAttentionNet(nn.Module):
    """conv 3→8 (3x3, 8x8 map) → 64 tokens → qkv linear → SDPA over 2 heads → linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8)
        self.qkv = nn.Linear(8, 24)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.norm(self.conv(x))
        tokens = x.flatten(2).transpose(1, 2)                       # (1, 64, 8)
        q, k, v = self.qkv(tokens).reshape(1, 64, 3, 2, 4).permute(2, 0, 3, 1, 4)
        tokens = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 64, 8)
        return self.head(tokens.mean(1))


def test_hand_counted_macs_include_attention():
    model = TinyAttentionNet().eval()
    conv = 8 * 8 * 8 * 3 * 9            # output elements x (in_chs x k x k)
    qkv = 64 * 8 * 24
    attention = 2 * (64 * 64 * 4) * 2   # heads x (QK^T + AV), each L x S x head_dim
    head = 8 * 5
    assert count_macs(model, (3, 8, 8)) == conv + qkv + attention + head
    norms = 8 * 8 * 8 * 2 + 64 * 8      # eval batch norm 2 per element + the token mean 1 per element
    assert count_macs(model, (3, 8, 8), include_norms=True) == conv + qkv + attention + head + norms
    train_bn = 8 * 8 * 8 * 5
    assert count_macs(model, (3, 8, 8), include_norms=True, train_mode=True) == \
        conv + qkv + attention + head + train_bn + 64 * 8
    assert model.training is False


def test_reference_models():
    resnet = timm.create_model('resnet18')
    assert round(count_macs(resnet) / 1e9, 3) == 1.814  # timm / Torch-Pruning report 1.82 (they add BN, pool)
    deit = timm.create_model('deit_tiny_patch16_224')
    linear_and_conv = count_macs(deit) - 12 * 3 * 2 * 197 * 197 * 64
    assert round(count_macs(deit) / 1e9, 3) == 1.254  # fvcore (no SDPA) says 1.08, Torch-Pruning 1.26
    assert round(linear_and_conv / 1e9, 3) == 1.075  # fvcore's 1.08 = this + layer norms


def test_params_and_size():
    model = nn.Linear(100, 10)
    assert count_params(model) == 1010
    assert 0.004 < serialized_size_mb(model) < 0.006  # 4,040 bytes of float32 + pickle framing
