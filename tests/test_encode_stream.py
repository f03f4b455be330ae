"""Streamed encoding: the shards and statistics of encoding the whole cache at once, in about one shard of memory."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.artifacts import ArtifactStore
from ldm.config import to_dict
from ldm.data import DataConfig, build_dataset, iterate_images
from ldm.data.latents import LatentStatsAccumulator, measure_stats
from ldm.loading import load_autoencoder
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from stages.encode import EncodeConfig, encode

ROOT = Path(__file__).resolve().parent.parent
# 32x32 grayscale -> 4x16x16 latents (f = 2): a random, untrained autoencoder that encodes thousands of images a second.
TINY_F2 = AutoencoderConfig(
    in_channels=1,
    resolution=32,
    ch=4,
    ch_mult=(1, 1),
    num_res_blocks=1,
    attn_at_lowest=False,
    latent_channels=4,
    norm_groups=1,
)


def image_folder(root: Path, count: int, classes: int = 4) -> DataConfig:
    """Write `count` random 32x32 grayscale PNGs, dealt round-robin into `classes` class folders."""
    pixels = np.random.default_rng(0).integers(0, 256, (count, 32, 32), dtype=np.uint8)
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True)
    for i in range(count):
        Image.fromarray(pixels[i]).save(root / f"class{i % classes}" / f"{i:05d}.png")
    return DataConfig(name="folder", path=str(root), resolution=32, channels=1)


def store_with_autoencoder(root: Path, data: DataConfig):
    """A store holding a random TINY_F2 autoencoder (no training: encoding only needs its weights)."""
    store = ArtifactStore(root)
    torch.manual_seed(0)
    autoencoder = store.save(
        "autoencoder",
        tensors={"weights.safetensors": AutoencoderKL(TINY_F2).state_dict()},
        config={"model": to_dict(TINY_F2), "data": to_dict(data)},
    )
    return store, autoencoder


@torch.no_grad()
def encode_in_memory(autoencoder, data: DataConfig, batch_size: int, shard_size: int) -> dict[str, dict]:
    """The shards the encoder wrote before it streamed: every batch and its flip encoded, concatenated, then sliced."""
    model = load_autoencoder(autoencoder)
    means, stds, labels = [], [], []
    for images, batch_labels in iterate_images(build_dataset(data, "train"), batch_size):
        posterior = model.encode(torch.cat([images, images.flip(-1)]))
        means.append(posterior.mean.float().unflatten(0, (2, -1)).transpose(0, 1))  # (B, 2, C, h, w)
        stds.append(posterior.std.float().unflatten(0, (2, -1)).transpose(0, 1))
        labels.append(batch_labels)
    mean, std, label = torch.cat(means), torch.cat(stds), torch.cat(labels)
    return {
        f"shard-{i // shard_size:05d}.safetensors": {
            "mean": mean[i : i + shard_size],
            "std": std[i : i + shard_size],
            "labels": label[i : i + shard_size],
        }
        for i in range(0, len(label), shard_size)
    }


def two_pass_stats(mean: torch.Tensor, std: torch.Tensor, mode: str) -> tuple[list[float], list[float]]:
    """E[z] and sqrt(E[std^2] + Var[mean]) of the whole cache in memory: the mean, then the deviations from it."""
    channels = mean.shape[2]
    means = mean.double().transpose(0, 2).reshape(channels, -1)  # (C, N*V*h*w)
    variances = std.double().square().transpose(0, 2).reshape(channels, -1)
    if mode == "global":
        means, variances = means.reshape(1, -1), variances.reshape(1, -1)
    center = means.mean(1, keepdim=True)
    total_var = variances.mean(1) + (means - center).square().mean(1)
    repeat = channels if mode == "global" else 1
    return center.squeeze(1).tolist() * repeat, total_var.sqrt().tolist() * repeat


# --------------------------------------------------------------------------------------------
# The shards and the statistics
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_store(tmp_path_factory):
    """A store with a random TINY_F2 autoencoder, and its folder of 600 images in 4 classes."""
    root = tmp_path_factory.mktemp("encode_stream")
    data = image_folder(root / "images", 600)
    store, autoencoder = store_with_autoencoder(root / "store", data)
    return store, autoencoder, data


@pytest.mark.parametrize("batch_size, shard_size", [(64, 250), (100, 45)])  # batches straddle shards / fill several
def test_streamed_shards_equal_the_in_memory_encoders_tensor_by_tensor(folder_store, batch_size, shard_size):
    store, autoencoder, data = folder_store
    artifact = encode(store, autoencoder.ref, EncodeConfig(batch_size=batch_size, shard_size=shard_size), data)
    expected = encode_in_memory(autoencoder, data, batch_size, shard_size)
    assert sorted(n for n in artifact.manifest["files"] if n.startswith("shard-")) == sorted(expected)
    assert len(expected[max(expected)]["labels"]) == 600 % shard_size  # the last shard is partial
    for name, tensors in expected.items():
        stored = artifact.load_tensors(name)
        assert stored.keys() == tensors.keys()
        for key in tensors:
            assert stored[key].dtype == tensors[key].dtype and torch.equal(stored[key], tensors[key]), (name, key)
    manifest = artifact.manifest
    assert manifest["images"] == 600 and manifest["views"] == 2 and manifest["num_classes"] == 4
    assert manifest["latent_shape"] == [4, 16, 16]


def test_streamed_statistics_equal_those_of_the_whole_cache(folder_store):
    store, autoencoder, data = folder_store
    artifact = encode(store, autoencoder.ref, EncodeConfig(batch_size=64, shard_size=250, stats="global"), data)
    shards = encode_in_memory(autoencoder, data, 64, 250).values()
    mean, std = torch.cat([s["mean"] for s in shards]), torch.cat([s["std"] for s in shards])  # (600, 2, 4, 16, 16)
    for mode in ("channel", "global"):
        stored = artifact.manifest["latent_stats_both"][mode]
        whole = measure_stats(mean, std, mode)
        np.testing.assert_allclose(stored["mean"], whole.mean, rtol=1e-10, atol=0)
        np.testing.assert_allclose(stored["std"], whole.std, rtol=1e-10, atol=0)
        reference_mean, reference_std = two_pass_stats(mean, std, mode)
        np.testing.assert_allclose(stored["mean"], reference_mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(stored["std"], reference_std, rtol=1e-12, atol=0)
    assert artifact.manifest["latent_stats"] == artifact.manifest["latent_stats_both"]["global"]


def test_accumulated_statistics_do_not_depend_on_how_the_cache_is_batched():
    generator = torch.Generator().manual_seed(0)
    # Means far from zero with a small spread: E[x^2] - E[x]^2 would cancel away most digits here.
    mean = 1000 + 0.01 * torch.randn(1000, 2, 3, 4, 4, generator=generator, dtype=torch.float64)
    std = torch.rand(1000, 2, 3, 4, 4, generator=generator, dtype=torch.float64)
    for sizes in ([1000], [500, 500], [7, 300, 1, 0, 692], [256, 256, 256, 232]):
        accumulator = LatentStatsAccumulator()
        for batch_mean, batch_std in zip(mean.split(sizes), std.split(sizes)):
            accumulator.update(batch_mean, batch_std)
        for mode in ("channel", "global"):
            assert accumulator.stats(mode) == measure_stats(mean, std, mode), (sizes, mode)  # to the last bit
    for mode in ("channel", "global"):
        stats, (reference_mean, reference_std) = measure_stats(mean, std, mode), two_pass_stats(mean, std, mode)
        np.testing.assert_allclose(stats.mean, reference_mean, rtol=1e-12, atol=0)
        np.testing.assert_allclose(stats.std, reference_std, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# The artifact writer
# --------------------------------------------------------------------------------------------


def test_an_artifact_written_file_by_file_is_the_artifact_saved_at_once(tmp_path):
    store = ArtifactStore(tmp_path)
    files = {f"shard-{i:05d}.safetensors": {"mean": torch.full((3, 2), float(i))} for i in range(3)}
    saved = store.save("latents", tensors=files, config={"a": 1}, metadata={"images": 9})
    with store.writer("latents") as writer:
        for name, tensors in files.items():
            writer.write_tensors(name, tensors)
        written = writer.commit(config={"a": 1}, metadata={"images": 9})
    assert written.version == saved.version and written.path == saved.path  # the stored copy, returned as is
    assert [a.ref for a in store.list("latents")] == [saved.ref]


def test_a_writer_left_by_an_exception_leaves_nothing_in_the_store(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with store.writer("latents") as writer:
            writer.write_tensors("shard-00000.safetensors", {"mean": torch.zeros(2)})
            raise KeyboardInterrupt
    assert store.list() == [] and list((tmp_path / "latents").iterdir()) == []


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------

PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from ldm.artifacts import ArtifactStore
    from ldm.data import DataConfig
    from stages.encode import EncodeConfig, encode

    def status_mb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB

    store, autoencoder, folder, shard_size = ArtifactStore(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    data = DataConfig(name="folder", path=folder, resolution=32, channels=1)
    # A small encode first, so the code, kernels and libraries every encode touches are resident before the baseline.
    encode(store, autoencoder, EncodeConfig(limit=64, batch_size=16, shard_size=shard_size), data)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = status_mb("VmRSS")
    artifact = encode(store, autoencoder, EncodeConfig(batch_size=16, shard_size=shard_size), data)
    print(json.dumps({"before_mb": before, "peak_mb": status_mb("VmHWM"), "ref": artifact.ref}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset and read peak RSS")
def test_peak_memory_of_encoding_stays_near_one_shard_for_a_cache_many_shards_large(tmp_path):
    data = image_folder(tmp_path / "images", 8000)
    store, autoencoder = store_with_autoencoder(tmp_path / "store", data)
    script = tmp_path / "peak_memory.py"
    script.write_text(PEAK_MEMORY_SCRIPT)
    shard_size = 256  # 4 MiB of float32 mean and std per shard
    result = subprocess.run(
        [sys.executable, str(script), str(store.root), autoencoder.ref, data.path, str(shard_size)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    cache = store.load(measured["ref"], stage="latents")
    cache_mb = sum(f["bytes"] for n, f in cache.manifest["files"].items() if n.startswith("shard-")) / 2**20
    shard_mb = cache.manifest["files"]["shard-00000.safetensors"]["bytes"] / 2**20
    growth_mb = measured["peak_mb"] - measured["before_mb"]
    # The shard and its serialised copy, and 12 MiB for the rest, whatever the data's size: one batch of 16
    # through the encoder (its convolutions' im2col buffers), a block of statistics. Measured: 5-11 MiB in all.
    bound_mb = 2 * shard_mb + 12
    assert cache_mb > 5 * bound_mb  # else the test could not tell streaming from holding the cache
    assert growth_mb < bound_mb, (
        f"peak RSS grew {growth_mb:.0f} MiB encoding a {cache_mb:.0f} MiB cache of {shard_mb:.1f} MiB shards"
    )
