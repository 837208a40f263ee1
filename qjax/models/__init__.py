"""Reference models for configs, demos and benchmarks.

``llama``: the byte-level decoder the training program trains. ``bert``: a BERT encoder in NNX
with a safetensors loader; ``minilm``: all-MiniLM-L6-v2 from its PyPI package (optional extra
``models``). Each module has its own ``quantization_rules``.
"""

from qjax._src.models.bert import MINILM_L6, Bert, BertConfig
from qjax._src.models.llama import Llama, LlamaConfig, quantization_rules
from qjax.models import bert, llama, minilm

__all__ = ["Bert", "BertConfig", "Llama", "LlamaConfig", "MINILM_L6", "bert", "llama", "minilm",
           "quantization_rules"]
