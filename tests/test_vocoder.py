"""The learned waveform decoder: the iSTFT head, the Vocos-style network, its discriminators and losses."""

import math

import pytest
import torch

from ldm.audio import SPEECH_STFT_RESOLUTIONS, spectrogram_features
from ldm.losses.vocoder import VocoderLoss, VocoderLossConfig, multi_resolution_mel_l1
from ldm.models.discriminator import HIFIGAN_PERIODS, PeriodDiscriminator, WaveformDiscriminator
from ldm.models.vocoder import Vocoder, VocoderConfig, istft_head

RATE = 8000


def chirp(n: int = 2, length: int = 2048) -> torch.Tensor:
    """Signals (n, 1, length): rising tones with a little noise, so every bin holds some energy."""
    t = torch.arange(length, dtype=torch.float64) / RATE
    rows = [0.5 * torch.sin(2 * math.pi * (200 * (i + 1) + 800 * t) * t) for i in range(n)]
    noise = 0.01 * torch.randn(n, length, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (torch.stack(rows) + noise).float().unsqueeze(1)


def test_the_istft_head_rebuilds_a_known_signal_from_its_own_magnitude_and_phase():
    signal = chirp()[:, 0]  # (2, 2048)
    window = torch.hann_window(256, periodic=True)
    spec = torch.stft(signal, 256, 64, window=window, center=True, pad_mode="reflect", return_complex=True)
    rebuilt = istft_head(spec.abs().log(), spec.angle(), 256, 64, signal.shape[-1])
    torch.testing.assert_close(rebuilt, signal, rtol=0, atol=1e-5)
    # A wrong phase does not: the phase is what the head has to predict.
    scrambled = istft_head(spec.abs().log(), torch.zeros_like(spec.angle()), 256, 64, signal.shape[-1])
    assert (scrambled - signal).abs().max() > 0.1


def test_the_vocoder_maps_decoded_features_to_a_signal_of_their_length_and_refuses_other_shapes():
    vocoder = Vocoder(VocoderConfig(dim=32, depth=2)).eval()
    features = spectrogram_features(chirp(), 256, 64)  # (2, 129, 32): the decoder's output
    with torch.no_grad():
        signal = vocoder(features)
    assert signal.shape == (2, 1, 2048) and torch.isfinite(signal).all()
    with pytest.raises(ValueError, match=r"\(N, 129, frames\)"):
        vocoder(features[:, :64])
    with pytest.raises(ValueError, match="kernel must be odd"):
        VocoderConfig(kernel=4)


def test_a_vocoder_learns_a_clip_from_its_features_in_a_few_steps():
    torch.manual_seed(0)
    vocoder = Vocoder(VocoderConfig(dim=32, depth=2))
    real = chirp(1, 1024)
    features = spectrogram_features(real, 256, 64)
    optimizer = torch.optim.Adam(vocoder.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = multi_resolution_mel_l1(real, vocoder(features), RATE, 64).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_each_discriminator_gives_logits_and_feature_maps_of_the_expected_shapes():
    x = chirp(3, 2048)
    logits, maps = PeriodDiscriminator(3)(x[..., :2047])  # a length the period does not divide is padded
    assert logits.shape[0] == 3 and logits.ndim == 2 and len(maps) == 5
    assert maps[0].shape[-1] == 3 and maps[0].shape[-2] == math.ceil(math.ceil(2047 / 3) / 3)
    discriminator = WaveformDiscriminator()
    logits, maps = discriminator(x)
    assert len(logits) == len(HIFIGAN_PERIODS) + len(SPEECH_STFT_RESOLUTIONS) == len(maps)
    assert all(one.shape[0] == 3 and one.ndim == 2 for one in logits)
    for (n_fft, hop, _), first in zip(SPEECH_STFT_RESOLUTIONS, maps[len(HIFIGAN_PERIODS) :]):
        assert first[0].shape == (3, 16, 2048 // hop + 1, n_fft // 2 + 1)  # (frames, bins) at full resolution


def test_the_losses_vanish_on_identical_signals_and_the_discriminator_step_lowers_its_loss():
    torch.manual_seed(0)
    loss = VocoderLoss(VocoderLossConfig())
    real, fake = chirp(2, 2048), 0.3 * torch.randn(2, 1, 2048)
    assert multi_resolution_mel_l1(real, real, RATE, 64).abs().max() == 0
    _, logs = loss.generator_loss(real, real)
    assert logs["mel"] == 0 and logs["fm"] == 0
    optimizer = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        d_loss, d_logs = loss.discriminator_loss(real, fake)
        optimizer.zero_grad()
        d_loss.backward()
        optimizer.step()
        history.append(d_loss.item())
    assert history[-1] < history[0] and d_logs["logits_real"] > d_logs["logits_fake"]
    with pytest.raises(ValueError, match="must be >= 0"):
        VocoderLossConfig(mel_weight=-1)
