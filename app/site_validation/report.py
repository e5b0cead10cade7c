"""`report.html`: one self-contained page, every picture an inline SVG drawn here.

Inline SVG rather than matplotlib PNGs: the tool runs in the serving install, which has no
matplotlib (that is a training dependency), and SVG keeps the page one small text file that any
browser on an air-gapped network opens, with no outside URL and nothing to decode.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

W, H, PAD = 420, 320, 44
COLOURS = {
    "served": "#888888",
    "site": "#1f6fb4",
    "cv": "#d9541e",
    "NORMAL": "#2a9d5c",
    "PNEUMONIA": "#c23b3b",
}


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100.0 * value:.{digits}f}%"


def _ci(interval: Sequence[float] | None) -> str:
    return "" if not interval else f" ({_pct(interval[0])} to {_pct(interval[1])})"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


class _Axes:
    """A unit-square plot area in an SVG of W x H pixels."""

    def __init__(
        self, title: str, xlabel: str, ylabel: str, ymax: float = 1.0, sqrt_y: bool = False
    ) -> None:
        self.parts: list[str] = []
        self.ymax = ymax
        # a square-root count axis, so that a class piled up at 0 or 1 does not flatten the rest
        self.sqrt_y = sqrt_y
        self.title = title
        x0, y0, x1, y1 = PAD, 24, W - 12, H - PAD
        self.box = (x0, y0, x1, y1)
        self.parts.append(
            f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="#fff" '
            'stroke="#333"/>'
        )
        for i in range(6):
            t = i / 5
            value = t * t * ymax if sqrt_y else t * ymax
            x, y = self.x(t), self.y(value)
            label = f"{t:.1f}" if ymax == 1.0 else f"{value:.0f}"
            self.parts.append(
                f'<line x1="{x}" y1="{y1}" x2="{x}" y2="{y1 + 4}" stroke="#333"/>'
                f'<text x="{x}" y="{y1 + 16}" font-size="10" text-anchor="middle">{t:.1f}</text>'
                f'<line x1="{x0 - 4}" y1="{y}" x2="{x0}" y2="{y}" stroke="#333"/>'
                f'<text x="{x0 - 6}" y="{y + 3}" font-size="10" text-anchor="end">{label}</text>'
            )
        self.parts.append(
            f'<text x="{(x0 + x1) / 2}" y="{H - 8}" font-size="11" text-anchor="middle">'
            f"{_esc(xlabel)}</text>"
            f'<text x="12" y="{(y0 + y1) / 2}" font-size="11" text-anchor="middle" '
            f'transform="rotate(-90 12 {(y0 + y1) / 2})">{_esc(ylabel)}</text>'
            f'<text x="{(x0 + x1) / 2}" y="16" font-size="12" font-weight="bold" '
            f'text-anchor="middle">{_esc(title)}</text>'
        )

    def x(self, v: float) -> float:
        x0, _, x1, _ = self.box
        return round(x0 + v * (x1 - x0), 2)

    def y(self, v: float) -> float:
        _, y0, _, y1 = self.box
        share = (v / self.ymax) ** 0.5 if self.sqrt_y else v / self.ymax
        return round(y1 - share * (y1 - y0), 2)

    def line(self, xs: Sequence[float], ys: Sequence[float], colour: str, dash: str = "") -> None:
        points = " ".join(f"{self.x(a)},{self.y(b)}" for a, b in zip(xs, ys, strict=True))
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(
            f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{extra}/>'
        )

    def dots(
        self, xs: Sequence[float], ys: Sequence[float], sizes: Sequence[float], colour: str
    ) -> None:
        for a, b, r in zip(xs, ys, sizes, strict=True):
            self.parts.append(
                f'<circle cx="{self.x(a)}" cy="{self.y(b)}" r="{r:.1f}" fill="{colour}" '
                'fill-opacity="0.75"/>'
            )

    def marker(self, a: float, b: float, colour: str) -> None:
        self.parts.append(
            f'<circle cx="{self.x(a)}" cy="{self.y(b)}" r="5" fill="none" stroke="{colour}" '
            'stroke-width="2.5"/>'
        )

    def vline(self, a: float, colour: str, label: str, row: int) -> None:
        _, y0, _, y1 = self.box
        self.parts.append(
            f'<line x1="{self.x(a)}" y1="{y0}" x2="{self.x(a)}" y2="{y1}" stroke="{colour}" '
            f'stroke-width="2" stroke-dasharray="5,3"/><text x="{self.x(a) - 4}" '
            f'y="{y0 + 14 + 13 * row}" font-size="10" text-anchor="end" fill="{colour}">'
            f"{_esc(label)}</text>"
        )

    def legend(self, entries: Sequence[tuple[str, str]], corner: str = "lower right") -> None:
        x0, y0, x1, y1 = self.box
        left = {"upper left": x0 + 8, "upper middle": (x0 + x1) / 2 + 10}.get(corner, x1 - 250)
        for i, (colour, text) in enumerate(entries):
            if corner == "upper middle":  # below the threshold lines' labels
                y = y0 + 46 + 14 * i
            elif corner == "upper left":
                y = y0 + 16 + 14 * i
            else:
                y = y1 - 12 - 14 * (len(entries) - 1 - i)
            self.parts.append(
                f'<rect x="{left}" y="{y - 8}" width="10" height="10" fill="{colour}"/>'
                f'<text x="{left + 14}" y="{y + 1}" font-size="10">{_esc(text)}</text>'
            )

    def svg(self, ident: str) -> str:
        return (
            f'<svg id="{ident}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" role="img" aria-label="{_esc(self.title)}" '
            f'font-family="sans-serif">{"".join(self.parts)}</svg>'
        )


def roc_svg(figures: dict[str, Any]) -> str:
    auc = figures["auc"]
    axes = _Axes(f"ROC, AUC {_num(auc['value'])}", "1 - specificity", "sensitivity")
    axes.line([0, 1], [0, 1], "#bbb", "4,4")
    axes.line(figures["roc"]["fpr"], figures["roc"]["tpr"], COLOURS["site"])
    legend = [(COLOURS["site"], "served probability")]
    for key, colour, label in (
        ("at_shipped_threshold", COLOURS["served"], "shipped threshold"),
        (None, COLOURS["cv"], "site threshold (in-sample)"),
    ):
        at = figures[key] if key else figures["at_site_threshold"]["in_sample"]
        if at["specificity"] is not None and at["sensitivity"] is not None:
            axes.marker(1 - at["specificity"], at["sensitivity"], colour)
            rates = f"sens. {_pct(at['sensitivity'])}, spec. {_pct(at['specificity'])}"
            legend.append((colour, f"{label}: {rates}"))
    axes.legend(legend)
    return axes.svg("roc")


def reliability_svg(figures: dict[str, Any]) -> str:
    axes = _Axes("Reliability", "mean predicted probability", "observed frequency")
    axes.line([0, 1], [0, 1], "#bbb", "4,4")
    series = [
        ("served", COLOURS["served"], "served (before)"),
        ("site_in_sample", COLOURS["site"], "recalibrated, in-sample"),
        ("site_cross_validated", COLOURS["cv"], "recalibrated, cross-validated"),
    ]
    legend = []
    total = max(figures["counts"]["images"], 1)
    for key, colour, label in series:
        bins = figures["reliability"].get(key)
        if not bins:
            continue
        xs = [b["mean_predicted"] for b in bins]
        ys = [b["observed"] for b in bins]
        axes.line(xs, ys, colour)
        axes.dots(xs, ys, [2.0 + 10.0 * (b["n"] / total) ** 0.5 for b in bins], colour)
        ece = figures["ece"].get(key)
        legend.append((colour, f"{label}, ECE {_num(ece)}"))
    axes.legend(legend, corner="upper left")
    return axes.svg("reliability")


def histogram_svg(figures: dict[str, Any], scale: str) -> str:
    hist = figures["histograms"][scale]
    bins = len(hist["NORMAL"])
    peak = max(max(hist["NORMAL"]), max(hist["PNEUMONIA"]), 1)
    title = "Served probability by class" if scale == "served" else "Site probability by class"
    axes = _Axes(
        title, "probability of pneumonia", "images (square-root scale)", float(peak), sqrt_y=True
    )
    width = 1.0 / bins
    for class_name, offset in (("NORMAL", 0.0), ("PNEUMONIA", 0.5)):
        for i, count in enumerate(hist[class_name]):
            if count:
                x = axes.x(i * width + offset * width)
                y = axes.y(count)
                axes.parts.append(
                    f'<rect x="{x}" y="{y}" width="{round(axes.x(width / 2) - axes.x(0), 2)}" '
                    f'height="{round(axes.y(0) - y, 2)}" fill="{COLOURS[class_name]}" '
                    'fill-opacity="0.8"/>'
                )
    site = figures["site_threshold"]
    if scale == "served":
        axes.vline(figures["shipped_threshold"], COLOURS["served"], "shipped", 0)
        axes.vline(site["served_equivalent"], COLOURS["cv"], "site", 1)
    else:
        axes.vline(site["threshold"], COLOURS["cv"], "site", 1)
    axes.legend(
        [(COLOURS["NORMAL"], "NORMAL"), (COLOURS["PNEUMONIA"], "PNEUMONIA")], corner="upper middle"
    )
    return axes.svg(f"histogram-{scale}")


def confusion_svg(counts: dict[str, int], title: str, ident: str) -> str:
    cell, x0, y0 = 90, 110, 50
    total = max(sum(counts.values()), 1)
    parts = [
        f'<text x="{x0 + cell}" y="18" font-size="12" font-weight="bold" text-anchor="middle">'
        f"{_esc(title)}</text>",
        f'<text x="{x0 + cell}" y="38" font-size="11" text-anchor="middle">answer</text>',
    ]
    layout = [("tn", 0, 0), ("fp", 1, 0), ("fn", 0, 1), ("tp", 1, 1)]
    for key, col, row in layout:
        share = counts[key] / total
        correct = key in ("tn", "tp")
        fill = f"rgba({'31,111,180' if correct else '194,59,59'},{0.15 + 0.85 * share:.2f})"
        x, y = x0 + col * cell, y0 + row * cell
        parts.append(
            f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}" stroke="#333"/>'
            f'<text x="{x + cell / 2}" y="{y + cell / 2}" font-size="18" text-anchor="middle">'
            f'{counts[key]}</text><text x="{x + cell / 2}" y="{y + cell / 2 + 18}" '
            f'font-size="10" text-anchor="middle">{key.upper()}</text>'
        )
    for i, name in enumerate(("NORMAL", "PNEUMONIA")):
        parts.append(
            f'<text x="{x0 + cell * i + cell / 2}" y="{y0 - 2}" font-size="10" '
            f'text-anchor="middle">{name}</text><text x="{x0 - 6}" y="{y0 + cell * i + cell / 2}" '
            f'font-size="10" text-anchor="end">label {name}</text>'
        )
    width, height = x0 + 2 * cell + 10, y0 + 2 * cell + 10
    return (
        f'<svg id="{ident}" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" '
        f'font-family="sans-serif">{"".join(parts)}</svg>'
    )


def _rates_rows(entries: Sequence[tuple[str, dict[str, Any] | None]]) -> str:
    rows = []
    for label, at in entries:
        if at is None:
            continue
        ci = at.get("ci95") or {}
        cells = "".join(
            f"<td>{_pct(at[name])}<br><small>{_ci(ci.get(name))}</small></td>"
            for name in ("sensitivity", "specificity", "ppv", "npv")
        )
        rows.append(f"<tr><th>{_esc(label)}</th>{cells}</tr>")
    return (
        "<table><tr><th></th><th>sensitivity</th><th>specificity</th><th>PPV</th><th>NPV</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _subgroups_html(subgroups: dict[str, list[dict[str, Any]]]) -> str:
    if not subgroups:
        return "<p>No subgroups: no nested folders, file-name subtypes or DICOM headers.</p>"
    out = []
    for key, rows in subgroups.items():
        body = "".join(
            f"<tr><td>{_esc(r['value'])}</td><td>{r['images']}</td><td>{r['positive']}</td>"
            f"<td>{r['negative']}</td><td>{_num(r.get('auc'))}</td>"
            f"<td>{_pct(r.get('sensitivity'))}</td><td>{_pct(r.get('specificity'))}</td>"
            f"<td>{_pct(r.get('sensitivity_cv'))}</td><td>{_pct(r.get('specificity_cv'))}</td></tr>"
            for r in rows
        )
        out.append(
            f"<h3>{_esc(key)}</h3><table><tr><th>value</th><th>images</th><th>pneumonia</th>"
            "<th>normal</th><th>AUC</th><th>sensitivity</th><th>specificity</th>"
            "<th>sensitivity (CV)</th><th>specificity (CV)</th></tr>" + body + "</table>"
        )
    return "".join(out) + (
        "<p><small>Rates at the site threshold; subgroups under 5 images are counted only. "
        "Small subgroups have wide uncertainty: read them as pointers, not findings.</small></p>"
    )


def _refused_html(refused: list[dict[str, Any]], codes: dict[str, int]) -> str:
    if not refused:
        return "<p>Every image was answered.</p>"
    summary = ", ".join(f"<code>{_esc(c)}</code>: {n}" for c, n in sorted(codes.items()))
    rows = "".join(
        f"<tr><td>{_esc(r['file'])}</td><td>{_esc(r['label'])}</td><td>{r['status']}</td>"
        f"<td><code>{_esc(r['error_code'])}</code></td></tr>"
        for r in refused[:500]
    )
    more = (
        f"<p>... and {len(refused) - 500} more (see results.json).</p>"
        if len(refused) > 500
        else ""
    )
    return (
        f"<p>{len(refused)} images were refused or failed ({summary}); they are left out of every "
        "figure above. A refused image at go-live gets no answer, so these are cases the service "
        "would not screen.</p><table><tr><th>file</th><th>label</th><th>HTTP status</th>"
        f"<th>error code</th></tr>{rows}</table>{more}"
    )


def _split_html(split: dict[str, Any] | None) -> str:
    if not split:
        return (
            "<p>Not run. <code>--evaluate-split</code> fits a profile on half the patients and "
            "checks it on the other half.</p>"
        )
    if "skipped" in split:
        return f"<p>Not possible: {_esc(split['skipped'])}</p>"
    h = split["held_out"]
    acceptance = split["acceptance"]
    checks = "".join(
        f"<li>{_esc(c['name'])}: {_num(c['value'])} (needs {c['rule']}) - "
        f"<b>{'met' if c['met'] else 'MISSED'}</b></li>"
        for c in acceptance["checks"]
    )
    repeats = split.get("repeats")
    repeat_text = ""
    if repeats:
        repeat_text = (
            f"<p>Over {repeats['n']} different random halvings: ECE {_num(repeats['ece']['min'])}"
            f" to {_num(repeats['ece']['max'])}, sensitivity {_pct(repeats['sensitivity']['min'])}"
            f" to {_pct(repeats['sensitivity']['max'])}, specificity "
            f"{_pct(repeats['specificity']['min'])} to {_pct(repeats['specificity']['max'])}; all "
            f"three checks met in {repeats['all_met']} of {repeats['n']}.</p>"
        )
    return (
        f"<p>Profile fitted on {split['fitted_on']['images']} images of "
        f"{split['fitted_on']['patients']} patients, checked on the other {h['images']} images of "
        f"{h['patients']} patients: the served answers of the held-out half passed through "
        f"<code>profile.apply</code>.</p><ul>{checks}</ul>"
        + _rates_rows([("held-out half", h)])
        + repeat_text
    )


CSS = """
body{font-family:sans-serif;max-width:1180px;margin:1em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right;vertical-align:top}th:first-child,td:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:12px}.verdict{padding:.8em 1em;border-left:6px solid #1f6fb4;
background:#f2f6fa}.verdict.fail{border-color:#c23b3b;background:#fbf1f1}small{color:#555}
.disclaimer{color:#555;font-size:.9em}
"""


def render(results: dict[str, Any]) -> str:
    """The whole page from the results document (`results.json`'s content)."""
    f = results["figures"]
    model = results["model"]
    site = f["site_threshold"]
    recal = f["recalibration"]
    at_site = f["at_site_threshold"]
    verdict = results["verdict"]
    counts = f["counts"]
    cv_note = (
        f"{f['cross_validation']['folds']}-fold, by patient"
        if "folds" in f["cross_validation"] and "skipped" not in f["cross_validation"]
        else _esc(f["cross_validation"].get("skipped", "not run"))
    )
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>Site validation: {_esc(results['name'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Site validation: {_esc(results['name'])}</h1>",
        f"<p>Model <b>{_esc(model['name'])} {_esc(model['version'])}</b>, sha256 "
        f"<code>{_esc(model['sha256'])}</code>. {counts['images']} answered images of "
        f"{counts['patients']} patients ({counts['positive_images']} pneumonia, "
        f"{counts['negative_images']} normal), {results['data']['n_refused']} refused; "
        f"{_esc(results['data']['kind'])} folder, scored {_esc(results['created'])} through "
        f"{_esc(results['served_by'])}.</p>",
        f'<div class="verdict{"" if verdict["meets_target"] else " fail"}" id="verdict">'
        f'<h2 style="margin-top:0;border:0">Verdict</h2><p>{_esc(verdict["summary"])}</p><ul>'
        + "".join(f"<li>{_esc(c)}</li>" for c in verdict["caveats"])
        + "</ul></div>",
        '<h2>Discrimination and calibration</h2><div class="figs">',
        roc_svg(f),
        reliability_svg(f),
        "</div>",
        f"<p>AUC {_num(f['auc']['value'])}{_ci_num(f['auc']['ci95'])}. Recalibration: "
        f"<b>{_esc(recal['method'])}</b>, p' = sigmoid({_num(recal['slope'])} * logit(p) + "
        f"{_num(recal['intercept'])}); {_esc(recal['reason'])}. Log loss "
        f"{_num(f['log_loss']['served'])} before, {_num(f['log_loss']['site_in_sample'])} after."
        "</p>",
        "<h2>Operating points</h2>",
        f"<p>Shipped threshold {_num(f['shipped_threshold'])} on the served probability. Site "
        f"threshold {_num(site['threshold'], 4)} on the recalibrated probability (served "
        f"probability {_num(site['served_equivalent'], 4)}): the most specific threshold whose "
        f"sensitivity keeps a one-sided {_pct(site['confidence'], 0)} Clopper-Pearson lower bound "
        f"of at least {_pct(site['target_sensitivity'], 0)} ({site['positives_called']} of "
        f"{site['positives']} pneumonia images called; bound {_pct(site['lower_bound'])})"
        + ("" if site["met"] else ". TOO FEW PNEUMONIA CASES for that bound: every one is called")
        + f". Cross-validation: {cv_note}.</p>",
        '<div class="figs">',
        confusion_svg(
            f["at_shipped_threshold"]["confusion"], "At the shipped threshold", "confusion-shipped"
        ),
        confusion_svg(
            at_site["in_sample"]["confusion"], "At the site threshold (in-sample)", "confusion-site"
        ),
        "</div>",
        _rates_rows(
            [
                ("shipped threshold", f["at_shipped_threshold"]),
                ("site threshold, in-sample", at_site["in_sample"]),
                ("site threshold, cross-validated", at_site.get("cross_validated")),
            ]
        ),
        "<p><small>95% percentile intervals from resampling patients "
        f"({f['bootstrap']['resamples']} resamples). PPV and NPV hold for this data's prevalence "
        f"({_pct(counts['positive_images'] / max(counts['images'], 1))} pneumonia) only."
        "</small></p>",
        '<h2>Scores by class</h2><div class="figs">',
        histogram_svg(f, "served"),
        histogram_svg(f, "site"),
        "</div>",
        "<h2>Split-half check</h2>",
        _split_html(results.get("split_half")),
        "<h2>Subgroups</h2>",
        _subgroups_html(f["subgroups"]),
        "<h2>Refused and failed images</h2>",
        _refused_html(results["refused"], results["refused_codes"]),
        "<h2>Notes on the data</h2><ul>"
        + "".join(f"<li>{_esc(n)}</li>" for n in results["data"]["notes"])
        + "</ul>",
        f'<p class="disclaimer">{_esc(results["disclaimer"])}</p></body></html>',
    ]
    return "\n".join(parts)


def _ci_num(interval: Sequence[float] | None) -> str:
    return "" if not interval else f" (95% CI {interval[0]:.3f} to {interval[1]:.3f})"
