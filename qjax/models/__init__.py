"""Reference models for configs, demos and benchmarks."""

from qjax.models.llama import Llama, LlamaConfig, quantization_rules

__all__ = ["Llama", "LlamaConfig", "quantization_rules"]
