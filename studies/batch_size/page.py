"""The batch-size study's section of docs/studies.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bn_lab import page
from bn_lab import report
from bn_lab import stats
from bn_lab import train


def section(studies, out: Path) -> str:
  studies = sorted(studies, key=lambda s: bool(s["config"]["batch_sizes"]))
  text = ["## Batch size, decomposed\n", page.provenance_markdown(studies),
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
          "(layer, group, none) have one test accuracy. Below the tables, "
          "exact statistics against the moving average are the paired t "
          "test over seeds (the same runs evaluated both ways), a ghost "
          "size against the best reference Welch's t test (other networks);"
          " all of this section's comparisons, both parts, one Holm "
          "family.\n"]
  tables = [_batch_size_table(
      study["rows"], "batch_size" if study["config"]["batch_sizes"]
      else "bn.virtual_batch_size") for study in studies]
  per_study = [_batch_size_comparisons(points, bool(study["config"][
      "batch_sizes"])) for study, (_, points, _) in zip(studies, tables)]
  corrected = iter(stats.holm_family(c for mine in per_study
                                     for c in mine.values()))
  per_study = [{key: next(corrected) for key in mine} for mine in per_study]
  for study, (lines, points, diverged), comparisons in zip(
      studies, tables, per_study):
    sgd = bool(study["config"]["batch_sizes"])
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
    text.append(page.table(["norm", "size", "train acc (eval)", "test, batch "
                       "stats", "test, moving avg", "test, exact",
                       "train/test gap", "stale", "inconsistency",
                       "dominates"], lines))
    text.append(_diverged_note(diverged))
    text.append(page.figure(out, f"{study['label']}.png",
                       lambda p, pts=points, s=sgd: _plot_batch_size(
                           pts, p, s),
                       "batch size" if sgd else "ghost batch size"))
    text.append(_batch_size_verdicts(points, sgd, comparisons))
  return "\n".join(text)


REFERENCE_NORMS = ("layer", "group", "none", "rms", "instance", "frn",
                   "evonorm_s0")  # no batch statistics


def _batch_size_table(rows, field):
  """The table's lines, grouped by norm, by size within; per norm its
  (size, means, final rows) points; and the diverged runs, (norm, size,
  final row), which are in no mean, point or test."""
  points, diverged = {}, []
  for mine in page.by_combo(rows).values():
    finals, lost = page.split_diverged(mine)
    diverged += [(mine[0].get("norm"), mine[0].get(field), r) for r in lost]
    if not finals:  # every seed diverged: no point, only the note
      continue
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
  return lines, points, diverged


def _diverged_note(diverged) -> str:
  """One line naming each diverged run (or nothing)."""
  if not diverged:
    return ""
  runs = "; ".join(
      f"{norm} size {size} seed {row['seed']}"
      + (f" (step {row['diverged_at']})" if row.get("diverged_at")
         is not None else " (non-finite)") for norm, size, row in diverged)
  return (f"Diverged, so left out of every mean, figure and test above: "
          f"{runs}.\n")


def _plot_batch_size(points, path, sgd: bool):
  fig = report.new_figure((11, 4))
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
  report.save_figure(fig, path)
  return fig


def _best_reference(references):
  return max(references, key=lambda n: references[n][0][1]["test_accuracy"])


def _batch_size_comparisons(points, sgd: bool) -> dict:
  """Per norm with running statistics and size: ("exact", norm, size), the
  paired t test of exact statistics against the moving average (the same
  runs evaluated both ways); for ghost batches (not `sgd`), ("reference",
  norm, size), Welch's test of its moving-average accuracy against the
  best reference's (other networks)."""
  out = {}
  references = {norm: pts for norm, pts in points.items()
                if norm in REFERENCE_NORMS}
  for norm, pts in points.items():
    if norm in REFERENCE_NORMS:
      continue
    for size, _, finals in pts:
      out[("exact", norm, size)] = stats.paired(
          [r[train.PRECISE_METRIC] for r in finals],
          [r["test_accuracy"] for r in finals],
          label=f"{norm} {size}: exact - moving average")
    if not sgd and references:
      best = _best_reference(references)
      level = [r["test_accuracy"] for r in references[best][0][2]]
      for size, _, finals in pts:
        out[("reference", norm, size)] = stats.welch(
            [r["test_accuracy"] for r in finals], level,
            label=f"{norm} {size} - {best}")
  return out


def _batch_size_verdicts(points, sgd: bool, comparisons) -> str:
  """The verdicts, from `_batch_size_comparisons`' comparisons
  (Holm-corrected over the section)."""
  lines = []
  references = {norm: pts for norm, pts in points.items()
                if norm in REFERENCE_NORMS}
  for norm, pts in points.items():
    if norm in REFERENCE_NORMS:
      continue
    lines.append(_exact_against_moving(norm, pts, comparisons))
    if not sgd and references:
      best = _best_reference(references)
      level = [r["test_accuracy"] for r in references[best][0][2]]
      judged = {s: comparisons[("reference", norm, s)] for s, _, _ in pts}
      below = [f"{s} ({stats.describe(c, 'points', 100)})"
               for s, c in judged.items() if c.significant and c.diff < 0]
      unjudged = [str(s) for s, c in judged.items()
                  if stats.verdict(c) == "undetermined"]
      lines.append(
          f"* **{norm} against the references:** the best, "
          f"{norm_name(best)}, reaches {100 * np.mean(level):.2f}; {norm} "
          "(moving average) is below it beyond noise at ghost sizes "
          + ("; ".join(below) or "none") + ", level with it or "
          "above at the others"
          + (f" (undetermined at {', '.join(unjudged)})" if unjudged else "")
          + ". The references do not depend on the ghost batch (they train "
          "once): flat by construction, as the GroupNorm paper predicts.")
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


def _exact_against_moving(norm, pts, comparisons) -> str:
  """Exact statistics against the moving average (the paired comparisons
  of `_batch_size_comparisons`), and which of the two effects is larger at
  each size."""
  judged = [(size, comparisons[("exact", norm, size)]) for size, _, _ in pts]
  gains = [c.diff for _, c in judged]
  worse = [(size, c) for size, c in judged if c.diff < 0]
  stale_wins = [s for s, m, _ in pts if abs(
      m[train.PRECISE_METRIC] - m["test_accuracy"]) > abs(
          m[train.PRECISE_METRIC] - m["test_accuracy_batch_stats"])]
  others = [s for s, _, _ in pts if s not in stale_wins]
  verdicts = {stats.verdict(c) for _, c in worse}
  verdict = ("holds" if not worse else
             "does not hold" if "beyond noise" in verdicts else
             "holds within noise" if verdicts == {"within noise"} else
             "undetermined")
  return (
      f"* **{norm}: exact statistics never worse than the moving average "
      f"(Wu & Johnson 2021): {verdict}** (" + (
          f"at every size, by {100 * min(gains):+.2f} to "
          f"{100 * max(gains):+.2f} points" if not worse else
          "worse at " + "; ".join(f"{size} ({page.judged(c)})"
                                  for size, c in worse)
          + "; paired over seeds")
      + "). The train/test inconsistency (exact against batch statistics) "
      "outweighs the stale average at sizes "
      + (", ".join(map(str, others)) or "none") + "; the stale average "
      "outweighs it at " + (", ".join(map(str, stale_wins)) or "none") + ".")
