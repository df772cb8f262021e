r"""RetinaNet with SpineNet-49S (Du et al., CVPR 2020), the paper's protocol C by default.

  python -m jaxdet.main --config=configs/spinenet49s.py --workdir=runs/sn49s

Variants after the colon: `protocol=A|B|C`, `size=N` (input), `batch=N` (global batch; the
learning rate scales linearly from 0.28 at 256), `shapes` (the synthetic dataset),
`runlocal` (tiny smoke test). Expected (paper Table 2, COCO test-dev, protocol C): 41.5 AP.
"""

from configs import common


def get_config(arg=None):
  return common.spinenet_retinanet('49S', arg)
