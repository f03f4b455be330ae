"""Sampling input: the pipeline and the CLI refuse bad steps, guidance, strength, images and masks, naming the fix."""

import pytest
import torch

from conftest import DIFFUSION, DIT, assert_clean_failure, cli
from ldm.generation import SamplingSettings, sample_latents
from ldm.models.dit import DiT

# ---- sampling options -----------------------------------------------------------------------


def test_pipeline_refuses_zero_steps(pipe):
    with pytest.raises(ValueError, match=r"num_steps \(--steps\) must be an integer >= 1, got 0"):
        pipe.sample([1, 2], num_steps=0)


def test_sample_latents_refuses_zero_steps_so_every_caller_does():
    model = DiT(DIT).eval()  # training previews call sample_latents directly
    with pytest.raises(ValueError, match=r"num_steps .* >= 1, got 0"):
        sample_latents(model, DIFFUSION, torch.tensor([0]), SamplingSettings(num_steps=0))


def test_sample_command_refuses_zero_steps_before_loading_a_model(tmp_path, store):
    result = cli(
        store, "sample", "--model", "diffusion@no-such-version", "--steps", "0", "--out", str(tmp_path / "out")
    )
    assert_clean_failure(result, "--steps", "got 0")
    assert not (tmp_path / "out").exists()


def test_eval_samples_command_refuses_zero_steps_before_loading_a_model(tmp_path, store):
    result = cli(
        store, "eval", "samples", "--model", "diffusion@no-such-version", "--steps", "0", "--out", str(tmp_path)
    )
    assert_clean_failure(result, "--steps", "got 0")


def test_pipeline_refuses_negative_guidance(pipe):
    with pytest.raises(ValueError, match=r"guidance_scale \(--cfg\) must be a finite number >= 0 .*got -1"):
        pipe.sample([1], num_steps=2, guidance_scale=-1.0)
    with pytest.raises(ValueError, match=r"guidance_scale .* got nan"):
        pipe.sample([1], num_steps=2, guidance_scale=float("nan"))


def test_guidance_zero_is_the_unconditional_model(pipe):
    images, latents = pipe.sample([1, 2], num_steps=2, guidance_scale=0.0, seed=3, return_latents=True)
    assert images.shape == (2, 1, 32, 32)
    # uncond + 0 (cond - uncond): the model given the null label, whatever class was asked for
    null = torch.full((2,), pipe.model.null_class)
    unconditional = sample_latents(
        pipe.model, pipe.diffusion, null, pipe.settings(num_steps=2, guidance_scale=1.0, seed=3)
    )
    torch.testing.assert_close(
        latents, unconditional, rtol=1e-4, atol=1e-5
    )  # round-off: a batch of 2N against one of N
    _, conditional = pipe.sample([1, 2], num_steps=2, guidance_scale=1.0, seed=3, return_latents=True)
    assert not torch.allclose(conditional, unconditional, atol=1e-3)  # the labels matter to this model


def test_sample_command_refuses_negative_cfg_and_guide_scale(tmp_path, store):
    assert_clean_failure(cli(store, "sample", "--cfg", "-2", "--out", str(tmp_path / "a")), "--cfg", "got -2")
    assert_clean_failure(
        cli(store, "sample", "--guide-scale", "-1", "--out", str(tmp_path / "b")), "--guide-scale", "got -1"
    )


def test_img2img_refuses_a_strength_outside_zero_one(pipe):
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\].*got 1.5"):
        pipe.img2img(torch.zeros(1, 1, 32, 32), strength=1.5, class_labels=[0], num_steps=2)


def test_pipeline_refuses_a_reversed_guidance_interval(pipe):
    with pytest.raises(ValueError, match=r"reversed.*--cfg-interval 100 500"):
        pipe.sample([1], num_steps=2, guidance_scale=2.0, guidance_interval=(500, 100))


# ---- images and masks -----------------------------------------------------------------------


def test_img2img_refuses_images_in_0_255_naming_the_range_and_the_fix(pipe):
    images = torch.zeros(2, 1, 32, 32)
    images[0, 0, 0, 0] = 255.0
    with pytest.raises(ValueError, match=r"images must be in \[-1, 1\].*got values in \[0, 255\].*x / 127.5 - 1"):
        pipe.img2img(images, strength=0.5, class_labels=[0, 1], num_steps=2)


def test_encode_refuses_images_outside_minus_one_one(pipe):
    with pytest.raises(ValueError, match=r"got values in \[-3, 0\]: rescale them into \[-1, 1\]"):
        pipe.encode(torch.linspace(-3, 0, 1024).view(1, 1, 32, 32))


def test_encode_refuses_non_finite_images(pipe):
    images = torch.zeros(1, 1, 32, 32)
    images[0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite values in images"):
        pipe.encode(images)


def test_inpaint_refuses_images_in_0_255(pipe):
    images = torch.full((1, 1, 32, 32), 200.0)
    with pytest.raises(ValueError, match=r"got values in \[200, 200\].*x / 127.5 - 1"):
        pipe.inpaint(images, torch.ones(1, 1, 32, 32), [0], num_steps=2)


def test_inpaint_refuses_a_mask_outside_zero_one_naming_the_range(pipe):
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 255.0
    with pytest.raises(ValueError, match=r"mask must be in \[0, 1\].*got values in \[0, 255\].*x / 255"):
        pipe.inpaint(torch.zeros(1, 1, 32, 32), mask, [0], num_steps=2)
    with pytest.raises(ValueError, match=r"mask must be in \[0, 1\].*got values in \[-1, 1\]"):
        pipe.inpaint(torch.zeros(1, 1, 32, 32), mask.clamp(max=1) * 2 - 1, [0], num_steps=2)


def test_inputs_off_by_float_round_off_are_accepted_and_the_result_stays_in_range(pipe):
    images = torch.linspace(-1.0005, 1.0005, 1024).view(1, 1, 32, 32)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 16:] = 1.0005
    out = pipe.inpaint(images, mask, [0], num_steps=2)
    assert out.min() >= -1 and out.max() <= 1
