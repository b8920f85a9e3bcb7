"""Token tasks for the zoo's small language model, built in NumPy with no download.

``"modadd"``: modular addition as in Power et al. (2022), "Grokking": every pair ``(a, b)`` of
residues mod ``p`` is the sequence ``a b = c`` with ``c = (a + b) mod p``; the residues are token
ids ``0 .. p-1`` and ``=`` is id ``p`` (vocabulary ``p + 1``). ``"seqcopy"``: a random word of
``length`` symbols, a separator, and the word again (the copy is what is predicted).

Both come as a :class:`TokenDataset`: ``x`` holds int64 token ids ``(N, T)`` and ``y`` the labels
of a causal language model in the Hugging Face convention, ``(N, T)`` and equal to ``x`` at the
positions that are predicted, ``-100`` (:data:`IGNORE_INDEX`) elsewhere; the model shifts them
itself (the logits at ``t - 1`` predict the label at ``t``). The train/test split is a fixed
permutation of all possible sequences drawn from ``seed``, so the two parts are disjoint.

Example:
    >>> from hesslens.zoo.tasks import modadd
    >>> ds = modadd(p=5, train_fraction=0.6, seed=0)
    >>> ds
    TokenDataset(name='modadd', seq_len=4, vocab_size=6, train=15, test=10)
    >>> a, b, eq, c = ds.x_train[0].tolist()
    >>> (a + b) % 5 == c and eq == 5, ds.y_train[0].tolist() == [-100, -100, -100, c]
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hesslens.checks import check_seed
from hesslens.errors import HesslensInputError
from hesslens.splits import split_train_val, subset_indices
from hesslens.zoo._checks import check_positive_int
from hesslens.zoo.dataset import Dataset

IGNORE_INDEX = -100  # label of a position that is not predicted (torch and Hugging Face default)

MODADD_P = 23  # the registered "modadd": 529 sequences, 264 train / 265 test
MODADD_TRAIN_FRACTION = 0.5
SEQCOPY_LENGTH = 4  # the registered "seqcopy": 8**4 = 4096 words, 1024 train / 512 test
SEQCOPY_SYMBOLS = 8
SEQCOPY_TRAIN, SEQCOPY_TEST = 1024, 512


class TokenDataset(Dataset):
    """A token task held in memory: the :class:`~hesslens.zoo.dataset.Dataset` fields, for a
    causal language model.

    Attributes:
        x_train, x_test: int64 token ids in ``[0, vocab_size)``, shape ``(N, T)``.
        y_train, y_test: int64 labels, shape ``(N, T)``: the token where it is predicted,
            :data:`IGNORE_INDEX` elsewhere (at least one label per sequence).
        input_shape: ``(T,)``, the sequence length (what ``build_model`` takes as input shape).
        num_classes: the vocabulary size (the language model's number of outputs).

    >>> x = torch.tensor([[0, 1, 2], [1, 0, 2]])
    >>> y = torch.tensor([[-100, -100, 2], [-100, -100, 2]])
    >>> TokenDataset("toy", x, y, x, y, (3,), 3).vocab_size
    3
    """

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        for split in ("train", "test"):
            check_token_labels(
                getattr(self, f"x_{split}"), getattr(self, f"y_{split}"), self.num_classes,
                f"{self.name} {split}",
            )
            if tuple(getattr(self, f"x_{split}").shape[1:]) != self.input_shape:
                raise HesslensInputError(
                    f"{self.name}: x_{split} has sequence shape "
                    f"{tuple(getattr(self, f'x_{split}').shape[1:])}, but input_shape is "
                    f"{self.input_shape}"
                )

    def __repr__(self) -> str:
        return (
            f"TokenDataset(name={self.name!r}, seq_len={self.input_shape[0]}, "
            f"vocab_size={self.num_classes}, train={len(self.y_train)}, test={len(self.y_test)})"
        )

    @property
    def vocab_size(self) -> int:
        """The number of token ids (``num_classes``)."""
        return self.num_classes

    def train_val_split(
        self, val_fraction: float = 0.1, seed: int = 0
    ) -> tuple[TokenDataset, tuple[torch.Tensor, torch.Tensor]]:
        """Hold out ``val_fraction`` of the training sequences, stratified by first answer token.

        >>> train, (x_val, y_val) = modadd(p=5, train_fraction=0.6).train_val_split(0.2)
        >>> len(train.x_train), len(x_val)
        (12, 3)
        """
        idx = torch.arange(len(self.y_train))
        tr, _, val, _ = split_train_val(
            idx, answer_classes(self.y_train), val_fraction=val_fraction, seed=seed
        )
        train = TokenDataset(
            self.name, self.x_train[tr], self.y_train[tr], self.x_test, self.y_test,
            self.input_shape, self.num_classes,
        )
        return train, (self.x_train[val], self.y_train[val])


def check_token_labels(x: object, y: object, vocab_size: int, what: str = "data") -> None:
    """Raise unless ``x`` are int64 token ids ``(N, T)`` below ``vocab_size`` and ``y`` labels of
    the same shape, each a token id or :data:`IGNORE_INDEX`, at least one per sequence.

    >>> check_token_labels(torch.tensor([[0, 1]]), torch.tensor([[-100, 1]]), 2)
    """
    for value, kind in ((x, "token ids"), (y, "labels")):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.dtype != torch.int64:
            got = (
                f"shape {tuple(value.shape)} and dtype {value.dtype}"
                if isinstance(value, torch.Tensor) else type(value).__name__
            )
            raise HesslensInputError(
                f"{what}: {kind} must be an int64 tensor of shape (sequences, length), got {got}"
            )
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    if x.shape != y.shape:
        raise HesslensInputError(
            f"{what}: token ids have shape {tuple(x.shape)} but labels {tuple(y.shape)}; "
            "give one label (or -100) per token"
        )
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab_size):
        raise HesslensInputError(
            f"{what}: token ids {int(x.min())}..{int(x.max())} lie outside the vocabulary "
            f"[0, {vocab_size})"
        )
    predicted = y != IGNORE_INDEX
    if predicted.any() and (int(y[predicted].min()) < 0 or int(y[predicted].max()) >= vocab_size):
        raise HesslensInputError(
            f"{what}: labels must be token ids in [0, {vocab_size}) or {IGNORE_INDEX}"
        )
    if len(y) and not predicted.any(dim=1).all():
        raise HesslensInputError(
            f"{what}: a sequence has no label other than {IGNORE_INDEX}; every sequence needs "
            "at least one predicted position"
        )


def answer_classes(y: torch.Tensor) -> torch.Tensor:
    """The first predicted token of every sequence (its "class"), from labels ``(N, T)``.

    >>> answer_classes(torch.tensor([[-100, 3, 1], [-100, -100, 2]])).tolist()
    [3, 2]
    """
    predicted = y != IGNORE_INDEX
    first = predicted.int().argmax(dim=1)
    return y.gather(1, first[:, None])[:, 0]


def token_subset(
    x: torch.Tensor, y: torch.Tensor, per_class: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed analysis set of a token task: ``per_class`` sequences per first answer token
    (for ``"modadd"``: per value of ``c``), as :func:`~hesslens.zoo.dataset.analysis_subset`
    does per class.

    >>> xs, ys = token_subset(*modadd(p=23).train, per_class=2, seed=0)
    >>> xs.shape, torch.bincount(answer_classes(ys)).tolist() == [2] * 23
    (torch.Size([46, 4]), True)
    """
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.numel() and y.numel():
        vocab = max(int(x.max()), int(y.max())) + 1
    else:
        vocab = 1
    check_token_labels(x, y, vocab, "token_subset")
    idx = subset_indices(answer_classes(y), per_class=per_class, seed=seed)
    return x[idx], y[idx]


def _split(n: int, n_train: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return order[:n_train], order[n_train : n_train + n_test]


def _dataset(name: str, x: np.ndarray, y: np.ndarray, train, test, vocab: int) -> TokenDataset:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return TokenDataset(
        name, t(x[train]), t(y[train]), t(x[test]), t(y[test]), (x.shape[1],), vocab
    )


def modadd(
    p: int = MODADD_P, train_fraction: float = MODADD_TRAIN_FRACTION, seed: int = 0
) -> TokenDataset:
    """Modular addition ``a b = c``, ``c = (a + b) mod p``: all ``p**2`` pairs, of which
    ``round(train_fraction * p**2)`` (a permutation drawn from ``seed``) train, the rest test.

    Tokens: residues ``0 .. p-1``, ``=`` is ``p``. Labels are :data:`IGNORE_INDEX` except at the
    last position, which holds ``c`` (predicted from the ``=`` token).

    Raises:
        HesslensInputError: ``p < 2``, or a fraction that leaves a split empty.

    >>> ds = modadd(p=7)
    >>> ds.x_train.shape, ds.x_test.shape, ds.vocab_size
    (torch.Size([24, 4]), torch.Size([25, 4]), 8)
    """
    p = check_positive_int(p, "p")
    seed = check_seed(seed)
    n = p * p
    n_train = round(train_fraction * n) if isinstance(train_fraction, (int, float)) else -1
    if p < 2 or not 0 < n_train < n:
        raise HesslensInputError(
            f"modadd needs p >= 2 and a train_fraction in (0, 1) that leaves both splits "
            f"non-empty; got p={p}, train_fraction={train_fraction!r}"
        )
    a, b = np.divmod(np.arange(n), p)
    c = (a + b) % p
    x = np.stack([a, b, np.full(n, p), c], axis=1)
    y = np.full_like(x, IGNORE_INDEX)
    y[:, -1] = c
    train, test = _split(n, n_train, n - n_train, seed)
    return _dataset("modadd", x, y, train, test, p + 1)


def seqcopy(
    length: int = SEQCOPY_LENGTH,
    symbols: int = SEQCOPY_SYMBOLS,
    n_train: int = SEQCOPY_TRAIN,
    n_test: int = SEQCOPY_TEST,
    seed: int = 0,
) -> TokenDataset:
    """Sequence copying ``w SEP w`` for words ``w`` of ``length`` symbols ``0 .. symbols-1``
    (``SEP`` is ``symbols``): distinct words, ``n_train`` + ``n_test`` of the ``symbols**length``
    drawn from ``seed``. The labels are the copy (the last ``length`` positions).

    Raises:
        HesslensInputError: sizes that are not positive, or more words asked than exist.

    >>> ds = seqcopy(length=2, symbols=3, n_train=5, n_test=4)
    >>> w = ds.x_train[0, :2].tolist()
    >>> ds.x_train[0].tolist() == w + [3] + w, ds.y_train[0].tolist() == [-100] * 3 + w
    (True, True)
    """
    length = check_positive_int(length, "length")
    symbols = check_positive_int(symbols, "symbols")
    n_train = check_positive_int(n_train, "n_train")
    n_test = check_positive_int(n_test, "n_test")
    seed = check_seed(seed)
    n = symbols**length
    if n_train + n_test > n:
        raise HesslensInputError(
            f"seqcopy: {n_train} + {n_test} distinct words asked, but there are only "
            f"{symbols}**{length} = {n}; lower n_train/n_test or raise length/symbols"
        )
    train, test = _split(n, n_train, n_test, seed)
    words = np.stack(np.unravel_index(np.arange(n), (symbols,) * length), axis=1)
    x = np.concatenate([words, np.full((n, 1), symbols), words], axis=1)
    y = np.full_like(x, IGNORE_INDEX)
    y[:, length + 1 :] = words
    return _dataset("seqcopy", x, y, train, test, symbols + 1)


@dataclass(frozen=True)
class TaskInfo:
    """What a registered token task is: sequence shape ``(T,)``, vocabulary, one-line text."""

    input_shape: tuple[int, ...]
    num_classes: int
    description: str
    build: Callable[[int], TokenDataset]


TASKS: dict[str, TaskInfo] = {
    "modadd": TaskInfo(
        (4,), MODADD_P + 1,
        f"modular addition a b = (a+b) mod {MODADD_P}, tokens; 264/265 split",
        lambda s: modadd(seed=s),
    ),
    "seqcopy": TaskInfo(
        (2 * SEQCOPY_LENGTH + 1,), SEQCOPY_SYMBOLS + 1,
        f"copy {SEQCOPY_LENGTH} of {SEQCOPY_SYMBOLS} symbols after a separator, tokens; "
        f"{SEQCOPY_TRAIN}/{SEQCOPY_TEST} split",
        lambda s: seqcopy(seed=s),
    ),
}


def load_task(name: str, seed: int = 0) -> TokenDataset:
    """The registered token task ``name`` (:data:`TASKS`) with its split drawn from ``seed``.

    >>> load_task("modadd")
    TokenDataset(name='modadd', seq_len=4, vocab_size=24, train=264, test=265)
    """
    if name not in TASKS:
        raise HesslensInputError(f"unknown token task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name].build(check_seed(seed))
