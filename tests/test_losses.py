"""LPIPS wrapper, PatchGAN discriminator and the autoencoder loss (LPIPS + KL + adaptive GAN)."""

import hashlib
import math
import socket
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from ldm.losses import lpips as lpips_module
from ldm.losses.autoencoder import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    adaptive_weight,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.losses.lpips import MissingWeightsError, PerceptualConfig, build_lpips
from ldm.models.discriminator import DiscriminatorConfig, PatchDiscriminator, patch_grid_size, receptive_field


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions run far faster on one thread than on contended OpenMP threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# SqueezeNet is the LPIPS backbone that builds in milliseconds; VGG (the default) takes seconds.
RANDOM_SQUEEZE = PerceptualConfig(net="squeeze", backbone="random")


def images(n=2, c=1, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


class TinyDecoder(nn.Module):
    """Latents (N, 4, 16, 16) -> images (N, 1, 32, 32); `out.weight` plays the decoder's last layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.ConvTranspose2d(4, 8, 4, stride=2, padding=1)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, z):
        return self.out(torch.nn.functional.silu(self.up(z)))


class StandInPosterior:
    """A posterior with the one method the loss uses: per-sample KL of N(mean, 1) to N(0, 1)."""

    def __init__(self, mean):
        self.mean = mean

    def kl(self):
        return 0.5 * self.mean.square().flatten(1).sum(1)


def small_loss(**overrides):
    config = dict(
        perceptual=RANDOM_SQUEEZE,
        disc_enabled=True,
        disc_start=10,
        discriminator=DiscriminatorConfig(in_channels=1, ch=8, n_layers=2, norm="none"),
    )
    config.update(overrides)
    return AutoencoderLoss(AutoencoderLossConfig(**config))


def decoder_batch(seed=0):
    decoder = TinyDecoder()
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    return decoder, z, decoder(z), StandInPosterior(z)


# --- LPIPS ---------------------------------------------------------------------------------------


def test_lpips_is_zero_for_identical_images_and_positive_for_different_ones():
    lpips = build_lpips(RANDOM_SQUEEZE)
    x, y = images(3, c=3, seed=0), images(3, c=3, seed=1)
    assert torch.allclose(lpips(x, x), torch.zeros(3), atol=1e-7)
    distance = lpips(x, y)
    assert distance.shape == (3,)
    assert (distance > 1e-4).all()


def test_lpips_of_grayscale_equals_lpips_of_the_same_image_in_three_equal_channels():
    lpips = build_lpips(RANDOM_SQUEEZE)
    x, y = images(2, c=1, seed=0), images(2, c=1, seed=1)
    torch.testing.assert_close(lpips(x, y), lpips(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))


def test_lpips_gives_nonzero_gradients_to_every_decoder_parameter_and_none_to_itself():
    lpips = build_lpips(RANDOM_SQUEEZE)
    decoder, z, recon, _ = decoder_batch()
    lpips(recon, images(2)).mean().backward()
    for name, p in decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())


def test_lpips_stays_in_eval_mode_when_its_parent_is_put_in_training_mode():
    loss = small_loss()
    loss.train()
    assert loss.training and not loss.perceptual.training
    assert not any(m.training for m in loss.perceptual.modules())  # the heads' Dropout is off
    x, y = images(seed=0), images(seed=1)
    assert torch.equal(loss.perceptual(x, y), loss.perceptual(x, y))


def test_lpips_rejects_images_smaller_than_its_backbone_allows():
    lpips = build_lpips(RANDOM_SQUEEZE)
    lpips(images(size=17), images(size=17, seed=1))  # SqueezeNet's minimum
    with pytest.raises(ValueError, match="at least 17x17"):
        lpips(images(size=16), images(size=16, seed=1))


def test_random_backbone_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_lpips(RANDOM_SQUEEZE)
    assert torch.equal(torch.rand(3), expected)
    second = build_lpips(RANDOM_SQUEEZE)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    other_seed = build_lpips(PerceptualConfig(net="squeeze", backbone="random", random_seed=1))
    assert not torch.equal(first.lpips.net.slice1[0].weight, other_seed.lpips.net.slice1[0].weight)


def test_linear_heads_come_from_the_lpips_package():
    lpips = build_lpips(RANDOM_SQUEEZE)
    shipped = torch.load(lpips_module.lpips_heads_path("squeeze"), map_location="cpu", weights_only=True)
    for key, tensor in shipped.items():
        assert torch.equal(lpips.lpips.state_dict()[key], tensor), key


def test_random_backbone_is_described_as_not_standard():
    lpips = build_lpips(RANDOM_SQUEEZE)
    assert not lpips.is_standard
    assert "RANDOM backbone" in lpips.describe() and "not comparable" in lpips.describe()
    assert small_loss().perceptual_description() == lpips.describe()
    assert small_loss(perceptual=PerceptualConfig(weight=0.0)).perceptual_description().startswith("none")


def test_missing_pretrained_backbone_error_names_file_folder_url_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as error:
        build_lpips(PerceptualConfig(net="vgg", backbone="pretrained"))
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert "vgg16-397923af.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "perceptual.weights_path" in message and "perceptual.backbone: random" in message


def test_download_is_opt_in_goes_to_the_hub_cache_and_a_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    requested = []

    def fake_download(url, **kwargs):  # what torch.hub does: fetch the URL into <hub>/checkpoints/<name>
        requested.append(url)
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        fake_torchvision_file("squeeze", tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    with pytest.raises(MissingWeightsError):
        build_lpips(PerceptualConfig(net="squeeze"))  # download defaults to off
    assert requested == []
    with pytest.warns(UserWarning, match="not torchvision's"):  # the fake file's checksum differs
        build_lpips(PerceptualConfig(net="squeeze", download=True))
    assert requested == ["https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"]

    def offline(url, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "other_hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(MissingWeightsError, match="downloading .* failed .*Name or service not known"):
        build_lpips(PerceptualConfig(net="squeeze", download=True))


def test_missing_weights_path_is_named_in_the_error(tmp_path):
    missing = tmp_path / "nowhere" / "alexnet.pth"
    with pytest.raises(MissingWeightsError, match="alexnet-owt-7be5be79.pth") as error:
        build_lpips(PerceptualConfig(net="alex", weights_path=str(missing)))
    assert str(missing) in str(error.value)


def torchvision_features(net):
    """torchvision's `features` Sequential for `net`, randomly initialised."""
    if net == "squeeze":
        return torchvision.models.squeezenet1_1().features
    # VGG16's features alone: building the whole model would initialise 120M unused classifier weights.
    return torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])


def fake_torchvision_file(net, path):
    """A file laid out like torchvision's download for `net`, with random weights."""
    torch.manual_seed(0)
    if net == "squeeze":  # the whole model, classifier keys included (which LPIPS ignores)
        state = torchvision.models.squeezenet1_1().state_dict()
    else:  # VGG16's `features.*` keys only, for speed (the squeeze case covers the classifier keys)
        state = {f"features.{k}": v for k, v in torchvision_features(net).state_dict().items()}
    torch.save(state, path)
    return state


# The slice outputs of the LPIPS backbone: the deepest is torchvision's features[:end](x).
DEEPEST_FEATURE_END = {"squeeze": 13, "vgg": 30}


@pytest.mark.parametrize("net", ["squeeze", "vgg"])
def test_backbone_file_at_weights_path_is_loaded_offline_into_the_lpips_backbone(net, tmp_path, monkeypatch):
    path = tmp_path / "backbone.pth"
    state = fake_torchvision_file(net, path)

    def no_network(*args, **kwargs):
        raise AssertionError("LPIPS construction tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.warns(UserWarning, match="not torchvision's"):
        lpips = build_lpips(PerceptualConfig(net=net, weights_path=str(path)))

    # Every backbone tensor is one of the file's tensors ...
    file_tensors = [t for k, t in state.items() if k.startswith("features.")]
    backbone = list(lpips.lpips.net.state_dict().values())
    assert len(backbone) == len(file_tensors)
    assert all(any(t.shape == f.shape and torch.equal(t, f) for f in file_tensors) for t in backbone)
    # ... in the right place: the deepest LPIPS feature equals torchvision's own forward pass.
    features = torchvision_features(net)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    x = images(1, c=3, size=32)
    scaled = lpips.lpips.scaling_layer(x)
    torch.testing.assert_close(lpips.lpips.net(scaled)[-1], features[: DEEPEST_FEATURE_END[net]](scaled))
    # A file that is not torchvision's checkpoint is not the standard metric.
    assert not lpips.is_standard
    assert "not the standard LPIPS" in lpips.describe()


def test_backbone_file_with_torchvision_checksum_is_described_as_standard(tmp_path, monkeypatch):
    path = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    fake_torchvision_file("squeeze", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(lpips_module.Backbone, "sha256_prefix", property(lambda self: digest[:8]))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    path.rename(tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth")  # found in the hub cache
    lpips = build_lpips(PerceptualConfig(net="squeeze"))
    assert lpips.is_standard
    assert lpips.describe() == "LPIPS-squeeze (pretrained torchvision backbone squeezenet1_1-b8a52dc0.pth)"


# --- discriminator -------------------------------------------------------------------------------


@pytest.mark.parametrize("n_layers, side", [(1, 14), (2, 6), (3, 2)])
def test_patchgan_on_32x32_gives_a_logit_grid_of_the_documented_size(n_layers, side):
    d = PatchDiscriminator(DiscriminatorConfig(in_channels=1, ch=8, n_layers=n_layers))
    assert patch_grid_size(32, n_layers) == side
    assert d(images(2)).shape == (2, 1, side, side)


def test_patchgan_refuses_an_input_too_small_for_its_depth():
    d = PatchDiscriminator(DiscriminatorConfig(in_channels=1, ch=8, n_layers=4))
    with pytest.raises(ValueError, match="n_layers=4"):
        d(images(1, size=32))
    assert d(images(1, size=48)).shape == (1, 1, 1, 1)


@pytest.mark.parametrize("n_layers, size", [(1, 32), (2, 64)])
def test_patchgan_receptive_field_is_what_receptive_field_says(n_layers, size):
    d = PatchDiscriminator(DiscriminatorConfig(in_channels=1, ch=8, n_layers=n_layers, norm="none")).double()
    x = torch.randn(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    logits = d(x)
    centre = logits.shape[-1] // 2
    logits[0, 0, centre, centre].backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero()
    assert rows.max() - rows.min() + 1 == receptive_field(n_layers)
    assert receptive_field(3) == 70  # pix2pix's 70x70 PatchGAN


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_patchgan_init_follows_pix2pix(norm):
    torch.manual_seed(0)
    d = PatchDiscriminator(DiscriminatorConfig(in_channels=3, ch=64, n_layers=3, norm=norm))
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    big = convs[-2].weight  # 512 x 256 x 4 x 4: enough samples for a tight std estimate
    assert abs(big.std().item() - 0.02) < 5e-4 and abs(big.mean().item()) < 5e-4
    assert all(c.bias is None or torch.all(c.bias == 0) for c in convs)
    norms = [m for m in d.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert len(norms) == (0 if norm == "none" else 3)
    for m in norms:
        assert abs(m.weight.mean().item() - 1.0) < 0.01 and torch.all(m.bias == 0)


# --- autoencoder loss ----------------------------------------------------------------------------


def test_adaptive_weight_matches_gradient_norms_computed_by_hand():
    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)  # the "last layer"
    x, c = torch.randn(5, 4), torch.randn(3, 5)
    nll = (w @ x).square().sum()  # d/dw = 2 (w x) x^T
    g = (w * c).sum() + 7.0  # d/dw = c
    weight = adaptive_weight(nll, g, w)

    w64, x64, c64 = w.detach().double(), x.double(), c.double()
    nll_grad = 2 * (w64 @ x64) @ x64.T
    expected = nll_grad.norm() / (c64.norm() + 1e-4)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=0)
    assert not weight.requires_grad
    (nll + g).backward()  # the graph was retained for the real backward pass
    assert w.grad is not None


def test_adaptive_weight_is_clamped_when_the_gan_gradient_vanishes():
    w = torch.ones(4, requires_grad=True)
    nll = 10.0 * w.sum()
    g = 0.0 * w.sum()
    assert adaptive_weight(nll, g, w).item() == 1e4


def test_hinge_and_vanilla_discriminator_losses_match_their_formulas():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2.5)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    softplus = lambda v: math.log1p(math.exp(v))
    expected = 0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_applies_the_configured_loss_to_the_discriminator_logits(kind):
    loss = small_loss(disc_loss=kind)
    x, recon = images(seed=0), images(seed=1)
    d_loss, logs = loss.discriminator_loss(x, recon, global_step=10)
    formula = hinge_d_loss if kind == "hinge" else vanilla_d_loss
    with torch.no_grad():
        expected = formula(loss.discriminator(x), loss.discriminator(recon))
    torch.testing.assert_close(d_loss.detach(), expected)
    torch.testing.assert_close(logs["logits_real"], loss.discriminator(x).mean().detach())
    assert logs["disc_factor"].item() == 1.0


def test_discriminator_loss_never_reaches_the_autoencoder_graph():
    loss = small_loss()
    decoder, z, recon, _ = decoder_batch()
    d_loss, _ = loss.discriminator_loss(images(), recon, global_step=10)
    d_loss.backward()
    assert all(p.grad is None for p in decoder.parameters()) and z.grad is None
    # Every D parameter gets a gradient (the last bias's is exactly 0 for the hinge loss while all
    # logits are inside the margin: -1/2 from the real batch and +1/2 from the fake one).
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert sum(p.grad.abs().sum() for p in loss.discriminator.parameters()) > 0


def test_gan_terms_are_zero_before_disc_start():
    loss = small_loss(disc_start=10)
    decoder, z, recon, posterior = decoder_batch()
    x = images()
    total, logs = loss.generator_loss(x, recon, posterior, global_step=9, last_layer=decoder.out.weight)
    assert logs["disc_factor"].item() == 0 and logs["g"].item() == 0 and logs["d_weight"].item() == 0
    torch.testing.assert_close(total.detach(), logs["nll"] + loss.config.kl_weight * logs["kl"])
    d_loss, d_logs = loss.discriminator_loss(x, recon, global_step=9)
    assert d_loss.item() == 0 and d_logs["disc_factor"].item() == 0
    assert loss.discriminator_loss(x, recon, global_step=10)[0].item() > 0


def test_discriminator_pretrains_alone_before_the_gan_term_reaches_the_autoencoder():
    loss = small_loss(disc_start=10, disc_pretrain_steps=5)
    decoder, z, recon, posterior = decoder_batch()
    x = images()
    assert loss.discriminator_loss(x, recon, global_step=10)[0].item() > 0  # D learns from disc_start ...
    for step in (10, 14):  # ... while the autoencoder's loss has no GAN term yet
        total, logs = loss.generator_loss(x, recon, posterior, global_step=step, last_layer=decoder.out.weight)
        assert logs["disc_factor"].item() == 0 and logs["g"].item() == 0
        torch.testing.assert_close(total.detach(), logs["nll"] + loss.config.kl_weight * logs["kl"])
    _, logs = loss.generator_loss(x, recon, posterior, global_step=15, last_layer=decoder.out.weight)
    assert logs["disc_factor"].item() == 1.0 and logs["d_weight"].item() > 0
    with pytest.raises(ValueError, match="disc_pretrain_steps"):
        AutoencoderLossConfig(disc_pretrain_steps=-1)


def test_generator_loss_sums_pixels_and_broadcast_lpips_per_sample_and_averages_over_the_batch():
    loss = small_loss(disc_enabled=False, kl_weight=1e-3)
    decoder, z, recon, posterior = decoder_batch()
    x = images()
    total, logs = loss.generator_loss(x, recon, posterior, global_step=0)
    n, c, h, w = x.shape
    lpips = loss.perceptual(x, recon)
    nll = ((x - recon).abs().sum() + c * h * w * lpips.sum()) / n
    kl = 0.5 * z.square().sum() / n
    torch.testing.assert_close(total, nll + 1e-3 * kl)
    torch.testing.assert_close(logs["rec"], (x - recon).abs().mean().detach())
    torch.testing.assert_close(logs["lpips"], lpips.mean().detach())


def test_l2_reconstruction_and_learned_logvar_follow_the_gaussian_nll():
    loss = small_loss(disc_enabled=False, rec_loss="l2", perceptual=PerceptualConfig(weight=0.0), learn_logvar=True)
    assert loss.perceptual is None  # weight 0: LPIPS is not even built
    assert loss.generator_parameters() == [loss.logvar]
    with torch.no_grad():
        loss.logvar.fill_(0.3)
    _, _, recon, posterior = decoder_batch()
    x = images()
    total, logs = loss.generator_loss(x, recon, posterior, global_step=0)
    expected_nll = ((x - recon).square() / math.exp(0.3) + 0.3).sum() / 2
    torch.testing.assert_close(logs["nll"], expected_nll.detach())
    total.backward()
    assert loss.logvar.grad is not None


def test_generator_loss_adds_the_adaptively_weighted_gan_term_once_active():
    loss = small_loss(disc_start=10, disc_weight=0.5, disc_factor=0.8)
    for p in loss.discriminator.parameters():  # larger than pix2pix's init, so the weight is not clamped
        nn.init.normal_(p, 0.0, 0.5)
    decoder, z, recon, posterior = decoder_batch()
    x = images()
    total, logs = loss.generator_loss(x, recon, posterior, global_step=10, last_layer=decoder.out.weight)

    # Recompute every piece independently of generator_loss.
    lpips = loss.perceptual(x, recon)
    nll = ((x - recon).abs().sum() + x[0].numel() * lpips.sum()) / 2
    g = -loss.discriminator(recon).mean()
    nll_grad = torch.autograd.grad(nll, decoder.out.weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, decoder.out.weight, retain_graph=True)[0]
    d_weight = 0.5 * nll_grad.norm() / (g_grad.norm() + 1e-4)
    expected = nll + loss.config.kl_weight * logs["kl"] + d_weight * 0.8 * g
    assert 1e-3 < d_weight < 0.5 * 1e4
    torch.testing.assert_close(logs["d_weight"], d_weight.detach())
    torch.testing.assert_close(total, expected)
    assert logs["disc_factor"].item() == pytest.approx(0.8)


def test_generator_loss_trains_the_decoder_and_leaves_the_discriminator_gradients_empty():
    loss = small_loss()
    decoder, z, recon, posterior = decoder_batch()
    total, _ = loss.generator_loss(images(), recon, posterior, global_step=10, last_layer=decoder.out.weight)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert all(p.requires_grad for p in loss.discriminator.parameters())  # unfrozen again for its own step


def test_generator_loss_without_autograd_leaves_out_the_gan_term():
    loss = small_loss()
    decoder, z, recon, posterior = decoder_batch()
    with torch.no_grad():
        total, logs = loss.generator_loss(images(), recon, posterior, global_step=10)
    assert logs["d_weight"].item() == 0 and logs["g"].item() != 0
    torch.testing.assert_close(total, logs["nll"] + loss.config.kl_weight * logs["kl"])


def test_generator_loss_needs_the_last_layer_once_the_gan_is_active():
    loss = small_loss()
    _, _, recon, posterior = decoder_batch()
    with pytest.raises(ValueError, match="last_layer"):
        loss.generator_loss(images(), recon, posterior, global_step=10)
