r"""RetinaNet with SpineNet-190 (Du et al., CVPR 2020), the paper's protocol C by default.

  python -m jaxdet.main --config=configs/spinenet190.py --workdir=runs/sn190

Variants after the colon: `protocol=A|B|C`, `size=N` (input), `batch=N` (global batch; the
learning rate scales linearly from 0.28 at 256), `shapes` (the synthetic dataset),
`runlocal` (tiny smoke test). Expected (paper Table 2, COCO test-dev, protocol C): 52.1 AP.
"""

from configs import common


def get_config(arg=None):
  c = common.spinenet_retinanet('190', arg)
  # 164M parameters plus momentum: shard both over the data axis (FSDP) instead of keeping a
  # copy on every device; `--config.partition_rules='()'` replicates them again.
  c.partition_rules = common.FSDP_RULES
  return c
