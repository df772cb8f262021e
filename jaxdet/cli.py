"""What jaxdet's command-line programs share: the configs/ import path and the config flag."""

import os
import sys

from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_configs_importable():
  """Config files do `from configs import common`: put the checkout's root on sys.path."""
  if os.path.isdir(os.path.join(REPO_ROOT, 'configs')) and REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def define_config_flag():
  """--config=path/to/config.py[:variants]; --config.a.b=value overrides (unknown: error)."""
  config_flags.DEFINE_config_file('config', None, 'Config file, optionally with :variants.',
                                  lock_config=True)
