"""Train an audio-visual emotion classifier on CREMA-D with any mmkernels balancer.

Expects the dataset locally (nothing is downloaded), in the layout the papers' code uses:

    ROOT/AudioWAV/1001_DFA_ANG_XX.wav            the clips' audio (16 kHz mono PCM)
    ROOT/Image-01-FPS/1001_DFA_ANG_XX/*.jpg      frames extracted at 1 fps, one folder per clip
    ROOT/train.csv, ROOT/test.csv                optional: "clip,label" rows; without them the clips are split by
                                                 actor (the first 4 digits), 90% of the actors for training

Preprocessing as in the papers: audio tiled / cut to 3 s at 16 kHz, a 257 x 299 log-magnitude spectrogram
(torch.stft: 512-sample Hann window, 353 samples of overlap (hop 159), no centring); one frame per clip (a random one
while training, the middle one for testing), 224 x 224, ImageNet normalisation. Encoders: torchvision ResNet-18
without pretrained weights (audio stem with 1 input channel), concatenation fusion, SGD (lr 1e-3, momentum 0.9,
weight decay 1e-4), batch 64.

    python examples/cremad_train.py --root /data/CREMA-D --method ogm_ge --epochs 100 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
import wave

import torch
import torch.nn.functional as F

from mmkernels import api
from mmkernels.demo.models import ConcatClassifier, ResNet18Encoder

CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
SAMPLE_RATE = 16000
CLIP_SECONDS = 3
N_FFT, OVERLAP = 512, 353
HOP = N_FFT - OVERLAP  # 159 -> 1 + (48000 - 512) // 159 = 299 frames
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_wav(path: str) -> tuple[torch.Tensor, int]:
    """Mono float waveform in [-1, 1] and its sample rate, read with the standard library's `wave` (8/16/32-bit PCM)."""
    with wave.open(path, "rb") as w:
        n, width, channels, rate = w.getnframes(), w.getsampwidth(), w.getnchannels(), w.getframerate()
        raw = w.readframes(n)
    if width == 1:
        x = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).float() - 128) / 128
    elif width == 2:
        x = torch.frombuffer(bytearray(raw), dtype=torch.int16).float() / 32768
    elif width == 4:
        x = torch.frombuffer(bytearray(raw), dtype=torch.int32).float() / 2147483648
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    return x.view(-1, channels).mean(1), rate


def spectrogram(wav: torch.Tensor, rate: int) -> torch.Tensor:
    """[1, 257, 299] log-magnitude STFT of the clip resampled to 16 kHz and tiled / cut to 3 s."""
    if rate != SAMPLE_RATE:
        n = round(wav.numel() * SAMPLE_RATE / rate)
        wav = F.interpolate(wav.view(1, 1, -1), size=n, mode="linear", align_corners=False).view(-1)
    want = SAMPLE_RATE * CLIP_SECONDS
    if wav.numel() == 0:
        wav = torch.zeros(want)
    wav = wav.repeat((want + wav.numel() - 1) // wav.numel())[:want].clamp(-1, 1)
    spec = torch.stft(
        wav,
        n_fft=N_FFT,
        hop_length=HOP,
        win_length=N_FFT,
        window=torch.hann_window(N_FFT),
        center=False,
        return_complex=True,
    )
    return torch.log(spec.abs() + 1e-7).unsqueeze(0)


def load_frame(path: str, size: int, train: bool) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms import v2

    with Image.open(path) as im:
        img = v2.functional.pil_to_tensor(im.convert("RGB"))
    if train:
        tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])
    else:
        tf = v2.Resize((size, size), antialias=True)
    img = tf(img).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img - mean) / std


def list_clips(root: str, split: str, frames_dir: str):
    """[(clip, label index)] for `split` from ROOT/{split}.csv, else an actor-wise 90/10 split of ROOT/AudioWAV."""
    csv_path = os.path.join(root, f"{split}.csv")
    if os.path.exists(csv_path):
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0] != "clip"]
        clips = [(os.path.splitext(r[0])[0], CLASSES.index(r[1].strip())) for r in rows]
    else:
        names = sorted(os.path.splitext(n)[0] for n in os.listdir(os.path.join(root, "AudioWAV")) if n.endswith(".wav"))
        actors = sorted({n.split("_")[0] for n in names})
        n_test = max(1, len(actors) // 10)
        test_actors = set(actors[-n_test:])
        clips = [
            (n, CLASSES.index(n.split("_")[2])) for n in names if (n.split("_")[0] in test_actors) == (split == "test")
        ]
    return [(c, y) for c, y in clips if os.path.isdir(os.path.join(root, frames_dir, c))]


class CremaD(torch.utils.data.Dataset):
    def __init__(self, root: str, split: str, *, frames_dir: str = "Image-01-FPS", image_size: int = 224):
        self.root, self.split, self.frames_dir, self.image_size = root, split, frames_dir, image_size
        self.clips = list_clips(root, split, frames_dir)
        if not self.clips:
            raise FileNotFoundError(
                f"no {split} clips with both AudioWAV/<clip>.wav and {frames_dir}/<clip>/ under {root}"
            )

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        clip, label = self.clips[i]
        spec = spectrogram(*read_wav(os.path.join(self.root, "AudioWAV", clip + ".wav")))
        folder = os.path.join(self.root, self.frames_dir, clip)
        frames = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg")))
        train = self.split == "train"
        frame = random.choice(frames) if train else frames[len(frames) // 2]
        return spec, load_frame(os.path.join(folder, frame), self.image_size, train), label


def build_model() -> ConcatClassifier:
    return ConcatClassifier([ResNet18Encoder(in_channels=1), ResNet18Encoder(in_channels=3)], len(CLASSES))


def _weights(module) -> list:
    """The conv / linear weight tensors of an encoder (the authors' OGM-GE modulates those)."""
    return [m.weight for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


BALANCERS = {  # the same recipes as the demo's (mmkernels/demo/methods.py), through the one protocol
    "joint": lambda model, opt: api.Balancer(2, optimizer=opt),  # every hook the default: plain joint training
    "ogm_ge": lambda model, opt: api.OGMGE(
        2, alpha=0.8, official=True, params=[_weights(e) for e in model.encoders], optimizer=opt
    ),
    "ogm_ge_cov": lambda model, opt: api.OGMGE(2, alpha=0.8, noise="covariance", optimizer=opt),
    "ogm": lambda model, opt: api.OGM(2, alpha=0.8, optimizer=opt),
    "opm": lambda model, opt: api.OPM(2, optimizer=opt),
    "agm": lambda model, opt: api.AGM(2, optimizer=opt),
    "mlb": lambda model, opt: api.MLB(2, optimizer=opt),
    "olm": lambda model, opt: api.OLM(2, optimizer=opt),
    "pmr": lambda model, opt: api.PMR(2, num_classes=len(CLASSES), end=70, unit="epoch", optimizer=opt),
    "mmpareto": lambda model, opt: api.MMPareto(
        2, params=[list(e.parameters()) for e in model.encoders], optimizer=opt
    ),
}
METHODS = tuple(BALANCERS)


class Batches:
    """A DataLoader of (spectrogram, frame, label) as the protocol's batches ([spectrogram, frame], label) on a
    device; re-iterable, with a length (PMR refreshes from the first tenth)."""

    def __init__(self, loader, device, max_batches=None):
        self.loader, self.device, self.max_batches = loader, device, max_batches

    def __len__(self):
        return len(self.loader) if self.max_batches is None else min(len(self.loader), self.max_batches)

    def __iter__(self):
        for i, (spec, img, y) in enumerate(self.loader):
            if self.max_batches is not None and i >= self.max_batches:
                return
            dev = self.device
            yield [spec.to(dev, non_blocking=True), img.to(dev, non_blocking=True)], y.to(dev, non_blocking=True)


@torch.no_grad()
def evaluate(model, batches):
    """Fused accuracy (the balancer's prediction: OLM's w applies) and each modality's accuracy from the concat
    head's split (u_m = f_m W_m^T + b/2)."""
    model.eval()
    hits, n = None, 0
    for inputs, y in batches:
        out = model.balancer(model, inputs, y)
        u = model.unimodal_logits(out.features)
        h = torch.cat([(out.logits.argmax(1) == y).sum().view(1), (u.argmax(2) == y).sum(1)])
        hits = h if hits is None else hits + h
        n += y.shape[0]
    model.train()
    return (hits.float() / max(n, 1)).tolist()  # sync-ok: evaluation, once per epoch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--root", required=True, help="CREMA-D folder (AudioWAV/, Image-01-FPS/, optional train.csv/test.csv)"
    )
    p.add_argument("--method", default="ogm_ge", choices=METHODS)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-decay-epochs", type=int, default=70, help="StepLR period (gamma 0.1)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--frames-dir", default="Image-01-FPS")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--save", default=None, help="write the final model's state_dict here")
    args = p.parse_args(argv)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    train_set = CremaD(args.root, "train", frames_dir=args.frames_dir, image_size=args.image_size)
    test_set = CremaD(args.root, "test", frames_dir=args.frames_dir, image_size=args.image_size)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=dev.type == "cuda")
    train_loader = torch.utils.data.DataLoader(
        train_set, shuffle=True, drop_last=len(train_set) > args.batch_size, **kw
    )
    test_loader = torch.utils.data.DataLoader(test_set, shuffle=False, **kw)
    model = build_model().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    model.balancer = BALANCERS[args.method](model, opt)  # opt.step() also ends the balancer's step
    sched = torch.optim.lr_scheduler.StepLR(opt, args.lr_decay_epochs, 0.1)
    print(
        f"CREMA-D: {len(train_set)} train / {len(test_set)} test clips, method {args.method}, device {dev}", flush=True
    )
    train, test = Batches(train_loader, dev), Batches(test_loader, dev)
    step = 0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.balancer.epoch_start(model, epoch, train)
        for batch in train:
            loss = api.train_step(model, model.balancer, opt, [batch])  # the generic step, any balancer
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        sched.step()
        model.balancer.epoch_end(model, epoch, Batches(train_loader, dev, 8), Batches(test_loader, dev, 8))
        fused, acc_a, acc_v = evaluate(model, test)
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}  test acc fused {100 * fused:.1f}%  "  # sync-ok: epoch log
            f"audio {100 * acc_a:.1f}%  visual {100 * acc_v:.1f}%  ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        if args.max_steps and step >= args.max_steps:
            break
    if args.save:
        torch.save(model.state_dict(), args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
