"""pixel_vit: Transformers on individual pixels, in JAX/Flax NNX."""

import setuptools

setuptools.setup(
  name="pixel_vit",
  version="0.1.0",
  description="Pixel-token Vision Transformers (PiT): classification, MAE, diffusion.",
  packages=setuptools.find_packages(include=["pixel_vit", "pixel_vit.*"]),
  python_requires=">=3.11",
  install_requires=[
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11",
    "etils[epath]",  # checkpoint paths (local or gs://)
    "ml-collections>=1.0",
    "clu>=0.0.12",
    "absl-py",
    "numpy",
    "pillow",
    "scikit-learn",  # the bundled offline `digits` source
    "tensorflow-datasets>=4.9",
    "importlib_resources",  # tfds 4.9.10 imports it without declaring it
    "tensorflow-cpu",  # tf.data for TFDS and clu's metric writers; CPU only
    "tensorboard",  # clu.metric_writers needs it
    "safetensors",  # VAE weights (models/vae.py)
    "grain>=0.2.12",  # the streaming input path (data/stream.py)
    "array-record>=0.7",  # its ArrayRecord files (data/records.py, write_records)
    "scipy",  # FID tests' reference; sklearn needs it anyway
  ],
  extras_require={
    # No torch here: the three tasks and the tests run without it.
    "test": [
      "pytest>=8",
      "pytest-xdist",
      "ruff>=0.17,<0.18",  # tests/test_lint.py; rules move between releases
      "nbclient",  # nbclient, nbformat, ipykernel: tests/test_notebook.py
      "nbformat",
      "ipykernel",
    ],
    # The parity tests: our VAE against diffusers' AutoencoderKL, the FID
    # Inception-v3 against torch, reading .pth weights (they skip without it).
    # Install the CPU build of torch first (.ci/run does:
    # pip install torch==2.13.0), or pip pulls several GB of CUDA.
    "parity": ["torch", "diffusers"],
    "bench": ["matplotlib"],
    # The TPU compiler (libtpu, the version this jax pins): pixel_vit.compile
    # compiles a run for a TPU slice on any machine; no TPU needed.
    "tpu": ["jax[tpu]"],
  },
)
