"""Deployment quantization: SmoothQuant W8A8 and AWQ W4A16, a documented checkpoint format, runtime linears.

* ``linear``: the runtime modules (``W8A8Linear``, ``W4A16Linear``) and their per-device kernels;
* ``format``: the ``nvila_quant`` safetensors metadata and the module swap the loader applies;
* ``groups`` / ``smoothquant`` / ``awq``: the algorithms, layer by layer;
* ``calib``: calibration text, tiles and input statistics;
* ``handler``: ``quantize_model`` (in memory) and ``quantize_checkpoint`` (directory -> directory);
* ``cli``: the ``nvila quantize`` subcommand.

This package imports no model code at import time, so ``nvila.model`` can depend on ``format``.
"""

from .format import METADATA_KEY, apply_quant_metadata, read_quant_metadata
from .linear import SCHEMES, QuantLinear, W4A16Linear, W8A8Linear

__all__ = ["METADATA_KEY", "SCHEMES", "QuantLinear", "W4A16Linear", "W8A8Linear", "apply_quant_metadata",
           "read_quant_metadata"]
