"""bn_lab.resnet: the residual CNN against a PyTorch twin (torch.nn modules
of the same architecture, benchmarks/_torch_resnet.py), in
parameter count, outputs in training and eval mode, and gradients; and its
structure (depth, SkipInit) checked without torch."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from bn_jax import nn as bn_nn
from bn_lab import models
from bn_lab import resnet

EPSILON = 1e-5

# The twin: torch.nn layers, "SAME" padding as lax computes it.
TWIN = (helpers.REPO / "benchmarks" / "_torch_resnet.py").read_text()


def _torch_names(flax_path):
  """The twin's state_dict name of a flax variable (collection, *path)."""
  collection, *path = flax_path
  leaf = path[-1]
  if path[0] == "readout":
    return {"kernel": "readout.weight", "bias": "readout.bias"}[leaf]
  if path[0].startswith("stage"):
    block = _BLOCK_INDEX[path[0]]
    if path[1] == "skip_init":
      return f"blocks.{block}.gain"
    layer, which = path[1].split("_", 1)
    part = {"1": "first", "2": "second", "shortcut": "shortcut"}[which]
    index = 0 if layer == "conv" else 1
    prefix = f"blocks.{block}.{part}.{index}"
  else:  # conv_stem, norm_stem
    prefix = f"stem.{0 if path[0] == 'conv_stem' else 1}"
  return prefix + "." + {"kernel": "weight", "bias": "bias",
                         "scale": "weight", "mean": "running_mean",
                         "var": "running_var"}[leaf]


_BLOCK_INDEX = {}


def _flat(variables):
  return {path: np.asarray(v) for path, v in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(variables)).items()}


def _to_torch(path, value):
  if path[-1] == "kernel":
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


@pytest.mark.parametrize("blocks,use_norm,skip_init", [
    (1, True, False), (2, True, True), (1, False, True)])
def test_matches_a_pytorch_twin(blocks, use_norm, skip_init):
  helpers.require_torch()
  widths = (8, 16, 32)
  norm = (functools.partial(bn_nn.BatchNorm, epsilon=EPSILON, momentum=0.9)
          if use_norm else None)
  model = resnet.ResNet(norm=norm, conv=models.Conv, widths=widths,
                        blocks_per_stage=blocks, skip_init=skip_init)
  images = jax.random.uniform(jax.random.key(1), (8, 784))
  variables = model.init(jax.random.key(0), images, train=False)
  # Random values everywhere (skip gains, BN's scale, bias and statistics
  # included), so that no part hides behind its initial 0 or 1.
  flat = _flat(variables)
  rng = np.random.default_rng(0)
  for path, value in flat.items():
    if path[-1] == "var":
      flat[path] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
    elif path[-1] != "kernel":
      flat[path] = rng.normal(0.0, 0.5, value.shape).astype(np.float32)
  variables = flax.traverse_util.unflatten_dict(flat)
  _BLOCK_INDEX.clear()
  _BLOCK_INDEX.update({f"stage{s}_block{b}": s * blocks + b
                       for s in range(3) for b in range(blocks)})

  def loss(params, train):
    out = model.apply({**variables, "params": params}, images, train=train,
                      mutable=["batch_stats"] if train and use_norm else [])
    logits = out[0] if isinstance(out, tuple) else out
    return jnp.sum(jnp.sin(logits)), logits

  grads = {}
  logits = {}
  for train in (True, False):
    (_, logits[train]), g = jax.value_and_grad(loss, has_aux=True)(
        variables["params"], train)
    grads[train] = _flat({"params": g})

  arrays = {"images": np.asarray(images).reshape(8, 1, 28, 28)}
  names = {}
  for i, (path, value) in enumerate(flat.items()):
    names[f"v{i}"] = _torch_names(path)
    arrays[f"v{i}"] = _to_torch(path, value)
  code = TWIN + f"""
names = {names!r}
model = ResNet({widths!r}, {blocks}, {use_norm}, {skip_init}, eps={EPSILON})
outputs["count"] = np.array(sum(p.numel() for p in model.parameters()))
state = model.state_dict()
assert set(names.values()) <= set(state), set(names.values()) - set(state)
with torch.no_grad():
  for key, name in names.items():
    state[name].copy_(torch.from_numpy(inputs[key]).reshape(state[name].shape))
images = torch.from_numpy(inputs["images"])
for train in (False, True):  # eval first: training updates the statistics
  model.train(train)
  model.zero_grad()
  logits = model(images)
  torch.sin(logits).sum().backward()
  outputs[f"logits_{{train}}"] = logits.detach().numpy()
  for key, name in names.items():
    parameter = dict(model.named_parameters()).get(name)
    if parameter is not None:
      outputs[f"grad_{{train}}_{{key}}"] = parameter.grad.numpy()
"""
  torch = helpers.run_torch(code, arrays)
  count = sum(v.size for p, v in flat.items() if p[0] == "params")
  assert int(torch["count"]) == count
  for train in (True, False):
    np.testing.assert_allclose(logits[train], torch[f"logits_{train}"],
                               rtol=1e-4, atol=1e-4)
    for i, path in enumerate(flat):
      if path[0] == "params":
        np.testing.assert_allclose(
            _to_torch(path, grads[train][path]),
            torch[f"grad_{train}_v{i}"], rtol=2e-3, atol=2e-4,
            err_msg=f"{path} train={train}")


@pytest.mark.parametrize("blocks,depth", [(1, 8), (2, 14), (3, 20)])
def test_depth_is_six_blocks_plus_two(blocks, depth):
  """Convolutions on the main path plus the readout: 6n + 2 layers (the
  1x1 shortcut projections are not counted, as in He et al.)."""
  model = resnet.ResNet(norm=bn_nn.BatchNorm, conv=models.Conv,
                        blocks_per_stage=blocks)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 784)), train=False))
  kernels = [p for p in flax.traverse_util.flatten_dict(shapes["params"])
             if p[-1] == "kernel" and "conv_shortcut" not in p]
  assert len(kernels) == depth
  assert sorted(shapes["batch_stats"]) == sorted(
      k for k in shapes["params"] if k != "readout" and k != "conv_stem")


def test_skip_init_starts_every_block_as_its_shortcut():
  """With SkipInit's gains at 0, the residual branches add nothing: the
  net equals the same net with the branches cut (second conv's kernels
  zeroed and no norm), whatever the branches' weights."""
  model = resnet.ResNet(norm=None, conv=models.Conv, widths=(4, 8, 8),
                        skip_init=True)
  images = jax.random.uniform(jax.random.key(1), (4, 784))
  variables = model.init(jax.random.key(0), images, train=False)
  flat = _flat(variables)
  assert all(v == 0 for p, v in flat.items() if p[-2] == "skip_init")
  cut = {p: (np.zeros_like(v) if p[-2] == "conv_2" else v)
         for p, v in flat.items()}
  np.testing.assert_array_equal(
      model.apply(variables, images, train=True),
      model.apply(flax.traverse_util.unflatten_dict(cut), images,
                  train=True))
  gains = {p: (np.full_like(v, 0.5) if p[-2] == "skip_init" else v)
           for p, v in flat.items()}
  assert not np.allclose(
      model.apply(flax.traverse_util.unflatten_dict(gains), images,
                  train=True),
      model.apply(variables, images, train=True))


def test_bad_sizes_are_one_line_errors():
  images = jnp.zeros((1, 784))
  with pytest.raises(ValueError, match=r"blocks_per_stage=0: at least 1"):
    resnet.ResNet(norm=None, conv=models.Conv, blocks_per_stage=0).init(
        jax.random.key(0), images, train=False)
  with pytest.raises(ValueError, match=r"widths=\(\): one positive width"):
    resnet.ResNet(norm=None, conv=models.Conv, widths=()).init(
        jax.random.key(0), images, train=False)


# ----------------------------------------------------------------------------
# In the lab: config.model="resnet".


def _resnet_config(**changes):
  from bn_lab import config as base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  config.model, config.placement = "resnet", "before_activation"
  config.channels, config.widths = (4, 8, 8), ()
  for dotted, value in changes.items():
    section, _, name = dotted.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


@pytest.mark.parametrize("changes,fragment", [
    ({"placement": "after_activation"},
     "config.placement='after_activation' does not fit model='resnet'"),
    ({"resnet.blocks_per_stage": 0},
     "config.resnet.blocks_per_stage=0 must be a positive integer"),
    ({"resnet.standardize": "weight"},
     "config.resnet.standardize='weight' is not valid"),
    ({"resnet.skip_init": None},
     "config.resnet.skip_init=None must be True or False"),
    ({"channels": ()}, "config.channels=() gives model='resnet' no stage"),
    ({"norm": "group", "bn.num_groups": 3},
     "config.bn.num_groups=3 does not divide the 4 features of layer "
     "norm_stem"),
])
def test_bad_resnet_settings_are_one_line_errors(changes, fragment):
  import re  # pylint: disable=g-import-not-at-top
  from bn_lab import sweep  # pylint: disable=g-import-not-at-top
  with pytest.raises(sweep.ConfigError, match=re.escape(fragment)):
    sweep.validate_config(_resnet_config(**changes))


@pytest.mark.parametrize("norm,skip_init,standardize", [
    ("batch", False, "none"), ("frn", False, "none"),
    ("evonorm_b0", False, "none"), ("evonorm_s0", False, "ws"),
    ("none", True, "scaled")])
def test_the_lab_builds_each_norm_into_the_residual_cnn(norm, skip_init,
                                                        standardize):
  """The trainer's model (TrainSpec.make_model from the config) puts the
  chosen norm after every convolution, with no ReLU after a norm that is
  its own nonlinearity: its training-mode logits equal those of
  bn_lab.resnet.ResNet built here by hand, from the same variables."""
  from bn_lab import sweep  # pylint: disable=g-import-not-at-top
  config = _resnet_config(norm=norm, **{"resnet.skip_init": skip_init,
                                        "resnet.standardize": standardize})
  if norm == "none":
    config.placement = "none"
  config.bn.num_groups = 4
  sweep.validate_config(config)
  spec = sweep.make_spec(config, config.batch_size)
  model = spec.make_model({})
  images = jax.random.uniform(jax.random.key(1), (6, 784))
  variables = model.init(jax.random.key(0), images, train=False)
  by_hand = {
      "batch": (functools.partial(bn_nn.BatchNorm, momentum=0.99,
                                  epsilon=1e-3), None, False),
      "frn": (functools.partial(bn_nn.FRN, epsilon=1e-3),
              functools.partial(bn_nn.FRN, epsilon=1e-3, use_tau=False),
              True),
      "evonorm_b0": (functools.partial(bn_nn.EvoNormB0, momentum=0.99,
                                       epsilon=1e-3), None, True),
      "evonorm_s0": (functools.partial(bn_nn.EvoNormS0, num_groups=4,
                                       epsilon=1e-3), None, True),
      "none": (None, None, False)}[norm]
  reference = resnet.ResNet(
      norm=by_hand[0], plain_norm=by_hand[1], norm_is_activation=by_hand[2],
      widths=(4, 8, 8), skip_init=skip_init,
      conv=functools.partial(models.Conv, standardize=standardize))
  mutable = ["batch_stats"] if "batch_stats" in variables else False
  ours = model.apply(variables, images, train=True, mutable=mutable)
  theirs = reference.apply(variables, images, train=True, mutable=mutable)
  np.testing.assert_array_equal(*(o[0] if mutable else o
                                  for o in (ours, theirs)))
  assert ("gain" in variables["params"]["conv_stem"]) == (
      standardize == "scaled")


@pytest.mark.slow
def test_a_resnet_norms_study_runs_from_the_command_line(tmp_path):
  """--config.model=resnet with a norms axis, end to end on tiny data."""
  idx = helpers.write_tiny_idx(tmp_path / "idx", 100, 50)
  workdir = tmp_path / "run"
  helpers.run_cli([
      "--config=lab/bn_lab/config.py", f"--workdir={workdir}",
      f"--config.data_dir={idx}", "--config.dataset=tiny",
      "--config.num_epochs=1", "--config.seeds=(0,)", "--config.model=resnet",
      "--config.placement=before_activation", "--config.channels=(4,8,8)",
      "--config.widths=()", "--config.norms=('batch','frn')",
      "--config.batch_size=20"])
  summary = (workdir / "summary.md").read_text()
  for norm in ("batch", "frn"):
    assert f"| {norm} |" in summary, summary
