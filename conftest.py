"""Strict JAX for every test.

Implicit rank promotion (adding a (C,) vector to an (N, C) array) is an
error, so a per-feature array that was not reshaped to broadcast against x
fails loudly instead of broadcasting along the wrong axis. Nothing that
slows the suite (x64, debug_nans, disabled jit) is switched on globally; the
tests that need float64 enter `jax.enable_x64(True)` themselves.

Shared fixtures: `bundled_mnist`, the full MNIST loaded once per session.
The tests live in tests/ (library and lab) and in each study's folder;
both import the shared helpers as `import helpers` (tests/helpers.py).
"""

from pathlib import Path
import sys

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def bundled_mnist(tmp_path_factory):
  """The full MNIST as `load_dataset("mnist")` returns it with no data_dir, no
  $BN_JAX_DATA_DIR and an empty cache: the copy bundled with bn_jax.

  Loaded once per session because reading 60k images takes a while; tests
  share the arrays and must not modify them. No mirrors are known during the
  load, so a missing bundled copy is an error, never a download.
  """
  from bn_lab import data  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as patch:
    patch.delenv(data.DATA_DIR_ENV, raising=False)
    patch.setattr(data, "MIRRORS", {})
    return data.load_dataset(
        "mnist", cache_dir=tmp_path_factory.mktemp("empty-cache"))
