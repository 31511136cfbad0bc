"""What the entry points (experiments.main, experiments.report) share:
absl's flags parsed and the --config file loaded with one-line errors, the
log filtered to the project's own lines, and the command line as
results.json records it."""

from __future__ import annotations

import logging as py_logging
import os
from pathlib import Path
import shlex
import sys
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

import bn_jax

# The directories whose INFO lines are shown (progress, resumes, data):
# the library's, the lab's, and those `start` adds (the studies').
_OWN_CODE = [str(Path(path).resolve().parent) + os.sep
             for path in (bn_jax.__file__, __file__)]


def parse_flags(argv: Sequence[str], fields_file: str):
  """absl's parser, with a bad flag or config field reported in one line
  that points to `fields_file` (the config holding the valid fields)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections' bare error for an unknown --config.FIELD: a KeyError
    # inside an AttributeError, "'field'\nDid you mean ...?".
    while isinstance(e, BaseException) and e.args:
      e = e.args[0]
    field, _, hint = str(e).partition("\n")
    hint = f" ({hint.strip()})" if hint.strip() else ""
    sys.exit(f"FATAL Flags parsing error: the config has no field "
             f"'{field.strip(chr(39) + chr(34))}'{hint}; see {fields_file} "
             "for the valid fields.")
  except flags.Error as e:
    # A config file's own error comes with config_flags' traceback: its
    # last line says what is wrong.
    sys.exit(f"FATAL Flags parsing error: {_last_line(e)}")
  except SyntaxError as e:
    sys.exit(f"FATAL the --config file {e.filename}, line {e.lineno}, is "
             f"not valid Python: {e.msg}.")
  except Exception as e:  # pylint: disable=broad-except
    # The config file's code failed while loading (a NameError, an
    # ImportError...): its own message, in one line.
    sys.exit(f"FATAL the --config file could not be loaded: "
             f"{type(e).__name__}: {_last_line(e)}")


def _last_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def load_config(config_value: Callable[[], object], example: str):
  """The --config file (config_flags loads it on first use, in
  `config_value()`), or one line saying why it could not be loaded."""
  try:
    config = config_value()
    config.keys()  # a config that failed to load raises only when used
  except (OSError, ValueError) as e:
    reason = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f"FATAL Flags parsing error: the --config file could not be "
             f"loaded ({reason[-1] if reason else type(e).__name__}); give "
             f"the path of a config file, e.g. {example}.")
  if not isinstance(config, ml_collections.ConfigDict):
    sys.exit(f"FATAL the --config file's get_config() returned a "
             f"{type(config).__name__}, not an ml_collections.ConfigDict; "
             "return one (a study's config starts from "
             "bn_lab.config.get_config()).")
  return config


def command_line(module: str, argv: Sequence[str]) -> str:
  """The command as a user would type it again: `python -m MODULE` and the
  flags, quoted for the shell."""
  return " ".join(["python", "-m", module,
                   *(shlex.quote(a) for a in argv[1:])])


def start(argv: Sequence[str], own_code: Sequence[str] = ()) -> None:
  """An entry point's first lines: no stray arguments, and INFO lines only
  from the library, the lab and the folders of `own_code`'s files (the
  studies'), unless --verbosity is given."""
  _OWN_CODE.extend(str(Path(path).resolve().parent) + os.sep
                   for path in own_code)
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_only_own_info)
  if not flags.FLAGS["log_dir"].value:  # the terminal: lines to read
    logging.get_absl_handler().setFormatter(_Plain())


class _Plain(py_logging.Formatter):
  """The message alone (INFO) or after its level (WARNING: ...), without
  absl's prefix of date, thread and source line; the run's log.txt keeps
  that prefix (bn_lab.workdir.log_file)."""

  def format(self, record: py_logging.LogRecord) -> str:
    message = super().format(record)
    if record.levelno >= py_logging.WARNING:
      return f"{record.levelname}: {message}"
    return message


def _only_own_info(record: py_logging.LogRecord) -> bool:
  """INFO lines from bn_jax and experiments (progress), warnings from all:
  orbax logs hundreds of INFO lines per run that would bury the progress."""
  return (record.levelno >= py_logging.WARNING
          or str(Path(record.pathname).resolve()).startswith(
              tuple(_OWN_CODE)))
