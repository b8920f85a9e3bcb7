"""Intervals and tests for the study's verdicts: a t-interval of a mean, the interval of a
difference between two arms (paired by seed where the seeds agree, Welch otherwise), a
two-level (cluster) bootstrap over seeds and probes, and the one-sided sign test.

Every function returns plain floats, so that a verdict rule can quote them.

Example:
    >>> m, lo, hi = t_interval([1.0, 2.0, 3.0])
    >>> m, round(lo, 3), round(hi, 3)
    (2.0, -0.484, 4.484)
    >>> sign_test(5, 5)
    0.03125
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from hesslens.errors import HesslensInputError

__all__ = ["cluster_bootstrap", "difference_interval", "sign_test", "t_interval"]


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    a = np.asarray([float(v) for v in values], dtype=float)
    if a.size and not np.isfinite(a).all():
        raise HesslensInputError(f"{what} holds a NaN or infinite value")
    return a


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student's t-interval of the mean of ``values`` (sample std,
    ``n - 1`` degrees of freedom). With one value the interval is ``(nan, nan)``.

    >>> t_interval([2.0])[1:]
    (nan, nan)
    """
    a = _finite(values, "values")
    if a.size == 0:
        raise HesslensInputError("t_interval needs at least one value")
    m = float(a.mean())
    if a.size < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return m, m - half, m + half


def difference_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95,
                        seeds_a: Sequence[int] | None = None,
                        seeds_b: Sequence[int] | None = None) -> dict[str, float | str]:
    """The interval of ``mean(a) - mean(b)``.

    Paired by seed (a t-interval of the per-seed differences) when both seed lists are given
    and hold the same seeds; else Welch's interval (unequal variances, Welch-Satterthwaite
    degrees of freedom).

    Returns:
        ``{"diff", "low", "high", "p_value", "method"}``; ``p_value`` is two-sided, of
        "no difference".

    >>> d = difference_interval([3.0, 4.0, 5.0], [1.0, 2.5, 3.0], seeds_a=[0, 1, 2],
    ...                         seeds_b=[0, 1, 2])
    >>> d["method"], d["diff"]
    ('paired by seed', 1.8333333333333333)
    """
    x, y = _finite(a, "a"), _finite(b, "b")
    if x.size == 0 or y.size == 0:
        raise HesslensInputError("difference_interval needs values on both sides")
    if (seeds_a is not None and seeds_b is not None and len(seeds_a) == x.size
            and len(seeds_b) == y.size and sorted(seeds_a) == sorted(seeds_b)
            and len(set(seeds_a)) == x.size):
        where = {s: i for i, s in enumerate(seeds_b)}
        d = np.array([x[i] - y[where[s]] for i, s in enumerate(seeds_a)])
        m, lo, hi = t_interval(d, level)
        p = math.nan
        if d.size > 1:
            p = (float(stats.ttest_1samp(d, 0.0).pvalue) if d.std(ddof=1) > 0
                 else (0.0 if m != 0 else 1.0))
        return {"diff": m, "low": lo, "high": hi, "p_value": p, "method": "paired by seed"}
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return {"diff": diff, "low": math.nan, "high": math.nan, "p_value": math.nan,
                "method": "Welch"}
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "low": diff, "high": diff,
                "p_value": 0.0 if diff != 0 else 1.0, "method": "Welch"}
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    return {"diff": diff, "low": diff - half, "high": diff + half, "p_value": p,
            "method": "Welch"}


def cluster_bootstrap(values: Sequence[Sequence[float]], level: float = 0.95,
                      n_boot: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile interval of the grand mean of ``values[seed][probe]``
    from a two-level bootstrap: seeds drawn with replacement, then probes within each drawn
    seed (probes of one seed share its model, so they are not independent draws).

    >>> m, lo, hi = cluster_bootstrap([[1.0, 1.2], [0.8, 1.0], [1.1, 0.9]])
    >>> m, lo <= m <= hi
    (1.0, True)
    """
    rows = [_finite(r, "values") for r in values]
    if not rows or any(r.size == 0 for r in rows):
        raise HesslensInputError("cluster_bootstrap needs at least one value per seed")
    grand = float(np.mean([r.mean() for r in rows]))
    rng = np.random.default_rng(seed)
    sizes = {r.size for r in rows}
    if len(sizes) == 1:  # a rectangle: draw every resample at once
        table, n_seeds, n_probes = np.vstack(rows), len(rows), sizes.pop()
        picked = rng.integers(0, n_seeds, (n_boot, n_seeds))
        probes = rng.integers(0, n_probes, (n_boot, n_seeds, n_probes))
        means = table[picked[..., None], probes].mean(axis=(1, 2))
    else:
        means = np.empty(n_boot)
        for b in range(n_boot):
            picked = rng.integers(0, len(rows), len(rows))
            means[b] = np.mean([rows[i][rng.integers(0, rows[i].size, rows[i].size)].mean()
                                for i in picked])
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return grand, float(lo), float(hi)


def sign_test(n_positive: int, n: int) -> float:
    """One-sided sign test: the probability of at least ``n_positive`` successes out of ``n``
    when each is a fair coin (``scipy.stats.binomtest``, alternative "greater").

    >>> round(sign_test(4, 5), 4)
    0.1875
    """
    if n < 1 or not 0 <= n_positive <= n:
        raise HesslensInputError(f"sign_test needs 0 <= n_positive <= n, n >= 1; got "
                                 f"{n_positive} of {n}")
    return float(stats.binomtest(int(n_positive), int(n), 0.5, alternative="greater").pvalue)
