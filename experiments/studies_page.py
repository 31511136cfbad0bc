r"""docs/studies.md from the studies' workdirs: every table, figure and verdict
computed from the recorded runs.

    python -m experiments.report --page=docs/studies.md

reads every study's workdir (`STUDY_COMMANDS` makes them; --workdir flags
name others instead). Each workdir is matched to its study by the config
file in its results.json "command" (`experiments.main` records it with the
machine: `bn_jax.experiment.provenance`); a workdir of another config gets
a generic section (table and learning curves), and a benchmark's directory
(a results.json with "benchmark", from `benchmarks/bn_cost.py --json=...`)
feeds the claims table. The figures are written next to the page. The
verdicts ("holds", "beyond noise") are computed here from the numbers they
cite, so a rerun that changes the numbers changes the words with them;
prose that no number decides is kept to the setup.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from bn_jax import probes
from bn_jax import train
from bn_jax import workdir as workdir_lib
from experiments import domain_shift_page
from experiments import lr_range_page
from experiments import report
from experiments import transfer_page
from experiments import why_bn_page

Rows = Sequence[Mapping[str, Any]]
# Two means differ "beyond seed noise" when the difference exceeds this many
# standard errors, sqrt(s1^2/n1 + s2^2/n2): a screen, not a test (no
# correction for the many pairs compared).
NOISE_SE = 2.0
# CaffeNet-128 on ImageNet, top-1 (Mishkin et al., "Systematic evaluation of
# CNN advances on the ImageNet", 2017): BN after the ReLU against before it.
CAFFENET_TOP1 = {"after_activation": 0.499, "before_activation": 0.474}
# The article's worked example: batch mean, variance, epsilon, gamma, beta.
WORKED_EXAMPLE = (0.5, 0.2, 1e-4, 2.0, 0.1)


# ----------------------------------------------------------------------------
# Loading.


def load_study(path: Path) -> dict[str, Any]:
  """A workdir (or a benchmark's JSON directory) with what the page needs:
  rows, results, config, the config file's name and argument."""
  results = report.load_results(path)
  if results is not None and "domain_shift" in results:
    return domain_shift_page.load(path)  # experiments.domain_shift
  if results is not None and "variants" in results:
    # experiments.gan and experiments.transfer
    return {"path": path, "label": path.name, "results": results,
            "benchmark": None, "rows": [], "config": {},
            "config_name": config_file(results.get("command"))[0],
            "config_arg": None}
  if results is not None and "benchmark" in results:
    return {"path": path, "label": path.name, "results": results,
            "benchmark": results["benchmark"], "rows": [], "config": {},
            "config_name": None, "config_arg": None}
  rows = report.load_rows(path)
  config_path = path / "config.json"
  try:
    config = json.loads(config_path.read_text())
  except (OSError, ValueError) as e:
    raise report.ReportError(f"{config_path} is missing or not JSON ({e}); "
                             "is this a training workdir?") from e
  name, arg = config_file((results or {}).get("command"))
  return {"path": path, "label": path.name, "rows": rows,
          "results": results, "config": config, "benchmark": None,
          "config_name": name, "config_arg": arg}


def config_file(command: str | None) -> tuple[str | None, str | None]:
  """The config file's name and argument in a command: ("placement_study",
  "cnn") from "--config=configs/placement_study.py:cnn"; (None, None)
  without a command."""
  match = re.search(r"--config[= ](?:\S*/)?([A-Za-z0-9_]+)\.py(?::(\S*))?",
                    command or "")
  return (match.group(1), match.group(2) or None) if match else (None, None)


# ----------------------------------------------------------------------------
# Numbers shared by the sections.


def by_combo(rows: Rows) -> dict[str, list[Mapping[str, Any]]]:
  out: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    out.setdefault(row["combo"], []).append(row)
  return out


def final_rows(rows: Rows) -> list[Mapping[str, Any]]:
  """Each run's last recorded epoch."""
  last: dict[Any, Mapping[str, Any]] = {}
  for row in rows:
    if row["run"] not in last or row["epoch"] > last[row["run"]]["epoch"]:
      last[row["run"]] = row
  return [last[run] for run in sorted(last)]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and sample std (ddof=1; None for one value)."""
  values = np.asarray(values, dtype=float)
  return float(values.mean()), (float(values.std(ddof=1))
                                if values.size > 1 else None)


def percent(values: Sequence[float]) -> str:
  """"97.09 +- 0.08" (%, mean +- sample std) of fractions."""
  mean, std = mean_std(values)
  return f"{100 * mean:.2f}" + ("" if std is None else f" +- {100 * std:.2f}")


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
  """(mean(a) - mean(b), its standard error), in fractions. The error is
  nan where a side has one value (no spread to judge by), so that
  `beyond_noise` is then False rather than true of any difference."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  var = lambda x: x.var(ddof=1) / x.size if x.size > 1 else float("nan")
  return float(a.mean() - b.mean()), float(np.sqrt(var(a) + var(b)))


def beyond_noise(diff: float, se: float) -> bool:
  return abs(diff) > NOISE_SE * se


def mean_curve(rows: Rows, key: str, x: str = "epoch"):
  """The x values and the mean of `key` over runs at each."""
  xs = sorted({r[x] for r in rows})
  return xs, np.array([np.mean([r[key] for r in rows if r[x] == v])
                       for v in xs])


def first_reaching(rows: Rows, target: float, x: str = "epoch"):
  """The first x at which the mean over runs reaches target; None if never."""
  xs, mean = mean_curve(rows, "test_accuracy", x)
  hit = [v for v, m in zip(xs, mean) if m >= target]
  return hit[0] if hit else None


def epochs_to(rows: Rows, target: float) -> str:
  """"7.4 (5/5)": the mean first epoch of the runs that reach target."""
  runs = by_run(rows)
  hit = [min(r["epoch"] for r in mine if r["test_accuracy"] >= target)
         for mine in runs.values()
         if any(r["test_accuracy"] >= target for r in mine)]
  if not hit:
    return "not reached"
  return f"{np.mean(hit):.1f} ({len(hit)}/{len(runs)})"


def by_run(rows: Rows) -> dict[Any, list[Mapping[str, Any]]]:
  out: dict[Any, list[Mapping[str, Any]]] = {}
  for row in rows:
    out.setdefault(row["run"], []).append(row)
  return out


def table(header: Sequence[str], lines: Sequence[Sequence[Any]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
  return "\n".join(out) + "\n"


def provenance_markdown(studies: Sequence[Mapping[str, Any]]) -> str:
  """The commands as a code block, then when, how long and on what."""
  commands, notes = [], []
  for study in studies:
    results = study["results"] or {}
    commands.append(results.get("command")
                    or f"(command not recorded: {study['path']})")
    wall = sum(c.get("wall_time") or 0 for c in results.get("combos", [])
               ) or results.get("wall_time") or 0
    what = ("the benchmark" if study["benchmark"] else
            f"{wall:.0f} s of evaluation" if "domain_shift" in results
            else f"{wall:.0f} s of training")
    notes.append(f"`{study['label']}`: {what}, finished "
                 f"{results.get('finished', 'at an unrecorded time')}"
                 + ("" if study["results"] else " (no results.json: "
                    "unfinished, the last recorded epochs are shown)"))
  machines = {machine_line(s["results"]) for s in studies}
  return ("    " + "\n    ".join(f".venv/bin/{c}" if c.startswith("python")
                                 else c for c in commands) + "\n\n"
          + "Recorded on " + "; ".join(sorted(machines)) + ". "
          + "; ".join(notes) + ".\n")


def machine_line(results: Mapping[str, Any] | None) -> str:
  machine = (results or {}).get("machine")
  if not machine:
    return "an unrecorded machine"
  return (f"{machine['cpu']} ({machine['cpu_count']} CPUs, "
          f"{machine['device_count']} {machine['platform']} device(s)), "
          f"jax {machine['jax']}, flax {machine['flax']}")


def setup_line(config: Mapping[str, Any]) -> str:
  """The model and training of a config, in one sentence."""
  norm = config.get("norm", "batch")
  layers = (f"conv 3x3 {' -> '.join(map(str, config['channels']))} (each "
            "followed by a 2x2 max-pool), " if config["model"] == "cnn"
            else "784 -> ")
  dense = "".join(f"Dense({w}) -> act -> " for w in config["widths"])
  activations = config.get("activations") or [config["activation"]]
  return (f"{config['model'].upper()}: {layers}{dense}Dense(10), act = "
          f"{' or '.join(activations)}; {config['optimizer']} "
          f"{config['learning_rate']:g}, batch {config['batch_size']}, "
          f"{config['num_epochs']} epochs, {len(config['seeds'])} seeds; "
          f"{norm} norm where the placement puts it (momentum "
          f"{config['bn']['momentum']}, epsilon {config['bn']['epsilon']:g}; "
          "before_activation: the layer before it has no bias).\n")


def figure(out: Path, name: str, plot: Callable[[Path], Any],
           caption: str) -> str:
  """Draws plot(out / name) and returns its markdown line."""
  plot(out / name)
  return f"![{caption}]({name})\n"


# ----------------------------------------------------------------------------
# Ioffe & Szegedy (2015), Figure 1.


def ioffe_section(studies, out: Path) -> str:
  studies = sorted(studies, key=lambda s: s["config"].get("init") != "default")
  config = studies[0]["config"]
  steps = max(r["step"] for r in studies[0]["rows"])
  text = [
      "## Ioffe & Szegedy (2015), Figure 1\n",
      provenance_markdown(studies),
      f"MNIST, 784 -> {len(config['widths'])} x (Dense({config['widths'][0]})"
      f" -> [BN] -> {config['activation']}) -> Dense(10), batch "
      f"{config['batch_size']}, {steps:,} steps of {config['optimizer']} "
      f"with learning rate {config['learning_rate']} for both networks (the "
      "paper names neither optimizer nor rate), BN before each sigmoid "
      f"with epsilon {config['bn']['epsilon']}"
      + (" and the unbiased running variance of the paper's Algorithm 2"
         if config["bn"]["unbiased_running_var"] else "")
      + f", {len(config['seeds'])} seeds. Every "
      f"{config['probe']['every_steps']} steps, the percentiles "
      f"{', '.join(map(str, probes.QS))} of every input to the last hidden "
      f"layer's sigmoids over the first {config['probe']['num_images']:,} "
      "test images, in eval mode. The figures plot unit "
      f"{probes.FIGURE_UNIT} (a fixed index, not a chosen \"typical\" unit) "
      "of the first seed, and the drift over all units: the median over "
      "units of |p50(t) - p50(end)| / IQR(end), per seed, then the median "
      "over seeds.\n"]
  lines, verdicts = [], []
  for study in studies:
    init = study["config"].get("init", "default")
    text.append(f"Initialization `{init}` ("
                + ("flax's LeCun normal" if init == "default" else
                   f"N(0, {study['config']['init_std']}^2) for every Dense "
                   "kernel, the paper's \"small random Gaussian values\"; "
                   "the paper gives no scale")
                + "):\n")
    text.append(figure(out, f"{study['label']}_figure1.png",
                       lambda p, s=study: report.plot_probes(s["rows"], p),
                       f"Figure 1, {init} initialization"))
    combos = by_combo(study["rows"])
    plain, bn = combos["placement=none"], combos["placement=before_activation"]
    series = report.probe_series(study["rows"])
    probe_steps = series["placement=none"][0]
    marks = sorted({probe_steps[0], *(probe_steps[int(np.argmin(np.abs(
        probe_steps - f * probe_steps[-1])))] for f in (0.1, 0.2, 0.5))})
    drifts = {name: np.median([probes.drift_of_probes(v) for v in values],
                              0)
              for name, (_, values) in series.items()}
    for network, rows in (("no BN", plain), ("BN", bn)):
      finals = [r["test_accuracy"] for r in final_rows(rows)]
      drift = drifts[rows[0]["combo"]]
      to = [first_reaching(rows, t, "step") for t in (0.97, 0.98)]
      lines.append([init, network, " / ".join(f"{100 * a:.2f}"
                                              for a in finals),
                    percent(finals)]
                   + [f"{s:,}" if s else "not reached" for s in to]
                   + [" / ".join(f"{drift[list(probe_steps).index(m)]:.3f}"
                                 for m in marks)])
    verdicts.append(_ioffe_verdicts(init, plain, bn,
                                    drifts["placement=none"],
                                    drifts["placement=before_activation"],
                                    probe_steps))
  text.append(table(
      ["init", "network", "final test acc (eval mode), per seed",
       "mean +- std", "steps to 97%", "steps to 98%",
       "drift at step " + " / ".join(f"{m:,}" for m in marks)], lines))
  text.append(
      "Steps to 97% and 98%: of the mean over seeds, checked once per "
      "epoch; +- is the sample standard deviation (ddof=1).\n")
  text.append("Against the paper's panels:\n")
  text += verdicts
  return "\n".join(text)


def _ioffe_verdicts(init, plain, bn, drift_plain, drift_bn, steps) -> str:
  xs, acc_plain = mean_curve(plain, "test_accuracy", "step")
  _, acc_bn = mean_curve(bn, "test_accuracy", "step")
  ahead = int(np.sum(acc_bn > acc_plain))
  diff, se = difference([r["test_accuracy"] for r in final_rows(bn)],
                        [r["test_accuracy"] for r in final_rows(plain)])
  lead = ("holds" if ahead == len(xs) else
          "holds at most checkpoints" if ahead > len(xs) / 2 else
          "does not hold")
  first = (f"* **{init}: (a) BN ahead at every checkpoint: {lead}.** The BN "
           f"network's mean test accuracy is above the plain network's at "
           f"{ahead} of {len(xs)} checkpoints and ends "
           f"{100 * diff:+.2f} points apart"
           + (f" ({abs(diff) / se:.0f} standard errors)." if se else "."))
  calmer = drift_bn < drift_plain
  if calmer.all():
    drift = "holds at every probe"
  elif calmer[0]:
    flip = steps[int(np.argmin(calmer))]
    drift = (f"holds early, not late: from step {flip:,} the BN network's "
             "drift is at or above the plain network's")
  else:
    drift = "does not hold: BN's inputs drift as much from the first probe"
  second = (f"* **{init}: (b, c) stable inputs with BN, drifting without: "
            f"{drift}.** Drift at the first probe {drift_bn[0]:.3f} with BN "
            f"against {drift_plain[0]:.3f} without; BN's is lower at "
            f"{int(calmer.sum())} of {len(steps)} probes. (The BN network's "
            "eval-mode inputs also move with its running averages.)")
  return first + "\n" + second + "\n"


# ----------------------------------------------------------------------------
# Where BN goes.


def placement_section(studies, out: Path) -> str:
  text = ["## Where BN goes, for which activation\n",
          provenance_markdown(studies)]
  lines, groups = [], {}
  for study in studies:
    model = study["config"]["model"]
    text.append(setup_line(study["config"]))
    for combo, rows in by_combo(study["rows"]).items():
      activation = rows[0].get("activation")
      placement = rows[0].get("placement")
      finals = [r["test_accuracy"] for r in final_rows(rows)]
      groups.setdefault((model, activation), {})[placement] = finals
      lines.append([model, activation, placement, percent(finals),
                    epochs_to(rows, 0.97), epochs_to(rows, 0.98)])
  lines.sort(key=lambda line: line[:2])  # stable: placements in study order
  text.append(
      "Final test accuracy in eval mode, mean +- sample std (ddof=1); "
      "epochs to a target: the mean first epoch of the runs that reach it "
      "(how many in brackets).\n")
  text.append(table(["model", "activation", "placement", "final test acc",
                     "epochs to 97%", "epochs to 98%"], lines))
  for study in studies:
    text.append(figure(out, f"{study['label']}.png",
                       lambda p, s=study: report.plot_comparison(s["rows"],
                                                                 p),
                       f"placements, {study['config']['model']}"))
  text.append(
      f"How differences were judged: a difference of means counts as beyond "
      f"seed noise when it exceeds {NOISE_SE:g} standard errors, sqrt(s1^2/"
      "n1 + s2^2/n2): a screen, with no correction for the many pairs "
      "compared.\n")
  for (model, activation), finals in groups.items():
    text.append(_placement_screen(model, activation, finals))
  text.append(_caffenet_comparison(groups))
  return "\n".join(text)


def _placement_screen(model, activation, finals) -> str:
  beyond, within = [], []
  for a, b in itertools.combinations(finals, 2):
    diff, se = difference(finals[a], finals[b])
    if diff < 0:
      (a, b), diff = (b, a), -diff
    line = f"{a} over {b} {100 * diff:+.2f} ({diff / se:.1f} SE)" if se else (
        f"{a} over {b} {100 * diff:+.2f}")
    (beyond if beyond_noise(diff, se) else within).append(line)
  best = max(finals, key=lambda p: np.mean(finals[p]))
  return (f"* **{model}, {activation}:** best mean: {best}. Beyond noise: "
          + ("; ".join(beyond) or "none") + ". Within noise: "
          + ("; ".join(within) or "none") + ".\n")


def _caffenet_comparison(groups) -> str:
  after, before = (CAFFENET_TOP1[k] for k in ("after_activation",
                                               "before_activation"))
  parts = []
  for (model, activation), finals in groups.items():
    if not {"after_activation", "before_activation"} <= finals.keys():
      continue
    diff, se = difference(finals["after_activation"],
                          finals["before_activation"])
    sign = "the same sign" if diff > 0 else "the opposite sign"
    noise = "beyond noise" if beyond_noise(diff, se) else "within noise"
    parts.append(f"{model} with {activation}: after - before "
                 f"{100 * diff:+.2f} points, {sign}, {noise}")
  return (f"* **Against CaffeNet-128 on ImageNet** (top-1 {after} with BN "
          f"after the ReLU against {before} before: after ahead): "
          + "; ".join(parts) + ". One small network on MNIST is no test of "
          "an ImageNet result; the comparison is of signs only.\n")


# ----------------------------------------------------------------------------
# Batch size, decomposed.


def batch_size_section(studies, out: Path) -> str:
  studies = sorted(studies, key=lambda s: bool(s["config"]["batch_sizes"]))
  text = ["## Batch size, decomposed\n", provenance_markdown(studies),
          "Columns, at the last epoch, mean over seeds (%): train accuracy "
          "in eval mode over the whole training set; test accuracy with "
          "batch statistics (BN as in training; whole batches of the test "
          "set only), with the moving averages (eval mode) and with exact "
          "population statistics (recomputed over the training set, weights "
          "frozen); the train/test gap (train minus test, both eval mode); "
          "**stale** = exact - moving average (what the stale average "
          "costs); **inconsistency** = exact - batch statistics "
          "(positive: the population's statistics serve the network better "
          "than the batch statistics it trained with); the larger of the "
          "two in size dominates. Norms without running statistics "
          "(layer, group, none) have one test accuracy.\n"]
  for study in studies:
    sgd = bool(study["config"]["batch_sizes"])
    field = "batch_size" if sgd else "bn.virtual_batch_size"
    text.append(
        ("### (b) The SGD batch\n\nBatch sizes with "
         f"{study['config']['optimizer']} at {study['config']['learning_rate']}"
         f" x ({study['config']['lr_scaling']} of B / "
         f"{study['config']['lr_reference_batch_size']}), "
         f"{study['config']['num_epochs']} epochs each.\n") if sgd else
        ("### (a) The normalization batch alone\n\nSGD batch "
         f"{study['config']['batch_size']} for every run, "
         f"{study['config']['num_epochs']} epochs; BN over ghost batches of "
         "each size; the other norms do not depend on it.\n"))
    lines, points = _batch_size_table(study["rows"], field)
    text.append(table(["norm", "size", "train acc (eval)", "test, batch "
                       "stats", "test, moving avg", "test, exact",
                       "train/test gap", "stale", "inconsistency",
                       "dominates"], lines))
    text.append(figure(out, f"{study['label']}.png",
                       lambda p, pts=points, s=sgd: _plot_batch_size(
                           pts, p, s),
                       "batch size" if sgd else "ghost batch size"))
    text.append(_batch_size_verdicts(points, sgd))
  return "\n".join(text)


REFERENCE_NORMS = ("layer", "group", "none", "rms", "instance")  # no stats


def _batch_size_table(rows, field):
  """The table's lines, grouped by norm, by size within; and per norm its
  (size, means, final rows) points."""
  points = {}
  for mine in by_combo(rows).values():
    finals = final_rows(mine)
    m = {k: float(np.mean([r[k] for r in finals])) for k in (
        "train_accuracy_eval", "test_accuracy_batch_stats", "test_accuracy",
        train.PRECISE_METRIC)}
    points.setdefault(mine[0].get("norm"), []).append(
        (mine[0].get(field), m, finals))
  pct = lambda v: f"{100 * v:.2f}"
  lines = []
  for norm, pts in points.items():
    for size, m, _ in pts:
      stale = m[train.PRECISE_METRIC] - m["test_accuracy"]
      inconsistency = m[train.PRECISE_METRIC] - m["test_accuracy_batch_stats"]
      has_stats = norm not in REFERENCE_NORMS
      lines.append(
          [norm, "-" if size is None else size,
           pct(m["train_accuracy_eval"])]
          + ([pct(m[k]) for k in ("test_accuracy_batch_stats",
                                  "test_accuracy", train.PRECISE_METRIC)]
             if has_stats else ["", pct(m["test_accuracy"]), ""])
          + [pct(m["train_accuracy_eval"] - m["test_accuracy"])]
          + ([f"{100 * stale:+.2f}", f"{100 * inconsistency:+.2f}",
              "stale average" if abs(stale) > abs(inconsistency)
              else "inconsistency"] if has_stats else ["", "", ""]))
  return lines, points


def _plot_batch_size(points, path, sgd: bool):
  fig = report._figure((11, 4))
  ax_test, ax_gap = fig.subplots(1, 2)
  styles = (("test_accuracy_batch_stats", "batch stats", ":"),
            ("test_accuracy", "moving avg", "-"),
            (train.PRECISE_METRIC, "exact", "--"))
  xs_all = sorted({s for pts in points.values() for s, _, _ in pts
                   if s is not None})
  # One color per norm in both panels; the line style tells BN's three
  # evaluations apart.
  for i, (norm, pts) in enumerate(points.items()):
    sizes = [s for s, _, _ in pts]
    color = f"C{i % 10}"
    if None in sizes:  # a reference that does not depend on the size
      m = pts[0][1]
      ax_test.axhline(100 * m["test_accuracy"], ls="-.", lw=1, label=norm,
                      color=color)
      ax_gap.axhline(100 * (m["train_accuracy_eval"] - m["test_accuracy"]),
                     ls="-.", lw=1, label=norm, color=color)
      continue
    reference = norm in REFERENCE_NORMS  # one test accuracy
    for key, label, ls in styles[1:2] if reference else styles:
      ax_test.plot(sizes, [100 * m[key] for _, m, _ in pts], ls=ls,
                   marker="o", ms=3, color=color,
                   label=norm if reference else f"{norm}, {label}")
    ax_gap.plot(sizes, [100 * (m["train_accuracy_eval"] - m["test_accuracy"])
                        for _, m, _ in pts], marker="o", ms=3, label=norm,
                color=color)
  for ax in (ax_test, ax_gap):
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs_all, [str(x) for x in xs_all])
    ax.grid(alpha=0.3)
    ax.set_xlabel("SGD batch size" if sgd else "ghost (normalization) batch")
    ax.legend(fontsize=7)
  ax_test.set(ylabel="test accuracy (%)", title="test accuracy")
  ax_gap.set(ylabel="train - test accuracy (eval mode, points)",
             title="train/test gap")
  report._save(fig, path)
  return fig


def _batch_size_verdicts(points, sgd: bool) -> str:
  lines = []
  references = {norm: pts for norm, pts in points.items()
                if norm in REFERENCE_NORMS}
  for norm, pts in points.items():
    if norm in REFERENCE_NORMS:
      continue
    lines.append(_exact_against_moving(norm, pts))
    if not sgd and references:
      best = max(references, key=lambda n: references[n][0][1][
          "test_accuracy"])
      level = [r["test_accuracy"] for r in references[best][0][2]]
      below = [s for s, m, finals in pts if beyond_noise(*difference(
          [r["test_accuracy"] for r in finals], level))
               and m["test_accuracy"] < np.mean(level)]
      lines.append(
          f"* **{norm} against the references:** the best, "
          f"{norm_name(best)}, reaches {100 * np.mean(level):.2f}; {norm} "
          "(moving average) is below it beyond seed noise at ghost sizes "
          + (", ".join(map(str, below)) or "none") + ", level with it or "
          "above at the others. The references do not depend on the ghost "
          "batch (they train once): flat by construction, as the GroupNorm "
          "paper predicts.")
  if sgd:
    bn = [100 * m["test_accuracy"] for _, m, _ in points.get("batch", [])]
    for norm, pts in references.items():
      accs = [100 * m["test_accuracy"] for _, m, _ in pts]
      lines.append(
          f"* **{norm_name(norm)} over the SGD batch sizes: a range of "
          f"{max(accs) - min(accs):.2f} points**"
          + (f" (BN, moving average: {max(bn) - min(bn):.2f})" if bn else "")
          + "; the SGD batch also changes the optimization (the number of "
          "steps, the learning rate), so here no norm need stay flat.")
  return "\n".join(lines) + "\n"


def norm_name(norm: str) -> str:
  return "no normalization" if norm == "none" else f"{norm} norm"


def _exact_against_moving(norm, pts) -> str:
  """Exact statistics against the moving average (per-seed paired
  differences, judged against their standard error), and which of the two
  effects is larger at each size."""
  worse, gains = [], []
  for size, m, finals in pts:
    diffs = np.array([r[train.PRECISE_METRIC] - r["test_accuracy"]
                      for r in finals])
    gains.append(diffs.mean())
    se = diffs.std(ddof=1) / np.sqrt(diffs.size) if diffs.size > 1 else 0.0
    if diffs.mean() < 0:
      worse.append(f"{size} ({100 * diffs.mean():+.2f}"
                   + (f", {abs(diffs.mean()) / se:.1f} SE" if se else "")
                   + (", beyond noise" if beyond_noise(diffs.mean(), se)
                      else ", within noise") + ")")
  stale_wins = [s for s, m, _ in pts if abs(
      m[train.PRECISE_METRIC] - m["test_accuracy"]) > abs(
          m[train.PRECISE_METRIC] - m["test_accuracy_batch_stats"])]
  others = [s for s, _, _ in pts if s not in stale_wins]
  verdict = ("holds" if not worse else
             "holds within seed noise" if all("within" in w for w in worse)
             else "does not hold")
  return (
      f"* **{norm}: exact statistics never worse than the moving average "
      f"(Wu & Johnson 2021): {verdict}** (" + (
          f"at every size, by {100 * min(gains):+.2f} to "
          f"{100 * max(gains):+.2f} points" if not worse else
          "worse at " + "; ".join(worse) + "; paired over seeds")
      + "). The train/test inconsistency (exact against batch statistics) "
      "outweighs the stale average at sizes "
      + (", ".join(map(str, others)) or "none") + "; the stale average "
      "outweighs it at " + (", ".join(map(str, stale_wins)) or "none") + ".")


# ----------------------------------------------------------------------------
# How stale the moving average is.


def staleness_section(studies, out: Path) -> str:
  (study,) = studies[:1]
  rows = study["rows"]
  momenta = sorted({r["bn_momentum"] for r in rows})
  epochs = sorted({r["epoch"] for r in rows})
  shown = sorted({epochs[0], epochs[min(1, len(epochs) - 1)],
                  epochs[len(epochs) // 2 - 1 if len(epochs) > 2 else 0],
                  epochs[-1]})
  lines, cells = [], []
  for momentum in momenta:
    mine = [r for r in rows if r["bn_momentum"] == momentum]
    for epoch in shown:
      at = [r for r in mine if r["epoch"] == epoch]
      moving = [r["test_accuracy"] for r in at]
      exact = [r[train.PRECISE_METRIC] for r in at]
      lines.append([momentum, epoch, percent(moving), percent(exact),
                    f"{np.mean([r['running_mean_gap'] for r in at]):.3f}",
                    f"{np.mean([r['running_var_gap'] for r in at]):.3f}"])
    for epoch in epochs:
      at = [r for r in mine if r["epoch"] == epoch]
      cells.append((momentum, epoch,
                    np.mean([r[train.PRECISE_METRIC] - r["test_accuracy"]
                             for r in at])))
  config = study["config"]
  text = ["## How stale is the moving average\n",
          provenance_markdown(studies),
          f"The reference MLP, BN momentum {', '.join(map(str, momenta))} x "
          f"{len(config['seeds'])} seeds as one vmapped sweep with one data "
          "order. Momentum only shapes the running averages, never the "
          "training (BN normalizes with batch statistics in training), so "
          "the momenta train identical weights and the exact column is the "
          "same for all: a built-in control. After every epoch the "
          "statistics are recomputed over "
          + (f"{config['precise_bn']['num_batches']} training batches"
             if config["precise_bn"]["num_batches"] else
             f"{config['precise_bn']['num_examples']:,} training examples")
          + f" ({config['precise_bn']['estimator']}); the gaps compare the "
          "running statistics with them over every feature of the BN "
          "layer: the mean's error in population standard deviations, and "
          "|log| of the variance ratio.\n",
          table(["momentum", "epoch", "test acc, moving average",
                 "test acc, exact", "running mean gap (std)",
                 "running var gap (log ratio)"], lines),
          figure(out, f"{study['label']}.png",
                 lambda p: _plot_staleness(rows, momenta, p),
                 "moving average against exact statistics")]
  worse = [(m, e, d) for m, e, d in cells if d < 0]
  text.append(
      "* **Exact statistics never worse than the moving average: "
      + ("holds" if not worse else "does not hold")
      + f"** ({len(cells) - len(worse)} of {len(cells)} (momentum, epoch) "
      "cells"
      + ("" if not worse else "; worse at " + ", ".join(
          f"{m} epoch {e} ({100 * d:+.2f})" for m, e, d in worse)) + ").")
  for momentum in momenta:
    mine = [r for r in rows if r["bn_momentum"] == momentum]
    gaps = [np.mean([r["running_var_gap"] for r in mine if r["epoch"] == e])
            for e in (epochs[0], epochs[-1])]
    text.append(f"* momentum {momentum}: variance gap {gaps[0]:.3f} after "
                f"epoch {epochs[0]}, {gaps[1]:.3f} after epoch {epochs[-1]}.")
  last = {m: np.mean([r["test_accuracy"] for r in rows
                      if r["bn_momentum"] == m and r["epoch"] == epochs[-1]])
          for m in momenta}
  text.append(f"* Best eval-mode accuracy at the last epoch: momentum "
              f"{max(last, key=last.get)} ({100 * max(last.values()):.2f}).\n")
  return "\n".join(text)


def _plot_staleness(rows, momenta, path):
  fig = report._figure((11, 4))
  ax_acc, ax_gap = fig.subplots(1, 2)
  for i, momentum in enumerate(momenta):
    mine = [r for r in rows if r["bn_momentum"] == momentum]
    epochs, moving = mean_curve(mine, "test_accuracy")
    _, exact = mean_curve(mine, train.PRECISE_METRIC)
    _, gap = mean_curve(mine, "running_var_gap")
    ax_acc.plot(epochs, 100 * moving, color=f"C{i}", marker="o", ms=3,
                label=f"momentum {momentum}, moving average")
    ax_acc.plot(epochs, 100 * exact, color=f"C{i}", ls="--",
                label=f"momentum {momentum}, exact")
    ax_gap.plot(epochs, gap, color=f"C{i}", marker="o", ms=3,
                label=f"momentum {momentum}")
  ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)",
             title="moving average (solid) vs exact (dashed)")
  ax_gap.set(xlabel="epoch", ylabel="|log var_running / var_exact|",
             yscale="log", title="running variance gap")
  for ax in (ax_acc, ax_gap):
    report._epoch_axis(ax)
    ax.legend(fontsize=7)
  report._save(fig, path)
  return fig


# ----------------------------------------------------------------------------
# The source article's claims.


def claims_section(studies, out: Path) -> str:
  scaled = next((s for s in studies if s["config"].get("input_scaling")
                 != "raw" and not s["benchmark"]), None)
  raw = next((s for s in studies if s["config"].get("input_scaling")
              == "raw"), None)
  cost = next((s for s in studies if s["benchmark"] == "bn_cost"), None)
  if scaled is None:
    raise report.ReportError("the claims section needs the article_claims "
                             "workdir with scaled inputs.")
  finals = {rows[0]["placement"]: final_rows(rows)
            for rows in by_combo(scaled["rows"]).values()}
  combos = {rows[0]["placement"]: rows
            for rows in by_combo(scaled["rows"]).values()}
  acc = lambda placement, key="test_accuracy", src=finals: [
      r[key] for r in src[placement]]
  bn, plain = "after_activation", "none"
  n = len(finals[bn])
  train_ok = sum(a >= 0.99 for a in acc(bn, "train_accuracy_eval"))
  test_ok = sum(a >= 0.98 for a in acc(bn))
  gap = lambda p, src=finals: [r["train_accuracy_eval"] - r["test_accuracy"]
                               for r in src[p]]
  claims = [
      ["the example reaches 99% train and 98% test accuracy",
       f"the example, {scaled['config']['num_epochs']} epochs",
       f"train (eval mode) {percent(acc(bn, 'train_accuracy_eval'))} "
       f"({train_ok}/{n} seeds >= 99%), test {percent(acc(bn))} "
       f"({test_ok}/{n} seeds >= 98%)",
       f"train {'yes' if train_ok == n else 'no'}, test "
       f"{'yes' if test_ok == n else 'no'}"],
      ["BN speeds up convergence",
       "epochs to 97% test accuracy, BN after the ReLU vs none",
       f"{epochs_to(combos[bn], 0.97)} vs {epochs_to(combos[plain], 0.97)}",
       _faster(combos[bn], combos[plain])]]
  if raw is not None:
    raw_finals = {rows[0]["placement"]: final_rows(rows)
                  for rows in by_combo(raw["rows"]).values()}
    diff, se = difference(acc("input", src=raw_finals), acc(plain))
    claims.append(
        ["BN removes the need for input preprocessing",
         "raw 0..255 pixels with BN on the input vs [0, 1] pixels without BN",
         f"{percent(acc('input', src=raw_finals))} vs {percent(acc(plain))};"
         f" raw pixels without BN: {percent(acc(plain, src=raw_finals))}",
         "yes" if diff >= 0 or not beyond_noise(diff, se) else
         "no: below the scaled network beyond noise"])
  if cost is not None:
    cells = {(r["model"], r["placement"]): r for r in cost["results"]["rows"]}
    parts = [f"{model}: {cells[(model, bn)]['time_ratio']:.2f}x time, "
             f"{cells[(model, bn)]['memory_ratio']:.2f}x temporary memory"
             for model in ("mlp", "cnn") if (model, bn) in cells]
    more = all(cells[(m, bn)]["time_ratio"] > 1
               or cells[(m, bn)]["memory_ratio"] > 1
               for m in ("mlp", "cnn") if (m, bn) in cells)
    claims.append(["BN costs computation and memory",
                   "benchmarks/bn_cost.py: one training step, batch 128, with "
                   "vs without BN after the ReLU", "; ".join(parts),
                   "yes" if more else "no"])
  diff, se = difference(gap(bn), gap(plain))
  claims.append(
      ["BN may hurt generalization",
       "the train (eval mode) - test gap, with vs without BN",
       f"{percent(gap(bn))} vs {percent(gap(plain))} points",
       ("yes in this sense: the gap is wider with BN" if diff > 0 and
        beyond_noise(diff, se) else "no: the gap is not wider with BN")])
  claims.append(_worked_example_claim())
  text = ["## The source article's claims\n",
          provenance_markdown([s for s in (scaled, raw, cost) if s]),
          "The article's Keras example, Dense(50, relu) -> BN -> Dense(10), "
          "Adam 1e-3, batch 128, against the same network without BN and "
          "with BN on the input only. Its code declares `input_shape=(100,)`,"
          " which cannot take MNIST's 784 pixels; the fix is the one change: "
          "784 inputs (the flattened 28 x 28 image). \"Train accuracy\" is "
          "measured as Keras' `evaluate` does, over the whole training set "
          "in eval mode (`config.eval_train`). Mean +- sample std over "
          f"{n} seeds.\n",
          table(["claim", "experiment", "measured", "holds?"], claims)]
  if cost is not None:
    text.append(table(
        ["model", "placement", "ms per step", "vs none",
         "temporary memory (KiB)", "vs none"],
        [[r["model"], r["placement"], f"{r['ms_per_step']:.2f}",
          f"{r['time_ratio']:.2f}", f"{r['temp_bytes'] / 1024:.0f}",
          f"{r['memory_ratio']:.2f}"] for r in cost["results"]["rows"]]))
  return "\n".join(text)


def _faster(bn_rows, plain_rows) -> str:
  def first(rows):
    epochs = [min((r["epoch"] for r in mine if r["test_accuracy"] >= 0.97),
                  default=np.inf) for mine in by_run(rows).values()]
    return np.mean(epochs)  # inf when a run never reaches it
  a, b = first(bn_rows), first(plain_rows)
  if np.isinf(a) and np.isinf(b):
    return "not measured: neither network reaches 97%"
  return ("yes" if a < b else "no") + (
      " (a run that never reaches 97% counts as never)")


def _worked_example_claim() -> list[str]:
  """The article's example through the pure API: a batch with exactly its
  mean and variance (mean +- sqrt(var))."""
  import bn_jax  # the page's only call into the library's math
  mean, var, epsilon, gamma, beta = WORKED_EXAMPLE
  x = np.asarray([[mean - var ** 0.5], [mean + var ** 0.5]], np.float32)
  params = bn_jax.BNParams(scale=np.asarray([gamma], np.float32),
                           bias=np.asarray([beta], np.float32))
  _, state = bn_jax.init(1)
  y, _ = bn_jax.apply(params, state, x, training=True, epsilon=epsilon)
  expected = gamma * (var / (var + epsilon)) ** 0.5
  ok = np.allclose(np.asarray(y)[:, 0], [beta - expected, beta + expected],
                   rtol=1e-5)
  return ["the worked example (mean 0.5, variance 0.2, epsilon 1e-4, gamma "
          "2, beta 0.1)", "bn_jax.apply on a batch 0.5 -+ sqrt(0.2) (and "
          "tests/test_study_tools.py)",
          f"y = {float(y[0, 0]):.4f}, {float(y[1, 0]):.4f}; the formula "
          f"gives {beta - expected:.4f}, {beta + expected:.4f}",
          "yes" if ok else "no"]


# ----------------------------------------------------------------------------
# BN in a GAN (experiments.gan).

GAN_METRICS = (("coverage_entropy", "coverage entropy (nats)", "{:.3f}"),
               ("classes_5pct", "classes >= 5%", "{:.1f}"),
               ("frechet_distance", "Frechet distance", "{:.2f}"))


def gan_section(studies, out: Path) -> str:
  from experiments import gan as gan_cli  # its plots; imports no flags
  study = studies[0]
  results = study["results"]
  variants = results["variants"]
  cell = lambda values, fmt: (fmt.format(np.mean(values)) + " +- "
                              + fmt.format(np.std(values, ddof=1))
                              if len(values) > 1 else fmt.format(values[0]))
  lines = [[v["generator_norm"], v["discriminator_norm"]]
           + [cell(v["eval_mode"][k], fmt) for k, _, fmt in GAN_METRICS]
           for v in variants]
  finals = {v["variant"]: np.load(study["path"] / "samples" / v["variant"]
                                  / "final.npy") for v in variants}
  text = ["## BN in a GAN: does it reduce mode collapse?\n",
          provenance_markdown(studies),
          f"{len(variants)} variants x {len(results['seeds'])} seeds, "
          f"{results['steps']:,} steps of batch {results['batch_size']}; "
          f"{results['eval_samples']:,} samples per run, drawn with G in eval "
          "mode, labeled by a classifier bn_jax trained "
          f"({100 * results['classifier']['test_accuracy']:.2f}% test "
          "accuracy): mean +- sample std over seeds. Setup, figures over "
          "training and the per-variant grids: [gan.md](gan.md).\n",
          table(["G norm", "D norm"] + [h for _, h, _ in GAN_METRICS], lines),
          figure(out, f"{study['label']}_samples.png",
                 lambda p: gan_cli.plot_overview(finals, variants, p),
                 "samples, first seed")]
  by = {(v["generator_norm"], v["discriminator_norm"]): v["eval_mode"]
        for v in variants}
  for d_norm in dict.fromkeys(v["discriminator_norm"] for v in variants):
    if ("batch", d_norm) not in by or ("none", d_norm) not in by:
      continue
    bn, plain = by[("batch", d_norm)], by[("none", d_norm)]
    parts = []
    for key, name, _ in GAN_METRICS:
      diff, se = difference(bn[key], plain[key])
      parts.append(f"{name} {np.mean(plain[key]):.2f} -> "
                   f"{np.mean(bn[key]):.2f} ("
                   + ("beyond" if beyond_noise(diff, se) else "within")
                   + " seed noise)")
    text.append(f"* **BN in G, D norm {d_norm}:** " + "; ".join(parts)
                + ".")
  collapsed = [(v["variant"], seed) for v in variants
               for seed, n in zip(v["seeds"], v["eval_mode"]["classes_5pct"])
               if n <= 1]
  text.append("* Runs collapsed to at most one class: "
              + (", ".join(f"{name} seed {seed}" for name, seed in collapsed)
                 or "none") + f", of {len(variants) * len(results['seeds'])}"
              " runs.\n")
  return "\n".join(text)


# ----------------------------------------------------------------------------
# Any other workdir.


def generic_section(studies, out: Path) -> str:
  text = []
  for study in studies:
    summaries = report.summarize(study["rows"], results=study["results"])
    title = (study["results"] or {}).get("study") or study["label"]
    text += [f"## {title}\n", provenance_markdown([study]),
             report.summary_markdown(summaries),
             figure(out, f"{study['label']}.png",
                    lambda p, s=study: report.plot_comparison(s["rows"], p),
                    title)]
  return "\n".join(text)


# Config file -> section, in page order; a benchmark joins the section of
# the study that cites it.
SECTIONS: dict[str, Callable[..., str]] = {
    "ioffe2015_mnist": ioffe_section,
    "placement_study": placement_section,
    "batch_size": batch_size_section,
    "staleness": staleness_section,
    "article_claims": claims_section,
    "gan": gan_section,
    "why_bn": why_bn_page.why_bn_section,
    "lr_range": lr_range_page.lr_range_section,
    "domain_shift": domain_shift_page.domain_shift_section,
    "transfer": transfer_page.transfer_section,
}
BENCHMARK_SECTIONS = {"bn_cost": "article_claims"}

# The studies' workdirs as their commands make them: the page's default.
STUDY_COMMANDS = {
    "workdirs/ioffe2015": "--config=configs/ioffe2015_mnist.py",
    "workdirs/ioffe2015_gaussian":
        "--config=configs/ioffe2015_mnist.py:gaussian",
    "workdirs/placement_study": "--config=configs/placement_study.py",
    "workdirs/placement_study_cnn": "--config=configs/placement_study.py:cnn",
    "workdirs/batch_size_norm": "--config=configs/batch_size.py",
    "workdirs/batch_size_sgd": "--config=configs/batch_size.py:sgd",
    "workdirs/staleness": "--config=configs/staleness.py",
    "workdirs/article_claims": "--config=configs/article_claims.py",
    "workdirs/article_claims_raw": ("--config=configs/article_claims.py "
                                    "--config.input_scaling=raw"),
    "workdirs/seq_mnist": "--config=configs/seq_mnist.py",
    "workdirs/lr_range": "--config=configs/lr_range.py",
    "workdirs/why_bn_ics": "--config=configs/why_bn.py:ics",
    "workdirs/why_bn_ics_mlp": "--config=configs/why_bn.py:ics_mlp",
    "workdirs/why_bn_landscape": "--config=configs/why_bn.py:landscape",
}
# The studies with entry points of their own.
OWN_COMMANDS = {
    "workdirs/gan": "python -m experiments.gan --config=configs/gan.py "
                    "--workdir=workdirs/gan",
    "workdirs/domain_shift": "python -m experiments.domain_shift "
                             "--config=configs/domain_shift.py "
                             "--workdir=workdirs/domain_shift",
    "workdirs/transfer": "python -m experiments.transfer "
                         "--config=configs/transfer.py "
                         "--workdir=workdirs/transfer",
}
BENCHMARK_COMMANDS = {
    "workdirs/bn_cost": "python benchmarks/bn_cost.py "
                        "--json=workdirs/bn_cost/results.json",
}


def default_workdirs() -> list[str]:
  """Every study's workdir, or ReportError naming the missing ones with the
  commands that make them."""
  commands = {w: f"python -m experiments.main {c} --workdir={w}"
              for w, c in STUDY_COMMANDS.items()}
  commands.update(OWN_COMMANDS)
  commands.update(BENCHMARK_COMMANDS)
  missing = [w for w in commands if not (Path(w) / "results.json").exists()]
  if missing:
    raise report.ReportError(
        f"no finished run in {', '.join(missing)}; run "
        + "; ".join(commands[w] for w in missing)
        + " (or name the workdirs with --workdir).")
  return list(commands)


PAGE_INTRO = """\
# Studies

Generated by `experiments.report` from the studies' workdirs; do not edit
by hand. Each study is one config and one command, and every table, figure
and verdict below is computed from its recorded runs (the commands, the
machine and the time are under each heading). The normalization family's
comparison is in [norms.md](norms.md), the GAN study's details in
[gan.md](gan.md).

    .venv/bin/{command}

"""


def write_page(workdirs: Sequence[Path | str], page: Path | str,
               command: str) -> str:
  """Writes the studies page and its figures (next to it); returns it.

  Every workdir is read before anything is written, so a bad workdir leaves
  the old page and figures as they were; the page is written last, each
  file atomically."""
  page = Path(page)
  studies = [load_study(Path(w)) for w in workdirs]
  grouped: dict[str, list] = {}
  for study in studies:
    key = (BENCHMARK_SECTIONS.get(study["benchmark"], "generic")
           if study["benchmark"] else study["config_name"])
    grouped.setdefault(key if key in SECTIONS else "generic",
                       []).append(study)
  report._make_directory(page.parent)
  sections = [SECTIONS[name](grouped[name], page.parent)
              for name in SECTIONS if name in grouped
              if any(not s["benchmark"] for s in grouped[name])]
  if "generic" in grouped:
    sections.append(generic_section(
        [s for s in grouped["generic"] if not s["benchmark"]], page.parent))
  text = PAGE_INTRO.format(command=command) + "\n".join(sections)
  workdir_lib.write_atomic(page, text)
  return text
