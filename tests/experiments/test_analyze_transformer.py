"""``hesslens analyze`` on the zoo's transformers: the block study of q, k, v, o and the MLP of
every layer, with the model's own loss on mapping batches."""

import json

from hesslens.cli import main


def test_analyze_gpt_nano_writes_the_block_study(tmp_path, capsys):
    out = tmp_path / "gpt"
    rc = main(["analyze", "--model", "gpt-nano", "--data", "modadd", "--per-class", "1",
               "--k", "1", "--density-probes", "1", "--density-steps", "12",
               "--trace-max-hvp", "80", "--no-gauss-newton", "--out", str(out), "--quiet"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    names = results["layer_names"]
    for layer in (0, 1):
        for part in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp_in", "mlp_out"):
            assert f"transformer.h.{layer}.{part}" in names
    q = results["layers"]["transformer.h.0.attn.q"]
    assert q["n_params"] == 32 * 32 + 32  # a third of the fused c_attn weight, and its bias
    assert results["run"]["layers"] == "transformer"
    assert "own loss" in results["run"]["loss"]
    total = sum(entry["trace"]["value"] for entry in results["layers"].values())
    assert abs(total - results["full"]["trace"]["value"]) <= 1e-6 * abs(total) + 1e-9
    assert (out / "report.html").stat().st_size > 10_000
    assert "transformer.h.1.attn.q" in capsys.readouterr().out
