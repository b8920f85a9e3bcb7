"""Random probe vectors for stochastic estimators.

Probes are drawn from the given generator where it lives (the estimators' generators are on the
CPU), then cast and moved: the same seed gives the same probes on every device and in every
dtype. Rademacher probes are drawn directly
in the requested dtype (``k * dim`` entries of it, no larger temporary); Gaussian ones in float64
and then cast. Drawing Rademacher probes a few rows at a time from one generator gives the same
rows as drawing them all at once (the estimators rely on this to bound their memory).

Example
-------
>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> random_probes(2, 3, generator=g).abs()
tensor([[1., 1., 1.],
        [1., 1., 1.]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from hesslens.checks import check_seed
from hesslens.errors import HesslensInputError

__all__ = ["DISTRIBUTIONS", "check_distribution", "generator", "random_probes"]

#: The probe distributions :func:`random_probes` knows: both have ``E[v v^T] = I``.
DISTRIBUTIONS = ("rademacher", "gaussian")


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: the one place :mod:`hesslens.linalg` makes its
    generators, so every estimator refuses a seed outside ``0 .. 2**32 - 1`` by name
    (:func:`hesslens.checks.check_seed`) instead of overflowing inside torch.

    >>> generator(0).initial_seed()
    0
    >>> generator(2**70)
    Traceback (most recent call last):
    ...
    hesslens.errors.HesslensInputError: seed must be an integer in [0, 4294967295] ...
    """
    return torch.Generator().manual_seed(check_seed(seed))


def check_distribution(distribution: str) -> None:
    """Raise ``ValueError`` naming the allowed distributions for an unknown one."""
    if distribution not in DISTRIBUTIONS:
        raise HesslensInputError(
            f"unknown probe distribution {distribution!r}; choose one of {DISTRIBUTIONS}"
        )


def random_probes(
    k: int,
    dim: int,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``k`` random probe vectors of length ``dim`` with ``E[v v^T] = I``.

    Parameters
    ----------
    k, dim : int
        Number and length of the probes.
    distribution : {"rademacher", "gaussian"}
        Rademacher: independent signs +-1 (the lowest-variance choice for Hutchinson);
        Gaussian: independent standard normals (rotation invariant).
    generator : torch.Generator, optional
        Generator to draw from, on the device it lives on; ``None`` uses torch's global CPU
        generator.
    dtype : torch.dtype, optional
        Dtype of the result (default: torch's default dtype).
    device : torch.device or str, optional
        Device of the result (default: CPU).

    Returns
    -------
    Tensor
        ``(k, dim)`` tensor of probes.

    Raises
    ------
    ValueError
        For an unknown distribution or negative sizes.

    Examples
    --------
    >>> import torch
    >>> a = random_probes(3, 5, "gaussian", torch.Generator().manual_seed(1))
    >>> b = random_probes(3, 5, "gaussian", torch.Generator().manual_seed(1), torch.float32)
    >>> torch.equal(a.float(), b)
    True
    """
    if k < 0 or dim < 0:
        raise HesslensInputError(f"probe sizes must be nonnegative, got k={k}, dim={dim}")
    check_distribution(distribution)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    # drawn where the generator lives (a CUDA generator draws on its GPU), then moved
    where = generator.device if generator is not None else torch.device("cpu")
    if distribution == "rademacher":
        # drawn straight in ``dtype`` (+-1 is exact in every float dtype, and torch's randint
        # gives the same bits whatever the dtype): no float64 or int64 temporary of k * dim
        draw_dtype = dtype if dtype.is_floating_point else torch.float64
        out = torch.randint(0, 2, (k, dim), generator=generator, dtype=draw_dtype, device=where)
        out = out.mul_(2.0).sub_(1.0)
    else:
        out = torch.randn(k, dim, generator=generator, dtype=torch.float64, device=where)
    return out.to(dtype=dtype, device=device)
