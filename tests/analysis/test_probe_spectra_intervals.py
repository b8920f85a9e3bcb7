"""Per-probe spectra and the intervals of the reproduce verdicts, against scipy and dense
float64 references."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hesslens import Hessian
from hesslens.analysis.intervals import (
    cluster_bootstrap,
    difference_interval,
    sign_test,
    t_interval,
)
from hesslens.analysis.probe_spectra import (
    ProbeSpectra,
    bulk_mass,
    heterogeneity,
    log_spread,
    outlier_count,
    probe_spectra,
)
from hesslens.errors import HesslensInputError
from hesslens.linalg import Spectrum


def test_t_interval_matches_scipy():
    x = [0.3, 1.7, 0.9, 2.2, 1.1]
    m, lo, hi = t_interval(x, 0.9)
    ref = stats.t.interval(0.9, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert m == pytest.approx(np.mean(x))
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)


def test_welch_difference_matches_scipy():
    a, b = [3.1, 2.9, 3.6, 3.3], [2.0, 2.8, 2.2, 1.7, 2.5]
    d = difference_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert d["method"] == "Welch"
    assert d["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_paired_difference_pairs_by_seed_not_by_position():
    a, seeds_a = [0.91, 0.93, 0.90], [2, 0, 1]
    b, seeds_b = [0.90, 0.89, 0.92], [0, 1, 2]
    d = difference_interval(a, b, seeds_a=seeds_a, seeds_b=seeds_b)
    diffs = [0.93 - 0.90, 0.90 - 0.89, 0.91 - 0.92]  # seeds 0, 1, 2
    ref = stats.ttest_rel(diffs, [0.0] * 3)
    ci = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert d["method"] == "paired by seed"
    assert d["diff"] == pytest.approx(np.mean(diffs))
    assert d["p_value"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_sign_test_is_the_binomial_tail():
    assert sign_test(5, 5) == pytest.approx(0.5**5)
    assert sign_test(4, 6) == pytest.approx(sum(math.comb(6, k) for k in (4, 5, 6)) / 64)
    with pytest.raises(HesslensInputError):
        sign_test(3, 2)


def test_cluster_bootstrap_resamples_seeds_not_probes_alone():
    # probes agree within each seed, seeds differ: the interval must be as wide as the seeds'
    values = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]]
    m, lo, hi = cluster_bootstrap(values, n_boot=2000)
    assert m == 2.0 and lo == pytest.approx(1.0) and hi == pytest.approx(3.0)
    m, lo, hi = cluster_bootstrap([[5.0, 5.0]] * 4)
    assert (m, lo, hi) == (5.0, 5.0, 5.0)
    ragged = cluster_bootstrap([[1.0, 1.2], [0.8], [1.1, 0.9]], n_boot=500)
    assert ragged[1] <= ragged[0] <= ragged[2]


def test_bulk_mass_outliers_heterogeneity_and_spread():
    s = Spectrum.from_eigenvalues([0.0] * 90 + [0.04] * 5 + list(np.linspace(1, 10, 5)))
    assert bulk_mass(s) == pytest.approx(0.95)
    assert outlier_count(s, dim=100) == pytest.approx(5.0)
    assert bulk_mass(s, top=0.5) == pytest.approx(0.90)  # the band set by another top
    a = Spectrum([0.0, 1.0], [0.5, 0.5])
    b = Spectrum([0.0, 2.0], [0.9, 0.1])
    c = Spectrum([-1.0, 1.0], [0.5, 0.5])
    pairs = [stats.wasserstein_distance(x.nodes / abs(x.nodes).max(), y.nodes / abs(y.nodes).max(),
                                        x.weights, y.weights) for x, y in ((a, b), (a, c), (b, c))]
    assert heterogeneity({"a": a, "b": b, "c": c}) == pytest.approx(np.mean(pairs))
    assert log_spread([1.0, 10.0, 100.0]) == pytest.approx(np.std([0.0, 1.0, 2.0]))


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    model = model.double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 4, (40,))
    return model, x, y


def test_probe_spectra_against_the_dense_hessian():
    model, x, y = _model_and_data()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [p.numel() for p in params.values()]

    def loss(flat):
        chunks = torch.split(flat, sizes)
        p = {n: c.view_as(params[n]) for n, c in zip(names, chunks)}
        out = torch.func.functional_call(model, p, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    dense = torch.autograd.functional.hessian(loss, flat)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    H = Hessian(model, torch.nn.functional.cross_entropy, (x, y))
    ps = probe_spectra(H, k=3, n_probes=4, n_steps=60, tol=1e-10)
    assert ps.names == ["0", "2"] and ps.n_probes == 4
    assert ps.dims == {"full": 44, "0": 20, "2": 24}
    assert ps.top["full"] == pytest.approx(exact[:3].tolist(), rel=1e-8, abs=1e-10)
    block0 = torch.linalg.eigvalsh(dense[:20, :20]).flip(0)
    assert ps.top["0"] == pytest.approx(block0[:3].tolist(), rel=1e-8, abs=1e-10)
    # with steps >= dim each probe's nodes are the exact eigenvalues and its mean is v^T H v:
    # the average over probes of dim x mean is Hutchinson's estimate of the trace
    traces = ps.traces()["full"]
    assert np.mean(traces) == pytest.approx(float(torch.trace(dense)), rel=0.3)
    for s in ps.spectra["full"]:
        assert s.support[1] == pytest.approx(float(exact[0]), rel=1e-8)
    # distances are W1 between each probe's block and full measure, scaled by their tops
    d = ps.distances()
    s_full, s_blk = ps.spectra["full"][1], ps.spectra["2"][1]
    ref = stats.wasserstein_distance(s_blk.nodes / abs(s_blk.nodes).max(),
                                     s_full.nodes / abs(s_full.nodes).max(),
                                     s_blk.weights, s_full.weights)
    assert d.shape == (4, 2) and d[1, 1] == pytest.approx(ref, rel=1e-12)
    # probes differ, so the spread over probes is real; the round trip keeps everything
    assert len({round(float(t), 10) for t in traces}) == 4
    back = ProbeSpectra.from_dict(ps.to_dict())
    assert np.allclose(back.distances(), d, rtol=1e-12, atol=1e-15) and back.top == ps.top


def test_probe_spectra_refuses_bad_probe_counts():
    model, x, y = _model_and_data()
    with pytest.raises(HesslensInputError, match="n_probes"):
        probe_spectra(Hessian(model, torch.nn.functional.cross_entropy, (x, y)), n_probes=0)
