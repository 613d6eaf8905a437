"""lmstack.core: model definitions, checkpoints, tokenizer and attention backends."""

from lmstack.core._errors import CheckpointError, ConfigError, LMStackError, TokenizerError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "LMStackError", "TokenizerError", "__version__"]
