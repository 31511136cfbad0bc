"""The convex probe of frozen features, and what the features look like.

A readout trained by Adam for a fixed number of steps on fixed features
may stop short of its optimum, and then a comparison of two feature sets
compares two optimizers' progress. The probe here is the optimum itself:
multinomial logistic regression (a bias per class, an L2 penalty on the
weights) solved in float64 by scipy's L-BFGS down to a gradient tolerance,
the penalty chosen by stratified k-fold cross-validation on the labeled
budget alone (no image outside the budget, no test image). Its final
gradient norm and training accuracy are recorded, so that convergence is
visible on the page.

What the features are: their effective rank (Roy & Vetterli 2007: exp of
the entropy of the normalized singular values of the centred feature
matrix), their numerical rank, and the fraction of sigmoid outputs that
are saturated (within `SATURATION` of 0 or 1), where the gradient of a
unit, and its information about its input, vanish.

NumPy and scipy only, float64: independent of the JAX code that trains.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import scipy.optimize
import threadpoolctl

# The penalties cross-validation chooses among (the L2 weight on the mean
# cross-entropy: loss = mean CE + l2 / 2 * |W|^2). Features are sigmoid
# outputs in (0, 1), so one grid fits every norm.
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FOLDS = 5
# L-BFGS stops when the largest gradient entry is below this (or at
# MAX_ITERATIONS, which the probe records as not converged).
GRADIENT_TOLERANCE = 1e-6
MAX_ITERATIONS = 20_000
# A sigmoid output below this or above 1 - this counts as saturated.
SATURATION = 0.05


# ----------------------------------------------------------------------------
# Multinomial logistic regression.


def single_threaded_blas():
  """NumPy's BLAS on one thread inside the `with` (threadpoolctl; the
  setting is restored on exit). The probe's products are small (1,000 x
  100 by 100 x 5), and handing each to OpenBLAS's threads on a loaded
  machine, beside JAX's, made an L-BFGS iteration about 10 times slower
  (32 s against 2.6 s for one cross-validation on a budget of 1,000,
  2026-12-08, under load)."""
  return threadpoolctl.threadpool_limits(limits=1, user_api="blas")


def _unpack(theta: np.ndarray, dim: int, classes: int):
  return theta[:dim * classes].reshape(dim, classes), theta[dim * classes:]


# Shifted logits below this are raised to it: exp of it is 1e-261, nothing
# next to the largest class's 1, and below about -708 exp returns
# subnormal numbers, which the CPU computes with tens of times slower
# (a fit at a small penalty, with large weights, spent most of its time
# there).
LOGIT_FLOOR = -600.0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.maximum(logits - logits.max(axis=1, keepdims=True),
                      LOGIT_FLOOR)  # exp can neither overflow nor go subnormal
  return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def loss_and_gradient(theta: np.ndarray, features: np.ndarray,
                      onehot: np.ndarray, l2: float,
                      ) -> tuple[float, np.ndarray]:
  """Mean softmax cross-entropy of features @ W + b, plus l2 / 2 * |W|^2
  (the bias unpenalized), and its gradient in theta = (W.ravel(), b)."""
  n, dim = features.shape
  weights, bias = _unpack(theta, dim, onehot.shape[1])
  log_probs = _log_softmax(features @ weights + bias)
  loss = -np.sum(onehot * log_probs) / n + 0.5 * l2 * np.sum(weights ** 2)
  residual = (np.exp(log_probs) - onehot) / n
  gradient = np.concatenate([(features.T @ residual + l2 * weights).ravel(),
                             residual.sum(axis=0)])
  return float(loss), gradient


@dataclasses.dataclass(frozen=True)
class Probe:
  """A fitted probe: weights (dim, C), bias (C,), and how the fit ended."""
  weights: np.ndarray
  bias: np.ndarray
  l2: float
  gradient_norm: float  # the L2 norm of the full gradient at the end
  iterations: int
  converged: bool  # the largest gradient entry below GRADIENT_TOLERANCE

  def predict(self, features: np.ndarray) -> np.ndarray:
    return np.argmax(np.asarray(features, np.float64) @ self.weights
                     + self.bias, axis=1)

  def accuracy(self, features, labels) -> float:
    return float(np.mean(self.predict(features) == np.asarray(labels)))

  def mean_log_loss(self, features, labels) -> float:
    """Mean cross-entropy (no penalty) on (features, labels)."""
    log_probs = _log_softmax(np.asarray(features, np.float64)
                             @ self.weights + self.bias)
    return float(-np.mean(log_probs[np.arange(len(labels)),
                                    np.asarray(labels)]))


def fit(features, labels, l2: float, num_classes: int | None = None,
        tolerance: float = GRADIENT_TOLERANCE,
        start: Probe | None = None) -> Probe:
  """The penalized multinomial logistic regression of labels (0..C-1) on
  features, from zero (or from `start`, a fit at another penalty: the
  same optimum, sooner), by L-BFGS in float64 until the largest gradient
  entry is below `tolerance` (the loss is strictly convex in W for l2 > 0:
  a unique optimum in W)."""
  x = np.asarray(features, np.float64)
  labels = np.asarray(labels)
  classes = num_classes or int(labels.max()) + 1
  onehot = np.eye(classes)[labels]
  dim = x.shape[1]
  theta = (np.zeros(dim * classes + classes) if start is None else
           np.concatenate([start.weights.ravel(), start.bias]))
  result = scipy.optimize.minimize(
      loss_and_gradient, theta,
      args=(x, onehot, l2), jac=True, method="L-BFGS-B",
      # ftol=0: stop on the gradient only, never on a small decrease.
      options={"gtol": tolerance, "ftol": 0.0, "maxiter": MAX_ITERATIONS,
               "maxfun": 2 * MAX_ITERATIONS, "maxcor": 30})
  _, gradient = loss_and_gradient(result.x, x, onehot, l2)
  weights, bias = _unpack(result.x, dim, classes)
  return Probe(weights=weights, bias=bias, l2=float(l2),
               gradient_norm=float(np.linalg.norm(gradient)),
               iterations=int(result.nit),
               converged=bool(np.max(np.abs(gradient)) <= tolerance))


def stratified_folds(labels, folds: int, seed: int) -> np.ndarray:
  """Each example's fold (0..folds-1): every class dealt round-robin over
  the folds in a random order by `seed`, so each fold has each class's
  share."""
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  fold = np.empty(labels.shape[0], np.int64)
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    fold[members] = np.arange(members.size) % folds
  return fold


def cross_validated_l2(features, labels, seed: int,
                       grid: Sequence[float] = L2_GRID, folds: int = FOLDS,
                       num_classes: int | None = None) -> dict[float, float]:
  """Each penalty's mean held-out cross-entropy over `folds` stratified
  folds of (features, labels): the budget's own validation. Fewer folds
  where the smallest class has fewer examples than `folds` (so that no
  fold is empty); ValueError where it has fewer than 2."""
  labels = np.asarray(labels)
  smallest = int(np.bincount(labels).min()) if labels.size else 0
  if smallest < 2:
    raise ValueError(f"cross-validation needs 2 examples of each class; "
                     f"the smallest class has {smallest}.")
  folds = min(folds, smallest)
  fold = stratified_folds(labels, folds, seed)
  classes = num_classes or int(labels.max()) + 1
  scores, previous = {}, [None] * folds
  # From the largest penalty down, each fold's fit starting from its fit
  # at the penalty before: small penalties need many iterations from zero.
  for l2 in sorted(grid, reverse=True):
    losses = []
    for k in range(folds):
      held = fold == k
      previous[k] = fit(features[~held], labels[~held], l2, classes,
                        start=previous[k])
      losses.append(previous[k].mean_log_loss(features[held], labels[held]))
    scores[float(l2)] = float(np.mean(losses))
  return {float(l2): scores[float(l2)] for l2 in grid}


def select_and_fit(features, labels, seed: int,
                   grid: Sequence[float] = L2_GRID, folds: int = FOLDS,
                   num_classes: int | None = None,
                   ) -> tuple[Probe, dict[float, float]]:
  """The probe on all of (features, labels) at the penalty with the lowest
  cross-validated loss (the larger penalty on a tie), and every penalty's
  score."""
  with single_threaded_blas():
    scores = cross_validated_l2(features, labels, seed, grid, folds,
                                num_classes)
    best = min(scores, key=lambda l2: (scores[l2], -l2))
    return fit(features, labels, best, num_classes), scores


# ----------------------------------------------------------------------------
# The features.


def singular_values(features) -> np.ndarray:
  """Of the feature matrix (examples x units) with each unit's mean
  removed: the readout has a bias, so a constant offset carries nothing."""
  x = np.asarray(features, np.float64)
  return np.linalg.svd(x - x.mean(axis=0), compute_uv=False)


def effective_rank(features) -> float:
  """exp(H(p)) with p the singular values divided by their sum (Roy &
  Vetterli 2007): between 1 (one direction) and the number of units (all
  equal)."""
  s = singular_values(features)
  p = s[s > 0] / s.sum()
  return float(np.exp(-np.sum(p * np.log(p))))


def numerical_rank(features, relative: float = 1e-3) -> int:
  """The singular values above `relative` times the largest: directions
  with at least a thousandth of the strongest one's spread (float32
  features carry about 1e-7, so this is far above rounding)."""
  s = singular_values(features)
  return int(np.sum(s > relative * s[0])) if s.size and s[0] > 0 else 0


def saturated_fraction(activations, margin: float = SATURATION) -> float:
  """The fraction of sigmoid outputs within `margin` of 0 or 1."""
  a = np.asarray(activations)
  return float(np.mean((a < margin) | (a > 1 - margin)))
