"""The zoo: the networks and data sets the paper's study uses, ready to build and load.

Models (all deterministic given the torch seed; no dropout): :func:`mlp`, :func:`cnn1d`,
:func:`lenet5`, :func:`vgg11`, :func:`vgg11_bn`, :func:`resnet20`, :func:`resnet18`, by name
through :data:`MODELS` and :func:`build_model`.

Data sets (never downloaded): ``"mnist1d"`` and ``"digits"`` built in; ``"mnist"``,
``"fashionmnist"``, ``"svhn"``, ``"cifar10"``, ``"cifar100"`` from local files; by name through
:data:`DATASETS`, :func:`dataset_info` and :func:`load_dataset`. :func:`analysis_subset` picks the
fixed k-per-class set the Hessian is measured on.

Example:
    >>> import hesslens.zoo as zoo
    >>> ds = zoo.load_dataset("digits")
    >>> model = zoo.build_model("lenet", ds.input_shape, ds.num_classes, seed=0)
    >>> x, y = zoo.analysis_subset(*ds.train, per_class=10, seed=0)
    >>> model(x).shape
    torch.Size([100, 10])
"""

from hesslens.zoo.cnn1d import CNN1D, cnn1d
from hesslens.zoo.dataset import (
    Dataset,
    analysis_subset,
    batches,
    split_train_val,
    subset_indices,
)
from hesslens.zoo.datasets import DATASETS, DatasetInfo, dataset_info, load_dataset
from hesslens.zoo.lenet import LeNet5, lenet5
from hesslens.zoo.mlp import MLP, mlp
from hesslens.zoo.models import MODELS, build_model
from hesslens.zoo.resnet import BasicBlock, CifarResNet, resnet18, resnet20
from hesslens.zoo.vgg import VGG, vgg11, vgg11_bn

__all__ = [
    "CNN1D",
    "DATASETS",
    "MLP",
    "MODELS",
    "VGG",
    "BasicBlock",
    "CifarResNet",
    "Dataset",
    "DatasetInfo",
    "LeNet5",
    "analysis_subset",
    "batches",
    "build_model",
    "cnn1d",
    "dataset_info",
    "lenet5",
    "load_dataset",
    "mlp",
    "resnet18",
    "resnet20",
    "split_train_val",
    "subset_indices",
    "vgg11",
    "vgg11_bn",
]
