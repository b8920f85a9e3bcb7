"""The zoo: the networks and data sets the paper's study uses, ready to build and load.

Models (all deterministic given the torch seed; no dropout): :func:`mlp`, :func:`cnn1d`,
:func:`cnn1d3` (the MNIST-1D paper's CNN), :func:`lenet5`, :func:`vgg11`, :func:`vgg11_bn`,
:func:`resnet20`, :func:`resnet18`, and two Hugging Face transformers built from configs,
:func:`gpt_nano` and :func:`vit_tiny` (optional extra ``hesslens[hf]``), by name through
:data:`MODELS` and :func:`build_model`.

Data sets (never downloaded): ``"mnist1d"`` and ``"digits"`` built in; ``"mnist"``,
``"fashionmnist"``, ``"svhn"``, ``"cifar10"``, ``"cifar100"`` from local files; by name through
:data:`DATASETS`, :func:`dataset_info` and :func:`load_dataset`. :func:`analysis_subset` picks the
fixed k-per-class set the Hessian is measured on. Token tasks for ``gpt-nano``: ``"modadd"``
and ``"seqcopy"`` (:mod:`hesslens.zoo.tasks`, a :class:`TokenDataset`; :func:`token_subset`).
:func:`model_batches` and :func:`model_loss` give the batches and ``loss_fn`` each model takes.

Example:
    >>> import hesslens.zoo as zoo
    >>> ds = zoo.load_dataset("digits")
    >>> model = zoo.build_model("lenet", ds.input_shape, ds.num_classes, seed=0)
    >>> x, y = zoo.analysis_subset(*ds.train, per_class=10, seed=0)
    >>> model(x).shape
    torch.Size([100, 10])
"""

from hesslens.zoo.cnn1d import CNN1D, cnn1d, cnn1d3
from hesslens.zoo.dataset import (
    Dataset,
    analysis_subset,
    batches,
    split_train_val,
    subset_indices,
)
from hesslens.zoo.datasets import DATASETS, DatasetInfo, dataset_info, load_dataset
from hesslens.zoo.hf_models import gpt_nano, vit_tiny
from hesslens.zoo.inputs import model_batches, model_input, model_loss
from hesslens.zoo.lenet import LeNet5, lenet5
from hesslens.zoo.mlp import MLP, mlp
from hesslens.zoo.models import MODELS, build_model
from hesslens.zoo.resnet import BasicBlock, CifarResNet, resnet18, resnet20
from hesslens.zoo.tasks import (
    IGNORE_INDEX,
    TASKS,
    TokenDataset,
    answer_classes,
    modadd,
    seqcopy,
    token_subset,
)
from hesslens.zoo.vgg import VGG, vgg11, vgg11_bn

__all__ = [
    "CNN1D",
    "DATASETS",
    "IGNORE_INDEX",
    "MLP",
    "MODELS",
    "TASKS",
    "VGG",
    "BasicBlock",
    "CifarResNet",
    "Dataset",
    "DatasetInfo",
    "LeNet5",
    "TokenDataset",
    "analysis_subset",
    "answer_classes",
    "batches",
    "build_model",
    "cnn1d",
    "cnn1d3",
    "dataset_info",
    "gpt_nano",
    "lenet5",
    "load_dataset",
    "mlp",
    "modadd",
    "model_batches",
    "model_input",
    "model_loss",
    "resnet18",
    "resnet20",
    "seqcopy",
    "split_train_val",
    "subset_indices",
    "token_subset",
    "vgg11",
    "vgg11_bn",
    "vit_tiny",
]
