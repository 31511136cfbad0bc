"""studies.ioffe2015.figure's probes.png on hand-made probe rows: what each
panel draws (read back from the Figure) and that no panel's labels run into
its neighbour."""

import numpy as np

from studies.ioffe2015 import figure
from studies.ioffe2015 import probes

STEPS_PER_EPOCH = 100
UNITS = 3
# Test accuracy of runs 0, 1 of each combination at epochs 1, 2.
ACCURACY = {"placement=none": [[0.90, 0.95], [0.92, 0.97]],
            "placement=before_activation": [[0.94, 0.98], [0.96, 0.98]]}


def probe_rows():
  """Per combination, run and epoch a metrics row with two probes: the
  percentiles of each unit, rising over training and in q."""
  rows = []
  qs = np.array(probes.QS, dtype=float)[:, None]
  for c, (combo, accuracy) in enumerate(ACCURACY.items()):
    for run, by_epoch in enumerate(accuracy):
      for epoch, acc in enumerate(by_epoch, 1):
        steps = [STEPS_PER_EPOCH * epoch - 50, STEPS_PER_EPOCH * epoch]
        rows.append({
            "combo": combo, "placement": combo.split("=")[1], "run": run,
            "epoch": epoch, "step": STEPS_PER_EPOCH * epoch,
            "test_accuracy": acc, "probe_steps": steps,
            "probe_percentiles": [
                ((qs - 50) / 25 + s / 100 + c + run * np.arange(UNITS)
                 ).tolist() for s in steps]})
  return rows


def test_probes_plot_accuracy_in_percent_against_steps():
  fig = figure.plot_probes(probe_rows())
  axes = fig.axes[:4]  # accuracy, one panel per combination, drift
  assert axes[0].get_ylabel() == "test accuracy (eval mode, %)"
  for ax in axes:
    assert ax.get_xlabel() == "optimizer steps"
  for line, accuracy in zip(axes[0].get_lines(), ACCURACY.values()):
    np.testing.assert_array_equal(line.get_xdata(), [100, 200])
    np.testing.assert_allclose(line.get_ydata(),
                               100 * np.mean(accuracy, axis=0))
  # (b): unit FIGURE_UNIT of the first run, p15 at each probe step.
  p15 = axes[1].get_lines()[0]
  np.testing.assert_array_equal(p15.get_xdata(), [50, 100, 150, 200])
  np.testing.assert_allclose(p15.get_ydata(),
                             (15 - 50) / 25 + np.array([0.5, 1, 1.5, 2]))


def test_probes_panels_keep_their_labels_apart(tmp_path):
  """Each panel's y axis (label and tick labels) lies right of everything
  its left neighbour draws (the drift panel's long y label ran into the
  panel before it)."""
  fig = figure.plot_probes(probe_rows(), tmp_path / "probes.png")
  assert (tmp_path / "probes.png").stat().st_size > 0
  fig.draw_without_rendering()
  renderer = fig.canvas.get_renderer()
  axes = fig.axes[:4]
  for left, right in zip(axes, axes[1:]):
    y_axis = right.yaxis.get_tightbbox(renderer)
    assert right.yaxis.label.get_window_extent(renderer).x0 >= y_axis.x0
    assert left.get_tightbbox(renderer).x1 < y_axis.x0, (
        left.get_title(), right.get_ylabel())
