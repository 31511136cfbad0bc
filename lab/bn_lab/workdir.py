"""The workdir's files: atomic writes, the run lock, the resume check.

Every whole file an experiment writes goes through `atomic_file`: a
temporary name beside the target, synced, then renamed, so a reader (or a
rerun after a crash or a full disk) never meets a half-written file;
metrics.jsonl grows by whole lines (`append_lines`), and orbax writes each
checkpoint to a temporary directory it renames when complete. A write that
fails raises `WriteError`, one line naming the file, and leaves the
previous version whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging as py_logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

from absl import logging


class WorkdirError(Exception):
  """The workdir cannot be used as asked; the message says how to fix it."""


class WriteError(WorkdirError, OSError):
  """A file of the workdir could not be written (full disk, permissions).

  What was written before is intact; rerunning the same command resumes.
  """


class CorruptMetrics(WorkdirError):
  """metrics.jsonl has a line that is not a JSON row."""


def write_error(path: Path, error: Exception) -> WriteError:
  """The one-line WriteError for `error` (an OSError, or what a library
  raised for one) while writing `path`."""
  if isinstance(error, OSError) and error.errno:
    reason = os.strerror(error.errno)
  else:
    reason = f"{type(error).__name__}: " + (
        str(error).strip().splitlines() or [""])[0][:200]
  failure = WriteError(
      f"could not write {path} ({reason}). Nothing written before is lost: "
      "free the space (or fix the permissions) and rerun the same command "
      "to resume.")
  failure.errno = getattr(error, "errno", None) or errno.EIO
  return failure


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w") -> Iterator[Any]:
  """Yields a temporary file beside `path`; once written and synced it is
  renamed to `path`. On any error the temporary file is removed and `path`
  keeps its previous content; an OSError becomes a `WriteError`."""
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      tmp.unlink()
    if isinstance(e, OSError) and not isinstance(e, WriteError):
      raise write_error(path, e) from e
    raise


def write_atomic(path: Path, text: str) -> None:
  with atomic_file(path) as f:
    f.write(text)


def append_lines(path: Path, lines: list[str]) -> None:
  """Appends whole lines and syncs them (metrics.jsonl, once per epoch).

  A failed append is cut back to the file's previous length, so the file
  never ends in a partial line.
  """
  path = Path(path)
  data = "".join(line + "\n" for line in lines).encode()
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      start = os.lseek(fd, 0, os.SEEK_END)
      try:
        view = memoryview(data)
        while view:
          view = view[os.write(fd, view):]
        os.fsync(fd)
      except OSError:
        os.ftruncate(fd, start)
        raise
    finally:
      os.close(fd)
  except OSError as e:
    raise write_error(path, e) from e


def numbered_jsonl(path: Path) -> list[tuple[int, Any]]:
  """(line number, value) of every line of a JSON-lines file that exists.

  Blank lines are skipped. A last line without its newline that does not
  parse is a row cut off mid-write (or being appended now) and is left out;
  any other line that is not JSON raises CorruptMetrics naming the file and
  the line.
  """
  *lines, tail = Path(path).read_bytes().split(b"\n")
  values = []
  for number, line in enumerate([*lines, tail], 1):
    if not line.strip():
      continue
    try:
      values.append((number, json.loads(line)))  # invalid UTF-8: ValueError
    except ValueError as e:
      if number > len(lines):  # the unterminated tail
        break
      raise CorruptMetrics(
          f"{path}, line {number} is not a JSON row ({e}): delete that line "
          "and rerun to resume, or use a new --workdir.") from None
  return values


def recorded_epochs(rows: list[dict[str, Any]], combo: str,
                    num_runs: int) -> int:
  """The last epoch up to which `combo` has the rows of all `num_runs` runs
  for every epoch (0: none), in metrics rows."""
  runs: dict[int, set] = {}
  for row in rows:
    if row.get("combo") == combo:
      runs.setdefault(row.get("epoch"), set()).add(row.get("run"))
  epoch = 0
  while len(runs.get(epoch + 1, ())) >= num_runs:
    epoch += 1
  return epoch


def read_jsonl(path: Path) -> list[Any]:
  """The rows of a JSON-lines file (`numbered_jsonl`); [] if it does not
  exist."""
  if not Path(path).exists():
    return []
  return [value for _, value in numbered_jsonl(path)]


class MetricsWriter:
  """Each epoch's rows, to metrics.jsonl and to TensorBoard event files.

  metrics.jsonl is append-only, one line per combination, run and epoch,
  synced every epoch; steps.jsonl the same for the training metrics of every
  `config.log_every_steps` steps. TensorBoard gets one event directory per
  run, `tensorboard/<combo>/run<i>`, so that `tensorboard --logdir workdirs`
  shows every run's curves (tensorboardX: no TensorFlow needed), the x axis
  in optimizer steps: the epochs' scalars under their names, the windows'
  under "steps/<name>", and the run's hyperparameters for the HParams tab.
  """

  def __init__(self, workdir: Path, scalars: tuple[str, ...]):
    self.path = Path(workdir) / "metrics.jsonl"
    self.steps_path = Path(workdir) / "steps.jsonl"
    self._tensorboard = Path(workdir) / "tensorboard"
    self._scalars = scalars
    self._writers = {}
    self._hparams = {}  # (combo, run) -> the run's hyperparameters
    self._purge_step = {}  # combo -> first step of this process's events

  def rows(self) -> list[dict[str, Any]]:
    return read_jsonl(self.path)

  def forget_after(self, combo: str, epoch: int,
                   steps_per_epoch: int) -> list[dict[str, Any]]:
    """Drops the combination's rows past `epoch` (written just before a
    crash, their checkpoint never saved; they are trained again), and tells
    TensorBoard to drop their events (`purge_step`); returns the rows of
    metrics.jsonl it keeps."""
    last_step = epoch * steps_per_epoch
    self._purge_step[combo] = last_step + 1
    _keep_rows(self.steps_path,
               lambda r: r["combo"] != combo or r["step"] <= last_step)
    kept = _keep_rows(self.path,
                      lambda r: r["combo"] != combo or r["epoch"] <= epoch)
    return [r for r in kept if r["combo"] == combo]

  def start_run(self, combo: str, run: int, hparams: dict[str, Any]) -> None:
    """The run's hyperparameters, for TensorBoard's HParams tab (written
    with its first scalars)."""
    self._hparams[(combo, run)] = hparams

  def write(self, rows: list[dict[str, Any]],
            step_rows: list[dict[str, Any]] = ()) -> None:
    """An epoch's rows (one per run) and its step windows' rows."""
    if step_rows:
      append_lines(self.steps_path, [json.dumps(r) for r in step_rows])
    append_lines(self.path, [json.dumps(r) for r in rows])
    try:
      for row in step_rows:
        writer = self._writer(row["combo"], row["run"])
        for name in STEP_SCALARS:
          writer.add_scalar(f"steps/{name}", row[name], row["step"])
      for row in rows:
        writer = self._writer(row["combo"], row["run"])
        for name in self._scalars:
          writer.add_scalar(name, row[name], row["step"])
    except OSError as e:
      raise write_error(self._tensorboard, e) from e

  def _writer(self, combo: str, run: int):
    key = (combo, run)
    if key not in self._writers:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      # Written by tensorboardX's own thread, on disk within `flush_secs`
      # and completely at `close` (after each combination): a view of the
      # runs; metrics.jsonl is the record.
      writer = tensorboardX.SummaryWriter(
          str(self._tensorboard / combo / f"run{run}"), flush_secs=2,
          purge_step=self._purge_step.get(combo))
      if key in self._hparams:
        for summary in tensorboardX.summary.hparams(
            _hparam_values(self._hparams[key]), dict.fromkeys(self._scalars)):
          writer.file_writer.add_summary(summary)
      self._writers[key] = writer
    return self._writers[key]

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers.clear()


class CurveWriter:
  """For studies with trainers of their own (char_lm, transformer,
  sentiment): curves.jsonl, one row per variant, seed and evaluation, and
  TensorBoard events in tensorboard/<variant>/seed<s>. A rerun drops a
  variant's rows before training it again (`start`). metrics.jsonl stays
  the classifier trainer's (`MetricsWriter`), whose rows the reports read."""

  def __init__(self, workdir: Path, seeds):
    self.path = Path(workdir) / "curves.jsonl"
    self._tensorboard = Path(workdir) / "tensorboard"
    self._seeds = tuple(seeds)
    self._writers = {}

  def start(self, norm: str) -> None:
    rows = [r for r in read_jsonl(self.path)
            if r["norm"] != norm] if self.path.exists() else []
    write_atomic(self.path, "".join(
        json.dumps(r) + "\n" for r in rows))

  def write(self, norm: str, step: int, scalars, seeds=None) -> None:
    """scalars: name -> one value per seed of `seeds` (default: all)."""
    rows = [{"norm": norm, "seed": seed, "step": step,
             **{k: float(v[i]) for k, v in scalars.items()}}
            for i, seed in enumerate(self._seeds if seeds is None
                                     else seeds)]
    append_lines(self.path, [json.dumps(r) for r in rows])
    import tensorboardX  # pylint: disable=g-import-not-at-top
    for row in rows:
      key = (norm, row["seed"])
      if key not in self._writers:
        self._writers[key] = tensorboardX.SummaryWriter(
            str(self._tensorboard / norm / f"seed{row['seed']}"),
            flush_secs=10, purge_step=0)
      for name in scalars:
        self._writers[key].add_scalar(name, row[name], step)

  def close(self) -> None:
    for writer in self._writers.values():
      writer.close()
    self._writers.clear()


def run_variants(workdir: Path, names, train, seeds) -> list[dict[str, Any]]:
  """Each variant's result, in order: read from variants/<name>.json where
  an earlier run finished it, else `train(name, writer)` (a CurveWriter of
  `seeds`) and saved there atomically, so that a rerun of the same command
  skips it. For studies with trainers of their own (char_lm, transformer).
  """
  names, results = list(names), []
  writer = CurveWriter(workdir, seeds)
  try:
    for i, name in enumerate(names, 1):
      done = Path(workdir) / "variants" / f"{name}.json"
      if done.exists():
        logging.info("[%s] finished before; skipped (%d/%d)", name, i,
                     len(names))
        results.append(json.loads(done.read_text()))
        continue
      logging.info("[%s] variant %d/%d", name, i, len(names))
      result = train(name, writer)
      done.parent.mkdir(exist_ok=True)
      write_atomic(done, json.dumps(result) + "\n")
      results.append(result)
  finally:
    writer.close()
  return results


@contextlib.contextmanager
def closing_after_error(writer: MetricsWriter | None):
  """Closes `writer` (None: nothing) after the block. Where the block
  failed, a failure to close (the TensorBoard writer on the same full disk)
  is suppressed: the block's error is the one the user must see."""
  try:
    yield
  except BaseException:
    if writer is not None:
      with contextlib.suppress(Exception):
        writer.close()
    raise
  if writer is not None:
    writer.close()


# The training metrics of steps.jsonl's rows (train.WINDOW_METRICS).
STEP_SCALARS = ("train_loss", "train_accuracy")


def _keep_rows(path: Path, keep) -> list[dict[str, Any]]:
  """Rewrites the JSON-lines file at `path` without the rows `keep` refuses
  (and without a last line cut off by a crash); returns the rows kept."""
  rows = read_jsonl(path)
  kept = [r for r in rows if keep(r)]
  cut_off = path.exists() and path.stat().st_size > 0 and not (
      path.read_bytes().endswith(b"\n"))
  if len(kept) < len(rows) or cut_off:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
  return kept


def _hparam_values(hparams: dict[str, Any]) -> dict[str, Any]:
  """TensorBoard's HParams take numbers, strings and bools: tuples become
  their text, None is left out."""
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in hparams.items() if v is not None}


@contextlib.contextmanager
def log_file(path: Path):
  """While the block runs, the log's lines (those the terminal shows, by the
  same filters) are also appended to `path`, with absl's prefix of date,
  time, thread and source line."""
  handler = py_logging.FileHandler(path)
  handler.setFormatter(logging.PythonFormatter())
  for line_filter in logging.get_absl_handler().filters:
    handler.addFilter(line_filter)
  logger = logging.get_absl_logger()
  logger.addHandler(handler)
  try:
    yield
  finally:
    logger.removeHandler(handler)
    handler.close()


# ----------------------------------------------------------------------------
# One run per workdir.


# The files a run writes in its workdir (besides its folders).
RUN_FILES = (".lock", "config.json", "metrics.jsonl", "steps.jsonl",
             "results.json", "log.txt")


def check_files_are_files(workdir: Path) -> None:
  """Raises WorkdirError if one of RUN_FILES is a directory (or another
  non-file) in `workdir`: the run could not write it."""
  for name in RUN_FILES:
    path = Path(workdir) / name
    if path.exists() and not path.is_file():
      raise WorkdirError(
          f"{path} is a directory (or another non-file) where the run "
          "writes a file; move it out of the way, or use a new --workdir.")


class WorkdirInUse(WorkdirError):
  """Another process holds the workdir's lock."""


class Lock:
  """An exclusive lock on `<workdir>/.lock`, held while a run writes there.

  `fcntl.flock`: the kernel releases it when the holder exits, however it
  exits (even kill -9), so a lock file left by a dead process is stale by
  construction and is simply taken over. The file records the holder's pid
  and host for the message a second run gets, and is removed on exit.
  """

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / ".lock"
    self._file = None

  def __enter__(self) -> "Lock":
    while True:
      try:
        self._file = open(self.path, "a+")
      except OSError as e:  # a read-only file system, no permission
        raise WorkdirError(
            f"cannot write in {self.path.parent} "
            f"({os.strerror(e.errno) if e.errno else e}); give a --workdir "
            "this user can write.") from None
      try:
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        self._file.seek(0)
        holder = self._file.read().strip() or "another process"
        self._file.close()
        raise WorkdirInUse(
            f"{self.path.parent} is in use by {holder}: two runs must not "
            "write one workdir. Wait for it to finish (or stop it), or use "
            "another --workdir.") from None
      # The holder before us may have removed the file (`__exit__`) after
      # we opened it: then ours is a lock on nothing; open the new file.
      if self.path.exists() and os.path.samestat(
          os.fstat(self._file.fileno()), os.stat(self.path)):
        break
      self._file.close()
    self._file.seek(0)
    previous = self._file.read().strip()
    if previous:  # its holder died without removing it
      logging.info("took over the stale lock of %s (no longer running)",
                   previous)
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    self._file.flush()
    return self

  def __exit__(self, *exc) -> None:
    # Released: the file goes (a later run creates its own). Removed while
    # still held, so no other run can have locked this file in between.
    self.path.unlink(missing_ok=True)
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


# ----------------------------------------------------------------------------
# Resuming: the same experiment or none.

# Config fields (dotted names) that cannot change a run's numbers: a rerun
# that changes only these resumes. Where the IDX files are (they are
# md5-checked; not `data_source`: TFDS's copy is ordered differently), how
# progress is shown, logged and reported, how many checkpoints are kept, and where
# the coordinator of several hosts listens.
NON_RESULT_FIELDS = ("study", "data_dir", "progress_seconds",
                     "log_every_steps", "target_accuracy", "keep_checkpoints",
                     "distributed.coordinator_address")


def config_json(config: Mapping[str, Any]) -> str:
  return json.dumps(config, indent=2, sort_keys=True, default=list) + "\n"


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = list(value) if isinstance(
          value, tuple) else value
  return flat


# Fields added since workdirs were first written, with the value that runs
# as before they existed; the normalization options are read only by the
# other norms, and precise_bn's only with num_batches > 0. A config.json
# without them resumes while the current config keeps those values.
ADDED_FIELDS = {"norm": "batch", "norms": [], "precise_bn.num_batches": 0,
                "eval_train": False, "probe.every_steps": 0,
                "init": "default", "virtual_batch_sizes": [],
                "lr_scaling": "none", "lr_reference_batch_size": 128,
                "sequence": "rows", "lstm.hidden_size": 100,
                "lstm.permutation_seed": 0, "grad_clip_norm": None,
                "ics.every_steps": 0, "landscape.every_steps": 0,
                "schedule_epochs": None, "divergence_factor": 1000.0,
                "resnet.blocks_per_stage": 1, "resnet.skip_init": False,
                "resnet.standardize": "none", "resnet.stem_stride": 1,
                "agc_clip": None, "train_examples": None, "variant": "",
                "variants": [], "validation_examples": 0}
# Fields that moved from the base config into one study's config, with the
# value that left them off: a saved config.json of another study that has
# them at that value resumes without them.
MOVED_FIELDS = {"probe.every_steps": 0, "probe.num_images": 1000,
                "ics.every_steps": 0, "landscape.every_steps": 0,
                "landscape.step_factors": [0.5, 4.0],
                "landscape.num_step_sizes": 8, "noisy_bn.n_mu": 0.5,
                "noisy_bn.n_sigma": 1.25, "noisy_bn.r_mu": 0.1,
                "noisy_bn.r_sigma": 0.1}
_READ_ONLY_BY_NEW_CHOICES = ("bn.renorm_", "bn.virtual_batch_size",
                             "bn.stats_", "bn.num_groups", "precise_bn.",
                             "probe.", "init_std", "landscape.", "noisy_bn.")


def result_fields_that_differ(saved: Mapping[str, Any],
                              current: Mapping[str, Any]) -> list[str]:
  """The dotted names of fields, outside NON_RESULT_FIELDS, whose values
  differ between two configs (as dicts, e.g. config.json's); for a saved
  config from before one of ADDED_FIELDS, its absence is its old value."""
  def relevant(config):
    return {k: v for k, v in _flatten(config).items()
            if k not in NON_RESULT_FIELDS}
  saved, current = relevant(saved), relevant(current)
  for field, old in ADDED_FIELDS.items():
    if field in current:  # a field added to the config this one has
      saved.setdefault(field, old)
  for field in current.keys() - saved.keys():
    if field.startswith(_READ_ONLY_BY_NEW_CHOICES):
      saved[field] = current[field]
  for field in saved.keys() - current.keys():
    if field in MOVED_FIELDS and saved[field] == MOVED_FIELDS[field]:
      del saved[field]
  return sorted(k for k in saved.keys() | current.keys()
                if saved.get(k, "<absent>") != current.get(k, "<absent>"))


def _extension_refusal(saved, config, study_refusal) -> str | None:
  """Why a run of saved["num_epochs"] cannot be continued to
  config["num_epochs"], or None."""
  if config["num_epochs"] < saved["num_epochs"]:
    return ("a run is not shortened (its later epochs are recorded); "
            "`python -m experiments.report` reports it, or use a new "
            "--workdir")
  if study_refusal is None:
    return "this study's runs are not extended; use a new --workdir"
  return study_refusal(saved, config)


class ConfigMismatch(WorkdirError):
  """The workdir holds a run of another experiment."""


def has_results(workdir: Path, result_dirs: tuple[str, ...] = ()) -> bool:
  """Whether a run in `workdir` got as far as a metrics row, a checkpoint
  or one of a study's `result_dirs` (a run stopped before, by a bad value
  or Ctrl-C, leaves nothing to keep)."""
  metrics = Path(workdir) / "metrics.jsonl"
  return ((metrics.is_file() and metrics.stat().st_size > 0)
          or any(Path(workdir).glob("checkpoints/*/[0-9]*"))
          or any((Path(workdir) / d).exists() for d in result_dirs))


def recorded_study(workdir: Path) -> str | None:
  """The study_id in `workdir`'s results.json; None without one (or from
  before results.json named its study)."""
  try:
    return json.loads((Path(workdir) / "results.json").read_text()).get(
        "study_id")
  except (OSError, ValueError, AttributeError):
    return None


def check_resumable(workdir: Path, config: Mapping[str, Any], *,
                    study: str | None = None,
                    result_dirs: tuple[str, ...] = (),
                    extension_refusal=None) -> None:
  """Raises ConfigMismatch unless `workdir` holds no results yet or a run
  of the same `study` whose config differs from `config` only in
  NON_RESULT_FIELDS, or also in a larger num_epochs where the study's
  `extension_refusal(saved, config)` finds nothing against it (None: the
  study's runs cannot be extended)."""
  recorded = recorded_study(workdir)
  if study is not None and recorded not in (None, study):
    raise ConfigMismatch(
        f"{workdir} holds results of the study {recorded!r}, not {study!r}; "
        "use a new --workdir.")
  saved_path = Path(workdir) / "config.json"
  if not has_results(workdir, result_dirs):
    return
  if not saved_path.exists():
    present = [name for name in ("metrics.jsonl", "checkpoints", *result_dirs)
               if (Path(workdir) / name).exists()]
    raise ConfigMismatch(
        f"{workdir} holds {', '.join(present)} but no config.json, so the "
        "config they were made with is unknown and a resume could mix two; "
        "put config.json back, or remove those to start afresh there, or "
        "use a new --workdir.")
  try:
    saved = json.loads(saved_path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigMismatch(f"{saved_path} cannot be read ({e}); use a new "
                     "--workdir, or delete the workdir to start over.")
  differ = result_fields_that_differ(saved, config)
  if differ == ["num_epochs"]:
    refusal = _extension_refusal(saved, config, extension_refusal)
    if refusal is None:
      logging.info("extending the run in %s from %d to %d epochs", workdir,
                   saved["num_epochs"], config["num_epochs"])
      return
    raise ConfigMismatch(
        f"{workdir} holds a run of {saved['num_epochs']} epochs, and "
        f"num_epochs={config['num_epochs']} cannot continue it: {refusal}.")
  if differ:
    raise ConfigMismatch(
        f"{workdir} holds a run with a different config: "
        f"{', '.join(differ)} differ from {saved_path}. Resuming needs the "
        "same values (only " + ", ".join(NON_RESULT_FIELDS) + " may change);"
        " use a new --workdir for a new experiment.")
