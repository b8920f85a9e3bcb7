"""A Hugging Face model from a local folder written by ``save_pretrained``: :func:`load_hf_folder`.

Nothing is ever downloaded (``local_files_only=True``) and no code from the folder is run (no
``trust_remote_code``). The model class comes from ``config.json``'s ``architectures``, through
the table :data:`HF_TASKS`: causal language models (``...ForCausalLM``, ``...LMHeadModel``),
masked language models, sequence classifiers and image classifiers; any other architecture is
refused by name. The tokenizer is loaded when the folder has one (:data:`TOKENIZER_FILES`).

The language models get the loss of :func:`hesslens.zoo.hf_models.causal_lm_loss` (and its
unshifted form, :func:`~hesslens.zoo.hf_models.masked_lm_loss`): Hugging Face's own casts the
logits to float32, which would make a float64 analysis only float32-accurate.

Example:
    >>> import tempfile
    >>> import transformers
    >>> folder = tempfile.mkdtemp()
    >>> config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11,
    ...                                  n_positions=16, bos_token_id=0, eos_token_id=0)
    >>> transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    >>> hf = load_hf_folder(folder)
    >>> hf.task.name, type(hf.model).__name__, hf.tokenizer is None, hf.positions
    ('causal language model', 'GPT2LMHeadModel', True, 16)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from hesslens.errors import HesslensInputError
from hesslens.zoo.hf_models import causal_lm_loss, import_transformers, masked_lm_loss

__all__ = ["HF_TASKS", "TOKENIZER_FILES", "WEIGHT_FILES", "HFFolder", "HFTask",
           "check_hf_folder", "hf_task", "load_hf_folder"]

#: Files ``save_pretrained`` writes the weights into (one of them, or its index when sharded).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")

#: Files that mean the folder holds a tokenizer (``tokenizer.save_pretrained``).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class HFTask:
    """One row of the table of models ``hesslens analyze --hf`` takes.

    ``suffixes``: endings of the class names in ``config.architectures``; ``auto_class``: the
    ``transformers`` class that loads it; ``input_key``: the keyword its inputs go in;
    ``labels``: ``"ids"`` (the token ids themselves: next-token prediction), ``"masked"``
    (seeded masks of the ids) or ``"given"`` (the user's labels file).
    """

    name: str
    suffixes: tuple[str, ...]
    auto_class: str
    input_key: str
    labels: str


HF_TASKS = (
    HFTask("causal language model", ("ForCausalLM", "LMHeadModel"), "AutoModelForCausalLM",
           "input_ids", "ids"),
    HFTask("masked language model", ("ForMaskedLM",), "AutoModelForMaskedLM", "input_ids",
           "masked"),
    HFTask("sequence classifier", ("ForSequenceClassification",),
           "AutoModelForSequenceClassification", "input_ids", "given"),
    HFTask("image classifier", ("ForImageClassification",), "AutoModelForImageClassification",
           "pixel_values", "given"),
)


def hf_task(architectures: object, where: str = "config.json") -> HFTask:
    """The row of :data:`HF_TASKS` for a config's ``architectures`` (its first entry).

    >>> hf_task(["GPT2LMHeadModel"]).auto_class
    'AutoModelForCausalLM'
    >>> try:
    ...     hf_task(["T5ForConditionalGeneration"])
    ... except HesslensInputError as err:
    ...     print(str(err)[:60])
    config.json: the model is a T5ForConditionalGeneration, whic
    """
    if not isinstance(architectures, (list, tuple)) or not architectures or not all(
            isinstance(a, str) for a in architectures):
        raise HesslensInputError(
            f"{where} names no model class ('architectures' is {architectures!r}): save the "
            "model itself with model.save_pretrained(folder), which records its class")
    name = architectures[0]
    for task in HF_TASKS:
        if name.endswith(task.suffixes):
            return task
    kinds = ", ".join(f"{t.name}s (...{'/...'.join(t.suffixes)})" for t in HF_TASKS)
    raise HesslensInputError(
        f"{where}: the model is a {name}, which hesslens analyze --hf does not take: it takes "
        f"{kinds}; save the model class with the head you want to study")


def check_hf_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path`` if it is a folder ``save_pretrained`` wrote (``config.json`` and
    the weights); a named error that says what to give otherwise. Reads nothing."""
    folder = Path(path)
    if not folder.exists():
        raise HesslensInputError(
            f"the Hugging Face model folder {folder} does not exist: give the folder a model "
            "was saved into with save_pretrained (hesslens never downloads; a hub name is not "
            "a folder)")
    if not folder.is_dir():
        raise HesslensInputError(
            f"the Hugging Face model {folder} is a file, not a folder: give the folder "
            "save_pretrained wrote (it holds config.json and the weights)")
    if not (folder / "config.json").is_file():
        raise HesslensInputError(
            f"the folder {folder} holds no config.json, so it is not a model saved with "
            "save_pretrained: save it with model.save_pretrained(folder), or give that folder")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise HesslensInputError(
            f"the folder {folder} holds config.json but no weights ({', '.join(WEIGHT_FILES)}):"
            " save the model with model.save_pretrained(folder) (PyTorch weights)")
    return folder


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _no_progress_bar(tf: Any, quiet: bool) -> Iterator[None]:
    """transformers' own progress bars (loading weights) off while ``quiet``."""
    bars = tf.utils.logging
    was_on = bars.is_progress_bar_enabled()
    if quiet and was_on:
        bars.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            bars.enable_progress_bar()


@dataclass
class HFFolder:
    """A loaded checkpoint folder: its path, config, row of :data:`HF_TASKS`, the model (in
    eval mode, weights as saved) and the tokenizer (``None`` when the folder has none)."""

    path: Path
    config: Any
    task: HFTask
    model: nn.Module
    tokenizer: Any | None

    @property
    def architecture(self) -> str:
        """The model class ``config.json`` names."""
        return str(self.config.architectures[0])

    @property
    def vocab_size(self) -> int | None:
        """The size of the input vocabulary (token models), from the config."""
        value = getattr(self.config, "vocab_size", None)
        return int(value) if isinstance(value, int) else None

    @property
    def positions(self) -> int | None:
        """The most tokens a sequence may have (``n_positions`` or
        ``max_position_embeddings``), when the config says."""
        for key in ("n_positions", "max_position_embeddings"):
            value = getattr(self.config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def record(self) -> dict[str, Any]:
        """What a results file says of the model."""
        return {"path": str(self.path), "architecture": self.architecture,
                "model_class": type(self.model).__name__,
                "model_type": getattr(self.config, "model_type", None),
                "task": self.task.name, "tokenizer": self.tokenizer is not None}


def load_hf_folder(path: str | os.PathLike[str], *, quiet: bool = True) -> HFFolder:
    """Load the model (and the tokenizer, when there is one) saved in the folder ``path``.

    Never downloads and never runs code from the folder; every failure is a
    :class:`HesslensInputError` naming the folder and what to do (:func:`check_hf_folder`,
    :func:`hf_task`, and the loaders' own errors). ``quiet`` hides transformers' progress bar.
    """
    folder = check_hf_folder(path)
    tf = import_transformers(f"the model in {folder}")
    try:
        config = tf.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # unknown model_type, remote code, broken JSON, ...
        raise HesslensInputError(
            f"cannot read {folder / 'config.json'} ({type(err).__name__}: {_one_line(err)}): "
            "hesslens loads the model classes of the installed transformers only (never code "
            "from the folder); upgrade transformers or save a model of a known class"
        ) from None
    task = hf_task(getattr(config, "architectures", None), f"{folder / 'config.json'}")
    auto = getattr(tf, task.auto_class)
    try:
        with _no_progress_bar(tf, quiet):
            model = auto.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise HesslensInputError(
            f"cannot load the {task.name} in {folder} with transformers.{task.auto_class} "
            f"({type(err).__name__}: {_one_line(err)}): save it again with save_pretrained"
        ) from None
    model.eval()
    _keep_dtype_in_loss(model, task)
    return HFFolder(folder, config, task, model, _load_tokenizer(tf, folder))


def _load_tokenizer(tf: Any, folder: Path) -> Any | None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        return tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:
        raise HesslensInputError(
            f"the folder {folder} holds tokenizer files that do not load ({type(err).__name__}:"
            f" {_one_line(err)}): fix them, or give token ids with --tokens") from None


def _keep_dtype_in_loss(model: nn.Module, task: HFTask) -> None:
    """Give a language model whose loss is Hugging Face's standard one the same loss in the
    logits' own dtype (see the module's docstring); leave any other loss alone."""
    if "_loss_function" in vars(model):  # the model's own choice
        return
    loss_type = getattr(model, "loss_type", None)
    if task.labels == "ids" and loss_type in (None, "ForCausalLM"):
        model.loss_function = causal_lm_loss
    elif task.labels == "masked" and loss_type in (None, "ForMaskedLM"):
        model.loss_function = masked_lm_loss
