r"""The base config: every field an experiment reads (the reference model).

    .venv/bin/python -m experiments.main --config=lab/bn_lab/config.py --workdir=workdirs/base

On its own it trains the reference Keras model (784 -> Dense(50, relu) ->
BN -> Dense(10), Adam 1e-3, batch 128, 10 epochs, 3 seeds). Every study
config starts from `get_config()` here and changes what it studies; configs
import nothing from the training code, so reading one tells the whole setup.

Study axes. A field that holds a tuple of values for one field of a run:
`placements` sets `placement`, `batch_sizes` sets `batch_size`, `models`
sets `model`, `activations` sets `activation`, `norms` sets `norm`,
`virtual_batch_sizes` sets `bn.virtual_batch_size`, `variants` sets
`variant` and the fields of `variant_settings[variant]` (the table is
bn_lab.sweep.AXES). The runs are the product of the axes; each
combination is one compiled program, in which seeds x numeric sweeps
(`sweep.*`) train together, vmapped. An empty axis keeps the single field.

Short run (about 8 s on 2 CPU cores, measured 2026-12-07; one epoch, one
seed):

    .venv/bin/python -m experiments.main --config=lab/bn_lab/config.py --workdir=workdirs/base_short --config.num_epochs=1 --config.seeds='(0,)'
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  c = ml_collections.ConfigDict()
  c.study = "the reference model: 784 -> Dense(50, relu) -> BN -> Dense(10)"

  c.dataset = "mnist"  # mnist | fashion_mnist | kmnist
  c.data_dir = ""  # the four IDX files; "" = $BN_JAX_DATA_DIR, the cache,
  # the copy bundled with bn_jax (MNIST), a download (bn_lab.data)
  c.data_source = "auto"  # auto | idx | download | tfds
  c.input_scaling = "unit"  # unit ([0, 1]) | standardize (MNIST mean/std)
  # | raw (0..255 as they are)

  c.model = "mlp"  # mlp | cnn | resnet (below) | lstm (the image as a
  # sequence, below)
  c.placement = "after_activation"  # none | before_activation |
  # after_activation | input
  c.activation = "relu"  # relu | sigmoid | tanh
  c.widths = (50,)  # hidden Dense layers
  c.channels = (32, 64)  # cnn only: the 3x3 conv layers
  # auto: "im2col" (one matmul over shifted copies; fast on XLA:CPU) on a
  # CPU, "xla" (flax.linen.Conv) on GPU/TPU.
  c.conv = "auto"
  # The Dense kernels' initialization: default (flax's LeCun normal) |
  # gaussian (N(0, init_std^2): Ioffe & Szegedy's "small random Gaussian
  # values", whose scale the paper does not give).
  c.init = "default"
  c.init_std = 0.01
  # model=lstm (bn_jax.recurrent; bn_lab.models.SequenceClassifier): the
  # image read as a sequence by an LSTM of lstm.hidden_size units, its last
  # hidden state -> Dense(10). `norm` picks the cell: batch (the BN-LSTM of
  # Cooijmans et al. 2016, statistics per time step, gammas from 0.1) |
  # layer (LN-LSTM) | none (plain LSTM); it reads bn.momentum, bn.epsilon,
  # bn.impl. `placement` is before_activation (where the cell normalizes) or
  # none; activation, widths, channels and conv are not read.
  # sequence: rows (28 steps of 28 pixels) | pixels (784 steps of 1) |
  # permuted (784 steps of 1 in a fixed random order from
  # lstm.permutation_seed).
  c.sequence = "rows"
  c.lstm = ml_collections.ConfigDict()
  c.lstm.hidden_size = 100
  c.lstm.permutation_seed = 0
  # model=resnet (bn_lab.resnet: He et al.'s 6n + 2-layer residual CNN):
  # `channels` are its stage widths (e.g. (16, 32, 64)), n is
  # resnet.blocks_per_stage; its norm follows every convolution (placement
  # before_activation) or there is none (placement none); skip_init adds
  # SkipInit's zero-initialized gain on each residual branch; standardize:
  # none | ws (Weight Standardization) | scaled (Scaled WS, the NF-ResNets');
  # stem_stride 2 halves the image in the stem (28x28 -> 14x14: 4x less
  # compute, as ImageNet ResNets' strided stem). activation and widths are
  # not read.
  c.resnet = ml_collections.ConfigDict()
  c.resnet.blocks_per_stage = 1
  c.resnet.skip_init = False
  c.resnet.standardize = "none"
  c.resnet.stem_stride = 1

  # The normalization layer wherever `placement` puts one (bn_lab.models.
  # NORMS): batch | renorm (Batch Renormalization) | ghost (ghost batches of
  # bn.virtual_batch_size) | sampled (statistics from bn.stats_fraction of
  # the batch) | layer | group (bn.num_groups) | instance (cnn only) | rms |
  # noisy_batch (BN followed by random noise, config.noisy_bn) | frn (FRN +
  # TLU) | evonorm_b0 (bn.momentum) | evonorm_s0 (bn.num_groups) (the last
  # three on conv layers only) | none (no normalization anywhere: placement
  # none).
  c.norm = "batch"

  # Normalization options: each field is an argument of the same name of the
  # bn_jax.nn layer, and each layer reads only its own (models.NORM_FIELDS;
  # bn_lab.models.make_norm builds the layer from this section).
  c.bn = ml_collections.ConfigDict()
  # flax convention: running = m * running + (1 - m) * batch (PyTorch's
  # momentum is 1 - m); None: exact cumulative average.
  c.bn.momentum = config_dict.FieldReference(0.99, field_type=object)
  c.bn.epsilon = 1e-3  # Keras' default, as in the reference model
  c.bn.unbiased_running_var = False
  c.bn.stats_method = "shifted"  # shifted | two_pass | one_pass
  c.bn.grad = "paper_jvp"  # paper_jvp | paper_vjp | autodiff
  c.bn.impl = "auto"  # auto (xla_cpu on a CPU, else plain) | xla_cpu | plain
  # norm=renorm (Ioffe 2017; Keras' names). r = sigma_B / sigma is clipped
  # to [rmin, rmax] (rmin None: 1 / rmax, the paper's), d = (mu_B - mu) /
  # sigma to [-dmax, dmax], the limits relaxed from (1, 1, 0), plain BN, by
  # renorm_schedule: (hold, rmax_at, dmax_at), plain BN until `hold`, then
  # linear to the final rmax at `rmax_at` and dmax at `dmax_at` (None: the
  # final limits from the start, as Keras). The paper's steps are (5000,
  # 40000, 25000); in "fraction" units each is a fraction of the training
  # steps, and the default maps the paper's 40,000 steps to the end.
  c.bn.renorm_clipping = ml_collections.ConfigDict(
      {"rmax": 3.0, "rmin": config_dict.placeholder(float), "dmax": 5.0})
  c.bn.renorm_momentum = 0.99
  c.bn.renorm_schedule = config_dict.FieldReference((0.125, 1.0, 0.625),
                                                    field_type=object)
  c.bn.renorm_schedule_unit = "fraction"  # fraction | steps
  # norm=sampled: statistics from stats_examples examples of each batch if
  # set, else from stats_fraction of it.
  c.bn.stats_examples = config_dict.placeholder(int)
  # norm=ghost (Hoffer et al. 2017): statistics per chunk of this many
  # examples of each batch (it must divide the batch size).
  c.bn.virtual_batch_size = 32
  # norm=sampled: the fraction of each batch the statistics come from, every
  # k-th example (stride) or a random subset (random); all are normalized.
  c.bn.stats_fraction = 0.25
  c.bn.stats_sampling = "stride"  # stride | random
  c.bn.num_groups = 5  # norm=group: must divide the normalized features

  c.optimizer = "adam"  # adam | adamw | sgd | momentum
  c.learning_rate = 1e-3
  c.schedule = "constant"  # constant | cosine | warmup_cosine
  c.warmup_steps = 0
  # The epochs the schedule (and a Batch Renorm schedule in fractions) is
  # laid out over; None: num_epochs. Set, a run trains num_epochs of them
  # and can later be extended up to it (bn_lab.workdir.check_resumable).
  c.schedule_epochs = config_dict.placeholder(int)
  c.weight_decay = 0.0  # adamw only
  # Clip each step's gradient to this global norm (optax.clip_by_global_norm,
  # before the optimizer); None: no clipping.
  c.grad_clip_norm = config_dict.placeholder(float)
  # Adaptive Gradient Clipping (Brock et al. 2021; optax.adaptive_grad_clip):
  # each unit's gradient clipped to agc_clip x its weights' norm, every
  # parameter but the readout's (as the paper). The value is the one at
  # lr_reference_batch_size; another batch size gets agc_clip / (its
  # learning-rate factor, lr_scaling), so that the bound on each step's
  # relative change, learning rate x agc_clip, stays the same (the paper:
  # larger batches need a smaller clip). None: no AGC.
  c.agc_clip = config_dict.placeholder(float)
  c.batch_size = 128
  # How the learning rate follows the batch size (with config.batch_sizes):
  # none | linear | sqrt, times batch_size / lr_reference_batch_size; the
  # reference batch size trains at learning_rate (sweep.LR_SCALINGS).
  c.lr_scaling = "none"
  c.lr_reference_batch_size = 128
  c.num_epochs = 10
  # Train on this many training examples (a fixed random subset, the same
  # for every run; bn_lab.data.subset); None: all of them.
  c.train_examples = config_dict.placeholder(int)
  # Hold out this many training examples as a validation split (a fixed
  # random subset, the same for every run; bn_lab.data.validation_split),
  # before train_examples picks its subset from the rest. Each epoch then
  # records val_loss and val_accuracy: what selection (a rate, an epoch, a
  # variant) reads, so that the test set only reports. 0: no split.
  c.validation_examples = 0

  c.seeds = (0, 1, 2)
  # None: each run's data order follows its seed. An int: every run sees the
  # batches (and order) that seed gives, so runs differ only in the init
  # seed and swept values; the sweep also trains faster (each batch gathered
  # once, the runs' first-layer matmuls fused into one).
  c.data_seed = config_dict.placeholder(int)

  # Static study axes (see the module docstring); () keeps the field above.
  c.placements = ()
  c.batch_sizes = ()
  c.models = ()
  c.activations = ()
  c.norms = ()
  c.virtual_batch_sizes = ()  # bn.virtual_batch_size (norm="ghost")
  # Named bundles of settings: each name in `variants` sets `variant` and
  # the fields variant_settings[name] gives (nested as the config, e.g.
  # {"norm": "none", "resnet": {"skip_init": True}}), for what one axis
  # cannot say (NF = no norm + Scaled WS + SkipInit + AGC).
  c.variant = ""
  c.variants = ()
  c.variant_settings = ml_collections.ConfigDict()
  # Numeric sweeps: a tuple of values multiplies the runs inside every
  # combination, vmapped; () keeps the single value.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.learning_rate = ()
  c.sweep.bn_momentum = ()
  c.sweep.bn_epsilon = ()

  # Stop at the first NaN/inf loss, parameter or BN statistic (flags computed
  # on device, read once per epoch); False skips the flags; "record" drops
  # a run's first non-finite step and freezes that run (its rows carry
  # diverged_at), while the other runs of the sweep train on.
  c.nan_guard = config_dict.FieldReference(True, field_type=object)
  # The guard also calls a run diverged, as it would a NaN, at the first
  # step whose training loss, though finite, exceeds divergence_factor x
  # ln(10): an untrained classifier's loss (uniform predictions, 2.30),
  # the one reference every run shares, so nothing is added to its state
  # or checkpoints. 1e3 puts the line at 2303: ten times the worst start
  # measured on MNIST (raw 0..255 pixels, no BN, Adam 1e-3: loss 107 at
  # step 1, a peak of 219 in the CNN), while a run that blows up passes it
  # by orders of magnitude (SGD at 1e4: 1e18). A run below it trains bit
  # for bit as without the check. None or 0: off.
  c.divergence_factor = config_dict.FieldReference(1e3, field_type=object)

  # Also evaluate the whole training set in eval mode after each epoch, as
  # Keras' `evaluate` does: train_loss_eval, train_accuracy_eval (the
  # train_* metrics are training mode, averaged while the weights moved).
  c.eval_train = False

  # Exact population statistics after each epoch ("PreciseBN", Wu & Johnson
  # 2021; bn_jax.precise): every BN layer's statistics recomputed over
  # num_batches training batches with the weights frozen, reported as
  # test_accuracy_precise. 0: off. estimator: mean (of the per-batch
  # statistics, Bessel-corrected, as fvcore) | pooled (E[x^2] - E[x]^2).
  c.precise_bn = ml_collections.ConfigDict()
  c.precise_bn.num_batches = 0
  # Instead of num_batches: this many training examples, in batches of each
  # combination's batch size (a batch-size sweep recomputes over the same
  # examples).
  c.precise_bn.num_examples = config_dict.placeholder(int)
  c.precise_bn.estimator = "mean"
  c.precise_bn.layerwise = False  # layer l with the layers below in eval mode
  c.keep_checkpoints = 2

  # Reporting only: changing these resumes a run (bn_lab.workdir).
  c.target_accuracy = 0.97  # the report's "epochs to target" column
  c.progress_seconds = 30.0  # a progress line while an epoch runs; 0: off
  # The training loss and accuracy over every this many steps, to
  # steps.jsonl and TensorBoard (the epochs' rows have one point each); 0:
  # off.
  c.log_every_steps = 50

  # Data parallelism (bn_lab.parallel): each step's global batch of
  # batch_size examples is split over mesh_devices devices.
  c.mesh_devices = config_dict.FieldReference(1, field_type=object)
  # ^ 1 (single-device code path) | N | "auto" (every device)
  c.bn_stats = "sync"  # sync: global-batch BN statistics | per_device:
  # ghost batches of batch_size / devices (running stats: mean over devices)
  c.distributed = ml_collections.ConfigDict()  # several hosts; see parallel
  c.distributed.coordinator_address = ""  # "host:port" of process 0; ""
  # keeps one process (no jax.distributed.initialize)
  c.distributed.num_processes = config_dict.placeholder(int)  # None: detect
  c.distributed.process_id = config_dict.placeholder(int)  # (Slurm, MPI)
  return c
