"""What the test modules share: data markers, tiny models and stores, CLI helpers and a flow toy.

pytest loads this file before every test module, so its fixtures need no import; the plain helpers
and constants beside them are imported by name (`from conftest import needs_fmnist, cli`). Test
modules never import one another.
"""

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lightning.pytorch.callbacks import Callback

from ldm.artifacts import ArtifactStore
from ldm.config import load_config, to_dict
from ldm.data import DataConfig
from ldm.data.latents import LatentStats
from ldm.diffusion.schedules import DiffusionConfig
from ldm.models.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.models.dit import DiT, DiTConfig
from pipeline import LatentDiffusionPipeline
from stages import autoencoder, diffusion
from stages.cli import main
from stages.encode import EncodeConfig, encode

# Tests use tiny tensors: one thread avoids the oversubscription that makes small convolutions
# many times slower when several processes share the two cores of a CI machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- data

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR) and not os.environ.get("LDM_DATA"),
    reason="Fashion-MNIST missing: sudo apt-get install -y dataset-fashion-mnist (or set LDM_DATA)",
)


def fsdd_dir() -> Path | None:
    """The FSDD copy tests read: $LDM_DATA/fsdd, else ../shared/data/fsdd beside the project; None if neither."""
    candidates = [Path(os.environ["LDM_DATA"]) / "fsdd"] if os.environ.get("LDM_DATA") else []
    candidates.append(ROOT.parent / "shared" / "data" / "fsdd")
    return next((path for path in candidates if (path / "recordings").is_dir()), None)


# Looked up once, before any test's offline_data hides LDM_DATA.
FSDD_DIR = fsdd_dir()
needs_fsdd = pytest.mark.skipif(
    FSDD_DIR is None,
    reason="FSDD missing: set LDM_DATA to a folder holding fsdd/recordings, or put it in ../shared/data/fsdd",
)


@pytest.fixture
def offline_data(tmp_path, monkeypatch):
    """No LDM_DATA, an empty user cache, and no network but localhost (where tests serve their own mirrors)."""
    monkeypatch.delenv("LDM_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    real_urlopen = urllib.request.urlopen

    def localhost_only(url, *args, **kwargs):
        if not str(url).startswith("http://127.0.0.1:"):
            raise urllib.error.URLError("network disabled in tests")
        return real_urlopen(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", localhost_only)


# ----------------------------------------------------------------------------- the CLI


def cli(store, *args: str):
    """Run `ldm --store STORE ARGS` in-process; `store` is a folder (str or Path) or an ArtifactStore."""
    root = store.root if isinstance(store, ArtifactStore) else store  # a Path's own .root is "/"
    return CliRunner().invoke(main, ["--store", str(root), *map(str, args)])


def assert_one_line_failure(result, *phrases: str, last: bool = True, status: int | None = None) -> str:
    """A non-zero exit with a one-line error (click's usage lines aside), no traceback; returns that line.

    `last`: nothing follows the error (a stage's progress lines printed before it may follow it in the
    captured output, where stderr and stdout mix)."""
    assert result.exit_code != 0 if status is None else result.exit_code == status, result.output
    assert isinstance(result.exception, SystemExit), f"traceback reached the user: {result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    following = result.output.split(errors[0], 1)[1].strip()
    assert not (last and following), f"the error runs over more than one line: {result.output}"
    for phrase in phrases:
        assert phrase in errors[0], result.output
    return errors[0]


def assert_clean_failure(result, *phrases: str) -> None:
    """A non-zero exit with a message, and no traceback (click turns our errors into SystemExit)."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"traceback reached the user: {result.exception!r}"
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in result.output, result.output


# ----------------------------------------------------------------------------- tiny training runs

AUTOENCODER_QUICK = str(ROOT / "configs/fmnist/autoencoder-quick.yaml")
TINY_AUTOENCODER = [
    "model.ch=8",
    "model.num_res_blocks=1",
    "loss.perceptual.net=squeeze",
    "loss.perceptual.backbone=random",
    "loss.perceptual.weight=0.1",  # the quick preset trains without it; these runs keep the LPIPS path
    "train_subset=256",
    "trainer.batch_size=16",
    "trainer.log_every=1",
    "trainer.image_every=0",
    "trainer.progress=false",
]
TINY_DIT = [
    "model=DiT-T/2",
    "model.depth=2",
    "model.hidden_size=64",
    "model.num_heads=2",
    "trainer.batch_size=32",
    "trainer.lr=1e-3",
    "trainer.log_every=1",
    "trainer.image_every=0",
    "trainer.progress=false",
    "ema_decay=0.9",
    "preview.per_class=1",
    "preview.sampling.num_steps=2",
]


def train_process_command(store, run_dir, *overrides: str) -> list[str]:
    """The command line that trains the quick autoencoder preset, made tiny, with `overrides`, in a process of its
    own (`python -m stages.cli`, so that signals and kills reach a real training)."""
    command = [sys.executable, "-m", "stages.cli", "--store", str(store), "train", "autoencoder"]
    command += ["--config", AUTOENCODER_QUICK, "--run-dir", str(run_dir)]
    return command + [arg for item in (*TINY_AUTOENCODER, *overrides) for arg in ("--set", item)]


def train_cli(store: Path, run_dir: Path, *overrides: str, resume: bool = False, extra: tuple[str, ...] = ()):
    """Run `ldm train autoencoder` of the quick preset with TINY_AUTOENCODER and `overrides` into `run_dir`."""
    args = ["train", "autoencoder", "--config", AUTOENCODER_QUICK, "--run-dir", str(run_dir)]
    args += [arg for item in (*TINY_AUTOENCODER, *overrides) for arg in ("--set", item)]
    return cli(store, *args, *(["--resume"] if resume else []), *extra)


class CrashAt(Callback):
    """Raises at the start of batch `step`, as a killed process would stop there.

    `step` counts batches: the module's own `step` where it has one (a GAN batch takes two optimiser
    steps of Lightning's global_step), else global_step.
    """

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if getattr(module, "step", trainer.global_step) == self.step:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def store_with_cache(tmp_path_factory):
    """A store holding a briefly trained tiny autoencoder and a cache of 2,000 encoded training images."""
    root = tmp_path_factory.mktemp("stage2")
    store = ArtifactStore(root / "store")
    config = load_config(
        autoencoder.AutoencoderStageConfig,
        ROOT / "configs/fmnist/autoencoder-quick.yaml",
        [
            "model.ch=8",
            "model.latent_channels=4",
            "loss.perceptual.net=squeeze",
            "train_subset=1024",
            "trainer.max_steps=40",
            "trainer.lr=2e-3",
            "trainer.progress=false",
            "trainer.image_every=0",
            f"run_dir={root / 'ae'}",
        ],
    )
    ae = autoencoder.run(config, store)
    cache = encode(
        store, ae.ref, EncodeConfig(limit=2000, batch_size=500, shard_size=768, flips=True)
    )  # 2 views, on purpose
    return store, ae, cache


def dit_config(tmp_path, store_with_cache, *extra):
    """The quick DiT preset with TINY_DIT on the cache of `store_with_cache`, training into tmp_path/run."""
    _, _, cache = store_with_cache
    return load_config(
        diffusion.DiffusionStageConfig,
        ROOT / "configs/fmnist/diffusion-quick.yaml",
        [*TINY_DIT, f"latents={cache.ref}", f"run_dir={tmp_path / 'run'}", *extra],
    )


# ----------------------------------------------------------------------------- random weights


def randomize_(model: torch.nn.Module, seed: int = 0, only: tuple[str, ...] = ()) -> torch.nn.Module:
    """Overwrite parameters (all, or those whose name contains one of `only`) with N(0, 0.1) noise, so that no
    zero-initialised path (adaLN-Zero gates, output layers) hides a bug."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not only or any(part in name for part in only):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


# ----------------------------------------------------------------------------- a store of random models (no data)

AE = AutoencoderConfig(ch=8, ch_mult=(1, 2, 2), latent_channels=4)
DIT = DiTConfig(
    input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False
)
DIFFUSION = DiffusionConfig(
    objective="ddpm", schedule="linear", num_timesteps=1000, prediction="eps", learn_sigma=False
)
STATS = LatentStats(mean=[0.1, -0.2, 0.0, 0.3], std=[2.0, 1.5, 1.0, 0.5])


def save_autoencoder(store, seed):
    """Store a random autoencoder of config AE drawn with `seed`; return its artifact."""
    torch.manual_seed(seed)
    model = AutoencoderKL(AE)
    return store.save(
        "autoencoder",
        tensors={"weights.safetensors": model.state_dict()},
        config={"model": to_dict(AE), "data": to_dict(DataConfig())},
        metadata={"seed": seed},
    )


def save_dit(store, config, diffusion, seed, autoencoder_ref, stats=STATS):
    """Store a random DiT of `config` drawn with `seed` on the latents of `autoencoder_ref`; return its artifact."""
    torch.manual_seed(seed)
    dit = DiT(config)
    with torch.no_grad():  # a fresh adaLN-Zero DiT outputs exactly 0: give it a non-trivial function
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return store.save(
        "diffusion",
        tensors={"weights.safetensors": dit.state_dict(), "raw.safetensors": dit.state_dict()},
        config={"model": to_dict(config), "diffusion": to_dict(diffusion)},
        metadata={"autoencoder": autoencoder_ref, "latent_stats": stats.to_dict()},
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with two random autoencoders and a random DiT whose lineage names the first one; one per module."""
    store = ArtifactStore(tmp_path_factory.mktemp("random-models") / "store")
    ae = save_autoencoder(store, 0)
    save_autoencoder(store, 1)
    save_dit(store, DIT, DIFFUSION, 2, ae.ref)
    return store


@pytest.fixture(scope="module")
def pipe(store):
    """The sampling pipeline of `store`'s DiT and its lineage autoencoder."""
    return LatentDiffusionPipeline.from_artifacts("diffusion@latest", store=store)


# ----------------------------------------------------------------------------- a flow with a known flow map

# Toy: data x0 ~ N(0, TOY_SIGMA^2), noise ~ N(0, 1), path x_t = (1 - t) x0 + t noise. Then x_t ~ N(0, s_t^2) with
# s_t^2 = (1 - t)^2 TOY_SIGMA^2 + t^2, every ODE trajectory scales as s_t, and the average velocity over [r, t] is
# u(x, r, t) = x (1 - s_r / s_t) / (t - r) (at r = t: the flow velocity x s_t' / s_t).
TOY_SIGMA = 0.5


def toy_s(t):
    """s_t, the toy's standard deviation of x_t."""
    return ((1 - t) ** 2 * TOY_SIGMA**2 + t**2).sqrt()


def toy_slope(r, t):
    """u(x, r, t) / x of the toy, its r -> t limit where r = t."""
    ds = ((t - 1) * TOY_SIGMA**2 + t) / toy_s(t)  # s_t'
    gap = (t - r).clamp_min(1e-12)
    return torch.where(t - r > 1e-6, (1 - toy_s(r) / toy_s(t)) / gap, ds / toy_s(t))


def toy_average_velocity(x, t_net, y, r=None):
    """The toy's exact average velocity u(x, r, t), called as a network is (timesteps in 0..1000)."""
    t = t_net / 1000
    r = t if r is None else r / 1000
    return toy_slope(r, t).view(-1, *[1] * (x.ndim - 1)) * x
