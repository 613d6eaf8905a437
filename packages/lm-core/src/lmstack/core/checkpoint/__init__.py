"""Reading and writing Hugging Face checkpoint directories."""

from lmstack.core.checkpoint._load import checkpoint_files, load_pretrained, tensor_specs
from lmstack.core.checkpoint._save import parse_size, save_pretrained

__all__ = ["checkpoint_files", "load_pretrained", "parse_size", "save_pretrained", "tensor_specs"]
