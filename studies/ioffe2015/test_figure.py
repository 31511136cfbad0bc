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


def _axes(fig):
  """{title's first line: axes} of the figure's panels."""
  return {ax.get_title().split("\n")[0]: ax for ax in fig.axes}


def test_probes_plot_accuracy_in_percent_against_steps(tmp_path):
  """What each panel draws, and (one figure drawn for both: matplotlib is
  the cost) that no panel's labels run into its neighbour."""
  fig = figure.plot_probes(probe_rows(), tmp_path / "probes.png", late=0.4)
  assert (tmp_path / "probes.png").stat().st_size > 0
  panels = _axes(fig)
  assert list(panels) == [
      "(a) test accuracy", "(b) placement=none",
      "(c) placement=before_activation", "(a) the last 40% of training",
      "drift of the median p50", "drift of the spread p85 - p15"]
  accuracy = panels["(a) test accuracy"]
  assert accuracy.get_ylabel() == "test accuracy (eval mode, %)"
  for ax in fig.axes:
    assert ax.get_xlabel() == "optimizer steps"
  for line, acc in zip(accuracy.get_lines(), ACCURACY.values()):
    np.testing.assert_array_equal(line.get_xdata(), [100, 200])
    np.testing.assert_allclose(line.get_ydata(), 100 * np.mean(acc, axis=0))
  # (b): unit FIGURE_UNIT of the first run, p15 at each probe step.
  p15 = panels["(b) placement=none"].get_lines()[0]
  np.testing.assert_array_equal(p15.get_xdata(), [50, 100, 150, 200])
  np.testing.assert_allclose(p15.get_ydata(),
                             (15 - 50) / 25 + np.array([0.5, 1, 1.5, 2]))
  # (b) and (c) on one y range, wide enough for both.
  b, c = panels["(b) placement=none"], panels["(c) placement=before_activation"]
  assert b.get_ylim() == c.get_ylim()
  both = np.concatenate([l.get_ydata() for ax in (b, c)
                         for l in ax.get_lines()])
  assert b.get_ylim()[0] <= both.min() and both.max() <= b.get_ylim()[1]
  # The late panel: the last 40% of the steps (200 only), on a y range
  # that leaves out the early accuracies (91% at step 100), so that the
  # late gap (96 against 98%) fills it.
  late = panels["(a) the last 40% of training"]
  for line, acc in zip(late.get_lines(), ACCURACY.values()):
    np.testing.assert_array_equal(line.get_xdata(), [200])
    np.testing.assert_allclose(line.get_ydata(),
                               100 * np.mean(acc, axis=0)[1:])
  low, high = late.get_ylim()
  assert 91 < low <= 95 and 98 <= high < 100  # 95: the lowest run at 200
  # The drift panels: the medians over runs, 0 at the last probe.
  for name in ("drift of the median p50", "drift of the spread p85 - p15"):
    for line in panels[name].get_lines():
      assert line.get_ydata()[-1] == 0.0
  _assert_labels_apart(fig)


def _assert_labels_apart(fig):
  """Each panel's y axis (label and tick labels) lies right of everything
  its left neighbour draws (a drift panel's long y label ran into the
  panel before it), and the lower row's titles lie below the upper row."""
  fig.draw_without_rendering()
  renderer = fig.canvas.get_renderer()
  upper, lower = fig.axes[:3], fig.axes[3:]
  for row in (upper, lower):
    for left, right in zip(row, row[1:]):
      y_axis = right.yaxis.get_tightbbox(renderer)
      assert right.yaxis.label.get_window_extent(renderer).x0 >= y_axis.x0
      assert left.get_tightbbox(renderer).x1 < y_axis.x0, (
          left.get_title(), right.get_ylabel())
  for above, below in zip(upper, lower):
    assert (below.title.get_window_extent(renderer).y1
            < above.get_tightbbox(renderer).y0), below.get_title()
