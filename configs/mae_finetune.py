r"""Fine-tuning or linear probing an MAE-pre-trained encoder (PiT or ViT).

The classifier, data and mesh are configs/cls_pixel.py's; this file sets
`init_from` and the MAE recipe (He et al., 2022, appendix A.2 / A.3 and the
official code's defaults). Arguments (comma-separated after the colon):

  mode=finetune     finetune | probe
  init_from=PATH    the MAE workdir (configs/mae_pixel.py's --workdir), its
                    checkpoints/ directory or one checkpoints/<step> ('' = random init)
  variant=Ti/1      SIZE/PATCH; must be the pre-trained one
  dataset=cifar100  cifar100 | imagenet28 | digits | tfds:NAME | npz:PATH
  quick             about a minute on a 2-core CPU, offline (digits, mu/1),
                    for a configs/mae_pixel.py:quick workdir
  posemb=, tokenizer=, swaps=, swap_distance=   the locality ablations: pass
                    the ones the encoder was pre-trained with

  python -m pixel_vit.main --config=configs/mae_pixel.py:quick --workdir=/tmp/mae
  python -m pixel_vit.main --config=configs/mae_finetune.py:quick,init_from=/tmp/mae \
      --workdir=/tmp/mae_ft
  python -m pixel_vit.main --config=configs/mae_finetune.py:quick,mode=probe,init_from=/tmp/mae \
      --workdir=/tmp/mae_probe

Fine-tune (MAE's end-to-end recipe): AdamW (0.9, 0.999), lr = base_lr x
batch / 256 with base_lr 5e-4, layer-wise lr decay 0.75 (0.65 for L/H),
weight decay 0.05, drop path 0.1 (0.2 for L/H), 5 warmup epochs, 100 epochs
(50 for L/H), mixup 0.8, cutmix 1.0, label smoothing 0.1, no gradient
clipping, global average pooling (MAE fine-tunes with `global_pool`),
RandAugment rand-m9-mstd0.5-inc1 and random erasing with p 0.25.

Linear probe: the encoder is frozen (`optimizer.freeze=('encoder',)`: exact
zero updates, no weight decay, no backward pass through it) and a linear head
is trained on the pooled features. MAE's probe puts a BatchNorm without
affine parameters before the head; this one is batch-norm-free: the encoder
ends in a LayerNorm, so its features are already normalised per token.
It pools by global average, like the fine-tune; MAE's probe reads the [CLS]
token instead (`--config.model.pool=cls`), which on the quick run probed
70.6% against 82.2% for the average. MAE trains the probe with
LARS at batch 16384 (base lr 0.1); that batch is impractical here, so this
uses AdamW, lr = 2.5e-4 x batch / 256 (1e-3 at batch 1024), no weight decay,
10 warmup epochs, 90 epochs, crop + flip only.

quick: 150 steps of batch 128 on the 8x8 digits (about 30 s of training on 2
cores). From a configs/mae_pixel.py:quick workdir (800 steps) we measured, on
the 360 test digits (single runs): fine-tune 96.1% top-1 against 71.4% for
the same config from random init (init_from=''); linear probe 82.2% against
16.4% for a probe of a random encoder. (The quick fine-tune lr, 2e-3, beat
1e-3: 92.8%.)

The model (variant, posemb) is what configs/mae_pixel.py pre-trains with the
same variant / dataset / quick arguments, and must match the checkpoint; a
mismatch stops the run before it compiles, naming the field and the fix.
Any key can be overridden: `--config.optimizer.layer_decay=0.65`.
"""

import importlib.util
import os

from pixel_vit import configuration

MODES = ("finetune", "probe")


def _sibling_config(name: str):
  """configs/NAME.py, imported by path (configs/ is not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"pixel_vit_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  args = configuration.parse_arg(
    arg,
    mode="finetune",
    init_from="",
    variant="Ti/1",
    dataset="cifar100",
    quick=False,
    **configuration.LOCALITY_ARGS,
  )
  if args.mode not in MODES:
    raise ValueError(
      f"config argument mode={args.mode!r} is not allowed; choose one of {list(MODES)}."
    )
  shared = ",".join(
    [
      f"variant={args.variant}",
      f"dataset={args.dataset}",
      *(f"{key}={args[key]}" for key in configuration.LOCALITY_ARGS),
    ]
    + (["quick"] if args.quick else [])
  )
  config = _sibling_config("cls_pixel").get_config(shared)
  config.init_from = args.init_from
  # The encoder configs/mae_pixel.py pre-trains with the same arguments (its
  # quick run uses sin-cos positions, the full one learned ones).
  pretraining = _sibling_config("mae_pixel").get_config(shared).model
  config.model.variant = pretraining.variant
  config.model.posemb = pretraining.posemb
  config.model.tokenizer = pretraining.tokenizer
  # Global average pooling for both (MAE fine-tunes with `global_pool`; see
  # above for the probe). The checkpoint's [CLS] token is then dropped.
  config.model.pool = "gap"
  large = config.model.variant.partition("/")[0] in ("L", "H")
  opt = config.optimizer
  opt.b1, opt.b2 = 0.9, 0.999
  opt.end_lr = 1e-6
  opt.grad_clip = 0.0
  opt.ema_decay = 0.0
  opt.warmup_steps = 0
  opt.layer_decay = 0.0
  opt.freeze = ()

  if args.mode == "finetune":
    config.model.drop_path = 0.2 if large else 0.1
    config.total_epochs = 50.0 if large else 100.0
    opt.base_lr = 1e-3 if large else 5e-4
    opt.weight_decay = 0.05
    opt.layer_decay = 0.65 if large else 0.75
    opt.warmup_epochs = 5.0
    config.augment.mixup_alpha = 0.8
    config.augment.cutmix_alpha = 1.0
    config.augment.label_smoothing = 0.1
    config.augment.randaugment_ops = 2
    config.augment.erase_prob = 0.25
  else:  # probe
    config.model.drop_path = 0.0
    config.total_epochs = 90.0
    opt.base_lr = 2.5e-4
    opt.weight_decay = 0.0
    opt.freeze = ("encoder",)
    opt.warmup_epochs = 10.0
    config.augment.mixup_alpha = 0.0
    config.augment.cutmix_alpha = 0.0
    config.augment.label_smoothing = 0.0
    config.augment.randaugment_ops = 0
    config.augment.erase_prob = 0.0
  # MAE's rule: lr = base_lr * batch_size / 256 (follows --config.batch_size).
  del opt["lr"]  # cls_pixel's plain value becomes a reference
  # base_lr's (float) reference first: the result takes the first operand's type,
  # and an int-typed lr would refuse --config.optimizer.lr=0.005.
  opt.lr = opt.get_ref("base_lr") * config.get_ref("batch_size") / 256

  if args.quick:  # cls_pixel's quick run (mu/1 on 8x8 digits), for mae_pixel.py:quick
    config.model.drop_path = 0.0
    config.total_steps = 150
    config.total_epochs = 0.0  # pinned, as cls_pixel's quick run
    opt.warmup_steps = 15
    opt.base_lr = 4e-3 if args.mode == "finetune" else 2e-2  # lr 2e-3 / 1e-2 at batch 128
    config.augment.mixup_alpha = 0.0  # as cls_pixel:quick: digits are few and tiny
    config.augment.cutmix_alpha = 0.0
    config.augment.label_smoothing = 0.0
    config.augment.randaugment_ops = 0
    config.augment.erase_prob = 0.0
    config.eval_every = 75
    config.checkpoint_every = 75
  return config
