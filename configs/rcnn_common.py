"""Pieces shared by the Faster / Mask R-CNN configs (jaxdet/models/rcnn.py).

Defaults are detectron2's R50-FPN (`configs/Base-RCNN-FPN.yaml`, `config/defaults.py`;
../shared/reference/rcnn_family.md section 3); the SpineNet Mask R-CNN values are the TPU
reference configs' (`configs/spinenet/spinenet*_mrcnn.yaml`; reference/spinenet.md 2.3, 3.1).
"""

import ml_collections

from configs import common
from jaxdet.models.backbones import spinenet


def rcnn_model(with_masks=True, num_classes=80):
  """config.model of a two-stage detector: RPN, pooler, box head, optional mask head."""
  m = ml_collections.ConfigDict()
  m.name = 'rcnn'
  m.num_classes = num_classes
  m.activation = 'relu'             # heads; configs tie the backbone's to it
  # RPN levels (P2-P6) and the levels RoIs are pooled from (P2-P5).
  m.min_level = 2
  m.max_level = 6
  m.roi_min_level = 2
  m.roi_max_level = 5
  # One size per level, 8 x stride = 32 (P2) .. 512 (P6), ratios (h/w) 0.5 / 1 / 2.
  m.anchor = ml_collections.ConfigDict(dict(
      num_scales=1, aspect_ratios=(0.5, 1.0, 2.0), anchor_size=8.0))
  m.rpn = ml_collections.ConfigDict(dict(
      head=dict(num_convs=1, num_filters=256, use_norm=False),
      positive_threshold=0.7, negative_threshold=0.3, allow_low_quality=True,
      batch_size_per_image=256, positive_fraction=0.5,
      # Per level before NMS; over all levels after it (detectron2 FPN semantics).
      pre_nms_top_k_train=2000, post_nms_top_k_train=1000,
      pre_nms_top_k_test=1000, post_nms_top_k_test=1000,
      nms_iou=0.7, min_size=0.0))
  m.roi_sampler = ml_collections.ConfigDict(dict(
      num_samples=512, positive_fraction=0.25, fg_iou_threshold=0.5,
      add_gt_as_proposals=True))
  # detectron2 pools with ROIAlignV2 and an adaptive sample count (sampling_ratio 0); the
  # static-shape op needs a fixed count, 2 per bin and axis (mmdetection's former default).
  m.pooler = ml_collections.ConfigDict(dict(
      type='roi_align',             # 'roi_align' | 'roi_pool' (Fast R-CNN) | 'spp' (SPP-net)
      output_size=7, sampling_ratio=2, aligned=True, canonical_size=224,
      canonical_level=4, spp_levels=(1, 2, 3, 6)))
  m.box_head = ml_collections.ConfigDict(dict(
      num_convs=0, conv_filters=256, num_fcs=2, fc_dims=1024, use_norm=False))
  m.mask_head = ml_collections.ConfigDict(dict(
      enabled=with_masks, num_convs=4, num_filters=256, use_norm=False,
      pooler_size=14, sampling_ratio=2))
  # smooth-L1 beta 0 = L1, detectron2's RPN and box-head regression losses.
  m.loss = ml_collections.ConfigDict(dict(rpn_smooth_l1_beta=0.0, roi_smooth_l1_beta=0.0))
  m.postprocess = ml_collections.ConfigDict(dict(
      # (RoI, class) candidates kept by score before the per-class NMS.
      pre_nms_top_k=1000, score_threshold=0.05, nms_iou=0.5, max_detections=100))
  return m


def resnet_fpn(config, depth=50):
  """detectron2's ResNet-FPN: C2-C5 -> P2-P5 (lateral + 3x3 convs, no norm), P6 = max-pool."""
  config.model.backbone = ml_collections.ConfigDict(dict(
      name='resnet', depth=depth, width=64, activation='relu', stochastic_depth_rate=0.0,
      norm_momentum=config.norm.get_ref('momentum'),
      norm_epsilon=config.norm.get_ref('epsilon')))
  config.model.neck = ml_collections.ConfigDict(dict(
      name='fpn', min_level=2, max_level=6, num_filters=256, use_norm=False,
      extra_levels='maxpool'))
  return config


# detectron2 schedules at 16 images per batch: (iterations, lr decay steps).
DETECTRON2_SCHEDULES = {'1x': (90_000, (60_000, 80_000)),
                        '3x': (270_000, (210_000, 250_000))}


def detectron2_recipe(config, schedule='1x'):
  """SGD 0.02 at batch 16 (scaled linearly), momentum 0.9, weight decay 1e-4, linear warmup
  over 1000 steps from 0.001 x lr, x0.1 at each decay step; multi-scale training.

  detectron2 resizes the short side to 640..800 (max long side 1333); jaxdet's square
  canvas of 1024 with scale jitter 0.8-1.0 gives the same range for COCO's 4:3 images.
  """
  if schedule not in DETECTRON2_SCHEDULES:
    raise ValueError(f'schedule={schedule!r}; use one of {sorted(DETECTRON2_SCHEDULES)}.')
  steps, decays = DETECTRON2_SCHEDULES[schedule]
  config.schedule = schedule
  config.global_batch_size = 16
  config.eval_batch_size = 8
  config.num_train_steps = steps
  opt = config.optimizer
  opt.name = 'sgd'
  opt.momentum = 0.9
  opt.learning_rate = 0.02
  opt.reference_batch_size = 16
  opt.schedule = 'step'
  opt.warmup_steps = 1000
  opt.warmup_init_lr = 0.02 * 0.001
  opt.decay_boundaries = decays      # absolute steps (> 1)
  opt.decay_factors = (0.1, 0.01)
  opt.weight_decay = 1e-4
  opt.grad_clip_norm = 0.0           # detectron2 does not clip
  config.data.image_size = 1024
  config.data.size_divisor = 64      # 2**max_level of P6
  config.data.aug_scale_min, config.data.aug_scale_max = 0.8, 1.0
  config.checkpoint_every_steps = 5000
  config.log_every_steps = 100
  return config


def shapes_recipe(config, image_size=128):
  """The detector on the synthetic shapes dataset, narrow, sized for 2 CPU cores.

  The `simple` style of shapes (up to 4 objects from ~16 px, as the CPU demo). Widths are
  divided by 4 (ResNet width 16, 64-channel pyramid, RPN and box head, 256-d FCs) and the
  mask head's by 16 (16 channels: its 14x14 convolutions over every positive RoI are the
  largest cost of the step on a CPU; solid shapes need few). Objects are few, so proposals are cut to 200
  per level before NMS and 100 after it, and 64 RoIs are sampled per image (at most 16
  positives). Anchors start at 16 px since shapes are as small as ~16 px at 128 px, with
  three scales per level. AdamW
  with a cosine schedule converges in far fewer steps than the COCO recipe's SGD.
  """
  common.shapes_data(config, image_size)
  config.data.shapes.style = 'simple'
  m = config.model
  config.data.with_masks = m.mask_head.enabled
  config.data.mask_size = 56
  config.data.max_instances = 16
  config.data.size_divisor = 2 ** m.max_level
  config.data.aug_scale_min, config.data.aug_scale_max = 0.8, 1.25
  if m.backbone.name == 'resnet':
    m.backbone.width = 16
  m.neck.num_filters = 64
  m.rpn.head.num_filters = 64
  m.anchor.anchor_size = 4.0
  # Three octave scales per level (as RetinaNet): with one, an object between two anchor
  # sizes overlaps none by IoU 0.7 and the RPN trains on ~1 positive per object.
  m.anchor.num_scales = 3
  m.rpn.pre_nms_top_k_train, m.rpn.post_nms_top_k_train = 200, 100
  m.rpn.pre_nms_top_k_test, m.rpn.post_nms_top_k_test = 200, 100
  m.roi_sampler.num_samples = 64
  m.box_head.conv_filters = 64
  m.box_head.fc_dims = 256
  m.mask_head.num_filters = 16
  m.postprocess.pre_nms_top_k = 500
  config.global_batch_size = 8
  config.eval_batch_size = 25
  config.num_train_steps = 1700
  opt = config.optimizer
  opt.name = 'adamw'
  opt.learning_rate = 2e-3
  opt.reference_batch_size = 0
  opt.weight_decay = 1e-4
  opt.schedule = 'cosine'
  opt.warmup_steps = 50
  opt.warmup_init_lr = 0.0
  opt.grad_clip_norm = 10.0
  config.checkpoint_every_steps = 500
  config.log_every_steps = 25
  return config


def runlocal(config):
  """Tiny everything: a smoke test of any R-CNN config in a couple of minutes on a CPU."""
  common.shapes_data(config, 128)
  common.runlocal_data_and_schedule(config, steps=20)
  config.optimizer.warmup_steps = 5
  m = config.model
  config.data.with_masks = m.mask_head.enabled
  config.data.mask_size = 28
  config.data.max_instances = 16
  config.data.size_divisor = 2 ** m.max_level
  if m.backbone.name == 'resnet':
    m.backbone.depth, m.backbone.width = 18, 8
  elif m.backbone.name == 'spinenet':
    m.backbone.filter_size_scale = 0.125
    m.backbone.endpoints_num_filters = 16
    m.backbone.block_repeats = 1
  if m.get('neck') and m.neck.name == 'fpn':
    m.neck.num_filters = 16
  m.rpn.head.num_filters = 16
  m.rpn.pre_nms_top_k_train, m.rpn.post_nms_top_k_train = 200, 100
  m.rpn.pre_nms_top_k_test, m.rpn.post_nms_top_k_test = 200, 100
  m.roi_sampler.num_samples = 64
  m.box_head.conv_filters = 16
  m.box_head.fc_dims = 32
  m.mask_head.num_filters = 16
  m.postprocess.pre_nms_top_k = 200
  return config


# SpineNet Mask R-CNN per model (TPU `spinenet*_mrcnn.yaml`, paper Table 6): input size,
# anchor size, scale jitter, head convs x filters, box-head FC width, RPN convs, steps at
# batch 256 and the two lr decay steps.
SPINENET_MASK_RCNN = {
    '49S': dict(image_size=640, anchor_size=3.0, jitter=(0.5, 2.0), head_convs=4,
                head_filters=128, fc_dims=512, rpn_convs=1, steps=162_050,
                decays=(148_160, 157_420)),
    '49': dict(image_size=640, anchor_size=3.0, jitter=(0.5, 2.0), head_convs=4,
               head_filters=256, fc_dims=1024, rpn_convs=1, steps=162_050,
               decays=(148_160, 157_420)),
    # 96: the reference gives the step count only; decays at the same fractions as 49.
    '96': dict(image_size=1024, anchor_size=3.0, jitter=(0.5, 2.0), head_convs=4,
               head_filters=256, fc_dims=1024, rpn_convs=1, steps=164_150,
               decays=(150_083, 159_460)),
    '143': dict(image_size=1280, anchor_size=3.0, jitter=(0.5, 2.0), head_convs=4,
                head_filters=256, fc_dims=1024, rpn_convs=1, steps=162_050,
                decays=(148_160, 157_420)),
    # 190: the yaml asks for 7 RPN convs, but one RPN conv reproduces the model zoo's
    # 168.2M (seven give 176.2M), so the RPN keeps a single conv.
    '190': dict(image_size=1536, anchor_size=5.0, jitter=(0.1, 2.0), head_convs=7,
                head_filters=384, fc_dims=1024, rpn_convs=1, steps=187_600,
                decays=(173_530, 182_910), activation='swish', stochastic_depth=0.2),
}


def spinenet_mask_rcnn(model_id, batch=256):
  """Mask R-CNN on SpineNet-<model_id> as the TPU reference: P3-P7 straight from the
  backbone (no FPN), RoIs pooled from P3-P7, BatchNorm in every head, 4 conv + 1 FC box
  head, 3 anchors per location, SGD 0.28 at batch 256 from scratch."""
  spec = SPINENET_MASK_RCNN[model_id]
  c = common.base_config()
  c.model = rcnn_model(with_masks=True)
  m = c.model
  m.backbone = ml_collections.ConfigDict(dict(
      name='spinenet', model_id=model_id, min_level=3, max_level=7, activation='relu',
      stochastic_depth_rate=spec.get('stochastic_depth', 0.0),
      norm_momentum=c.norm.get_ref('momentum'), norm_epsilon=c.norm.get_ref('epsilon'),
      spec='', dropblock_keep_prob=1.0, dropblock_size=7, dropblock_warmup_steps=0,
      **spinenet.SCALING_MAP[model_id]))
  m.neck = ml_collections.ConfigDict(dict(name='none'))
  m.min_level, m.max_level = 3, 7
  m.roi_min_level, m.roi_max_level = 3, 7
  # TPU anchors: one octave, ratios (1, 2, 0.5), anchor_size x stride.
  m.anchor = ml_collections.ConfigDict(dict(
      num_scales=1, aspect_ratios=(1.0, 2.0, 0.5), anchor_size=spec['anchor_size']))
  m.rpn.head = ml_collections.ConfigDict(dict(
      num_convs=spec['rpn_convs'],
      num_filters=spec['head_filters'], use_norm=True))
  m.box_head = ml_collections.ConfigDict(dict(
      num_convs=spec['head_convs'], conv_filters=spec['head_filters'], num_fcs=1,
      fc_dims=spec['fc_dims'], use_norm=True))
  m.mask_head.num_convs = spec['head_convs']
  m.mask_head.num_filters = spec['head_filters']
  m.mask_head.use_norm = True
  # TPU multilevel_crop_and_resize: one sample per bin, no half-pixel shift.
  m.pooler.sampling_ratio = 1
  m.pooler.aligned = False
  m.mask_head.sampling_ratio = 1
  common.tie_activation(c, spec.get('activation', 'relu'))
  c.data = common.data_config('coco', spec['image_size'])
  c.data.with_masks = True
  c.data.aug_scale_min, c.data.aug_scale_max = spec['jitter']
  c.global_batch_size = batch
  c.eval_batch_size = 8
  c.num_train_steps = spec['steps']
  opt = c.optimizer
  opt.learning_rate = 0.28
  opt.reference_batch_size = 256
  opt.warmup_steps = 2000
  opt.warmup_init_lr = 0.0067
  opt.decay_boundaries = spec['decays']
  opt.decay_factors = (0.1, 0.01)
  opt.weight_decay = 4e-5
  c.checkpoint_every_steps = 5000
  c.log_every_steps = 100
  return c


def resnet50_fpn_config(a, *, with_masks, adjust=None):
  """Faster (with_masks=False) or Mask R-CNN on ResNet-50-FPN with detectron2's recipe.

  a: the parsed variants (`schedule`, `batch`, `shapes`, `runlocal`); adjust(config), if
  given, changes the model before the recipes are applied (e.g. SPP-net's pooler).
  """
  c = common.base_config()
  c.model = rcnn_model(with_masks=with_masks)
  resnet_fpn(c, depth=50)
  if adjust is not None:
    adjust(c)
  c.data = common.data_config('coco')
  c.data.with_masks = with_masks
  detectron2_recipe(c, a.schedule)
  c.global_batch_size = a.batch
  if a.shapes:
    shapes_recipe(c)
  if a.runlocal:
    runlocal(c)
  return c
