"""Export a model and its tokenizer as one GGUF file that llama.cpp (and transformers) load.

The writer maps lmstack's Llama family onto llama.cpp's architectures: ``qwen2`` checkpoints become
``qwen2`` (q/k/v biases, rotate-half RoPE), every other type (llama, mistral, internlm2, internlm3)
becomes ``llama``. InternLM2 needs nothing special: lmstack loads its packed ``wqkv`` into the Llama
layout, which is what is written. For ``llama``, the q and k projections' rows are reordered from
Hugging Face's rotate-half RoPE to llama.cpp's pairwise one (the permutation llama.cpp's own converter
applies); ``qwen2`` runs rotate-half RoPE in llama.cpp and keeps the rows as they are.

RoPE scaling: ``linear`` and ``yarn`` (the default attention factor, truncated correction range) are
written as llama.cpp's scaling keys; ``llama3`` as the ``rope_freqs`` tensor of per-frequency divisors
llama.cpp applies; ``dynamic`` NTK has no GGUF equivalent and is refused unless
``dynamic_rope_as_plain=True``, which writes plain RoPE (identical up to ``max_position_embeddings``,
which is where dynamic NTK starts to differ).

The tokenizer: a byte-level BPE ``tokenizer.json`` becomes a ``gpt2`` vocabulary (tokens, types,
merges, pre-tokenizer name), a SentencePiece ``tokenizer.model`` a ``llama`` one (pieces, scores,
types); both with the special token ids, whether encoding adds bos/eos, and the chat template.

The file is written atomically: to a hidden sibling that is renamed over the target once complete.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmstack.core._atomic import atomic_file
from lmstack.core._config import ModelConfig, yarn_attention_factor
from lmstack.core._errors import CheckpointError, ConfigError, TokenizerError

if TYPE_CHECKING:
    from lmstack.core.model import CausalLM
    from lmstack.core.tokenizer import Tokenizer

__all__ = ["GGUF_TYPES", "export_gguf"]

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
"""The tensor types :func:`export_gguf` writes (``type=``)."""

_INSTALL_HINT = "pip install 'lmstack-core[gguf]'"

# GGUF token types (llama.cpp's llama_token_type; SentencePiece's piece types use the same numbers).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes and llama.cpp's name for each (tokenizer.ggml.pre). A byte-level BPE
# splits text with one of these before merging; llama.cpp must split the same way.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:
        raise CheckpointError(f"writing GGUF files needs the gguf package: `{_INSTALL_HINT}`.") from exc
    return gguf


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------


def _rope_rows_to_pairwise(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder a q or k projection's output rows (or bias) from rotate-half RoPE to llama.cpp's pairwise.

    Hugging Face's Llama rotates dimension ``i`` of a head with ``i + head_dim/2``; llama.cpp's
    ``llama`` architecture rotates ``2i`` with ``2i + 1``. Within each head, row ``j`` of the first
    half goes to ``2j`` and row ``j`` of the second half to ``2j + 1``: both then compute the same
    attention scores.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    halves = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])  # [head, half, j, ...]
    return np.ascontiguousarray(halves.swapaxes(1, 2).reshape(weight.shape))  # [head, j, half, ...]


@dataclass
class _Tensor:
    """One GGUF tensor: its name and how to produce its float32 values from the state dict."""

    name: str
    make: Callable[[], np.ndarray]
    shape: tuple[int, ...]


def _arch_of(config: ModelConfig) -> str:
    return "qwen2" if config.model_type == "qwen2" else "llama"


def _check_supported(config: ModelConfig, *, dynamic_rope_as_plain: bool) -> None:
    if config.mlp_bias:
        raise ConfigError(
            "this model has feed-forward biases (mlp_bias), which llama.cpp's llama architecture does not "
            "load; GGUF export supports bias on the attention projections only.",
            field="mlp_bias",
        )
    if config.qkv_bias and _arch_of(config) == "qwen2" and config.o_bias:
        raise ConfigError("qwen2 with an output-projection bias cannot be written as GGUF.", field="o_bias")
    rs = config.rope_scaling
    if rs is None:
        return
    if rs.rope_type == "dynamic" and not dynamic_rope_as_plain:
        raise ConfigError(
            "dynamic NTK RoPE scaling has no GGUF equivalent (llama.cpp's RoPE frequencies do not grow "
            "with the sequence). Pass dynamic_rope_as_plain=True (CLI: --dynamic-rope-as-plain) to write "
            f"plain RoPE, which is identical up to max_position_embeddings ({config.max_position_embeddings} "
            "tokens) and differs beyond it.",
            field="rope_scaling",
        )
    if rs.rope_type == "yarn":
        default = 1.0 if rs.factor <= 1 else 0.1 * math.log(rs.factor) + 1.0
        if not rs.truncate or abs(yarn_attention_factor(rs) - default) > 1e-6:
            raise ConfigError(
                "yarn RoPE scaling with a custom attention_factor/mscale or truncate=false cannot be "
                "written as GGUF: llama.cpp applies yarn's default attention factor "
                "(0.1 * ln(factor) + 1) and a truncated correction range.",
                field="rope_scaling",
            )


def _plan_tensors(model: CausalLM) -> list[_Tensor]:
    config = model.config
    arch = _arch_of(config)
    state = model.state_dict()
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    assert n_kv is not None

    def source(key: str, permute_heads: int | None = None) -> _Tensor:
        tensor = state[key]

        def make() -> np.ndarray:
            value = tensor.detach().to("cpu", torch.float32).numpy()
            return value if permute_heads is None else _rope_rows_to_pairwise(value, permute_heads)

        return _Tensor("", make, tuple(tensor.shape))

    def named(name: str, tensor: _Tensor) -> _Tensor:
        tensor.name = name
        return tensor

    out: list[_Tensor] = [named("token_embd.weight", source("model.embed_tokens.weight"))]
    if config.rope_scaling is not None and config.rope_scaling.rope_type == "llama3":
        out.append(_llama3_rope_freqs(config))
    q_perm = n_head if arch == "llama" else None
    k_perm = n_kv if arch == "llama" else None
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        out.append(named(b + "attn_norm.weight", source(p + "input_layernorm.weight")))
        out.append(named(b + "attn_q.weight", source(p + "self_attn.q_proj.weight", q_perm)))
        out.append(named(b + "attn_k.weight", source(p + "self_attn.k_proj.weight", k_perm)))
        out.append(named(b + "attn_v.weight", source(p + "self_attn.v_proj.weight")))
        if config.qkv_bias:
            out.append(named(b + "attn_q.bias", source(p + "self_attn.q_proj.bias", q_perm)))
            out.append(named(b + "attn_k.bias", source(p + "self_attn.k_proj.bias", k_perm)))
            out.append(named(b + "attn_v.bias", source(p + "self_attn.v_proj.bias")))
        out.append(named(b + "attn_output.weight", source(p + "self_attn.o_proj.weight")))
        if config.o_bias:
            out.append(named(b + "attn_output.bias", source(p + "self_attn.o_proj.bias")))
        out.append(named(b + "ffn_norm.weight", source(p + "post_attention_layernorm.weight")))
        out.append(named(b + "ffn_gate.weight", source(p + "mlp.gate_proj.weight")))
        out.append(named(b + "ffn_up.weight", source(p + "mlp.up_proj.weight")))
        out.append(named(b + "ffn_down.weight", source(p + "mlp.down_proj.weight")))
    out.append(named("output_norm.weight", source("model.norm.weight")))
    if not config.tie_word_embeddings:  # llama.cpp reuses token_embd when output is absent
        out.append(named("output.weight", source("lm_head.weight")))
    return out


def _llama3_rope_freqs(config: ModelConfig) -> _Tensor:
    """llama.cpp's ``rope_freqs``: per frequency, the divisor that turns plain RoPE into llama3's."""
    from lmstack.core.model._rope import RotaryEmbedding

    rope = RotaryEmbedding(config)
    assert config.head_dim is not None
    plain = 1.0 / (
        config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim)
    )
    scaled = rope.inv_freq().to(torch.float64).numpy()
    # llama.cpp computes theta = position * base^(-2i/d) / rope_freqs[i].
    return _Tensor("rope_freqs.weight", lambda: (plain / scaled).astype(np.float32), (config.head_dim // 2,))


def _storage(gguf: Any, shape: tuple[int, ...], kind: str) -> Any:
    """The GGML type a tensor is stored as: 1-D tensors stay f32 (as llama.cpp's converter does)."""
    qt = gguf.GGMLQuantizationType
    if len(shape) == 1 or kind == "f32":
        return qt.F32
    if kind == "f16":
        return qt.F16
    quant = qt.Q8_0 if kind == "q8_0" else qt.Q4_0
    block = gguf.GGML_QUANT_SIZES[quant][0]
    if shape[-1] % block:
        logger.info("row size %d is not a multiple of %d: storing f16 instead of %s", shape[-1], block, kind)
        return qt.F16
    return quant


def _encode(gguf: Any, values: np.ndarray, ggml_type: Any) -> np.ndarray:
    qt = gguf.GGMLQuantizationType
    if ggml_type == qt.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if ggml_type == qt.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), ggml_type)


def _nbytes(gguf: Any, shape: tuple[int, ...], ggml_type: Any) -> tuple[tuple[int, ...], Any, int]:
    """(shape as passed to add_tensor_info, numpy dtype, bytes) of a tensor stored as ``ggml_type``."""
    qt = gguf.GGMLQuantizationType
    if ggml_type == qt.F32:
        return shape, np.float32, 4 * math.prod(shape)
    if ggml_type == qt.F16:
        return shape, np.float16, 2 * math.prod(shape)
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, ggml_type)
    return byte_shape, np.uint8, math.prod(byte_shape)


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------


@dataclass
class _Vocab:
    """The tokenizer as GGUF metadata."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    add_space_prefix: bool | None = None


def _bpe_pre_name(backend_json: dict[str, Any]) -> str:
    pre = backend_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise TokenizerError(
                "the tokenizer's ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's BPE "
                "tokenizer does not do; such a tokenizer cannot be exported to GGUF."
            )
        if pre.get("use_regex", True):
            return "gpt-2"
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        splits = [s for s in steps if s.get("type") == "Split"]
        levels = [s for s in steps if s.get("type") == "ByteLevel"]
        if len(splits) == 1 and len(levels) == 1 and not levels[0].get("use_regex", True):
            pattern = (splits[0].get("pattern") or {}).get("Regex")
            if pattern in _KNOWN_SPLITS:
                return _KNOWN_SPLITS[pattern]
    raise TokenizerError(
        f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp names "
        "(GPT-2's byte-level split, Llama 3's or Qwen2's regex); llama.cpp would split text differently, "
        "so the GGUF's tokenizer would not match. Export a tokenizer with one of those pre-tokenizers."
    )


def _special_kinds(tokenizer: Tokenizer) -> dict[int, int]:
    """GGUF token types of the added tokens: control for special ones, user-defined for the rest."""
    decoder = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    return {int(i): _CONTROL if tok.special else _USER_DEFINED for i, tok in decoder.items()}


def _bpe_vocab(tokenizer: Tokenizer, backend_json: dict[str, Any]) -> _Vocab:
    model = backend_json.get("model") or {}
    merges_raw = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges_raw]
    if any(len(m.split(" ")) != 2 for m in merges):
        raise TokenizerError("a BPE merge contains a space; llama.cpp's 'a b' merge format cannot hold it.")
    n = tokenizer.vocab_size
    added = _special_kinds(tokenizer)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        token = tokenizer.id_to_token(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(token)
            types.append(added.get(i, _NORMAL))
    return _Vocab("gpt2", tokens, types, merges=merges, pre=_bpe_pre_name(backend_json))


def _sentencepiece_vocab(tokenizer: Tokenizer, data: bytes) -> _Vocab:
    from lmstack.core.tokenizer._sentencepiece import parse_model_proto

    sp = parse_model_proto(data)
    if sp.model_type != 2:
        logger.warning(
            "the SentencePiece model is a unigram model; llama.cpp's 'llama' tokenizer merges pieces by "
            "score as for a BPE model, so some texts may tokenize differently there"
        )
    if sp.remove_extra_whitespaces or sp.precompiled_charsmap:
        logger.warning(
            "the SentencePiece model normalizes text (whitespace collapsing or a character map), which "
            "llama.cpp does not apply; texts it would change may tokenize differently there"
        )
    added = _special_kinds(tokenizer)
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(i)  # the name after any rename from tokenizer_config.json
        if i < len(sp.pieces):
            _, score, kind = sp.pieces[i]
            if i in added:  # a piece the config declares an added token takes that token's role
                kind = added[i]
        else:
            score, kind = 0.0, added.get(i, _USER_DEFINED)
        if token is None:
            token, kind = f"[PAD{i}]", _UNUSED
        tokens.append(token)
        scores.append(float(score))
        types.append(int(kind))
    return _Vocab("llama", tokens, types, scores=scores, add_space_prefix=sp.add_dummy_prefix)


def _sentencepiece_bytes(tokenizer: Tokenizer) -> bytes | None:
    data = getattr(tokenizer, "_sentencepiece_bytes", None)
    if data:
        return bytes(data)
    if tokenizer.name_or_path:
        path = Path(tokenizer.name_or_path) / "tokenizer.model"
        if path.is_file():
            return path.read_bytes()
    return None


def _vocab_of(tokenizer: Tokenizer) -> _Vocab:
    data = _sentencepiece_bytes(tokenizer)
    if data is not None:
        return _sentencepiece_vocab(tokenizer, data)
    backend_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model_type = (backend_json.get("model") or {}).get("type")
    if model_type == "BPE" and not (backend_json.get("model") or {}).get("byte_fallback"):
        return _bpe_vocab(tokenizer, backend_json)
    raise TokenizerError(
        f"cannot export this tokenizer to GGUF: it is a {model_type} tokenizer.json without the "
        "SentencePiece tokenizer.model it came from. GGUF export supports byte-level BPE tokenizer.json "
        "files and SentencePiece models; put the original tokenizer.model beside it."
    )


def _placeholder_vocab(size: int) -> _Vocab:
    """A SentencePiece-style vocabulary of ``size`` tokens for models driven by token ids only."""
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    if size < len(specials) + len(byte_tokens):
        raise ConfigError(
            f"a placeholder vocabulary needs vocab_size >= 259, got {size}.", field="vocab_size"
        )
    fillers = [f"<tok_{i}>" for i in range(size - len(specials) - len(byte_tokens))]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * len(byte_tokens) + [_NORMAL] * len(fillers)
    return _Vocab(
        "llama", specials + byte_tokens + fillers, types, scores=[0.0] * size, add_space_prefix=True
    )


def _adds_bos_eos(tokenizer: Tokenizer) -> tuple[bool, bool]:
    """Whether encoding with special tokens adds bos and eos, observed on a sample text."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    if len(full) == len(plain):
        return False, False
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bool(full and bos is not None and full[0] == bos), bool(
        full and eos is not None and full[-1] == eos
    )


def _write_tokenizer(writer: Any, vocab: _Vocab, tokenizer: Tokenizer | None, n_vocab: int) -> None:
    if len(vocab.tokens) > n_vocab:
        raise TokenizerError(
            f"the tokenizer has {len(vocab.tokens)} tokens but the model only {n_vocab} embeddings; "
            "export the tokenizer the model was trained with."
        )
    for i in range(len(vocab.tokens), n_vocab):  # the model's spare embedding rows, as llama.cpp pads
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(_UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if tokenizer is None:  # the placeholder vocabulary
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        return
    for add, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if value is not None:
            add(int(value))
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    templates = tokenizer.chat_templates
    if not templates:
        logger.warning("the tokenizer has no chat template; the GGUF is written without one")
    elif list(templates) == ["default"]:
        writer.add_chat_template(templates["default"])
    else:
        writer.add_chat_template([{"name": k, "template": v} for k, v in templates.items()])


# ------------------------------------------------------------------------------------------------
# hyperparameters
# ------------------------------------------------------------------------------------------------


def _write_hparams(writer: Any, gguf: Any, config: ModelConfig, name: str, file_type: Any) -> None:
    assert config.head_dim is not None and config.num_key_value_heads is not None
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    rs = config.rope_scaling
    if rs is not None and rs.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rs.factor))
    elif rs is not None and rs.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rs.factor))
        original = rs.original_max_position_embeddings or config.max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        keys = gguf.Keys.Rope
        writer.add_float32(keys.SCALING_YARN_BETA_FAST.format(arch=writer.arch), float(rs.beta_fast or 32))
        writer.add_float32(keys.SCALING_YARN_BETA_SLOW.format(arch=writer.arch), float(rs.beta_slow or 1))
    # llama3 is the rope_freqs tensor; dynamic (when allowed) is written as plain RoPE.
    if config.sliding_window is not None and "sliding_attention" in (config.layer_types or ()):
        logger.warning(
            "the model uses sliding-window attention (window %d); llama.cpp's %s architecture attends "
            "to the full context, so outputs match only while sequences fit in the window",
            config.sliding_window,
            _arch_of(config),
        )


# ------------------------------------------------------------------------------------------------
# the file
# ------------------------------------------------------------------------------------------------


def _resolve_inputs(
    model: CausalLM | str | os.PathLike[str],
    tokenizer: Tokenizer | str | os.PathLike[str] | None,
    placeholder_vocab: bool,
) -> tuple[CausalLM, Tokenizer | None, str]:
    from lmstack.core.checkpoint._load import load_pretrained
    from lmstack.core.model import CausalLM
    from lmstack.core.tokenizer import Tokenizer

    source_dir: Path | None = None
    if isinstance(model, CausalLM):
        name = "lmstack-model"
    else:
        source_dir = Path(model)
        name = source_dir.resolve().name or "lmstack-model"
        model = load_pretrained(source_dir)
    if placeholder_vocab:
        if tokenizer is not None:
            raise TokenizerError("pass either a tokenizer or placeholder_vocab=True, not both.")
        return model, None, name
    if isinstance(tokenizer, Tokenizer):
        return model, tokenizer, name
    where = Path(tokenizer) if tokenizer is not None else source_dir
    if where is None:
        raise TokenizerError(
            "export_gguf needs the model's tokenizer: pass tokenizer= (a Tokenizer or its directory), "
            "or placeholder_vocab=True for a model driven by token ids only."
        )
    return model, Tokenizer.from_pretrained(where), name


def export_gguf(
    model: CausalLM | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    type: str = "f32",
    tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
    placeholder_vocab: bool = False,
    dynamic_rope_as_plain: bool = False,
    name: str | None = None,
    show_progress: bool = False,
) -> Path:
    """Write a model and its tokenizer as a GGUF file for llama.cpp.

    Tensors use llama.cpp's names and layout (see the module docstring for the architectures, RoPE
    scaling and tokenizers covered). With ``type="f32"`` the weights are written exactly as the model
    computes with them (a bfloat16 or float16 checkpoint is widened without loss); ``"f16"`` halves
    them, ``"q8_0"`` quantizes every 2-D weight whose rows are a multiple of 32 to 8 bits per value
    with one scale per block of 32 and ``"q4_0"`` to 4 bits (llama.cpp's symmetric 4-bit blocks of 32;
    others fall back to f16). Norm weights, biases and ``rope_freqs``
    are always float32, as llama.cpp's own converter writes them. Tensors are converted and written
    one at a time; the file appears at ``out`` only once complete (an existing file is replaced then).

    Args:
        model: A :class:`~lmstack.core.CausalLM`, or a checkpoint directory to load.
        out: The ``.gguf`` file to write.
        type: Tensor type: ``"f32"``, ``"f16"``, ``"q8_0"`` or ``"q4_0"``.
        tokenizer: The tokenizer (or its directory). Default: the checkpoint directory's, when
            ``model`` is a path.
        placeholder_vocab: Write a placeholder SentencePiece vocabulary of ``vocab_size`` tokens
            instead of a tokenizer (for models driven by token ids, such as benchmarks).
        dynamic_rope_as_plain: Write a dynamic NTK RoPE model as plain RoPE (exact up to
            ``max_position_embeddings``) instead of refusing it.
        name: ``general.name`` (default: the checkpoint directory's name).
        show_progress: Show a progress bar over the tensors.

    Returns:
        The path of the written file.

    Raises:
        CheckpointError: ``out`` does not end in ``.gguf``, ``type`` is unknown, the gguf package is
            missing, or the file cannot be written (nothing is left at ``out`` then).
        ConfigError: The model uses something GGUF cannot express (dynamic NTK RoPE, feed-forward
            biases, yarn with a custom attention factor).
        TokenizerError: The tokenizer cannot be expressed for llama.cpp, or is larger than the model's
            vocabulary.
    """
    target = Path(out)
    if target.suffix.lower() != ".gguf":
        raise CheckpointError(f"GGUF output must be a file path ending in .gguf, got {str(target)!r}.")
    if target.is_dir():
        raise CheckpointError(f"{target} is a directory; give the path of the .gguf file to write.")
    if type not in GGUF_TYPES:
        raise CheckpointError(f"unknown GGUF tensor type {type!r}; choose one of {', '.join(GGUF_TYPES)}.")
    gguf = _require_gguf()
    model, tok, default_name = _resolve_inputs(model, tokenizer, placeholder_vocab)
    config = model.config
    _check_supported(config, dynamic_rope_as_plain=dynamic_rope_as_plain)
    vocab = _placeholder_vocab(config.vocab_size) if tok is None else _vocab_of(tok)

    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[type]
    planned = _plan_tensors(model)
    kinds = [_storage(gguf, t.shape, type) for t in planned]

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        writer = gguf.GGUFWriter(str(tmp), _arch_of(config))
        try:
            _write_hparams(writer, gguf, config, name or default_name, file_type)
            _write_tokenizer(writer, vocab, tok, config.vocab_size)
            for tensor, kind in zip(planned, kinds, strict=True):
                shape, dtype, nbytes = _nbytes(gguf, tensor.shape, kind)
                writer.add_tensor_info(tensor.name, shape, np.dtype(dtype), nbytes, raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor, kind in _progress(planned, kinds, show_progress, target.name):
                writer.write_tensor_data(_encode(gguf, tensor.make(), kind))
        finally:
            writer.close()
    logger.info("wrote %s (%s, %d tensors, %.1f MB)", target, type, len(planned), target.stat().st_size / 1e6)
    return target


def _progress(
    planned: list[_Tensor], kinds: list[Any], show: bool, label: str
) -> Iterator[tuple[_Tensor, Any]]:
    bar = tqdm(zip(planned, kinds, strict=True), total=len(planned), desc=f"Writing {label}", unit="tensor",
               disable=not show)  # fmt: skip
    try:
        yield from bar
    finally:
        bar.close()
