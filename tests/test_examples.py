"""examples/cremad_train.py end to end on a tiny generated folder in CREMA-D's layout."""

import importlib.util
import math
import os
import struct
import wave

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    spec = importlib.util.spec_from_file_location("cremad_train", os.path.join(ROOT, "examples", "cremad_train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cremad = _load_example()


def _write_wav(path, samples, rate=16000, width=2):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"".join(struct.pack("<h", int(max(-1, min(1, s)) * 32767)) for s in samples))


def _make_cremad(root, actors=("1001", "1002"), frames=2):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    os.makedirs(root / "AudioWAV")
    for actor in actors:
        for k, emo in enumerate(cremad.CLASSES):
            clip = f"{actor}_DFA_{emo}_XX"
            tone = [0.5 * math.sin(2 * math.pi * 220 * (k + 1) * t / 16000) for t in range(4000)]  # 0.25 s
            _write_wav(root / "AudioWAV" / f"{clip}.wav", tone)
            folder = root / "Image-01-FPS" / clip
            os.makedirs(folder)
            for f in range(frames):
                img = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(img.numpy()).save(folder / f"{f:05d}.jpg", quality=90)


def test_read_wav_and_spectrogram_shape(tmp_path):
    samples = [0.25 * math.sin(2 * math.pi * 440 * t / 16000) for t in range(16000)]
    _write_wav(tmp_path / "a.wav", samples)
    x, rate = cremad.read_wav(str(tmp_path / "a.wav"))
    assert rate == 16000 and x.shape == (16000,)
    assert torch.allclose(x, torch.tensor(samples), atol=1e-4)
    spec = cremad.spectrogram(x, rate)
    assert spec.shape == (1, 257, 299)
    # 440 Hz at 16 kHz with a 512-point FFT peaks in bin round(440 * 512 / 16000) = 14
    assert spec[0].mean(1).argmax().item() == 14
    # another sample rate is resampled to 16 kHz: same peak bin
    slow = torch.tensor([0.25 * math.sin(2 * math.pi * 440 * t / 22050) for t in range(22050)])
    assert cremad.spectrogram(slow, 22050)[0].mean(1).argmax().item() == 14


def test_split_by_actor_and_csv(tmp_path):
    _make_cremad(tmp_path)
    train = cremad.list_clips(str(tmp_path), "train", "Image-01-FPS")
    test = cremad.list_clips(str(tmp_path), "test", "Image-01-FPS")
    assert len(train) == 6 and len(test) == 6
    assert {c.split("_")[0] for c, _ in test} == {"1002"}
    assert sorted(y for _, y in train) == list(range(6))
    with open(tmp_path / "train.csv", "w") as f:
        f.write("clip,label\n1001_DFA_SAD_XX,SAD\n1002_DFA_ANG_XX,ANG\n")
    assert cremad.list_clips(str(tmp_path), "train", "Image-01-FPS") == [("1001_DFA_SAD_XX", 2), ("1002_DFA_ANG_XX", 5)]


@pytest.mark.parametrize("method", ["joint", "ogm_ge", "olm", "pmr", "mmpareto"])
def test_cremad_trainer_end_to_end(tmp_path, method, capsys):
    _make_cremad(tmp_path / "crema")
    torch.set_num_threads(1)
    out = tmp_path / "model.pt"
    rc = cremad.main(
        [
            "--root",
            str(tmp_path / "crema"),
            "--method",
            method,
            "--epochs",
            "2",
            "--batch-size",
            "3",
            "--image-size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--max-steps",
            "4",
            "--save",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "6 train / 6 test clips" in text and "epoch 2:" in text and "test acc fused" in text
    state = torch.load(out)
    assert state["encoders.0.net.conv1.weight"].shape == (64, 1, 7, 7)  # 1-channel audio stem
    assert state["head.weight"].shape == (6, 1024)
