"""The paper's five findings, each checked against what ``hesslens reproduce`` measured.

Every check returns a :class:`Finding`: the claim, a verdict (``"held"``, ``"partly"``,
``"did not hold"``), the numbers behind it and the rule that turned the numbers into the
verdict, so that a reader can disagree with the rule and still use the numbers.

Example:
    >>> f = Finding("claim", "held", "rule", "numbers")
    >>> f.verdict
    'held'
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hesslens.curvature.layers import middle_indices

BULK_WIDTH = 0.05  # |eigenvalue| <= 5 % of the top one counts as "near zero"


@dataclass(frozen=True)
class Finding:
    claim: str
    verdict: str
    rule: str
    numbers: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mass_near_zero(density: dict[str, list[float]], top: float) -> float:
    nodes, weights = density["nodes"], density["weights"]
    return float(sum(w for x, w in zip(nodes, weights) if abs(x) <= BULK_WIDTH * abs(top)))


def layer_spectra_like_full(study: dict[str, Any]) -> Finding:
    """Finding 1: each layer's spectrum is a bulk near zero plus a few outliers, like the
    full Hessian's."""
    full = study["full"]
    full_bulk = _mass_near_zero(full["density"], full["top_eigenvalues"][0])
    rows = []
    for name, layer in study["layers"].items():
        bulk = _mass_near_zero(layer["density"], layer["top_eigenvalues"][0])
        rows.append((name, bulk, layer["similarity"]["wasserstein"]))
    alike = [r for r in rows if r[1] >= 0.5]
    verdict = ("held" if len(alike) == len(rows) and full_bulk >= 0.5
               else "partly" if alike else "did not hold")
    numbers = (f"spectral mass within {BULK_WIDTH:.0%} of the top eigenvalue of zero: full "
               f"{full_bulk:.2f}; layers " + ", ".join(f"{n} {b:.2f}" for n, b, _ in rows)
               + ". W1 to the full spectrum (each scaled by its top eigenvalue): "
               + ", ".join(f"{n} {w:.3f}" for n, _, w in rows) + ".")
    rule = ("held if the full Hessian and every layer block put at least half of their "
            f"spectral mass within {BULK_WIDTH:.0%} of their top eigenvalue of zero (a bulk; "
            "the rest, the top eigenvalue among it, are the outliers)")
    return Finding("Each layer's Hessian spectrum looks like the full one (bulk near zero "
                   "plus outliers).", verdict, rule, numbers)


def middle_layers_most_similar(study: dict[str, Any]) -> Finding:
    """Finding 2: the middle layers' spectra are the most similar to the full one."""
    sim = study["similarity"]
    names = list(study["layers"])
    middle = {names[i] for i in middle_indices(len(names))}
    ranking = sim["ranking"]
    best = ranking[0]["name"]
    mid = [r["distance"] for r in ranking if r["name"] in middle]
    outer = [r["distance"] for r in ranking if r["name"] not in middle]
    if best in middle and (not outer or max(mid) <= min(outer)):
        verdict = "held"
    elif best in middle or (outer and sum(mid) / len(mid) < sum(outer) / len(outer)):
        verdict = "partly"
    else:
        verdict = "did not hold"
    numbers = ("ranking by W1 to the full spectrum (most similar first): "
               + ", ".join(f"{r['name']} (depth {r['depth']:.2f}, {r['distance']:.3f})"
                           for r in ranking)
               + f"; middle layers here: {sorted(middle, key=names.index)}.")
    rule = ("held if the most similar layer is a middle layer and every middle layer is closer "
            "than every outer one; partly if only the best one is middle or the middle layers "
            "are closer on average")
    return Finding("The middle layers' spectra are the most similar to the full Hessian's.",
                   verdict, rule, numbers)


def curvature_falls(runs: list[dict[str, Any]]) -> Finding:
    """Finding 3: top eigenvalue and trace, full and per layer, fall during training."""
    fell, total, details = 0, 0, []
    layer_fell, layer_total = 0, 0
    for run in runs:
        # trained epochs only: the epoch-0 record (initialisation) is not "as training goes on"
        tracked = [e for e in run["epochs"]
                   if e.get("trace") is not None and e.get("epoch", 1) >= 1]
        if len(tracked) < 2:
            continue
        first, last = tracked[0], tracked[-1]
        peak = max(tracked, key=lambda e: e["top_eigenvalue"])
        for key in ("top_eigenvalue", "trace"):
            total += 1
            fell += last[key] < first[key]
        details.append(
            f"seed {run['config']['seed']}: top eigenvalue {first['top_eigenvalue']:.3g} "
            f"(epoch {first['epoch']}) -> peak {peak['top_eigenvalue']:.3g} (epoch "
            f"{peak['epoch']}) -> {last['top_eigenvalue']:.3g} (epoch {last['epoch']}); "
            f"trace {first['trace']:.3g} -> {last['trace']:.3g}")
        for key in ("layer_top_eigenvalue", "layer_trace"):
            a, b = first.get(key) or {}, last.get(key) or {}
            for name in a:
                if name in b:
                    layer_total += 1
                    layer_fell += b[name] < a[name]
    if total == 0:
        return Finding("Top eigenvalue and trace fall as training goes on.", "not measured",
                       "needs at least two tracked epochs", "")
    share = fell / total
    layer_share = layer_fell / layer_total if layer_total else math.nan
    verdict = ("held" if share == 1 and layer_share >= 0.75
               else "partly" if share >= 0.5 else "did not hold")
    numbers = "; ".join(details) + (
        f". Full-network quantities that fell from the first to the last tracked epoch: "
        f"{fell}/{total}; per-layer: {layer_fell}/{layer_total}.")
    rule = ("held if the full top eigenvalue and trace fell from the first to the last tracked "
            "epoch in every SGD seed and at least 3/4 of the per-layer ones did")
    return Finding("The top eigenvalue and the trace, full and per layer, fall as training "
                   "goes on (SGD).", verdict, rule, numbers)


def gauss_newton_close(study: dict[str, Any]) -> Finding:
    """Finding 4: the Gauss-Newton part G of each layer's Hessian has a spectrum close to the
    layer's whole Hessian."""
    rows = []
    for name, entry in [("full", study["full"]), *study["layers"].items()]:
        gn = entry.get("gauss_newton")
        if not gn:
            continue
        rows.append((name, gn["gn_top_ratio"], gn["similarity_to_hessian"]["wasserstein"]))
    if not rows:
        return Finding("G is close to the Hessian.", "not measured", "", "")
    close = [r for r in rows if 0.8 <= r[1] <= 1.25]
    verdict = ("held" if len(close) == len(rows) else "partly" if close else "did not hold")
    numbers = "top eigenvalue of G / of the Hessian, and W1 between their spectra: " + ", ".join(
        f"{n} {ratio:.3f} ({w:.3f})" for n, ratio, w in rows) + "."
    layer_ratios = [ratio for n, ratio, _ in rows if n != "full"]
    if layer_ratios and all(abs(r - 1.0) < 1e-6 for r in layer_ratios):
        numbers += (" Every layer's ratio is 1 to rounding: in a piecewise-linear network "
                    "(ReLU, max-pooling, no batch statistics) the output is linear in any one "
                    "layer's weights, so each layer's block has no residual by construction; "
                    "the full network's ratio is the measured part.")
    rule = ("held if G's top eigenvalue is within 20 % of the Hessian's for the full network "
            "and every layer")
    return Finding("The Gauss-Newton part G of each layer's Hessian has a spectrum close to "
                   "the layer's whole Hessian.", verdict, rule, numbers)


def _stat(arm: dict[str, Any], key: str) -> tuple[float, float]:
    f = arm["final"][key]
    return (f["mean"] if f["mean"] is not None else math.nan,
            f["std"] if f["std"] is not None else 0.0)


def htr_helps(arms: dict[str, dict[str, Any]]) -> Finding:
    """Finding 5: HTR finds flatter minima (lower trace) and better test accuracy."""
    sgd = arms.get("SGD")
    htr = {k: v for k, v in arms.items() if k.startswith("HTR")}
    if not sgd or not htr:
        return Finding("HTR improves on SGD.", "not measured", "", "")
    acc_sgd, sd_sgd = _stat(sgd, "test_acc")
    tr_sgd, trsd_sgd = _stat(sgd, "trace")
    best_other = max((_stat(v, "test_acc")[0], k) for k, v in arms.items()
                     if not k.startswith("HTR"))
    parts, wins, flatter, worse = [], 0, 0, 0
    for name, arm in htr.items():
        acc, sd = _stat(arm, "test_acc")
        tr, trsd = _stat(arm, "trace")
        pooled = math.sqrt((sd**2 + sd_sgd**2) / 2) or math.nan
        pooled_tr = math.sqrt((trsd**2 + trsd_sgd**2) / 2) or math.nan
        diff = acc - acc_sgd
        # Both differences count only beyond one pooled standard deviation over seeds: a
        # trace 6 % lower with a 28 % seed spread is not a flatter minimum.
        wins += diff > 0 and (math.isnan(pooled) or diff > pooled)
        flatter += tr < tr_sgd and (math.isnan(pooled_tr) or tr_sgd - tr > pooled_tr)
        worse += (diff < 0 and not math.isnan(pooled) and -diff > pooled) or (
            tr > tr_sgd and not math.isnan(pooled_tr) and tr - tr_sgd > pooled_tr)
        parts.append(f"{name}: test accuracy {100 * acc:.2f} ± {100 * sd:.2f} % vs SGD "
                     f"{100 * acc_sgd:.2f} ± {100 * sd_sgd:.2f} % ({100 * diff:+.2f} points, "
                     f"{diff / pooled if pooled == pooled and pooled > 0 else math.nan:+.1f} "
                     f"pooled std); final trace {tr:.3g} ± {trsd:.2g} vs {tr_sgd:.3g} ± "
                     f"{trsd_sgd:.2g} ({tr / tr_sgd:.2f}x)")
    best_htr = max((_stat(v, "test_acc")[0], k) for k, v in htr.items())
    beats_all = best_htr[0] > best_other[0]
    verdict = ("held" if wins == len(htr) and flatter == len(htr)
               else "partly" if wins or flatter
               else "did not hold" if worse else "not shown")
    numbers = "; ".join(parts) + (
        f". Best non-HTR arm: {best_other[1]} at {100 * best_other[0]:.2f} %; best HTR arm "
        f"{best_htr[1]} at {100 * best_htr[0]:.2f} % ("
        + ("ahead" if beats_all else "not ahead") + ").")
    rule = ("held if every HTR arm ends with a lower trace than SGD and a higher test "
            "accuracy, each by more than one pooled standard deviation over seeds; partly if "
            "some do; not shown if every difference is within that seed noise; did not hold "
            "if HTR is worse beyond it")
    return Finding("Hessian-trace regularisation settles in flatter minima (lower trace) and "
                   "improves test accuracy over SGD; the middle-layer penalty does about as "
                   "well.", verdict, rule, numbers)
