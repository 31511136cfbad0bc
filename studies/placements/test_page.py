"""The placements section's comparison with CaffeNet-128: only where a
model has BN both before and after its activation."""

from bn_lab import stats
from studies.placements import page


def test_no_caffenet_line_without_both_placements():
  none_vs_before = stats.welch([0.95, 0.96, 0.97], [0.94, 0.95, 0.96],
                               label="none over before_activation")
  assert page._caffenet_comparison(
      {("mlp", "relu"): {("none", "before_activation"): none_vs_before}}) == ""


def test_caffenet_line_gives_the_sign_against_the_paper():
  # BN after the activation ahead by 1 point, as CaffeNet's (after 49.9 >
  # before 47.4): the same sign.
  after_vs_before = stats.welch([0.97, 0.98, 0.99], [0.96, 0.97, 0.98],
                                label="after over before")
  line = page._caffenet_comparison({("mlp", "relu"): {
      ("after_activation", "before_activation"): after_vs_before}})
  assert "mlp with relu: after - before +1.00 points, the same sign" in line
  assert line.startswith("* **Against CaffeNet-128 on ImageNet**")
