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

import collections
from pathlib import Path
import sys

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

jax.config.update("jax_numpy_rank_promotion", "raise")

# The order the xdist workers get the files in (--dist loadfile hands out
# whole files). xdist's own order, most tests first, leaves files of a few
# long tests to the end, where one worker finishes them while the other
# waits. So the files that take longest (their tests' seconds, pytest
# --durations of a fresh-clone CI run, 2026-12-07) go first, longest
# first; the others follow as xdist orders them. A test's own order within
# its file is kept.
_LONGEST_FILES = (
    "tests/test_config_commands.py",
    "studies/gan/test_gan.py",
    "tests/test_multiprocess.py",
    "tests/test_studies_page.py",
    "studies/seq_mnist/test_seq_mnist.py",
    "tests/test_accelerator_script.py",
    "studies/norms/test_norm_study.py",
    "tests/test_experiment.py",
    "tests/test_parallel.py",
    "studies/why_bn/test_why_bn.py",
    "tests/test_accumulate.py",
    "tests/test_faults.py",
    "tests/test_reliability.py",
    "tests/test_resnet.py",
    "tests/test_train.py",
    "tests/test_nlp_step.py",
    "tests/test_cnn_step.py",
    "tests/test_extend.py",
    "studies/why_bn/test_landscape.py",
    "tests/test_doctor_cli.py",
    "tests/test_packaging.py",
    "tests/test_new_study.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # xdist's option
    config.option.loadscopereorder = False  # the order below instead


def pytest_collection_modifyitems(config, items):
  if not hasattr(config, "workerinput"):  # not an xdist worker: as collected
    return
  path = lambda item: item.nodeid.split("::")[0]
  tests = collections.Counter(map(path, items))
  rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
  items.sort(key=lambda item: (rank.get(path(item), len(rank)),
                               -tests[path(item)]))  # stable


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
