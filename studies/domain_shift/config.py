r"""Domain shift: the placement study's runs on shifted MNIST, three statistics.

    .venv/bin/python -m experiments.main --config=studies/domain_shift/config.py --workdir=workdirs/domain_shift

No training. Every run of `source_workdir` (the placement study: MLP, relu
and sigmoid, BN nowhere / before / after the activation / on the input, 5
seeds, trained on clean MNIST; `.venv/bin/python -m experiments.main
--config=studies/placements/config.py --workdir=workdirs/placement_study`
makes it) is restored from its last checkpoint and evaluated on the 10,000
test images shifted by bn_lab.data.shift_images (brightness, contrast,
Gaussian noise, translation, severities 1..5, not clipped, and brightness
again clipped to [0, 1]), with BN's statistics three ways
(studies.domain_shift.domain_shift): the running averages (eval mode); adapted (AdaBN):
recomputed, weights frozen, over the first `adapt_examples` *training*
images shifted the same way (noise from `adapt_noise_seed`, the test
set's from `test_noise_seed`), never over evaluated images or labels; and
test-batch statistics (training-mode normalization of each test batch of
`test_batch_size`). The issue's prediction, checked by the page
(studies/domain_shift/page.py): for the affine intensity shifts
(brightness, contrast) adapted statistics recover clean accuracy exactly
for `input` and `before_activation` (to `exact_tolerance` of the test set),
partly for `after_activation`, not at all for `none`; Gaussian noise
recovers partly everywhere. `source_workdir=workdirs/placement_study_cnn`
evaluates the CNN's runs instead.

Short run from scratch (about 16 s on 2 CPU cores, measured 2026-12-07): the
placement study's short run (studies/placements/config.py: one epoch, one
seed, relu, BN nowhere and before the activation), then two shifts at
severities 1 and 5 on it:

    .venv/bin/python -m experiments.main --config=studies/placements/config.py --workdir=workdirs/placement_study_short --config.num_epochs=1 --config.seeds='(0,)' --config.placements="('none','before_activation')" --config.activations="('relu',)"
    .venv/bin/python -m experiments.main --config=studies/domain_shift/config.py --workdir=workdirs/domain_shift_short --config.source_workdir=workdirs/placement_study_short --config.shifts="('brightness','noise')" --config.severities='(1,5)' --config.clipped_shifts='()' --config.adapt_examples=2000
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.study = ("domain shift: running, adapted (AdaBN) and test-batch BN "
                  "statistics on shifted MNIST")
  config.source_workdir = "workdirs/placement_study"
  config.shifts = ("brightness", "contrast", "noise", "translation")
  config.severities = (1, 2, 3, 4, 5)
  config.clip = False  # shift_images' default: brightness, contrast affine
  config.clipped_shifts = ("brightness",)  # also evaluated clipped
  config.adapt_examples = 10000  # the first training images, shifted
  config.adapt_batch_size = 500  # pooled over all: only memory depends on it
  config.adapt_noise_seed = 1
  config.test_noise_seed = 0  # bn_lab.data.SHIFT_NOISE_SEED
  config.test_batch_size = 128  # the training batch of the placement study
  # "Exact" recovery: every seed's adapted accuracy on the shifted test set
  # within this fraction of the test set (5 of 10,000 images) of its
  # adapted accuracy on the clean one.
  config.exact_tolerance = 0.0005
  return config
