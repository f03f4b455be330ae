"""ldm: a staged latent-diffusion system (KL autoencoder, Diffusion Transformer, samplers)."""

__version__ = "0.1.0"
