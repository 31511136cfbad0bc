"""bn_jax.free (the BN-free family) and its linen and nnx drop-ins.

Two independent references:
  * float64 NumPy transcriptions of the papers' equations (Qiao et al.
    2019, Brock et al. 2021, Singh & Krishnan 2020, Liu et al. 2020), run
    everywhere: values, and gradients by central differences of the NumPy
    function, against bn_jax in float64 and float32;
  * timm's layers (StdConv2d, ScaledStdConv2d, FilterResponseNormTlu2d,
    EvoNorm2dB0, EvoNorm2dS0) under the Python that $BN_JAX_TORCH_PYTHON
    names (helpers.run_torch; skipped where it is unset or has no timm):
    values, the gradients of a random cotangent w.r.t. the input and every
    parameter, EvoNorm-B0's running variance after a step and its
    evaluation mode, NCHW/OIHW transposed to NHWC/HWIO.
Then jit, vmap (and a named axis), bfloat16 inputs, the modules against the
pure functions, the errors, SkipInit, and the lab's registry.
"""

from __future__ import annotations

import functools

import chex
from flax import nnx
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import helpers
import pytest

from bn_jax import free
from bn_jax import nn as bn_nn
from bn_jax import nnx as bn_nnx

# x (N, H, W, C), and the options of each layer in the comparisons.
SHAPE = (3, 4, 3, 4)
FRN_EPS = 1e-5
B0_EPS = 1e-3
B0_MOMENTUM = 0.7  # timm's momentum 0.3
S0_EPS = 1e-5
S0_GROUPS = 2
WS_EPS = 1e-6
GAMMA = 1.7139  # NF-ResNets' ReLU gamma


def _arrays(seed=0, shape=SHAPE):
  """float64 x, cotangent dy, and per-channel parameters away from their
  initial values (so that every term of each formula counts)."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  return dict(
      x=0.5 + 2.0 * rng.standard_normal(shape),
      dy=rng.standard_normal(shape),
      scale=1.0 + 0.3 * rng.standard_normal(c),
      bias=0.2 * rng.standard_normal(c),
      tau=0.3 * rng.standard_normal(c),
      v=1.0 + 0.3 * rng.standard_normal(c),
      running_var=rng.uniform(0.5, 2.0, c))


def _kernel_arrays(seed=1, shape=(3, 3, 2, 6)):
  """float64 HWIO kernels, one for feature_group_count=2 (`kernel`) and
  one for a single group (`kernel_full`, twice the inputs), a gain, a bias,
  an input of shape[-2] * 2 channels and its cotangent."""
  rng = np.random.default_rng(seed)
  out = shape[-1]
  return dict(
      kernel=0.3 + rng.standard_normal(shape),
      kernel_full=0.3 + rng.standard_normal(
          shape[:-2] + (2 * shape[-2], out)),
      gain=1.0 + 0.3 * rng.standard_normal(out),
      bias=0.2 * rng.standard_normal(out),
      x=rng.standard_normal((2, 5, 4, shape[-2] * 2)),
      dy=rng.standard_normal((2, 5, 4, out)))


# ----------------------------------------------------------------------------
# The papers' equations in float64 NumPy.


def np_weight_standardize(w, gain=None, *, eps, scaled=False, gamma=1.0):
  """Qiao et al. (2019), eq. 5-6; Brock et al. (2021), sec. 3 (with
  timm's eps under the square root)."""
  axes = tuple(range(w.ndim - 1))
  mean = w.mean(axes, keepdims=True)
  var = ((w - mean) ** 2).mean(axes, keepdims=True)
  w_hat = (w - mean) / np.sqrt(var + eps)
  if scaled:
    w_hat = w_hat * gamma / np.sqrt(np.prod(w.shape[:-1]))
  return w_hat if gain is None else w_hat * gain


def np_frn_tlu(x, scale, bias, tau, *, eps):
  """Singh & Krishnan (2020), eq. 1-3 and 5."""
  nu2 = (x ** 2).mean(axis=(1, 2), keepdims=True)
  y = scale * x / np.sqrt(nu2 + eps) + bias
  return y if tau is None else np.maximum(y, tau)


def np_evonorm_b0(x, scale, bias, v, running_var, *, training, momentum,
                  eps):
  """Liu et al. (2020), EvoNorm-B0 (table 1), with timm's running
  variance: (y, new running variance)."""
  if training:
    var = x.var(axis=(0, 1, 2))  # biased
    n = x.size / x.shape[-1]
    new_var = momentum * running_var + (1 - momentum) * var * n / (n - 1)
  else:
    var, new_var = running_var, running_var
  instance_var = x.var(axis=(1, 2), keepdims=True)
  denominator = np.maximum(np.sqrt(var + eps),
                           v * x + np.sqrt(instance_var + eps))
  return x / denominator * scale + bias, new_var


def np_evonorm_s0(x, scale, bias, v, *, groups, eps):
  """Liu et al. (2020), EvoNorm-S0 (table 1)."""
  n, h, w, c = x.shape
  grouped = x.reshape(n, h, w, groups, c // groups)
  var = grouped.var(axis=(1, 2, 4), keepdims=True)
  std = np.broadcast_to(np.sqrt(var + eps), grouped.shape).reshape(x.shape)
  return x / (1.0 + np.exp(-v * x)) / std * scale + bias


def numeric_vjp(f, arrays, dy, h=1e-6):
  """d sum(f(*arrays) * dy) / d each array, by central differences."""
  grads = []
  for i, a in enumerate(arrays):
    grad = np.zeros_like(a)
    for index in np.ndindex(a.shape):
      shifted = []
      for sign in (1.0, -1.0):
        b = a.copy()
        b[index] += sign * h
        args = list(arrays)
        args[i] = b
        shifted.append(np.sum(f(*args) * dy))
      grad[index] = (shifted[0] - shifted[1]) / (2 * h)
    grads.append(grad)
  return grads


def jax_vjp(f, arrays, dy, dtype):
  """(y, d sum(f * dy) / d each array) of a JAX function, in `dtype`."""
  args = [jnp.asarray(a, dtype) for a in arrays]
  y, vjp = jax.vjp(f, *args)
  return y, vjp(jnp.asarray(dy, y.dtype))


# Each case: (bn_jax function of the differentiated arrays, NumPy
# function of the same, the names of those arrays among _arrays()).
NUMPY_CASES = {
    "frn_tlu": (
        lambda x, s, b, t: free.frn_tlu(x, s, b, t, epsilon=FRN_EPS),
        lambda x, s, b, t: np_frn_tlu(x, s, b, t, eps=FRN_EPS),
        ("x", "scale", "bias", "tau")),
    "frn_without_tlu": (
        lambda x, s, b: free.frn_tlu(x, s, b, None, epsilon=FRN_EPS),
        lambda x, s, b: np_frn_tlu(x, s, b, None, eps=FRN_EPS),
        ("x", "scale", "bias")),
    "evonorm_b0_train": (
        lambda x, s, b, v, r: free.evonorm_b0(
            x, s, b, v, r, training=True, momentum=B0_MOMENTUM,
            epsilon=B0_EPS)[0],
        lambda x, s, b, v, r: np_evonorm_b0(
            x, s, b, v, r, training=True, momentum=B0_MOMENTUM,
            eps=B0_EPS)[0],
        ("x", "scale", "bias", "v", "running_var")),
    "evonorm_b0_eval": (
        lambda x, s, b, v, r: free.evonorm_b0(
            x, s, b, v, r, training=False, epsilon=B0_EPS)[0],
        lambda x, s, b, v, r: np_evonorm_b0(
            x, s, b, v, r, training=False, momentum=None, eps=B0_EPS)[0],
        ("x", "scale", "bias", "v", "running_var")),
    "evonorm_s0": (
        lambda x, s, b, v: free.evonorm_s0(x, s, b, v, num_groups=S0_GROUPS,
                                           epsilon=S0_EPS),
        lambda x, s, b, v: np_evonorm_s0(x, s, b, v, groups=S0_GROUPS,
                                         eps=S0_EPS),
        ("x", "scale", "bias", "v")),
}


@pytest.mark.parametrize("case", sorted(NUMPY_CASES))
def test_norms_match_the_papers_equations(case):
  """Values and gradients (x and every parameter) against float64 NumPy:
  to rounding in float64, to float32's precision in float32."""
  ours, reference, names = NUMPY_CASES[case]
  arrays = _arrays()
  args, dy = [arrays[n] for n in names], arrays["dy"]
  y_ref = reference(*args)
  grads_ref = numeric_vjp(reference, args, dy)
  with jax.enable_x64(True):
    y, grads = jax_vjp(ours, args, dy, jnp.float64)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, g, g_ref in zip(names, grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7,
                                 err_msg=name)
  y, grads = jax_vjp(ours, args, dy, jnp.float32)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for name, g, g_ref in zip(names, grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4, err_msg=name)


def test_evonorm_b0_running_variance_matches_the_equation():
  a = _arrays()
  args = [a[n] for n in ("x", "scale", "bias", "v", "running_var")]
  _, new_ref = np_evonorm_b0(*args, training=True, momentum=B0_MOMENTUM,
                             eps=B0_EPS)
  with jax.enable_x64(True):
    _, new = free.evonorm_b0(*map(jnp.asarray, args), training=True,
                             momentum=B0_MOMENTUM, epsilon=B0_EPS)
    np.testing.assert_allclose(new, new_ref, rtol=1e-12)
  _, new = free.evonorm_b0(*(jnp.asarray(v, jnp.float32) for v in args),
                           training=True, momentum=B0_MOMENTUM,
                           epsilon=B0_EPS)
  assert new.dtype == jnp.float32
  np.testing.assert_allclose(new, new_ref, rtol=1e-5)


@pytest.mark.parametrize("scaled,shape", [
    (False, (3, 3, 4, 5)), (True, (3, 3, 4, 5)), (True, (6, 5))])
def test_weight_standardize_matches_the_papers_equations(scaled, shape):
  """Kernel and gain: values, and gradients by central differences."""
  rng = np.random.default_rng(2)
  kernel = 0.3 + rng.standard_normal(shape)
  gain = 1.0 + 0.3 * rng.standard_normal(shape[-1])
  dy = rng.standard_normal(shape)
  options = dict(eps=WS_EPS, scaled=scaled, gamma=GAMMA if scaled else 1.0)
  reference = functools.partial(np_weight_standardize, **options)
  ours = functools.partial(free.weight_standardize, **options)
  w_ref = reference(kernel, gain)
  grads_ref = numeric_vjp(reference, [kernel, gain], dy)
  with jax.enable_x64(True):
    w, grads = jax_vjp(lambda k, g: ours(k, gain=g), [kernel, gain], dy,
                       jnp.float64)
    np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
      np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-7)
  w = ours(jnp.asarray(kernel, jnp.float32))  # no gain: gain 1
  np.testing.assert_allclose(w, reference(kernel), rtol=1e-5, atol=1e-5)
  axes = tuple(range(len(shape) - 1))
  np.testing.assert_allclose(np.mean(w, axes), 0.0, atol=1e-6)
  expected_std = GAMMA / np.sqrt(np.prod(shape[:-1])) if scaled else 1.0
  np.testing.assert_allclose(np.std(w, axes), expected_std, rtol=1e-5)


# ----------------------------------------------------------------------------
# timm, in a process of its own.

_TIMM = r"""
import importlib.util, sys, types


def import_timm_layers():
  try:
    import timm.layers
    return timm.layers
  except ImportError:
    if importlib.util.find_spec("timm") is None:
      return None
  # timm's layers need torchvision only for FrozenBatchNorm2d (its package
  # __init__ also imports timm.data, which needs the rest of it): where
  # torch has no matching torchvision (a CPU wheel), load timm.layers alone.
  for name in [n for n in sys.modules
               if n.split(".")[0] in ("timm", "torchvision")]:
    del sys.modules[name]
  def stub(name, **attributes):
    module = types.ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module
  stub("torchvision")
  stub("torchvision.ops")
  stub("torchvision.ops.misc", FrozenBatchNorm2d=type(
      "FrozenBatchNorm2d", (torch.nn.Module,), {}))
  stub("timm").__path__ = list(
      importlib.util.find_spec("timm").submodule_search_locations)
  import timm.layers
  return timm.layers


def nchw(a):
  return torch.tensor(a.transpose(0, 3, 1, 2), requires_grad=True)


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def run(name, module, x, dy, params):
  # y and the gradients of sum(y * dy) w.r.t. x and `params` (timm name ->
  # our name), in NHWC and our shapes.
  xt = nchw(x)
  y = module(xt)
  y.backward(torch.tensor(dy.transpose(0, 3, 1, 2)))
  outputs[name + "/y"] = nhwc(y)
  outputs[name + "/dx"] = nhwc(xt.grad)
  for timm_name, ours in params.items():
    grad = getattr(module, timm_name).grad.numpy()
    if ours == "kernel":  # OIHW -> HWIO
      grad = grad.transpose(2, 3, 1, 0)
    outputs[name + "/d" + ours] = grad if ours == "kernel" else grad.reshape(
        -1)
    getattr(module, timm_name).grad = None


def set_channel_params(module, **values):
  with torch.no_grad():
    for name, value in values.items():
      getattr(module, name).copy_(torch.tensor(value).reshape(
          getattr(module, name).shape))


layers = import_timm_layers()
if layers is None:
  outputs["timm_missing"] = np.array(1)
else:
  torch.set_default_dtype(torch.float64)
  a = inputs
  x, dy = a["x"], a["dy"]
  c = x.shape[-1]
  affine = dict(weight=a["scale"], bias=a["bias"])

  frn = layers.FilterResponseNormTlu2d(c, eps=a["frn_eps"].item())
  set_channel_params(frn, tau=a["tau"], **affine)
  run("frn", frn, x, dy, dict(weight="scale", bias="bias", tau="tau"))

  s0 = layers.EvoNorm2dS0(c, groups=int(a["s0_groups"]),
                          eps=a["s0_eps"].item())
  set_channel_params(s0, v=a["v"], **affine)
  run("s0", s0, x, dy, dict(weight="scale", bias="bias", v="v"))

  b0 = layers.EvoNorm2dB0(c, momentum=a["b0_timm_momentum"].item(),
                          eps=a["b0_eps"].item())
  set_channel_params(b0, v=a["v"], running_var=a["running_var"], **affine)
  b0.train()
  run("b0_train", b0, x, dy, dict(weight="scale", bias="bias", v="v"))
  outputs["b0_train/running_var"] = b0.running_var.numpy().copy()
  set_channel_params(b0, running_var=a["running_var"])
  b0.eval()
  run("b0_eval", b0, a["x_eval"], dy, dict(weight="scale", bias="bias",
                                           v="v"))
  outputs["b0_eval/running_var"] = b0.running_var.numpy().copy()

  in_channels, out = a["conv_x"].shape[-1], a["kernel"].shape[-1]
  for name, cls, extra, kernel in (
      ("ws", layers.StdConv2d, dict(groups=1), a["kernel_full"]),
      ("sws", layers.ScaledStdConv2d, dict(groups=2, gamma=a[
          "gamma"].item()), a["kernel"])):  # HWIO
    conv = cls(in_channels, out, 3, bias=True, eps=a["ws_eps"].item(),
               **extra)
    with torch.no_grad():
      conv.weight.copy_(torch.tensor(kernel.transpose(3, 2, 0, 1)))
      conv.bias.copy_(torch.tensor(a["conv_bias"]))
      if name == "sws":
        conv.gain.copy_(torch.tensor(a["gain"]).reshape(out, 1, 1, 1))
    params = dict(weight="kernel", bias="bias")
    if name == "sws":
      params["gain"] = "gain"
    run(name, conv, a["conv_x"], a["conv_dy"], params)
"""


@pytest.fixture(scope="module")
def timm_outputs():
  """Everything timm computes, in one process (torch and timm load once)."""
  a, k = _arrays(), _kernel_arrays()
  inputs = dict(
      x=a["x"], dy=a["dy"], scale=a["scale"], bias=a["bias"], tau=a["tau"],
      v=a["v"], running_var=a["running_var"], x_eval=_arrays(seed=3)["x"],
      kernel=k["kernel"], kernel_full=k["kernel_full"], gain=k["gain"], conv_bias=k["bias"],
      conv_x=k["x"], conv_dy=k["dy"], frn_eps=np.array(FRN_EPS),
      s0_eps=np.array(S0_EPS), s0_groups=np.array(S0_GROUPS),
      b0_eps=np.array(B0_EPS), b0_timm_momentum=np.array(1 - B0_MOMENTUM),
      ws_eps=np.array(WS_EPS), gamma=np.array(GAMMA))
  outputs = helpers.run_torch(_TIMM, inputs)
  if "timm_missing" in outputs:
    pytest.skip("timm reference: install timm into $BN_JAX_TORCH_PYTHON's "
                "environment (pip install timm)")
  return outputs


def _grads_and_values(f, arrays, dy, dtype):
  """{"y": y, "d<name>": gradient} of f(**arrays) with cotangent dy."""
  names = list(arrays)
  y, grads = jax_vjp(lambda *v: f(**dict(zip(names, v))),
                     [arrays[n] for n in names], dy, dtype)
  return {"y": y, **{"d" + n: g for n, g in zip(names, grads)}}


def _conv_function(name):
  """y of the linen WSConv of `name` ("ws": timm's StdConv2d, "sws":
  ScaledStdConv2d with groups=2) from kernel, bias (and gain)."""
  scaled = name == "sws"
  module = bn_nn.WSConv(6, (3, 3), padding=((1, 1), (1, 1)), scaled=scaled,
                        gamma=GAMMA if scaled else 1.0, epsilon=WS_EPS,
                        feature_group_count=2 if scaled else 1)
  def f(x, kernel, bias, gain=None):
    params = {"kernel": kernel, "bias": bias}
    if scaled:
      params["gain"] = gain
    return module.apply({"params": params}, x)
  return f


def _timm_cases():
  """name -> (bn_jax function, its arrays, cotangent)."""
  a, k = _arrays(), _kernel_arrays()
  affine = dict(x=a["x"], scale=a["scale"], bias=a["bias"])
  b0 = lambda training, x, **p: free.evonorm_b0(
      x, running_var=jnp.asarray(a["running_var"], x.dtype),
      training=training, momentum=B0_MOMENTUM, epsilon=B0_EPS, **p)[0]
  conv = dict(x=k["x"], bias=k["bias"])
  return {
      "frn": (lambda **p: free.frn_tlu(**p, epsilon=FRN_EPS),
              dict(affine, tau=a["tau"]), a["dy"]),
      "s0": (lambda **p: free.evonorm_s0(**p, num_groups=S0_GROUPS,
                                         epsilon=S0_EPS),
             dict(affine, v=a["v"]), a["dy"]),
      "b0_train": (functools.partial(b0, True), dict(affine, v=a["v"]),
                   a["dy"]),
      "b0_eval": (functools.partial(b0, False),
                  dict(affine, v=a["v"], x=_arrays(seed=3)["x"]), a["dy"]),
      "ws": (_conv_function("ws"), dict(conv, kernel=k["kernel_full"]),
             k["dy"]),
      "sws": (_conv_function("sws"), dict(conv, kernel=k["kernel"],
                                          gain=k["gain"]), k["dy"]),
  }


# float64: the same formula, to rounding for the convolutions and to the
# rounding of timm's statistics for the norms (float32 even for float64 x:
# `x.float().var(...)`); float32: to its precision.
TIMM_TOLERANCES = {"float64": {"ws": 1e-12, "sws": 1e-12, "norms": 1e-6},
                   "float32": {"norms": 2e-5}}


@pytest.mark.parametrize("precision", sorted(TIMM_TOLERANCES))
@pytest.mark.parametrize("case", ["frn", "s0", "b0_train", "b0_eval", "ws",
                                  "sws"])
def test_matches_timm(timm_outputs, case, precision):
  """y and the gradients w.r.t. x and every parameter against timm's layer
  (run in float64)."""
  f, arrays, dy = _timm_cases()[case]
  tolerances = TIMM_TOLERANCES[precision]
  tol = tolerances.get(case, tolerances["norms"])
  with jax.enable_x64(precision == "float64"):
    ours = _grads_and_values(f, arrays, dy, jnp.dtype(precision))
  expected = {key.split("/")[1]: value for key, value in timm_outputs.items()
              if key.startswith(case + "/") and "running_var" not in key}
  assert set(expected) <= set(ours) and len(expected) == len(ours), (
      sorted(expected), sorted(ours))
  for key, value in expected.items():
    scale = max(1.0, float(np.max(np.abs(value))))
    np.testing.assert_allclose(ours[key], value, rtol=tol, atol=tol * scale,
                               err_msg=f"{case} {key}")


def test_evonorm_b0_running_variance_matches_timm(timm_outputs):
  """One training step moves the running variance as timm's (momentum p
  there is 1 - momentum here, and timm's batch variance is float32);
  evaluation leaves it."""
  a = _arrays()
  args = [jnp.asarray(a[n]) for n in ("x", "scale", "bias", "v",
                                      "running_var")]
  with jax.enable_x64(True):
    _, new = free.evonorm_b0(*args, training=True, momentum=B0_MOMENTUM,
                             epsilon=B0_EPS)
    np.testing.assert_allclose(new, timm_outputs["b0_train/running_var"],
                               rtol=1e-6)
  np.testing.assert_array_equal(timm_outputs["b0_eval/running_var"],
                                a["running_var"])


# ----------------------------------------------------------------------------
# Transformations and dtypes.


def _params(dtype=jnp.float32, seed=0, shape=SHAPE):
  a = _arrays(seed, shape)
  return {n: jnp.asarray(v, dtype) for n, v in a.items()
          if n not in ("dy", "running_var")}, jnp.asarray(
              a["running_var"], jnp.float32)


def _functions(running_var):
  """name -> f(x, scale, bias, extra) of each norm, running_var fixed."""
  return {
      "frn_tlu": lambda x, s, b, t, v: free.frn_tlu(x, s, b, t,
                                                    epsilon=FRN_EPS),
      "evonorm_b0_train": lambda x, s, b, t, v: free.evonorm_b0(
          x, s, b, v, running_var, training=True, momentum=B0_MOMENTUM,
          epsilon=B0_EPS),
      "evonorm_b0_eval": lambda x, s, b, t, v: free.evonorm_b0(
          x, s, b, v, running_var, training=False, epsilon=B0_EPS),
      "evonorm_s0": lambda x, s, b, t, v: free.evonorm_s0(
          x, s, b, v, num_groups=S0_GROUPS, epsilon=S0_EPS),
  }


@pytest.mark.parametrize("name", sorted(_functions(None)))
def test_jit_and_vmap(name):
  p, running_var = _params()
  f = _functions(running_var)[name]
  args = (p["x"], p["scale"], p["bias"], p["tau"], p["v"])
  eager = f(*args)
  chex.assert_trees_all_close(jax.jit(f)(*args), eager, rtol=1e-6,
                              atol=1e-6)
  # vmap over a stack of inputs and parameters: each its own computation.
  p2, _ = _params(seed=5)
  stacked = [jnp.stack([u, w]) for u, w in zip(
      args, (p2["x"], p2["scale"], p2["bias"], p2["tau"], p2["v"]))]
  batched = jax.vmap(f)(*stacked)
  second = f(p2["x"], p2["scale"], p2["bias"], p2["tau"], p2["v"])
  chex.assert_trees_all_close(
      batched, jax.tree.map(lambda u, w: jnp.stack([u, w]), eager, second),
      rtol=1e-5, atol=1e-5)


def test_evonorm_b0_batch_variance_over_a_named_axis_is_the_whole_batch():
  """Two devices (a vmap with axis_name) of half the batch each compute the
  whole batch's y and running variance: synchronized statistics."""
  p, running_var = _params(shape=(4, 3, 3, 4))
  run = lambda x, **kw: free.evonorm_b0(
      x, p["scale"], p["bias"], p["v"], running_var, training=True,
      momentum=B0_MOMENTUM, epsilon=B0_EPS, **kw)
  y, new = run(p["x"])
  y_split, new_split = jax.vmap(functools.partial(run, axis_name="d"),
                                axis_name="d")(p["x"].reshape(2, 2, 3, 3, 4))
  np.testing.assert_allclose(y_split.reshape(y.shape), y, rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(new_split, jnp.stack([new, new]), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(_functions(None)))
def test_bfloat16_inputs_get_float32_statistics(name):
  """bfloat16 x and parameters: y is bfloat16, the float32 computation
  rounded once (statistics in float32, not bfloat16); with float32
  parameters y is float32 (flax's promotion) and equals it exactly."""
  p, running_var = _params(jnp.bfloat16)
  f = _functions(running_var)[name]
  args = (p["x"], p["scale"], p["bias"], p["tau"], p["v"])
  y = jax.tree.leaves(f(*args))[0]
  as_f32 = [a.astype(jnp.float32) for a in args]
  y32 = jax.tree.leaves(f(*as_f32))[0]
  assert y.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  np.testing.assert_array_equal(y, y32.astype(jnp.bfloat16))
  mixed = jax.tree.leaves(f(p["x"], *as_f32[1:]))[0]
  assert mixed.dtype == jnp.float32
  np.testing.assert_array_equal(mixed, y32)
  if name == "evonorm_b0_train":
    new = f(*args)[1]
    assert new.dtype == jnp.float32
    np.testing.assert_array_equal(new, f(*as_f32)[1])


def test_weight_standardize_of_a_bfloat16_kernel_is_computed_in_float32():
  kernel = jnp.asarray(_kernel_arrays()["kernel"], jnp.bfloat16)
  w = free.weight_standardize(kernel, eps=WS_EPS, scaled=True, gamma=GAMMA)
  w32 = free.weight_standardize(kernel.astype(jnp.float32), eps=WS_EPS,
                                scaled=True, gamma=GAMMA)
  assert w.dtype == jnp.bfloat16
  np.testing.assert_array_equal(w, w32.astype(jnp.bfloat16))


def test_evonorm_b0_evaluation_reads_the_running_variance():
  """Evaluation normalizes with the running variance (another one gives
  another y, as the equation says), returns it as it is, and the modules
  leave their statistics alone."""
  p, running_var = _params()
  args = (p["x"], p["scale"], p["bias"], p["v"])
  y, state = free.evonorm_b0(*args, running_var, training=False,
                             epsilon=B0_EPS)
  assert state is running_var
  other = 4.0 * running_var
  y_other, _ = free.evonorm_b0(*args, other, training=False, epsilon=B0_EPS)
  expected = np_evonorm_b0(*(np.asarray(a, np.float64) for a in args),
                           np.asarray(other, np.float64), training=False,
                           momentum=None, eps=B0_EPS)[0]
  np.testing.assert_allclose(y_other, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(y, y_other)
  # linen: no update even with batch_stats mutable.
  module = bn_nn.EvoNormB0(epsilon=B0_EPS)
  variables = module.init(jax.random.key(0), p["x"],
                          use_running_average=True)
  variables = {"params": dict(variables["params"], scale=p["scale"],
                              bias=p["bias"], v=p["v"]),
               "batch_stats": {"var": running_var}}
  y_linen, updates = module.apply(variables, p["x"],
                                  use_running_average=True,
                                  mutable=["batch_stats"])
  np.testing.assert_array_equal(updates["batch_stats"]["var"], running_var)
  np.testing.assert_allclose(y_linen, y, rtol=1e-6, atol=1e-6)
  # nnx: eval() leaves var.
  layer = bn_nnx.EvoNormB0(SHAPE[-1], epsilon=B0_EPS, rngs=nnx.Rngs(0))
  layer.var[...] = running_var
  layer.eval()
  layer(p["x"])
  np.testing.assert_array_equal(layer.var[...], running_var)


# ----------------------------------------------------------------------------
# The linen and nnx modules against the pure functions.


def _module_cases(p, running_var):
  """name -> (linen module, nnx module, call keywords, params, pure y and
  new running variance or None)."""
  rngs = nnx.Rngs(0)
  c = SHAPE[-1]
  affine = {"scale": p["scale"], "bias": p["bias"]}
  b0 = lambda training: free.evonorm_b0(
      p["x"], p["scale"], p["bias"], p["v"], running_var, training=training,
      momentum=B0_MOMENTUM, epsilon=B0_EPS)
  return {
      "frn": (bn_nn.FRN(epsilon=FRN_EPS),
              bn_nnx.FRN(c, epsilon=FRN_EPS, rngs=rngs), {},
              dict(affine, tau=p["tau"]),
              (free.frn_tlu(p["x"], p["scale"], p["bias"], p["tau"],
                            epsilon=FRN_EPS), None)),
      "frn_without_tlu": (
          bn_nn.FRN(epsilon=FRN_EPS, use_tau=False),
          bn_nnx.FRN(c, epsilon=FRN_EPS, use_tau=False, rngs=rngs), {},
          affine, (free.frn_tlu(p["x"], p["scale"], p["bias"], None,
                                epsilon=FRN_EPS), None)),
      "evonorm_s0": (
          bn_nn.EvoNormS0(num_groups=None, group_size=c // S0_GROUPS,
                          epsilon=S0_EPS),
          bn_nnx.EvoNormS0(c, num_groups=None, group_size=c // S0_GROUPS,
                           epsilon=S0_EPS, rngs=rngs), {},
          dict(affine, v=p["v"]),
          (free.evonorm_s0(p["x"], p["scale"], p["bias"], p["v"],
                           num_groups=S0_GROUPS, epsilon=S0_EPS), None)),
      "evonorm_b0_train": (
          bn_nn.EvoNormB0(momentum=B0_MOMENTUM, epsilon=B0_EPS),
          bn_nnx.EvoNormB0(c, momentum=B0_MOMENTUM, epsilon=B0_EPS,
                           rngs=rngs),
          dict(use_running_average=False), dict(affine, v=p["v"]),
          b0(True)),
      "evonorm_b0_eval": (
          bn_nn.EvoNormB0(momentum=B0_MOMENTUM, epsilon=B0_EPS),
          bn_nnx.EvoNormB0(c, momentum=B0_MOMENTUM, epsilon=B0_EPS,
                           rngs=rngs),
          dict(use_running_average=True), dict(affine, v=p["v"]), b0(False)),
  }


@pytest.mark.parametrize("name", ["frn", "frn_without_tlu", "evonorm_s0",
                                  "evonorm_b0_train", "evonorm_b0_eval"])
def test_modules_equal_the_pure_function(name):
  """linen and nnx give the pure function's y (and EvoNorm-B0's new
  running variance) from the same variables, which they name alike."""
  p, running_var = _params()
  linen, layer, kwargs, params, (y, new_var) = _module_cases(
      p, running_var)[name]
  variables = linen.init(jax.random.key(0), p["x"], **kwargs)
  assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(
      jnp.shape, params)
  variables = {"params": params}
  if new_var is not None:
    variables["batch_stats"] = {"var": running_var}
  y_linen, updates = linen.apply(variables, p["x"], mutable=["batch_stats"],
                                 **kwargs)
  chex.assert_trees_all_close(y_linen, y, rtol=1e-6, atol=1e-6)
  for key, value in params.items():
    getattr(layer, key)[...] = value
  if new_var is not None:
    layer.var[...] = running_var
  nnx_params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  assert set(nnx_params) == set(params)
  chex.assert_trees_all_close(layer(p["x"], **kwargs), y, rtol=1e-6,
                              atol=1e-6)
  if new_var is not None:
    chex.assert_trees_all_close(updates["batch_stats"]["var"], new_var,
                                rtol=1e-6)
    chex.assert_trees_all_close(layer.var[...], new_var, rtol=1e-6)


def test_evonorm_b0_module_init_and_immutable_training():
  """As flax's BatchNorm: init leaves var at 1; a training pass without
  mutable batch_stats uses the batch variance and updates nothing."""
  p, _ = _params()
  module = bn_nn.EvoNormB0()
  variables = module.init(jax.random.key(0), p["x"],
                          use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["var"],
                                np.ones(SHAPE[-1]))
  y = module.apply(variables, p["x"], use_running_average=False)
  y_ref, _ = free.evonorm_b0(p["x"], *(variables["params"][n] for n in (
      "scale", "bias", "v")), variables["batch_stats"]["var"], training=True)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="use_running_average"):
    bn_nnx.EvoNormB0(4, use_running_average=None, rngs=nnx.Rngs(0))(p["x"])


@pytest.mark.parametrize("scaled", [False, True])
def test_ws_conv_is_a_conv_with_the_standardized_kernel(scaled):
  """linen and nnx WSConv: flax's Conv applied to weight_standardize's
  kernel (with the gain), the raw kernel stored; gradients flow to it."""
  k = _kernel_arrays()
  x = jnp.asarray(k["x"], jnp.float32)
  kernel = jnp.asarray(k["kernel"], jnp.float32)
  bias, gain = (jnp.asarray(k[n], jnp.float32) for n in ("bias", "gain"))
  options = dict(features=6, kernel_size=(3, 3), strides=(2, 1),
                 feature_group_count=2)
  ws = dict(scaled=scaled, gamma=GAMMA if scaled else 1.0, epsilon=WS_EPS)
  standardized = free.weight_standardize(
      kernel, eps=WS_EPS, scaled=scaled, gain=gain if scaled else None,
      gamma=ws["gamma"])
  expected = flax_nn.Conv(**options).apply(
      {"params": {"kernel": standardized, "bias": bias}}, x)
  linen = bn_nn.WSConv(**options, **ws)
  shapes = jax.tree.map(jnp.shape, linen.init(jax.random.key(0), x))
  assert shapes == {"params": dict(kernel=kernel.shape, bias=(6,),
                                   **({"gain": (6,)} if scaled else {}))}
  params = {"kernel": kernel, "bias": bias, **(
      {"gain": gain} if scaled else {})}
  y = linen.apply({"params": params}, x)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
  layer = bn_nnx.WSConv(x.shape[-1], 6, (3, 3), (2, 1),
                        feature_group_count=2, rngs=nnx.Rngs(0), **ws)
  for key, value in params.items():
    getattr(layer, key)[...] = value
  assert set(nnx.to_pure_dict(nnx.state(layer, nnx.Param))) == set(params)
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), expected,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(layer.kernel[...], kernel)  # unchanged
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  linen_grads = jax.grad(lambda q: jnp.sum(linen.apply(
      {"params": q}, x) ** 2))(params)
  chex.assert_trees_all_close(nnx.to_pure_dict(grads), linen_grads,
                              rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Errors, SkipInit, the lab.


def _x(shape=SHAPE):
  return 1.0 + jnp.arange(int(np.prod(shape))).reshape(shape) % 3


_C = jnp.ones(4)
ERRORS = {
    "frn-without-spatial-axes": (
        lambda: free.frn_tlu(_x((8, 4)), _C, _C, _C, epsilon=1e-5),
        "spatial axes"),
    "frn-scale-shape": (
        lambda: free.frn_tlu(_x(), jnp.ones(3), _C, _C, epsilon=1e-5),
        r"frn_tlu's scale has shape \(3,\).*give it shape \(4,\)"),
    "frn-epsilon": (
        lambda: free.frn_tlu(_x(), _C, _C, _C, epsilon=0.0),
        "epsilon=0.0 must be > 0"),
    "s0-groups": (
        lambda: free.evonorm_s0(_x(), _C, _C, _C, num_groups=3),
        "num_groups=3 does not divide the 4 channels"),
    "s0-one-value-per-group": (
        lambda: free.evonorm_s0(_x((8, 4)), _C, _C, _C, num_groups=4),
        "over 1 value"),
    "b0-momentum-none": (
        lambda: free.evonorm_b0(_x(), _C, _C, _C, _C, training=True,
                                momentum=None),
        "momentum=None"),
    "b0-momentum-range": (
        lambda: free.evonorm_b0(_x(), _C, _C, _C, _C, training=True,
                                momentum=1.5),
        r"momentum=1.5 is outside \[0, 1\]"),
    "b0-running-var-shape": (
        lambda: free.evonorm_b0(_x(), _C, _C, _C, jnp.ones(5),
                                training=False),
        "running_var has shape"),
    "b0-without-v": (
        lambda: free.evonorm_b0(_x(), _C, _C, None, _C, training=False),
        "needs scale, bias and v"),
    "ws-gamma-unscaled": (
        lambda: free.weight_standardize(jnp.ones((3, 3, 2, 4)), eps=1e-6,
                                        gamma=2.0),
        "pass scaled=True"),
    "ws-gain-shape": (
        lambda: free.weight_standardize(jnp.ones((3, 3, 2, 4)), eps=1e-6,
                                        gain=jnp.ones(3)),
        r"gain has shape \(3,\)"),
    "ws-one-dimensional": (
        lambda: free.weight_standardize(jnp.ones(4), eps=1e-6),
        r"shape \(\.\.\., in, out\)"),
    "ws-eps": (
        lambda: free.weight_standardize(jnp.ones((3, 4)), eps=-1.0),
        "eps=-1.0 must be > 0"),
    "nnx-ws-eps": (
        lambda: bn_nnx.WSConv(2, 4, 3, epsilon=0.0, rngs=nnx.Rngs(0)),
        "eps=0.0 must be > 0"),
    "nnx-s0-groups": (
        lambda: bn_nnx.EvoNormS0(4, 3, rngs=nnx.Rngs(0)),
        "num_groups=3 does not divide"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_arguments_raise_one_line_errors(case):
  call, match = ERRORS[case]
  with pytest.raises(ValueError, match=match) as error:
    call()
  assert "\n" not in str(error.value)


def test_skip_init_starts_at_zero_and_its_gradient_is_sum_x_dy():
  x, dy = helpers.random_inputs(SHAPE)
  linen = bn_nn.SkipInit()
  variables = linen.init(jax.random.key(0), x)
  assert variables["params"]["gain"].shape == ()
  np.testing.assert_array_equal(linen.apply(variables, x), np.zeros(SHAPE))
  expected = jnp.sum(x * dy)
  for params in (variables["params"], {"gain": jnp.asarray(0.7)}):
    y, vjp = jax.vjp(lambda q: linen.apply({"params": q}, x), params)
    np.testing.assert_allclose(vjp(dy)[0]["gain"], expected, rtol=1e-5)
    np.testing.assert_allclose(y, params["gain"] * x, rtol=1e-6)
  layer = bn_nnx.SkipInit()
  np.testing.assert_array_equal(layer(x), np.zeros(SHAPE))
  grads = nnx.grad(lambda m: jnp.sum(m(x) * dy))(layer)
  np.testing.assert_allclose(grads["gain"][...], expected, rtol=1e-5)
  # bfloat16 x with a float32 gain: float32 y (flax's promotion).
  assert linen.apply(variables, x.astype(jnp.bfloat16)).dtype == jnp.float32


@pytest.mark.parametrize("norm,module,fields", [
    ("frn", bn_nn.FRN, dict(epsilon=1e-3)),
    ("evonorm_b0", bn_nn.EvoNormB0, dict(momentum=0.99, epsilon=1e-3)),
    ("evonorm_s0", bn_nn.EvoNormS0, dict(epsilon=1e-3, num_groups=5)),
])
def test_the_lab_builds_each_from_its_config_fields(norm, module, fields):
  """config.norm names them; each reads its own config.bn fields."""
  from bn_lab import config as base  # pylint: disable=g-import-not-at-top
  from bn_lab import models  # pylint: disable=g-import-not-at-top
  options = dict(base.get_config().bn)
  models.check_norm_options(options)
  assert norm in models.NORMS
  built = models.make_norm(options, norm=norm, axis_name="data")()
  expected = module(**fields, **(
      {"axis_name": "data"} if norm in models.SYNCED_NORMS else {}))
  assert built == expected, (built, expected)
  # A CNN with it only on the conv layers trains a step.
  model = models.make_model("cnn", placement="before_activation",
                            activation="relu", widths=(), channels=(10,),
                            conv="xla", norm=models.make_norm(options,
                                                              norm=norm))
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 784)),
                       jnp.float32)
  variables = model.init(jax.random.key(0), images, train=False)
  logits, updates = model.apply(variables, images, train=True,
                                mutable=["batch_stats"])
  assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert bool(updates.get("batch_stats")) == (norm == "evonorm_b0")
