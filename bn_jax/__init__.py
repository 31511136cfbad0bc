"""bn_jax: batch normalization as pure JAX functions with explicit state.

The library: `core` (BN: init, apply, its backward pass, folding), `norms`
(layer, group, instance and RMS norm), `free` (the BN-free and
batch-independent family: weight standardization and its scaled version,
FRN + TLU, EvoNorm-B0 and -S0; SkipInit as a module), `power` (PowerNorm,
Shen et al., 2020: running quadratic mean, approximate backward pass),
`precise` (PreciseBN, AdaBN, SWA/EMA with recomputed statistics),
`recurrent` (BN-LSTM), the flax drop-ins `nn` (linen) and `nnx`, and tools:
`doctor` (what is wrong with a model's BN layers), `accumulate` (the whole
batch's BN over micro-batches) and `convert` (PyTorch and Keras BN
weights). It needs jax, flax and numpy
only. The training harness that used to live
here (data, models, train, ...) is the lab, `bn_lab` (lab/ in the
repository); `MOVED` maps each old module to its new place.
"""

from bn_jax import accumulate
from bn_jax import convert
from bn_jax import core
from bn_jax import doctor
from bn_jax import free
from bn_jax import nn
from bn_jax import nnx
from bn_jax import norms
from bn_jax import power
from bn_jax import precise
from bn_jax import recurrent

from bn_jax.core import BNParams
from bn_jax.core import BNState
from bn_jax.core import GRAD_MODES
from bn_jax.core import IMPL_CHOICES
from bn_jax.core import IMPLS
from bn_jax.core import STATS_METHODS
from bn_jax.core import STATS_SAMPLINGS
from bn_jax.core import apply
from bn_jax.core import batch_norm_backward
from bn_jax.core import fold_into_preceding
from bn_jax.core import init
from bn_jax.core import moments
from bn_jax.core import renorm_limits
from bn_jax.core import update_running_stats
from bn_jax.norms import group_norm
from bn_jax.norms import instance_norm
from bn_jax.norms import layer_norm
from bn_jax.norms import rms_norm

__version__ = "0.2.0"

# Modules that moved out of the library (bn_jax 0.1) -> where they are now:
# the lab (`bn_lab`, installed by scripts/setup.sh) or a study's folder.
MOVED = {
    "checkpoints": "bn_lab.checkpoints",
    "data": "bn_lab.data",
    "domain_shift": "studies.domain_shift.domain_shift",
    "experiment": "bn_lab.runner",
    "gan": "studies.gan.gan",
    "landscape": "studies.why_bn.landscape",
    "models": "bn_lab.models",
    "parallel": "bn_lab.parallel",
    "probes": "studies.ioffe2015.probes",
    "study": "bn_lab.sweep",
    "train": "bn_lab.train",
    "transfer": "studies.transfer.transfer",
    "workdir": "bn_lab.workdir",
}


def __getattr__(name: str):
  if name in MOVED:
    raise AttributeError(
        f"bn_jax.{name} moved out of the library: import {MOVED[name]} (the "
        "lab and the studies, installed by scripts/setup.sh).")
  raise AttributeError(f"module 'bn_jax' has no attribute {name!r}")
