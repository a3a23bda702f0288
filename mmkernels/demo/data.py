"""The demo's data: a container for M views (`Views`, `Splits`) and a synthetic audio-visual set that shows modality
imbalance (the real-data set, UCI Multiple Features, is in mfeat.py).

Design of the synthetic set (what makes one modality dominate, the phenomenon OGM-GE/OPM/AGM/MLB/OLM study):
- "audio" is the fast modality: class prototypes in a low-dimensional space, far apart and nearly linearly separable,
  except that classes come in confusable pairs (2c, 2c+1) whose audio prototypes are close. A linear read-out learns
  it in a few hundred steps; alone it tops out below the fused accuracy because pairs stay ambiguous.
- "visual" is informative for every class (alone it separates all pairs) but slow: its class signal lives in the
  *magnitude* along a class direction with a random per-sample sign (so no linear read-out of the raw input works;
  the encoder must learn a nonlinearity), spread over many noisy dimensions.
In joint training the audio branch lowers the loss first, the gradient reaching the visual encoder shrinks with the
fused softmax error, and the visual encoder ends well below what it reaches when trained alone for the same steps.
Nothing is downloaded; `make_dataset(seed)` is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Views:
    """M views of the same N samples: views[m] is [N, D_m] fp32, labels [N] int64."""

    views: list
    labels: torch.Tensor

    def __len__(self):
        return self.labels.shape[0]

    def to(self, device):
        return Views([x.to(device) for x in self.views], self.labels.to(device))

    def subset(self, idx):
        return Views([x[idx] for x in self.views], self.labels[idx])


@dataclass
class Splits:
    train: Views
    dev: Views  # held out from training: OLM's generalisation rate reads its losses; AGM's d^m fits its probe
    test: Views
    num_classes: int
    names: tuple  # one name per view, e.g. ("audio", "visual")

    @property
    def dims(self):
        return [x.shape[1] for x in self.train.views]


def make_dataset(
    seed: int = 0,
    *,
    n_train: int = 3000,
    n_dev: int = 500,
    n_test: int = 1500,
    num_classes: int = 6,
    audio_dim: int = 16,
    visual_dim: int = 64,
    audio_sep: float = 5.0,
    audio_pair_gap: float = 2.0,
    audio_noise: float = 1.0,
    visual_signal: float = 3.5,
    visual_noise: float = 1.0,
    visual_rank: int = 4,
) -> Splits:
    """Deterministic synthetic split with views ("audio", "visual") (see module docstring). Class-balanced labels."""
    if num_classes % 2:
        raise ValueError(f"num_classes must be even (classes come in audio-confusable pairs), got {num_classes}")
    g = torch.Generator().manual_seed(int(seed))
    # Audio prototypes: one well-separated centre per pair, the two classes of a pair offset by a small gap.
    pair_centres = torch.randn(num_classes // 2, audio_dim, generator=g)
    pair_centres = audio_sep * pair_centres / pair_centres.norm(dim=1, keepdim=True)
    offsets = torch.randn(num_classes // 2, audio_dim, generator=g)
    offsets = 0.5 * audio_pair_gap * offsets / offsets.norm(dim=1, keepdim=True)
    audio_proto = torch.stack([pair_centres - offsets, pair_centres + offsets], 1).reshape(num_classes, audio_dim)
    # Visual: each class owns `visual_rank` orthonormal directions; a sample carries signal along one of them with a
    # random sign (class is in |projection|, invisible to a linear read-out of the raw input).
    basis = torch.linalg.qr(torch.randn(visual_dim, visual_dim, generator=g))[0]
    if num_classes * visual_rank > visual_dim:
        raise ValueError(
            f"visual_dim must be >= num_classes * visual_rank = {num_classes * visual_rank}, got {visual_dim}"
        )
    dirs = basis[:, : num_classes * visual_rank].T.reshape(num_classes, visual_rank, visual_dim)

    def draw(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        a = audio_proto[y] + audio_noise * torch.randn(n, audio_dim, generator=g)
        which = torch.randint(0, visual_rank, (n,), generator=g)
        sign = torch.randint(0, 2, (n, 1), generator=g).float() * 2 - 1
        v = visual_signal * sign * dirs[y, which] + visual_noise * torch.randn(n, visual_dim, generator=g)
        return Views([a.float(), v.float()], y.long())

    train = draw(n_train)
    dev = draw(n_dev)
    return Splits(train=train, dev=dev, test=draw(n_test), num_classes=num_classes, names=("audio", "visual"))
