"""The Triton kernels of kernels/ as the CPU tests run them: interpreted (TRITON_INTERPRET=1, set by
tests/conftest.py where no GPU could compile them), on CPU tensors, against their torch references."""

from __future__ import annotations

import os
from types import ModuleType, SimpleNamespace

import pytest


def interpreted_kernels(module: ModuleType) -> SimpleNamespace:
    """`module.build()` under the interpreter, or the test skipped with the reason it cannot be."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET is not 1 here (a GPU machine): the gpu-marked tests run the kernels compiled")
    if (reason := module.unavailable_reason()) is not None:
        pytest.skip(reason)
    return module.build()
