"""The layer study on a tiny network against dense float64 references (torch.func.hessian)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy

from hesslens.analysis import layer_study
from hesslens.errors import HesslensInputError
from tests.reference import classification_batches, dense_gauss_newton, dense_hessian, mlp

K = 3


@pytest.fixture(scope="module")
def case():
    model = mlp(1)  # 6 -> 10 -> 8 -> 4, tanh: three layers, 194 parameters
    batches = classification_batches((6,), n=(20, 12), classes=4, seed=2)
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, cross_entropy, batches, names)
    G = dense_gauss_newton(model, cross_entropy, batches, names)
    study = layer_study(model, cross_entropy, batches, k=K, density_probes=2,
                        density_steps=40, trace_rtol=0.01, trace_max_hvp=400,
                        dtype=torch.float64, seed=3, progress=False)
    sizes = [p.numel() for p in model.parameters()]
    bounds = np.cumsum([0, *sizes])
    # layer i = parameters 2i, 2i+1 (weight, bias)
    slices = {name: slice(int(bounds[2 * i]), int(bounds[2 * i + 2]))
              for i, name in enumerate(["0", "2", "4"])}
    return model, batches, H, G, study, slices


def _top(M, k, by_magnitude=False):
    w = torch.linalg.eigvalsh(M).numpy()
    if by_magnitude:
        w = w[np.argsort(-np.abs(w))][:k]
        return np.sort(w)[::-1]
    return w[::-1][:k]


def test_layers_depths_and_sizes(case):
    _, _, H, _, study, slices = case
    assert list(study.layers) == ["0", "2", "4"]
    assert [e.depth for e in study.layers.values()] == [0.0, 0.5, 1.0]
    for name, e in study.layers.items():
        assert e.n_params == slices[name].stop - slices[name].start
    assert study.full.n_params == H.shape[0]


def test_full_and_block_top_eigenvalues_match_dense(case):
    _, _, H, _, study, slices = case
    np.testing.assert_allclose(study.full.top_eigenvalues, _top(H, K), rtol=1e-7, atol=1e-10)
    for name, s in slices.items():
        np.testing.assert_allclose(study.layers[name].top_eigenvalues, _top(H[s, s], K),
                                   rtol=1e-7, atol=1e-10)


def test_interlacing_holds(case):
    _, _, _, _, study, _ = case
    full = study.full.top_eigenvalues
    for e in study.layers.values():
        assert all(b <= f + 1e-10 for b, f in zip(e.top_eigenvalues, full))
        assert e.interlacing["holds"]
    assert study.checks()["interlacing_holds"]


def test_layer_traces_add_up_to_the_full_trace(case):
    _, _, H, _, study, slices = case
    layer_sum = sum(e.trace for e in study.layers.values())
    assert layer_sum == pytest.approx(study.full.trace, rel=1e-12, abs=1e-12)
    exact = float(torch.trace(H))
    est = study.full.hessian.trace
    assert abs(est.value - exact) <= 5 * est.stderr + 1e-8
    for name, s in slices.items():
        t = study.layers[name].hessian.trace
        assert abs(t.value - float(torch.trace(H[s, s]))) <= 5 * t.stderr + 1e-8
    assert study.layers["4"].trace_ratio == pytest.approx(
        study.layers["4"].trace / study.full.trace)
    assert study.layers["4"].top_ratio == pytest.approx(
        study.layers["4"].top_eigenvalue / study.full.top_eigenvalue)


def test_densities_are_probability_measures(case):
    _, _, H, _, study, _ = case
    entries = [study.full, *study.layers.values()]
    spectra = [e.density for e in entries]
    spectra += [e.gauss_newton.gn.density for e in entries]
    spectra += [e.gauss_newton.residual.density for e in entries]
    for s in spectra:
        assert (s.weights >= 0).all()
        assert float(s.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    # the deflated top eigenvalues are nodes carrying weight 1/n each
    n = H.shape[0]
    for v in study.full.top_eigenvalues:
        i = int(np.argmin(np.abs(study.full.density.nodes - v)))
        assert study.full.density.weights[i] >= 1.0 / n - 1e-12
    # the measure's support lies inside the spectrum (Ritz values interlace)
    w = torch.linalg.eigvalsh(H).numpy()
    lo, hi = study.full.density.support
    assert w[0] - 1e-8 <= lo and hi <= w[-1] + 1e-8


def test_gauss_newton_split_matches_dense(case):
    _, _, H, G, study, slices = case
    R = H - G
    split = study.full.gauss_newton
    np.testing.assert_allclose(split.gn.top_eigenvalues, _top(G, K), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(split.residual.top_eigenvalues, _top(R, K, True), rtol=1e-5,
                               atol=1e-9)
    for name, s in slices.items():
        sp = study.layers[name].gauss_newton
        np.testing.assert_allclose(sp.gn.top_eigenvalues, _top(G[s, s], K), rtol=1e-6,
                                   atol=1e-10)
        np.testing.assert_allclose(sp.residual.top_eigenvalues, _top(R[s, s], K, True),
                                   rtol=1e-5, atol=1e-9)
        assert sp.gn.trace.value + sp.residual.trace.value == pytest.approx(
            study.layers[name].trace, rel=1e-9, abs=1e-12)
        assert sp.similarity is not None and sp.similarity["wasserstein"] >= 0
    # the last layer is linear in its weights: its residual block vanishes
    assert abs(study.layers["4"].gauss_newton.residual_ratio) < 1e-8


def test_similarity_for_every_layer(case):
    _, _, _, _, study, _ = case
    for e in study.layers.values():
        assert set(e.similarity) >= {"wasserstein", "js_divergence", "wasserstein_raw",
                                     "authors_distance", "normalize"}
        assert e.similarity["normalize"] == "top"
    ranking = study.similarity["ranking"]
    assert sorted(r["name"] for r in ranking) == ["0", "2", "4"]
    assert [r["distance"] for r in ranking] == sorted(r["distance"] for r in ranking)
    assert study.similarity["most_similar"] == [ranking[0]["name"]]


def test_to_dict_schema(case):
    _, _, _, _, study, _ = case
    d = json.loads(json.dumps(study.to_dict(), allow_nan=False))
    assert {"schema", "seed", "settings", "full", "layers", "similarity", "checks",
            "timings", "point", "layer_names"} <= set(d)
    assert d["seed"] == 3 and d["settings"]["seed"] == 3
    assert list(d["layers"]) == ["0", "2", "4"]
    entry_keys = {"name", "n_params", "dim", "top_eigenvalues", "eigensolver", "trace",
                  "density", "similarity", "gauss_newton"}
    assert entry_keys <= set(d["full"])
    for e in d["layers"].values():
        assert entry_keys | {"index", "depth", "parameters", "ratios", "interlacing"} <= set(e)
        assert set(e["trace"]) >= {"value", "stderr"}
        assert set(e["density"]) == {"nodes", "weights"}
        assert len(e["top_eigenvalues"]) == K
        assert set(e["gauss_newton"]) >= {"gn", "residual", "gn_top_ratio", "residual_ratio"}
        for part in ("gn", "residual"):
            assert {"top_eigenvalues", "trace", "density"} <= set(e["gauss_newton"][part])
    assert d["checks"]["densities_normalized"] and d["checks"]["interlacing_holds"]


def test_reproducible_from_the_seed(case):
    model, batches, _, _, study, _ = case
    again = layer_study(model, cross_entropy, batches, k=K, density_probes=2,
                        density_steps=40, trace_rtol=0.01, trace_max_hvp=400,
                        dtype=torch.float64, seed=3, gauss_newton=False, progress=False)
    a, b = study.to_dict(), again.to_dict()
    assert a["full"]["top_eigenvalues"] == b["full"]["top_eigenvalues"]
    assert a["full"]["density"] == b["full"]["density"]
    assert a["full"]["trace"] == b["full"]["trace"]
    for name in a["layers"]:
        assert a["layers"][name]["density"] == b["layers"][name]["density"]
        assert a["layers"][name]["similarity"] == b["layers"][name]["similarity"]
    assert b["full"]["gauss_newton"] is None


def test_bad_arguments():
    model = mlp(0)
    data = classification_batches((6,), n=(8,), classes=4)[0]
    with pytest.raises(HesslensInputError, match="normalisation"):
        layer_study(model, cross_entropy, data, similarity_normalize="median", progress=False)
    with pytest.raises(HesslensInputError, match="k must be"):
        layer_study(model, cross_entropy, data, k=0, progress=False)


def test_importing_analysis_sets_no_training_global():
    # the trainer's tracking takes spectrum_similarity itself (tests/training/
    # test_tracking_callback.py); analysis no longer registers it at import
    import subprocess
    import sys

    code = "import sys, hesslens.analysis; print('hesslens.training' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
