"""Drawing of a SpineNet block graph: build order across, level (resolution) up the page.

Each block is a node at (build index, level); an arrow joins every parent to its block, so
scale-permuted connections show as arrows that climb or fall. Output blocks are filled.
Used by notebooks to compare specs (SpineNet-49, R50, R0-SP53, sampled ones).
"""

from typing import Sequence

from jaxdet.models.backbones import spinenet_search


def edges(specs, num_stem_blocks: int = 2):
  """[(parent block, child block)] for a spec; blocks numbered as input_offsets count them."""
  specs = spinenet_search.load_spec(specs) if isinstance(specs, str) else specs
  return [(parent, num_stem_blocks + i) for i, spec in enumerate(specs)
          for parent in spec.input_offsets]


def draw_spec(specs, *, title: str = '', num_stem_blocks: int = 2, ax=None,
              stem_level: int = 2):
  """Draws a spec (BlockSpec sequence, JSON text/path or a NAMED_SPECS name) with matplotlib.

  Returns the matplotlib Axes. Bottlenecks are circles, residual blocks squares.
  """
  if ax is None:
    # pyplot picks the backend: inline in notebooks, Agg without a display.
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    _, ax = plt.subplots(figsize=(10, 4))
  specs = spinenet_search.load_spec(specs) if isinstance(specs, str) else tuple(specs)
  levels = [stem_level] * num_stem_blocks + [s.level for s in specs]
  for parent, child in edges(specs, num_stem_blocks):
    ax.annotate('', xy=(child, levels[child]), xytext=(parent, levels[parent]),
                arrowprops=dict(arrowstyle='->', color='0.55', lw=0.8,
                                connectionstyle='arc3,rad=0.15'))
  for block, level in enumerate(levels):
    spec = specs[block - num_stem_blocks] if block >= num_stem_blocks else None
    marker = 's' if spec is not None and spec.block_fn == 'residual' else 'o'
    filled = spec is not None and spec.is_output
    ax.scatter([block], [level], s=160, marker=marker, zorder=3,
               facecolors='tab:orange' if filled else 'white', edgecolors='black')
  ax.set_xlabel('block (build order)')
  ax.set_ylabel('level (stride 2^level)')
  ax.set_yticks(sorted(set(levels)))
  ax.set_title(title or f'{len(specs)} blocks')
  return ax


def draw_specs(named: Sequence[str]):
  """One row per named spec, e.g. draw_specs(['spinenet49', 'r0_sp53', 'r50'])."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(named), 1, figsize=(10, 3.2 * len(named)), squeeze=False)
  for ax, name in zip(axes[:, 0], named):
    draw_spec(name, title=name, ax=ax)
  fig.tight_layout()
  return fig
