"""Tests for jaxdet/models/backbones/spinenet_search.py and the `spec` / DropBlock fields."""

import importlib
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdet import summary
from jaxdet.models.backbones import spinenet
from jaxdet.models.backbones import spinenet_search as search

BlockSpec = spinenet.BlockSpec
SN49 = spinenet.SPINENET_BLOCK_SPECS


def _replace(specs, i, **kw):
  out = list(specs)
  out[i] = out[i]._replace(**kw)
  return out


def _tiny_endpoint_shapes(specs, size=128):
  """Endpoint shapes of a tiny SpineNet on `specs`, by jax.eval_shape only."""
  model = spinenet.SpineNet(block_specs=specs, filter_size_scale=0.125,
                            endpoints_num_filters=8)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  out, _ = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False), images)
  return {l: o.shape for l, o in out.items()}


# ----------------------------------------------------------------------------- JSON


@pytest.mark.parametrize('name', sorted(search.NAMED_SPECS))
def test_json_round_trip(name, tmp_path):
  specs = search.NAMED_SPECS[name]
  text = search.specs_to_json(specs)
  objects = json.loads(text)
  assert objects[1] == {'level': specs[1].level, 'block_fn': specs[1].block_fn,
                        'input_offsets': list(specs[1].input_offsets),
                        'is_output': specs[1].is_output}
  assert len(text.splitlines()) == len(specs) + 2  # one block per line
  assert search.specs_from_json(text) == list(specs)
  path = tmp_path / f'{name}.json'
  path.write_text(text)
  assert search.specs_from_json(path) == list(specs)
  assert search.specs_from_json(str(path)) == list(specs)
  assert search.load_spec(str(path)) == tuple(specs) == search.load_spec(name)


@pytest.mark.parametrize('text, match', [
    ('{"level": 3}', 'expected a JSON list'),
    ('[{"level": 3, "block_fn": "residual", "input_offsets": [0, 1]}]',
     'entry 0: expected exactly the keys'),
    ('[{"level": 3, "block_fn": "residual", "input_offsets": [0, 1], "is_output": true, '
     '"x": 1}]', 'entry 0: expected exactly the keys'),
    ('[{"level": "3", "block_fn": "residual", "input_offsets": [0, 1], "is_output": true}]',
     'entry 0: expected an int level'),
    ('[{"level": 3, "block_fn": "residual", "input_offsets": [0, 1], "is_output": 1}]',
     'entry 0: expected an int level'),
    ('[{"level": 3, ', 'invalid JSON'),
])
def test_json_errors(text, match):
  with pytest.raises(ValueError, match=match):
    search.specs_from_json(text)


def test_missing_file_and_unknown_name(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.json'):
    search.specs_from_json(tmp_path / 'nope.json')
  with pytest.raises(ValueError, match="'spinenet50' is neither a named specification"):
    search.load_spec('spinenet50')


# ----------------------------------------------------------------------------- rules


def test_published_and_named_specs_are_valid():
  for specs in search.NAMED_SPECS.values():
    assert search.validate(specs) == tuple(specs)
  # Lists (as from JSON) are accepted and normalized.
  as_lists = [[s.level, s.block_fn, list(s.input_offsets), s.is_output] for s in SN49]
  assert search.validate(as_lists) == SN49
  # TF Model Garden's 16-entry version adds an L2 output, outside min_level..max_level.
  tfm = SN49 + (BlockSpec(2, 'bottleneck', (2, 13), True),)
  assert search.validate(tfm) == tfm
  # Paper Table 1: blocks per level L2..L7 of the scale-permuted network.
  assert search.block_allocation(SN49) == {2: 1, 3: 2, 4: 4, 5: 4, 6: 2, 7: 2}
  assert search.block_allocation(search.R0_SP53_BLOCK_SPECS) == {
      2: 1, 3: 4, 4: 6, 5: 2, 6: 1, 7: 1}
  assert search.block_allocation(search.R50_BLOCK_SPECS) == {2: 1, 3: 4, 4: 6, 5: 2, 6: 1, 7: 1}
  assert search.BLOCK_ALLOCATIONS['spinenet49'] == search.block_allocation(SN49)
  # R50 is ResNet's scale-decreasing order; R0-SP53 permutes the same blocks.
  levels = [s.level for s in search.R50_BLOCK_SPECS]
  assert levels == sorted(levels)
  assert all(s.block_fn == 'bottleneck' for s in search.R0_SP53_BLOCK_SPECS)


def test_sn49_satisfies_the_window_rule_literally():
  # The longest intermediate connection of SpineNet-49 goes 4 blocks back
  # (block 7 <- block 3); the longer ones (e.g. block 15 <- 5) end in outputs.
  back = [i + 2 - min(s.input_offsets) for i, s in enumerate(SN49) if not s.is_output]
  assert max(back) == 4
  search.validate(SN49, parent_window=4)
  with pytest.raises(ValueError, match=r'Block spec 5 \(block 7\) is an intermediate block but '
                     r'reads block 3; .*last 3 blocks built \(4..6\)'):
    search.validate(SN49, parent_window=3)
  assert any(i + 2 - min(s.input_offsets) > 5 for i, s in enumerate(SN49) if s.is_output)


@pytest.mark.parametrize('change, match', [
    (dict(i=3, level=1), r'Block spec 3 \(block 5\): level 1 is outside L2..L7'),
    (dict(i=3, level=8), r'Block spec 3 \(block 5\): level 8 is outside'),
    (dict(i=4, block_fn='basic'), r"Block spec 4 \(block 6\): unknown block_fn 'basic'"),
    # Block 11 is intermediate: block 5 is 6 back, outside the last 5 (6..10).
    (dict(i=9, input_offsets=(5, 10)),
     r'Block spec 9 \(block 11\) is an intermediate block but reads block 5; .*\(6..10\)'),
    (dict(i=3, input_offsets=(2, 5)), r'Block spec 3 \(block 5\) reads block 5, which is '
                                      r'itself or a later block \(a cycle\)'),
    (dict(i=3, input_offsets=(2, 9)), r'Block spec 3 \(block 5\) reads block 9, which is itself'),
    (dict(i=3, input_offsets=(2, -1)), r'Block spec 3 \(block 5\) reads block -1'),
    (dict(i=6, input_offsets=(7,)), r'Block spec 6 \(block 8\) has 1 parents'),
    (dict(i=6, input_offsets=(5, 6, 7)), r'Block spec 6 \(block 8\) has 3 parents'),
    (dict(i=6, input_offsets=(7, 7)), r'Block spec 6 \(block 8\) reads block 7 twice'),
    (dict(i=14, is_output=False), r'min_level=3, max_level=7 asks for levels \[3, 4, 5, 6, 7\], '
                                  r'but the block specs output levels \[3, 4, 5, 7\]'),
    (dict(i=14, level=7), r'Block spec 14 \(block 16\) and block spec 13 are both output blocks '
                          'of level 7'),
])
def test_validate_names_the_offending_block(change, match):
  i = change.pop('i')
  with pytest.raises(ValueError, match=match):
    search.validate(_replace(SN49, i, **change))


def test_output_blocks_may_read_any_earlier_block():
  # Spec 13 (block 15, the L7 output) reads the stem: 15 blocks back.
  search.validate(_replace(SN49, 13, input_offsets=(0, 14)))
  with pytest.raises(ValueError, match=r'min_level=2'):
    search.validate(SN49, min_level=2, max_level=6)
  with pytest.raises(ValueError, match=r'must be \(level, block_fn, input_offsets, is_output\)'):
    search.validate([(3, 'bottleneck', (0, 1))])


# ----------------------------------------------------------------------------- size


def test_search_space_size_for_resnet50_sized_space():
  # Paper Sec. 3.1 for N = 15 blocks (R0-SP53 / SpineNet-49) and m = 2 stem blocks.
  n, m = 15, 2
  permutations = math.factorial(n - 5) * math.factorial(5)
  connections = math.prod(math.comb(i, 2) for i in range(m, n + m))  # prod_{i=m}^{N+m-1}
  adjustments = 4**(n - 5) * 2**n
  expected = permutations * connections * adjustments
  assert search.search_space_size(15) == expected
  assert expected == 12492903838757739560999325794304000000000  # ~1.25e40
  assert search.search_space_size(15, block_adjustments=False) == permutations * connections
  # Sec. 5.1's restriction: the 10 intermediate blocks read the last 5 blocks.
  windowed = math.prod(math.comb(min(m + k, 5), 2) for k in range(10)) * math.prod(
      math.comb(m + k, 2) for k in range(10, 15))
  assert search.search_space_size(15, parent_window=5) == permutations * windowed * adjustments
  # Only output blocks: 5! orders, C(2,2) C(3,2) ... C(6,2) connections, 2^5 types.
  assert search.search_space_size(5) == 120 * 1 * 3 * 6 * 10 * 15 * 32


def test_connection_count_matches_the_rules_by_brute_force():
  # Count, block by block, the parent pairs that `validate` accepts in the
  # SpineNet-49 layout (10 intermediate blocks, then 5 outputs); their product
  # is the connection factor of the restricted space.
  count = 1
  for i, s in enumerate(SN49):
    ok = 0
    for a in range(i + 2):
      for b in range(a + 1, i + 2):
        try:
          search.validate(_replace(SN49, i, input_offsets=(a, b)))
          ok += 1
        except ValueError:
          pass
    count *= ok
  per_permutation = search.search_space_size(15, parent_window=5, block_adjustments=False)
  assert count * math.factorial(10) * math.factorial(5) == per_permutation


# ----------------------------------------------------------------------------- sampling


def _kind_of_change(old, new):
  diff = [i for i, (a, b) in enumerate(zip(old, new)) if a != b]
  if len(diff) == 2:
    i, j = diff
    assert (new[i].level, new[i].block_fn) == (old[j].level, old[j].block_fn)
    assert (new[j].level, new[j].block_fn) == (old[i].level, old[i].block_fn)
    assert new[i].input_offsets == old[i].input_offsets
    return 'permute'
  assert len(diff) == 1, diff
  a, b = old[diff[0]], new[diff[0]]
  changed = [f for f in BlockSpec._fields if getattr(a, f) != getattr(b, f)]
  assert len(changed) == 1, changed
  if changed == ['input_offsets']:
    assert len(set(a.input_offsets) & set(b.input_offsets)) == 1  # one parent replaced
    return 'connect'
  if changed == ['level']:
    assert abs(a.level - b.level) == 1 and not a.is_output
  return changed[0]


def test_samples_and_mutations_are_valid_and_build():
  rng = np.random.default_rng(0)
  samples = [search.sample_spec(rng) for _ in range(50)]
  intermediate_levels = set()
  for s in samples:
    assert search.validate(s) == s
    assert len(s) == 15
    # Output blocks L3..L7 come last, in some order (Sec. 3.1).
    assert sorted(b.level for b in s[10:] if b.is_output) == [3, 4, 5, 6, 7]
    assert not any(b.is_output for b in s[:10])
    intermediate_levels |= {b.level for b in s[:10]}
  assert intermediate_levels == {2, 3, 4, 5, 6, 7}  # level adjustments reach L6/L7
  assert len({s for s in samples}) == 50
  # Without block adjustments the blocks are ResNet-50's (R0-SP53's allocation).
  plain = search.sample_spec(1, adjust_levels=False, adjust_block_fns=False)
  assert search.block_allocation(plain) == search.BLOCK_ALLOCATIONS['r0_sp53']
  assert {b.block_fn for b in plain} == {'bottleneck'}

  spec, kinds = SN49, set()
  for _ in range(50):
    new = search.mutate(spec, rng)
    assert search.validate(new) == new
    kinds.add(_kind_of_change(spec, new))
    spec = new
  assert kinds == {'permute', 'connect', 'level', 'block_fn'}

  for specs in (samples[0], samples[1], spec):
    assert _tiny_endpoint_shapes(specs) == {l: (1, 128 // 2**l, 128 // 2**l, 8)
                                            for l in range(3, 8)}


def test_sample_rejects_an_allocation_without_output_level():
  with pytest.raises(ValueError, match='no block at level 7'):
    search.sample_spec(0, block_allocation={2: 1, 3: 4, 4: 6, 5: 3, 6: 1})


# ----------------------------------------------------------------------------- config


def _config(arg='runlocal'):
  return importlib.import_module('configs.spinenet49s').get_config(arg)


def test_config_spec_from_json_file(tmp_path):
  path = tmp_path / 'r0_sp53.json'
  path.write_text(search.specs_to_json(search.R0_SP53_BLOCK_SPECS))
  config = _config()
  assert config.model.backbone.spec == ''
  default = summary.summarize(config, with_flops=False)['modules']
  config.model.backbone.spec = str(path)
  from_file = summary.summarize(config, with_flops=False)['modules']
  # The same count as building SpineNet on the specification directly.
  cfg = {k: v for k, v in config.model.backbone.items() if k not in ('name', 'spec')}
  model = spinenet.SpineNet(block_specs=search.R0_SP53_BLOCK_SPECS, **cfg)
  images = jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  expected = sum(x.size for x in jax.tree.leaves(variables['params']))
  assert from_file['backbone'] == expected != default['backbone']
  assert from_file['head'] == default['head']
  config.model.backbone.spec = 'r0_sp53'
  assert summary.summarize(config, with_flops=False)['modules'] == from_file


def test_config_spec_is_validated_before_building(tmp_path):
  path = tmp_path / 'bad.json'
  path.write_text(search.specs_to_json(_replace(SN49, 9, input_offsets=(5, 10))))
  config = _config()
  config.model.backbone.spec = str(path)
  with pytest.raises(ValueError, match=r'Block spec 9 \(block 11\) is an intermediate block'):
    summary.summarize(config, with_flops=False)
  with pytest.raises(ValueError, match='both spec'):
    jax.eval_shape(lambda x: spinenet.SpineNet(spec='r50', block_specs=SN49).init(
        jax.random.key(0), x, train=False), jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32))


# ----------------------------------------------------------------------------- DropBlock


@pytest.mark.parametrize('protocol, keep_prob', [('A', 0.9), ('B', 1.0), ('C', 1.0)])
def test_protocol_a_turns_dropblock_on(protocol, keep_prob):
  backbone = _config(f'protocol={protocol}').model.backbone
  assert backbone.dropblock_keep_prob == keep_prob
  assert backbone.dropblock_size == 7
  model = spinenet.build(backbone, 'float32')
  assert (model.dropblock_keep_prob, model.dropblock_size) == (keep_prob, 7)
  # keep_prob falls linearly over the whole run, following num_train_steps overrides.
  config = _config(f'protocol={protocol}')
  assert config.model.backbone.dropblock_warmup_steps == config.num_train_steps
  config.num_train_steps = 123
  assert config.model.backbone.dropblock_warmup_steps == 123
  # The ResNet-50-FPN baseline drops blocks of levels 4 and 5 under protocol A.
  resnet = importlib.import_module('configs.retinanet_resnet50').get_config(
      f'protocol={protocol}')
  assert resnet.model.backbone.dropblock_keep_prob == keep_prob
  assert resnet.model.backbone.dropblock_warmup_steps == resnet.num_train_steps


def test_dropblock_in_train_mode_only():
  # A two-block specification keeps the compiled network tiny: an L4 residual
  # block (block 2) feeding the L3 output block. DropBlock acts on group 0.
  specs = [(4, 'residual', (0, 1), False), (3, 'bottleneck', (1, 2), True)]
  model = spinenet.SpineNet(min_level=3, max_level=3, block_specs=specs,
                            filter_size_scale=0.125, endpoints_num_filters=8,
                            dropblock_keep_prob=0.5, dropblock_size=3)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  rng = np.random.default_rng(0)

  def fill(path, s):
    if path[-1].key == 'kernel':
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    return jnp.full(s.shape, 1.0 if path[-1].key in ('scale', 'var') else 0.0, s.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  capture = lambda mdl, _: mdl.name in ('group0', 'dropblock0')

  @jax.jit
  def train(key):
    out, state = model.apply(variables, images, train=True, rngs={'dropblock': key},
                             mutable=['batch_stats', 'intermediates'],
                             capture_intermediates=capture)
    return out[3], state['intermediates']

  @jax.jit
  def evaluate():
    out, state = model.apply(variables, images, train=False, mutable=['intermediates'],
                             capture_intermediates=capture)
    return out[3], state['intermediates']

  out1, inter = train(jax.random.key(1))
  before = np.asarray(inter['group0']['__call__'][0])  # [2, 4, 4, 32]
  after = np.asarray(inter['dropblock0']['__call__'][0])
  # Train mode: squares zeroed, the rest rescaled by one factor (1 / kept fraction).
  dropped = (before != 0) & (after == 0)
  assert 0.2 < dropped.sum() / (before != 0).sum() < 0.9
  kept = after != 0
  ratio = after[kept] / before[kept]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  assert ratio[0] > 1.0
  # The mask comes from the 'dropblock' stream: same key, same output.
  np.testing.assert_array_equal(train(jax.random.key(1))[0], out1)
  assert not np.allclose(train(jax.random.key(2))[0], out1)
  with pytest.raises(Exception, match='dropblock'):  # flax InvalidRngError, while tracing
    jax.eval_shape(lambda: model.apply(variables, images, train=True, mutable=['batch_stats']))
  # Eval mode: the identity.
  _, inter = evaluate()
  np.testing.assert_array_equal(inter['group0']['__call__'][0],
                                inter['dropblock0']['__call__'][0])
