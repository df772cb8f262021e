r"""SPP-net / Fast R-CNN pooling on shared features (He et al. 2014; Girshick 2015).

  python -m jaxdet.main --config=configs/sppnet.py --workdir=runs/sppnet

The pipeline of SPP-net: the image goes through the network once; every region is pooled
from one shared conv map (stride 16, as SPP-net's conv5) by a spatial pyramid of
{1x1, 2x2, 3x3, 6x6} = 50 max-pooled bins, and two FC layers classify it and regress its box.
Regions come from a region proposal network on the same features (Faster R-CNN) instead of
selective search, so the whole detector trains end to end. `pool=roi_pool` gives Fast R-CNN's
7x7 RoI max pooling instead. ResNet-50-FPN, detectron2's 1x schedule otherwise.
Variants: `pool=spp|roi_pool`, `schedule=1x|3x`, `batch=N`, `shapes`, `runlocal`.
"""

from configs import common
from configs import rcnn_common


def get_config(arg=None):
  a = common.parse_arg(arg, shapes=False, runlocal=False, schedule='1x', batch=16, pool='spp')
  if a.pool not in ('spp', 'roi_pool'):
    raise ValueError(f"pool={a.pool!r}; use 'spp' or 'roi_pool'.")

  def one_level_pooler(c):
    # One shared map at stride 16 (P4) for every region, as SPP-net's conv5.
    c.model.pooler.type = a.pool
    c.model.roi_min_level = c.model.roi_max_level = 4

  return rcnn_common.resnet50_fpn_config(a, with_masks=False, adjust=one_level_pooler)
