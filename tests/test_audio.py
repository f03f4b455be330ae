"""Audio front end: WAV I/O, STFT magnitude, mel filterbank, multi-resolution STFT loss, SI-SDR."""

from __future__ import annotations

import struct
import wave

import numpy as np
import pytest
import torch

from ldm.audio import (
    MultiResolutionSTFTLoss,
    log_mel,
    log_mel_distance,
    mel_filterbank,
    mr_stft_distance,
    read_wav,
    si_sdr,
    speech_metrics_available,
    speech_quality,
    stft_magnitude,
    write_wav,
)


def _write_pcm(path, samples: np.ndarray, rate: int = 8000, width: int = 2) -> None:
    """Write ``samples`` (T, C) of the given byte width with ``wave`` directly."""
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(samples.shape[1])
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(samples.tobytes())


def _reference_stft_magnitude(x: np.ndarray, n_fft: int, hop: int, win: int) -> np.ndarray:
    """Slow float64 STFT magnitude (F, frames) of one signal: centre padding, periodic Hann, one DFT per frame."""
    pad = n_fft // 2
    padded = np.pad(x, pad, mode="reflect" if len(x) > pad else "constant")
    window = np.zeros(n_fft)
    start = (n_fft - win) // 2  # torch.stft centres a shorter window inside the frame
    window[start : start + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    frames = 1 + (len(padded) - n_fft) // hop
    k = np.arange(n_fft // 2 + 1)[:, None]
    n = np.arange(n_fft)[None, :]
    dft = np.exp(-2j * np.pi * k * n / n_fft)  # (F, n_fft)
    columns = []
    for t in range(frames):
        frame = padded[t * hop : t * hop + n_fft] * window
        columns.append(np.sqrt(np.maximum(np.abs(dft @ frame) ** 2, 1e-7)))
    return np.stack(columns, axis=1)


def _reference_mr_stft(x: np.ndarray, y: np.ndarray, resolutions) -> float:
    """The Parallel WaveGAN loss of one sample, written with the slow reference STFT."""
    total = 0.0
    for n_fft, hop, win in resolutions:
        s, s_hat = _reference_stft_magnitude(x, n_fft, hop, win), _reference_stft_magnitude(y, n_fft, hop, win)
        total += np.linalg.norm(s - s_hat) / np.linalg.norm(s) + np.mean(np.abs(np.log(s) - np.log(s_hat)))
    return total / len(resolutions)


# ----------------------------------------------------------------------------- WAV I/O


def test_wav_round_trip_is_exact_to_one_quantisation_step(tmp_path):
    signal = torch.rand(500, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = write_wav(tmp_path / "tone.wav", signal.unsqueeze(0), 16000)
    back, rate = read_wav(path)
    assert rate == 16000 and back.dtype == torch.float32 and back.shape == (500,)
    assert (back - signal).abs().max() <= 1 / 32768


def test_write_wav_clips_to_the_valid_range(tmp_path):
    back, _ = read_wav(write_wav(tmp_path / "loud.wav", torch.tensor([2.0, -3.0, 0.5]), 8000))
    assert back.tolist() == [32767 / 32768, -1.0, 0.5]


def test_stereo_pcm16_reads_as_the_mean_of_its_channels(tmp_path):
    samples = np.random.default_rng(0).integers(-32768, 32767, size=(300, 2), dtype=np.int16)
    _write_pcm(tmp_path / "stereo.wav", samples)
    signal, rate = read_wav(tmp_path / "stereo.wav")
    expected = samples.astype(np.float64).mean(axis=1) / 32768
    assert rate == 8000 and np.allclose(signal.numpy(), expected, atol=1e-7)


@pytest.mark.parametrize(
    "content",
    [
        bytes(np.random.default_rng(1).integers(0, 256, 200, dtype=np.uint8)),
        b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00",
    ],
    ids=["random-bytes", "truncated-header"],
)
def test_corrupt_file_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "broken.wav"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.wav"):
        read_wav(path)


def test_truncated_data_is_refused_naming_the_file(tmp_path):
    path = write_wav(tmp_path / "cut.wav", torch.zeros(100), 8000)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match="cut.wav.*truncated"):
        read_wav(path)


def test_8_bit_pcm_is_refused_naming_the_file(tmp_path):
    _write_pcm(tmp_path / "eight.wav", np.full((100, 1), 128, dtype=np.uint8), width=1)
    with pytest.raises(ValueError, match="eight.wav.*8-bit.*16-bit PCM"):
        read_wav(tmp_path / "eight.wav")


def test_ieee_float_wav_is_refused_naming_the_file(tmp_path):
    data = np.zeros(100, dtype="<f4").tobytes()
    # fmt chunk: format tag 3 (IEEE float), 1 channel, 8000 Hz, byte rate, block align 4, 32 bits.
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 8000 * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path = tmp_path / "float.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    with pytest.raises(ValueError, match="float.wav.*IEEE float"):
        read_wav(path)


def test_empty_wav_is_refused(tmp_path):
    _write_pcm(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.int16))
    with pytest.raises(ValueError, match="empty.wav.*0 frames"):
        read_wav(tmp_path / "empty.wav")


# ----------------------------------------------------------------------------- STFT and mel


@pytest.mark.parametrize(
    "length, n_fft, hop, win",
    [(200, 64, 16, 64), (150, 64, 20, 40), (20, 64, 16, 64)],
    ids=["reflect", "short-window", "too-short-for-reflect"],
)
def test_stft_magnitude_matches_a_slow_dft_loop(length, n_fft, hop, win):
    x = torch.randn(2, 1, length, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = stft_magnitude(x, n_fft, hop, win)
    assert got.shape[:2] == (2, n_fft // 2 + 1)
    for i in range(2):
        expected = _reference_stft_magnitude(x[i, 0].numpy(), n_fft, hop, win)
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=1e-9, atol=1e-9)


def test_mel_filterbank_peaks_at_one_at_increasing_htk_centres():
    n_mels, n_fft, rate = 32, 4096, 8000
    filters = mel_filterbank(n_mels, n_fft, rate)
    assert filters.shape == (n_mels, n_fft // 2 + 1) and filters.dtype == torch.float32
    top = 2595 * np.log10(1 + 4000 / 700)
    centres_hz = 700 * (10 ** (np.linspace(0, top, n_mels + 2)[1:-1] / 2595) - 1)
    nearest_bin = np.round(centres_hz / (rate / n_fft))
    peaks, argmax = filters.max(dim=1)
    assert (peaks <= 1).all() and (peaks > 0.9).all()  # fine bins land close to each centre
    assert np.abs(argmax.numpy() - nearest_bin).max() <= 1
    assert (argmax.diff() > 0).all()


def test_log_mel_is_the_log_of_the_mel_filtered_magnitude():
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    expected = torch.log((mel_filterbank(16, 128, 8000) @ stft_magnitude(x, 128, 32)).clamp(min=1e-5))
    torch.testing.assert_close(log_mel(x, 8000, n_fft=128, hop_length=32, n_mels=16), expected)


# ----------------------------------------------------------------------------- losses and metrics


def test_multi_resolution_stft_loss_matches_the_slow_reference_per_sample():
    resolutions = ((64, 16, 64), (128, 32, 96))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 1, 300, generator=gen), torch.randn(3, 1, 300, generator=gen)
    got = MultiResolutionSTFTLoss(resolutions)(x, y)
    expected = [_reference_mr_stft(x[i, 0].double().numpy(), y[i, 0].double().numpy(), resolutions) for i in range(3)]
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_multi_resolution_stft_loss_is_zero_for_identical_inputs():
    x = torch.randn(2, 500, generator=torch.Generator().manual_seed(0))
    assert MultiResolutionSTFTLoss()(x, x.clone()).tolist() == [0.0, 0.0]


def test_multi_resolution_stft_loss_has_finite_gradients():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 400, generator=gen), torch.randn(2, 400, generator=gen)
    y[1] = 0  # silence: the magnitude floor keeps the gradient finite
    y.requires_grad_(True)
    MultiResolutionSTFTLoss()(x, y).sum().backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_multi_resolution_stft_loss_runs_in_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 400, generator=gen), torch.randn(2, 400, generator=gen)
    loss = MultiResolutionSTFTLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss(x, y))


def test_mr_stft_distance_takes_the_estimate_first():
    gen = torch.Generator().manual_seed(0)
    estimate, reference = torch.randn(2, 400, generator=gen), torch.randn(2, 400, generator=gen)
    torch.testing.assert_close(mr_stft_distance(estimate, reference), MultiResolutionSTFTLoss()(reference, estimate))


def test_si_sdr_is_scale_invariant():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    estimate = reference + 0.3 * torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(si_sdr(3 * estimate, reference), si_sdr(estimate, reference))


def test_si_sdr_of_orthogonal_noise_is_the_energy_ratio_in_db():
    rng = np.random.default_rng(0)
    reference = rng.standard_normal(1000)
    reference -= reference.mean()
    noise = rng.standard_normal(1000)
    noise -= noise.mean()
    noise -= (noise @ reference) / (reference @ reference) * reference  # orthogonal and still zero-mean
    ratio = 20.0
    noise *= np.sqrt((reference @ reference) / ratio / (noise @ noise))
    got = si_sdr(torch.from_numpy(reference + noise)[None], torch.from_numpy(reference)[None])
    assert got.item() == pytest.approx(10 * np.log10(ratio), abs=1e-6)


def test_si_sdr_of_silence_is_finite():
    assert torch.isfinite(si_sdr(torch.zeros(2, 1, 100), torch.zeros(2, 1, 100))).all()


def test_log_mel_distance_is_zero_for_identical_and_positive_for_different_signals():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 2000, generator=gen), torch.randn(2, 1, 2000, generator=gen)
    assert log_mel_distance(x, x, 8000).tolist() == [0.0, 0.0]
    assert (log_mel_distance(y, x, 8000) > 0).all()


# ----------------------------------------------------------------------------- PESQ and STOI (extra [audio])

needs_speech_metrics = pytest.mark.skipif(not speech_metrics_available()[0], reason=speech_metrics_available()[1])


def spoken_like(seconds=1.0, rate=8000, seed=0):
    """A voiced-speech-like signal: a 140 Hz pulse train through two formant resonances, syllable envelope."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * rate)) / rate
    source = torch.sin(2 * torch.pi * 140 * t).sign() * 0.3 + 0.02 * torch.randn(len(t), generator=generator)
    voiced = source * (torch.sin(2 * torch.pi * 600 * t) + 0.6 * torch.sin(2 * torch.pi * 1400 * t))
    return (0.5 * voiced * torch.sin(torch.pi * 3 * t).abs()).float()


@needs_speech_metrics
def test_speech_quality_equals_the_pesq_and_pystoi_packages_on_a_known_pair():
    import pesq
    import pystoi

    clean = spoken_like()
    noisy = clean + 0.05 * torch.randn(len(clean), generator=torch.Generator().manual_seed(1))
    scores = speech_quality(torch.stack([noisy, clean]), torch.stack([clean, clean]), 8000)
    assert scores["pesq"][0].item() == pytest.approx(pesq.pesq(8000, clean.numpy(), noisy.numpy(), "nb"), abs=1e-4)
    assert scores["stoi"][0].item() == pytest.approx(pystoi.stoi(clean.numpy(), noisy.numpy(), 8000), abs=1e-4)
    assert scores["pesq"][1] > scores["pesq"][0] and scores["pesq"][1] > 4.0  # identical: near the 4.5 ceiling
    assert scores["stoi"][1] == pytest.approx(1.0, abs=1e-3) and scores["stoi"][0] < scores["stoi"][1]


@needs_speech_metrics
def test_speech_quality_gives_nan_pesq_for_silence_and_refuses_other_rates():
    silence = torch.zeros(1, 8000)
    assert speech_quality(silence, silence, 8000)["pesq"].isnan().all()
    with pytest.raises(ValueError, match="8 kHz"):
        speech_quality(silence, silence, 22050)


def test_speech_metrics_availability_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "pesq" else real(name))
    available, hint = speech_metrics_available()
    assert not available and hint.startswith("pesq") and "not installed" in hint and ".[audio]" in hint
