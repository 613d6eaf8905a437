"""Reward models (Bradley-Terry): a causal LM's body with a scalar head read at a sequence's last token.

* :class:`RewardModel`: the body of a :class:`~lmstack.core.CausalLM` (``self.model``, the same
  parameter names, so checkpoints, FSDP and activation checkpointing work unchanged), no output head,
  and a ``score`` projection to one scalar. The reward of a sequence is the score of its last token.
* :func:`save_reward_model` writes a Hugging Face directory that
  ``transformers.AutoModelForSequenceClassification`` loads with no missing or unexpected weights and
  scores identically: ``model.*`` + ``score.weight``, ``architectures`` set to the family's
  ``*ForSequenceClassification``, ``num_labels: 1``. :func:`load_reward_model` reads it back (and
  the same layout written by transformers' ``save_pretrained``).
* :class:`RewardScorer` scores (prompt, completion) pairs, rendered through the chat template exactly
  as the preference data pipeline renders a completion (:class:`~lmstack.train.data.PreferenceTokenizer`),
  so that what training saw and what scoring sees are the same tokens.

**Families.** llama, mistral and qwen2 are written as themselves. InternLM2 and InternLM3 are written
as ``llama`` (``LlamaForSequenceClassification``): lmstack computes them with the Llama math (InternLM2
after unpacking ``wqkv``, InternLM3 with one attention bias for q, k, v and o, which Llama's
``attention_bias`` expresses), and transformers has no sequence classifier of its own for either.

**Padding.** transformers' sequence classifiers pool at the rightmost token that is not
``config.pad_token_id`` and ignore the attention mask there. A sequence rendered through a chat
template ends with the template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``); if
the pad id were that token, every score would be read one token early. :func:`save_reward_model`
therefore writes a pad id that ends no rendered sequence (the tokenizer's own pad when it is safe,
else another special token, and the saved tokenizer pads with it too), or ``null`` with a warning
when it finds none (transformers then scores one sequence per call and refuses batches).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmstack.core import (
    AttentionBackend,
    CausalLM,
    DenseAttention,
    LMStackError,
    ModelConfig,
    PackedAttention,
    Tokenizer,
    atomic_directory,
    load_config,
    load_pretrained,
    save_pretrained,
)
from lmstack.core.checkpoint import checkpoint_files
from lmstack.train.data._errors import DataError, TrainError
from lmstack.train.data._preference import PreferenceSample, PreferenceTokenizer

__all__ = ["RewardModel", "RewardScorer", "load_reward_model", "save_reward_model"]

logger = logging.getLogger(__name__)

# The transformers class that reads a reward model of each lmstack family, and the model_type written.
_SEQUENCE_CLASSIFIERS: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForSequenceClassification"),
    "mistral": ("mistral", "MistralForSequenceClassification"),
    "qwen2": ("qwen2", "Qwen2ForSequenceClassification"),
    "internlm2": ("llama", "LlamaForSequenceClassification"),
    "internlm3": ("llama", "LlamaForSequenceClassification"),
}
# config.json keys a sequence classifier adds; dropped from ModelConfig.extra on load so that they do
# not leak into a causal LM saved from the same config later.
_HEAD_KEYS = ("num_labels", "id2label", "label2id", "problem_type")
# Files save_pretrained or a previous save wrote that a new save replaces (not carried over).
_REPLACED = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def _replaced(name: str) -> bool:
    return name in _REPLACED or (name.startswith("model-") and name.endswith(".safetensors"))


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A causal LM's body with a scalar ``score`` head: the reward of a sequence at its last token.

    Parameter names are the causal LM's (``model.layers.0.self_attn.q_proj.weight`` ...) without
    ``lm_head``, plus ``score.weight`` ``[1, hidden]``, as transformers' ``*ForSequenceClassification``.

    Args:
        causal: The language model to start from; its body is kept (not copied), its output head dropped.

    Example:
        >>> cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=1, num_attention_heads=4)
        >>> rm = RewardModel(CausalLM(cfg))
        >>> rm(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3])
    """

    def __init__(self, causal: CausalLM) -> None:
        super().__init__()
        if causal.inference_layout is not None:
            raise TrainError(
                "the causal LM was prepared for inference; load it again to build a reward model"
            )
        self.config: ModelConfig = causal.config
        self.model = causal.model
        weight = self.model.embed_tokens.weight
        hidden = self.config.hidden_size
        self.score = nn.Linear(hidden, 1, bias=False, device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            self.reset_score()

    @torch.no_grad()
    def reset_score(self) -> None:
        """Initialise the head: normal(0, 1/sqrt(hidden + 1)).

        The body ends with RMSNorm, so each hidden coordinate has about unit scale; with this std the
        initial reward has about unit variance whatever the width (the choice of Stiennon et al. 2020,
        "Learning to summarize from human feedback"), instead of a near-constant reward (std 0.02 of
        the body's init) or one growing with the width.
        """
        nn.init.normal_(self.score.weight, mean=0.0, std=1.0 / math.sqrt(self.config.hidden_size + 1))

    @classmethod
    def from_causal_lm(
        cls,
        path_or_model: str | os.PathLike[str] | CausalLM,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
    ) -> RewardModel:
        """A reward model on a causal LM's body (a model, or a checkpoint directory to load).

        Args:
            path_or_model: A :class:`~lmstack.core.CausalLM`, or a Hugging Face causal LM directory.
            dtype: For a directory: the parameter dtype (default: the checkpoint's).
            device: For a directory: where the parameters go.

        Raises:
            TrainError: The directory cannot be loaded.
        """
        if isinstance(path_or_model, CausalLM):
            return cls(path_or_model)
        try:
            causal = load_pretrained(path_or_model, dtype=dtype, device=device)
        except LMStackError as exc:
            raise TrainError(f"cannot load the causal LM {path_or_model}: {exc}") from exc
        return cls(causal).train()

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer's activations in backward instead of storing them."""
        self.model.activation_checkpointing = enabled

    def num_parameters(self) -> int:
        """Count parameters (each shared tensor once)."""
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor | None = None,
        attn: AttentionBackend | None = None,
        *,
        indices: Tensor | None = None,
    ) -> Tensor:
        """Rewards ``[B, T]`` for every token, or ``[N]`` for the flat token indices in ``indices``.

        Args:
            input_ids: ``[B, T]`` token ids.
            positions: ``[B, T]`` positions (default ``0..T-1`` for every row).
            attn: The attention backend (default: dense causal attention); ``PackedAttention`` for
                packed rows.
            indices: Flat indices into the ``B * T`` tokens (a sequence's last token: for a packed row,
                ``cu_seqlens[1:] - 1``); only those tokens are scored.

        Returns:
            float32 rewards.
        """
        if input_ids.dim() != 2:
            raise TrainError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if positions is None:
            b, t = input_ids.shape
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        h = self.model(input_ids, positions, DenseAttention() if attn is None else attn)  # [B, T, C]
        if indices is not None:
            # Select first: the head runs on N tokens, not B * T.
            return self.score(h.reshape(-1, h.shape[-1])[indices]).squeeze(-1).float()  # [N]
        return self.score(h).squeeze(-1).float()  # [B, T]


# ------------------------------------------------------------------------------------------------
# saving and loading
# ------------------------------------------------------------------------------------------------


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value}
    return {int(value)}


def _turn_end_id(tokenizer: Tokenizer) -> int | None:
    """The token a rendered completion ends with (the template's end of turn), or None if unknown."""
    probe = PreferenceSample(
        [{"role": "user", "content": "Hello"}], [{"role": "assistant", "content": "Hi there"}], label=True
    )
    try:
        (tokenized,) = PreferenceTokenizer(tokenizer)([probe])
    except LMStackError as exc:
        logger.info("cannot render a probe conversation to find the end-of-turn token: %s", exc)
        return None
    return int(tokenized.completion_ids[0][-1])


def _choose_pad_id(config: ModelConfig, tokenizer: Any) -> tuple[int | None, str | None]:
    """A pad id that no rendered sequence ends with, and its token (None, None when there is none)."""
    endings = _ids(config.eos_token_id)
    if tokenizer is None:
        pad = config.pad_token_id
        if pad is not None and pad not in endings:
            logger.info(
                "no tokenizer given: pad_token_id %d is written as is; whether completions end with it "
                "cannot be checked",
                pad,
            )
            return pad, None
        logger.warning(
            "no tokenizer and no pad id distinct from eos: pad_token_id is written as null, so "
            "transformers scores one sequence per call (pass tokenizer= to choose a safe pad)"
        )
        return None, None
    endings |= _ids(getattr(tokenizer, "eos_token_id", None))
    if isinstance(tokenizer, Tokenizer):
        end = _turn_end_id(tokenizer)
        if end is not None:
            endings.add(end)
    ordered: list[int | None] = [
        getattr(tokenizer, "pad_token_id", None),
        config.pad_token_id,
        getattr(tokenizer, "unk_token_id", None),
    ]
    bos = getattr(tokenizer, "bos_token_id", None)
    # Then other special tokens (never produced from plain text), bos last: a template may end on none.
    ordered += [*sorted(set(getattr(tokenizer, "all_special_ids", ())) - {bos}), bos]
    for candidate in ordered:
        if candidate is not None and candidate not in endings:
            token = tokenizer.id_to_token(candidate) if hasattr(tokenizer, "id_to_token") else None
            given = getattr(tokenizer, "pad_token_id", None)
            if given is not None and given != candidate:
                logger.warning(
                    "the tokenizer pads with id %d, which ends rendered completions (ids %s): transformers "
                    "would read every reward one token early; writing pad_token_id %d (%r) instead",
                    given,
                    sorted(endings),
                    candidate,
                    token,
                )
            elif given is None:
                logger.info("the tokenizer has no pad token: writing pad_token_id %d (%r)", candidate, token)
            return candidate, token
    logger.warning(
        "every special token of the tokenizer ends a rendered sequence: pad_token_id is written as null, "
        "so transformers scores one sequence per call"
    )
    return None, None


def _patch_tokenizer_pad(directory: Path, token: str) -> None:
    """Make the saved tokenizer pad with ``token`` (transformers pools at the last non-pad token)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        if file.is_file():
            data = json.loads(file.read_text(encoding="utf-8"))
            data["pad_token"] = token
            file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_reward_model(
    model: RewardModel,
    path: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a reward model as a Hugging Face sequence-classification directory.

    ``transformers.AutoModelForSequenceClassification.from_pretrained(path)`` loads it with no missing
    or unexpected weights and gives the same rewards (see the module docs for families and padding).
    The directory is replaced atomically (:func:`~lmstack.core.atomic_directory`); unrelated files of
    an existing one (a README) are kept.

    Args:
        model: The reward model.
        path: Target directory.
        tokenizer: Its tokenizer (anything with ``save_pretrained``; a :class:`~lmstack.core.Tokenizer`
            lets the pad id be checked against the chat template's end-of-turn token).
        max_shard_size: Largest safetensors shard (see :func:`~lmstack.core.save_pretrained`).
        dtype: Cast floating-point weights to this dtype on the way out.

    Returns:
        The directory.

    Raises:
        TrainError: The directory cannot be written.
    """
    target = Path(path).absolute()
    family, architecture = _SEQUENCE_CLASSIFIERS[model.config.model_type]
    pad_id, pad_token = _choose_pad_id(model.config, tokenizer)
    try:
        with atomic_directory(target, keep=lambda name: not _replaced(name)) as staging:
            # save_pretrained reads only state_dict() and .config, which a RewardModel has with the causal
            # LM's names (model.*) plus score.weight: its sharding, dtype cast and progress are reused.
            save_pretrained(cast(CausalLM, model), staging, max_shard_size=max_shard_size, dtype=dtype)
            written = json.loads((staging / "config.json").read_text(encoding="utf-8"))
            config = model.config.replace(
                extra={k: v for k, v in model.config.extra.items() if k != "auto_map"}
            )
            out = config.to_dict(model_type=family)
            if "dtype" in written:
                out["dtype"] = written["dtype"]
            out.update(
                architectures=[architecture],
                num_labels=1,
                id2label={"0": "LABEL_0"},
                label2id={"LABEL_0": 0},
                pad_token_id=pad_id,
            )
            (staging / "config.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
            # A reward model does not generate; a generation config would only carry a stale pad id.
            (staging / "generation_config.json").unlink(missing_ok=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
                if pad_token is not None and pad_id != getattr(tokenizer, "pad_token_id", None):
                    _patch_tokenizer_pad(staging, pad_token)
    except (LMStackError, OSError) as exc:
        if isinstance(exc, TrainError):
            raise
        raise TrainError(f"cannot save the reward model to {target}: {exc}") from exc
    if model.config.model_type in ("internlm2", "internlm3"):
        logger.info(
            "saved the %s reward model in the llama layout (model_type llama)", model.config.model_type
        )
    logger.info("saved reward model %s (%s, pad_token_id %s)", target, architecture, pad_id)
    return target


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise TrainError(f"dtype {dtype!r} is not a floating-point torch dtype (try 'float32' or 'bfloat16')")
    return resolved


def load_reward_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = "float32",
    device: torch.device | str | None = None,
) -> RewardModel:
    """Load a reward model written by :func:`save_reward_model`.

    Also reads what transformers' ``save_pretrained`` writes for a Llama/Mistral/Qwen2
    ``*ForSequenceClassification`` with one label (the same layout).

    Args:
        path: The directory.
        dtype: Parameter dtype.
        device: Where the parameters go (default: CPU).

    Returns:
        The model in eval mode.

    Raises:
        TrainError: A missing directory or file, a causal LM checkpoint (no ``score.weight``), a head with
            more than one label, unexpected, missing or misshapen tensors.
    """
    root = Path(path)
    if not (root / "config.json").is_file():
        raise TrainError(f"{root} is not a reward model directory (no config.json)")
    target_dtype = _resolve_dtype(dtype)
    where = torch.device(device if device is not None else "cpu")
    try:
        config = load_config(root)
        files = checkpoint_files(root)
    except LMStackError as exc:
        raise TrainError(f"cannot load the reward model {root}: {exc}") from exc
    config = config.replace(extra={k: v for k, v in config.extra.items() if k not in _HEAD_KEYS})
    model = RewardModel(CausalLM(config, device="meta", dtype=target_dtype))
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    loaded: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                    if key not in expected:
                        unexpected.append(key)
                        continue
                    tensor = handle.get_tensor(key)
                    if tuple(tensor.shape) != expected[key]:
                        hint = (
                            " (a head with several labels is not a reward model)"
                            if key == "score.weight"
                            else ""
                        )
                        raise TrainError(
                            f"{file.name}: tensor {key!r} has shape {list(tensor.shape)}, the config implies "
                            f"{list(expected[key])}{hint}"
                        )
                    module_name, _, attr = key.rpartition(".")
                    value = tensor.to(device=where, dtype=target_dtype)
                    setattr(model.get_submodule(module_name), attr, nn.Parameter(value))
                    loaded.add(key)
        except (SafetensorError, OSError) as exc:
            raise TrainError(f"cannot read {file}: {exc}") from exc
    if "score.weight" not in loaded:
        raise TrainError(
            f"{root} has no score.weight: it is not a reward model (a causal LM? build one with "
            "RewardModel.from_causal_lm)"
        )
    if unexpected:
        raise TrainError(f"{root} has tensors a reward model does not use: {sorted(unexpected)[:8]}")
    missing = sorted(set(expected) - loaded)
    if missing:
        raise TrainError(f"{root} lacks {len(missing)} tensor(s), e.g. {missing[:5]}")
    logger.info("loaded reward model %s (%s, %d parameters)", root, config.model_type, model.num_parameters())
    return model.eval()


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------

Prompt = str | Sequence[Mapping[str, Any]]


def _prompt_messages(prompt: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"prompts[{index}] is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or not prompt:
        raise DataError(f"prompts[{index}] must be text or a non-empty list of messages")
    messages = []
    for turn in prompt:
        if not isinstance(turn, Mapping) or "role" not in turn:
            raise DataError(f"prompts[{index}] holds a message without a 'role': {turn!r}")
        messages.append(dict(turn))
    if messages[-1]["role"] == "assistant":
        raise DataError(
            f"prompts[{index}] ends with an assistant turn: the completion is the assistant's reply"
        )
    return messages


def _completion_message(completion: Any, index: int) -> dict[str, Any]:
    if isinstance(completion, str):
        return {"role": "assistant", "content": completion}
    if isinstance(completion, Mapping) and completion.get("role", "assistant") == "assistant":
        return {"role": "assistant", **completion}
    raise DataError(f"completions[{index}] must be the assistant's text, got {type(completion).__name__}")


class RewardScorer:
    """Scores (prompt, completion) pairs with a reward model, no grad, in eval mode.

    Args:
        model: The reward model (put in eval mode).
        tokenizer: Its tokenizer (with the chat template).
        chat_template: A template name among the tokenizer's, or a template's text (None: its default);
            use the one training used.
        device: Where to run (default: where the model is).

    Example:
        >>> scorer = RewardScorer.from_pretrained("runs/rm/final")  # doctest: +SKIP
        >>> scorer.score(["What is 2+2?"], ["4."])  # doctest: +SKIP
        [1.73]
    """

    def __init__(
        self,
        model: RewardModel,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else model.score.weight.device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self._render = PreferenceTokenizer(tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        chat_template: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str = "float32",
    ) -> RewardScorer:
        """Load a reward model directory (weights and tokenizer, see :func:`load_reward_model`).

        Args:
            path: A directory written by :func:`save_reward_model` with its tokenizer.
            chat_template: See the class.
            device: Where to run (default: CUDA when available, else CPU).
            dtype: Parameter dtype.

        Raises:
            TrainError: The directory, its weights or its tokenizer are missing or invalid.
        """
        root = Path(path)
        if not root.is_dir():
            raise TrainError(f"reward model directory {root} does not exist")
        if not (root / "tokenizer.json").is_file() and not (root / "tokenizer.model").is_file():
            raise TrainError(
                f"{root} has no tokenizer (tokenizer.json); save the reward model with tokenizer="
            )
        where = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_reward_model(root, dtype=dtype, device=where)
        try:
            tokenizer = Tokenizer.from_pretrained(root)
        except LMStackError as exc:
            raise TrainError(f"cannot load the tokenizer of {root}: {exc}") from exc
        return cls(model, tokenizer, chat_template=chat_template, device=where)

    def encode(self, prompts: Sequence[Prompt], completions: Sequence[Any]) -> list[NDArray[np.int32]]:
        """Token ids of each prompt + completion, as the preference pipeline renders them.

        Raises:
            TrainError: Mismatched lengths, no input, a malformed prompt or completion.
        """
        if isinstance(prompts, str) or isinstance(completions, str):
            raise TrainError("prompts and completions must be lists (one entry per sequence), not a string")
        if len(prompts) != len(completions):
            raise TrainError(f"got {len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            raise TrainError("nothing to score: prompts and completions are empty")
        samples = [
            PreferenceSample(_prompt_messages(p, i), [_completion_message(c, i)], label=True, line=i)
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]
        out = []
        for item in self._render(samples):
            out.append(item.sequence(0).input_ids)
        return out

    @torch.no_grad()
    def score_ids(
        self,
        sequences: Sequence[Sequence[int] | NDArray[np.int32]],
        *,
        batch_size: int = 16,
        packed: bool = True,
        progress: bool | None = None,
    ) -> list[float]:
        """Rewards of token sequences, read at each one's last token.

        Args:
            sequences: Token ids, one list per sequence.
            batch_size: Sequences per forward pass.
            packed: Pack each batch into one row (``PackedAttention`` over ``cu_seqlens``); else right-pad
                it (``DenseAttention`` with a padding mask). The rewards agree up to float rounding.
            progress: Show a progress bar (None: when there are more than 8 batches, on a terminal).

        Raises:
            TrainError: No sequences, an empty sequence, or ``batch_size < 1``.
        """
        if batch_size < 1:
            raise TrainError(f"batch_size must be at least 1, got {batch_size}")
        if not sequences:
            raise TrainError("nothing to score: no sequences")
        arrays = [torch.as_tensor(np.asarray(s, dtype=np.int64)) for s in sequences]
        if any(a.dim() != 1 or a.numel() == 0 for a in arrays):
            raise TrainError("every sequence must be a non-empty list of token ids")
        self.model.eval()
        starts = range(0, len(arrays), batch_size)
        disable = (len(starts) <= 8 or None) if progress is None else not progress
        rewards: list[float] = []
        for start in tqdm(starts, desc="scoring", unit="batch", disable=disable):
            batch = arrays[start : start + batch_size]
            lengths = torch.tensor([a.numel() for a in batch])
            if packed:
                ids = torch.cat(batch)[None]  # [1, N]
                positions = torch.cat([torch.arange(n) for n in lengths.tolist()])[None]
                cu = torch.zeros(len(batch) + 1, dtype=torch.int64)
                cu[1:] = lengths.cumsum(0)
                attn: AttentionBackend = PackedAttention(cu.to(self.device))
                indices = cu[1:] - 1
            else:
                width = int(lengths.max())
                ids = torch.zeros(len(batch), width, dtype=torch.int64)
                for row, a in enumerate(batch):
                    ids[row, : a.numel()] = a
                mask = torch.arange(width)[None] < lengths[:, None]
                positions = torch.arange(width).expand(len(batch), width)
                attn = DenseAttention(mask.to(self.device))
                indices = torch.arange(len(batch)) * width + lengths - 1
            out = self.model(
                ids.to(self.device), positions.to(self.device), attn, indices=indices.to(self.device)
            )
            rewards.extend(out.cpu().tolist())
        return rewards

    def score(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[Any],
        *,
        batch_size: int = 16,
        packed: bool = True,
        progress: bool | None = None,
    ) -> list[float]:
        """The reward of each completion as the reply to its prompt.

        Args:
            prompts: Each a string (one user turn) or a list of OpenAI messages (not ending with an
                assistant turn).
            completions: The assistant's reply to each prompt (text, or an assistant message).
            batch_size: Sequences per forward pass.
            packed: Pack (default) or pad each batch (see :meth:`score_ids`).
            progress: Show a progress bar (see :meth:`score_ids`).

        Returns:
            One float per pair, in order.

        Raises:
            TrainError: Mismatched lengths, empty input, a malformed prompt, a chat template that refuses
                the conversation.
        """
        return self.score_ids(
            self.encode(prompts, completions), batch_size=batch_size, packed=packed, progress=progress
        )
