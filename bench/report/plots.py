"""The report's PNG figures (matplotlib, imported only when a figure is drawn; never torch).

Each plot function returns (file name(s) or None, why it was not drawn) and hands its figure to the
Writer, which saves it through rundir.atomic_write (docs/architecture.md).
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass

from bench import metrics_registry as registry
from bench import rundir
from bench.report import groups as seedgroups
from bench.report.collect import Run, finite, natural_key
from bench.report.tables import (REPORT_METRICS, Writer, collapse_info, fmt, natural, psi_order, short,
                                 short_keys)

SIGMA_RUNS_PER_FILE = 6     # rows (runs) per sigma figure; more runs go to sigma-2.png, ...
MAX_LEGEND = 12             # more runs than this: the legend goes outside the axes, in small type


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _colors(n: int):
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _auto_yscale(ax, values, positive_only: bool = False) -> None:
    """Log (symlog where values reach zero or below) when the largest values dwarf the typical one:
    a collapse spike of 1e3 over losses of about 1 would otherwise flatten every other curve."""
    vals = [v for v in values if finite(v)]
    mags = [abs(v) for v in vals if v != 0]
    if len(mags) < 2:
        return
    typical = statistics.median(mags)
    if positive_only and all(v > 0 for v in vals):
        if max(vals) / min(vals) > 30:
            ax.set_yscale("log")
            _plain_ticks(ax.yaxis)
    elif max(mags) > 20 * typical and max(mags) > 10:
        ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(max(typical, 1e-3))))
        _plain_ticks(ax.yaxis)
        ax.yaxis.set_minor_formatter(lambda v, _: "")


def _legend_kw(outside: bool) -> dict:
    """Legend settings: small, and to the right of the axes when there are many entries."""
    if outside:
        return dict(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return dict(fontsize=7)


def _legend(ax, n: int, **kw) -> None:
    ax.legend(**_legend_kw(n > MAX_LEGEND), **kw)


def _collapse_marks(ax, r: Run, color, offset: int = 0) -> bool:
    """A dashed vertical line at the collapse step, and a small triangle along the top edge at every
    flagged tick (one row of triangles per run: `offset`)."""
    from matplotlib.transforms import blended_transform_factory

    step, _, flagged = collapse_info(r)
    if step is not None:
        ax.axvline(step, color=color, ls="--", lw=1.6, alpha=0.8)
    if flagged:
        tr = blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(flagged, [0.97 - 0.045 * offset] * len(flagged), ls="none", marker="v",
                ms=6 if len(flagged) < 40 else 3.5, color=color,
                transform=tr, clip_on=False)
    return step is not None or bool(flagged)


def _collapse_legend(ax, **kw) -> None:
    """The axes' own legend plus proxies explaining the collapse marks."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", ls="--", lw=1.6),
                Line2D([], [], color="grey", ls="none", marker="v", ms=6)]
    labels += ["collapse step", "tick with stability/collapse = 1"]
    ax.legend(handles, labels, **kw)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_throughput(table: list[dict], w: Writer) -> tuple[str | None, str | None]:
    """img/s against effective batch (log2 x), one line per world size, dashed: ideal linear scaling in
    devices (see scaling_table); scaling efficiency = actual / ideal below. `table`: scaling_table()."""
    batches = sorted({t["effective_batch"] for t in table})
    if len(batches) < 2:
        why = ("no img/s recorded" if not table else
               f"only one effective batch size ({fmt(batches[0])}): nothing to scale against")
        return None, why
    worlds = sorted({t["world_size"] or 1 for t in table})
    fig = _figure(7.5, 6.5)
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    colors = _colors(len(worlds))
    for world, c in zip(worlds, colors):
        g = [t for t in table if (t["world_size"] or 1) == world]
        name = f"world size {world}" if len(worlds) > 1 else "runs"
        xs = sorted({t["effective_batch"] for t in g})
        for axis, key in ((ax, "img_per_s"), (ax2, "efficiency")):
            # every run a point (hollow: not finished); the line joins the medians of repeated points
            for fin in (True, False):
                pts = [t for t in g if t["finished"] == fin]
                axis.plot([t["effective_batch"] for t in pts], [t[key] for t in pts], "o", color=c, ms=6,
                          mfc=c if fin else "white", label=(name if fin else f"{name}, not finished")
                          if pts and axis is ax else None)
            axis.plot(xs, [statistics.median(t[key] for t in g if t["effective_batch"] == x) for x in xs], "-",
                      color=c, lw=1.5, label="median" if axis is ax and len(xs) < len(g) else None)
    # ideal linear scaling in devices: w / w0 x the same per-device work at the smallest world size
    for world, c in zip(worlds, colors):
        g = sorted((t for t in table if (t["world_size"] or 1) == world), key=lambda t: t["effective_batch"])
        if world != worlds[0] and g:
            xs = sorted({t["effective_batch"] for t in g})
            ideal = [statistics.median(t["ideal_img_per_s"] for t in g if t["effective_batch"] == x) for x in xs]
            ax.plot(xs, ideal, "--", color=c, lw=1,
                    label=f"ideal for world size {world} ({world / worlds[0]:g}x world {worlds[0]})")
    ax2.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_ticks(ax.yaxis)
    ax.set_ylabel("throughput (img/s)")
    ax.set_title("Throughput vs effective batch (batch x processes x accumulate)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, len(worlds) + 2)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(batches, [fmt(b) for b in batches])
    ax2.set_xlabel("effective batch (images per optimiser step)")
    ax2.set_ylabel("scaling efficiency\n(actual / ideal)")
    ax2.set_ylim(0, max(1.1, max(t["efficiency"] for t in table) * 1.1))
    ax2.grid(True, alpha=0.3)
    w.figure("throughput.png", fig)
    return "throughput.png", None


def _plain_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (60, not 6 x 10^1); minor ticks labelled only at 2 and 5 x
    10^k when the axis spans more than a decade, so that the labels do not run into each other."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lo, hi = sorted(abs(x) for x in axis.get_view_interval())
        if lo > 0 and hi / lo > 10:
            mant = abs(v) / 10 ** math.floor(math.log10(abs(v))) if v else 0
            if round(mant, 6) not in (2.0, 5.0):
                return ""
        return fmt(float(v), 3)

    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v), 3)))
    axis.set_minor_formatter(FuncFormatter(minor))


def _no_offset(ax) -> None:
    """Plain tick labels (1.0025, not 0.0005 + 1.002) on linear axes."""
    for axis in (ax.xaxis, ax.yaxis):
        f = axis.get_major_formatter()
        if hasattr(f, "set_useOffset"):
            f.set_useOffset(False)


def _int_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_losses(runs: list[Run], w: Writer) -> tuple[str | None, str | None]:
    have = [r for r in runs if any("loss/D" in m or "loss/G" in m for m in r.metrics)]
    if not have:
        return None, "no loss/D or loss/G in any metrics.jsonl"
    fig = _figure(8, 6.5)
    axes = fig.subplots(2, 1, sharex=True)
    colors = _colors(len(have))
    marked = False
    for ax, key in zip(axes, ("loss/D", "loss/G")):
        allv = []
        for i, (r, c) in enumerate(zip(have, colors)):
            xs, ys = _series(r.metrics, key)
            allv += ys
            ax.plot(xs, ys, color=c, lw=1.3, marker="." if len(xs) < 30 else None, label=r.label)
            marked = _collapse_marks(ax, r, c, offset=i) or marked
        _auto_yscale(ax, allv)
        _int_steps(ax)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("Losses per tick")
    axes[1].set_xlabel("step (G updates)")
    kw = _legend_kw(len(have) > MAX_LEGEND)
    if marked:
        _collapse_legend(axes[0], **kw)
    else:
        axes[0].legend(**kw)
    w.figure("losses.png", fig)
    return "losses.png", None


def plot_sigma(runs: list[Run], w: Writer) -> tuple[list[str], str | None]:
    """sigma0 per layer against step: one row per run, G left, D right; collapse marked."""
    have = []
    for r in runs:
        layers = {}
        for net in ("G", "D"):
            keys = {k for m in r.metrics for k in m if k.startswith(f"sigma/{net}/") and k.endswith("/s0")}
            layers[net] = sorted(keys, key=lambda k: natural_key(k[len(f"sigma/{net}/"):-3]))
        if layers["G"] or layers["D"]:
            have.append((r, layers))
    if not have:
        return [], "no sigma/<net>/<layer>/s0 keys in metrics.jsonl (telemetry.sigma_every = 0?)"
    names = []
    for chunk_i in range(0, len(have), SIGMA_RUNS_PER_FILE):
        chunk = have[chunk_i:chunk_i + SIGMA_RUNS_PER_FILE]
        fig = _figure(15, max(4.5, 3.4 * len(chunk) + 0.4))
        axes = fig.subplots(len(chunk), 2, squeeze=False)
        previous = {"G": None, "D": None}
        for row, (r, layers) in enumerate(chunk):
            for col, net in enumerate(("G", "D")):
                ax = axes[row][col]
                keys = layers[net]
                if not keys:
                    ax.text(0.5, 0.5, f"no sigma for {net}", ha="center", va="center", transform=ax.transAxes)
                    ax.set_axis_off()
                    continue
                allv = []
                colors = _colors(len(keys)) if len(keys) <= 10 else _layer_colors(len(keys))
                for i, (k, c) in enumerate(zip(keys, colors)):
                    xs, ys = _series(r.metrics, k)
                    allv += ys
                    ax.plot(xs, ys, color=c, lw=1.1, ls=("-", "--", ":")[i % 3] if len(keys) > 10 else "-",
                            marker="." if len(xs) < 30 else None, label=k[len(f"sigma/{net}/"):-3])
                _collapse_marks(ax, r, "red")
                _auto_yscale(ax, allv, positive_only=True)
                _int_steps(ax)
                _no_offset(ax)
                ax.set_title(f"{r.label}: {net} sigma0" + (f" [{r.status}]" if not r.finished else ""), fontsize=9)
                ax.set_ylabel("largest singular value")
                ax.set_xlabel("step")
                ax.grid(True, alpha=0.3)
                if previous[net] != keys:  # same layers as the row above: no second legend
                    ax.legend(**_legend_kw(True), ncol=1 if len(keys) <= 24 else 2)
                previous[net] = keys
        fig.suptitle("sigma0 (largest singular value) per layer; red dashed line: collapse step; "
                     "red triangles: ticks with stability/collapse = 1", fontsize=10)
        name = "sigma.png" if chunk_i == 0 else f"sigma-{chunk_i // SIGMA_RUNS_PER_FILE + 1}.png"
        w.figure(name, fig)
        names.append(name)
    return names, None


def _layer_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / max(n - 1, 1)) for i in range(n)]


def plot_evals(runs: list[Run], records: list[dict], w: Writer, groups=None) -> tuple[str | None, str | None]:
    """Metrics against step: one row of panels per feature extractor (numbers from different
    extractors are not comparable, so they never share an axis), one line per run; a configuration run
    from several seeds: its runs thin, their mean with a 95% band; a run evaluated with eval.repeats > 1:
    error bars."""
    if not records:
        return None, "no evals.jsonl records (eval.every = 0 and no `bench eval`)"
    extractors = sorted({e["extractor"] for e in records})
    metrics = [k for k in REPORT_METRICS if any(finite(e.get(k)) for e in records)]
    if not metrics:
        return None, "evals.jsonl records hold none of " + ", ".join(REPORT_METRICS)
    labels = [r.label for r in runs if r.evals]
    sgroups = [g for g in (groups or [seedgroups.SeedGroup(r.label, [r]) for r in runs]) if any(r.evals for r in g.runs)]
    colors = {r.label: c for g, c in zip(sgroups, _colors(len(sgroups))) for r in g.runs}
    seeded = {r.label for g in sgroups if len(g.runs) > 1 for r in g.runs}
    ncol = min(3, len(metrics))
    per_ext = -(-len(metrics) // ncol)  # rows of panels per extractor
    fig = _figure(4.0 * ncol + 2.5, 3.0 * per_ext * len(extractors) + 0.4)
    axes = fig.subplots(per_ext * len(extractors), ncol, squeeze=False)
    for ax in axes.flat[len(metrics) * len(extractors):]:
        ax.set_axis_off()
    for i, ext in enumerate(extractors):
        for j, key in enumerate(metrics):
            ax = axes[i * per_ext + j // ncol][j % ncol]
            allv = []
            for label in labels:
                groups: dict = {}
                for e in records:
                    if e["run"] == label and e["extractor"] == ext and finite(e.get(key)):
                        groups.setdefault(e["truncation"], []).append(e)
                for psi, g in groups.items():
                    xs, ys = [e["step"] for e in g], [e[key] for e in g]
                    allv += ys
                    name = label if psi is None else f"{label} (psi={short(psi)})"
                    thin = label in seeded
                    ax.plot(xs, ys, "o-" if psi is None else "x:", color=colors[label], ms=2 if thin else 4,
                            lw=0.7 if thin else 1.2, alpha=0.35 if thin else 1.0, label=None if thin else name)
            for sg in sgroups:
                draw_series(ax, seedgroups.step_series(sg, records, key, ext), colors[sg.runs[0].label], sg)
            if not allv:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
            elif registry.lower_is_better(key):
                _auto_yscale(ax, allv, positive_only=True)
            better = " (lower is better)" if registry.lower_is_better(key) else ""
            ax.set_title(f"{key.split('/', 1)[1]}{better}  [extractor: {ext}]", fontsize=9)
            ax.set_xlabel("step")
            _int_steps(ax)
            _no_offset(ax)
            ax.grid(True, alpha=0.3)
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="outside right upper", fontsize=7)
    w.figure("evals.png", fig)
    return "evals.png", None


def plot_truncation(records: list[dict], w: Writer, gtrunc=None) -> tuple[str | None, str | None]:
    """IS against FID, precision against recall and density against coverage, points labelled by psi; one
    row per extractor. Error bars: a configuration's mean over its seeds with 95% intervals in both
    directions (groups.group_truncation), or one run's intervals over its repeated sample sets."""
    if not records:
        return None, "no truncation/truncation.csv in any run (`bench truncation run=DIR` writes one)"
    extractors = sorted({t["extractor"] for t in records})
    labels = list(dict.fromkeys(t["run"] for t in records))
    colors, seeded = seedgroups.shared_colors(labels, gtrunc or [], _colors)  # a configuration's seeds: one colour
    pairs = (("FID", "IS"), ("recall", "precision"), ("coverage", "density"))
    fig = _figure(18, 4.6 * len(extractors) + 0.4)
    axes = fig.subplots(len(extractors), len(pairs), squeeze=False)
    for i, ext in enumerate(extractors):
        for ax, (xk, yk) in zip(axes[i], pairs):
            for label in labels:
                pts = sorted((t for t in records if t["run"] == label and t["extractor"] == ext
                              and finite(t.get(xk)) and finite(t.get(yk))), key=lambda t: psi_order(t["psi"]))
                if not pts:
                    continue
                thin = label in seeded
                ax.plot([t[xk] for t in pts], [t[yk] for t in pts], "o-", color=colors[label], ms=3 if thin else 5,
                        lw=0.7 if thin else 1.5, alpha=0.4 if thin else 1.0, label=None if thin else label)
                for t in pts if not thin else ():
                    ax.annotate("off" if t["psi"] is None else f"{t['psi']:g}", (t[xk], t[yk]),
                                textcoords="offset points", xytext=(5, 4), fontsize=7, color=colors[label])
            draw_truncation(ax, [t for t in gtrunc or [] if t["extractor"] == ext], xk, yk, colors)
            ax.margins(0.1)
            _no_offset(ax)
            ax.set_xlabel(xk + (" (lower is better)" if registry.lower_is_better(f"eval/{xk}") else ""))
            ax.set_ylabel(yk)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{yk} vs {xk} by truncation psi  [extractor: {ext}]", fontsize=9)
            if xk in ("recall", "coverage"):  # both in [0, 1]; density is not bounded above
                ax.set_xlim(-0.02, 1.05)
                if yk == "precision":
                    ax.set_ylim(-0.02, 1.07)
                else:
                    ax.set_ylim(bottom=-0.02)
        _legend(axes[i][0], len(labels))
    w.figure("truncation.png", fig)
    return "truncation.png", None


@dataclass
class _Matrix:
    rlabels: list          # row labels, top to bottom
    clabels: list          # column labels, left to right
    col_key: str           # the x axis' title
    cells: dict            # (row label, column label) -> [ablation rows]


def _ablation_matrix(abl: list[dict], keys: list[str]) -> _Matrix:
    """Lay the runs out on the swept keys (see _matrix_axes); one cell per run when points repeat or
    nothing was swept."""
    abl = [{**a, **{k: ("(unset)" if a.get(k) in ("", None) else a[k]) for k in keys}} for a in abl]
    if keys:
        row_keys, col_keys = _matrix_axes(abl, keys)
        shorts = short_keys(col_keys)

        def clabel(a):
            return str(a[col_keys[0]]) if len(col_keys) == 1 else " ".join(f"{shorts[k]}={a[k]}" for k in col_keys)

        def rlabel(a):
            return " ".join(f"{k}={a[k]}" for k in row_keys)

        rlabels = list(dict.fromkeys(rlabel(a) for a in abl))
        clabels = sorted(dict.fromkeys(clabel(a) for a in abl), key=natural)
        if len(rlabels) > 1:
            rlabels = sorted(rlabels, key=natural)
        cells: dict = {}
        for a in abl:
            cells.setdefault((rlabel(a), clabel(a)), []).append(a)
        if all(len(v) == 1 for v in cells.values()):
            return _Matrix(rlabels, clabels, " x ".join(col_keys), cells)
    # nothing swept, or repeated points: one cell per run
    return _Matrix([""], [a["run"] for a in abl], "run", {("", a["run"]): [a] for a in abl})


def plot_ablation(abl: list[dict], keys: list[str], metric: str, w: Writer) -> tuple[str | None, str | None]:
    """A heatmap of the headline metric, one cell per run, each annotated with metric, collapse step and
    img/s. Two or more swept keys: rows = all but the last key, columns = the last key."""
    if len(abl) < 2:
        return None, "one run: no ablation to show"
    import numpy as np
    from matplotlib import colormaps

    m = _ablation_matrix(abl, keys)
    rlabels, clabels = m.rlabels, m.clabels
    grid = np.full((len(rlabels), len(clabels)), np.nan)
    for (rl, cl), (a, *_) in m.cells.items():
        if finite(a["value"]):
            grid[rlabels.index(rl), clabels.index(cl)] = a["value"]
    lower = registry.lower_is_better(metric)
    reverse = lower  # better = brighter; a loss says nothing about quality: plain viridis
    cmap = colormaps["viridis_r" if reverse else "viridis"].with_extremes(bad="#dddddd")
    cw = max(1.9, max(len(str(c)) for c in clabels) * 0.075)
    fig = _figure(min(2.2 + cw * len(clabels), 40), 1.4 + 1.25 * len(rlabels))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    shown = grid[np.isfinite(grid)]
    mid = (shown.min() + shown.max()) / 2 if shown.size else 0
    for (rl, cl), (a, *_) in m.cells.items():
        i, j = rlabels.index(rl), clabels.index(cl)
        lines = [f"{metric.split('/')[-1]} {seedgroups.cell_text(a)}",
                 f"collapse {fmt(a['collapse_step'])}" + (f" ({a['collapsed']})" if a.get("collapsed") else ""),
                 f"{fmt(a['img_per_s'], 3)} img/s"]
        if a["status"] != rundir.COMPLETED:
            lines.append(f"[{a['status']}]")
        v = grid[i, j]
        dark = bool(np.isfinite(v)) and ((v > mid) if reverse else (v < mid))
        ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    for i in range(len(rlabels)):
        for j in range(len(clabels)):
            if (rlabels[i], clabels[j]) not in m.cells:
                ax.text(j, i, "no run", ha="center", va="center", fontsize=8, color="grey")
    tilt = sum(len(str(c)) for c in clabels) > 12 * len(clabels)
    ax.set_xticks(range(len(clabels)), [str(c) for c in clabels], rotation=20 if tilt else 0,
                  ha="right" if tilt else "center", fontsize=8)
    ax.set_yticks(range(len(rlabels)), rlabels, fontsize=8)
    ax.set_xlabel(m.col_key)
    if shown.size:
        better = "" if metric.startswith("loss/") else f" ({'lower' if lower else 'higher'} is better)"
        fig.colorbar(im, ax=ax, label=metric + better, shrink=0.9)
    title = abl[0]["metric"]
    marks = any(a.get("vs_best") for a in abl)
    ax.set_title(f"Ablation: {title}, collapse step, throughput" + (
        f"\n± : Student-t 95% interval (n seeds); {seedgroups.NOT_SEPARABLE} / {seedgroups.DIFFERENT}: not separable from / different "
        f"from the best cell (t-test, Holm, α = {seedgroups.ALPHA:g})" if marks else ""),
        fontsize=10)
    w.figure("ablation.png", fig)
    return "ablation.png", None


def _matrix_axes(abl: list[dict], keys: list[str]) -> tuple[list[str], list[str]]:
    """Which swept keys make the rows and which the columns of the ablation matrix. Up to two keys:
    rows = the first, columns = the last. More: the split (keys in their order on each axis) whose grid is
    closest to square in inches (a cell is ~1.5x wider than tall), at most 12 columns; a 3 x 2 x 4 x 2 x 2
    grid becomes 12 rows x 8 columns instead of 48 x 2."""
    if len(keys) <= 2:
        return keys[:-1], keys[-1:]
    size = {k: len({str(a[k]) for a in abl}) for k in keys}
    best = None
    for n in range(1, len(keys)):
        for cols in itertools.combinations(keys, n):
            nc = math.prod(size[k] for k in cols)
            nr = math.prod(size[k] for k in keys if k not in cols)
            if nc > 12:
                continue
            score = (abs(math.log(1.5 * nc / nr)), -keys.index(cols[-1]), n)
            if best is None or score < best[0]:
                best = (score, [k for k in keys if k not in cols], list(cols))
    return (best[1], best[2]) if best else (keys[:-1], keys[-1:])


def draw_series(ax, series: list[tuple], color, group: seedgroups.SeedGroup) -> None:
    """On matplotlib axes: a group of several runs as its mean line with a 95% band; one run's repeat
    intervals as error bars (nothing else: its line is drawn with the other runs)."""
    pts = [(x, e) for x, e in series if e is not None and e.lo is not None]
    if len(group.runs) > 1 and series:
        xs = [x for x, _ in series]
        ax.plot(xs, [e.mean for _, e in series], "s-", color=color, ms=4, lw=2.0,
                label=f"{group.label} (mean, 95% band, n={len(group.runs)})")
        if pts:
            ax.fill_between([x for x, _ in pts], [e.lo for _, e in pts], [e.hi for _, e in pts], color=color,
                            alpha=0.2, lw=0)
    elif pts:
        ax.errorbar([x for x, _ in pts], [e.mean for _, e in pts],
                    yerr=[[e.mean - e.lo for _, e in pts], [e.hi - e.mean for _, e in pts]], fmt="none",
                    ecolor=color, capsize=3, lw=1.0)


def draw_truncation(ax, points: list[dict], xk: str, yk: str, colors: dict) -> None:
    """On matplotlib axes: error bars in x and y at each group_truncation point that has an interval; a
    configuration of several seeds also gets its mean curve (diamonds, dashed)."""
    by_group: dict = {}
    for t in points:
        if t.get(xk) is not None and t.get(yk) is not None:
            by_group.setdefault(t["run"], []).append(t)
    for label, pts in by_group.items():
        pts.sort(key=lambda t: math.inf if t["psi"] is None else t["psi"])
        color = colors.get(label, "black")
        if max(t["n"] for t in pts) > 1:
            ax.plot([t[xk].mean for t in pts], [t[yk].mean for t in pts], "D--", color=color, ms=5, lw=1.2,
                    label=f"{label} (mean ± 95% CI, n={max(t['n'] for t in pts)})")
            for t in pts:
                ax.annotate("off" if t["psi"] is None else f"{t['psi']:g}", (t[xk].mean, t[yk].mean),
                            textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
        bars = [t for t in pts if t[xk].lo is not None or t[yk].lo is not None]
        if bars:
            ax.errorbar([t[xk].mean for t in bars], [t[yk].mean for t in bars],
                        xerr=[[t[xk].mean - t[xk].interval[0] for t in bars], [t[xk].interval[1] - t[xk].mean
                                                                              for t in bars]],
                        yerr=[[t[yk].mean - t[yk].interval[0] for t in bars], [t[yk].interval[1] - t[yk].mean
                                                                              for t in bars]],
                        fmt="none", ecolor=color, capsize=3, lw=1.0)


# ---- the modern stabilisers' figures: ada_p.png and diversity.png ---------------------------------------
ADA_P = "aug/p"
ADA_FILE = "ada_p.png"
DIVERSITY = "stability/diversity"
DIVERSITY_FILE = "diversity.png"
SEED_STYLES = ("-", "--", ":", "-.")


@dataclass
class PSeries:
    """One run's p over training."""
    label: str          # the run's label in the report
    x_key: str          # "kimg", or "step" when a tick has no kimg
    xs: list
    ps: list
    target: float | None = None  # aug.ada_target from config.yaml


def ada_series(runs: list[Run]) -> list[PSeries]:
    """Every run whose metrics.jsonl has `aug/p`, in the runs' order: its ticks' p against kimg (against
    step when any of those ticks lacks kimg)."""
    out = []
    for r in runs:
        ticks = [m for m in r.metrics if finite(m.get(ADA_P))]
        if not ticks:
            continue
        x_key = "kimg" if all(finite(m.get("kimg")) for m in ticks) else "step"
        target = r.config.get("aug.ada_target")
        out.append(PSeries(r.label, x_key, [m[x_key] for m in ticks], [m[ADA_P] for m in ticks],
                           target if finite(target) else None))
    return out


def plot_ada_p(runs: list[Run], w: Writer, groups=None) -> tuple[str | None, str | None]:
    """ada_p.png: p against kimg, one line per ADA run; a configuration's seeds share its colour."""
    series = ada_series(runs)
    if not series:
        return None, f"no {ADA_P} in any metrics.jsonl (no run with aug.ada_target set)"
    labels = [s.label for s in series]
    owner = {r.label: g.label for g in (groups or []) for r in g.runs}  # run -> its configuration (groups.py)
    configs = list(dict.fromkeys(owner.get(label, label) for label in labels))
    color = dict(zip(configs, _colors(len(configs))))
    seen: dict = {}
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    for s in series:
        config = owner.get(s.label, s.label)
        style = SEED_STYLES[_next(seen, config) % len(SEED_STYLES)]
        ax.plot(s.xs, s.ps, style, color=color[config], lw=1.4, marker="." if len(s.xs) < 30 else None,
                label=s.label + (f" (target r_t {s.target:g})" if s.target is not None else ""))
    x_keys = {s.x_key for s in series}
    ax.set_xlabel("kimg (thousands of real images seen)" if x_keys == {"kimg"} else " / ".join(sorted(x_keys)))
    ax.set_ylabel("p (probability of each augmentation op)")
    ax.set_ylim(bottom=0)
    ax.set_title("ADA: augmentation probability p per tick (raised while r_t = E[sign D(real)] is above target)",
                 fontsize=9)
    _no_offset(ax)
    ax.grid(True, alpha=0.3)
    ax.legend(**_legend_kw(len(series) > MAX_LEGEND))
    w.figure(ADA_FILE, fig)
    return ADA_FILE, None


def _next(seen: dict, config: str) -> int:
    """The index of this run among the runs of its configuration drawn so far (its line style)."""
    seen[config] = seen.get(config, -1) + 1
    return seen[config]


def diversity_runs(runs: list[Run]) -> list[Run]:
    """The runs whose metrics.jsonl has `stability/diversity`."""
    return [r for r in runs if any(finite(m.get(DIVERSITY)) for m in r.metrics)]


def _d_sigma0(r: Run) -> tuple[list, list]:
    """D's largest sigma0 over its layers, per tick that measured it."""
    pts = [(m["step"], max(v for k, v in m.items() if k.startswith("sigma/D/") and k.endswith("/s0") and finite(v)))
           for m in r.metrics if finite(m.get("step")) and any(k.startswith("sigma/D/") and k.endswith("/s0")
                                                              and finite(v) for k, v in m.items())]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_diversity(runs: list[Run], w: Writer) -> tuple[str | None, str | None]:
    """diversity.png: stability/diversity against step (left) and D's largest sigma0 (right), one colour per run;
    dashed lines: collapse steps."""
    have = diversity_runs(runs)
    if not have:
        return None, f"no {DIVERSITY} in any metrics.jsonl (telemetry.diversity_every = 0, or no domain classifier)"
    fig = _figure(13, 4.5)
    ax_div, ax_sig = fig.subplots(1, 2)
    for i, (r, c) in enumerate(zip(have, _colors(len(have)))):
        pts = [(m["step"], m[DIVERSITY]) for m in r.metrics if finite(m.get(DIVERSITY)) and finite(m.get("step"))]
        ax_div.plot([p[0] for p in pts], [p[1] for p in pts], color=c, lw=1.4, marker="." if len(pts) < 30 else None,
                    label=r.label)
        xs, ys = _d_sigma0(r)
        if xs:
            ax_sig.plot(xs, ys, color=c, lw=1.2, label=r.label)
        for ax in (ax_div, ax_sig):
            _collapse_marks(ax, r, c, offset=i)
    ax_div.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax_div.set_ylim(bottom=0)
    ax_div.set_ylabel("diversity (G's per-class spread / the data's)")
    ax_div.set_title("stability/diversity: 1 = as diverse as the data", fontsize=9)
    ax_sig.set_ylabel("D's largest sigma0 over layers")
    ax_sig.set_title("D sigma0 (telemetry.sigma_every)", fontsize=9)
    for ax in (ax_div, ax_sig):
        ax.set_xlabel("step")
        _int_steps(ax)
        _no_offset(ax)
        ax.grid(True, alpha=0.3)
    ax_div.legend(**_legend_kw(len(have) > MAX_LEGEND))
    fig.suptitle("Diversity and D's sigma0; dashed lines: collapse steps; triangles: flagged ticks", fontsize=10)
    w.figure(DIVERSITY_FILE, fig)
    return DIVERSITY_FILE, None
