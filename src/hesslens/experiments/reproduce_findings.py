"""The paper's five findings, each checked against what ``hesslens reproduce`` measured, with
a rule that could fail.

Every check returns a :class:`Finding`: the claim, a verdict (``"held"``, ``"partly"``,
``"did not hold"``, ``"not shown"``, ``"not measured"``), the numbers behind it, the rule
that turned the numbers into the verdict (with its threshold and its interval or p-value),
and the headline interval / p-value themselves, so that a reader can disagree with the rule
and still use the numbers; ``title`` names the finding in a few words and ``summary`` is the
one sentence the report shows beside the verdict, with the number that decided it and its
95 % interval. Intervals are 95 %: over seeds x probes by a two-level bootstrap
(:func:`hesslens.analysis.intervals.cluster_bootstrap`), over seeds by Student's t, between
arms paired by seed.

Example:
    >>> f = Finding("claim", "held", "rule", "numbers", interval=(0.1, 0.3), setting="D")
    >>> f.verdict, f.to_dict()["interval"], f.sentence()
    ('held', [0.1, 0.3], 'D: 95 % interval [0.1, 0.3].')
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hesslens.analysis.intervals import (
    cluster_bootstrap,
    difference_interval,
    sign_test,
    t_interval,
)
from hesslens.analysis.probe_spectra import (
    BULK_WIDTH,
    ProbeSpectra,
    bulk_mass,
    heterogeneity,
    log_spread,
)
from hesslens.curvature.layers import middle_indices

__all__ = [
    "VERDICTS",
    "Finding",
    "curvature_falls",
    "edge_of_stability",
    "edge_run",
    "gauss_newton_close",
    "htr_helps",
    "layer_spectra_like_full",
    "middle_layers_most_similar",
    "middle_minus_outer",
    "seed_probe_interval",
    "transformer_blocks",
]

VERDICTS = ("held", "partly", "did not hold", "not shown", "not measured")
LEVEL = 0.95


@dataclass(frozen=True)
class Finding:
    """One checked claim: verdict, rule (threshold and interval / p-value it used), numbers;
    ``interval`` and ``p_value`` are the headline statistic's, ``setting`` says on what;
    ``title`` is the claim in a few words, ``summary`` one sentence with the deciding number
    and its 95 % interval."""

    claim: str
    verdict: str
    rule: str
    numbers: str
    interval: tuple[float, float] | None = None
    p_value: float | None = None
    setting: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    title: str = ""
    summary: str = ""

    def sentence(self) -> str:
        """``summary``, or, for a finding built without one, its headline interval (and
        p-value) as a sentence."""
        if self.summary:
            return self.summary
        parts = []
        if self.interval is not None and not any(math.isnan(x) for x in self.interval):
            parts.append(f"95 % interval [{self.interval[0]:.3g}, {self.interval[1]:.3g}]")
        if self.p_value is not None and not math.isnan(self.p_value):
            parts.append(f"p = {self.p_value:.3g}")
        if not parts:
            return self.numbers.split(". ")[0].rstrip(".") + "." if self.numbers else "–"
        return (f"{self.setting}: " if self.setting else "") + ", ".join(parts) + "."

    def to_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "title": self.title, "verdict": self.verdict,
                "summary": self.sentence(), "rule": self.rule, "numbers": self.numbers,
                "interval": None if self.interval is None else [float(x) for x in self.interval],
                "p_value": self.p_value, "setting": self.setting, "details": self.details}


def _ci(m: float, lo: float, hi: float, fmt: str = ".3g") -> str:
    if math.isnan(lo):
        return f"{m:{fmt}} (one unit: no interval)"
    return f"{m:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _probes(d: Mapping[str, Any] | ProbeSpectra) -> ProbeSpectra:
    return d if isinstance(d, ProbeSpectra) else ProbeSpectra.from_dict(d)


def _by_seed(runs: Mapping[Any, Any] | None) -> list[ProbeSpectra]:
    return [_probes(v) for _, v in sorted((runs or {}).items(), key=lambda kv: str(kv[0]))]


def seed_probe_interval(units: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """Mean and 95 % interval of ``units[seed][probe]``: the two-level bootstrap with two or
    more seeds, Student's t over the probes with one.

    >>> m, lo, hi = seed_probe_interval([[1.0, 2.0, 3.0]])
    >>> m, round(lo, 3), round(hi, 3)
    (2.0, -0.484, 4.484)
    """
    if len(units) == 1:
        return t_interval(units[0], LEVEL)
    return cluster_bootstrap(units, LEVEL)


# ---------------------------------------------------------------------- finding 1
def _shape_stats(states: list[ProbeSpectra]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """``{entry: {"bulk": (m, lo, hi), "outliers": (m, lo, hi)}}`` over seeds x probes."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for entry in ["full", *states[0].names]:
        bulk = [ps.bulk_masses()[entry] for ps in states]
        count = [ps.outlier_counts()[entry] for ps in states]
        out[entry] = {"bulk": seed_probe_interval(bulk), "outliers": seed_probe_interval(count)}
    return out


def _passes(stats: dict[str, dict[str, tuple[float, float, float]]], num_classes: int
            ) -> tuple[bool, bool]:
    """(bulk part, outlier part) of finding 1's rule on one network state."""
    def low(t: tuple[float, float, float]) -> float:
        return t[0] if math.isnan(t[1]) else t[1]

    def high(t: tuple[float, float, float]) -> float:
        return t[0] if math.isnan(t[2]) else t[2]

    bulk = all(low(s["bulk"]) >= 0.5 for s in stats.values())
    few = all(low(s["outliers"]) >= num_classes / 2 and high(s["outliers"]) <= 2 * num_classes
              for s in stats.values())
    return bulk, few


def layer_spectra_like_full(study: Mapping[str, Any] | None, trained: Mapping[Any, Any] | None,
                            control: Mapping[Any, Any] | None, num_classes: int,
                            control_name: str = "the same networks at initialisation",
                            num_samples: int | None = None) -> Finding:
    """Finding 1: each layer's spectrum is a bulk near zero plus a few (about C) outliers,
    like the full Hessian's; tested against a control that should fail it.

    Args:
        study: the layer study of the trained model (its W1 numbers are quoted), or None.
        trained, control: ``{seed: ProbeSpectra (or its dict)}`` of the trained networks and
            of the control (e.g. the same architecture at initialisation).
        num_classes: C, the paper's number of outliers.
        num_samples: N, the examples the Hessian averages over (for the rank of G, quoted).
    """
    claim = ("Each layer's Hessian spectrum looks like the full one: a bulk near zero plus a "
             "few outliers (about one per class).")
    rule = (f"bulk: every entry (full and each layer) puts at least 0.5 of its spectral mass "
            f"within {BULK_WIDTH:.0%} of its top eigenvalue of zero (lower end of the 95 % "
            f"interval over seeds x probes); few outliers: every entry's count of eigenvalues "
            f"outside that band, dim x (1 - bulk mass), has its 95 % interval inside "
            f"[C/2, 2C] = [{num_classes / 2:g}, {2 * num_classes:g}] (the paper: about C = "
            f"{num_classes} outliers). Held if the trained networks pass both parts and the "
            f"control ({control_name}) fails the rule; partly if the control passes too (not "
            f"specific) or the trained networks pass the bulk part only; did not hold if they "
            f"fail the bulk part")
    title = "Layer spectra look like the full one"
    if not trained:
        return Finding(claim, "not measured", rule, "no per-probe spectra were measured",
                       title=title, summary="No per-probe spectra were measured.")
    t_states = _by_seed(trained)
    t_stats = _shape_stats(t_states)
    t_bulk, t_few = _passes(t_stats, num_classes)
    c_stats = _shape_stats(_by_seed(control)) if control else None
    c_bulk, c_few = _passes(c_stats, num_classes) if c_stats is not None else (None, None)
    specific = None if c_stats is None else not (c_bulk and c_few)
    numbers = (f"trained ({len(t_states)} seeds x {t_states[0].n_probes} probes): "
               + _describe_shapes(t_stats) + ".")
    if c_stats is not None:
        numbers += f" Control, {control_name}: " + _describe_shapes(c_stats) + "."
        numbers += _control_note(c_bulk, c_few, num_classes, num_samples,
                                 t_states[0].dims["full"])
    if study:
        numbers += (" W1 to the full spectrum of the final model (each scaled by its top "
                    "eigenvalue): " + ", ".join(
                        f"{n} {layer['similarity']['wasserstein']:.3f}"
                        for n, layer in study["layers"].items()) + ".")
    verdict, numbers = _finding1_verdict(t_bulk, t_few, specific, numbers)
    full = t_stats["full"]["outliers"]
    summary = _finding1_sentence(t_stats, c_stats, t_bulk, t_few, specific, num_classes)
    return Finding(claim, verdict, rule, numbers, interval=(full[1], full[2]),
                   setting="outlier count of the full Hessian, trained", title=title,
                   summary=summary,
                   details={"trained": {"bulk": t_bulk, "few_outliers": t_few},
                            "control": None if c_stats is None else
                            {"bulk": c_bulk, "few_outliers": c_few},
                            "specific": specific})


def _describe_shapes(stats: dict[str, dict[str, tuple[float, float, float]]]) -> str:
    """Every entry's bulk mass and outlier count with their intervals."""
    return "; ".join(f"{e}: bulk {_ci(*s['bulk'], '.3f')}, outliers "
                     f"{_ci(*s['outliers'], '.3g')}" for e, s in stats.items())


def _control_note(c_bulk: bool, c_few: bool, num_classes: int, num_samples: int | None,
                  dim: int) -> str:
    """What the control says about the rule's two parts (``""`` when it says nothing)."""
    parts = []
    if c_bulk:
        rank = f"N(C - 1) = {num_samples * (num_classes - 1)}" if num_samples else "N(C - 1)"
        parts.append("the bulk part also holds on the control, so it is not specific to "
                     f"training (on N examples G has rank at most {rank}, below the "
                     f"full network's {dim} parameters: much of any "
                     "spectrum is near zero whatever the weights)")
    if not c_few:
        parts.append("the outlier count separates the trained networks from the control")
    if not parts:
        return ""
    text = "; ".join(parts)
    return " " + text[0].upper() + text[1:] + "."


def _finding1_verdict(t_bulk: bool, t_few: bool, specific: bool | None,
                      numbers: str) -> tuple[str, str]:
    """Finding 1's verdict from the trained networks' two parts and the control's
    specificity, and the numbers with what the verdict rests on said first or last."""
    if not t_bulk:
        return "did not hold", numbers
    if t_few and specific is True:
        return "held", numbers
    if t_few and specific is None:
        return "partly", numbers + " No control was measured, so the rule's specificity is unknown."
    if specific is False:
        numbers = "Not specific: the control passes the same rule. " + numbers
    return "partly", numbers


def _finding1_sentence(t_stats: dict[str, dict[str, tuple[float, float, float]]],
                       c_stats: dict[str, dict[str, tuple[float, float, float]]] | None,
                       t_bulk: bool, t_few: bool, specific: bool | None,
                       num_classes: int) -> str:
    """Finding 1 in one sentence: the trained full Hessian's outlier count and bulk mass, or
    the entry that broke the rule, and the control's count."""
    band = f"[{num_classes / 2:g}, {2 * num_classes:g}]"
    if not t_bulk:
        entry = min(t_stats, key=lambda e: t_stats[e]["bulk"][1] if not math.isnan(
            t_stats[e]["bulk"][1]) else t_stats[e]["bulk"][0])
        return (f"No bulk near zero: {entry} puts {_ci(*t_stats[entry]['bulk'], '.3f')} of its "
                "spectral mass near zero (the rule asks for at least 0.5).")
    if not t_few:
        entry = max(t_stats, key=lambda e: abs(t_stats[e]["outliers"][0] - num_classes))
        return (f"A bulk everywhere, but {entry} has {_ci(*t_stats[entry]['outliers'])} "
                f"outliers (the rule asks for {band}, about C = {num_classes}).")
    full = t_stats["full"]
    text = (f"Trained full Hessian: {_ci(*full['outliers'])} outliers (rule: inside {band}), "
            f"bulk mass {_ci(*full['bulk'], '.3f')} (rule: at least 0.5), every layer alike")
    if c_stats is None:
        return text + "; no control was measured."
    control = _ci(*c_stats["full"]["outliers"])
    return text + (f"; the control has {control} outliers, so the rule separates them."
                   if specific else f"; the control passes too ({control} outliers): not "
                   "specific to training.")


# ---------------------------------------------------------------------- finding 2
def middle_minus_outer(ps: ProbeSpectra) -> list[float]:
    """Per probe: mean W1 of the outer layers minus that of the middle layers (positive:
    the middle layers are closer to the full spectrum)."""
    d = ps.distances()
    middle = list(middle_indices(len(ps.names)))
    outer = [i for i in range(len(ps.names)) if i not in middle]
    if not outer:
        return [math.nan] * d.shape[0]
    return [float(row[outer].mean() - row[middle].mean()) for row in d]


def _setting(name: str, states: list[ProbeSpectra]) -> dict[str, Any]:
    units = [middle_minus_outer(ps) for ps in states]
    m, lo, hi = seed_probe_interval(units)
    names = states[0].names
    middle = [names[i] for i in middle_indices(len(names))]
    best_mid = [int(np.argmin(row)) in set(middle_indices(len(names)))
                for ps in states for row in ps.distances()]
    mean_d = np.mean([ps.distances().mean(axis=0) for ps in states], axis=0)
    return {"name": name, "m": m, "lo": lo, "hi": hi, "middle": middle,
            "best_middle": sum(best_mid), "units": len(best_mid),
            "mean_distances": dict(zip(names, mean_d.tolist())),
            "seeds": len(states), "probes": states[0].n_probes}


def _sided(s: dict[str, Any]) -> int:
    """+1 if the interval is above 0, -1 if below, 0 if it holds 0 (or has no interval)."""
    if math.isnan(s["lo"]):
        return 0
    return 1 if s["lo"] > 0 else -1 if s["hi"] < 0 else 0


def middle_layers_most_similar(settings: Mapping[str, Mapping[Any, Any]],
                               over_epochs: Mapping[int, Mapping[Any, Any]] | None = None
                               ) -> Finding:
    """Finding 2: the middle layers' spectra are the most similar to the full one.

    Args:
        settings: ``{setting name: {seed: ProbeSpectra}}``; the first is the primary one
            (the verdict's), the others must not contradict it.
        over_epochs: ``{epoch: {seed: ProbeSpectra}}`` of the primary setting along training
            (reported, epoch 0 included).
    """
    claim = "The middle layers' spectra are the most similar to the full Hessian's."
    rule = ("per seed and probe, D = mean W1 to the full spectrum of the outer layers minus that "
            "of the middle layers (middle: layers round(n/4) .. round(3n/4) in forward order; "
            "W1 between spectra each scaled by its top eigenvalue); held if the 95 % interval "
            "of D (two-level bootstrap over seeds, then probes) on the first setting lies above "
            "0 and no other setting's lies below 0; partly if it lies above 0 but another "
            "setting's lies below; did not hold if it lies below 0; not shown if it holds 0")
    title = "The middle layers are the most like the whole"
    done = [_setting(name, _by_seed(runs)) for name, runs in settings.items() if runs]
    if not done:
        return Finding(claim, "not measured", rule, "no per-probe spectra were measured",
                       title=title, summary="No per-probe spectra were measured.")
    parts = []
    for s in done:
        order = sorted(s["mean_distances"], key=s["mean_distances"].get)
        parts.append(
            f"{s['name']} ({s['seeds']} seeds x {s['probes']} probes; middle layers "
            f"{', '.join(s['middle'])}): D = {_ci(s['m'], s['lo'], s['hi'])}; the most similar "
            f"layer is a middle one in {s['best_middle']}/{s['units']} seed-probe pairs; "
            "mean W1 by layer, most similar first: "
            + ", ".join(f"{n} {s['mean_distances'][n]:.3g}" for n in order))
    numbers = ". ".join(parts) + "."
    if over_epochs:
        track = []
        for epoch in sorted(over_epochs):
            units = [middle_minus_outer(ps) for ps in _by_seed(over_epochs[epoch])]
            if units:
                track.append(f"epoch {epoch}: {_ci(*seed_probe_interval(units))}")
        numbers += f" D of {done[0]['name']} over training: " + "; ".join(track) + "."
    primary, others = done[0], done[1:]
    side = _sided(primary)
    against = [s["name"] for s in others if _sided(s) < 0]
    if side > 0:
        verdict = "partly" if against else "held"
    elif side < 0:
        verdict = "did not hold"
    else:
        verdict = "not shown"
    if len(primary["middle"]) == 1:
        numbers += f" In {primary['name']} 'the middle' is one layer."
    meaning = {1: "above 0: the middle layers are closer to the whole",
               -1: "below 0: the outer layers are closer",
               0: "it holds 0: no difference shown"}[side]
    summary = (f"On {primary['name']}, D (outer minus middle layers' W1 to the full spectrum) "
               f"= {_ci(primary['m'], primary['lo'], primary['hi'])}, {meaning}"
               + (f"; on {', '.join(against)} it is below 0" if against else "") + ".")
    return Finding(claim, verdict, rule, numbers, interval=(primary["lo"], primary["hi"]),
                   setting=primary["name"], title=title, summary=summary,
                   details={"settings": [{k: v for k, v in s.items()} for s in done]})


# ---------------------------------------------------------------------- finding 3
@dataclass
class _CurvatureChanges:
    """Each seed's change of the full top eigenvalue and trace from its first tracked record
    to its last (``log(last / first)``, and ``log(last / peak)``), and how many per-layer
    quantities fell."""

    log_ratio: dict[str, list[float]] = field(
        default_factory=lambda: {"top_eigenvalue": [], "trace": []})
    from_peak: dict[str, list[float]] = field(
        default_factory=lambda: {"top_eigenvalue": [], "trace": []})
    details: list[str] = field(default_factory=list)
    first_epochs: set[int] = field(default_factory=set)
    layer_fell: int = 0
    layer_total: int = 0


def _curvature_changes(runs: list[dict[str, Any]]) -> _CurvatureChanges:
    """The changes of every run with at least two tracked records (one line of details each)."""
    out = _CurvatureChanges()
    for run in runs:
        tracked = [e for e in run["epochs"] if e.get("trace") is not None
                   and e.get("top_eigenvalue") is not None]
        if len(tracked) < 2:
            continue
        first, last = tracked[0], tracked[-1]
        out.first_epochs.add(first["epoch"])
        for key in out.log_ratio:
            if first[key] > 0 and last[key] > 0:
                out.log_ratio[key].append(math.log(last[key] / first[key]))
                peak = max(e[key] for e in tracked)
                out.from_peak[key].append(math.log(last[key] / peak))
        peak = max(tracked, key=lambda e: e["top_eigenvalue"])
        out.details.append(
            f"seed {run['config']['seed']}: top eigenvalue {first['top_eigenvalue']:.3g} "
            f"(epoch {first['epoch']}) -> peak {peak['top_eigenvalue']:.3g} (epoch "
            f"{peak['epoch']}) -> {last['top_eigenvalue']:.3g} (epoch {last['epoch']}); "
            f"trace {first['trace']:.3g} -> {last['trace']:.3g}")
        for key in ("layer_top_eigenvalue", "layer_trace"):
            a, b = first.get(key) or {}, last.get(key) or {}
            for name in a:
                if name in b:
                    out.layer_total += 1
                    out.layer_fell += b[name] < a[name]
    return out


def curvature_falls(runs: list[dict[str, Any]]) -> Finding:
    """Finding 3: top eigenvalue and trace, full and per layer, fall during training: from
    the epoch-0 record (initialisation) to the last tracked epoch, seed by seed."""
    claim = ("The top eigenvalue and the trace, full and per layer, fall as training goes on "
             "(SGD).")
    rule = ("per seed, the change from the first tracked record (epoch 0: initialisation) to "
            "the last; held if for both the full top eigenvalue and the full trace the 95 % "
            "t-interval over seeds of log(last / first) lies below 0, and at least 3/4 of the "
            "per-layer quantities fell; did not hold if either full quantity's interval lies "
            "above 0 (it rose); partly otherwise. The one-sided sign test of 'fell in every "
            "seed' is reported beside it (with n seeds its smallest p is 0.5^n)")
    changes = _curvature_changes(runs)
    per_key, from_peak = changes.log_ratio, changes.from_peak
    layer_fell, layer_total = changes.layer_fell, changes.layer_total
    n = len(per_key["trace"])
    title = "Curvature falls during training"
    if n == 0:
        return Finding(claim, "not measured", rule, "needs at least two tracked epochs",
                       title=title, summary="Needs at least two tracked epochs.")
    stats: dict[str, dict[str, float]] = {}
    for key, vals in per_key.items():
        m, lo, hi = t_interval(vals, LEVEL)
        fell = sum(v < 0 for v in vals)
        stats[key] = {"m": m, "lo": lo, "hi": hi, "fell": fell, "n": len(vals),
                      "p": sign_test(fell, len(vals))}
    layer_share = layer_fell / layer_total if layer_total else math.nan
    numbers = "; ".join(changes.details) + ". " + "; ".join(
        f"{key.replace('_', ' ')}: log(last/first) = {_ci(s['m'], s['lo'], s['hi'])} "
        f"(x{math.exp(s['m']):.2f}), fell in {s['fell']}/{s['n']} seeds (sign test p = "
        f"{s['p']:.3g}); from its peak: log(last/peak) = "
        f"{_ci(*t_interval(from_peak[key], LEVEL))}" for key, s in stats.items()) + (
        f". Per-layer quantities that fell from the first to the last record: "
        f"{layer_fell}/{layer_total}.")
    if 0 not in changes.first_epochs:
        numbers += " (No epoch-0 record: the first tracked epoch stands for the start.)"

    def falls(s: dict[str, float]) -> bool:
        return not math.isnan(s["hi"]) and s["hi"] < 0

    if all(falls(s) for s in stats.values()) and layer_share >= 0.75:
        verdict = "held"
    elif any(not math.isnan(s["lo"]) and s["lo"] > 0 for s in stats.values()):
        verdict = "did not hold"
    else:
        verdict = "partly"
    top, tr = stats["top_eigenvalue"], stats["trace"]
    summary = (f"From the first to the last record the full top eigenvalue went "
               f"x{math.exp(top['m']):.2f} (log ratio {_ci(top['m'], top['lo'], top['hi'])}, "
               f"fell in {top['fell']}/{top['n']} seeds) and the trace "
               f"x{math.exp(tr['m']):.2f} ({_ci(tr['m'], tr['lo'], tr['hi'])}); "
               f"{layer_fell}/{layer_total} per-layer quantities fell (the rule asks for 75 %).")
    return Finding(claim, verdict, rule, numbers, interval=(top["lo"], top["hi"]),
                   p_value=top["p"], setting="log(last/first) of the full top eigenvalue",
                   title=title, summary=summary,
                   details={k: dict(v) for k, v in stats.items()})


# ---------------------------------------------------------------------- finding 4
def _bound(entry: Mapping[str, Any]) -> float:
    bounds = (entry.get("eigensolver") or {}).get("bounds") or []
    return float(bounds[0]) if bounds and bounds[0] is not None else 0.0


def gauss_newton_close(study: dict[str, Any]) -> Finding:
    """Finding 4: the Gauss-Newton part G of each layer's Hessian has a spectrum close to the
    layer's whole Hessian."""
    claim = ("The Gauss-Newton part G of each layer's Hessian has a spectrum close to the "
             "layer's whole Hessian.")
    rule = ("held if, for the full network and every layer, the interval of "
            "lambda_1(G) / lambda_1(Hessian) from the two eigenvalues' a-posteriori error "
            "bounds lies inside [0.8, 1.25] (within 20 % either way); partly if some do; did "
            "not hold if none do")
    rows = []
    for name, entry in [("full", study["full"]), *study["layers"].items()]:
        gn = entry.get("gauss_newton")
        if not gn or gn.get("gn_top_ratio") is None:
            continue
        h, g = entry["top_eigenvalues"][0], gn["gn"]["top_eigenvalues"][0]
        bh, bg = _bound(entry), _bound(gn["gn"])
        lo = (g - bg) / (h + bh) if h + bh > 0 else math.nan
        hi = (g + bg) / (h - bh) if h - bh > 0 else math.inf
        rows.append((name, gn["gn_top_ratio"], lo, hi,
                     gn["similarity_to_hessian"]["wasserstein"]))
    title = "The Gauss-Newton part is close to the Hessian"
    if not rows:
        return Finding(claim, "not measured", rule, "", title=title,
                       summary="No Gauss-Newton split was measured.")
    close = [r for r in rows if r[2] >= 0.8 and r[3] <= 1.25]
    verdict = ("held" if len(close) == len(rows) else "partly" if close else "did not hold")
    numbers = ("lambda_1(G) / lambda_1(Hessian) [interval from the error bounds] and W1 between "
               "their spectra: " + ", ".join(f"{n} {ratio:.4f} [{lo:.4f}, {hi:.4f}] ({w:.3f})"
                                             for n, ratio, lo, hi, w in rows) + ".")
    layer_ratios = [ratio for n, ratio, *_ in rows if n != "full"]
    if layer_ratios and all(abs(r - 1.0) < 1e-6 for r in layer_ratios):
        numbers += (" Every layer's ratio is 1 to rounding: in a piecewise-linear network "
                    "(ReLU, max-pooling, no batch statistics) the output is linear in any one "
                    "layer's weights, so each layer's block has no residual by construction; "
                    "the full network's ratio is the measured part.")
    full = rows[0]
    summary = (f"lambda_1(G) / lambda_1(Hessian) of the {full[0]} network = {full[1]:.4f} "
               f"[{full[2]:.4f}, {full[3]:.4f}] (interval from the error bounds; the rule asks "
               f"for [0.8, 1.25]); {len(close)}/{len(rows)} entries inside, the full network "
               "and every layer.")
    return Finding(claim, verdict, rule, numbers, interval=(full[2], full[3]),
                   setting="lambda_1(G) / lambda_1(Hessian), full network", title=title,
                   summary=summary)


# ---------------------------------------------------------------------- finding 5
def _stat(arm: dict[str, Any], key: str) -> tuple[float, float]:
    f = arm["final"][key]
    return (f["mean"] if f["mean"] is not None else math.nan,
            f["std"] if f.get("std") is not None else 0.0)


def _values(arm: dict[str, Any], key: str) -> list[float] | None:
    vals = arm["final"][key].get("values")
    if not vals or any(v is None for v in vals):
        return None
    return [float(v) for v in vals]


def htr_helps(arms: dict[str, dict[str, Any]]) -> Finding:
    """Finding 5: HTR finds flatter minima (lower trace) and better test accuracy.

    With each arm's per-seed values (``final[key]["values"]`` and ``seeds``) the differences
    to SGD get 95 % intervals, paired by seed; without them (summaries only) a difference
    counts when it exceeds one pooled standard deviation over seeds."""
    claim = ("Hessian-trace regularisation settles in flatter minima (lower trace) and "
             "improves test accuracy over SGD; the middle-layer penalty does about as well.")
    sgd = arms.get("SGD")
    htr = {k: v for k, v in arms.items() if k.startswith("HTR")}
    title = "HTR: flatter minima, better accuracy"
    if not sgd or not htr:
        return Finding(claim, "not measured", "needs the SGD arm and an HTR arm", "",
                       title=title, summary="Needs the SGD arm and an HTR arm.")
    paired = all(_values(a, k) is not None for a in [sgd, *htr.values()]
                 for k in ("test_acc", "trace"))
    compare = _htr_vs_sgd_paired if paired else _htr_vs_sgd_noise
    results = [compare(name, arm, sgd) for name, arm in htr.items()]
    wins = sum(r.more_accurate for r in results)
    flatter = sum(r.flatter for r in results)
    worse = sum(r.worse for r in results)
    headline = results[0].accuracy if paired else None
    best_other = max((_stat(v, "test_acc")[0], k) for k, v in arms.items()
                     if not k.startswith("HTR"))
    best_htr = max((_stat(v, "test_acc")[0], k) for k, v in htr.items())
    numbers = "; ".join(r.text for r in results) + (
        f". Best non-HTR arm: {best_other[1]} at {100 * best_other[0]:.2f} %; best HTR arm "
        f"{best_htr[1]} at {100 * best_htr[0]:.2f} % ("
        + ("ahead" if best_htr[0] > best_other[0] else "not ahead") + ").")
    if wins == len(htr) and flatter == len(htr):
        verdict = "held"
    elif wins or flatter:
        verdict = "partly"
    else:
        verdict = "did not hold" if worse else "not shown"
    interval = None if headline is None else (headline["low"], headline["high"])
    summary = (f"{results[0].lead}; {wins}/{len(htr)} HTR arms more accurate and "
               f"{flatter}/{len(htr)} flatter than SGD beyond the noise.")
    return Finding(claim, verdict, _htr_rule(paired), numbers, interval=interval,
                   p_value=None if headline is None else headline["p_value"],
                   setting="test accuracy, first HTR arm minus SGD" if headline else "",
                   title=title, summary=summary)


def _htr_rule(paired: bool) -> str:
    """Finding 5's rule: on intervals over seeds where the per-seed values are known, on the
    seeds' spread otherwise."""
    if paired:
        return ("per HTR arm, the 95 % interval of its difference to SGD (paired by seed; "
                "Welch where the seeds differ) in final test accuracy and in final trace; held "
                "if every HTR arm's accuracy interval lies above 0 and its trace interval "
                "below 0; partly if some interval shows an improvement; did not hold if HTR is "
                "worse (an interval on the wrong side) and better nowhere; not shown if every "
                "interval holds 0")
    return ("held if every HTR arm ends with a lower trace than SGD and a higher test "
            "accuracy, each by more than one pooled standard deviation over seeds; partly "
            "if some do; not shown if every difference is within that seed noise; did not "
            "hold if HTR is worse beyond it")


@dataclass(frozen=True)
class _VersusSgd:
    """One HTR arm against SGD: the finding's text for it, the summary's sentence, and
    whether it is more accurate, flatter or worse beyond the noise."""

    text: str
    lead: str
    more_accurate: bool
    flatter: bool
    worse: bool
    accuracy: dict[str, Any] | None = None  # the accuracy difference's interval (paired)


def _htr_vs_sgd_paired(name: str, arm: dict[str, Any], sgd: dict[str, Any]) -> _VersusSgd:
    """The arm's differences to SGD in test accuracy and trace, with 95 % intervals over the
    seeds (paired by seed)."""
    acc_sgd, sd_sgd = _stat(sgd, "test_acc")
    tr_sgd, _ = _stat(sgd, "trace")
    acc, sd = _stat(arm, "test_acc")
    tr, _ = _stat(arm, "trace")
    da = difference_interval(_values(arm, "test_acc"), _values(sgd, "test_acc"), LEVEL,
                             arm.get("seeds"), sgd.get("seeds"))
    dt = difference_interval(_values(arm, "trace"), _values(sgd, "trace"), LEVEL,
                             arm.get("seeds"), sgd.get("seeds"))
    lead = (f"{name} minus SGD: test accuracy {100 * da['diff']:+.2f} points "
            f"[{100 * da['low']:+.2f}, {100 * da['high']:+.2f}], final trace "
            f"{dt['diff']:+.3g} [{dt['low']:+.3g}, {dt['high']:+.3g}]")
    text = (f"{name}: test accuracy {100 * acc:.2f} ± {100 * sd:.2f} % vs SGD "
            f"{100 * acc_sgd:.2f} ± {100 * sd_sgd:.2f} %, difference "
            f"{100 * da['diff']:+.2f} points [{100 * da['low']:+.2f}, "
            f"{100 * da['high']:+.2f}] (p = {da['p_value']:.2g}, {da['method']}); final "
            f"trace {tr:.3g} vs {tr_sgd:.3g}, difference {dt['diff']:+.3g} "
            f"[{dt['low']:+.3g}, {dt['high']:+.3g}] (p = {dt['p_value']:.2g})")
    return _VersusSgd(text, lead, more_accurate=da["low"] > 0, flatter=dt["high"] < 0,
                      worse=da["high"] < 0 or dt["low"] > 0, accuracy=da)


def _htr_vs_sgd_noise(name: str, arm: dict[str, Any], sgd: dict[str, Any]) -> _VersusSgd:
    """The arm's differences to SGD against one pooled standard deviation over seeds (no
    per-seed values, so no interval)."""
    acc_sgd, sd_sgd = _stat(sgd, "test_acc")
    tr_sgd, trsd_sgd = _stat(sgd, "trace")
    acc, sd = _stat(arm, "test_acc")
    tr, trsd = _stat(arm, "trace")
    pooled = math.sqrt((sd**2 + sd_sgd**2) / 2) or math.nan
    pooled_tr = math.sqrt((trsd**2 + trsd_sgd**2) / 2) or math.nan
    diff = acc - acc_sgd
    lead = (f"{name} minus SGD: test accuracy {100 * diff:+.2f} points (seed std "
            f"{100 * pooled:.2f}), final trace {tr:.3g} vs {tr_sgd:.3g} "
            f"({tr / tr_sgd:.2f}x; no per-seed values, so no interval)")
    text = (f"{name}: test accuracy {100 * acc:.2f} ± {100 * sd:.2f} % vs SGD "
            f"{100 * acc_sgd:.2f} ± {100 * sd_sgd:.2f} % ({100 * diff:+.2f} points, "
            f"{diff / pooled if pooled == pooled and pooled > 0 else math.nan:+.1f} "
            f"pooled std); final trace {tr:.3g} ± {trsd:.2g} vs {tr_sgd:.3g} ± "
            f"{trsd_sgd:.2g} ({tr / tr_sgd:.2f}x)")
    return _VersusSgd(
        text, lead,
        more_accurate=diff > 0 and (math.isnan(pooled) or diff > pooled),
        flatter=tr < tr_sgd and (math.isnan(pooled_tr) or tr_sgd - tr > pooled_tr),
        worse=(diff < 0 and not math.isnan(pooled) and -diff > pooled) or (
            tr > tr_sgd and not math.isnan(pooled_tr) and tr - tr_sgd > pooled_tr))


# ---------------------------------------------------------------------- transformer
def _core(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in {"q", "k", "v", "o", "mlp_in", "mlp_out"}


def transformer_blocks(transformer: Mapping[str, Any] | None,
                       cnn: Mapping[str, Mapping[Any, Any]] | None = None,
                       model: str = "gpt-nano", state: str = "") -> Finding:
    """Beyond the paper: the block study of a small GPT (q, k, v, o, mlp_in, mlp_out per
    layer, embeddings and norms): is the middle most like the whole, and how heterogeneous
    are the blocks' spectra next to a CNN's layers (Zhang et al. 2024: strongly in
    transformers, little in CNNs), with one metric for both.

    Args:
        transformer: ProbeSpectra (dict) of the transformer's blocks.
        cnn: ``{label: {seed: ProbeSpectra}}`` of the CNN(s) to compare with.
        model, state: named in the numbers (e.g. ``"gpt-nano"``, ``"at initialisation"``).
    """
    claim = ("Transformer blocks: the middle blocks are the most like the whole, and the "
             "blocks' spectra are far more heterogeneous than a CNN's layers.")
    rule = ("middle: D (outer minus middle mean W1 to the full spectrum, over all blocks in "
            "forward order) with a 95 % t-interval over probes; heterogeneity H = mean W1 "
            "between every pair of blocks' spectra, each scaled by its own top eigenvalue, "
            "one value per probe; held if D's interval lies above 0 and H of the transformer "
            "exceeds H of every CNN setting (Welch 95 % interval of the difference above 0); "
            "partly if one of the two does; did not hold if neither does and an interval "
            "lies on the wrong side; not shown otherwise")
    when = state.split(" (")[0]
    title = f"{model} blocks{', ' + when if when else ''}"
    if not transformer:
        return Finding(claim, "not measured", rule, "the transformer study was not run",
                       title=title, summary="The transformer study was not run.")
    ps = _probes(transformer)
    d = middle_minus_outer(ps)
    dm, dlo, dhi = t_interval(d, LEVEL)
    het = ps.heterogeneity()
    core = [n for n in ps.names if _core(n)]
    het_core = ([heterogeneity({n: ps.spectra[n][p] for n in core})
                 for p in range(ps.n_probes)] if len(core) >= 2 else [])
    numbers = _blocks_numbers(ps, (dm, dlo, dhi), het, het_core,
                              f"{model}{' ' + state if state else ''}")
    beats, behind = [], []
    against: list[str] = []  # the heterogeneity differences, for the summary
    for label, runs in (cnn or {}).items():
        states = _by_seed(runs)
        if not states:
            continue
        text, diff = _versus_cnn(label, states, het, het_core)
        numbers += text
        (beats if diff["low"] > 0 else behind if diff["high"] < 0 else []).append(label)
        against.append(f"H of the blocks minus H of the {label} {diff['diff']:+.3g} "
                       f"[{diff['low']:+.3g}, {diff['high']:+.3g}]")
    numbers += "."
    mid_ok = not math.isnan(dlo) and dlo > 0
    mid_bad = not math.isnan(dhi) and dhi < 0
    het_ok = bool(cnn) and bool(beats) and len(beats) == len(cnn)
    if mid_ok and het_ok:
        verdict = "held"
    elif mid_ok or het_ok:
        verdict = "partly"
    elif mid_bad or behind:
        verdict = "did not hold"
    else:
        verdict = "not shown"
    bulk = [bulk_mass(s, ps.top["full"][0]) for s in ps.spectra["full"]]
    summary = (f"D (outer minus middle blocks' W1 to the full spectrum) = {_ci(dm, dlo, dhi)}"
               + (" (above 0: the middle is closer)" if mid_ok else
                  " (below 0: the outer blocks are closer)" if mid_bad else " (holds 0)")
               + ("; " + "; ".join(against) if against else "; no CNN to compare H with")
               + ".")
    return Finding(claim, verdict, rule, numbers + (
        f" Full-Hessian bulk mass: {_ci(*t_interval(bulk, LEVEL), '.3f')}."),
        interval=(dlo, dhi), setting=f"D of {model}'s blocks{' ' + state if state else ''}",
        title=title, summary=summary,
        details={"heterogeneity": het, "heterogeneity_core": het_core,
                 "middle_minus_outer": d})


def _blocks_numbers(ps: ProbeSpectra, d: tuple[float, float, float], het: list[float],
                    het_core: list[float], what: str) -> str:
    """The transformer's own numbers: D with its interval, the most similar block per probe,
    the heterogeneity (all blocks, and the attention and MLP blocks alone) and the spread of
    the blocks' top eigenvalues."""
    tops = [ps.top[n][0] for n in ps.names]
    numbers = (f"{what}, {len(ps.names)} blocks, {ps.n_probes} probes: D = "
               f"{_ci(*d)}; most similar block per probe: "
               + ", ".join(ps.names[int(np.argmin(r))] for r in ps.distances())
               + f"; H (all blocks) = {_ci(*t_interval(het, LEVEL))}")
    if het_core:
        numbers += f"; H (q, k, v, o, mlp blocks only) = {_ci(*t_interval(het_core, LEVEL))}"
    return numbers + (f"; spread of the blocks' top eigenvalues: {log_spread(tops):.2f} decades "
                      f"(std of log10; from {min(tops):.3g} to {max(tops):.3g})")


def _versus_cnn(label: str, states: list[ProbeSpectra], het: list[float],
                het_core: list[float]) -> tuple[str, dict[str, Any]]:
    """One CNN setting's heterogeneity and top-eigenvalue spread, and the transformer's
    heterogeneity minus the CNN's with its Welch interval (also for the attention and MLP
    blocks alone, when the excess comes from the embeddings and norms)."""
    h_cnn = [h for s in states for h in s.heterogeneity()]
    diff = difference_interval(het, h_cnn, LEVEL)
    spread = float(np.mean([log_spread([s.top[n][0] for n in s.names]) for s in states]))
    text = (f". {label}: H = {_ci(*t_interval(h_cnn, LEVEL))}, top-eigenvalue spread "
            f"{spread:.2f} decades; transformer minus CNN: {diff['diff']:+.3g} "
            f"[{diff['low']:+.3g}, {diff['high']:+.3g}] (p = {diff['p_value']:.2g})")
    if het_core and diff["low"] > 0:
        core_diff = difference_interval(het_core, h_cnn, LEVEL)
        if not core_diff["low"] > 0:
            text += (f" (with the q, k, v, o and MLP blocks alone: {core_diff['diff']:+.3g}"
                     f" [{core_diff['low']:+.3g}, {core_diff['high']:+.3g}]: the excess "
                     "comes from the embeddings and norms)")
    return text, diff


# ---------------------------------------------------------------------- edge of stability
#: Consecutive blocks the records after the crossing are cut into: their means are the units of
#: the interval (batch means: neighbouring records are correlated, blocks much less).
EDGE_BLOCKS = 5
#: Records after the crossing needed for a verdict, and the share of them the band must hold.
EDGE_MIN_RECORDS = 10
EDGE_SHARE = 0.8


def edge_run(run: Mapping[str, Any], band: Sequence[float]) -> dict[str, Any]:
    """One run of the edge-of-stability setting: where the ratio (the compared sharpness over
    the threshold) first crosses 1 from below, then the mean ratio after it with a 95 %
    batch-means interval, the share of records inside ``band``, and the run's verdict.

    >>> recs = [{"step": s, "ratio": r} for s, r in enumerate([0.3, 0.6, 0.9] + [1.05] * 12)]
    >>> e = edge_run({"optimizer": "SGD", "lr": 0.1, "records": recs}, (0.9, 1.25))
    >>> e["crossed_at"], e["verdict"], round(e["mean"], 3)
    (3, 'held', 1.05)
    """
    lo, hi = float(band[0]), float(band[1])
    steps = [r["step"] for r in run["records"] if r.get("ratio") is not None]
    ratio = [float(r["ratio"]) for r in run["records"] if r.get("ratio") is not None]
    out: dict[str, Any] = {"optimizer": run.get("optimizer"), "lr": run.get("lr"),
                           "start": ratio[0] if ratio else None, "crossed_at": None,
                           "mean": None, "low": None, "high": None, "share": None,
                           "records_after": 0}
    cross = next((i for i in range(1, len(ratio)) if ratio[i] >= 1.0 > ratio[i - 1]), None)
    if cross is None:
        out["verdict"] = "not shown"
        out["why"] = (f"the ratio never crossed 1 from below (from {ratio[0]:.3g} to "
                      f"{ratio[-1]:.3g})" if ratio else "no records")
        return out
    after = np.asarray(ratio[cross:])
    out.update(crossed_at=steps[cross], records_after=int(after.size))
    if after.size < EDGE_MIN_RECORDS:
        out["verdict"] = "not shown"
        out["why"] = f"only {after.size} records after the crossing"
        return out
    blocks = [float(b.mean()) for b in np.array_split(after, EDGE_BLOCKS)]
    m, low, high = t_interval(blocks, LEVEL)
    share = float(np.mean((after >= lo) & (after <= hi)))
    out.update(mean=m, low=low, high=high, share=share,
               quantiles=[float(q) for q in np.quantile(after, [0.05, 0.5, 0.95])])
    sharpened = run.get("optimizer") != "SGD" or ratio[0] < 0.8
    if low >= lo and high <= hi and share >= EDGE_SHARE:
        out["verdict"] = "held" if sharpened else "not shown"
        if not sharpened:
            out["why"] = f"it started at {ratio[0]:.3g} of the threshold: no sharpening"
    else:
        out["verdict"] = "did not hold"
    return out


def _edge_finding(claim: str, title: str, runs: list[dict[str, Any]], band: Sequence[float],
                  what: str, setting: str, sharpening: bool) -> Finding:
    rule = (f"for each run, the first record at which {what} / threshold crosses 1 from "
            f"below; after it, the mean ratio with a 95 % t-interval over {EDGE_BLOCKS} "
            "consecutive blocks of records (batch means), and the share of records inside the "
            f"band [{band[0]:g}, {band[1]:g}]; a run holds if the interval lies inside the band "
            f"and at least {EDGE_SHARE:.0%} of its records do"
            + (" (and it started below 0.8 of 2/lr: progressive sharpening first)"
               if sharpening else "")
            + f", given {EDGE_MIN_RECORDS} or more records after the crossing; the claim holds "
            "if every run holds, partly if some do, did not hold if none does and one crossed "
            "and left the band; not shown otherwise")
    if not runs:
        return Finding(claim, "not measured", rule, "the setting was not run", title=title,
                       summary="The setting was not run.")
    parts = []
    for e in runs:
        head = f"lr {e['lr']:g}: starts at {e['start']:.3g} of the threshold"
        if e["crossed_at"] is None or e["mean"] is None:
            parts.append(f"{head}; {e.get('why', '')} [{e['verdict']}]")
            continue
        parts.append(
            f"{head}, reaches it at step {e['crossed_at']}; after it ({e['records_after']} "
            f"records) the ratio is {_ci(e['mean'], e['low'], e['high'])}, 5-95 % of records "
            f"{e['quantiles'][0]:.3g}-{e['quantiles'][2]:.3g}, {e['share']:.0%} inside the "
            f"band [{e['verdict']}]")
    verdicts = [e["verdict"] for e in runs]
    if all(v == "held" for v in verdicts):
        verdict = "held"
    elif "held" in verdicts:
        verdict = "partly"
    elif "did not hold" in verdicts:
        verdict = "did not hold"
    else:
        verdict = "not shown"
    shown = [e for e in runs if e["mean"] is not None]
    worst = max(shown, key=lambda e: abs(e["mean"] - 1.0)) if shown else None
    if worst is None:
        summary = f"No run reached its threshold ({len(runs)} runs)."
    else:
        summary = (f"After reaching its threshold, {what} stays at "
                   f"{_ci(worst['mean'], worst['low'], worst['high'])} of it in the run farthest "
                   f"from 1 (lr {worst['lr']:g}); {sum(v == 'held' for v in verdicts)} of "
                   f"{len(runs)} runs inside [{band[0]:g}, {band[1]:g}].")
    return Finding(claim, verdict, rule, "; ".join(parts) + ".", title=title, summary=summary,
                   interval=None if worst is None else (worst["low"], worst["high"]),
                   setting=setting + ("" if worst is None else
                                      f"; interval: mean ratio after the crossing, lr "
                                      f"{worst['lr']:g}"),
                   details={"runs": runs})


def edge_of_stability(result: Mapping[str, Any] | None) -> list[Finding]:
    """Beyond the paper: the edge of stability (Cohen et al. 2021, 2022) in the setting of
    :mod:`hesslens.experiments.reproduce_eos`. Two findings: full-batch gradient descent's
    sharpness rises to ``2 / lr`` and then stays near it; full-batch Adam's preconditioned
    sharpness does the same at ``38 / lr``. An empty list where the setting was not run."""
    if not result:
        return []
    band = result.get("setting", {}).get("band", (0.9, 1.25))
    runs = result.get("runs", [])
    gd = [edge_run(r, band) for r in runs if r["optimizer"] == "SGD"]
    adam = [edge_run(r, band) for r in runs if r["optimizer"] != "SGD"]
    setting = result.get("setting", {})
    where = f"{setting.get('model', 'MLP')} on {setting.get('data', 'MNIST-1D')}, full batch"
    lrs_gd = ", ".join(f"{e['lr']:g}" for e in gd)
    lrs_adam = ", ".join(f"{e['lr']:g}" for e in adam)
    findings = [_edge_finding(
        "Full-batch gradient descent sharpens until the top Hessian eigenvalue reaches 2/lr, "
        "then stays near 2/lr: the edge of stability (Cohen et al. 2021).",
        "Gradient descent hovers at 2/lr", gd, band, "the sharpness",
        f"gradient descent at lr {lrs_gd}; {where}",
        sharpening=True)]
    if adam:
        findings.append(_edge_finding(
            "Full-batch Adam's preconditioned sharpness λ1(P⁻¹H) rises to (2 + 2β1)/((1 - β1) "
            "lr) = 38/lr and stays near it (Cohen et al. 2022).",
            "Adam's preconditioned sharpness hovers at 38/lr", adam, band,
            "the preconditioned sharpness", f"Adam at lr {lrs_adam}; {where}",
            sharpening=False))
    return findings
