"""The scale-permuted search space of SpineNet (Du et al. 2020, arXiv 1912.05027, Sec. 3).

A SpineNet architecture is a block specification: a list of `spinenet.BlockSpec`
(level, block_fn, input_offsets, is_output). Blocks are numbered in the order
they are built: 0 .. num_stem_blocks - 1 are the stem's blocks (two L2
bottleneck groups in jaxdet), and spec k creates block k + num_stem_blocks.
This module makes that language a first-class object:

  specs_to_json / specs_from_json   a JSON list of {level, block_fn,
                                    input_offsets, is_output} objects
  validate                          the rules of the search space, with the
                                    offending block named in the error
  search_space_size                 the paper's count of the space (Sec. 3.1)
  NAMED_SPECS, load_spec            published and reference architectures, and
                                    the lookup behind `model.backbone.spec`
  sample_spec, mutate               random members of the space and one-step
                                    neighbours (for random or evolutionary search)

The rules (paper Sec. 3.1 and the "NAS details" of Sec. 5.1):
  * every block has a level in L2..L7 and is a 'bottleneck' or 'residual' block;
  * every block has exactly two distinct parents, each built before it;
  * an intermediate block reads only the last 5 blocks built before it (the
    stem's blocks count as built); an output block may read any earlier block;
  * each level min_level..max_level (L3..L7) has exactly one output block, and
    no level has two.
The published SpineNet-49 specification satisfies the window rule read
literally: its widest intermediate connection is block 7 <- block 3 (4 back),
and every longer connection (e.g. 15 <- 5) belongs to an output block.

In the searched space the 5 output blocks come after the N - 5 intermediate
blocks ("permuting intermediate and output blocks respectively"); `validate`
does not require that order, so hand-written scale-decreased specs such as
'r50' below, whose outputs sit inside the chain, are accepted too.
"""

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jaxdet.models.backbones import spinenet

BlockSpec = spinenet.BlockSpec

# Feature levels a block may have: L2 (stride 4) to L7 (stride 128), paper Sec. 3.
MIN_BLOCK_LEVEL, MAX_BLOCK_LEVEL = 2, 7
BLOCK_FNS = ('bottleneck', 'residual')
# Intermediate blocks search their parents among the last 5 blocks built (Sec. 5.1).
PARENT_WINDOW = 5
# One output block per level L3..L7 (Sec. 3).
NUM_OUTPUT_BLOCKS = 5
# Level adjustments of an intermediate block (Sec. 3.1, "block adjustments").
LEVEL_ADJUSTMENTS = (-1, 0, 1, 2)

_JSON_KEYS = ('level', 'block_fn', 'input_offsets', 'is_output')

# Blocks per level L2..L7 of the scale-permuted network, stem excluded (paper
# Table 1; the stem is {L2: 2} for both). R0-SP53 holds ResNet-50's blocks
# {3, 4, 6, 3} with the two stem blocks taken out of L2 and one L5 block
# replaced by an L6 and an L7 block (Sec. 3.3).
BLOCK_ALLOCATIONS = {
    'r0_sp53': {2: 1, 3: 4, 4: 6, 5: 2, 6: 1, 7: 1},
    'spinenet49': {2: 1, 3: 2, 4: 4, 5: 4, 6: 2, 7: 2},
}


def _chain(levels, outputs):
  """Scale-decreased chain: block b reads blocks b-2 and b-1; `outputs` are spec indices."""
  return tuple(BlockSpec(level, 'bottleneck', (i, i + 1), i in outputs)
               for i, level in enumerate(levels))


# ResNet-50 written in the block-specification language. This is a
# construction, not a published spec: the paper compares against R50-FPN,
# which is not a scale-permuted network at all. The blocks are R0-SP53's,
# i.e. ResNet-50's {3, 4, 6, 3} bottlenecks with the last L5 block replaced by
# an L6 and an L7 block (Sec. 3.3; the stem supplies two of the three L2
# blocks), kept in ResNet's scale-decreasing order. The search space requires
# two parents per block, so each block reads the two blocks built just before
# it (the shortest connections available; ResNet itself has one). The last
# block of L3, L4 and L5 and the L6 and L7 blocks are the outputs, as C3-C5
# plus the extra P6/P7 levels of RetinaNet. Every connection still goes
# through SpineNet's resampling (1x1 to alpha*C and back), so this is the
# scale-decreased member of the space built from the same blocks as R0-SP53
# (the unpermuted starting point of Sec. 3.3), not ResNet-50-FPN.
R50_BLOCK_SPECS = _chain([2] + [3] * 4 + [4] * 6 + [5] * 2 + [6, 7],
                         outputs={4, 10, 12, 13, 14})

# R0-SP53 (paper Fig. 4c): ResNet-50's blocks, scale-permuted and re-wired by
# the search, without block adjustments. The authors released no code or
# specification for it; the paper shows only the drawing. This is the
# transcription of that drawing in hyperion-ml/hyperion
# (hyperion/torch/narchs/spinenet.py, R0_SP53_BLOCK_SPECS), not checked here
# against the figure. It is consistent with Table 1 (blocks per level
# {1, 4, 6, 2, 1, 1}, all bottlenecks), with the 5-block parent window of
# intermediate blocks, and with the transcription's note that the L4 output
# block has three inputs: block 11 (spec 9) has no consumer and is summed into
# the L4 output, as SpineNet does for every dangling block.
R0_SP53_BLOCK_SPECS = tuple(BlockSpec(l, 'bottleneck', offsets, out) for l, offsets, out in (
    (2, (0, 1), False),
    (3, (0, 1), False),
    (3, (2, 3), False),
    (4, (2, 4), False),
    (4, (3, 5), False),
    (3, (5, 6), False),
    (5, (4, 7), False),
    (4, (4, 8), False),
    (4, (8, 9), False),
    (4, (8, 10), False),
    (3, (4, 10), True),
    (4, (6, 7), True),
    (5, (8, 13), True),
    (7, (6, 9), True),
    (6, (7, 9), True),
))

NAMED_SPECS = {
    'spinenet49': spinenet.SPINENET_BLOCK_SPECS,
    'r50': R50_BLOCK_SPECS,
    'r0_sp53': R0_SP53_BLOCK_SPECS,
}


# ----------------------------------------------------------------------------- (de)serialisation


def specs_to_json(specs) -> str:
  """A block specification as a JSON list, one block object per line.

  Args:
    specs: BlockSpecs (or (level, block_fn, input_offsets, is_output) entries).

  Returns:
    '[\\n  {"level": 2, "block_fn": "bottleneck", "input_offsets": [0, 1],
    "is_output": false},\\n  ...\\n]\\n'.
  """
  lines = []
  for i, entry in enumerate(specs):
    level, block_fn, offsets, is_output = _fields(entry, i)
    lines.append(json.dumps({'level': int(level), 'block_fn': block_fn,
                             'input_offsets': [int(o) for o in offsets],
                             'is_output': bool(is_output)}))
  return '[\n' + ',\n'.join('  ' + line for line in lines) + '\n]\n'


def specs_from_json(text_or_path) -> list[BlockSpec]:
  """Reads a block specification written by `specs_to_json`.

  Args:
    text_or_path: JSON text (starting with '[' or '{'), or the path of a file
      holding it.

  Returns:
    The BlockSpecs, in order. They are checked for form (keys and types), not
    against the rules of the search space: call `validate` for that.

  Raises:
    FileNotFoundError: for a path that does not exist.
    ValueError: for malformed JSON or entries, naming the entry.
  """
  if isinstance(text_or_path, os.PathLike) or not _is_json_text(text_or_path):
    path = os.fspath(text_or_path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'SpineNet block specification file {path!r} does not exist.')
    with open(path) as f:
      text, source = f.read(), path
  else:
    text, source = text_or_path, 'JSON text'
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'SpineNet block specification {source}: invalid JSON ({e}).') from e
  if not isinstance(data, list):
    raise ValueError(f'SpineNet block specification {source}: expected a JSON list of '
                     f'{{{", ".join(_JSON_KEYS)}}} objects, got {type(data).__name__}.')
  specs = []
  for i, obj in enumerate(data):
    if not isinstance(obj, dict) or set(obj) != set(_JSON_KEYS):
      keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
      raise ValueError(f'SpineNet block specification {source}, entry {i}: expected exactly '
                       f'the keys {list(_JSON_KEYS)}, got {keys}.')
    level, block_fn, offsets, is_output = (obj[k] for k in _JSON_KEYS)
    if (not isinstance(level, int) or isinstance(level, bool) or not isinstance(block_fn, str)
        or not isinstance(offsets, list)
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not isinstance(is_output, bool)):
      raise ValueError(f'SpineNet block specification {source}, entry {i}: expected an int '
                       'level, a string block_fn, a list of int input_offsets and a boolean '
                       f'is_output, got {obj}.')
    specs.append(BlockSpec(level, block_fn, tuple(offsets), is_output))
  return specs


def _is_json_text(text) -> bool:
  return isinstance(text, str) and text.lstrip()[:1] in ('[', '{')


def load_spec(spec: str) -> tuple[BlockSpec, ...]:
  """The block specification named by `config.model.backbone.spec`.

  Args:
    spec: a key of NAMED_SPECS, the path of a JSON file (see `specs_to_json`),
      or JSON text.

  Returns:
    The BlockSpecs (not yet validated).
  """
  if spec in NAMED_SPECS:
    return tuple(NAMED_SPECS[spec])
  text = str(spec)
  if not _is_json_text(text) and not os.path.isfile(text):
    raise ValueError(f'SpineNet spec {spec!r} is neither a named specification '
                     f'{sorted(NAMED_SPECS)} nor an existing JSON file.')
  return tuple(specs_from_json(text))


# ----------------------------------------------------------------------------- rules


def _fields(entry, i):
  """(level, block_fn, input_offsets, is_output) of a BlockSpec, sequence or mapping."""
  if isinstance(entry, Mapping):
    if set(entry) != set(_JSON_KEYS):
      raise ValueError(f'Block spec {i}: expected the keys {list(_JSON_KEYS)}, '
                       f'got {sorted(entry)}.')
    return tuple(entry[k] for k in _JSON_KEYS)
  if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 4:
    raise ValueError(f'Block spec {i} must be (level, block_fn, input_offsets, is_output), '
                     f'got {entry!r}.')
  return tuple(entry)


def candidate_parents(block: int, is_output: bool, *,
                      parent_window: int | None = PARENT_WINDOW) -> range:
  """Blocks that block number `block` may read (stem blocks included).

  Args:
    block: the block's number in build order (stem blocks first).
    is_output: output blocks may read every earlier block.
    parent_window: how many of the most recent blocks an intermediate block
      may read; None for no limit (the unrestricted space of Sec. 3.1).

  Returns:
    The block numbers, ascending.
  """
  if is_output or parent_window is None:
    return range(0, block)
  return range(max(0, block - parent_window), block)


def validate(specs, *, min_level: int = 3, max_level: int = 7, num_stem_blocks: int = 2,
             parent_window: int | None = PARENT_WINDOW) -> tuple[BlockSpec, ...]:
  """Checks a block specification against the rules of the search space.

  Args:
    specs: BlockSpecs, or (level, block_fn, input_offsets, is_output)
      sequences, or mappings with those keys.
    min_level, max_level: the endpoint levels; each needs exactly one output block.
    num_stem_blocks: blocks built before spec 0 (two L2 groups in SpineNet).
    parent_window: intermediate blocks read only this many most recent blocks;
      None disables the rule.

  Returns:
    The specification as a tuple of BlockSpecs.

  Raises:
    ValueError: naming the offending block ('block spec i (block b)') and the rule.
  """
  if not MIN_BLOCK_LEVEL <= min_level <= max_level <= MAX_BLOCK_LEVEL:
    raise ValueError(f'Endpoint levels min_level={min_level}, max_level={max_level} must '
                     f'satisfy {MIN_BLOCK_LEVEL} <= min_level <= max_level <= {MAX_BLOCK_LEVEL}.')
  out = []
  output_of_level = {}
  for i, entry in enumerate(specs):
    level, block_fn, offsets, is_output = _fields(entry, i)
    block = i + num_stem_blocks
    name = f'Block spec {i} (block {block})'
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
      raise ValueError(f'{name}: level must be an integer, got {level!r}.')
    if not MIN_BLOCK_LEVEL <= level <= MAX_BLOCK_LEVEL:
      raise ValueError(f'{name}: level {level} is outside L{MIN_BLOCK_LEVEL}..'
                       f'L{MAX_BLOCK_LEVEL}, the levels of the search space.')
    if block_fn not in BLOCK_FNS:
      raise ValueError(f'{name}: unknown block_fn {block_fn!r}; choose one of {list(BLOCK_FNS)}.')
    if not isinstance(is_output, (bool, np.bool_)):
      raise ValueError(f'{name}: is_output must be a boolean, got {is_output!r}.')
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence):
      raise ValueError(f'{name}: input_offsets must be a sequence, got {offsets!r}.')
    offsets = tuple(offsets)
    if len(offsets) != 2:
      raise ValueError(f'{name} has {len(offsets)} parents {offsets}; every block has '
                       'exactly 2 (paper Sec. 3.1).')
    if any(isinstance(o, bool) or not isinstance(o, (int, np.integer)) for o in offsets):
      raise ValueError(f'{name}: input_offsets must be integers, got {offsets}.')
    if offsets[0] == offsets[1]:
      raise ValueError(f'{name} reads block {offsets[0]} twice; its 2 parents must differ.')
    for o in offsets:
      if o < 0:
        raise ValueError(f'{name} reads block {o}; block numbers start at 0.')
      if o >= block:
        raise ValueError(f'{name} reads block {o}, which is itself or a later block (a '
                         f'cycle); only blocks 0..{block - 1} are built before it.')
      allowed = candidate_parents(block, bool(is_output), parent_window=parent_window)
      if o not in allowed:
        raise ValueError(f'{name} is an intermediate block but reads block {o}; intermediate '
                         f'blocks read only the last {parent_window} blocks built '
                         f'({allowed.start}..{allowed.stop - 1}); only output blocks may '
                         'read any earlier block (paper Sec. 5.1).')
    if is_output:
      if level in output_of_level:
        raise ValueError(f'{name} and block spec {output_of_level[level]} are both output '
                         f'blocks of level {level}; a level has at most one output block.')
      output_of_level[level] = i
    out.append(BlockSpec(int(level), block_fn, tuple(int(o) for o in offsets),
                         bool(is_output)))
  wanted = list(range(min_level, max_level + 1))
  if any(l not in output_of_level for l in wanted):
    raise ValueError(
        f'SpineNet min_level={min_level}, max_level={max_level} asks for levels {wanted}, '
        f'but the block specs output levels {sorted(output_of_level)}.')
  return tuple(out)


def block_allocation(specs) -> dict[int, int]:
  """Blocks per level of a specification (stem excluded), e.g. {2: 1, 3: 4, ...}."""
  counts = {}
  for i, entry in enumerate(specs):
    level = int(_fields(entry, i)[0])
    counts[level] = counts.get(level, 0) + 1
  return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- size


def search_space_size(num_blocks: int = 15, *, num_stem_blocks: int = 2,
                      parent_window: int | None = None,
                      block_adjustments: bool = True) -> int:
  """Number of architectures in the search space of Sec. 3.1 (exact integer).

  With N = num_blocks scale-permuted blocks, m = num_stem_blocks and the 5
  output blocks built after the N - 5 intermediate ones, the paper counts

    scale permutations       (N - 5)! * 5!
    cross-scale connections  prod_{k=0}^{N-1} C(c_k, 2), c_k the candidate
                             parents of the k-th block: m + k in the paper's
                             formula prod_{i=m}^{N+m-1} C(i, 2)
    block adjustments        4^(N-5) (levels {-1, 0, 1, 2} of intermediate
                             blocks) * 2^N (bottleneck or residual, every block)

  The permutation count treats blocks as distinguishable, so it is an upper
  bound on the distinct level orders, as in the paper.

  Args:
    num_blocks: N; 15 for R0-SP53 and SpineNet-49 (ResNet-50's blocks).
    num_stem_blocks: m, the stem blocks every block may read (2 in SpineNet).
    parent_window: None for the paper's formula; 5 for the space the search
      actually explored (intermediate blocks read the last 5 blocks, Sec. 5.1),
      i.e. c_k = min(m + k, 5) for intermediate blocks.
    block_adjustments: False for the R[N]-SP[M] family of Sec. 3.3 (only
      permutations and connections were searched).

  Returns:
    For N = 15, m = 2: 12492903838757739560999325794304000000000 (1.25e40);
    1.59e37 with parent_window=5; 3.64e29 without block adjustments.
  """
  n, m = num_blocks, num_stem_blocks
  if n < NUM_OUTPUT_BLOCKS:
    raise ValueError(f'num_blocks must be at least {NUM_OUTPUT_BLOCKS} (the output blocks).')
  permutations = math.factorial(n - NUM_OUTPUT_BLOCKS) * math.factorial(NUM_OUTPUT_BLOCKS)
  connections = math.prod(
      math.comb(len(candidate_parents(m + k, k >= n - NUM_OUTPUT_BLOCKS,
                                      parent_window=parent_window)), 2)
      for k in range(n))
  adjustments = 1
  if block_adjustments:
    adjustments = len(LEVEL_ADJUSTMENTS)**(n - NUM_OUTPUT_BLOCKS) * len(BLOCK_FNS)**n
  return permutations * connections * adjustments


# ----------------------------------------------------------------------------- sampling


def _allocation_levels(allocation) -> list[int]:
  """[level, ...] with each level repeated by its count; a mapping or L2-first counts."""
  if not isinstance(allocation, Mapping):
    allocation = {MIN_BLOCK_LEVEL + i: n for i, n in enumerate(allocation)}
  return [int(l) for l, n in sorted(allocation.items()) for _ in range(int(n))]


def sample_spec(rng, *, block_allocation: Any = BLOCK_ALLOCATIONS['r0_sp53'],
                min_level: int = 3, max_level: int = 7, num_stem_blocks: int = 2,
                parent_window: int | None = PARENT_WINDOW, adjust_levels: bool = True,
                adjust_block_fns: bool = True) -> tuple[BlockSpec, ...]:
  """A uniformly random member of the search space built from given blocks.

  One block of each level min_level..max_level becomes that level's output
  block; the others are intermediate blocks. Then, as Sec. 3.1:
    1. scale permutation: intermediate blocks in random order, followed by
       the output blocks in random order;
    2. block adjustments: each intermediate block's level moves by one of
       {-1, 0, 1, 2} (those that stay in L2..L7) and every block draws its
       type from {bottleneck, residual};
    3. cross-scale connections: every block draws 2 distinct parents from
       `candidate_parents`.

  Args:
    rng: np.random.Generator, or a seed for one.
    block_allocation: blocks per level of the scale-permuted network, a
      {level: count} mapping or counts for L2, L3, ...; R0-SP53's (ResNet-50's
      blocks) by default.
    min_level, max_level: endpoint levels.
    num_stem_blocks: blocks built before spec 0.
    parent_window: see `validate`.
    adjust_levels, adjust_block_fns: search the block adjustments; without
      them (the R-SP family) levels are kept and every block is a bottleneck.

  Returns:
    A valid specification (checked by `validate`).
  """
  rng = np.random.default_rng(rng)
  levels = _allocation_levels(block_allocation)
  outputs = list(range(min_level, max_level + 1))
  for l in outputs:
    if l not in levels:
      raise ValueError(f'block_allocation {block_allocation} has no block at level {l} '
                       'to serve as its output block.')
    levels.remove(l)
  intermediate = [levels[j] for j in rng.permutation(len(levels))]
  outputs = [outputs[j] for j in rng.permutation(len(outputs))]
  if adjust_levels:
    adjusted = []
    for level in intermediate:
      options = [level + d for d in LEVEL_ADJUSTMENTS
                 if MIN_BLOCK_LEVEL <= level + d <= MAX_BLOCK_LEVEL]
      adjusted.append(int(rng.choice(options)))
    intermediate = adjusted
  specs = []
  for k, level in enumerate(intermediate + outputs):
    is_output = k >= len(intermediate)
    block_fn = str(rng.choice(BLOCK_FNS)) if adjust_block_fns else 'bottleneck'
    candidates = candidate_parents(k + num_stem_blocks, is_output, parent_window=parent_window)
    parents = rng.choice(np.asarray(candidates), 2, replace=False)
    specs.append(BlockSpec(level, block_fn, tuple(sorted(int(p) for p in parents)), is_output))
  return validate(specs, min_level=min_level, max_level=max_level,
                  num_stem_blocks=num_stem_blocks, parent_window=parent_window)


def mutate(specs, rng, *, min_level: int = 3, max_level: int = 7, num_stem_blocks: int = 2,
           parent_window: int | None = PARENT_WINDOW, adjust_levels: bool = True,
           adjust_block_fns: bool = True) -> tuple[BlockSpec, ...]:
  """A neighbour of a valid specification: exactly one change.

  A kind of change is drawn uniformly among those possible, then one change of
  that kind uniformly:
    'permute'   two intermediate blocks (or two output blocks) swap places,
                i.e. their (level, block_fn); the wiring stays;
    'connect'   one parent of one block is replaced by another allowed block;
    'level'     an intermediate block moves one level up or down (L2..L7);
                steps of one keep repeated mutations unbiased, where the
                sampling adjustments {-1, 0, 1, 2} are relative to ResNet;
    'block_fn'  one block switches between bottleneck and residual.

  Args:
    specs: a specification that passes `validate` with the same arguments.
    rng: np.random.Generator, or a seed for one.
    Other arguments: as `sample_spec`.

  Returns:
    The mutated specification (checked by `validate`).
  """
  rules = dict(min_level=min_level, max_level=max_level, num_stem_blocks=num_stem_blocks,
               parent_window=parent_window)
  specs = validate(specs, **rules)
  rng = np.random.default_rng(rng)
  moves = {'permute': [], 'connect': [], 'level': [], 'block_fn': []}
  for i, s in enumerate(specs):
    for j in range(i + 1, len(specs)):
      t = specs[j]
      if s.is_output == t.is_output and (s.level, s.block_fn) != (t.level, t.block_fn):
        moves['permute'].append((i, j))
    for k, old in enumerate(s.input_offsets):
      other = s.input_offsets[1 - k]
      for c in candidate_parents(i + num_stem_blocks, s.is_output, parent_window=parent_window):
        if c not in (old, other):
          moves['connect'].append((i, tuple(sorted((c, other)))))
    if adjust_levels and not s.is_output:
      for level in (s.level - 1, s.level + 1):
        if MIN_BLOCK_LEVEL <= level <= MAX_BLOCK_LEVEL:
          moves['level'].append((i, level))
    if adjust_block_fns:
      moves['block_fn'].append((i,))
  kinds = [k for k, v in moves.items() if v]
  if not kinds:
    raise ValueError('This block specification has no neighbour under the given rules.')
  kind = kinds[rng.integers(len(kinds))]
  move = moves[kind][rng.integers(len(moves[kind]))]
  out = list(specs)
  if kind == 'permute':
    i, j = move
    out[i] = specs[i]._replace(level=specs[j].level, block_fn=specs[j].block_fn)
    out[j] = specs[j]._replace(level=specs[i].level, block_fn=specs[i].block_fn)
  elif kind == 'connect':
    out[move[0]] = specs[move[0]]._replace(input_offsets=move[1])
  elif kind == 'level':
    out[move[0]] = specs[move[0]]._replace(level=move[1])
  else:
    s = specs[move[0]]
    out[move[0]] = s._replace(block_fn=BLOCK_FNS[1 - BLOCK_FNS.index(s.block_fn)])
  return validate(out, **rules)
