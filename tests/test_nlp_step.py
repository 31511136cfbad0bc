"""benchmarks/nlp_step.py: the NLP studies' steps against PyTorch, smoke-tested.

PyTorch is not a dependency, so the quick run times bn_jax's side of every
row and prints its table (rows, not numbers: timings on a shared CPU say
nothing); where $BN_JAX_TORCH_PYTHON names a Python with torch it also runs
the PyTorch side and its equal-work check (each pair's losses from the same
weights on the same batches), and otherwise says that it skipped it.
"""

import os
import re
import subprocess
import sys

import optax
import pytest

import helpers

sys.path.insert(0, str(helpers.REPO / "benchmarks"))
import nlp_step  # noqa: E402  pylint: disable=g-import-not-at-top

ROWS = nlp_step.row_names()


@pytest.mark.slow
def test_quick_run_prints_every_row():
  python = os.environ.get("BN_JAX_TORCH_PYTHON", "")
  # A smoke run: XLA's least optimization compiles the eight programs
  # faster (about 30 s of first calls instead of 55 on a loaded 2-core CPU);
  # one PyTorch thread, since a loaded CPU slows several threads by far more
  # than it slows one (the check is of equal work, not of speed).
  env = dict(os.environ, JAX_PLATFORMS="cpu", BN_JAX_TORCH_PYTHON=python,
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                        " --xla_backend_optimization_level=0").strip())
  result = subprocess.run(
      [sys.executable, "benchmarks/nlp_step.py", "--quick", "--threads=1"],
      cwd=helpers.REPO, env=env, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, (result.stdout[-3000:]
                                  + result.stderr[-3000:])
  out = result.stdout
  rows = re.findall(r"^\| ((?:char-LM|Transformer)[^|]*) \| [0-9.]+ \| "
                    r"([0-9.]+) \| ([^|]*) \| ([^|]*) \|$", out, re.MULTILINE)
  assert [name for name, *_ in rows] == ROWS, out
  assert all(float(ms) > 0 for _, ms, _, _ in rows)
  if not python:
    assert "PyTorch: skipped (set BN_JAX_TORCH_PYTHON" in out
    assert all((t, r) == ("skipped", "-") for _, _, t, r in rows), rows
    return
  for _, _, torch_ms, ratio in rows:
    assert float(torch_ms) > 0 and float(ratio) > 0
  checks = re.findall(r"^\| ((?:char-LM|Transformer)[^|]*) \| 1 \| .* \| "
                      r"(yes|NO) \|$", out, re.MULTILINE)
  assert checks == [(name, "yes") for name in ROWS], out
  assert "equal-work check: passed" in out


def test_the_schedule_is_the_study_s():
  """The PyTorch side's LambdaLR factor is the Transformer study's optax
  schedule over its peak learning rate, warmup and cosine decay."""
  spec = {"warmup_steps": 100, "total_steps": 651}
  factor = nlp_step.warmup_cosine(spec)
  schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 651)
  for count in (0, 1, 50, 100, 101, 400, 650, 651, 700):
    assert factor(count) * 1e-3 == pytest.approx(float(schedule(count)),
                                                 abs=1e-9), count


def test_kernel_parts_follow_the_op_names():
  part = nlp_step.kernel_part
  t = nlp_step.TRANSFORMER_LENGTH
  assert part("jit(step)/jvp(Classifier)/block0/attention/reduce_max",
              (64, 4, t, t)) == ("attention weights (B, heads, T, T): "
                                 "scores, mask, softmax (forward)")
  assert part("jit(step)/transpose(jvp(Classifier))/block1/attention/"
              "query/dot_general", (8192, 64)) == (
                  "attention projections (backward)")
  assert part("jit(step)/jvp(Classifier)/final_norm/BatchNorm_0/mul",
              (64, t, 64)) == "norms (forward)"
  assert part("jit(step)/jvp(Classifier)/block1/tanh", (64, t, 128)) == (
      "GELU, residual adds (forward)")
  assert part("jit(one_seed)/vmap()/while/body/closed_call/transpose(jvp())"
              "/while/body/closed_call/mul", (1, 32, 128)) == (
                  "LSTM time steps (backward)")
  assert part("jit(one_seed)/vmap()/while/body/closed_call/div", (512,)) == (
      "loss, clipping, Adam, batches")


HLO = """\
%inner_body.2 (p.1: (s32[], f32[4])) -> (s32[], f32[4]) {
  %dot.3 = f32[4]{0} dot(f32[4]{0} %a, f32[4]{0} %b)
  %fusion.2 = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%f.1, metadata={op_name="jit(c)/vmap()/while/body/jvp()/while/body/mul"}
}

%outer_body.1 (p.2: (s32[], f32[4])) -> (s32[], f32[4]) {
  %copy.4 = f32[4]{0} copy(f32[4]{0} %a)
  %while.2 = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%c.2, body=%inner_body.2
}

ENTRY %main.5 (a: f32[4]) -> f32[4] {
  %copy.1 = f32[4]{0} copy(f32[4]{0} %a)
  %while.1 = (s32[], f32[4]) while((s32[], f32[4]) %t), condition=%c.1, body=%outer_body.1
  ROOT %fusion.9 = f32[4]{0} fusion(f32[4]{0} %a), kind=kLoop, calls=%f.2, metadata={op_name="jit(c)/vmap()/while/body/jvp()/add"}
}
"""


def test_kernel_parts_place_unnamed_kernels_by_loop():
  """Kernels without op_name are time steps' where an inner while loop's
  body (a loop in the loop over training steps) holds them."""
  parts = nlp_step.kernel_parts(HLO)
  assert parts["dot.3"] == nlp_step.UNNAMED_IN_LOOP
  assert parts["fusion.2"] == "LSTM time steps (forward)"
  assert parts["copy.4"] == parts["copy.1"] == nlp_step.UNNAMED
  assert parts["fusion.9"] == "embeddings, pooling, readout, loss (forward)"
