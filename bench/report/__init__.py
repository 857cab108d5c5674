"""`bench report DIR [out=DIR]`: Markdown + CSV tables and PNG plots for one run or a whole sweep.

Reads run directories only, through bench/rundir.py (config.yaml, run.json, metrics.jsonl, evals.jsonl,
summary.json, truncation/truncation.csv; docs/architecture.md, "Run directory") plus a sweep's
sweep.json / index/<n>.json. Never imports torch: this runs on a login node or a laptop, on sweeps still
running.

    collect.py  finding run and sweep directories and reading them into `Run`s; run status
    tables.py   labels, one row per run, the derived tables, text forms, the output writer
    plots.py    the PNG figures (matplotlib, imported when drawn)
    plots_extra.py  the modern stabilisers' figures: ADA's p (ada_p.png); diversity.png
    groups.py   runs that differ only in train.seed as one configuration: mean ± 95% bootstrap interval and
                n in the tables, bands and error bars in the figures, "not separable from best" (≈)
    render.py   report.md, the order of the work, and `main` (what `bench report` calls)

DIR may be
  - one run directory (has run.json, metrics.jsonl or config.yaml),
  - a sweep directory (sweep.json, or index/*.json while the sweep still runs), or
  - any folder with run directories up to MAX_DEPTH levels below it.

Unfinished runs (no summary.json, or a status other than completed, collapsed or diverged) are reported
with what their files hold so far, and their status says so: "running", or "stalled" when nothing in the
run was written for max(30 min, 10 ticks); a half-written last line of a JSONL file is skipped.

Outputs (default DIR/report/), each written through rundir.atomic_write:
  report.md       every table below, the plots, and which plots were skipped and why
  runs.csv        one row per run: status, steps, batch, world size, img/s, timing, losses, best metric, collapse
  scaling.csv     throughput against effective batch, ideal linear scaling in devices and efficiency
  evals.csv       every evaluation record, with its feature extractor: every registry metric (density and
                  coverage included), FID's imaginary residue and the evaluation's cost/* timings
  truncation.csv  every run's truncation curve (the headline metrics per psi)
  intra_fid.csv   every per-class intra-FID value (eval.intra_fid): run, step, extractor, class, FID, counts
  ablation.csv    one row per run: its swept values, headline metric, collapse step, img/s
  throughput.png  losses.png  sigma.png (sigma-2.png ...)  evals.png  truncation.png  ablation.png
  ada_p.png       ADA's p against kimg, one line per run with aug.ada_target set (only when one has aug/p)
  diversity.png   stability/diversity against step beside D's largest sigma0, one line per run that has it
  .gan-bench-report.json  the names of the files above that bench report wrote into this folder. Only a
                  file it lists is ever replaced or removed (a stale output of an earlier report); a
                  same-named file it does not list is the user's, and the report refuses to touch it
"""
