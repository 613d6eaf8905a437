"""Reading and writing Hugging Face checkpoint directories, and exporting GGUF files for llama.cpp."""

from lmstack.core.checkpoint._gguf import GGUF_TYPES, export_gguf
from lmstack.core.checkpoint._load import checkpoint_files, load_pretrained, tensor_specs
from lmstack.core.checkpoint._save import parse_size, save_pretrained

__all__ = [
    "GGUF_TYPES",
    "checkpoint_files",
    "export_gguf",
    "load_pretrained",
    "parse_size",
    "save_pretrained",
    "tensor_specs",
]
