r"""RetinaNet with SpineNet-96 (Du et al., CVPR 2020), the paper's protocol C by default.

  python -m jaxdet.main --config=configs/spinenet96.py --workdir=runs/sn96

Variants after the colon: `protocol=A|B|C`, `size=N` (input), `batch=N` (global batch; the
learning rate scales linearly from 0.28 at 256), `shapes` (the synthetic dataset),
`runlocal` (tiny smoke test). Expected (paper Table 2, COCO test-dev, protocol C): 48.6 AP.
"""

from configs import common


def get_config(arg=None):
  return common.spinenet_retinanet('96', arg)
