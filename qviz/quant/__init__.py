"""Weight quantization: configs, the METHODS registry, primitives, the engine, memory accounting."""

from qviz.quant.config import QuantConfig, QuantPlan
from qviz.quant.engine import QuantEngine, engine_for, quantized
from qviz.quant.gptq import GPTQCancelled
from qviz.quant.memory import Footprint, footprint
from qviz.quant.methods import METHODS, Method
from qviz.quant.primitives import QTensor, dequantize, fake_quantize, quantize

__all__ = [
    "METHODS",
    "Footprint",
    "GPTQCancelled",
    "Method",
    "QTensor",
    "QuantConfig",
    "QuantEngine",
    "QuantPlan",
    "dequantize",
    "engine_for",
    "fake_quantize",
    "footprint",
    "quantize",
    "quantized",
]
