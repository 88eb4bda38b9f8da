"""fp8 (E4M3) post-training quantization of the DiT with NVIDIA ModelOpt.

Linear layers of the transformer blocks get per-tensor fp8 weight and activation quantizers (explicit Q/DQ once
exported, which TensorRT 11 fuses into fp8 GEMMs). Everything the reference keeps precise stays unquantized: norms,
modulation, the time and text embeddings, the patch embedding and the head (reference/trt.md §1.3).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from fnmatch import fnmatch

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
