"""``hesslens analyze --hf DIR``: your own Hugging Face model, from a local folder.

The model is loaded from the folder ``save_pretrained`` wrote (:func:`hesslens.zoo.hf_local.
load_hf_folder`: never a download), with its tokenizer when the folder has one, and analysed on
the data of one local file:

* ``--text FILE``: tokenised with the folder's tokenizer as one text and cut into
  ``--seq-len`` token sequences, the first ``--sequences`` (default 8);
* ``--tokens FILE``: a ``.pt`` or ``.npy`` integer array of token ids ``(N, T)`` (its rows are
  the sequences; ``--sequences`` keeps the first ones);
* ``--images FILE``: a float array ``(N, C, H, W)`` for an image classifier.

Labels: a causal language model predicts the sequences themselves (its own loss, each next
token); a masked language model predicts 15 % of its tokens, masked with the tokenizer's mask
token (seeded by ``--seed``); a classifier needs ``--labels FILE`` (one class index per
example). ``--labels`` gives a language model labels of its own ((N, T) token ids, -100 where
nothing is predicted). :func:`preflight_hf` checks all of it, the model's forward on the data
included, before the command writes anything.

Example (shell)::

    hesslens analyze --hf runs/my-gpt --text corpus.txt --seq-len 64 --sequences 8
    hesslens analyze --hf runs/my-bert-classifier --tokens ids.npy --labels labels.npy
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hesslens.curvature.blocks import resolve_blocks
from hesslens.errors import HesslensInputError
from hesslens.experiments.common import positive_int, resolve_dtype, show_progress
from hesslens.experiments.preflight import check_ready
from hesslens.zoo.hf_data import (
    check_given_labels,
    check_images,
    check_token_ids,
    masked_lm_labels,
    read_array,
    text_token_ids,
)
from hesslens.zoo.hf_local import HFFolder, check_hf_folder, load_hf_folder
from hesslens.zoo.tasks import check_token_labels

__all__ = ["DEFAULT_SEQUENCES", "DEFAULT_SEQ_LEN", "HF_OPTIONS", "HFReady", "add_hf_arguments",
           "preflight_hf", "refuse_hf_options"]

#: Sequences taken from a ``--text`` file when ``--sequences`` is not given (fewer if the text
#: holds fewer).
DEFAULT_SEQUENCES = 8
#: Tokens a ``--text`` sequence when ``--seq-len`` is not given (fewer if the model has fewer
#: positions).
DEFAULT_SEQ_LEN = 128

#: The options that belong to ``--hf`` (argparse destinations -> flags).
HF_OPTIONS = {"text": "--text", "tokens": "--tokens", "images": "--images",
              "labels": "--labels", "seq_len": "--seq-len", "sequences": "--sequences"}
#: The zoo's options, which ``--hf`` replaces.
_ZOO_OPTIONS = {"model": "--model", "data": "--data", "data_root": "--data-root",
                "checkpoint": "--checkpoint", "per_class": "--per-class"}


def add_hf_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--hf`` and its data options to ``hesslens analyze``."""
    g = parser.add_argument_group(
        "your own Hugging Face model (instead of --model/--data)",
        "a folder written by save_pretrained (never downloaded) and the data of one local "
        "file; labels: a causal LM predicts its own tokens, a masked LM 15% of them (seeded "
        "masks), a classifier needs --labels")
    g.add_argument("--hf", default=None, metavar="DIR",
                   help="the model folder (config.json and weights; its tokenizer if saved)")
    g.add_argument("--text", default=None, metavar="FILE",
                   help="a UTF-8 text, tokenised with the folder's tokenizer and cut into "
                        "--seq-len token sequences")
    g.add_argument("--tokens", default=None, metavar="FILE",
                   help="token ids: a .pt or .npy integer array (sequences, tokens)")
    g.add_argument("--images", default=None, metavar="FILE",
                   help="an image classifier's inputs: a .pt or .npy float array (N, C, H, W)")
    g.add_argument("--labels", default=None, metavar="FILE",
                   help="a .pt or .npy of labels: one class index per example (classifiers), "
                        "or (N, T) token ids with -100 (language models)")
    g.add_argument("--seq-len", type=positive_int, default=None, metavar="T",
                   help=f"tokens per --text sequence (default {DEFAULT_SEQ_LEN}, or the "
                        "model's positions if fewer)")
    g.add_argument("--sequences", type=positive_int, default=None, metavar="N",
                   help=f"analyse the first N sequences (default: {DEFAULT_SEQUENCES} of a "
                        "--text, all rows of a --tokens or --images file)")


def refuse_hf_options(args: argparse.Namespace) -> None:
    """Without ``--hf``, refuse its data options by name."""
    given = [flag for dest, flag in HF_OPTIONS.items() if getattr(args, dest, None) is not None]
    if given:
        raise HesslensInputError(
            f"{given[0]} belongs to --hf: give --hf DIR (a folder written by save_pretrained), "
            f"or drop {given[0]} to analyse a zoo model")


def _check_options(args: argparse.Namespace) -> str:
    """The flags that cannot go together; returns the data option given."""
    for dest, flag in _ZOO_OPTIONS.items():
        if getattr(args, dest, None) is not None:
            raise HesslensInputError(
                f"--hf takes the model from its folder and the data from --text, --tokens or "
                f"--images: drop {flag}")
    sources = [flag for flag in ("--text", "--tokens", "--images")
               if getattr(args, flag[2:]) is not None]
    if not sources:
        raise HesslensInputError(
            "--hf needs the data to analyse the model on: give --text FILE (with the folder's "
            "tokenizer), --tokens FILE (token ids) or --images FILE")
    if len(sources) > 1:
        raise HesslensInputError(
            f"give one of {' and '.join(sources)}: the model is analysed on one file")
    if args.seq_len is not None and sources[0] != "--text":
        raise HesslensInputError(
            f"--seq-len cuts a --text into sequences; the sequences of {sources[0]} are its "
            "rows: drop --seq-len")
    return sources[0]


@dataclass
class HFReady:
    """What :func:`preflight_hf` checked and built: the loaded folder, the examples and their
    labels (CPU), the record of where they came from, the blocks' preset, the number of
    trainable parameters and the ``--dtype``."""

    hf: HFFolder
    x: torch.Tensor
    y: torch.Tensor
    source: dict[str, Any]
    layers: str
    n_params: int
    dtype: torch.dtype | None

    def batches(self, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """One batch of ``x`` and ``y`` as the model takes it (its own loss from
        ``labels``)."""
        return [{self.hf.task.input_key: x, "labels": y}]


def preflight_hf(args: argparse.Namespace) -> HFReady:
    """Every check of ``hesslens analyze --hf`` before any work: the flags, transformers and
    matplotlib, the device and the output folder, the model folder and the data files, then
    the model, its data and labels, the blocks of ``--layers`` and one forward of the model on
    the data. Creates nothing."""
    source = _check_options(args)
    check_ready(out=args.out, device=args.device,
                needs={"transformers": "hesslens analyze --hf",
                       "matplotlib": "the figures of the report"})
    dtype = resolve_dtype(args.dtype)
    check_hf_folder(args.hf)
    for flag in (source, "--labels"):  # the files exist before the model is loaded
        value = getattr(args, flag[2:])
        if value is not None and not Path(value).is_file():
            raise HesslensInputError(
                f"{flag} {value} " + ("is not a file (a folder?)" if Path(value).exists()
                                      else "does not exist") + ": give a file on this machine")
    hf = load_hf_folder(args.hf, quiet=not show_progress(args))
    x, record = _inputs(args, hf, source)
    x, y = _labels(args, hf, x, source, record.pop("rows"))
    if hf.task.labels == "masked" and args.labels is None:
        record["mask_seed"] = args.seed
    layers = "transformer" if args.layers == "auto" else args.layers
    n_params = _check_model(args, hf, x, y, layers, source)
    return HFReady(hf, x, y, {**record, "labels": args.labels,
                              "num_samples": len(x)}, layers, n_params, dtype)


def _inputs(args: argparse.Namespace, hf: HFFolder,
            source: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The examples (token ids or images) of the data file, and a record of them."""
    task, what = hf.task, f"{source} {getattr(args, source[2:])}"
    images = task.input_key == "pixel_values"
    if images != (source == "--images"):
        article = "an" if task.name[0] in "aeiou" else "a"
        raise HesslensInputError(
            f"the model in {hf.path} is {article} {task.name} ({hf.architecture}), which takes "
            + ("images: give --images FILE" if images else
               "token ids: give --text FILE or --tokens FILE") + f", not {source}")
    record: dict[str, Any] = {"kind": source[2:], "path": str(getattr(args, source[2:]))}
    if source == "--images":
        x = check_images(read_array(args.images, "--images"),
                         getattr(hf.config, "num_channels", None), what)
        record["rows"] = len(x)
        x = x.to(next(hf.model.parameters()).dtype)
        return _first(x, args.sequences, what), record
    if source == "--text":
        if hf.tokenizer is None:
            raise HesslensInputError(
                f"--text needs the folder's tokenizer to turn the text into token ids, and "
                f"{hf.path} has none: save it beside the model (tokenizer.save_pretrained("
                "folder)) or give token ids with --tokens FILE")
        seq_len = args.seq_len or min(DEFAULT_SEQ_LEN, hf.positions or DEFAULT_SEQ_LEN)
        if hf.positions is not None and seq_len > hf.positions:
            raise HesslensInputError(
                f"--seq-len {seq_len} is longer than the {hf.positions} positions of the model "
                f"in {hf.path}: give --seq-len {hf.positions} or less")
        x = text_token_ids(hf.tokenizer, args.text, seq_len, args.sequences)
        record.update(seq_len=seq_len, rows=len(x))
        x = check_token_ids(x if args.sequences else x[:DEFAULT_SEQUENCES], hf.vocab_size,
                            hf.positions, what)
    else:
        x = check_token_ids(read_array(args.tokens, "--tokens"), hf.vocab_size, hf.positions,
                            what)
        record["rows"] = len(x)
        x = _first(x, args.sequences, what)
    if task.labels == "ids" and x.shape[1] < 2 and args.labels is None:
        raise HesslensInputError(
            f"{what}: sequences of one token, but a causal language model predicts each next "
            "token: give sequences of 2 tokens or more")
    return x, record


def _first(x: torch.Tensor, n: int | None, what: str) -> torch.Tensor:
    if n is not None and n > len(x):
        raise HesslensInputError(
            f"{what} holds {len(x)} examples, fewer than --sequences {n}: give --sequences "
            f"{len(x)} or less")
    return x if n is None else x[:n]


def _labels(args: argparse.Namespace, hf: HFFolder, x: torch.Tensor, source: str,
            rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``: the labels file's, or the task's own (see the module). A labels
    file goes row for row with a --tokens or --images file (``rows`` of them) and is cut as
    it is; for a --text, its first labels go with the sequences analysed."""
    task = hf.task
    what = f"--labels {args.labels}"
    if args.labels is None:
        if task.labels == "ids":
            return x, x.clone()
        if task.labels == "masked":
            mask = getattr(hf.tokenizer, "mask_token_id", None)
            if not isinstance(mask, int):
                raise HesslensInputError(
                    f"the masked language model in {hf.path} needs its tokenizer's mask token "
                    "to mask the inputs, and the folder has " + (
                        "no tokenizer" if hf.tokenizer is None else "a tokenizer without one")
                    + ": give --tokens with the masks in place and --labels FILE ((N, T) ids, "
                    "-100 where nothing is predicted)")
            return masked_lm_labels(x, mask, hf.tokenizer.all_special_ids, seed=args.seed)
        raise HesslensInputError(
            f"the {task.name} in {hf.path} ({hf.architecture}) needs labels: give --labels "
            "FILE, a .pt or .npy of one class index per example")
    y = read_array(args.labels, "--labels")
    if y.dim() == 0 or (len(y) != rows if source != "--text" else len(y) < len(x)):
        raise HesslensInputError(
            f"{what} holds {len(y) if y.dim() else 'no'} labels for the "
            f"{rows if source != '--text' else len(x)} examples of {source}: give one label "
            "per example, in the same order")
    y = y[:len(x)]
    if task.labels == "given":
        return x, check_given_labels(y, len(x), hf.config, what)
    if y.dim() != 2 or y.shape[1] != x.shape[1]:
        raise HesslensInputError(
            f"{what} holds labels of shape {tuple(y.shape)}; the {task.name} takes one label "
            f"per token, (N, {x.shape[1]}), -100 where nothing is predicted")
    if not y.dtype.is_floating_point and y.dtype != torch.bool:
        y = y.to(torch.int64)
    check_token_labels(x, y, hf.vocab_size or int(x.max()) + 1, what)
    return x, y


def _check_model(args: argparse.Namespace, hf: HFFolder, x: torch.Tensor, y: torch.Tensor,
                 layers: str, source: str) -> int:
    """The blocks of ``layers``, ``--k`` within the Hessian's dimension, and one forward of
    the model on its first two examples (without gradients); returns the number of trainable
    parameters."""
    trainable = [name for name, p in hf.model.named_parameters() if p.requires_grad]
    if not trainable:
        raise HesslensInputError(f"the model in {hf.path} has no trainable parameters")
    try:
        resolve_blocks(hf.model, layers, trainable)
    except HesslensInputError as err:
        raise HesslensInputError(
            f"{err} (--layers {layers} on {hf.architecture}): give --layers modules for one "
            "block per module") from None
    n_params = sum(p.numel() for p in hf.model.parameters() if p.requires_grad)
    if args.k > n_params:
        raise HesslensInputError(
            f"--k {args.k} is larger than the dimension of the Hessian of the model in "
            f"{hf.path} ({n_params} parameters): ask for at most --k {n_params}")
    try:  # two examples: enough for what one cannot show (padding a batch needs), and cheap
        with torch.no_grad():
            out = hf.model(**{hf.task.input_key: x[:2], "labels": y[:2]})
    except Exception as err:
        raise HesslensInputError(
            f"the model in {hf.path} fails on the data of {source} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:240]}): give data the model takes, or fix the "
            "setting its config.json lacks") from None
    loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or not bool(torch.isfinite(loss).all()):
        raise HesslensInputError(
            f"the model in {hf.path} gives no finite loss on the data of {source} (loss "
            f"{loss if loss is None else float(loss)}): check the data and the labels")
    return n_params
