"""Shared fixtures of the training tests: tiny float64 models with a dense reference Hessian."""

from __future__ import annotations



