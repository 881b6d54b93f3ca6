"""Models: DiT (image/video, base/super-resolution), text encoders, autoencoders, discriminator.

Plain single-device PyTorch; distribution is applied from outside (trainer/parallel.py).
Heavy libraries (transformers, open_clip, diffusers) are imported when a builder needs them.
Import from the modules (`trainer.models.dit`, `.presets`, `.text`, `.autoencoder`,
`.discriminator`, `.layers`): the package imports nothing itself, so the run config can read
the preset table (`trainer.models.presets`) without building a model.
"""
