"""The GAN study's report: report.md in the workdir, with a table per
variant (coverage, Frechet distance: mean +- std over seeds) and PNG sample
grids (matplotlib's Agg canvas, no pyplot; imported only when drawing).

`write_report(workdir)` is the study's `report` (`studies.gan.STUDY`),
written after `python -m experiments.main --config=studies/gan/config.py
--workdir=...`; the plots are also the page's (studies.gan.page).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bn_lab import report
from bn_lab import workdir as workdir_lib

# The command the report names where results.json records none.
COMMAND = "python -m experiments.main --config=studies/gan/config.py"
_DPI = 110
# The workdir holds no finished study to report (the one command line
# prints it in one line).
ReportError = report.ReportError


def _figure(figsize: tuple[float, float]):
  """A Figure on the Agg canvas, without pyplot (no global state)."""
  from matplotlib.backends import backend_agg  # slow import; plots only
  from matplotlib import figure
  fig = figure.Figure(figsize=figsize)
  backend_agg.FigureCanvasAgg(fig)
  return fig


def _save(fig, path: Path) -> None:
  with workdir_lib.atomic_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=_DPI, bbox_inches="tight")


def tile(images, columns: int, pad: int = 1) -> np.ndarray:
  """(N, H, W) images -> one (rows * (H + pad) - pad, ...) mosaic, white
  (255) between them, row by row."""
  images = np.asarray(images)
  n, h, w = images.shape
  rows = -(-n // columns)
  out = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad), 255,
                images.dtype)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = (
        image)
  return out


def _show(ax, mosaic, title: str | None = None) -> None:
  ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=9)


def plot_samples(samples, variant: str, seeds: Sequence[int], path: Path):
  """One square grid per seed, side by side: (K, n*n, 28, 28) uint8."""
  side = int(np.sqrt(samples.shape[1]))
  fig = _figure((2.6 * len(seeds), 2.9))
  axes = np.atleast_1d(fig.subplots(1, len(seeds)))
  for ax, grid, seed in zip(axes, samples, seeds):
    _show(ax, tile(grid, side), f"seed {seed}")
  fig.suptitle(variant, fontsize=10)
  _save(fig, path)


def plot_training(epochs: Sequence[np.ndarray], variant: str, seed: int,
                  path: Path):
  """One row per epoch: the first run's samples on fixed latents."""
  columns = epochs[0].shape[0]
  fig = _figure((0.45 * columns, 0.5 * len(epochs) + 0.5))
  ax = fig.subplots()
  _show(ax, tile(np.concatenate(epochs), columns),
        f"{variant}, seed {seed}: epochs 1..{len(epochs)} (rows), "
        "same latents")
  _save(fig, path)


def plot_overview(finals: dict[str, np.ndarray], results, path: Path):
  """Every variant's first-seed grid, G norms as rows, D norms as columns."""
  g_norms = list(dict.fromkeys(v["generator_norm"] for v in results))
  d_norms = list(dict.fromkeys(v["discriminator_norm"] for v in results))
  fig = _figure((2.5 * len(d_norms), 2.7 * len(g_norms)))
  axes = np.asarray(fig.subplots(len(g_norms), len(d_norms), squeeze=False))
  for v in results:
    ax = axes[g_norms.index(v["generator_norm"]),
              d_norms.index(v["discriminator_norm"])]
    samples = finals[v["variant"]][0]
    _show(ax, tile(samples, int(np.sqrt(len(samples)))),
          f"G {v['generator_norm']}, D {v['discriminator_norm']}")
  _save(fig, path)


def plot_curves(rows, results, path: Path) -> bool:
  """The Frechet distance and D(G(z)) per epoch (mean over seeds) of each
  variant; False (nothing drawn) without per-epoch evaluation."""
  if not any("frechet_distance" in r for r in rows):
    return False
  fig = _figure((11, 4))
  ax_fd, ax_d = fig.subplots(1, 2)
  for v in results:
    mine = [r for r in rows if r["combo"] == v["variant"]]
    epochs = sorted({r["epoch"] for r in mine})
    for ax, key in ((ax_fd, "frechet_distance"), (ax_d, "d_fake")):
      means = [np.mean([r[key] for r in mine if r["epoch"] == e
                        and r.get(key) is not None] or [np.nan])
               for e in epochs]
      ax.plot(epochs, means, marker="o", ms=3, label=v["variant"])
  ax_fd.set(xlabel="epoch", ylabel="Frechet distance (classifier features)",
            yscale="log", title=f"Samples vs test images "
            f"({mine[0].get('eval_samples', '?')} per run)")
  ax_d.set(xlabel="epoch", ylabel="mean D(G(z)) in training",
           title="Discriminator on fakes")
  ax_d.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  for ax in (ax_fd, ax_d):
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  _save(fig, path)
  return True


def _mean_std(values, digits: int = 2) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "diverged"
  std = np.std(values, ddof=1) if len(values) > 1 else 0.0
  return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"


def results_table(summary: dict[str, Any]) -> str:
  """The markdown table: one row per variant, mean ± std over seeds (and a
  reference row of real training images)."""
  lines = [
      "| G norm | D norm | coverage entropy (nats) | classes ≥ 5% | "
      "Fréchet distance | FD, G with batch statistics |",
      "|---|---|---|---|---|---|"]
  for v in summary["variants"]:
    m = v["eval_mode"]
    batch = v.get("batch_stats_mode")
    lines.append(
        f"| {v['generator_norm']} | {v['discriminator_norm']} | "
        f"{_mean_std(m['coverage_entropy'], 3)} | "
        f"{_mean_std(m['classes_5pct'], 1)} | "
        f"{_mean_std(m['frechet_distance'])} | "
        f"{_mean_std(batch['frechet_distance']) if batch else '(same)'} |")
  ref = summary["reference"]
  lines.append(
      f"| *real training images* | | {ref['train_coverage_entropy']:.3f} | "
      f"{ref['train_classes_5pct']} | {ref['train_frechet_distance']:.2f} "
      "| |")
  return "\n".join(lines)


def write_report(workdir) -> str:
  """Writes report.md and its PNGs into `workdir` from results.json and
  samples/; returns the report's path."""
  workdir = Path(workdir)
  try:
    summary = json.loads((workdir / "results.json").read_text())
  except (OSError, ValueError) as e:
    raise ReportError(f"{workdir}/results.json cannot be read ({e}); run "
                      "the study first.") from None
  results, seeds = summary["variants"], summary["seeds"]
  rows = workdir_lib.read_jsonl(workdir / "metrics.jsonl")
  figures = workdir / "figures"
  figures.mkdir(exist_ok=True)
  finals = {}
  sections = []
  for v in results:
    name = v["variant"]
    finals[name] = np.load(workdir / "samples" / name / "final.npy")
    plot_samples(finals[name], name, seeds, figures / f"samples_{name}.png")
    epochs = sorted((workdir / "samples" / name).glob("epoch_*.npy"))
    plot_training([np.load(p)[0] for p in epochs], name, seeds[0],
                  figures / f"training_{name}.png")
    sections.append(
        f"### {name}\n\n![{name} samples](figures/samples_{name}.png)\n\n"
        f"![{name} over training](figures/training_{name}.png)\n")
  plot_overview(finals, results, figures / "samples_overview.png")
  curves = plot_curves(rows, results, figures / "curves.png")
  classifier, ref = summary["classifier"], summary["reference"]
  train_time = sum(v["train_time"] + v["eval_time"] for v in results)
  text = "\n".join([
      f"# {summary['study']}", "",
      f"`{summary.get('command') or COMMAND}`", "",
      f"{len(results)} variants x {len(seeds)} seeds, {summary['steps']} "
      f"steps of batch {summary['batch_size']}; each run evaluated on "
      f"{summary['eval_samples']} samples (G in eval mode: running "
      "statistics) against the "
      f"{ref['test_images']} test images. Mean ± std over seeds.", "",
      f"Classifier: {classifier['model']} {classifier['channels']} -> "
      f"{classifier['widths']}, test accuracy "
      f"{classifier['test_accuracy']:.4f}; features: its last hidden layer "
      f"({classifier['features']}). On the test images its predicted labels "
      f"have entropy {ref['test_coverage_entropy']:.3f} nats (ln 10 = "
      "2.303).", "",
      results_table(summary), "",
      f"Wall time: {summary['wall_time']:.0f} s in the last process; "
      f"training and evaluation of the variants {train_time:.0f} s in all "
      f"({summary['machine']['cpu']}, {summary['machine']['cpu_count']} "
      f"CPUs, {summary['machine']['platform']}).", "",
      "![all variants, first seed](figures/samples_overview.png)", "",
      *(["![curves](figures/curves.png)", ""] if curves else []),
      "## Samples per variant", "", *sections])
  path = workdir / "report.md"
  workdir_lib.write_atomic(path, text)
  return str(path)
