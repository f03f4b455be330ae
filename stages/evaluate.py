"""Reconstruction evaluation of an autoencoder artifact: PSNR, SSIM, LPIPS, rFID, class accuracy and throughput.

For a sound autoencoder the per-item measures are SI-SDR, the multi-resolution STFT distance and the
log-mel distance instead of PSNR, SSIM and LPIPS; the Frechet distance and class accuracy use the
spoken-digit classifier, and a few input/reconstruction pairs are written as WAV files to listen to.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ldm.artifacts import ArtifactError, ArtifactStore, write_atomic
from ldm.audio import (
    log_mel_distance,
    mr_stft_distance,
    si_sdr,
    speech_metrics_available,
    speech_quality,
    write_wav,
)
from ldm.config import from_dict
from ldm.data import (
    DataConfig,
    build_dataset,
    data_fingerprint,
    iterate_images,
    with_data,
)
from ldm.destinations import check_writable, writing_to
from ldm.evaluation import EVAL_FOLDER
from ldm.images import save_side_by_side
from ldm.loading import feature_extractor, load_autoencoder, load_classifier
from ldm.metrics import FeatureStats, frechet_distance, perceptual_metric, psnr, ssim
from ldm.runtime import synchronize


@torch.no_grad()
def evaluate_reconstruction(
    store: ArtifactStore,
    autoencoder_ref: str,
    data: str | None = None,
    split: str = "test",
    limit: int = 0,
    batch_size: int = 250,
    classifier_ref: str = "classifier@latest",
    features: str = "auto",
    lpips: str = "auto",
    out_dir: str | Path | None = None,
    device: str = "cpu",
) -> dict:
    """Measure reconstructions of `split` through the autoencoder's posterior mode; write a JSON report and a PNG."""
    device = torch.device(device)
    artifact = store.load(autoencoder_ref, stage="autoencoder")
    check_writable(Path(out_dir or EVAL_FOLDER), "--out")
    store.check_writable(artifact)  # the numbers go into its manifest
    model = load_autoencoder(artifact, device)
    data_config = replace(with_data(from_dict(DataConfig, artifact.config()["data"], "data"), data), hflip=False)
    dataset = build_dataset(data_config, split)
    sound = data_config.is_sound
    extractor = feature_extractor(store, features, classifier_ref, device, sound=sound)
    speech, speech_note = False, ""
    if sound:
        measures = {
            "si_sdr_db": si_sdr,
            "mr_stft": mr_stft_distance,
            "log_mel_distance": lambda a, b: log_mel_distance(a, b, data_config.sample_rate),
        }
        speech, speech_note = speech_metrics_available()
        if not speech:
            print(f"PESQ and STOI left out ({speech_note})")
    else:
        perceptual = perceptual_metric(lpips).to(device)
        measures = {"psnr_db": psnr, "ssim": ssim, "lpips": perceptual}
    try:  # the class accuracy of reconstructions caps that of samples decoded by this autoencoder
        classifier_artifact = store.load(classifier_ref, stage="classifier")
        classifier = load_classifier(classifier_artifact, device)
    except ArtifactError:
        classifier_artifact = classifier = None  # Inception features need no classifier: accuracy is left out
    real_stats, recon_stats = FeatureStats(), FeatureStats()
    totals = {**dict.fromkeys(measures, 0.0), "real_correct": 0, "recon_correct": 0}
    speech_scores = {"pesq": [], "stoi": []}  # per clip; PESQ is NaN where it finds no speech
    count, encode_seconds, decode_seconds = 0, 0.0, 0.0
    first_inputs = first_recons = None
    total = min(limit, len(dataset)) if limit else len(dataset)
    items = "clips" if sound else "images"
    print(f"evaluating {artifact.ref} on {total} {split} {items} ...")
    for images, labels in iterate_images(dataset, batch_size, limit):
        images, labels = images.to(device), labels.to(device)
        synchronize(device)
        start = time.perf_counter()
        latents = model.encode(images).mode()
        synchronize(device)
        middle = time.perf_counter()
        recons = model.decode(latents).clamp(-1, 1)
        synchronize(device)
        encode_seconds += middle - start
        decode_seconds += time.perf_counter() - middle
        n = len(images)
        for name, measure in measures.items():
            totals[name] += float(measure(recons, images).sum())
        if speech:
            for name, values in speech_quality(recons, images, data_config.sample_rate).items():
                speech_scores[name].append(values)
        real_stats.update(extractor(images))
        recon_stats.update(extractor(recons))
        if classifier is not None:
            totals["real_correct"] += int((classifier(images).argmax(1) == labels).sum())
            totals["recon_correct"] += int((classifier(recons).argmax(1) == labels).sum())
        count += n
        if first_inputs is None:
            first_inputs, first_recons = images[:32].cpu(), recons[:32].cpu()
        print(f"  {count}/{total}", end="\r", flush=True)
    print()
    rfid = frechet_distance(real_stats.mean(), real_stats.cov(), recon_stats.mean(), recon_stats.cov())
    report = {
        "autoencoder": artifact.ref,
        "data": {
            "name": data_config.name,
            "split": split,
            "images": count,
            "fingerprint": data_fingerprint(data_config, split),
        },
        "latent_shape": artifact.manifest.get("latent_shape"),
        **{name: totals[name] / count for name in measures},
        **(speech_report(speech_scores, data_config.sample_rate) if speech else {}),
        **({"speech_metrics": speech_note} if sound and not speech else {}),
        **({} if sound else {"lpips_backbone": perceptual.describe()}),
        "rfid": rfid,
        "rfid_features": extractor.name,
        "rfid_is_standard_fid": bool(extractor.is_standard),
        "class_accuracy": totals["recon_correct"] / count if classifier is not None else None,
        "real_class_accuracy": totals["real_correct"] / count if classifier is not None else None,
        "class_accuracy_classifier": classifier_artifact.ref if classifier is not None else None,
        "encode_images_per_s": count / encode_seconds,
        "decode_images_per_s": count / decode_seconds,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    out_dir = Path(out_dir or EVAL_FOLDER / f"recon-{artifact.version}-{split}")
    with writing_to(out_dir, "--out"):
        picture = save_side_by_side(first_inputs, first_recons, out_dir / "reconstructions.png")
        if sound:  # what a person would rather hear: the first clips and their reconstructions
            for i, (clip, recon) in enumerate(zip(first_inputs[:8], first_recons[:8])):
                write_wav(out_dir / "audio" / f"{i:02d}-input.wav", clip, data_config.sample_rate)
                write_wav(out_dir / "audio" / f"{i:02d}-reconstruction.wav", recon, data_config.sample_rate)
        write_atomic(out_dir / "report.json", json.dumps(report, indent=2).encode())
    metrics = {
        k: report[k]
        for k in (
            *measures,
            *(("pesq", "pesq_mode", "stoi") if speech else ()),
            "rfid",
            "class_accuracy",
            "real_class_accuracy",
            "encode_images_per_s",
            "decode_images_per_s",
        )
    }
    metrics.update(images=count, rfid_features=report["rfid_features"])
    if not sound:
        metrics.update(lpips_backbone=report["lpips_backbone"])
    store.update_manifest(artifact, metrics={f"recon_{split}": metrics})
    print_report(report, out_dir, picture)
    return report


def speech_report(scores: dict[str, list[torch.Tensor]], sample_rate: int) -> dict:
    """Mean PESQ over the clips in which it found speech, mean STOI, and how many clips PESQ left out."""
    pesq, stoi = torch.cat(scores["pesq"]), torch.cat(scores["stoi"])
    measured = ~pesq.isnan()
    return {
        "pesq": pesq[measured].mean().item() if measured.any() else None,
        "pesq_mode": "narrowband (P.862)" if sample_rate == 8000 else "wideband (P.862.2)",
        "pesq_clips_without_speech": int((~measured).sum()),
        "stoi": stoi.mean().item(),
    }


def print_report(report: dict, out_dir: Path, picture: Path) -> None:
    """Print the reconstruction numbers as a short table."""
    fid_name = "rFID" if report["rfid_is_standard_fid"] else "rFD (not Inception FID)"
    sound = "si_sdr_db" in report
    print(
        f"reconstruction of {report['data']['images']} {report['data']['split']} {'clips' if sound else 'images'} "
        f"by {report['autoencoder']}"
    )
    if sound:
        print(f"  SI-SDR    {report['si_sdr_db']:8.3f} dB")
        print(f"  MR-STFT   {report['mr_stft']:8.4f}   (multi-resolution STFT distance, FFT 128/256/512)")
        print(f"  log-mel   {report['log_mel_distance']:8.4f}   (mean |log mel difference|)")
        if "stoi" in report:
            pesq = "n/a" if report["pesq"] is None else f"{report['pesq']:8.3f}"
            print(
                f"  PESQ      {pesq}   ({report['pesq_mode']}; {report['pesq_clips_without_speech']} clips "
                f"without speech left out)"
            )
            print(f"  STOI      {report['stoi']:8.4f}")
        else:
            print(f"  PESQ, STOI left out: {report['speech_metrics']}")
    else:
        print(f"  PSNR      {report['psnr_db']:8.3f} dB")
        print(f"  SSIM      {report['ssim']:8.4f}")
        print(f"  LPIPS     {report['lpips']:8.4f}   [{report['lpips_backbone']}]")
    print(f"  {fid_name:<9} {report['rfid']:8.4f}   [{report['rfid_features']}]")
    if report["class_accuracy"] is not None:
        print(
            f"  class acc {report['class_accuracy']:8.4f}   (real images {report['real_class_accuracy']:.4f}; "
            f"{report['class_accuracy_classifier']}: the ceiling for samples decoded by this autoencoder)"
        )
    print(
        f"  encode    {report['encode_images_per_s']:8.1f} images/s, "
        f"decode {report['decode_images_per_s']:.1f} images/s "
        f"({report['device']}, {report['threads']} threads)"
    )
    print(f"  report {out_dir / 'report.json'}   side-by-side {picture}")
