r"""A real domain shift: printed digits <-> MNIST, BN adapted, GN/LN beside.

    .venv/bin/python -m experiments.main --config=studies/real_shift/config.py --workdir=workdirs/real_shift

BN's statistics and affine parameters adapted on the target (source,
AdaBN, test batch, TENT), GN and LN nets as references.

The run trains its source nets itself (studies.real_shift.real_shift): for
each direction, the residual CNN (bn_lab.resnet: ResNet-8, stage widths
8, 16, 32, one block per stage, stride-2 stem; 7 norm layers) with BN, GN
(4 groups) and LN, 5 seeds vmapped, Adam 1e-3 at a fixed rate, batch 128,
2 epochs over the first 30,000 source training images (no selection of
any kind: the net after the last epoch is used), through the lab's trainer
(bn_lab.classifier.train_combination, checkpoints in
source/<source data set>/ of the workdir, so that a rerun resumes). Then
every net is evaluated on a fixed random subset of 2,048 target test
images (`adapt.eval_examples`, from `adapt.eval_seed`): BN with its source
(running) statistics; AdaBN: the statistics recomputed over the first
10,000 unlabeled target *training* images, weights frozen; as a control,
the same recomputation over source training images (PreciseBN: what is
left of AdaBN's gain once the moving averages' lag is removed); test-batch
statistics at every adaptation batch size; TENT (online: one pass over
the stream, each batch predicted before its own step, the adaptation
carried to the next batch) at every batch size, Adam with the learning
rate 1e-3 x batch / 128 (linear scaling from TENT's CIFAR setting, Adam
1e-3 at batch 128; a choice, as TENT's reference code states no rule);
GN and LN nets as they are. Each net's accuracy on its own source test set
(all of it) is recorded too: for the reverse direction it is the ceiling
(a net trained on the target domain).

Full run: 35 minutes on 2 CPU cores under a load average of 5 to 8 from
other jobs (measured 2026-12-08: the training of each net, about 3 to 6
minutes, and the evaluation, 2 to 5 minutes per direction, are in
results.json).

Short run (about 32 s on 2 CPU cores, measured 2026-12-08; at a load
average of 1 to 2, 47 s of CPU time, mostly compilation; the test's: printed -> MNIST only, BN only, 2 seeds, stage widths 4 and 8, 1
epoch on 512 images, batch sizes 1 and 16 on 64 target images):

    .venv/bin/python -m experiments.main --config=studies/real_shift/config.py --workdir=workdirs/real_shift_short --config.directions="('printed_digits_to_mnist',)" --config.norms="('batch',)" --config.seeds='(0,1)' --config.train.channels='(4,8)' --config.train.num_epochs=1 --config.train.train_examples=512 --config.train.batch_size=64 --config.adapt.batch_sizes='(1,16)' --config.adapt.eval_examples=64 --config.adapt.adabn_examples=256 --config.adapt.adabn_chunk=128
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.study = ("a real domain shift: printed digits <-> MNIST, BN adapted "
             "(AdaBN, test batch, TENT) against GN and LN")
  # source_to_target; each source net's own test set gives the reverse
  # direction's ceiling.
  c.directions = ("printed_digits_to_mnist", "mnist_to_printed_digits")
  c.norms = ("batch", "group", "layer")  # batch first: the one adapted
  c.seeds = (0, 1, 2, 3, 4)

  # The source nets (bn_lab.config's fields of the same names).
  c.train = ml_collections.ConfigDict()
  c.train.channels = (8, 16, 32)  # ResNet-8's stage widths
  c.train.blocks_per_stage = 1
  c.train.stem_stride = 2
  c.train.num_groups = 4  # GN: divides every width
  c.train.bn_momentum = 0.99
  c.train.optimizer = "adam"
  c.train.learning_rate = 1e-3  # fixed: no schedule, nothing tuned
  c.train.batch_size = 128
  c.train.num_epochs = 2
  c.train.train_examples = 30000  # the first of the source training set

  # Adaptation and evaluation on the target domain.
  c.adapt = ml_collections.ConfigDict()
  c.adapt.batch_sizes = (1, 4, 16, 64, 256)  # test batch and TENT
  c.adapt.eval_examples = 2048  # fixed target test subset: a multiple of
  # every batch size, so every method sees every image
  c.adapt.eval_seed = 0  # which subset, and its (stream) order
  c.adapt.adabn_examples = 10000  # the first target *training* images
  c.adapt.adabn_chunk = 500  # pooled: only memory depends on it
  c.adapt.tent_learning_rate = 1e-3  # Adam, at tent_reference_batch
  c.adapt.tent_reference_batch = 128
  c.adapt.tent_lr_scaling = "linear"  # linear | none (lr at every batch)
  c.adapt.episodic = False  # TENT's reset before every batch (online: no)
  return c


def short_config():
  """The short run's config: the flags of the short command above."""
  c = get_config()
  c.directions = ("printed_digits_to_mnist",)
  c.norms = ("batch",)
  c.seeds = (0, 1)
  c.train.channels = (4, 8)  # two stages: a third less to compile
  c.train.num_epochs = 1
  c.train.train_examples = 512
  c.train.batch_size = 64
  c.adapt.batch_sizes = (1, 16)
  c.adapt.eval_examples = 64
  c.adapt.adabn_examples = 256
  c.adapt.adabn_chunk = 128
  return c
