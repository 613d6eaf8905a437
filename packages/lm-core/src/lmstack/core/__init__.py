"""lmstack.core: model definitions, checkpoints, tokenizer and attention backends.

The bottom of the lmstack stack. Everything a higher layer needs from a model lives here:

* :class:`ModelConfig` / :func:`load_config`: a typed config read from a Hugging Face ``config.json``
  (llama, mistral, qwen2, internlm2, internlm3; every RoPE scaling kind they use).
* :class:`CausalLM`: one decoder-only transformer; attention goes through an
  :class:`AttentionBackend` chosen per call (:class:`DenseAttention`, :class:`PackedAttention`, or a
  paged KV cache implemented by lmstack-infer).
* :func:`load_pretrained` / :func:`save_pretrained`: streaming, atomic Hugging Face checkpoints;
  :func:`atomic_directory`, the one way any layer replaces a directory on disk; :func:`export_gguf`
  writes a model and its tokenizer as one GGUF file for llama.cpp.
* :class:`Tokenizer` / :func:`train_bpe_tokenizer`: ``tokenizer.json`` or sentencepiece, the model's own
  chat template (InternLM2 ChatML built in), byte-level BPE training.
"""

from lmstack.core._atomic import atomic_directory, atomic_write_file
from lmstack.core._config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling, load_config
from lmstack.core._errors import CheckpointError, ConfigError, LMStackError, TokenizerError
from lmstack.core.checkpoint import export_gguf, load_pretrained, save_pretrained
from lmstack.core.model import AttentionBackend, CausalLM, DenseAttention, PackedAttention
from lmstack.core.tokenizer import Tokenizer, train_bpe_tokenizer

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "AttentionBackend",
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "DenseAttention",
    "LMStackError",
    "ModelConfig",
    "PackedAttention",
    "RopeScaling",
    "Tokenizer",
    "TokenizerError",
    "__version__",
    "atomic_directory",
    "atomic_write_file",
    "export_gguf",
    "load_config",
    "load_pretrained",
    "save_pretrained",
    "train_bpe_tokenizer",
]
