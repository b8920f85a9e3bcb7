"""The data a local Hugging Face model is analysed on, from the user's own files.

* :func:`read_array` -- a ``.pt`` (``torch.load(weights_only=True)``: a tensor) or ``.npy``
  (``allow_pickle=False``) file as a tensor; nothing else is read, no code is run.
* :func:`text_token_ids` -- a UTF-8 text file tokenised as one text with the folder's
  tokenizer and cut into consecutive sequences of ``seq_len`` tokens.
* :func:`check_token_ids` -- token ids ``(N, T)``: integers, inside the vocabulary, no longer
  than the model's positions.
* :func:`masked_lm_labels` -- seeded masks for a masked language model (15 % of the tokens
  that are not special, at least one a sequence) and the labels that go with them.
* :func:`check_given_labels`, :func:`check_images` -- a classifier's labels (class indices;
  float targets for regression and multi-label problems) and images ``(N, C, H, W)``.

Every problem is a :class:`~hesslens.errors.HesslensInputError` naming the file, what it
holds and what is expected.

Example:
    >>> import torch
    >>> ids = check_token_ids(torch.tensor([[3, 1, 4], [1, 5, 9]], dtype=torch.int32),
    ...                       vocab_size=10, positions=8, what="tokens.npy")
    >>> ids.dtype, tuple(ids.shape)
    (torch.int64, (2, 3))
    >>> inputs, labels = masked_lm_labels(ids, mask_id=0, special_ids=[], seed=0)
    >>> bool(((labels == -100) | (inputs == 0)).all()), bool((labels != -100).any(1).all())
    (True, True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hesslens.checks import check_positive_int, check_xy
from hesslens.errors import HesslensInputError
from hesslens.zoo.tasks import IGNORE_INDEX

__all__ = ["ARRAY_SUFFIXES", "MASK_RATE", "check_given_labels", "check_images",
           "check_token_ids", "masked_lm_labels", "read_array", "text_token_ids"]

#: The array files :func:`read_array` reads.
ARRAY_SUFFIXES = (".pt", ".npy")

#: The share of the tokens a masked language model's labels mask (BERT's 15 %).
MASK_RATE = 0.15


def _existing_file(path: str | os.PathLike[str], option: str) -> Path:
    file = Path(path)
    if not file.exists():
        raise HesslensInputError(f"{option} {file} does not exist: give a file on this machine")
    if not file.is_file():
        raise HesslensInputError(f"{option} {file} is not a file (a folder?): give a file")
    return file


def read_array(path: str | os.PathLike[str], option: str) -> torch.Tensor:
    """The tensor in the ``.pt`` or ``.npy`` file ``path`` (given as ``option``, for the
    messages). A ``.pt`` file must hold one tensor, a ``.npy`` file one numeric array."""
    file = _existing_file(path, option)
    suffix = file.suffix.lower()
    if suffix not in ARRAY_SUFFIXES:
        raise HesslensInputError(
            f"{option} {file}: expected a .pt file (torch.save of one tensor) or a .npy file "
            f"(numpy.save), got a {suffix or 'file without a suffix'}")
    try:
        if suffix == ".npy":
            value: Any = np.load(file, allow_pickle=False)
        else:
            with open(file, "rb") as f:
                value = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # numpy's and torch's readers raise many types
        raise HesslensInputError(
            f"cannot read {option} {file} ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}): save one tensor with torch.save or one "
            "numeric array with numpy.save") from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise HesslensInputError(
                f"{option} {file} holds an array of dtype {value.dtype}, not numbers: save a "
                "numeric array")
        return torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise HesslensInputError(
            f"{option} {file} holds a {type(value).__name__}, not a tensor: save one tensor "
            "with torch.save(tensor, path)")
    return value


def text_token_ids(tokenizer: Any, path: str | os.PathLike[str], seq_len: int,
                   sequences: int | None = None, option: str = "--text") -> torch.Tensor:
    """The text file ``path`` tokenised as one text (the tokenizer's special tokens included)
    and cut into consecutive sequences of ``seq_len`` tokens, the first ``sequences`` of them
    (``None``: all that fit); the tokens after the last whole sequence are dropped.

    Raises:
        HesslensInputError: no such file, not UTF-8, fewer tokens than one sequence, or fewer
            whole sequences than ``sequences``.
    """
    file = _existing_file(path, option)
    seq_len = check_positive_int(seq_len, "seq_len")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise HesslensInputError(
            f"{option} {file} is not UTF-8 text ({err.reason} at byte {err.start}): give a "
            "UTF-8 text file, or token ids with --tokens") from None
    ids = list(tokenizer(text, verbose=False)["input_ids"])
    whole = len(ids) // seq_len
    if whole == 0:
        raise HesslensInputError(
            f"{option} {file} has {len(ids)} tokens, fewer than one sequence of {seq_len} "
            "tokens: give a longer text or a smaller --seq-len")
    if sequences is not None and check_positive_int(sequences, "sequences") > whole:
        raise HesslensInputError(
            f"{option} {file} holds {whole} sequences of {seq_len} tokens ({len(ids)} tokens),"
            f" fewer than the {sequences} asked for: give --sequences {whole} or less, a "
            "longer text or a smaller --seq-len")
    n = whole if sequences is None else sequences
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def check_token_ids(x: torch.Tensor, vocab_size: int | None, positions: int | None,
                    what: str) -> torch.Tensor:
    """``x`` as int64 token ids ``(N, T)`` if it is a 2-D integer tensor with at least one
    token, every id in ``[0, vocab_size)`` and ``T`` within ``positions`` (``None``: not
    checked); a named error otherwise."""
    if x.dim() != 2 or x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise HesslensInputError(
            f"{what} holds an array of shape {tuple(x.shape)} and dtype "
            f"{str(x.dtype).removeprefix('torch.')}: token ids must be an integer array of "
            "shape (sequences, tokens)")
    if x.numel() == 0:
        raise HesslensInputError(
            f"{what} holds no tokens (shape {tuple(x.shape)}): give at least one sequence of "
            "one token")
    x = x.to(torch.int64)
    low, high = int(x.min()), int(x.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        raise HesslensInputError(
            f"{what}: token ids {low}..{high} lie outside the model's vocabulary "
            f"[0, {vocab_size}): give ids of this model's tokenizer")
    if positions is not None and x.shape[1] > positions:
        raise HesslensInputError(
            f"{what}: sequences of {x.shape[1]} tokens, but the model has {positions} "
            "positions: give sequences of at most that many tokens")
    return x


def masked_lm_labels(ids: torch.Tensor, mask_id: int, special_ids: Sequence[int],
                     seed: int, rate: float = MASK_RATE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` for a masked language model: each token that is not special is
    masked with probability ``rate`` (seeded; at least one token a sequence), replaced by
    ``mask_id`` in ``inputs`` and kept in ``labels``; every other label is -100."""
    candidates = ~torch.isin(ids, torch.tensor(list(special_ids), dtype=ids.dtype))
    if not candidates.any(dim=1).all():
        raise HesslensInputError(
            "a sequence holds special tokens only, so a masked language model has nothing to "
            "predict there: give text or ids with ordinary tokens")
    draw = torch.rand(ids.shape, generator=torch.Generator().manual_seed(int(seed)))
    draw = draw.masked_fill(~candidates, 2.0)  # never below the rate, never the least
    masked = draw < rate
    first = draw.argmin(dim=1, keepdim=True)  # the sequence's best candidate, masked anyway
    masked.scatter_(1, first, True)
    inputs = ids.masked_fill(masked, int(mask_id))
    labels = ids.masked_fill(~masked, IGNORE_INDEX)
    return inputs, labels


def check_given_labels(y: torch.Tensor, n: int, config: Any, what: str) -> torch.Tensor:
    """A classifier's labels, one for each of the ``n`` examples: class indices in
    ``[0, num_labels)`` (``N,``); float targets ``(N,)`` or ``(N, num_labels)`` when the
    config's ``problem_type`` is ``"regression"`` (or it has one label), ``(N, num_labels)``
    of 0/1 for ``"multi_label_classification"``."""
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    problem = getattr(config, "problem_type", None) or (
        "regression" if num_labels == 1 else "single_label_classification")
    if len(y) != n:
        raise HesslensInputError(
            f"{what} holds {len(y)} labels for {n} examples: give one label per example")
    if problem == "single_label_classification":
        check_xy(torch.empty(n, 0), y, what)
        if int(y.min()) < 0 or int(y.max()) >= num_labels:
            raise HesslensInputError(
                f"{what}: labels {int(y.min())}..{int(y.max())} lie outside the model's "
                f"{num_labels} classes [0, {num_labels})")
        return y.to(torch.int64)
    shapes = [(n, num_labels)] + ([(n,)] if problem == "regression" and num_labels == 1 else [])
    if not y.dtype.is_floating_point or tuple(y.shape) not in shapes or not bool(
            torch.isfinite(y).all()):
        raise HesslensInputError(
            f"{what} holds labels of shape {tuple(y.shape)} and dtype "
            f"{str(y.dtype).removeprefix('torch.')}: the model's problem_type is {problem!r}, "
            f"which takes finite float targets of shape "
            f"{' or '.join(str(s) for s in shapes)}")
    if problem == "multi_label_classification" and not bool(((y == 0) | (y == 1)).all()):
        raise HesslensInputError(f"{what}: multi-label targets must be 0 or 1")
    return y


def check_images(x: torch.Tensor, channels: int | None, what: str) -> torch.Tensor:
    """``x`` if it is a finite float tensor of images ``(N, C, H, W)`` with ``channels``
    channels (``None``: not checked)."""
    if x.dim() != 4 or not x.dtype.is_floating_point:
        raise HesslensInputError(
            f"{what} holds an array of shape {tuple(x.shape)} and dtype "
            f"{str(x.dtype).removeprefix('torch.')}: images must be a float array of shape "
            "(N, channels, height, width), preprocessed as the model expects")
    if channels is not None and x.shape[1] != channels:
        raise HesslensInputError(
            f"{what}: images with {x.shape[1]} channels, but the model takes {channels}")
    if len(x) == 0 or not bool(torch.isfinite(x).all()):
        raise HesslensInputError(f"{what}: give at least one image, with finite values")
    return x
