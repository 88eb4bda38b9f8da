"""fp8 (E4M3) post-training quantization of the DiT with NVIDIA ModelOpt.

Linear layers of the transformer blocks get per-tensor fp8 weight and activation quantizers (explicit Q/DQ once
exported, which TensorRT 11 fuses into fp8 GEMMs). Everything the reference keeps precise stays unquantized: norms,
modulation, the time and text embeddings, the patch embedding and the head (reference/trt.md §1.3).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

from torch import nn

KEEP_PRECISE = ("*norm*", "*modulation*", "*time_embedding*", "*time_projection*", "*text_embedding*",
                "*patch_embedding*", "*head*")  # fmt: skip


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The Linears `fp8_config()` quantizes in a Wan DiT: every nn.Linear, less KEEP_PRECISE.

    The one selection for both fp8 paths: this engine export and serve-time fp8 storage (serve/models/fp8.py).
    ModelOpt matches the patterns against quantizer names (`<module>.weight_quantizer`); every pattern here is
    `*word*`, so matching the module name selects the same modules. ModelOpt's own default exclusions (`*lm_head*`,
    `*router*`, ...) match no Wan name; tests/test_fp8.py checks the two selections agree on the DiT.
    """
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(fnmatch(name, pattern) for pattern in KEEP_PRECISE)
    ]


def fp8_config() -> dict:
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    config["quant_cfg"] += [{"quantizer_name": pattern, "enable": False} for pattern in KEEP_PRECISE]
    return config


def quantize_fp8(model: nn.Module, calibrate: Callable[[nn.Module], None]) -> nn.Module:
    """Fake-quantizes `model` in place after running `calibrate(model)` to collect activation ranges (max)."""
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, fp8_config(), forward_loop=calibrate)


def quantized_modules(model: nn.Module) -> set[str]:
    """Names of the modules with an enabled weight or input quantizer."""
    names = set()
    for name, module in model.named_modules():
        for kind in ("weight_quantizer", "input_quantizer"):
            quantizer = getattr(module, kind, None)
            if quantizer is not None and getattr(quantizer, "is_enabled", False):
                names.add(name)
    return names


def standard_fp8_qdq(model):  # onnx.ModelProto -> onnx.ModelProto
    """Rewrites ModelOpt's `trt::TRT_FP8QuantizeLinear` / `TRT_FP8DequantizeLinear` (inputs: tensor, scale) into the
    standard ONNX `QuantizeLinear(x, scale, zero_point)` with a FLOAT8E4M3FN zero point and `DequantizeLinear(x,
    scale)`, which TensorRT's parser and onnxruntime both read (reference/trt.md §2.1). In place; returns `model`.

    No casts are needed: ModelOpt emits each scale in its input's dtype (bf16 scales in a bf16 graph), as the standard
    ops require. This is the op conversion of ModelOpt's own `FP8QuantExporter.post_process`, without its attention
    rewrites (attention is not quantized here) and without onnx-graphsurgeon.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    zero_point = "fp8_e4m3fn_zero_point"
    graph.initializer.append(helper.make_tensor(zero_point, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    rewritten = []
    for node in graph.node:
        if node.domain == "trt" and node.op_type == "TRT_FP8QuantizeLinear":
            node = helper.make_node("QuantizeLinear", [node.input[0], node.input[1], zero_point], list(node.output),
                                    name=node.name)  # fmt: skip
        elif node.domain == "trt" and node.op_type == "TRT_FP8DequantizeLinear":
            node = helper.make_node("DequantizeLinear", [node.input[0], node.input[1]], list(node.output),
                                    name=node.name)  # fmt: skip
        rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    # The custom ops' inferred value_info is stale once they are standard ops; the trt opset is no longer used.
    del graph.value_info[:]
    kept = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return model


def standard_fp8_qdq_file(path: Path) -> None:
    """`standard_fp8_qdq` on an exported file, in place, then checked. The weights stay in the files the exporter
    wrote beside it: a 1.3B DiT holds about 2.4 GiB of them, past protobuf's 2 GiB, so the graph is read without
    them and the checker reads the model by its path (checking it in memory fails to serialize)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    onnx.save(standard_fp8_qdq(model), str(path))
    onnx.checker.check_model(str(path))
