"""The block-graph drawing: one arrow per connection, one marker per block."""

import matplotlib

matplotlib.use('Agg')

from jaxdet.models.backbones import spinenet  # pylint: disable=g-import-not-at-top
from jaxdet.models.backbones import spinenet_graph


def test_edges_of_spinenet49():
  e = spinenet_graph.edges(spinenet.SPINENET_BLOCK_SPECS)
  assert len(e) == 2 * len(spinenet.SPINENET_BLOCK_SPECS)
  assert (0, 2) in e and (1, 2) in e      # First spec reads both stem blocks.
  assert (5, 15) in e and (14, 15) in e   # The L7 output reads blocks 5 and 14.
  assert all(parent < child for parent, child in e)


def test_drawing_has_an_arrow_per_connection(tmp_path):
  ax = spinenet_graph.draw_spec('spinenet49', title='SpineNet-49')
  specs = spinenet.SPINENET_BLOCK_SPECS
  assert len(ax.texts) == 2 * len(specs)                  # annotate() arrows
  assert len(ax.collections) == len(specs) + 2            # one marker per block
  assert ax.get_title() == 'SpineNet-49'
  fig = spinenet_graph.draw_specs(['spinenet49', 'r0_sp53', 'r50'])
  fig.savefig(tmp_path / 'graphs.png')
  assert (tmp_path / 'graphs.png').stat().st_size > 1000
