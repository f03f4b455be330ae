"""Decoding sound: Griffin-Lim against the learned Vocos head, ms per clip measured side by side.

Both decoders start from the same decoded spectrograms (the autoencoder's decoder runs once per batch and
is timed on its own), so the table separates what they share from what differs. Rounds interleave the
decoders, so a machine whose speed drifts slows both alike; each number is the median of the rounds.

Without --store the networks have the preset's architecture and random weights: the time of a convolution
does not depend on its weights, and the output says so. With --store and --autoencoder (a vocos fine-tune,
`configs/fsdd/vocoder.yaml`) the stored weights run.

    python bench/vocoder.py                                       # configs/fsdd/vocoder.yaml's sizes, CPU
    python bench/vocoder.py --store artifacts --autoencoder autoencoder@<vocos fine-tune> --batch 16
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from ldm.audio import griffin_lim
from ldm.config import load_config
from ldm.models.autoencoder import AutoencoderKL
from stages.autoencoder import AutoencoderStageConfig

ROOT = Path(__file__).resolve().parent.parent


def load(args) -> tuple[AutoencoderKL, str]:
    """The autoencoder to time and a line saying where its weights came from."""
    if args.store:
        from ldm.artifacts import ArtifactStore
        from ldm.loading import load_autoencoder

        artifact = ArtifactStore(args.store).load(args.autoencoder, stage="autoencoder")
        model = load_autoencoder(artifact)
        if model.vocoder is None:
            raise SystemExit(
                f"{artifact.ref} decodes by Griffin-Lim: pass a vocos fine-tune (configs/fsdd/vocoder.yaml)"
            )
        return model, f"weights of {artifact.ref}"
    config = load_config(AutoencoderStageConfig, ROOT / args.config, ["init_from=autoencoder@timing-only"])
    torch.manual_seed(0)
    return AutoencoderKL(config.model).eval(), f"random weights in {args.config}'s architecture (timing only)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="", help="artifact store holding --autoencoder (default: random weights)")
    parser.add_argument("--autoencoder", default="autoencoder@latest")
    parser.add_argument("--config", default="configs/fsdd/vocoder.yaml", help="architecture without --store")
    parser.add_argument("--batch", type=int, default=16, help="clips decoded at once")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, origin = load(args)
    cfg = model.config
    z = torch.randn(args.batch, *cfg.latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.decode_features(z)
        decoders = {
            "decoder network (shared)": lambda: model.decode_features(z),
            f"Griffin-Lim, {cfg.griffin_lim_iters} iterations": lambda: griffin_lim(
                features, cfg.n_fft, cfg.hop_length, cfg.griffin_lim_iters
            ),
            f"Vocos head ({cfg.vocoder_dim} wide, {cfg.vocoder_depth} blocks)": lambda: model.vocoder(features),
        }
        for decode in decoders.values():  # warm-up: allocator and kernels
            decode()
        times: dict[str, list[float]] = {name: [] for name in decoders}
        for _ in range(args.rounds):
            for name, decode in decoders.items():
                start = time.perf_counter()
                decode()
                times[name].append((time.perf_counter() - start) * 1000 / args.batch)
    ms = {name: statistics.median(values) for name, values in times.items()}
    shared, griffin, vocos = ms.values()
    clip_s = cfg.resolution / 8000
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.batch} clips of {cfg.resolution} samples ({clip_s:.2f} s at 8 kHz); {origin}")
    print(f"{'decoder':<40} {'ms per clip':>12} {'x real time':>12}")
    for name, value in ms.items():
        print(f"{name:<40} {value:12.2f} {clip_s * 1000 / value:12.0f}")
    whole = (shared + griffin) / (shared + vocos)
    print(f"Vocos head / Griffin-Lim: {griffin / vocos:.1f}x faster; the whole decode {whole:.1f}x")


if __name__ == "__main__":
    main()
