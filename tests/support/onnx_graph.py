"""What an exported ONNX graph holds, for the export tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def int64_constant_elements(path: Path) -> int:
    """How many int64 values an ONNX graph holds as initializers and Constant nodes: a cache write exported as a
    scatter with a constant index the size of the cache shows up here (serve/models/dit.py `write_cache`)."""
    import onnx

    model = onnx.load(str(path))
    int64 = onnx.TensorProto.INT64
    count = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == int64)
    for node in model.graph.node:
        count += sum(int(np.prod(a.t.dims)) for a in node.attribute if a.type == a.TENSOR and a.t.data_type == int64)
    return count
