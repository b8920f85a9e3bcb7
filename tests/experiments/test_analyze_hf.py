"""``hesslens analyze --hf DIR``: a Hugging Face model the test saves with ``save_pretrained``
(and a word-level tokenizer trained here, offline), analysed from a text file and from token ids:
the study of the model's own loss on those sequences, equal to ``hl.Hessian`` on them; a
sequence classifier with its labels; every bad input exits 2 with one line, leaving nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import hesslens as hl
from hesslens import cli
from hesslens.experiments.analyze_hf import preflight_hf

# small estimator settings; float64 so that the study's top eigenvalue is compared at 1e-6
FAST = ["--quiet", "--threads", "1", "--k", "1", "--density-probes", "1", "--density-steps",
        "12", "--trace-max-hvp", "80", "--no-gauss-newton", "--dtype", "float64"]
WORDS = ["the", "cat", "dog", "bird", "sat", "ran", "flew", "on", "over", "under", "a", "mat",
         "house", "tree", "and", "then", "quickly", "slowly", "red", "blue", "green", "small",
         "big", "old", "new"]
SEQ = 16


@pytest.fixture(autouse=True)
def only_analyze(monkeypatch):
    """The parser with the analyze subcommand alone; torch's thread count restored."""
    monkeypatch.setattr(cli, "COMMANDS", {"analyze": cli.COMMANDS["analyze"]})
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _tokenizer(lines: list[str]) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer trained on ``lines`` (no download), with a mask token."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[MASK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                mask_token="[MASK]")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Folders: GPT-2 with its tokenizer, a BERT classifier without one, a BERT masked LM with
    it, a GPT-2 without a head; files: a text, token ids (.npy and .pt, none of them special)
    and class labels."""
    root = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=12)) for _ in range(40)]
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    tokenizer = _tokenizer(lines)
    vocab = len(tokenizer)  # 25 words and 2 special tokens
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=vocab, n_positions=32, bos_token_id=0,
        eos_token_id=0))
    gpt.save_pretrained(root / "gpt")
    tokenizer.save_pretrained(root / "gpt")
    bert = dict(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    transformers.BertForSequenceClassification(
        transformers.BertConfig(num_labels=3, **bert)).save_pretrained(root / "bert")
    transformers.BertForMaskedLM(transformers.BertConfig(**bert)).save_pretrained(root / "mlm")
    tokenizer.save_pretrained(root / "mlm")
    transformers.GPT2Model(transformers.GPT2Config(  # no head: refused by name
        n_layer=1, n_embd=8, n_head=2, vocab_size=vocab, n_positions=8, bos_token_id=0,
        eos_token_id=0)).save_pretrained(root / "bare")
    ids = rng.integers(2, vocab, size=(6, SEQ))
    np.save(root / "ids.npy", ids)
    torch.save(torch.from_numpy(ids), root / "ids.pt")
    np.save(root / "labels.npy", np.array([0, 2, 1, 1, 0, 2]))
    return root


def _run(capsys, *argv):
    code = cli.main(["analyze", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return code, out, err


def _top(model: torch.nn.Module, batch: dict) -> float:
    return float(hl.Hessian(model, None, [batch], dtype=torch.float64).eigenvalues(k=1)
                 .values[0])


def _blocks_of_every_layer(results: dict, prefix: str, layers: int) -> None:
    names = results["layer_names"]
    for layer in range(layers):
        for part in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp_in", "mlp_out"):
            assert f"{prefix}.{layer}.{part}" in names, names
    total = sum(entry["trace"]["value"] for entry in results["layers"].values())
    assert total == pytest.approx(results["full"]["trace"]["value"], rel=1e-9, abs=1e-12)


def test_a_causal_lm_on_a_text_file_is_the_hessian_of_its_own_loss(files, tmp_path, capsys):
    out = tmp_path / "gpt"
    code, stdout, err = _run(capsys, "--hf", files / "gpt", "--text", files / "text.txt",
                             "--seq-len", SEQ, "--sequences", 4, "--out", out, *FAST)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    _blocks_of_every_layer(results, "transformer.h", 2)
    run = results["run"]
    assert run["layers"] == "transformer" and run["num_samples"] == 4
    assert run["hf"]["architecture"] == "GPT2LMHeadModel" and run["hf"]["tokenizer"]
    assert run["source"] == {"kind": "text", "path": str(files / "text.txt"), "seq_len": SEQ,
                             "labels": None, "num_samples": 4}
    assert results["data"]["sizes"] == {"x": [4, SEQ], "y": [4, SEQ]}
    # the reference: the folder read by transformers itself, the text cut by this test
    tokenizer = transformers.AutoTokenizer.from_pretrained(files / "gpt", local_files_only=True)
    ids = tokenizer((files / "text.txt").read_text())["input_ids"]
    x = torch.tensor(ids[: 4 * SEQ]).view(4, SEQ)
    model = transformers.AutoModelForCausalLM.from_pretrained(files / "gpt",
                                                              local_files_only=True)
    expected = _top(model, {"input_ids": x, "labels": x})
    assert results["full"]["top_eigenvalues"][0] == pytest.approx(expected, rel=1e-6)
    assert (out / "report.html").stat().st_size > 10_000 and (out / "layers.csv").exists()
    assert "transformer.h.1.attn.q" in stdout


def test_a_causal_lm_on_token_ids_takes_the_first_rows(files, tmp_path, capsys):
    out = tmp_path / "ids"
    code, _, err = _run(capsys, "--hf", files / "gpt", "--tokens", files / "ids.npy",
                        "--sequences", 3, "--out", out, *FAST)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    _blocks_of_every_layer(results, "transformer.h", 2)
    x = torch.from_numpy(np.load(files / "ids.npy"))[:3]
    model = transformers.AutoModelForCausalLM.from_pretrained(files / "gpt",
                                                              local_files_only=True)
    expected = _top(model, {"input_ids": x, "labels": x})
    assert results["full"]["top_eigenvalues"][0] == pytest.approx(expected, rel=1e-6)
    assert results["run"]["num_samples"] == 3


def test_a_sequence_classifier_takes_its_labels(files, tmp_path, capsys):
    out = tmp_path / "bert"
    code, _, err = _run(capsys, "--hf", files / "bert", "--tokens", files / "ids.pt",
                        "--labels", files / "labels.npy", "--out", out, *FAST)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    _blocks_of_every_layer(results, "bert.encoder.layer", 1)
    assert "classifier" in results["layer_names"]
    assert results["run"]["loss"] == "the model's own loss (mean over examples)"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        files / "bert", local_files_only=True)
    x, y = torch.load(files / "ids.pt", weights_only=True), torch.tensor([0, 2, 1, 1, 0, 2])
    expected = _top(model, {"input_ids": x, "labels": y})
    assert results["full"]["top_eigenvalues"][0] == pytest.approx(expected, rel=1e-6)


def test_a_masked_lm_predicts_seeded_masks_of_its_tokens(files, tmp_path):
    args = cli.build_parser().parse_args(
        ["analyze", "--hf", str(files / "mlm"), "--tokens", str(files / "ids.npy"), "--seed",
         "3", "--out", str(tmp_path / "o")])
    ready = preflight_hf(args)
    ids = torch.from_numpy(np.load(files / "ids.npy"))
    mask = ready.hf.tokenizer.mask_token_id
    masked = ready.x == mask
    assert masked.any(dim=1).all() and 0.05 < masked.float().mean() < 0.3
    assert torch.equal(ready.y[masked], ids[masked]) and (ready.y[~masked] == -100).all()
    assert torch.equal(ready.x[~masked], ids[~masked])
    assert ready.source["mask_seed"] == 3
    again = preflight_hf(args)
    assert torch.equal(again.x, ready.x)  # seeded
    assert not (tmp_path / "o").exists()


def test_the_folder_is_loaded_with_the_dtype_keeping_loss(files, tmp_path):
    args = cli.build_parser().parse_args(
        ["analyze", "--hf", str(files / "gpt"), "--tokens", str(files / "ids.npy"), "--out",
         str(tmp_path / "o")])
    model = preflight_hf(args).hf.model.double()
    x = torch.from_numpy(np.load(files / "ids.npy"))
    loss = model(input_ids=x, labels=x).loss
    assert loss.dtype == torch.float64  # transformers' own loss would be float32


def test_a_language_model_takes_labels_of_its_own(files, tmp_path):
    labels = np.load(files / "ids.npy")
    labels[:, : SEQ // 2] = -100  # predict the second half only
    np.save(tmp_path / "half.npy", labels)
    args = cli.build_parser().parse_args(
        ["analyze", "--hf", str(files / "gpt"), "--tokens", str(files / "ids.npy"), "--labels",
         str(tmp_path / "half.npy"), "--sequences", "2", "--out", str(tmp_path / "o")])
    ready = preflight_hf(args)
    assert torch.equal(ready.y, torch.from_numpy(labels[:2]))
    assert ready.batches(ready.x, ready.y)[0].keys() == {"input_ids", "labels"}


def test_an_image_classifier_takes_images_and_labels(tmp_path):
    torch.manual_seed(0)
    transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=16, num_labels=4)).save_pretrained(
        tmp_path / "vit")
    np.save(tmp_path / "img.npy", np.random.default_rng(0).standard_normal((5, 1, 8, 8)))
    np.save(tmp_path / "lab.npy", np.array([0, 1, 2, 3, 0]))
    args = cli.build_parser().parse_args(
        ["analyze", "--hf", str(tmp_path / "vit"), "--images", str(tmp_path / "img.npy"),
         "--labels", str(tmp_path / "lab.npy"), "--out", str(tmp_path / "o")])
    ready = preflight_hf(args)
    assert ready.x.dtype == torch.float32 and ready.x.shape == (5, 1, 8, 8)  # the model's
    assert ready.batches(ready.x, ready.y)[0].keys() == {"pixel_values", "labels"}
    assert ready.layers == "transformer" and ready.hf.task.name == "image classifier"


def test_without_transformers_it_stops_at_once(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # an import of it fails
    code, _, err = _run(capsys, "--hf", files / "gpt", "--tokens", files / "ids.npy", "--out",
                        tmp_path / "o")
    assert code == 2 and 'pip install "hesslens[hf]"' in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------- bad input
def _bad_file(root, name, array):
    path = root / name
    if name.endswith(".pt"):
        torch.save(torch.as_tensor(array), path)
    else:
        np.save(path, array)
    return path


@pytest.mark.parametrize(("make", "words"), [
    (lambda f, t: ["--hf", t / "missing", "--tokens", f / "ids.npy"],
     ["missing does not exist", "save_pretrained", "never downloads"]),
    (lambda f, t: ["--hf", f / "text.txt", "--tokens", f / "ids.npy"],
     ["is a file, not a folder"]),
    (lambda f, t: ["--hf", f, "--tokens", f / "ids.npy"], ["holds no config.json"]),
    (lambda f, t: ["--hf", f / "bert", "--text", f / "text.txt", "--labels",
                   f / "labels.npy"],
     ["--text needs the folder's tokenizer", "--tokens"]),
    (lambda f, t: ["--hf", f / "gpt", "--tokens", _bad_file(t, "flat.npy", np.arange(8))],
     ["shape (8,)", "(sequences, tokens)"]),
    (lambda f, t: ["--hf", f / "gpt", "--tokens",
                   _bad_file(t, "float.pt", torch.zeros(2, 4))],
     ["dtype float32", "integer array"]),
    (lambda f, t: ["--hf", f / "gpt", "--tokens",
                   _bad_file(t, "big.npy", np.full((2, 4), 1000))],
     ["1000..1000", "outside the model's vocabulary [0, 27)"]),
    (lambda f, t: ["--hf", f / "gpt", "--text", f / "text.txt", "--seq-len", "32",
                   "--sequences", "1000"],
     ["fewer than the 1000 asked for", "--sequences 15 or less"]),
    (lambda f, t: ["--hf", f / "gpt", "--text", _text(t, "a cat"), "--seq-len", "8"],
     ["has 2 tokens, fewer than one sequence of 8 tokens"]),
    (lambda f, t: ["--hf", f / "gpt", "--text", f / "text.txt", "--seq-len", "64"],
     ["--seq-len 64 is longer than the 32 positions"]),
    (lambda f, t: ["--hf", f / "bert", "--tokens", f / "ids.npy"],
     ["sequence classifier", "needs labels", "--labels"]),
    (lambda f, t: ["--hf", f / "bert", "--tokens", f / "ids.npy", "--labels",
                   _bad_file(t, "five.npy", np.zeros(5, dtype=np.int64))],
     ["5 labels for the 6 examples"]),
    (lambda f, t: ["--hf", f / "bert", "--tokens", f / "ids.npy", "--labels",
                   _bad_file(t, "l7.npy", np.full(6, 7))],
     ["labels 7..7", "3 classes"]),
    (lambda f, t: ["--hf", f / "bare", "--tokens", f / "ids.npy"],
     ["GPT2Model", "does not take", "causal language models"]),
    (lambda f, t: ["--hf", f / "gpt", "--tokens", f / "ids.npy", "--model", "mlp"],
     ["--hf takes the model from its folder", "drop --model"]),
    (lambda f, t: ["--hf", f / "gpt"], ["--hf needs the data"]),
    (lambda f, t: ["--hf", f / "gpt", "--tokens", f / "ids.npy", "--seq-len", "8"],
     ["drop --seq-len"]),
    (lambda f, t: ["--hf", f / "gpt", "--images", f / "ids.npy"],
     ["is a causal language model", "takes token ids", "not --images"]),
    (lambda f, t: ["--hf", f / "gpt", "--tokens", f / "ids.npy", "--labels",
                   f / "labels.npy"],
     ["labels of shape (6,)", "one label per token, (N, 16)"]),
    (lambda f, t: ["--tokens", f / "ids.npy"], ["--tokens belongs to --hf"]),
    (lambda f, t: ["--hf", f / "gpt", "--tokens", t / "none.npy"], ["none.npy does not exist"]),
    (lambda f, t: ["--hf", f / "gpt", "--tokens", f / "text.txt"], ["expected a .pt file"]),
], ids=["missing", "file", "no-config", "text-no-tokenizer", "shape", "dtype", "vocab",
        "few-sequences", "few-tokens", "positions", "no-labels", "label-count", "label-range",
        "architecture", "zoo-flag", "no-data", "seq-len-tokens", "images", "token-labels",
        "without-hf",
        "missing-file", "suffix"])
def test_bad_input_exits_2_with_one_line_and_no_folder(make, words, files, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _run(capsys, *make(files, tmp_path), "--out", out, "--quiet")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("hesslens analyze: error: ")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists()


def _text(root, text):
    path = root / "short.txt"
    path.write_text(text)
    return path


def test_a_folder_without_weights_is_named(files, tmp_path, capsys):
    folder = tmp_path / "config-only"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)
    code, _, err = _run(capsys, "--hf", folder, "--tokens", files / "ids.npy", "--out",
                        tmp_path / "o")
    assert code == 2 and "no weights" in err and "save_pretrained" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_shares_the_sequences_and_equals_one_process(files, tmp_path):
    argv = ["analyze", "--hf", str(files / "gpt"), "--tokens", str(files / "ids.npy"),
            "--sequences", "4", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "hesslens", *argv, "--out", str(tmp_path / "ddp")], capture_output=True,
        text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert ddp["run"]["parallel"]["world_size"] == 2 and ddp["run"]["num_samples"] == 4
    assert ddp["num_samples"] == one["num_samples"] == 4 * (SEQ - 1)  # the predicted tokens
    for name in ["full", *one["layers"]]:
        a = one["full"] if name == "full" else one["layers"][name]
        b = ddp["full"] if name == "full" else ddp["layers"][name]
        assert b["top_eigenvalues"] == pytest.approx(a["top_eigenvalues"], rel=1e-8)
        assert b["trace"]["value"] == pytest.approx(a["trace"]["value"], rel=1e-8)
