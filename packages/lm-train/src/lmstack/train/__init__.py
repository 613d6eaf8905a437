"""lmstack.train: Pretraining, finetuning (full, LoRA, QLoRA) and alignment.

* Recipes (:mod:`lmstack.train.recipes`): ``pretrain`` (training the tokenizer when asked), ``sft``,
  ``lora`` and ``qlora`` (adapters in PEFT's format, merged on request), and the preference recipes
  below; ``lmstack train pretrain|sft|lora|qlora|dpo|orpo|simpo|kto|rm CONFIG.yaml [--key value ...]``.
  :func:`load_train_config` reads such a YAML file (with ``--section.key value`` overrides) into a
  recipe's config; :func:`save_config` and :func:`config_to_dict` write one back.
* Scale-out (:class:`ParallelConfig`, every recipe's ``parallel:`` section): tensor, sequence and
  pipeline parallelism beside FSDP2/HSDP over lmstack-core's device mesh, with distributed checkpoints
  that resume under another layout; :mod:`lmstack.train.plan` (``lmstack plan``) predicts memory and step
  time of candidate layouts.
* The loop (:func:`train_loop`, :class:`OptimConfig`, :class:`RunConfig`, :class:`TrainResult`):
  AdamW with warmup and cosine/linear decay, gradient accumulation, clipping, bf16 autocast,
  activation checkpointing, NaN/inf stop, atomic checkpoints with exact O(1) resume, DDP or FSDP2
  under torchrun, metrics.jsonl and TensorBoard.
* The data pipeline (:mod:`lmstack.train.data`; its entry points here: :class:`DataConfig`,
  :func:`build_dataset`, :func:`tokenize_dataset`, :class:`SampleTokenizer`,
  :class:`ResumableLoader`): streamed jsonl/json/parquet/text readers; Alpaca, ShareGPT,
  OpenAI-messages and plain-text formats; tokenization through the model's chat template with loss
  on assistant turns; a pre-tokenization cache; best-fit packing with per-sample positions; a
  resumable, rank-aware loader.
* Preference alignment (:mod:`lmstack.train.recipes`: ``dpo``, ``orpo``, ``simpo``, ``kto``, ``rm``;
  ``lmstack train dpo|orpo|simpo|kto|rm CONFIG.yaml``): pairs packed whole into bins, reference
  log-probs precomputed once and cached (or, for LoRA, the base with the adapters off). The losses on
  packed batches: :func:`segment_logps` (per-segment log-probs of packed logits, chunked if asked),
  :func:`dpo_loss` (sigmoid, IPO, hinge, label smoothing), :func:`orpo_loss`, :func:`simpo_loss`,
  :func:`kto_loss`, :func:`reward_model_loss`; each matches TRL's implementation in the tests.
* Reward models: :class:`RewardModel` (a scalar head on the body, read at the last token),
  :func:`save_reward_model` (a directory transformers loads as a sequence classifier),
  :func:`load_reward_model`, :class:`RewardScorer` (scores completions through the chat template).
* :func:`score_preferences` / :class:`PreferenceScores`: how often a model prefers the chosen
  completion of held-out pairs (by log-prob, per token, or by DPO's implicit reward), with stderr.
"""

from lmstack.train._config import config_to_dict, load_train_config, save_config
from lmstack.train._loop import OptimConfig, RunConfig, TrainResult, train_loop
from lmstack.train._parallel_config import ParallelConfig
from lmstack.train._preference_eval import PreferenceScores, score_preferences
from lmstack.train._preference_losses import (
    DPOLossType,
    dpo_loss,
    gather_pairs,
    kto_loss,
    orpo_loss,
    reward_model_loss,
    segment_ids_from_cu_seqlens,
    segment_logps,
    simpo_loss,
    token_logps,
)
from lmstack.train._reward import RewardModel, RewardScorer, load_reward_model, save_reward_model
from lmstack.train.data import (
    DataConfig,
    ResumableLoader,
    SampleTokenizer,
    build_dataset,
    tokenize_dataset,
)
from lmstack.train.data._errors import DataError, TrainConfigError, TrainError

__version__ = "0.1.0"

__all__: list[str] = [
    "DPOLossType",
    "DataConfig",
    "DataError",
    "OptimConfig",
    "ParallelConfig",
    "PreferenceScores",
    "ResumableLoader",
    "RewardModel",
    "RewardScorer",
    "RunConfig",
    "SampleTokenizer",
    "TrainConfigError",
    "TrainError",
    "TrainResult",
    "build_dataset",
    "config_to_dict",
    "dpo_loss",
    "gather_pairs",
    "kto_loss",
    "load_reward_model",
    "load_train_config",
    "orpo_loss",
    "reward_model_loss",
    "save_config",
    "save_reward_model",
    "score_preferences",
    "segment_ids_from_cu_seqlens",
    "segment_logps",
    "simpo_loss",
    "token_logps",
    "tokenize_dataset",
    "train_loop",
]
