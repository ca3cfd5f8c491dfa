"""The study report: one self-contained HTML file over one or more results folders.

The report embeds everything it shows (inline CSS, images as base64 ``data:`` URIs, no scripts, no network):
a summary, failures, per-stain plots (each subject's values before and after treatment, and values by region),
stain-vector drift and background (I0) per slide, the warnings, the QC thumbnail of every slide with its
overlays, and the table of all metrics with manually corrected rows marked. Every figure is also written as PNG
and SVG beside the report (``<report name>_figures/``) for papers and slides.

Figures are drawn with matplotlib's object-oriented API on the Agg canvas (no pyplot, no global backend change).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cleihc import __version__
from cleihc.errors import CleihcError
from cleihc.io import atomic_path, atomic_write

__all__ = [
    "ReportSummary",
    "StudyResults",
    "build_report",
    "key_metric",
    "load_results",
    "order_timepoints",
    "stain_drift",
]

log = logging.getLogger(__name__)

_METADATA = ("subject", "timepoint", "group")
#: Timepoint labels that come first / last when ordering (case-insensitive); others sort naturally between.
_EARLY = (
    "screening",
    "baseline",
    "pre",
    "before",
    "pretreatment",
    "pre-treatment",
    "w0",
    "week0",
    "day0",
    "d0",
    "v1",
)
_LATE = ("post", "after", "posttreatment", "post-treatment", "end", "eot", "followup", "follow-up")


@dataclass(frozen=True)
class StudyResults:
    """Everything the report reads from the results folders.

    Attributes
    ----------
    folders : tuple of Path
    records : tuple of dict
        Per-slide records (``slides/<slide>.json``), each with an added ``"_folder"`` key.
    regions : pandas.DataFrame
        The per-region rows of every folder (wide, as in ``regions.csv``), with a ``folder`` column.
    failures : pandas.DataFrame
        ``folder, slide, path, reason`` from each ``failures.csv``.
    drift : pandas.DataFrame
        From :func:`stain_drift`.
    """

    folders: tuple[Path, ...]
    records: tuple[dict[str, Any], ...]
    regions: pd.DataFrame
    failures: pd.DataFrame
    drift: pd.DataFrame


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`build_report` wrote."""

    html_path: Path
    figures: tuple[Path, ...]
    n_slides: int
    n_failures: int
    n_corrected_rows: int


def order_timepoints(values: Sequence[Any]) -> list[str]:
    """Timepoints in study order: baseline/pre first, post/after last, the others in natural order (w2 < w10)."""

    def key(v: str) -> tuple[int, list[Any]]:
        low = v.strip().lower()
        rank = 0 if low in _EARLY else (2 if low in _LATE else 1)
        parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", low)]
        return rank, [(0, p) if isinstance(p, int) else (1, p) for p in parts]

    return sorted(
        {str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))}, key=key
    )


def key_metric(rows: pd.DataFrame) -> str | None:
    """The headline metric of a protocol's rows: percent positive area when measured, else positive cells per mm²."""
    for m in ("positive_area_percent", "positive_cells_per_mm2"):
        if m in rows.columns and rows[m].notna().any():
            return m
    return None


def _review_html(review: dict[str, str]) -> str:
    """A QC card's line for the slide's review state (napari review queue); nothing while unreviewed."""
    status = review.get("status", "unreviewed")
    if status == "unreviewed":
        return ""
    who = f" by {review['author']}" if review.get("author") else ""
    note = f": {review['note']}" if review.get("note") else ""
    if status == "flagged":
        return f'<p class="bad">flagged in review{_e(who)}{_e(note)}</p>'
    return f'<p class="ok">{_e(status)}{_e(who)}{_e(note)}</p>'


def stain_drift(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Stain-vector drift and background (I0) of each slide.

    The reference vectors are those of the protocol named in the slide's rows (``load_protocol(name)``); the
    slide's vectors are those it was measured with (``provenance["stains"]``, Macenko estimates when the protocol
    re-estimates). Drift is the angle between them (:func:`cleihc.stains.angle_deg`).

    Parameters
    ----------
    records : sequence of dict
        Per-slide records.

    Returns
    -------
    pandas.DataFrame
        One row per slide × stain: ``slide, protocol, stain_name, drift_deg, background_r, background_g,
        background_b, reference`` (``reference`` says where the reference came from, or why there is none).
    """
    from cleihc.stains import StainMatrix, angle_deg

    refs: dict[str, tuple[Any, str]] = {}
    rows = []
    for rec in records:
        prov = rec.get("provenance") or {}
        st = prov.get("stains")
        proto_rows = rec.get("rows") or []
        name = str(proto_rows[0].get("stain", "")) if proto_rows else ""
        if not st:
            continue
        try:
            used = StainMatrix.from_dict(st)
        except CleihcError:
            continue
        if name not in refs:
            refs[name] = _reference_matrix(name, rec.get("protocol_sha256"))
        ref, note = refs[name]
        bg = list(used.background_rgb)
        for i, sname in enumerate(used.names):
            if sname == "residual":
                continue
            drift = math.nan
            if ref is not None and sname in ref.names:
                drift = angle_deg(used.od_vectors[i], ref.od_vectors[list(ref.names).index(sname)])
            rows.append(
                {
                    "slide": rec.get("slide"),
                    "protocol": name,
                    "stain_name": sname,
                    "drift_deg": drift,
                    "background_r": bg[0],
                    "background_g": bg[1],
                    "background_b": bg[2],
                    "reference": note,
                }
            )
    cols = [
        "slide",
        "protocol",
        "stain_name",
        "drift_deg",
        "background_r",
        "background_g",
        "background_b",
        "reference",
    ]
    return pd.DataFrame(rows, columns=cols)


def _reference_matrix(name: str, run_sha256: str | None) -> tuple[Any, str]:
    try:
        from cleihc.protocol import load_protocol

        proto = load_protocol(name)
    except (CleihcError, ImportError, OSError) as exc:
        return None, f"no reference: protocol {name!r} not found ({type(exc).__name__})"
    note = f"protocol {proto.name} {proto.version}"
    if run_sha256 and getattr(proto, "sha256", None) != run_sha256:
        note += " (differs from the protocol of the run)"
    return proto.stains.matrix, note


def load_results(folders: Sequence[str | os.PathLike[str]]) -> StudyResults:
    """Read records, region rows, failures and stain drift of results folders.

    Raises
    ------
    CleihcError
        A folder is not a results folder of ``cleihc quantify``.
    """
    from cleihc.outputs import read_slide_records

    paths = tuple(Path(f) for f in folders)
    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    fails = []
    for folder in paths:
        if not (folder / "slides").is_dir() and not (folder / "failures.csv").is_file():
            raise CleihcError(
                "not a cleihc results folder (no slides/ or failures.csv inside); pass the --out folder of "
                "`cleihc quantify`",
                path=folder,
            )
        for rec in read_slide_records(folder) if (folder / "slides").is_dir() else []:
            rec = {**rec, "_folder": str(folder)}
            records.append(rec)
            for row in rec.get("rows") or []:
                rows.append({**row, "folder": str(folder)})
        fpath = folder / "failures.csv"
        if fpath.is_file():
            try:
                f = pd.read_csv(fpath, dtype=str, keep_default_na=False)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
                raise CleihcError(
                    "failures.csv is unreadable; re-run `cleihc quantify`", path=fpath
                ) from None
            if len(f):
                f.insert(0, "folder", str(folder))
                fails.append(f)
    regions = pd.DataFrame(rows)
    failures = (
        pd.concat(fails, ignore_index=True)
        if fails
        else pd.DataFrame(columns=["folder", "slide", "path", "reason"])
    )
    return StudyResults(paths, tuple(records), regions, failures, stain_drift(records))


# --------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------
def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), layout="constrained")


def _regions_with_data(df: pd.DataFrame, metric: str) -> list[str]:
    present = [
        r for r in df["region"].astype(str).unique() if df.loc[df["region"] == r, metric].notna().any()
    ]
    standard = ["tissue", "epidermis", "dermis", "papillary_dermis", "superficial_dermis", "deep_dermis"]
    return [r for r in standard if r in present] + sorted(r for r in present if r not in standard)


def plot_paired(df: pd.DataFrame, metric: str, *, title: str) -> Any | None:
    """Each subject's value at each timepoint (lines join a subject's slides), one panel per region."""
    if "subject" not in df.columns or "timepoint" not in df.columns:
        return None
    d = df.dropna(subset=[metric, "subject", "timepoint"])
    if d.empty or d["timepoint"].nunique() < 2:
        return None
    regions = _regions_with_data(d, metric)
    tps = order_timepoints(d["timepoint"].tolist())
    pos = {t: i for i, t in enumerate(tps)}
    ncol = min(3, len(regions))
    nrow = math.ceil(len(regions) / ncol)
    fig = _figure(3.6 * ncol + 0.5, 3.0 * nrow + 0.4)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    subjects = sorted(d["subject"].astype(str).unique())
    colours = {s: f"C{i % 10}" for i, s in enumerate(subjects)}
    for ax, region in zip(axes, regions, strict=False):
        g = d[d["region"] == region]
        for subj, gs in g.groupby(g["subject"].astype(str)):
            gs = gs.assign(_x=gs["timepoint"].astype(str).map(pos)).sort_values("_x")
            ax.plot(gs["_x"], gs[metric], "-o", color=colours[subj], ms=4, lw=1.2, alpha=0.85, label=subj)
        med = g.groupby(g["timepoint"].astype(str))[metric].median()
        ax.plot(
            [pos[t] for t in tps if t in med.index],
            [med[t] for t in tps if t in med.index],
            "_",
            color="k",
            ms=28,
            mew=2.5,
            label="median",
        )
        ax.set_xticks(range(len(tps)), tps)
        ax.set_xlim(-0.4, len(tps) - 0.6)
        ax.set_title(region, fontsize=10)
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[len(regions) :]:
        ax.set_visible(False)
    if len(subjects) <= 12:
        axes[0].legend(fontsize=6, ncol=2, title="subject", title_fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_by_region(df: pd.DataFrame, metric: str, *, title: str) -> Any | None:
    """Values of every slide by region (points, with box plots), coloured by timepoint when known."""
    d = df.dropna(subset=[metric])
    if d.empty:
        return None
    regions = _regions_with_data(d, metric)
    groups = (
        order_timepoints(d["timepoint"].tolist())
        if "timepoint" in d.columns and d["timepoint"].notna().any()
        else [""]
    )
    fig = _figure(max(4.5, 1.1 * len(regions) * max(1, len(groups)) + 1.5), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(groups)
    rng = np.random.default_rng(0)  # fixed jitter: the same folders give the same figure
    for j, grp in enumerate(groups):
        for i, region in enumerate(regions):
            sel = d["region"] == region
            if grp:
                sel &= d["timepoint"].astype(str) == grp
            vals = d.loc[sel, metric].to_numpy(float)
            if not vals.size:
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.boxplot(
                vals,
                positions=[x],
                widths=width * 0.8,
                showfliers=False,
                manage_ticks=False,
                medianprops={"color": f"C{j}"},
            )
            ax.scatter(
                x + rng.uniform(-width * 0.25, width * 0.25, vals.size),
                vals,
                s=12,
                color=f"C{j}",
                alpha=0.8,
                label=grp if (grp and i == 0) else None,
                zorder=3,
            )
    ax.set_xticks(range(len(regions)), regions, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric, fontsize=8)
    if groups != [""]:
        ax.legend(fontsize=7, title="timepoint", title_fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig


def plot_drift(drift: pd.DataFrame) -> Any | None:
    """Drift angle per slide and stain, and the background RGB per slide."""
    if drift.empty:
        return None
    slides = list(dict.fromkeys(drift["slide"].astype(str)))
    fig = _figure(max(6.0, 0.32 * len(slides) + 2.5), 6.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(slides))
    names = list(dict.fromkeys(drift["stain_name"]))
    w = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        g = drift[drift["stain_name"] == name].drop_duplicates("slide").set_index("slide")
        vals = [g["drift_deg"].get(s, np.nan) for s in slides]
        ax1.bar(x - 0.4 + w * (k + 0.5), vals, width=w, label=name, color=f"C{k}")
    top = float(np.nanmax(drift["drift_deg"].to_numpy(float))) if drift["drift_deg"].notna().any() else 0.0
    ax1.set_ylim(0, max(1.0, 1.15 * top))  # a fixed-vector protocol has zero drift: keep a readable axis
    ax1.set_ylabel("drift (degrees)")
    ax1.set_title("stain-vector angle to the protocol's reference", fontsize=10)
    ax1.legend(fontsize=7)
    bg = drift.drop_duplicates("slide").set_index("slide")
    for col, colour in (
        ("background_r", "tab:red"),
        ("background_g", "tab:green"),
        ("background_b", "tab:blue"),
    ):
        ax2.plot(x, [bg[col].get(s, np.nan) for s in slides], "o", color=colour, label=col[-1].upper(), ms=5)
    ax2.set_ylabel("background I0 (0-255)")
    ax2.set_title("background (bare glass) per slide", fontsize=10)
    ax2.legend(fontsize=7, ncol=3)
    ax2.set_xticks(x, slides, rotation=60, ha="right", fontsize=7)
    return fig


def _save(fig: Any, stem: Path) -> tuple[list[Path], str]:
    """Write PNG and SVG; return the paths and the PNG as a data URI."""
    paths = []
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    fig.set_layout_engine("none")  # keep the positions just computed: the SVG needs no second layout pass
    data = png.getvalue()
    with atomic_write(stem.with_suffix(".png")) as f:
        f.write(data)
    paths.append(stem.with_suffix(".png"))
    with atomic_path(stem.with_suffix(".svg")) as tmp:
        fig.savefig(tmp, format="svg")
    paths.append(stem.with_suffix(".svg"))
    return paths, "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _thumbnail_uri(path: Path, *, max_px: int = 720) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85, optimize=True)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        log.warning("%s: cannot read QC image (%s)", path, exc)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2430;background:#fafbfc}
header{background:#243447;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d4e0;font-size:13px}
nav{position:sticky;top:0;background:#fff;border-bottom:1px solid #dde3ea;padding:8px 28px;font-size:13px;z-index:2}
nav a{margin-right:16px;color:#24589b;text-decoration:none}
main{padding:10px 28px 40px}h2{border-bottom:2px solid #243447;padding-bottom:4px;margin-top:34px}
h3{margin:20px 0 6px}table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #d5dbe2;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#eef2f6;position:sticky;top:34px}td.t,th.t{text-align:left}
tr.corrected td{background:#fff4d6}tr.fail td{background:#fde8e8}
.cards{display:flex;flex-wrap:wrap;gap:14px}.card{background:#fff;border:1px solid #dde3ea;border-radius:6px;
padding:8px;width:360px}.card img{width:100%;height:auto;display:block;border-radius:3px}
.card h4{margin:4px 0;font-size:13px;word-break:break-all}.card p{margin:2px 0;font-size:11px;color:#4a5563}
.warn{color:#9a5b00}.bad{color:#b3261e;font-weight:600}.ok{color:#2e7d32}
.fig{max-width:100%;height:auto;border:1px solid #dde3ea;background:#fff;margin:6px 0}
.stats{display:flex;gap:18px;flex-wrap:wrap}.stat{background:#fff;border:1px solid #dde3ea;border-radius:6px;
padding:8px 14px}.stat b{display:block;font-size:20px}.scroll{overflow:auto;max-height:640px}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool | np.bool_):
        return "yes" if v else ""
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        if not math.isfinite(v):
            return ""
        if v == int(v) and abs(v) < 1e9:
            return str(int(v))
        return f"{v:.4g}"
    return str(v)


def _table(df: pd.DataFrame, *, row_class: pd.Series | None = None, text_cols: Sequence[str] = ()) -> str:
    cols = list(df.columns)
    text = set(text_cols) | {
        c for c in cols if not pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])
    }
    out = ["<table><thead><tr>"]
    out += [f'<th class="{"t" if c in text else ""}">{_e(c)}</th>' for c in cols]
    out.append("</tr></thead><tbody>")
    classes = row_class.tolist() if row_class is not None else [""] * len(df)
    for cls, row in zip(classes, df.itertuples(index=False), strict=True):
        out.append(f'<tr class="{_e(cls)}">' if cls else "<tr>")
        out += [
            f'<td class="{"t" if c in text else ""}">{_e(_fmt(v))}</td>'
            for c, v in zip(cols, row, strict=True)
        ]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", s).strip("_") or "x"


def build_report(
    folders: Sequence[str | os.PathLike[str]],
    out_html: str | os.PathLike[str],
    *,
    figures_dir: str | os.PathLike[str] | None = None,
    title: str = "cleihc study report",
) -> ReportSummary:
    """Write the self-contained HTML study report and its figures.

    Parameters
    ----------
    folders : sequence of path
        Results folders of ``cleihc quantify`` (typically one per stain).
    out_html : path
        The report file.
    figures_dir : path, optional
        Where the PNG and SVG figures go; default ``<out_html without suffix>_figures`` beside the report.
    title : str

    Returns
    -------
    ReportSummary
    """
    if not folders:
        raise CleihcError("no results folders given; pass the --out folder(s) of `cleihc quantify`")
    out_html = Path(out_html)
    fig_dir = Path(figures_dir) if figures_dir is not None else out_html.with_name(out_html.stem + "_figures")
    data = load_results(folders)
    regions = data.regions
    figures: list[Path] = []
    sections: list[tuple[str, str, str]] = []  # (id, heading, html)

    n_slides = len(data.records)
    corrected = (
        regions["corrected"].fillna(False).astype(bool)
        if "corrected" in regions.columns
        else pd.Series(False, index=regions.index)
    )
    n_corr = int(corrected.sum())
    warnings = [
        (rec.get("slide"), w)
        for rec in data.records
        for w in ((rec.get("provenance") or {}).get("warnings") or [])
    ]
    stains = (
        sorted(regions["stain"].astype(str).unique()) if "stain" in regions.columns and len(regions) else []
    )

    # ---- summary
    versions = sorted({str(r.get("cleihc_version")) for r in data.records if r.get("cleihc_version")})
    protocols = (
        sorted(
            {
                f"{r.get('stain')} ({r.get('protocol')}, sha256 {str(r.get('protocol_sha256'))[:12]}…)"
                for _, r in regions.drop_duplicates(["stain", "protocol_sha256"]).iterrows()
            }
        )
        if len(regions) and {"stain", "protocol_sha256"} <= set(regions.columns)
        else []
    )
    stat = (
        '<div class="stats">'
        f'<div class="stat"><b>{n_slides}</b>slides measured</div>'
        f'<div class="stat"><b class="{"bad" if len(data.failures) else "ok"}">{len(data.failures)}</b>failures</div>'
        f'<div class="stat"><b>{len(stains)}</b>stains</div>'
        f'<div class="stat"><b class="{"warn" if warnings else "ok"}">{len(warnings)}</b>warnings</div>'
        f'<div class="stat"><b>{n_corr}</b>rows with manual corrections</div></div>'
    )
    meta_cols = [c for c in _METADATA if c in regions.columns]
    subj = f"<p>{regions['subject'].nunique()} subjects.</p>" if "subject" in regions.columns else ""
    summary = (
        stat
        + subj
        + "<p>Results folders: "
        + ", ".join(f"<code>{_e(f)}</code>" for f in data.folders)
        + "</p><p>Protocols: "
        + ("; ".join(_e(p) for p in protocols) or "none")
        + "</p><p>cleihc versions of the results: "
        + (_e(", ".join(versions)) or "unknown")
        + f"; report made by cleihc {_e(__version__)}.</p>"
    )
    sections.append(("summary", "Summary", summary))

    # ---- failures
    if len(data.failures):
        fail_html = _table(
            data.failures[[c for c in ("slide", "reason", "path", "folder") if c in data.failures.columns]],
            row_class=pd.Series(["fail"] * len(data.failures)),
        )
    else:
        fail_html = '<p class="ok">No slide failed.</p>'
    sections.append(("failures", f"Failures ({len(data.failures)})", fail_html))

    # ---- per-stain plots
    plot_html = []
    for stain in stains:
        df = regions[regions["stain"].astype(str) == stain]
        metric = key_metric(df)
        if metric is None:
            continue
        plot_html.append(f"<h3>{_e(stain)} — {_e(metric)}</h3>")
        for kind, fn in (("paired", plot_paired), ("regions", plot_by_region)):
            label = "per subject, by timepoint" if kind == "paired" else "by region"
            fig = fn(df, metric, title=f"{stain}: {metric} {label}")
            if fig is None:
                if kind == "paired":
                    plot_html.append(
                        "<p>No per-subject plot: the rows carry no subject and timepoint with two or more "
                        "timepoints (use --name-pattern or --samples at quantify time).</p>"
                    )
                continue
            paths, uri = _save(fig, fig_dir / f"{_slug(stain)}_{kind}")
            figures += paths
            plot_html.append(f'<img class="fig" alt="{_e(stain)} {label}" src="{uri}">')
    sections.append(("plots", "Per-stain plots", "".join(plot_html) or "<p>No measured rows.</p>"))

    # ---- drift and background
    drift = data.drift
    if len(drift):
        fig = plot_drift(drift)
        paths, uri = _save(fig, fig_dir / "stain_drift_background")
        figures += paths
        wide = drift.pivot_table(index="slide", columns="stain_name", values="drift_deg", aggfunc="first")
        wide.columns = [f"drift_{c}_deg" for c in wide.columns]
        bg = drift.drop_duplicates("slide").set_index("slide")[
            ["protocol", "background_r", "background_g", "background_b", "reference"]
        ]
        tab = bg.join(wide).reset_index()
        drift_html = f'<img class="fig" alt="stain drift and background" src="{uri}">' + _table(tab)
    else:
        drift_html = "<p>No stain vectors recorded.</p>"
    sections.append(("drift", "Stain-vector drift and background", drift_html))

    # ---- warnings
    if warnings:
        wdf = pd.DataFrame(warnings, columns=["slide", "warning"])
        warn_html = _table(wdf)
    else:
        warn_html = '<p class="ok">No warnings.</p>'
    sections.append(("warnings", f"Warnings ({len(warnings)})", warn_html))

    # ---- QC thumbnails
    from cleihc.corrections import review_status

    cards = []
    reviews: dict[str, dict[str, dict[str, str]]] = {}  # per folder: slide -> review state
    for rec in data.records:
        slide = str(rec.get("slide"))
        if rec["_folder"] not in reviews:
            in_folder = [str(r.get("slide")) for r in data.records if r["_folder"] == rec["_folder"]]
            reviews[rec["_folder"]] = review_status(rec["_folder"], slides=in_folder)
        review = reviews[rec["_folder"]][slide]
        qc = Path(rec["_folder"]) / "qc" / f"{slide}.png"
        uri = _thumbnail_uri(qc) if qc.is_file() else None
        rows = rec.get("rows") or []
        stain = rows[0].get("stain", "") if rows else ""
        meta = rec.get("metadata") or {}
        meta_txt = ", ".join(f"{k} {v}" for k, v in meta.items())
        tissue = next((r for r in rows if r.get("region") == "tissue"), rows[0] if rows else {})
        metric = next(
            (m for m in ("positive_area_percent", "positive_cells_per_mm2") if tissue.get(m) is not None),
            None,
        )
        value = f"{metric} {_fmt(tissue.get(metric))} ({tissue.get('region')})" if metric else ""
        nwarn = len((rec.get("provenance") or {}).get("warnings") or [])
        corr = any(bool(r.get("corrected")) for r in rows)
        img = f'<img alt="QC {_e(slide)}" src="{uri}">' if uri else '<p class="bad">QC image missing</p>'
        cards.append(
            f'<div class="card" id="slide-{_e(_slug(slide))}">{img}<h4>{_e(slide)}</h4>'
            f"<p>{_e(stain)}{' · ' + _e(meta_txt) if meta_txt else ''}</p><p>{_e(value)}</p>"
            + (f'<p class="warn">{nwarn} warning(s)</p>' if nwarn else "")
            + ('<p class="warn">manually corrected</p>' if corr else "")
            + _review_html(review)
            + "</div>"
        )
    legend = (
        '<p class="legend">Overlays: <span style="background:#00aa00"></span>tissue'
        '<span style="background:#e68c00"></span>epidermis<span style="background:#0078dc"></span>dermis'
        '<span style="background:#e60028"></span>positive stain (tint) and positive cells'
        '<span style="background:#003cc8"></span>negative cells</p>'
    )
    sections.append(
        ("qc", f"QC images ({n_slides})", legend + '<div class="cards">' + "".join(cards) + "</div>")
    )

    # ---- metrics table
    if len(regions):
        lead = [*meta_cols, "slide", "stain", "region"]
        if "corrected" in regions.columns:
            lead.append("corrected")
        skip = {"path", "protocol", "protocol_sha256", "folder", *lead}
        numeric = [c for c in regions.columns if c not in skip]
        tab = regions[[c for c in lead if c in regions.columns] + numeric]
        tab = tab.sort_values([c for c in ("stain", "slide", "region") if c in tab.columns], kind="stable")
        cls = corrected.loc[tab.index].map(lambda b: "corrected" if b else "")
        note = (
            f"<p>{n_corr} row(s) carry manual corrections (highlighted).</p>"
            if n_corr
            else "<p>No manual corrections.</p>"
        )
        metrics_html = (
            note
            + '<div class="scroll">'
            + _table(tab.reset_index(drop=True), row_class=cls.reset_index(drop=True))
            + "</div>"
        )
    else:
        metrics_html = "<p>No measured rows.</p>"
    sections.append(("metrics", "All metrics", metrics_html))

    # ---- validation, when `cleihc validate` wrote its tables into a results folder
    val_html = []
    for folder in data.folders:
        agree_csv, det_csv = folder / "validation" / "agreement.csv", folder / "validation" / "detection.csv"
        parts = []
        try:
            if agree_csv.is_file():
                a = pd.read_csv(agree_csv)
                cols = ["metric", "region", "n", "bias", "loa_lower", "loa_upper", "icc_2_1", "ccc"]
                parts.append(_table(a.loc[a["region"] == "all", [c for c in cols if c in a.columns]]))
            if det_csv.is_file():
                d = pd.read_csv(det_csv)
                cols = ["label", "n_truth", "n_detected", "precision", "recall", "f1", "mean_distance_um"]
                parts.append(_table(d.loc[d["slide"] == "ALL", [c for c in cols if c in d.columns]]))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, KeyError, UnicodeDecodeError) as exc:
            log.warning("%s: validation tables unreadable (%s)", folder, exc)
            continue
        if parts:
            val_html.append(f"<h3><code>{_e(folder)}</code></h3>" + "".join(parts))
    if val_html:
        intro = (
            "<p>From <code>cleihc validate</code> (validation/ in the results folder): Bland–Altman bias and 95 % "
            "limits of agreement, ICC(2,1) (absolute agreement), Lin's CCC, and detection of truth points.</p>"
        )
        sections.append(("validation", "Validation", intro + "".join(val_html)))

    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{sid}">{_e(h)}</a>' for sid, h, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(h)}</h2>{content}</section>' for sid, h, content in sections)
    doc = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><p>{n_slides} slides · {len(stains)} stains · made {now} by cleihc "
        f"{_e(__version__)}</p></header><nav>{nav}</nav><main>{body}</main></body></html>\n"
    )
    with atomic_write(out_html) as f:
        f.write(doc.encode("utf-8"))
    return ReportSummary(out_html, tuple(figures), n_slides, len(data.failures), n_corr)
