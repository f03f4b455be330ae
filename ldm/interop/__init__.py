"""Pretrained weights in and out: diffusers and CompVis autoencoders, original and diffusers DiTs.

`checkpoints` reads source files and writes diffusers folders for every format; `autoencoder` maps the
diffusers and CompVis autoencoders, `dit` the original and diffusers DiTs, each format both ways (import:
theirs -> ours, export: ours -> theirs) in one place.

Imports build our module and load the source's tensors with `strict=True`, after checking the
source's keys and shapes under the source's own names (so an error names the key a user can find
in their file). Exports write a folder that diffusers' `from_pretrained` loads, and measure that
the loaded model computes our function. Nothing here unpickles: .ckpt/.pt/.bin files are read
with `torch.load(weights_only=True)`, and a file that needs more is refused with the command that
converts it to safetensors.

Key layouts, theirs -> ours:

    diffusers AutoencoderKL  encoder.down_blocks.i.resnets.j / .downsamplers.0, decoder.up_blocks.i (lowest
                             resolution first, as ours), mid_block.resnets / .attentions, to_q/to_k/to_v
    CompVis AutoencoderKL    encoder.down.i.block.j / .downsample, mid.block_1 / attn_1 / block_2, attention
                             q, k, v, proj_out as 1x1 convs, nin_shortcut; decoder.up.i is level i counted
                             from the HIGHEST resolution (up.0 runs last), i.e. our decoder.up[L-1-i]
    DiT (facebookresearch)   our names, plus a fixed `pos_embed` and `adaLN_modulation.1` (a Sequential(SiLU, Linear))
    diffusers DiT            pos_embed.proj, transformer_blocks.i.{norm1.linear, attn1.to_q/k/v/out, ff.net},
                             proj_out_1/2, and one timestep/class embedder per block (all equal)

Latent statistics: diffusers normalises latents as (z - shift_factor) * scaling_factor, or per channel
as (z - latents_mean) * scaling_factor / latents_std; our `LatentStats` is (z - mean) / std.
"""

from ldm.interop.autoencoder import (
    COMPVIS_DEFAULT,
    autoencoder_config_from_diffusers,
    diffusers_scaling_from_stats,
    export_autoencoder_to_diffusers,
    latent_stats_from_diffusers,
    load_compvis_autoencoder,
    load_diffusers_autoencoder,
)
from ldm.interop.checkpoints import ExportReport, Imported, InteropError
from ldm.interop.dit import (
    diffusion_settings_from_diffusers_scheduler,
    dit_config_from_original,
    dit_state_dict_to_original,
    export_dit_to_diffusers,
    load_diffusers_dit,
    load_original_dit,
)

__all__ = [
    "COMPVIS_DEFAULT",
    "ExportReport",
    "Imported",
    "InteropError",
    "autoencoder_config_from_diffusers",
    "diffusers_scaling_from_stats",
    "diffusion_settings_from_diffusers_scheduler",
    "dit_config_from_original",
    "dit_state_dict_to_original",
    "export_autoencoder_to_diffusers",
    "export_dit_to_diffusers",
    "latent_stats_from_diffusers",
    "load_compvis_autoencoder",
    "load_diffusers_autoencoder",
    "load_diffusers_dit",
    "load_original_dit",
]
