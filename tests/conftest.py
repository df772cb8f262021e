"""Test-wide setup: four simulated CPU devices, so sharding tests run on any machine."""

import os

# Must happen before jax is imported anywhere.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests train the same tiny model: a persistent compilation cache shared by the run
# compiles each step once instead of once per test.
jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('JAXDET_TEST_CACHE', tempfile.mkdtemp(prefix='jaxdet_xla_')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
