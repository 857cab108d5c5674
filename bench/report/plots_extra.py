"""The report's figures of the modern stabilisers, ada_p.png and diversity.png (matplotlib, imported only when
a figure is drawn; never torch). Same contract as plots.py (docs/architecture.md, "Report")."""
from __future__ import annotations

from dataclasses import dataclass

from bench.report.collect import Run, finite
from bench.report.plots import MAX_LEGEND, _collapse_marks, _colors, _figure, _int_steps, _legend_kw, _no_offset
from bench.report.tables import Writer

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
