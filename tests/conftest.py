"""Strict JAX for every test.

Implicit rank promotion (adding a (C,) vector to an (N, C) array) is an
error, so a per-feature array that was not reshaped to broadcast against x
fails loudly instead of broadcasting along the wrong axis. Nothing that
slows the suite (x64, debug_nans, disabled jit) is switched on globally; the
tests that need float64 enter `jax.enable_x64(True)` themselves.
"""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
