"""Gaussian diffusion as DiT trains and samples it (improved DDPM / ADM).

`gaussian` holds the noise schedules, the forward process, the hybrid loss
and timestep respacing; `sampling` the DDPM / DDIM samplers and
classifier-free guidance. Models are plain callables; nothing here owns
parameters.
"""
