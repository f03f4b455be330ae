"""The DiT over space-time latents: 3-D patches, 3-D sin-cos positions, full and factorised attention."""

import itertools
import math

import pytest
import torch

from conftest import randomize_
from ldm.interop import InteropError
from ldm.interop.dit import dit_state_dict_to_diffusers
from ldm.models.dit import DiT, DiTBlock, DiTConfig, merge_axis, patchify, sincos_pos_embed, split_axis, unpatchify


def clip_config(**overrides) -> DiTConfig:
    """A 2-block DiT on clips of 4 latent frames of 4x4x3, 2 frames x 2x2 per token: 2 x 2 x 2 tokens."""
    fields = dict(spatial_dims=3, frames=4, time_patch_size=2, input_size=4, patch_size=2, in_channels=3)
    fields.update(depth=2, hidden_size=48, num_heads=4, num_classes=5, learn_sigma=False)
    return DiTConfig(**{**fields, **overrides})


def test_3d_patchify_cuts_time_and_space_blocks_in_row_major_order_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 4, 6, 6)  # (N, C, F, H, W)
    tokens = patchify(x, (2, 3, 3))
    assert tokens.shape == (2, 2 * 2 * 2, 2 * 3 * 3 * 3)
    # Slow reference: token (f, h, w) holds the block's values offset-major, channels last.
    for n, f, h, w in [(0, 0, 0, 0), (1, 1, 0, 1), (0, 1, 1, 1)]:
        block = x[n, :, 2 * f : 2 * f + 2, 3 * h : 3 * h + 3, 3 * w : 3 * w + 3]  # (C, 2, 3, 3)
        torch.testing.assert_close(tokens[n, f * 4 + h * 2 + w], block.permute(1, 2, 3, 0).reshape(-1))
    assert torch.equal(unpatchify(tokens, (2, 3, 3), (2, 2, 2)), x)
    assert torch.equal(patchify(x, (1, 2, 2)), patchify(x.flatten(1, 2).unflatten(1, (3, 4)), (1, 2, 2)))


def test_3d_sincos_positions_give_each_axis_its_own_channels():
    grid = (2, 3, 4)
    table = sincos_pos_embed(48, grid)  # (24, 48): width, height, then frame channels, 16 each
    omega = 1.0 / 10000.0 ** (torch.arange(8, dtype=torch.float64) / 8)
    for index, (f, h, w) in enumerate(itertools.product(*map(range, grid))):
        parts = [torch.cat([torch.sin(pos * omega), torch.cos(pos * omega)]) for pos in (w, h, f)]
        torch.testing.assert_close(table[index], torch.cat(parts).float())


@pytest.mark.parametrize("attention", ["full", "factorised"])
def test_a_clip_dit_maps_clips_to_clips_and_learns(attention):
    torch.manual_seed(0)
    model = DiT(clip_config(attention=attention))
    x, t, y = torch.randn(3, 3, 4, 4, 4), torch.rand(3) * 999, torch.tensor([0, 4, 5])
    assert model(x, t, y).shape == (3, 3, 4, 4, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = torch.randn(3, 3, 4, 4, 4)
    losses = []
    for _ in range(30):
        loss = (model(x, t, y) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(ValueError, match=r"expected latents of shape \(N, 3, 4, 4, 4\)"):
        model(torch.randn(1, 3, 2, 4, 4), t[:1], y[:1])


def test_factorised_blocks_mix_tokens_only_within_a_frame_or_only_across_frames():
    config = clip_config(frames=6, time_patch_size=1, attention="factorised")  # 6 frames x 2x2 positions
    tokens = torch.randn(2, 24, 48)
    for axis in ("space", "time", "all"):
        assert torch.equal(merge_axis(split_axis(tokens, axis, 6), axis, 6, 2), tokens)
    c_act = torch.randn(2, 48)
    for axis, touched in (("space", lambda f, s: f == 1), ("time", lambda f, s: s == 2), ("all", lambda f, s: True)):
        block = randomize_(DiTBlock(config, axis)).eval()
        moved = tokens.clone()
        moved[:, 1 * 4 + 2] += 1.0  # frame 1, spatial position 2
        with torch.no_grad():
            change = (block(moved.clone(), c_act) - block(tokens.clone(), c_act)).abs().amax(dim=(0, 2))  # (24,)
        for index in range(24):
            frame, position = divmod(index, 4)
            assert bool(change[index] > 0) == touched(frame, position), (axis, frame, position)


def test_one_dit_path_a_one_frame_clip_model_computes_the_image_model():
    image = randomize_(DiT(DiTConfig(input_size=4, patch_size=2, in_channels=3, depth=2, hidden_size=48,
                                     num_heads=4, num_classes=5, learn_sigma=False)))  # fmt: skip
    clip = DiT(clip_config(frames=1, time_patch_size=1))
    state = image.state_dict()
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"].unsqueeze(2)  # Conv2d -> Conv3d of depth 1
    clip.load_state_dict(state)
    clip.pos_embed.copy_(image.pos_embed)  # the one thing that differs: three axes share the channels, not two
    image.eval(), clip.eval()  # no label dropout
    x, t, y = torch.randn(2, 3, 4, 4), torch.tensor([10.0, 700.0]), torch.tensor([1, 5])
    with torch.no_grad():
        torch.testing.assert_close(clip(x.unsqueeze(2), t, y)[:, :, 0], image(x, t, y), rtol=1e-5, atol=1e-5)


def test_clip_settings_are_checked():
    for overrides, message in (
        ({"frames": 5}, "not divisible by time_patch_size"),
        ({"frames": 0}, "for spatial_dims 3 alone"),
        ({"attention": "axial"}, "'full' or 'factorised'"),
        ({"attention": "factorised", "pos_embed": "rope"}, "pos_embed sincos"),
        ({"hidden_size": 64}, "multiple of 6"),
    ):
        with pytest.raises(ValueError, match=message):
            clip_config(**overrides)
    with pytest.raises(ValueError, match="for spatial_dims 3 alone"):
        DiTConfig(frames=4)
    with pytest.raises(ValueError, match="needs spatial_dims 3"):
        DiTConfig(attention="factorised")
    assert math.prod(clip_config().grid_shape) == clip_config().num_patches == 8
    model = DiT(clip_config())
    with pytest.raises(InteropError, match="takes 2-D latents"):
        dit_state_dict_to_diffusers(model.state_dict(), model.config)
