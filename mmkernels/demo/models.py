"""Encoders and the concat-fusion classifier of the demo (MLP by default, torchvision ResNet-18 for the papers'
setup)."""

from __future__ import annotations

import torch
from torch import nn


class MLPEncoder(nn.Module):
    def __init__(self, in_dim: int, width: int = 128, out_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, out_dim), nn.ReLU())
        self.out_dim = out_dim

    def forward(self, x):
        return self.net(x)


class VectorToImage(nn.Module):
    """Fixed (non-trained) random projection of a feature vector to a [C, H, W] image, so the synthetic vectors can
    feed an image backbone. Deterministic from `seed`."""

    def __init__(self, in_dim: int, channels: int, size: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("proj", torch.randn(in_dim, channels * size * size, generator=g) / in_dim**0.5)
        self.shape = (channels, size, size)

    def forward(self, x):
        return (x @ self.proj).view(x.shape[0], *self.shape)


class ResNet18Encoder(nn.Module):
    """torchvision ResNet-18 without pretrained weights, `in_channels` stem (1 for spectrograms), 512-d pooled
    output."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        import torchvision

        net = torchvision.models.resnet18(weights=None)
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = 512

    def forward(self, x):
        return self.net(x)


class SyntheticResNetEncoder(nn.Module):
    """Vector -> fixed image -> ResNet-18 (the `--backbone resnet18` demo path)."""

    def __init__(self, in_dim: int, channels: int, size: int, seed: int):
        super().__init__()
        self.to_image = VectorToImage(in_dim, channels, size, seed)
        self.backbone = ResNet18Encoder(channels)
        self.out_dim = self.backbone.out_dim

    def forward(self, x):
        return self.backbone(self.to_image(x))


class ConcatClassifier(nn.Module):
    """M encoders and a concatenation head (the papers' default fusion): logits = [f_1 ... f_M] W^T + b."""

    def __init__(self, encoders, num_classes: int):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.head = nn.Linear(sum(e.out_dim for e in self.encoders), num_classes)

    @property
    def widths(self):
        return [e.out_dim for e in self.encoders]

    def encode(self, inputs):
        return [enc(x) for enc, x in zip(self.encoders, inputs)]

    def fuse(self, feats):
        return self.head(torch.cat(list(feats), dim=1))

    def unimodal_logits(self, feats):
        """The balancer protocol's unimodal logits: u_m = f_m W_m^T + b/M (TPAMI Eq. 6), differentiable."""
        from mmkernels.api import concat_unimodal_logits

        return concat_unimodal_logits(list(feats), self.head, detach=False)

    def forward(self, inputs):
        return self.fuse(self.encode(inputs))


def make_encoder(backbone: str, in_dim: int, modality: int, *, seed: int = 0) -> nn.Module:
    """Encoder of view `modality` (input [B, in_dim]): a 2-layer MLP (64-d output), or a ResNet-18 on a fixed random
    64 x 64 image of the vector (1 channel for view 0, as a spectrogram; 3 for the others), 512-d output."""
    if backbone == "mlp":
        return MLPEncoder(in_dim)
    if backbone == "resnet18":
        return SyntheticResNetEncoder(in_dim, 1 if modality == 0 else 3, 64, seed + 101 * (modality + 1))
    raise ValueError(f"backbone must be 'mlp' or 'resnet18', got {backbone!r}")


def build_model(backbone: str, in_dims, num_classes: int, *, seed: int = 0) -> ConcatClassifier:
    """M encoders (one per view, in_dims[m] inputs each) and the concat head."""
    return ConcatClassifier([make_encoder(backbone, d, m, seed=seed) for m, d in enumerate(in_dims)], num_classes)
