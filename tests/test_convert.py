"""bn_jax.convert against real PyTorch and Keras 3 layers.

Each direction is checked the same way: the source layer is trained a few
steps, converted, and then both layers see the same inputs: the same eval
outputs, the same training outputs, and after those further updates the
same running statistics and eval outputs. The references are the real
frameworks (PyTorch in a process of its own, see helpers.run_torch; Keras
on the jax backend), never bn_jax itself. The report and the errors are
checked on hand-built inputs, without either framework.
"""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path

import flax.nnx
import jax
import numpy as np
import pytest

import bn_jax
from bn_jax import convert
import helpers

FEATURES = 3
TOL = dict(rtol=2e-5, atol=2e-5)


def random_batches(seed: int, count: int, shape, loc=0.5, scale=2.0):
  rng = np.random.default_rng(seed)
  return np.asarray(loc + scale * rng.standard_normal((count, *shape)),
                    np.float32)


def random_affine(seed: int, features: int = FEATURES):
  rng = np.random.default_rng(seed)
  return (np.asarray(1.0 + 0.3 * rng.standard_normal(features), np.float32),
          np.asarray(rng.standard_normal(features), np.float32))


def bn_jax_run(options, variables, train_xs, probe):
  """bn_jax.nn.BatchNorm(**options) from `variables`: the training outputs
  on train_xs (updating), then the batch_stats and the eval output on
  probe."""
  module = bn_jax.nn.BatchNorm(**options)
  ys = []
  for x in train_xs:
    y, updates = module.apply(variables, x, use_running_average=False,
                              mutable=["batch_stats"])
    variables = {**variables, **updates}
    ys.append(np.asarray(y))
  y_eval = module.apply(variables, probe, use_running_average=True)
  return np.stack(ys) if ys else None, variables, np.asarray(y_eval)


def nnx_eval(options, variables, features, probe):
  """The eval output of bn_jax.nnx.BatchNorm(features, **options) holding
  `variables`: the same options build both front ends."""
  layer = bn_jax.nnx.BatchNorm(features, **options, rngs=flax.nnx.Rngs(0))
  for name, value in {**variables.get("params", {}),
                      **variables["batch_stats"]}.items():
    getattr(layer, name)[...] = value
  return np.asarray(layer(probe, use_running_average=True))


def close(actual, expected, **tol):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected),
                             **(tol or TOL))


def test_library_imports_jax_flax_numpy_only():
  """bn_jax.convert imports the standard library, jax, numpy and bn_jax
  only (neither torch nor keras, not even lazily); `bn_jax.convert` is
  it."""
  tree = ast.parse(Path(convert.__file__).read_text())
  imported = {alias.name.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom)}
  assert imported <= {"__future__", "dataclasses", "inspect", "typing",
                      "jax", "flax", "numpy", "bn_jax"}, imported
  assert bn_jax.convert is convert


# ----------------------------------------------------------------------------
# PyTorch <-> bn_jax.

# name: (BatchNorm{dims}d, momentum, eps, x shape).
FROM_TORCH = {
    "bn2d": (2, 0.1, 1e-5, (4, FEATURES, 5, 5)),
    "bn1d-momentum": (1, 0.25, 1e-3, (8, FEATURES)),
    "bn1d-cumulative": (1, None, 1e-5, (6, FEATURES, 4)),
}
# The whole model: prefix -> (momentum, eps), in the order of its forward.
MODEL = {"bn1": (0.2, 1e-5), "layer1.0.bn1": (None, 1e-5),
         "layer1.0.bn2": (0.1, 1e-3)}

# name: (BatchNorm{dims}d, bn_jax options, x shape).
TO_TORCH = {
    "to-bn2d": (2, dict(axis=1, momentum=0.9, unbiased_running_var=True),
                (4, FEATURES, 5, 5)),
    "to-bn1d-cumulative": (1, dict(axis=1, momentum=None, epsilon=1e-3,
                                   unbiased_running_var=True),
                           (8, FEATURES)),
    "to-bn1d-no-affine": (1, dict(axis=1, momentum=0.7, use_scale=False,
                                  use_bias=False, unbiased_running_var=True),
                          (6, FEATURES, 4)),
}

TORCH_CODE = """
with torch.no_grad():
  for name, (dims, momentum, eps, _) in CASES.items():
    bn = getattr(torch.nn, f"BatchNorm{dims}d")(3, momentum=momentum, eps=eps)
    bn.weight.copy_(torch.from_numpy(inputs[name + "__weight"]))
    bn.bias.copy_(torch.from_numpy(inputs[name + "__bias"]))
    get = lambda k: torch.from_numpy(inputs[name + "__" + k])
    bn.train()
    for x in get("before"):
      bn(x)
    for key, value in bn.state_dict().items():
      outputs[f"{name}__sd__{key}"] = value.numpy().copy()
    outputs[name + "__eval0"] = bn.eval()(get("probe")).numpy()
    bn.train()
    outputs[name + "__train"] = torch.stack([bn(x) for x in get("after")])
    outputs[name + "__mean1"] = bn.running_mean.numpy().copy()
    outputs[name + "__var1"] = bn.running_var.numpy().copy()
    outputs[name + "__count1"] = bn.num_batches_tracked.numpy().copy()
    outputs[name + "__eval1"] = bn.eval()(get("probe")).numpy()

  # A model with BN layers at nested prefixes and a layer that is no BN.
  model = torch.nn.Module()
  model.bn1 = torch.nn.BatchNorm1d(3, momentum=MODEL["bn1"][0],
                                   eps=MODEL["bn1"][1])
  model.layer1 = torch.nn.Sequential(torch.nn.Module())
  for short in ("bn1", "bn2"):
    momentum, eps = MODEL["layer1.0." + short]
    setattr(model.layer1[0], short,
            torch.nn.BatchNorm1d(3, momentum=momentum, eps=eps))
  model.head = torch.nn.Linear(3, 2)
  chain = lambda x: model.layer1[0].bn2(model.layer1[0].bn1(
      torch.relu(model.bn1(x))))
  model.train()
  for x in torch.from_numpy(inputs["model__before"]):
    chain(x)
  for key, value in model.state_dict().items():
    outputs["model__sd__" + key] = value.numpy().copy()
  model.eval()
  outputs["model__eval"] = chain(torch.from_numpy(inputs["model__probe"]))

  # bn_jax -> PyTorch: the converted state_dicts, loaded strictly.
  for name, dims in DIMS.items():
    head = name + "__sd__"
    state_dict = {k[len(head):]: torch.from_numpy(v)
                  for k, v in inputs.items() if k.startswith(head)}
    bn = getattr(torch.nn, f"BatchNorm{dims}d")(**KWARGS[name])
    bn.load_state_dict(state_dict)
    get = lambda k: torch.from_numpy(inputs[name + "__" + k])
    outputs[name + "__eval0"] = bn.eval()(get("probe"))
    bn.train()
    outputs[name + "__train"] = torch.stack([bn(x) for x in get("after")])
    outputs[name + "__mean1"] = bn.running_mean
    outputs[name + "__var1"] = bn.running_var
    outputs[name + "__count1"] = bn.num_batches_tracked
    outputs[name + "__eval1"] = bn.eval()(get("probe"))
"""


def trained_bn_jax(options, shape, seed):
  """bn_jax.nn.BatchNorm variables: random scale and bias, then three
  training steps from init."""
  module = bn_jax.nn.BatchNorm(**options)
  before = random_batches(seed, 3, shape)
  variables = dict(module.init(jax.random.key(0), before[0],
                               use_running_average=True))
  scale, bias = random_affine(seed)
  params = {k: v for k, v in (("scale", scale), ("bias", bias))
            if k in variables.get("params", {})}
  if params:
    variables["params"] = params
  _, variables, _ = bn_jax_run(options, variables, before, before[0])
  return variables


@pytest.fixture(scope="module")
def torch_reference():
  """The PyTorch side of every PyTorch test, in one process: torch layers
  trained and then stepped further (-> bn_jax), and the converted bn_jax
  layers loaded and stepped (bn_jax -> PyTorch). Returns the arrays given,
  PyTorch's outputs, and each bn_jax -> PyTorch case's trained variables
  and conversion."""
  if not os.environ.get("BN_JAX_TORCH_PYTHON"):
    helpers.run_torch("")  # skips here, before the bn_jax work below
  arrays = {}
  for seed, (name, (_, _, _, shape)) in enumerate(FROM_TORCH.items()):
    arrays[name + "__weight"], arrays[name + "__bias"] = random_affine(seed)
    arrays[name + "__before"] = random_batches(seed, 3, shape)
    arrays[name + "__after"] = random_batches(seed + 10, 2, shape, 1.0, 3.0)
    arrays[name + "__probe"] = random_batches(seed + 20, 1, shape)[0]
  arrays["model__before"] = random_batches(7, 3, (8, FEATURES))
  arrays["model__probe"] = random_batches(8, 1, (8, FEATURES))[0]
  trained, kwargs, dims = {}, {}, {}
  for seed, (name, (dim, options, shape)) in enumerate(TO_TORCH.items()):
    variables = trained_bn_jax(options, shape, seed)
    conversion = convert.to_torch(variables, options)
    for key, value in conversion.variables.items():
      arrays[f"{name}__sd__{key}"] = value
    arrays[name + "__after"] = random_batches(seed + 10, 2, shape, 1.0, 3.0)
    arrays[name + "__probe"] = random_batches(seed + 20, 1, shape)[0]
    trained[name] = (variables, conversion)
    kwargs[name], dims[name] = conversion.options, dim
  code = (f"CASES = {FROM_TORCH!r}\nMODEL = {MODEL!r}\nDIMS = {dims!r}\n"
          f"KWARGS = {kwargs!r}\n" + TORCH_CODE)
  return arrays, helpers.run_torch(code, arrays), trained


def state_dict_of(outputs, name):
  head = f"{name}__sd__"
  return {k[len(head):]: v for k, v in outputs.items() if k.startswith(head)}


@pytest.mark.parametrize("name", list(FROM_TORCH))
def test_from_torch_same_outputs_and_updates(torch_reference, name):
  """A trained torch BatchNorm1d/2d converted: eval outputs now, training
  outputs of two more steps, then the running statistics and eval outputs
  are PyTorch's; the report is empty except for a momentum layer's unused
  num_batches_tracked; momentum=None carries the count."""
  arrays, outputs, _ = torch_reference
  _, momentum, eps, _ = FROM_TORCH[name]
  conversion = convert.from_torch(state_dict_of(outputs, name),
                                  momentum=momentum, eps=eps)
  assert conversion.options["epsilon"] == eps
  assert conversion.options["unbiased_running_var"]
  if momentum is None:
    assert conversion.options["momentum"] is None
    assert conversion.variables["batch_stats"]["count"] == 3
    assert conversion.report == []
  else:
    assert conversion.options["momentum"] == pytest.approx(1 - momentum)
    assert [line.split(": ")[1] for line in conversion.report] == [
        "num_batches_tracked"]
  probe = arrays[name + "__probe"]
  _, variables, y_eval0 = bn_jax_run(conversion.options,
                                     conversion.variables, [], probe)
  close(y_eval0, outputs[name + "__eval0"])
  ys, variables, y_eval1 = bn_jax_run(
      conversion.options, conversion.variables, arrays[name + "__after"],
      probe)
  close(ys, outputs[name + "__train"])
  stats = variables["batch_stats"]
  close(stats["mean"], outputs[name + "__mean1"], rtol=1e-5, atol=1e-6)
  close(stats["var"], outputs[name + "__var1"], rtol=1e-5, atol=1e-6)
  close(y_eval1, outputs[name + "__eval1"])
  if momentum is None:
    assert int(stats["count"]) == int(outputs[name + "__count1"]) == 5


def test_from_torch_model_nested_tree(torch_reference):
  """A model's state_dict: each BN prefix becomes nested flax keys, with
  its own momentum and eps; the chain of converted layers gives PyTorch's
  eval output; the Linear's entries are reported as left out; the way
  back, under the default names and under custom ones, gives PyTorch's BN
  entries exactly."""
  arrays, outputs, _ = torch_reference
  state_dict = state_dict_of(outputs, "model")
  hparams = {p: dict(momentum=m, eps=e) for p, (m, e) in MODEL.items()}
  conversion = convert.from_torch_model(state_dict, layer_hparams=hparams)
  paths = [("bn1",), ("layer1", "0", "bn1"), ("layer1", "0", "bn2")]
  assert list(conversion.options) == paths
  assert set(conversion.variables["batch_stats"]) == {"bn1", "layer1"}
  assert set(conversion.variables["params"]["layer1"]["0"]) == {"bn1", "bn2"}
  assert conversion.options[paths[2]]["epsilon"] == 1e-3
  assert conversion.options[paths[1]]["momentum"] is None
  left_out = [line for line in conversion.report if "not BN" in line]
  assert len(left_out) == 1 and "head.weight" in left_out[0]

  y = arrays["model__probe"]
  for i, path in enumerate(paths):
    layer = {collection: functools.reduce(dict.get, path, tree)
             for collection, tree in conversion.variables.items()}
    _, _, y = bn_jax_run(conversion.options[path], layer, [], y)
    y = np.maximum(y, 0) if i == 0 else y
  close(y, outputs["model__eval"])

  bn_entries = {k: v for k, v in state_dict.items()
                if not k.startswith("head.")}
  for names in (None, {"bn1": "stem/bn", "layer1.0.bn1": ("block", "bn1"),
                       "layer1.0.bn2": "block/bn2"}):
    there = convert.from_torch_model(state_dict, names=names,
                                     layer_hparams=hparams)
    back = convert.to_torch_model(there.variables, there.options,
                                  names=names)
    assert sorted(back.variables) == sorted(bn_entries)
    for key, value in bn_entries.items():
      # A count that no layer reads was reported on the way in, and is 0.
      prefix, _, entry = key.rpartition(".")
      if entry == "num_batches_tracked" and MODEL[prefix][0] is not None:
        assert f"{prefix}: {key}: 3 updates not kept" in " ".join(
            there.report)
        value = np.zeros_like(value)
      np.testing.assert_array_equal(back.variables[key], value)
    assert back.options["layer1.0.bn1"]["momentum"] is None
    assert back.options["bn1"]["momentum"] == 0.2
    assert back.report == []
  assert set(there.variables["batch_stats"]) == {"stem", "block"}


@pytest.mark.parametrize("name", list(TO_TORCH))
def test_to_torch_same_outputs_and_updates(torch_reference, name):
  """A trained bn_jax layer converted and loaded into torch BatchNorm1d/2d
  (strict load_state_dict): eval outputs now, training outputs of two more
  steps, then running statistics, update count and eval outputs agree; the
  report is empty (unbiased_running_var=True is PyTorch's convention)."""
  arrays, outputs, trained = torch_reference
  _, options, _ = TO_TORCH[name]
  variables, conversion = trained[name]
  assert conversion.report == []
  assert conversion.options["affine"] == options.get("use_scale", True)
  if options["momentum"] is None:
    assert conversion.options["momentum"] is None
  else:
    assert conversion.options["momentum"] == pytest.approx(
        1 - options["momentum"])
  probe = arrays[name + "__probe"]
  _, _, y_eval0 = bn_jax_run(options, variables, [], probe)
  close(outputs[name + "__eval0"], y_eval0)
  ys, variables, y_eval1 = bn_jax_run(options, variables,
                                      arrays[name + "__after"], probe)
  stats = variables["batch_stats"]
  close(outputs[name + "__train"], ys)
  close(outputs[name + "__mean1"], stats["mean"], rtol=1e-5, atol=1e-6)
  close(outputs[name + "__var1"], stats["var"], rtol=1e-5, atol=1e-6)
  close(outputs[name + "__eval1"], y_eval1)
  if "count" in stats:
    assert int(outputs[name + "__count1"]) == int(stats["count"]) == 5


# ----------------------------------------------------------------------------
# Keras 3.


def import_keras(monkeypatch):
  """keras on the jax backend (it reads the backend once, at its first
  import), or a skip."""
  monkeypatch.setenv("KERAS_BACKEND", "jax")
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip(f"keras was imported with the {keras.backend.backend()} "
                "backend before this test")
  return keras


def keras_state(layer) -> dict[str, np.ndarray]:
  return {v.path.split("/")[-1]: np.asarray(v) for v in layer.variables}


KERAS_SHAPE = (8, 2, FEATURES)


def keras_batches(seed):
  """Three batches to train on, then two narrow ones (std 0.3 against 2
  before: Keras renorm's r falls below 1/rmax, where bn_jax's absent rmin
  would clip and Keras's does not), and a probe."""
  return (random_batches(seed, 3, KERAS_SHAPE),
          random_batches(seed + 1, 2, KERAS_SHAPE, 0.8, 0.3),
          random_batches(seed + 2, 1, KERAS_SHAPE)[0])


def keras_steps(layer, xs):
  return np.stack([np.asarray(layer(x, training=True)) for x in xs])


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_from_keras_same_outputs_and_updates(monkeypatch, renorm):
  """A trained keras.layers.BatchNormalization (epsilon, momentum and, with
  renorm, clipping without rmin) converted: eval outputs (linen and nnx),
  training outputs of two more steps, then every moving statistic and the
  eval output agree. A fresh renorm layer's moving_stddev (1 beside a
  variance of 1) is reported; after training it is consistent."""
  keras = import_keras(monkeypatch)
  extra = dict(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5},
               renorm_momentum=0.8) if renorm else {}
  layer = keras.layers.BatchNormalization(momentum=0.9, **extra)
  layer.build(KERAS_SHAPE)
  if renorm:
    fresh = convert.from_keras(layer)
    assert [line.split(": ")[1] for line in fresh.report] == [
        "moving_stddev"]
  gamma, beta = random_affine(3)
  layer.gamma.assign(gamma)
  layer.beta.assign(beta)
  before, after, probe = keras_batches(3)
  keras_steps(layer, before)
  conversion = convert.from_keras(layer)
  assert conversion.report == []
  assert conversion.options["epsilon"] == 1e-3
  assert not conversion.options["unbiased_running_var"]
  y_eval0 = np.asarray(layer(probe, training=False))
  _, variables, ours = bn_jax_run(conversion.options, conversion.variables,
                                  [], probe)
  close(ours, y_eval0)
  close(nnx_eval(conversion.options, conversion.variables, FEATURES, probe),
        y_eval0)
  ys, variables, ours_eval1 = bn_jax_run(
      conversion.options, conversion.variables, after, probe)
  close(ys, keras_steps(layer, after))
  theirs = keras_state(layer)
  stats = variables["batch_stats"]
  for ours_key, keras_key in (("mean", "moving_mean"),
                              ("var", "moving_variance"),
                              ("renorm_mean", "renorm_mean"),
                              ("renorm_stddev", "renorm_stddev")):
    if keras_key in theirs:
      close(stats[ours_key], theirs[keras_key], rtol=1e-5, atol=1e-6)
  close(ours_eval1, layer(probe, training=False))


@pytest.mark.parametrize("renorm", [False, True], ids=["plain", "renorm"])
def test_to_keras_same_outputs_and_updates(monkeypatch, renorm):
  """A trained bn_jax layer converted and loaded into a Keras layer built
  from the returned kwargs: eval outputs, training outputs of two more
  steps (renorm: bn_jax's absent rmin, 1/rmax, written out, and r clipped
  at it), then the moving statistics and eval outputs agree."""
  keras = import_keras(monkeypatch)
  options = dict(momentum=0.8, epsilon=1e-3)
  if renorm:
    options.update(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.5},
                   renorm_momentum=0.7)
  variables = trained_bn_jax(options, KERAS_SHAPE, 5)
  conversion = convert.to_keras(variables, options)
  assert conversion.report == []
  if renorm:
    assert conversion.options["renorm_clipping"]["rmin"] == pytest.approx(
        1 / 1.5)
  layer = keras.layers.BatchNormalization(**conversion.options)
  convert.load_keras(layer, conversion.variables, KERAS_SHAPE)
  _, after, probe = keras_batches(5)
  _, _, ours = bn_jax_run(options, variables, [], probe)
  close(layer(probe, training=False), ours)
  ys, variables, ours_eval1 = bn_jax_run(options, variables, after, probe)
  close(keras_steps(layer, after), ys)
  theirs = keras_state(layer)
  stats = variables["batch_stats"]
  close(theirs["moving_mean"], stats["mean"], rtol=1e-5, atol=1e-6)
  close(theirs["moving_variance"], stats["var"], rtol=1e-5, atol=1e-6)
  if renorm:
    close(theirs["renorm_stddev"], stats["renorm_stddev"], rtol=1e-5,
          atol=1e-6)
    close(theirs["moving_stddev"], np.sqrt(stats["var"] + 1e-3), rtol=1e-5)
  close(layer(probe, training=False), ours_eval1)


# ----------------------------------------------------------------------------
# The report and the errors (no framework needed).


def torch_entries(dtype=np.float32, count=0, prefix=""):
  rng = np.random.default_rng(0)
  values = dict(weight=1 + rng.random(FEATURES), bias=rng.random(FEATURES),
                running_mean=rng.random(FEATURES),
                running_var=1 + rng.random(FEATURES))
  entries = {prefix + k: np.asarray(v, dtype) for k, v in values.items()}
  entries[prefix + "num_batches_tracked"] = np.asarray(count, np.int64)
  return entries


def bn_jax_variables(renorm=False, count=None):
  stats = {"mean": np.zeros(FEATURES, np.float32),
           "var": np.full(FEATURES, 2.0, np.float32)}
  if renorm:
    stats.update(renorm_mean=np.zeros(FEATURES, np.float32),
                 renorm_stddev=np.ones(FEATURES, np.float32))
  if count is not None:
    stats["count"] = np.asarray(count, np.int32)
  return {"params": {"scale": np.ones(FEATURES, np.float32),
                     "bias": np.zeros(FEATURES, np.float32)},
          "batch_stats": stats}


def keras_weights(renorm=False, stddev=None):
  weights = {"gamma": np.ones(FEATURES, np.float32),
             "beta": np.zeros(FEATURES, np.float32),
             "moving_mean": np.zeros(FEATURES, np.float32),
             "moving_variance": np.ones(FEATURES, np.float32)}
  if renorm:
    weights.update(moving_stddev=np.asarray(
        np.sqrt(1 + 1e-3) if stddev is None else stddev, np.float32)
                   * np.ones(FEATURES, np.float32),
                   renorm_mean=np.zeros(FEATURES, np.float32),
                   renorm_stddev=np.ones(FEATURES, np.float32))
  return weights


KERAS_CONFIG = dict(axis=-1, momentum=0.99, epsilon=1e-3, center=True,
                    scale=True)
EXACT_BN = dict(axis=1, unbiased_running_var=True)

# name: (conversion, the (item) that its report must name).
UNMAPPABLE = {
    "torch-track-running-stats-false": (lambda: convert.from_torch(
        {k: v for k, v in torch_entries().items() if "running" not in k
         and "num_batches" not in k}), "track_running_stats=False"),
    "torch-num-batches-tracked": (lambda: convert.from_torch(
        torch_entries(count=7), momentum=0.1), "num_batches_tracked"),
    "torch-float64": (lambda: convert.from_torch(torch_entries(np.float64)),
                      "running_var"),
    "keras-moving-stddev": (lambda: convert.from_keras(
        keras_weights(renorm=True, stddev=1.0),
        dict(KERAS_CONFIG, renorm=True)), "moving_stddev"),
    "keras-synchronized": (lambda: convert.from_keras(
        keras_weights(), dict(KERAS_CONFIG, synchronized=True)),
                           "synchronized=True"),
    "keras-trainable-false": (lambda: convert.from_keras(
        keras_weights(), dict(KERAS_CONFIG, trainable=False)),
                              "trainable=False"),
    "keras-regularizer": (lambda: convert.from_keras(
        keras_weights(), dict(KERAS_CONFIG, gamma_regularizer={"l2": 1})),
                          "gamma_regularizer"),
    "keras-no-config": (lambda: convert.from_keras(keras_weights()),
                        "config"),
    "keras-float64": (lambda: convert.from_keras(
        {k: v.astype(np.float64) for k, v in keras_weights().items()},
        KERAS_CONFIG), "moving_mean"),
    "to-torch-biased": (lambda: convert.to_torch(
        bn_jax_variables(), dict(axis=1)), "unbiased_running_var=False"),
    "to-torch-renorm": (lambda: convert.to_torch(
        bn_jax_variables(renorm=True), dict(EXACT_BN, renorm=True)),
                        "renorm=True"),
    "to-keras-renorm-stats-without-renorm": (lambda: convert.to_keras(
        bn_jax_variables(renorm=True), {}), "batch_stats 'renorm_mean'"),
    "to-torch-ghost": (lambda: convert.to_torch(
        bn_jax_variables(), dict(EXACT_BN, virtual_batch_size=4)),
                       "virtual_batch_size"),
    "to-torch-sampled": (lambda: convert.to_torch(
        bn_jax_variables(), dict(EXACT_BN, stats_fraction=0.5)),
                         "stats_fraction"),
    "to-torch-synchronized": (lambda: convert.to_torch(
        bn_jax_variables(), dict(EXACT_BN, axis_name="batch")),
                              "axis_name='batch'"),
    "to-torch-channels-last": (lambda: convert.to_torch(
        bn_jax_variables(), dict(unbiased_running_var=True)), "axis=-1"),
    "to-torch-scale-only": (lambda: convert.to_torch(
        {"params": {"scale": np.ones(FEATURES, np.float32)},
         "batch_stats": bn_jax_variables()["batch_stats"]},
        dict(EXACT_BN, use_bias=False)), "use_bias=False"),
    "to-keras-cumulative": (lambda: convert.to_keras(
        bn_jax_variables(count=4), dict(momentum=None)), "momentum=None"),
    "to-keras-unbiased": (lambda: convert.to_keras(
        bn_jax_variables(), dict(unbiased_running_var=True)),
                          "unbiased_running_var=True"),
    "to-keras-schedule": (lambda: convert.to_keras(
        bn_jax_variables(renorm=True, count=9), dict(
            renorm=True, renorm_clipping={"rmax": 3, "dmax": 5},
            renorm_schedule=(0, 10, 10))), "renorm_schedule"),
    "to-keras-dtype": (lambda: convert.to_keras(
        bn_jax_variables(), dict(dtype="bfloat16")), "dtype=bfloat16"),
    "to-keras-unknown-stat": (lambda: convert.to_keras(
        {**bn_jax_variables(), "batch_stats": {
            **bn_jax_variables()["batch_stats"],
            "nonfinite_skips": np.asarray(0)}}),
                              "batch_stats 'nonfinite_skips'"),
    "model-other-layers": (lambda: convert.from_torch_model(
        {**torch_entries(prefix="bn."), "conv.weight": np.ones((3, 3, 1, 1)),
         "conv.bias": np.ones(3)}), "2 entries of other layers (not BN)"),
    "model-not-in-names": (lambda: convert.from_torch_model(
        {**torch_entries(prefix="a."), **torch_entries(prefix="b.")},
        names={"a": "a"}), "not in names"),
}


@pytest.mark.parametrize("case", list(UNMAPPABLE))
def test_report_names_what_does_not_map(case):
  """Each thing that cannot be mapped exactly has its own report line,
  "layer: item: what differs", and the Markdown table has a row for it."""
  convert_it, item = UNMAPPABLE[case]
  report = convert_it().report
  assert item in [line.split(": ")[1] for line in report], report
  assert all("\n" not in line and line.count(": ") >= 2 for line in report)
  table = convert.report_markdown(report).splitlines()
  assert table[:2] == ["| layer | item | what is not exact |", "|---|---|---|"]
  assert len(table) == 2 + len(report)
  assert any(f"| {item} |" in row for row in table[2:])


def test_exact_conversions_report_nothing():
  """PyTorch's defaults (a fresh num_batches_tracked of 0), a trained
  Keras renorm layer's consistent moving_stddev, and bn_jax layers in the
  target's conventions give empty reports; the table says so."""
  assert convert.from_torch(torch_entries()).report == []
  assert convert.from_keras(keras_weights(renorm=True),
                            dict(KERAS_CONFIG, renorm=True)).report == []
  assert convert.to_torch(bn_jax_variables(count=3),
                          dict(EXACT_BN, momentum=None)).report == []
  assert convert.to_keras(bn_jax_variables(renorm=True),
                          dict(renorm=True)).report == []
  assert "everything maps exactly" in convert.report_markdown([])


def test_conventions_of_the_options():
  """The hyperparameters' mapping: momentum p <-> 1 - p (a round trip
  gives p back exactly), eps carried, affine=False <-> use_scale and
  use_bias False, Keras's absent rmin <-> bn_jax's explicit 0, and its
  center/scale; a float16 checkpoint keeps its param dtype."""
  conversion = convert.from_torch(torch_entries(), momentum=0.1, eps=1e-4)
  assert conversion.options == dict(axis=1, momentum=0.9, epsilon=1e-4,
                                    use_scale=True, use_bias=True,
                                    unbiased_running_var=True)
  back = convert.to_torch(conversion.variables, conversion.options)
  assert back.options == dict(num_features=FEATURES, eps=1e-4, momentum=0.1,
                              affine=True, track_running_stats=True)
  no_affine = convert.from_torch(
      {k: v for k, v in torch_entries().items() if k not in ("weight",
                                                             "bias")})
  assert "params" not in no_affine.variables
  assert not no_affine.options["use_scale"] and not no_affine.options[
      "use_bias"]
  assert not convert.to_torch(no_affine.variables,
                              no_affine.options).options["affine"]
  keras = convert.from_keras(
      {k: v for k, v in keras_weights(renorm=True).items() if k != "beta"},
      dict(KERAS_CONFIG, center=False, renorm=True,
           renorm_clipping={"rmax": 2.0}))
  assert keras.options["renorm_clipping"] == {"rmax": 2.0, "rmin": 0.0}
  assert not keras.options["use_bias"] and keras.options["use_scale"]
  half = convert.from_torch(torch_entries(np.float16))
  assert half.variables["params"]["scale"].dtype == np.float16
  assert half.variables["batch_stats"]["var"].dtype == np.float32
  assert half.options["param_dtype"] == np.float16 and half.report == []


ERRORS = {
    "missing-key": (lambda: convert.from_torch(
        {k: v for k, v in torch_entries().items() if k != "running_var"}),
                    "no 'running_var'"),
    "shape": (lambda: convert.from_torch(
        {**torch_entries(), "running_var": np.ones(4, np.float32)}),
              r"running_var has shape \(4,\) but"),
    "torch-momentum": (lambda: convert.from_torch(
        torch_entries(), momentum=1.5), r"momentum=1.5 is outside \[0, 1\]"),
    "keras-momentum": (lambda: convert.from_keras(
        keras_weights(), dict(KERAS_CONFIG, momentum=-0.1)),
                       r"momentum=-0.1 is outside \[0, 1\]"),
    "bn-jax-momentum": (lambda: convert.to_torch(
        bn_jax_variables(), dict(momentum=2)), r"momentum=2 is outside"),
    "cumulative-without-count": (lambda: convert.from_torch(
        {k: v for k, v in torch_entries().items()
         if k != "num_batches_tracked"}, momentum=None),
                                 "no 'num_batches_tracked'"),
    "unknown-option": (lambda: convert.to_keras(
        bn_jax_variables(), dict(momentom=0.9)), "'momentom'"),
    "keras-missing": (lambda: convert.from_keras(
        {k: v for k, v in keras_weights().items() if k != "gamma"},
        KERAS_CONFIG), r"no \['gamma'\]"),
    "epsilon": (lambda: convert.from_torch(torch_entries(), eps=0.0),
                "eps=0.0"),
    "unknown-entry": (lambda: convert.from_torch(
        {**torch_entries(), "weight_v": np.ones(3)}), "weight_v"),
    "bad-layer-hparams": (lambda: convert.from_torch_model(
        torch_entries(prefix="bn."), layer_hparams={"bn2": {}}), "bn2"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_is_a_one_line_error(case):
  """Bad input raises a ValueError of one line that names the problem."""
  call, match = ERRORS[case]
  with pytest.raises(ValueError, match=match) as error:
    call()
  assert "\n" not in str(error.value)
