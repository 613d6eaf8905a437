"""Preference alignment: DPO (sigmoid, IPO, hinge), ORPO, SimPO, KTO, and Bradley-Terry reward models.

Run them as ``lmstack train dpo|orpo|simpo|kto|rm CONFIG.yaml [--key value ...]`` or call
:func:`dpo`, :func:`orpo`, :func:`simpo`, :func:`kto` and :func:`rm`. A config has the shape of the
other recipes' (``model``, ``data``, ``optim``, ``run``; ``adapter``, ``lora`` and ``merge`` as in the
LoRA recipe) plus one section for its method:

.. code-block:: yaml

    model: out/runs/sft-world/final
    data:
      paths: [out/world/preferences.jsonl]
      format: preference        # paired rows (TRL-style, messages with two endings, UltraFeedback)
      max_length: 512
    dpo: {beta: 0.1, loss: sigmoid, label_smoothing: 0.0, reference: precomputed}
    optim: {lr: 5.0e-6}
    run: {output_dir: out/runs/dpo-world, max_steps: 100, batch_size: 4}

How a run goes:

1. The model and its tokenizer are loaded (for ``rm``, the model's body gets a scalar head read at
   the last token of each sequence). With ``adapter: lora`` (or ``qlora``: a 4-bit base) peft
   adapters are attached exactly as in ``lmstack train lora``.
2. The pairs are tokenized through the chat template (loss on the completions only) and packed: each
   pair's chosen and rejected in the same bin, positions restarting per sequence, attention kept
   inside each sequence (``data.pack: false`` pads one sequence a row instead).
3. DPO and KTO need the reference model's log-probs: by default they are computed once, before the
   first step, by the model as it starts the run, and cached on disk (:mod:`lmstack.train._reference`);
   with ``reference: adapter_off`` (LoRA only) the frozen base scores each batch live instead.
4. The shared loop trains: the same exact resume, checkpoints, metrics (``rewards/chosen``,
   ``rewards/rejected``, ``margins``, ``accuracy`` and the method's own) in ``metrics.jsonl`` and
   TensorBoard, DDP/FSDP2 under torchrun.
5. ``final/`` is a Hugging Face model (with LoRA: ``final/adapter`` and, with ``merge``,
   ``final/merged``); for ``rm`` a sequence classifier that transformers'
   ``AutoModelForSequenceClassification`` loads and :class:`~lmstack.train.RewardScorer` scores with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import torch

from lmstack.core import CausalLM, Tokenizer, load_pretrained, save_pretrained
from lmstack.train._dist import init_distributed
from lmstack.train._loop import OptimConfig, RunConfig, TrainResult, train_loop
from lmstack.train._objectives import KTO, Objective, PairwisePreference
from lmstack.train._parallel_config import ParallelConfig
from lmstack.train._preference_losses import DPOLossType
from lmstack.train._reference import ReferenceMode, model_fingerprint
from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import TrainConfigError, TrainError
from lmstack.train.recipes.lora import LoRASettings, apply_lora, merge_lora, merged_lora_state, save_adapter

__all__ = [
    "DPOConfig",
    "DPOSettings",
    "KTOConfig",
    "KTOSettings",
    "ORPOConfig",
    "ORPOSettings",
    "RewardConfig",
    "RewardSettings",
    "SimPOConfig",
    "SimPOSettings",
    "dpo",
    "kto",
    "orpo",
    "rm",
    "simpo",
]

logger = logging.getLogger(__name__)


def _positive(value: float, name: str) -> None:
    if not value > 0:
        raise TrainConfigError(f"{name} must be positive, got {value}", field=name)


def _smoothing(value: float, name: str) -> None:
    if not 0.0 <= value < 0.5:
        raise TrainConfigError(
            f"{name} must be in [0, 0.5) (the assumed share of flipped preferences), got {value}", field=name
        )


@dataclass
class DPOSettings:
    """Direct preference optimisation.

    Attributes:
        beta: β, how far the policy may move from the reference (IPO: the regulariser τ).
        loss: ``sigmoid`` (DPO), ``ipo`` (squared loss on per-token log-ratios) or ``hinge`` (SLiC).
        label_smoothing: ε of conservative DPO (``sigmoid`` only): the assumed share of pairs whose
            preference is flipped.
        reference: ``precomputed`` (reference log-probs computed once and cached) or ``adapter_off``
            (LoRA/QLoRA: the frozen base scores each batch live, no table kept).
    """

    beta: float = 0.1
    loss: DPOLossType = "sigmoid"
    label_smoothing: float = 0.0
    reference: ReferenceMode = "precomputed"

    def __post_init__(self) -> None:
        _positive(self.beta, "dpo.beta")
        _smoothing(self.label_smoothing, "dpo.label_smoothing")
        if self.label_smoothing and self.loss != "sigmoid":
            raise TrainConfigError(
                f"dpo.label_smoothing applies to loss: sigmoid only, not {self.loss!r}; set it to 0",
                field="dpo.label_smoothing",
            )


@dataclass
class ORPOSettings:
    """Odds-ratio preference optimisation (no reference model).

    Attributes:
        beta: λ, the weight of the odds-ratio term beside the chosen completions' NLL.
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        _positive(self.beta, "orpo.beta")


@dataclass
class SimPOSettings:
    """Simple preference optimisation: length-normalised rewards with a target margin, no reference.

    Attributes:
        beta: β, the reward scale.
        gamma: The target reward margin (the paper recommends gamma / β around 0.5).
        label_smoothing: ε, as in conservative DPO.
    """

    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _positive(self.beta, "simpo.beta")
        _smoothing(self.label_smoothing, "simpo.label_smoothing")


@dataclass
class KTOSettings:
    """Kahneman-Tversky optimisation on unpaired rows (``prompt``, ``completion``, ``label``).

    Attributes:
        beta: β.
        desirable_weight: Weight of the desirable rows' losses.
        undesirable_weight: Weight of the undesirable rows' losses (the paper suggests
            ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)`` in [1, 4/3]).
        reference: As for DPO.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: ReferenceMode = "precomputed"

    def __post_init__(self) -> None:
        _positive(self.beta, "kto.beta")
        _positive(self.desirable_weight, "kto.desirable_weight")
        _positive(self.undesirable_weight, "kto.undesirable_weight")


@dataclass
class RewardSettings:
    """A Bradley-Terry reward model.

    Attributes:
        center_coefficient: Weight of ``mean((r_chosen + r_rejected)²)``, which keeps rewards
            centred on 0 (0: off).
    """

    center_coefficient: float = 0.0

    def __post_init__(self) -> None:
        if self.center_coefficient < 0:
            raise TrainConfigError(
                f"rm.center_coefficient must be >= 0, got {self.center_coefficient}",
                field="rm.center_coefficient",
            )


def _preference_data() -> DataConfig:
    return DataConfig(format="preference", max_length=1024)


def _preference_optim() -> OptimConfig:
    # Preference losses move a finetuned model a little: a small learning rate, short warmup.
    return OptimConfig(lr=5e-6, warmup_steps=5, weight_decay=0.0)


@dataclass
class _PreferenceConfig:
    """The fields every preference recipe shares (see the module docs).

    Attributes:
        model: The model to align (a Hugging Face directory; usually an SFT model).
        data: The preference data (``format: preference`` for pairs, ``kto`` for unpaired rows).
        optim: AdamW and its schedule.
        run: Steps, batching (``batch_size`` packed bins, or padded pairs), checkpoints.
        parallel: Data, tensor, sequence and (DPO, ORPO, SimPO) pipeline parallelism under torchrun
            (see ``ParallelConfig``).
        adapter: ``none`` trains every weight; ``lora`` and ``qlora`` train peft adapters (on a
            4-bit base for ``qlora``) as ``lmstack train lora`` does, and write ``final/adapter``.
        lora: The adapters (and QLoRA's quantization), as in the LoRA recipe.
        merge: With an adapter, also write ``final/merged`` (base + adapters).
    """

    model: str = ""
    data: DataConfig = field(default_factory=_preference_data)
    optim: OptimConfig = field(default_factory=_preference_optim)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    adapter: Literal["none", "lora", "qlora"] = "none"
    lora: LoRASettings = field(default_factory=LoRASettings)
    merge: bool = False


@dataclass
class DPOConfig(_PreferenceConfig):
    """A DPO run (``lmstack train dpo``); see :class:`DPOSettings`."""

    dpo: DPOSettings = field(default_factory=DPOSettings)


@dataclass
class ORPOConfig(_PreferenceConfig):
    """An ORPO run (``lmstack train orpo``); see :class:`ORPOSettings`."""

    orpo: ORPOSettings = field(default_factory=ORPOSettings)


@dataclass
class SimPOConfig(_PreferenceConfig):
    """A SimPO run (``lmstack train simpo``); see :class:`SimPOSettings`."""

    simpo: SimPOSettings = field(default_factory=SimPOSettings)


def _kto_data() -> DataConfig:
    return DataConfig(format="kto", max_length=1024)


@dataclass
class KTOConfig(_PreferenceConfig):
    """A KTO run (``lmstack train kto``) on unpaired rows; see :class:`KTOSettings`."""

    data: DataConfig = field(default_factory=_kto_data)
    kto: KTOSettings = field(default_factory=KTOSettings)


def _reward_optim() -> OptimConfig:
    return OptimConfig(lr=1e-5, warmup_steps=5, weight_decay=0.0)


@dataclass
class RewardConfig(_PreferenceConfig):
    """A reward-model run (``lmstack train rm``); see :class:`RewardSettings`."""

    optim: OptimConfig = field(default_factory=_reward_optim)
    rm: RewardSettings = field(default_factory=RewardSettings)


# ------------------------------------------------------------------------------------------------
# the runs
# ------------------------------------------------------------------------------------------------


def _adapter_settings(cfg: _PreferenceConfig) -> LoRASettings:
    settings = cfg.lora
    if cfg.adapter == "qlora" and settings.quantize == "none":
        settings = replace(settings, quantize="nf4")
    if cfg.adapter == "lora" and settings.quantize != "none":
        raise TrainConfigError(
            f"adapter: lora with lora.quantize: {settings.quantize} is QLoRA; set adapter: qlora",
            field="adapter",
        )
    return settings


def _start(cfg: _PreferenceConfig, what: str) -> tuple[torch.device, Tokenizer, str]:
    if not cfg.model:
        raise TrainConfigError(f"{what} needs model: the Hugging Face directory to align.", field="model")
    if cfg.merge and cfg.adapter == "none":
        raise TrainConfigError("merge: true needs adapter: lora or qlora", field="merge")
    device = init_distributed(cfg.run.device).device
    return device, Tokenizer.from_pretrained(cfg.model), model_fingerprint(cfg.model)


def _attach_adapters(
    model: torch.nn.Module, cfg: _PreferenceConfig, device: torch.device, tag: str
) -> tuple[str, LoRASettings | None]:
    """Attaches LoRA/QLoRA adapters when the config asks; returns the reference tag and the settings."""
    if cfg.adapter == "none":
        return tag + "|full", None
    settings = _adapter_settings(cfg)
    total = sum(p.numel() for p in model.parameters())
    torch.manual_seed(cfg.run.seed)  # the adapters' initialisation (a resumed run loads them instead)
    names = apply_lora(cast(CausalLM, model), settings, device=device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "%s: %d adapted linears, %d trainable parameters (%.2f%% of %d)",
        cfg.adapter,
        len(names),
        trainable,
        100 * trainable / max(total, 1),
        total,
    )
    # The reference is the (quantized) base: its quantization is part of what it computes.
    return f"{tag}|{settings.quantize}|{settings.double_quant}|{settings.compute_dtype}", settings


def _run_causal(cfg: _PreferenceConfig, objective: Objective, reference: ReferenceMode | None) -> TrainResult:
    device, tokenizer, tag = _start(cfg, objective.name)
    if reference == "adapter_off" and cfg.adapter == "none":
        raise TrainConfigError(
            f"{objective.name}.reference: adapter_off needs adapter: lora or qlora (a full finetune has no "
            "adapter to switch off); use reference: precomputed",
            field=f"{objective.name}.reference",
        )
    model = load_pretrained(cfg.model, dtype="float32")
    objective.reference_tag, settings = _attach_adapters(model, cfg, device, tag)
    if reference is not None:
        objective.reference_mode = reference
    save: Callable[[CausalLM, Path], None] | None = None
    if settings is not None:
        base_dir = str(Path(cfg.model).absolute())

        def save(trained: CausalLM, final: Path) -> None:
            final.mkdir(parents=True, exist_ok=True)
            save_adapter(trained, final / "adapter", base_model=base_dir)
            if cfg.merge:
                save_pretrained(merge_lora(trained), final / "merged", tokenizer=tokenizer)

    return train_loop(
        model,
        tokenizer,
        cfg.data,
        cfg.optim,
        cfg.run,
        config_to_save=cfg,
        parallel=cfg.parallel,
        save_model=save,
        objective=objective,
    )


def dpo(cfg: DPOConfig) -> TrainResult:
    """Align ``cfg.model`` on preference pairs with DPO (or IPO, or hinge).

    Args:
        cfg: The run.

    Returns:
        The run's result: the aligned model in ``final/`` and the last step's metrics.

    Raises:
        TrainConfigError: No model, unpaired data, or settings that do not fit together.
        TrainError: What the training loop raises.
    """
    s = cfg.dpo
    objective = PairwisePreference("dpo", beta=s.beta, loss=s.loss, label_smoothing=s.label_smoothing)
    return _run_causal(cfg, objective, s.reference)


def orpo(cfg: ORPOConfig) -> TrainResult:
    """Align ``cfg.model`` with ORPO: NLL on the chosen completions plus an odds-ratio term.

    Args:
        cfg: The run.

    Returns:
        The run's result.
    """
    return _run_causal(cfg, PairwisePreference("orpo", beta=cfg.orpo.beta), None)


def simpo(cfg: SimPOConfig) -> TrainResult:
    """Align ``cfg.model`` with SimPO: length-normalised rewards, a target margin, no reference.

    Args:
        cfg: The run.

    Returns:
        The run's result.
    """
    s = cfg.simpo
    objective = PairwisePreference("simpo", beta=s.beta, gamma=s.gamma, label_smoothing=s.label_smoothing)
    return _run_causal(cfg, objective, None)


def kto(cfg: KTOConfig) -> TrainResult:
    """Align ``cfg.model`` with KTO on unpaired rows labelled desirable or undesirable.

    Args:
        cfg: The run (``data.format: kto``).

    Returns:
        The run's result.
    """
    s = cfg.kto
    objective = KTO(beta=s.beta, desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight)
    return _run_causal(cfg, objective, s.reference)


def rm(cfg: RewardConfig) -> TrainResult:
    """Train a Bradley-Terry reward model on preference pairs, starting from ``cfg.model``'s body.

    The output head is replaced by a scalar head read at the last token of each sequence (the
    completion's end-of-turn token). With ``adapter: lora|qlora`` the body trains through adapters
    and the new head trains whole; ``final/`` then holds the adapters folded into the body (QLoRA:
    into the dequantized base). ``final/`` is a Hugging Face sequence classifier
    (``AutoModelForSequenceClassification``, ``num_labels: 1``) with the tokenizer; score with
    :class:`~lmstack.train.RewardScorer`.

    Args:
        cfg: The run.

    Returns:
        The run's result.

    Raises:
        TrainConfigError: No model, or unpaired data.
    """
    from lmstack.train._reward import RewardModel, save_reward_model

    device, tokenizer, tag = _start(cfg, "rm")
    torch.manual_seed(cfg.run.seed)  # the score head's initialisation
    model = RewardModel(load_pretrained(cfg.model, dtype="float32"))
    _, settings = _attach_adapters(model, cfg, device, tag)
    if settings is not None:
        model.score.requires_grad_(True)  # a new head: it trains beside the adapters
    objective = PairwisePreference("rm", center_coefficient=cfg.rm.center_coefficient)

    def save(trained: Any, final: Path) -> None:
        if settings is not None:
            # A sequence classifier with the adapters folded into the body: what transformers loads.
            merged = RewardModel(CausalLM(trained.config, device="meta", dtype=torch.float32))
            state = merged_lora_state(trained)
            missing, unexpected = merged.load_state_dict(state, strict=False, assign=True)
            if missing or unexpected:
                raise TrainError(
                    f"merging the reward model's adapters: missing {missing[:4]}, unexpected {unexpected[:4]}"
                )
            trained = merged.eval()
        save_reward_model(trained, final, tokenizer=tokenizer)

    return train_loop(
        cast(CausalLM, model),
        tokenizer,
        cfg.data,
        cfg.optim,
        cfg.run,
        config_to_save=cfg,
        parallel=cfg.parallel,
        save_model=save,
        objective=objective,
    )
