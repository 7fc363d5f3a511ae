"""nvila: a PyTorch-native toolkit for NVILA vision-language models.

Data path (one module per stage): media -> tiling -> processor -> vision -> projector -> temporal
-> llm -> model. ``config`` and ``checkpoint`` translate the published layout at the edge.
"""

from .config import NVILAConfig
from .model import NVILAForConditionalGeneration
from .processor import NVILAInputs, NVILAProcessor

__all__ = ["NVILAConfig", "NVILAForConditionalGeneration", "NVILAInputs", "NVILAProcessor"]
__version__ = "0.1.0"
