r"""Class-conditional diffusion with a DiT on pixel tokens (PiT) or patches.

Defaults: the paper's DiT study, PiT-L/1 on ImageNet 256x256 as 32x32x4
Stable-Diffusion VAE latents (1,024 tokens, one per latent pixel), DiT's
recipe (AdamW 1e-4, batch 256, EMA 0.9999, learned sigma, 1000-step linear
schedule, label dropout 0.1), FID with 250 DDPM steps and guidance 1.5.
Arguments (comma-separated after the colon):

  variant=L/1       SIZE/PATCH (S, B, L, XL); L/2 is the DiT-L/2 baseline
  dataset=imagenet256_latents   imagenet256_latents | cifar10 (pixel space) |
                    digits | tfds:NAME | npz:PATH (uint8 pixels or float latents)
  classifier=DIR    FID / accuracy-on-samples with the project's own classifier
                    (a configs/cls_pixel.py run on the same data)
  quick             minutes on a 2-core CPU, offline: mu/1 on 8x8 digits
  posemb=, swaps=, swap_distance=   the locality ablations (posemb: sincos2d |
                    learn); samples are un-permuted before pictures and FID

  python -m pixel_vit.main --config=configs/dit_pixel.py:quick --workdir=/tmp/dit
  python -m pixel_vit.sample --config=configs/dit_pixel.py:quick,classifier=/tmp/cls \
      --workdir=/tmp/dit --num_samples=1000

Latent data: python -m pixel_vit.encode_latents (see README); decoded
pictures need --config.vae.weights=PATH/diffusion_pytorch_model.safetensors.
"""

import ml_collections

from pixel_vit import configuration


def get_config(arg=None):
  args = configuration.parse_arg(
    arg,
    variant="L/1",
    dataset="imagenet256_latents",
    classifier="",
    quick=False,
    **configuration.LOCALITY_ARGS,
  )
  dataset = "digits" if args.quick and args.dataset == "imagenet256_latents" else args.dataset
  config = configuration.base_config("diffusion", dataset, quick=False)

  config.model = ml_collections.ConfigDict(
    dict(
      variant=args.variant,
      posemb="sincos2d",
      learn_sigma=True,
      class_dropout=0.1,
      dtype="float32",
      attention="auto",
      scan=True,
      remat="auto",
    )
  )
  config.diffusion = ml_collections.ConfigDict(dict(schedule="linear", num_timesteps=1000))
  config.sample = ml_collections.ConfigDict(
    dict(
      sampler="ddpm",
      steps="250",
      eta=0.0,
      cfg_scale=1.5,  # DiT's FID setting
      grid_cfg_scale=4.0,  # DiT's setting for pictures
      # DiT's sample.py classes; rows of the grid, the same noise every eval.
      grid_labels=(207, 360, 387, 974, 88, 979, 417, 279),
      grid_columns=8,
      seed=0,
    )
  )
  config.fid = ml_collections.ConfigDict(
    dict(
      num_samples=0,  # per evaluation during training; pixel_vit.sample for the 50K
      features="",
      reference="",
      reference_examples=50_000,
      batch_size=256,
    )
  )
  config.vae = ml_collections.ConfigDict(dict(weights=""))

  config.batch_size = 256
  config.eval_batch_size = 256
  config.total_steps = 400_000
  config.total_epochs = 0.0
  config.optimizer = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      end_lr=1e-4,
      b1=0.9,
      b2=0.999,
      weight_decay=0.0,
      grad_clip=0.0,
      warmup_steps=0,
      ema_decay=0.9999,
    )
  )
  # Pixel data: [0, 255] -> [-1, 1] and horizontal flips; latents pass unchanged.
  config.augment = configuration.default_augment_config()
  config.augment.crop = False
  config.augment.label_smoothing = 0.0
  config.augment.mixup_alpha = 0.0
  config.augment.cutmix_alpha = 0.0

  config.log_every = 100
  config.eval_every = 10_000
  config.checkpoint_every = 10_000

  if dataset != "imagenet256_latents":
    config.sample.grid_labels = ()  # the first (up to) 10 classes
  if dataset == "cifar10":  # the pixel-space setting: 32x32x3, 1,024 pixel tokens
    config.eval_batch_size = 250
  if args.classifier:
    config.fid.features = f"classifier:{args.classifier}"
    config.fid.num_samples = 10_000
    config.fid.reference_examples = 10_000

  if args.quick:  # offline, minutes on 2 CPU cores
    config.model.variant = args.variant if args.variant != "L/1" else "mu/1"
    config.model.scan = False
    config.model.remat = "none"
    config.batch_size = 128
    config.eval_batch_size = 360
    config.total_steps = 3000
    config.optimizer.lr = 1e-3
    config.optimizer.end_lr = 1e-5
    config.optimizer.warmup_steps = 100
    # A short run moves fast: 0.999 lags ~1,000 steps behind and its samples
    # are classified correctly half as often as the raw weights' (51% vs 77%).
    config.optimizer.ema_decay = 0.995
    config.augment.flip = False  # digits are not mirror-symmetric
    config.sample.steps = "50"
    config.sample.grid_cfg_scale = 3.0
    config.fid.batch_size = 200
    config.fid.num_samples = 500 if args.classifier else 0
    config.fid.reference_examples = 1437  # the whole digits train split
    config.log_every = 100
    config.eval_every = 1000
    config.checkpoint_every = 1000
  configuration.apply_locality_args(config, args)
  return config
