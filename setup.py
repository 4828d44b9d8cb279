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
        "scipy",  # FID tests' reference; sklearn needs it anyway
    ],
    extras_require={
        # torch + diffusers: the VAE is tested against diffusers' AutoencoderKL.
        # Install the CPU build of torch first (.ci/run does) or pip pulls CUDA.
        "test": ["pytest>=8", "pytest-xdist", "torch", "diffusers",
                 "nbclient", "nbformat", "ipykernel"],  # tests/test_notebook.py
        "bench": ["matplotlib"],
    },
)
