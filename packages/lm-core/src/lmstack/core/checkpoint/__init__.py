"""Reading and writing Hugging Face checkpoint directories."""

from lmstack.core.checkpoint._load import checkpoint_files, load_pretrained
from lmstack.core.checkpoint._safetensors import TensorInfo, iter_safetensors, read_safetensors_header
from lmstack.core.checkpoint._save import parse_size, save_pretrained

__all__ = [
    "TensorInfo",
    "checkpoint_files",
    "iter_safetensors",
    "load_pretrained",
    "parse_size",
    "read_safetensors_header",
    "save_pretrained",
]
