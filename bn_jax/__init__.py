"""bn_jax: batch normalization as pure JAX functions with explicit state."""

from bn_jax.core import BNParams
from bn_jax.core import BNState
from bn_jax.core import GRAD_MODES
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

__version__ = "0.1.0"
