r"""MAE pre-training on pixel tokens (PiT) or patches (ViT).

Defaults: the paper's CIFAR-100 PiT MAE setting (Ti/1: every pixel a token,
75% of them masked). Arguments (comma-separated after the colon):

  variant=Ti/1      SIZE/PATCH; Ti/2 is the MAE ViT baseline
  dataset=cifar100  cifar100 | digits | tfds:NAME | npz:PATH
  quick             a few minutes on a 2-core CPU, offline (digits); its length
                    is pinned to 800 steps (total_epochs=0)
  posemb=, tokenizer=, swaps=, swap_distance=   the locality ablations, as in
                    configs/cls_pixel.py

  python -m pixel_vit.main --config=configs/mae_pixel.py --workdir=DIR
  python -m pixel_vit.main --config=configs/mae_pixel.py:quick --workdir=/tmp/mae

Then fine-tune or probe the encoder with configs/mae_finetune.py
(`init_from=DIR`). Any key can be overridden: `--config.mask_ratio=0.9`.
"""

import ml_collections

from pixel_vit import configuration


def get_config(arg=None):
  args = configuration.parse_arg(
    arg, variant="Ti/1", dataset="cifar100", quick=False, **configuration.LOCALITY_ARGS
  )
  config = configuration.base_config("mae", args.dataset, quick=args.quick)

  config.mask_ratio = 0.75
  config.model = ml_collections.ConfigDict(
    dict(
      variant=args.variant,
      posemb="learn",
      tokenizer="linear",
      dtype="float32",
      attention="auto",
      scan=True,
      remat="auto",
      drop_path=0.0,
      # MAE's lighter decoder (512 wide, 8 deep), sized down for 32x32 inputs
      # whose decoder sees every pixel token.
      decoder=dict(width=256, depth=4, heads=8, mlp_dim=1024, posemb="learn"),
      # Targets normalised over 2x2 windows: the same targets for PiT/1 and
      # ViT/2 (MAE's per-patch rule for /2), see models/mae.py.
      norm_pix_loss=True,
      norm_pix_window=2,
    )
  )

  config.batch_size = 1024
  config.eval_batch_size = 1024
  config.total_steps = 0  # 0 = use total_epochs
  config.total_epochs = 1600.0
  config.optimizer = ml_collections.ConfigDict(
    dict(
      base_lr=1.5e-4,
      end_lr=0.0,
      b1=0.9,
      b2=0.95,
      weight_decay=0.05,
      grad_clip=0.0,
      warmup_steps=0,
      warmup_epochs=40.0,
      ema_decay=0.0,
    )
  )
  # MAE's rule: lr = base_lr * batch_size / 256 (follows --config.batch_size).
  # base_lr first: the reference takes the first operand's type (float).
  config.optimizer.lr = config.optimizer.get_ref("base_lr") * config.get_ref("batch_size") / 256

  # MAE pre-training augmentation: random resized crop + flip only.
  config.augment = configuration.default_augment_config()
  config.augment.crop_scale = (0.2, 1.0)
  config.augment.label_smoothing = 0.0
  config.augment.mixup_alpha = 0.0
  config.augment.cutmix_alpha = 0.0

  config.log_every = 50
  config.eval_every = 2000
  config.checkpoint_every = 2000

  if args.quick:  # offline, a few minutes on 2 CPU cores
    config.model.variant = args.variant if args.variant != "Ti/1" else "mu/1"
    config.model.scan = False
    config.model.remat = "none"
    # An 8x8 digit has 64 pixel tokens: at 75% masking 16 remain, too few to
    # see a digit in minutes of training; at 50% the reconstructions are
    # recognisable after 800 steps. Fixed sin-cos positions and raw-pixel
    # targets (nothing to normalise over in 8x8) make minutes enough.
    config.mask_ratio = 0.5
    config.model.posemb = "sincos2d"
    config.model.norm_pix_loss = False
    config.model.decoder = dict(width=64, depth=2, heads=4, mlp_dim=256, posemb="sincos2d")
    config.batch_size = 128
    config.eval_batch_size = 360
    config.total_steps = 800
    config.total_epochs = 0.0  # pinned: --config.total_steps=0 is an error, not 1600 epochs
    config.optimizer.base_lr = 2e-3
    config.optimizer.warmup_steps = 50
    config.augment.crop = False  # 8x8 digits lose too much to crops
    config.augment.flip = False
    config.log_every = 50
    config.eval_every = 400
    config.checkpoint_every = 400
  configuration.apply_locality_args(config, args)
  return config
