"""The studies page (bn_lab.page, experiments.report) from tiny runs of every
study's own config: its sections, figures and provenance, and numbers and
verdicts checked against the workdirs' metrics recomputed here with NumPy.

The tiny runs train in a process of their own with unoptimized XLA, as the
commands the other tests run do (helpers.run_studies: compiles several
times faster); every number checked here is recomputed from the files they
leave, so the flags cannot hide a mismatch."""

import json
import re

import helpers
import numpy as np
import pytest

from bn_lab import runner
from bn_lab import train
from bn_lab import workdir as workdir_lib
from studies.article_claims import config as article_claims
from studies.batch_size import config as batch_size
from studies.gan import config as gan_config
from studies.ioffe2015 import config as ioffe2015_mnist
from studies.placements import config as placement_study
from studies.placements import main_job as placements
from studies.staleness import config as staleness
from bn_lab import page as studies_page
from experiments import report
from studies import registry

# The page tests share ten tiny trainings (23 programs): slow.


def _tiny(config, idx_dir, **changes):
  for field, value in {"dataset": "tiny", "data_dir": str(idx_dir),
                       "progress_seconds": 0.0, "num_epochs": 2,
                       "batch_size": 50, "seeds": (0, 1), **changes}.items():
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


# name -> (the config's module and argument, overrides for the tiny data)
RUNS = {
    "ioffe2015": (ioffe2015_mnist, "default", {
        "batch_size": 60, "num_epochs": 3, "probe.every_steps": 1,
        "probe.num_images": 50, "seeds": (0, 1, 2)}),
    "ioffe2015_gaussian": (ioffe2015_mnist, "gaussian", {
        "batch_size": 60, "num_epochs": 3, "probe.every_steps": 3,
        "probe.num_images": 50}),
    "placement_study": (placement_study, "mlp", {
        "activations": ("sigmoid",)}),
    "staleness": (staleness, None, {"precise_bn.num_batches": 2}),
    "article_claims": (article_claims, None, {}),
    "article_claims_raw": (article_claims, None, {
        "input_scaling": "raw", "placements": ("none", "input")}),
    "batch_size_norm": (batch_size, "norm", {
        "batch_size": 40, "virtual_batch_sizes": (2, 8),
        "norms": ("ghost", "layer"), "precise_bn.num_examples": 200}),
    "batch_size_sgd": (batch_size, "sgd", {
        "batch_sizes": (4, 20), "norms": ("batch", "layer"),
        "precise_bn.num_examples": 200}),
    "placements": (placements, None, {"placements": ("none", "input")}),
}


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  idx_dir = helpers.write_tiny_idx(tmp_path_factory.mktemp("idx"), 200, 100)
  root = tmp_path_factory.mktemp("workdirs")
  runs = []
  for name, (module, arg, changes) in RUNS.items():
    config = module.get_config(arg) if arg else module.get_config()
    suffix = f":{arg}" if arg else ""
    path = module.__name__.replace(".", "/") + ".py"
    runs.append((
        registry.for_config_file(module.__file__).name,
        _tiny(config, idx_dir, **changes), root / name,
        f"python -m experiments.main --config={path}{suffix} "
        f"--workdir={root / name}"))
  helpers.run_studies(runs)
  cost = root / "bn_cost"
  cost.mkdir()
  rows = [{"model": m, "placement": p, "ms_per_step": t, "time_ratio": r,
           "temp_bytes": b, "memory_ratio": q}
          for m, p, t, r, b, q in (("mlp", "none", 1.0, 1.0, 1000, 1.0),
                                   ("mlp", "after_activation", 1.5, 1.5,
                                    1100, 1.1))]
  (cost / "results.json").write_text(json.dumps(
      {"benchmark": "bn_cost", "rows": rows, **runner.provenance(
          "python benchmarks/bn_cost.py --json=x")}))
  _write_gan_workdir(root / "gan")
  return root


# A GAN workdir as studies.gan.main leaves it (results.json, config.json,
# the final samples): hand-made numbers, so that the section's cells can be
# checked.
GAN_VARIANTS = {("none", "none"): ([1.80, 1.82, 1.84], [6, 6, 7],
                                  [18.0, 16.0, 20.0]),
                ("batch", "none"): ([2.10, 2.12, 2.14], [7, 7, 8],
                                    [13.0, 14.0, 12.0]),
                ("none", "batch_joint"): ([2.0, 1.9, 0.1], [7, 6, 1],
                                          [12.0, 13.0, 119.0])}


def _write_gan_workdir(workdir):
  variants = []
  for (g, d), (entropy, classes, fd) in GAN_VARIANTS.items():
    name = f"G-{g}_D-{d}"
    (workdir / "samples" / name).mkdir(parents=True)
    np.save(workdir / "samples" / name / "final.npy",
            np.zeros((3, 4, 28, 28), np.uint8))
    variants.append({"variant": name, "generator_norm": g,
                     "discriminator_norm": d, "seeds": [0, 1, 2],
                     "eval_mode": {"coverage_entropy": entropy,
                                   "classes_5pct": classes,
                                   "frechet_distance": fd}})
  (workdir / "config.json").write_text(
      workdir_lib.config_json(gan_config.get_config().to_dict()))
  (workdir / "results.json").write_text(json.dumps({
      "variants": variants, "seeds": [0, 1, 2], "steps": 40,
      "batch_size": 64, "eval_samples": 2000, "wall_time": 12.0,
      "classifier": {"test_accuracy": 0.9}, **runner.provenance(
          "python -m studies.gan.main --config=studies/gan/config.py "
          f"--workdir={workdir}")}))


@pytest.fixture(scope="module")
def page(workdirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("docs") / "studies.md"
  report.main(["report", f"--page={out}",
               *(f"--workdir={workdirs / name}"
                 for name in (*RUNS, "bn_cost", "gan"))])
  return out


def _rows(workdir):
  return [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]


def _finals(rows, **where):
  mine = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
  last = max(r["epoch"] for r in mine)
  return [r for r in mine if r["epoch"] == last]


@pytest.mark.slow
def test_sections_figures_and_provenance(page, workdirs):
  text = page.read_text()
  headings = re.findall(r"^## (.*)$", text, re.M)
  assert headings[:5] == [
      "Ioffe & Szegedy (2015), Figure 1",
      "Where BN goes, for which activation", "Batch size, decomposed",
      "How stale is the moving average", "The source article's claims"]
  assert headings[5] == "BN in a GAN: does it reduce mode collapse?"
  # studies/placements/main_job.py's workdir is the placements study's too:
  # its own rows in that section, never pooled with the other workdir's.
  assert len(headings) == 6
  placement_section = text.split("## Where BN goes")[1].split("\n## ")[0]
  assert "| mlp | relu | none |" in placement_section  # the main job's
  figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert len(figures) == 8
  for name in figures:
    assert (page.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for name in RUNS:  # every command, as recorded
    assert f"--workdir={workdirs / name}" in text
  assert "python benchmarks/bn_cost.py --json=x" in text
  machine = runner.provenance()["machine"]
  assert f"jax {machine['jax']}" in text and machine["cpu"] in text
  assert "python -m experiments.report --page=" in text  # how it was made


@pytest.mark.slow
def test_placement_table_matches_the_metrics(page, workdirs):
  rows = _rows(workdirs / "placement_study")
  for activation in ("sigmoid",):
    for placement in ("none", "before_activation", "after_activation",
                      "input"):
      acc = np.array([r["test_accuracy"] for r in _finals(
          rows, activation=activation, placement=placement)])
      cell = f"{100 * acc.mean():.2f} +- {100 * acc.std(ddof=1):.2f}"
      assert f"| mlp | {activation} | {placement} | {cell} |" in (
          page.read_text())


@pytest.mark.slow
def test_ioffe_checkpoint_count_matches_the_metrics(page, workdirs):
  rows = _rows(workdirs / "ioffe2015")
  steps = sorted({r["step"] for r in rows})
  mean = lambda placement, s: np.mean([
      r["test_accuracy"] for r in rows
      if r["placement"] == placement and r["step"] == s])
  ahead = sum(mean("before_activation", s) > mean("none", s) for s in steps)
  verdict = "holds" if ahead == len(steps) else (
      "holds at most checkpoints" if ahead > len(steps) / 2
      else "does not hold")
  assert (f"default: (a) BN ahead at every checkpoint: {verdict}.** The BN "
          f"network's mean test accuracy is above the plain network's at "
          f"{ahead} of {len(steps)} checkpoints") in page.read_text()


@pytest.mark.slow
def test_batch_size_columns_match_the_metrics(page, workdirs):
  rows = _rows(workdirs / "batch_size_norm")
  finals = _finals(rows, combo="norm=ghost__bn.virtual_batch_size=8")
  m = {k: np.mean([r[k] for r in finals]) for k in (
      "train_accuracy_eval", "test_accuracy_batch_stats", "test_accuracy",
      train.PRECISE_METRIC)}
  stale = m[train.PRECISE_METRIC] - m["test_accuracy"]
  inconsistency = m[train.PRECISE_METRIC] - m["test_accuracy_batch_stats"]
  line = (f"| ghost | 8 | {100 * m['train_accuracy_eval']:.2f} | "
          f"{100 * m['test_accuracy_batch_stats']:.2f} | "
          f"{100 * m['test_accuracy']:.2f} | "
          f"{100 * m[train.PRECISE_METRIC]:.2f} | "
          f"{100 * (m['train_accuracy_eval'] - m['test_accuracy']):.2f} | "
          f"{100 * stale:+.2f} | {100 * inconsistency:+.2f} | "
          + ("stale average" if abs(stale) > abs(inconsistency)
             else "inconsistency") + " |")
  text = page.read_text()
  assert line in text
  # The references train once, whatever the ghost size.
  assert "| layer | - |" in text
  assert "### (b) The SGD batch" in text and "| batch | 20 |" in text


@pytest.mark.slow
def test_staleness_cells_and_claims(page, workdirs):
  rows = _rows(workdirs / "staleness")
  worse = sum(np.mean([r[train.PRECISE_METRIC] - r["test_accuracy"]
                       for r in rows if r["bn_momentum"] == m
                       and r["epoch"] == e]) < 0
              for m in {r["bn_momentum"] for r in rows}
              for e in {r["epoch"] for r in rows})
  text = page.read_text()
  assert f"({6 - worse} of 6 (momentum, epoch) cells" in text
  # The hand-made bn_cost rows: memory 1.10x (exact, judged), time not.
  assert "| BN costs computation and memory |" in text
  assert ("mlp: 1.10x temporary memory, 1.50x time | memory: supported "
          "(exact); time: no interval, not judged |") in text
  assert re.search(r"\| the worked example .* \| y = -1\.8995, 2\.0995; the "
                   r"formula gives -1\.8995, 2\.0995 \(exact arithmetic, no "
                   r"test\) \| supported \|", text)


@pytest.mark.slow
def test_a_bad_workdir_leaves_the_page_as_it_was(page, workdirs, tmp_path):
  before = page.read_text()
  with pytest.raises(SystemExit, match="ReportError: workdir .* does not "
                     "exist"):
    report.main(["report", f"--page={page}",
                 f"--workdir={workdirs / 'staleness'}",
                 f"--workdir={tmp_path / 'missing'}"])
  assert page.read_text() == before


def test_config_file_is_read_from_the_command():
  assert studies_page.config_file(
      "python -m experiments.main --config=studies/placements/config.py:cnn "
      "--workdir=w") == ("placements", "cnn")
  assert studies_page.config_file(  # before the study folders
      "python -m experiments.main --config=configs/placement_study.py:cnn "
      "--workdir=w") == ("placement_study", "cnn")
  assert studies_page.config_file(
      "python -m experiments.main --workdir=w --config=studies/staleness/config.py"
  ) == ("staleness", None)
  assert studies_page.config_file(None) == (None, None)


def test_by_combo_keeps_swept_values_apart():
  """A group per combination and swept value: the sections never pool
  the runs of a sweep (lr_range groups by rate within these)."""
  row = lambda combo, run, seed, lr: {"combo": combo, "run": run,
                                      "seed": seed, "learning_rate": lr,
                                      "bn_momentum": 0.99, "epoch": 1}
  rows = [row("placement=none", 2 * s + i, s, lr)
          for s in range(2) for i, lr in enumerate((0.1, 1.0))]
  rows += [row("placement=input", s, s, 0.1) for s in range(2)]
  groups = studies_page.by_combo(rows)
  assert {k: [r["run"] for r in v] for k, v in groups.items()} == {
      "placement=none__learning_rate=0.1": [0, 2],
      "placement=none__learning_rate=1": [1, 3],
      "placement=input": [0, 1]}


def test_default_workdirs_name_the_missing_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit, match=re.escape(
      "ReportError: no finished run in workdirs/ioffe2015, ") + ".*" +
      re.escape("run python -m experiments.main "
                "--config=studies/ioffe2015/config.py "
                "--workdir=workdirs/ioffe2015; ")):
    report.main(["report", "--page=docs/studies.md"])
  assert not (tmp_path / "docs").exists()


@pytest.mark.slow
def test_gan_table_and_verdicts_match_the_results(page):
  text = page.read_text()
  for (g, d), (entropy, classes, fd) in GAN_VARIANTS.items():
    cells = [f"{np.mean(v):{f}} +- {np.std(v, ddof=1):{f}}"
             for v, f in ((entropy, ".3f"), (classes, ".1f"), (fd, ".2f"))]
    assert f"| {g} | {d} | " + " | ".join(cells) + " |" in text
  # BN in G against none, D none (Welch: different generators), one Holm
  # family of 3. Coverage entropy +0.30 against an SE of sqrt(2 * 0.0004 /
  # 3) = 0.0163: t = 18.4 at df = 4, p = 5e-5, beyond noise. Classes +1.00,
  # SE sqrt(2 / 9) = 0.471: t = 2.12, p = 0.10, within noise. FD -5.00, SE
  # sqrt(4/3 + 1/3) = 1.29: t = -3.87 at df = 2.9, p = 0.032, beyond noise
  # alone, but Holm's second-smallest of 3 is doubled: 0.064, within noise.
  from scipy import stats as sps
  bn, plain = GAN_VARIANTS[("batch", "none")], GAN_VARIANTS[("none", "none")]
  results = [sps.ttest_ind(b, a, equal_var=False) for b, a in zip(bn, plain)]
  p = [r.pvalue for r in results]
  assert p[0] < 0.001 and p[1] > 0.05 and 0.02 < p[2] < 0.05
  holm = [min(1, 3 * p[0]), p[1], 2 * p[2]]  # p[0] < p[2] < p[1]
  assert 2 * p[2] < p[1]
  ci = [r.confidence_interval(0.95) for r in results]
  num = lambda v: f"{v:+.2f}"
  cells = [f"{num(np.mean(b) - np.mean(a))} [{num(c.low)}, {num(c.high)}]"
           for b, a, c in zip(bn, plain, ci)]
  assert ("* **BN in G, D norm none:** coverage entropy (nats) 1.82 -> 2.12 "
          f"({cells[0]}, p < 0.001 (Holm < 0.001), beyond noise); classes "
          f">= 5% 6.33 -> 7.33 ({cells[1]}, p = {p[1]:.2g} (Holm "
          f"{holm[1]:.2g}), within noise); Frechet distance 18.00 -> 13.00 "
          f"({cells[2]}, p = {p[2]:.2g} (Holm {holm[2]:.2g}), within "
          "noise).") in text
  assert ("* Runs collapsed to at most one class: G-none_D-batch_joint seed 2"
          ", of 9 runs.") in text


def test_in_one_family_corrects_every_comparison_render_makes():
  """render(family) runs twice; the second pass gets every comparison of
  the first back with Holm's p over all of them (3 here: the smallest p
  times 3), and a render that asks for other comparisons the second time
  is an error, not a silently wrong correction."""
  from bn_lab import stats
  a, b, c = [0.50, 0.52, 0.51], [0.40, 0.43, 0.41], [0.505, 0.515, 0.52]
  calls = []

  def render(family):
    got = [family.compare(a, b, label="a - b"),
           family.compare(a, c, label="a - c"),
           family.compare(b, c, paired=True, label="b - c")]
    calls.append(got)
    return got
  got = studies_page.in_one_family(render)
  assert len(calls) == 2 and all(x.p_holm is None for x in calls[0])
  raw = [stats.welch(a, b).p, stats.welch(a, c).p, stats.paired(b, c).p]
  assert [x.p for x in got] == pytest.approx(raw, rel=1e-12)
  assert [x.p_holm for x in got] == pytest.approx(list(stats.holm(raw)),
                                                  rel=1e-12)
  assert got[0].p_holm == pytest.approx(3 * got[0].p)  # the smallest p
  assert studies_page.judged(got[0]).endswith(", beyond noise")
  assert studies_page.judged(stats.welch([0.5], b)) == (
      "+8.67 points, undetermined (n < 2)")
  passes = iter([(a, b), (a, c)])
  with pytest.raises(RuntimeError, match="same ones in the same order"):
    studies_page.in_one_family(
        lambda family: family.compare(*next(passes), label="x"))
  with pytest.raises(RuntimeError, match="fewer comparisons"):
    studies_page.in_one_family(
        lambda family, n=iter([2, 1]): [family.compare(a, b)
                                        for _ in range(next(n))])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_each_run_report_holds_its_study_section(workdirs, name, tmp_path):
  """Every tiny run's own report, as experiments.main writes it after the
  run: its study's section of that run alone is in summary.md (or the
  line saying what more it needs), never an error."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / name
  shutil.copytree(workdirs / name, workdir)  # the page fixture stays as is
  study = registry.get(json.loads((workdir / "results.json").read_text())[
      "study_id"])
  text = study.report(workdir)
  summary = (workdir / "summary.md").read_text()
  assert "| seeds |" in summary and text.strip() in summary.strip()
  assert ("## " in summary.split("| seeds |")[1]
          or "The study's section needs more than this run" in summary)
