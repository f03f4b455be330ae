"""Sound: 16-bit PCM WAV I/O, an STFT/mel front end on ``torch.stft``, and the losses and metrics built on it.

Signals are float tensors in [-1, 1], batched as (N, T) or (N, 1, T). WAV files go through the
standard library's ``wave`` module (no torchaudio, soundfile or librosa); only 16-bit PCM is read
or written, so any other encoding is refused with a message saying how to convert it.

Losses and metrics, each returning one value per sample, shape (N,):
  - ``MultiResolutionSTFTLoss``: spectral convergence + log-magnitude L1 over several STFT
    resolutions (Yamamoto, Song & Kim 2020, Parallel WaveGAN, arXiv 1910.11480),
  - ``si_sdr``: scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019),
  - ``log_mel_distance`` and ``mr_stft_distance``: distances for evaluation,
  - ``speech_quality``: PESQ and STOI (optional extra ``[audio]``).

``spectrogram_features`` and ``griffin_lim`` are the spectrogram front end of the sound autoencoder
and its inversion; ``spectrogram_pictures`` is how sound is drawn in grids.
"""

from __future__ import annotations

import functools
import io
import re
import struct
import warnings
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.artifacts import write_atomic

_CONVERT_HINT = (
    "convert it to 16-bit PCM, e.g. with `sox in.wav -b 16 -e signed-integer out.wav` "
    "or `ffmpeg -i in.wav -c:a pcm_s16le out.wav`"
)
# WAVE format tags that ``wave`` refuses as "unknown format", named so the message says what the file is.
_FORMAT_NAMES: dict[int, str] = {
    3: "IEEE float",
    6: "A-law",
    7: "mu-law",
    0x11: "IMA ADPCM",
    0x55: "MP3",
    0xFFFE: "WAVE_FORMAT_EXTENSIBLE",
}


# ----------------------------------------------------------------------------- WAV I/O


def _describe_wave_error(err: Exception) -> str:
    """A readable reason for an error that ``wave`` raised while opening a file."""
    if isinstance(err, EOFError):
        return "the file is truncated (its header ends early)"
    match = re.fullmatch(r"unknown format: (\d+)", str(err))
    if match:
        tag = int(match.group(1))
        return f"it is not PCM: format tag {tag} ({_FORMAT_NAMES.get(tag, 'compressed')})"
    return str(err)


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """Return (mono float32 signal (T,) in [-1, 1), sample rate) of a 16-bit PCM WAV file; channels are averaged."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as reader:
            channels, width, rate, frames = (
                reader.getnchannels(),
                reader.getsampwidth(),
                reader.getframerate(),
                reader.getnframes(),
            )
            data = reader.readframes(frames) if width == 2 else b""
    except (wave.Error, EOFError, struct.error) as err:
        raise ValueError(
            f"{path}: not a readable 16-bit PCM WAV file: {_describe_wave_error(err)}; {_CONVERT_HINT}"
        ) from err
    if width != 2:
        raise ValueError(f"{path}: {8 * width}-bit samples, only 16-bit PCM is read; {_CONVERT_HINT}")
    if rate <= 0:
        raise ValueError(f"{path}: invalid sample rate {rate} Hz in the header; {_CONVERT_HINT}")
    if frames == 0:
        raise ValueError(f"{path}: the file holds no audio (0 frames); replace it with a non-empty recording")
    if len(data) != frames * channels * 2:
        # wave trusts the header's frame count and silently returns fewer bytes when the data is cut short.
        raise ValueError(
            f"{path}: truncated: the header announces {frames} frames, the data holds "
            f"{len(data) // (channels * 2)}; re-copy or re-export the file"
        )
    samples = np.frombuffer(data, dtype="<i2").reshape(frames, channels)  # (T, C) int16
    signal = samples.astype(np.float32).mean(axis=1) / 32768.0  # (T,)
    return torch.from_numpy(signal), rate


def write_wav(path: str | Path, signal: torch.Tensor, sample_rate: int) -> Path:
    """Return ``path`` after writing ``signal`` (T,) or (1, T), clipped to [-1, 1], as mono 16-bit PCM, atomically."""
    path = Path(path)
    if signal.dim() == 2 and signal.shape[0] == 1:
        signal = signal[0]
    if signal.dim() != 1:
        raise ValueError(f"write_wav needs a mono signal of shape (T,) or (1, T), got {tuple(signal.shape)}")
    if not torch.isfinite(signal).all():
        raise ValueError(f"write_wav({path}): the signal holds NaN or inf values")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"write_wav({path}): sample_rate must be a positive int, got {sample_rate!r}")
    # The inverse of read_wav's int16 / 32768, so a round trip is exact to half a quantisation step.
    pcm = torch.round(signal.detach().to("cpu", torch.float64).clamp(-1.0, 1.0) * 32768.0).clamp(-32768, 32767)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(sample_rate)
        writer.writeframes(pcm.to(torch.int16).numpy().astype("<i2").tobytes())
    write_atomic(path, buffer.getvalue())
    return path


# ----------------------------------------------------------------------------- STFT and mel front end


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    """(N, T) or (N, 1, T) -> (N, T) in at least float32 (half-precision FFTs are limited to powers of two)."""
    if x.dim() == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 2:
        raise ValueError(f"expected signals of shape (N, T) or (N, 1, T), got {tuple(x.shape)}")
    return x if x.dtype == torch.float64 else x.float()


def stft_magnitude(x: torch.Tensor, n_fft: int, hop_length: int, win_length: int | None = None) -> torch.Tensor:
    """Return the STFT magnitude (N, n_fft // 2 + 1, frames) of x (N, T) or (N, 1, T), periodic Hann window, centred."""
    x = _as_batch(x)  # (N, T)
    win_length = win_length or n_fft
    window = torch.hann_window(win_length, periodic=True, dtype=x.dtype, device=x.device)
    # Reflect padding needs more samples than the n_fft // 2 it pads; shorter clips are zero-padded instead.
    pad_mode = "reflect" if x.shape[-1] > n_fft // 2 else "constant"
    spec = torch.stft(
        x,
        n_fft,
        hop_length=hop_length,
        win_length=win_length,
        window=window,
        center=True,
        pad_mode=pad_mode,
        return_complex=True,
    )  # (N, F, frames) complex
    # |z| = sqrt(re^2 + im^2) has an infinite gradient at 0; the floor keeps it finite on silence.
    return (spec.real.square() + spec.imag.square()).clamp(min=1e-7).sqrt()


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)  # HTK mel scale


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """Return float32 triangular filters (n_mels, n_fft // 2 + 1) equally spaced on the HTK mel scale, peaks of 1."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(
            f"mel_filterbank needs 0 <= f_min < f_max <= sample_rate / 2, got {f_min}, {f_max}, {sample_rate}"
        )
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (F,) bin frequencies
    mels = torch.linspace(
        _hz_to_mel(torch.tensor(f_min, dtype=torch.float64)).item(),
        _hz_to_mel(torch.tensor(f_max, dtype=torch.float64)).item(),
        n_mels + 2,
        dtype=torch.float64,
    )
    edges = _mel_to_hz(mels)  # (n_mels + 2,): filter m rises on edges[m]..edges[m+1], falls on edges[m+1]..edges[m+2]
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rising = (bins - low) / (centre - low)  # (n_mels, F)
    falling = (high - bins) / (high - centre)
    filters = torch.minimum(rising, falling).clamp(min=0.0)
    empty = int((filters.amax(dim=1) == 0).sum())
    if empty:
        warnings.warn(
            f"mel_filterbank: {empty} of {n_mels} filters fall between FFT bins and are all zero; "
            "use fewer mels or a larger n_fft",
            stacklevel=2,
        )
    return filters.float()


@functools.lru_cache(maxsize=16)
def _cached_filterbank(n_mels: int, n_fft: int, sample_rate: int, device: torch.device) -> torch.Tensor:
    return mel_filterbank(n_mels, n_fft, sample_rate).to(device)


def log_mel(
    x: torch.Tensor, sample_rate: int, n_fft: int = 256, hop_length: int = 64, n_mels: int = 64
) -> torch.Tensor:
    """Return log(max(mel-filtered STFT magnitude (not power), 1e-5)) (N, n_mels, frames) of x (N, T) or (N, 1, T)."""
    magnitude = stft_magnitude(x, n_fft, hop_length)  # (N, F, frames)
    filters = _cached_filterbank(n_mels, n_fft, sample_rate, magnitude.device).to(magnitude.dtype)  # (n_mels, F)
    return torch.log(torch.matmul(filters, magnitude).clamp(min=1e-5))  # (N, n_mels, frames)


# ----------------------------------------------------------------------------- spectrogram features and their inversion

# log|STFT| of the spectrogram front end is mapped by (log|X| - SPECTROGRAM_CENTER) / SPECTROGRAM_SCALE: the floor
# 1e-4 (-9.2) goes to about -1.1 and a peak-0.9 clip's loudest bins (log(0.9 * 128) ~ 4.7 at 256 points) to 2.
SPECTROGRAM_FLOOR, SPECTROGRAM_CENTER, SPECTROGRAM_SCALE = 1e-4, -4.0, 4.5


def spectrogram_features(x: torch.Tensor, n_fft: int, hop_length: int) -> torch.Tensor:
    """Return scaled log-magnitude STFT features (N, n_fft // 2 + 1, T // hop_length) of signals x (N, 1, T).

    Frequency bins become channels over frames, a 1-D signal an ordinary 1-D network takes. The
    centred STFT has T / hop + 1 frames; the last is dropped so that frames = T / hop, a length the
    network's strides divide (`griffin_lim` repeats it back).
    """
    magnitude = stft_magnitude(x, n_fft, hop_length)[..., :-1]  # (N, F, T / hop)
    return (magnitude.clamp(min=SPECTROGRAM_FLOOR).log() - SPECTROGRAM_CENTER) / SPECTROGRAM_SCALE


def griffin_lim(
    features: torch.Tensor, n_fft: int, hop_length: int, n_iter: int = 32, momentum: float = 0.99, seed: int = 0
) -> torch.Tensor:
    """Return signals (N, 1, frames * hop_length) whose STFT magnitude matches `spectrogram_features` (N, F, frames).

    Fast Griffin-Lim (Perraudin, Balazs & Sondergaard 2013): alternate between the signal whose STFT
    is closest to magnitude x phase, and the phase of that signal's STFT, with momentum on the phase.
    The starting phase is drawn from a generator seeded with `seed`, so a decode is repeatable.
    """
    magnitude = (features.float() * SPECTROGRAM_SCALE + SPECTROGRAM_CENTER).exp()  # (N, F, frames)
    magnitude = torch.cat([magnitude, magnitude[..., -1:]], dim=-1)  # the dropped last frame, repeated
    length = (magnitude.shape[-1] - 1) * hop_length
    window = torch.hann_window(n_fft, periodic=True, device=magnitude.device)
    generator = torch.Generator(device=magnitude.device).manual_seed(seed)
    phase = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=generator, device=magnitude.device))
    previous = torch.zeros_like(phase)
    for _ in range(n_iter):
        signal = torch.istft(magnitude * phase, n_fft, hop_length, window=window, center=True, length=length)
        rebuilt = torch.stft(
            signal, n_fft, hop_length, window=window, center=True, pad_mode="reflect", return_complex=True
        )
        phase = rebuilt - previous * (momentum / (1 + momentum))  # the accelerated step
        phase = phase / phase.abs().clamp(min=1e-16)
        previous = rebuilt
    signal = torch.istft(magnitude * phase, n_fft, hop_length, window=window, center=True, length=length)
    return signal.unsqueeze(1)  # (N, 1, T)


# ----------------------------------------------------------------------------- losses and metrics


def _same_shape(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_batch(x), _as_batch(y)
    if x.shape != y.shape:
        raise ValueError(f"signals must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x, y


# (n_fft, hop, window) of the multi-resolution STFT loss and discriminator, sized for 8 kHz speech: 16, 32 and 64 ms
# windows with 75% overlap (Parallel WaveGAN's (1024, 120, 600), (2048, 240, 1200), (512, 50, 240) are for 24 kHz).
SPEECH_STFT_RESOLUTIONS: tuple[tuple[int, int, int], ...] = ((128, 32, 128), (256, 64, 256), (512, 128, 512))


class MultiResolutionSTFTLoss(nn.Module):
    """Multi-resolution STFT loss of Parallel WaveGAN (Yamamoto et al. 2020): per sample, averaged over resolutions."""

    def __init__(self, resolutions: Sequence[tuple[int, int, int]] = SPEECH_STFT_RESOLUTIONS):
        super().__init__()
        if not resolutions:
            raise ValueError("MultiResolutionSTFTLoss needs at least one resolution")
        for n_fft, hop, win in resolutions:
            if not (0 < hop and 0 < win <= n_fft):
                raise ValueError(f"each resolution needs hop > 0 and 0 < win_length <= n_fft, got {(n_fft, hop, win)}")
        self.resolutions = tuple(tuple(r) for r in resolutions)

    def describe(self) -> str:
        """A label for logs and reports: what this loss is."""
        sizes = "/".join(str(n_fft) for n_fft, _, _ in self.resolutions)
        return f"multi-resolution STFT loss (Yamamoto et al. 2020), FFT sizes {sizes}"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the loss (N,) of estimate ``y`` against reference ``x``, each (N, T) or (N, 1, T)."""
        # Magnitudes and their logs lose too much in half precision, so autocast is switched off.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = _same_shape(x, y)
            losses = [self._one_resolution(x, y, *resolution) for resolution in self.resolutions]
            return torch.stack(losses).mean(dim=0)

    @staticmethod
    def _one_resolution(x: torch.Tensor, y: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
        reference, estimate = stft_magnitude(x, n_fft, hop, win), stft_magnitude(y, n_fft, hop, win)  # (N, F, frames)
        convergence = (reference - estimate).flatten(1).norm(dim=1) / reference.flatten(1).norm(
            dim=1
        )  # (N,) ||S - S_hat||_F / ||S||_F
        log_l1 = (reference.log() - estimate.log()).abs().mean(dim=(1, 2))  # (N,)
        return convergence + log_l1


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Return the scale-invariant SDR (N,) in dB of ``estimate`` against ``reference`` (Le Roux et al. 2019)."""
    estimate, reference = _same_shape(estimate, reference)
    estimate = estimate - estimate.mean(dim=1, keepdim=True)  # (N, T)
    reference = reference - reference.mean(dim=1, keepdim=True)
    scale = (estimate * reference).sum(dim=1, keepdim=True) / (reference.square().sum(dim=1, keepdim=True) + eps)
    target = scale * reference  # the projection of the estimate on the reference
    distortion = estimate - target
    # eps on both sides: silence against silence gives 0 dB, not NaN.
    return 10 * torch.log10((target.square().sum(dim=1) + eps) / (distortion.square().sum(dim=1) + eps))


def log_mel_distance(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Return the mean absolute difference (N,) of the two signals' ``log_mel`` spectrograms."""
    estimate, reference = _same_shape(estimate, reference)
    return (log_mel(estimate, sample_rate) - log_mel(reference, sample_rate)).abs().mean(dim=(1, 2))


_DEFAULT_MR_STFT = MultiResolutionSTFTLoss()  # holds no tensors, so one instance serves every device


def mr_stft_distance(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Return the default ``MultiResolutionSTFTLoss`` (N,) of ``estimate`` against ``reference``."""
    return _DEFAULT_MR_STFT(reference, estimate)


def take_windows(signals: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    """Return windows (N, C, length) of signals (N, C, L), signals[n, :, start[n] : start[n] + length], one gather."""
    index = start[:, None] + torch.arange(length, device=signals.device)  # (N, length)
    return signals.gather(2, index[:, None, :].expand(-1, signals.shape[1], -1))


# A picture's dB range: log magnitudes below the floor are black. A peak-0.9 clip's loudest bins reach
# about log(0.9 * 128) ~ 4.7 with the 256-point window, so [-7, 5] keeps speech and its noise floor visible.
PICTURE_LOG_RANGE = (-7.0, 5.0)


def spectrogram_pictures(signals: torch.Tensor, n_fft: int = 256, hop_length: int = 64) -> torch.Tensor:
    """Return log-magnitude spectrograms (N, 1, n_fft/2 + 1, frames) in [-1, 1] of signals (N, 1, L).

    Low frequencies are at the bottom.
    """
    low, high = PICTURE_LOG_RANGE
    magnitude = stft_magnitude(signals.detach().float().cpu().clamp(-1, 1), n_fft, hop_length)  # (N, F, frames)
    scaled = (magnitude.log().clamp(low, high) - low) / (high - low) * 2 - 1
    return scaled.flip(1).unsqueeze(1)  # row 0 is the highest frequency, as a spectrogram is read


# ----------------------------------------------------------------------------- speech quality (optional extra [audio])

SPEECH_METRICS_HINT = "pip install -e '.[audio]' (the pesq and pystoi packages)"


def speech_metrics_available() -> tuple[bool, str]:
    """Whether PESQ and STOI can be computed here, and if not, what to install."""
    import importlib.util

    missing = [name for name in ("pesq", "pystoi") if importlib.util.find_spec(name) is None]
    if missing:
        return False, f"{' and '.join(missing)} not installed: {SPEECH_METRICS_HINT}"
    return True, ""


def speech_quality(estimate: torch.Tensor, reference: torch.Tensor, sample_rate: int) -> dict[str, torch.Tensor]:
    """Return PESQ (ITU-T P.862; narrowband at 8 kHz, wideband at 16 kHz) and STOI, each (N,), of estimate against
    reference, through torchmetrics' wrappers of the `pesq` and `pystoi` packages.

    PESQ runs from -0.5 to 4.5 (narrowband identical signals give about 4.5); STOI from 0 to 1. A clip in which
    PESQ finds no speech (silence) gets NaN there, which callers leave out of means.
    """
    from torchmetrics.functional.audio import perceptual_evaluation_speech_quality as pesq_score
    from torchmetrics.functional.audio import short_time_objective_intelligibility as stoi_score

    if sample_rate not in (8000, 16000):
        raise ValueError(f"PESQ is defined at 8 kHz (narrowband) and 16 kHz (wideband), not {sample_rate} Hz")
    estimate, reference = (x.float().cpu() for x in _same_shape(estimate, reference))  # (N, T) each
    mode = "nb" if sample_rate == 8000 else "wb"
    pesq = []
    for one, truth in zip(estimate, reference):
        try:
            pesq.append(float(pesq_score(one, truth, sample_rate, mode)))
        except Exception as err:  # the pesq package raises its own NoUtterancesError for silence
            if "utterance" not in str(err).lower() and type(err).__name__ != "NoUtterancesError":
                raise
            pesq.append(float("nan"))
    stoi = stoi_score(estimate, reference, sample_rate)
    return {"pesq": torch.tensor(pesq, dtype=torch.float64), "stoi": stoi.double().reshape(-1)}
