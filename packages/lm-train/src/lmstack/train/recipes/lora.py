"""LoRA and QLoRA finetuning through peft: low-rank adapters on a frozen (optionally 4-bit) base.

Run it as ``lmstack train lora CONFIG.yaml [--key value ...]`` (or ``lmstack train qlora``, whose
base is quantized to NF4 unless ``lora.quantize`` says ``fp4``), or call :func:`lora` / :func:`qlora`.

How a run goes:

1. The base is loaded with lmstack-core's ``load_pretrained`` (fp32).
2. QLoRA only: every targeted ``nn.Linear`` is replaced by a bitsandbytes ``Linear4bit`` holding the
   frozen base weight quantized to NF4 or FP4 (optionally with double quantization of the scales).
   bitsandbytes quantizes a ``Params4bit`` when it is moved to a device, CPU included (bitsandbytes
   >= 0.45 has CPU kernels), so the swap is: build the ``Linear4bit`` on the meta device, give it the
   fp32 weight, then ``.to(device)``. On a GPU bitsandbytes' kernels do the 4-bit matmuls; on CPU the
   layer dequantizes its weight in plain torch instead (:func:`_dequantize_4bit`: bitsandbytes 0.50's
   CPU dequantization is wrong when ``in_features`` is not a multiple of 64, as in lmstack's small
   models) and, like bitsandbytes, keeps only the 4-bit weight for backward.
3. The base is frozen and peft injects LoRA layers into the targeted modules in place
   (``peft.inject_adapter_in_model``): module names stay Hugging Face Llama names
   (``model.layers.0.self_attn.q_proj``), so the adapter's keys match ``transformers``' models. The
   trainable parameters are then exactly the ``lora_A``/``lora_B`` matrices (plus biases when
   ``lora.bias`` asks for them), which is what the shared loop optimises and checkpoints: a
   checkpoint holds the adapters, the optimizer state of the adapters, and resumes exactly.
4. At the end the run writes ``final/adapter/`` in PEFT's own format (``adapter_config.json`` with
   ``base_model_name_or_path`` set to the base directory, ``adapter_model.safetensors`` with
   ``base_model.model.``-prefixed keys), which ``peft.PeftModel.from_pretrained`` loads on top of
   ``transformers.AutoModelForCausalLM.from_pretrained(base)``. With ``merge: true`` it also writes
   ``final/merged/``: a plain Hugging Face checkpoint (with the tokenizer) whose targeted weights are
   ``W + scaling * B @ A``, where for QLoRA ``W`` is the *dequantized* 4-bit base, i.e. the weights
   the adapters were trained against.

Example:
    >>> from lmstack.train import load_train_config
    >>> cfg = load_train_config(LoRAConfig, None, ["--model", "out/runs/pretrain-world/final", "--merge"])
    >>> cfg.lora.r, cfg.lora.target_modules[:2], cfg.optim.lr
    (16, ['q_proj', 'k_proj'], 0.0002)
    >>> result = qlora(cfg)  # doctest: +SKIP
    >>> sorted(p.name for p in result.model_dir.iterdir())  # doctest: +SKIP
    ['adapter', 'merged']
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.core import CausalLM, Tokenizer, atomic_directory, load_pretrained, save_pretrained
from lmstack.train._dist import init_distributed
from lmstack.train._loop import OptimConfig, RunConfig, TrainResult, train_loop
from lmstack.train._parallel_config import ParallelConfig
from lmstack.train.data._config import DataConfig
from lmstack.train.data._errors import TrainConfigError, TrainError

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_TARGET_MODULES",
    "LoRAConfig",
    "LoRASettings",
    "apply_lora",
    "lora",
    "merge_lora",
    "merged_lora_state",
    "qlora",
    "save_adapter",
]

logger = logging.getLogger(__name__)

#: The attention and MLP projections of a Llama-family decoder layer.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The file names PEFT uses for an adapter.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# peft's name for the one adapter a run trains, and the prefix PeftModel puts before module names.
_ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoRASettings:
    """The adapters, and for QLoRA how the frozen base is quantized.

    Attributes:
        r: Rank of each adapter (``A`` is ``r x in``, ``B`` is ``out x r``).
        alpha: Scaling numerator: the update is ``alpha / r * B @ A`` (``alpha / sqrt(r)`` with
            ``use_rslora``).
        dropout: Dropout on the adapters' input during training.
        target_modules: Names of the linear layers that get adapters, matched as peft does: a module
            whose full name equals an entry or ends with ``.`` + entry (``q_proj`` matches
            ``model.layers.3.self_attn.q_proj``). Every entry must match at least one ``nn.Linear``.
        bias: Which biases also train: ``none``, ``all`` or ``lora_only`` (those of adapted layers).
        use_rslora: Rank-stabilised scaling ``alpha / sqrt(r)``.
        quantize: ``none`` for LoRA; ``nf4`` or ``fp4`` for QLoRA, where the targeted linears of the
            base are stored in 4 bits (bitsandbytes ``Linear4bit``) and dequantized on the fly.
            :func:`qlora` (``lmstack train qlora``) turns ``none`` into ``nf4``.
        double_quant: QLoRA: quantize the per-block scales too (bitsandbytes
            ``compress_statistics``), about 0.4 bit per weight less.
        compute_dtype: QLoRA: the dtype the dequantized base weight is multiplied in.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    quantize: Literal["none", "nf4", "fp4"] = "none"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise TrainConfigError(f"lora.r must be at least 1, got {self.r}", field="lora.r")
        if self.alpha <= 0:
            raise TrainConfigError(f"lora.alpha must be positive, got {self.alpha}", field="lora.alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise TrainConfigError(
                f"lora.dropout must be in [0, 1), got {self.dropout}", field="lora.dropout"
            )
        self.target_modules = [str(t).strip() for t in self.target_modules if str(t).strip()]
        if not self.target_modules:
            raise TrainConfigError(
                "lora.target_modules must name at least one module", field="lora.target_modules"
            )

    def peft_config(self, base_model: str | None = None) -> Any:
        """The equivalent ``peft.LoraConfig`` (task ``CAUSAL_LM``)."""
        peft = _import("peft", "lora")
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias=self.bias,
            use_rslora=self.use_rslora,
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model,
        )


@dataclass
class LoRAConfig:
    """Everything a LoRA (or QLoRA) run needs; ``model`` is the base's Hugging Face directory.

    Attributes:
        model: The base model directory (config.json, safetensors, tokenizer files).
        data: The training data.
        optim: AdamW and its schedule (adapters like a higher learning rate than full finetuning).
        run: Steps, batching, checkpoints; the run writes ``final/adapter/`` (and ``final/merged/``).
        parallel: Data (FSDP2 shards the frozen base and the adapters), tensor (each adapter split as
            its projection is), sequence and pipeline parallelism under torchrun (see
            ``ParallelConfig``); QLoRA's 4-bit base trains with ``run.data_parallel: ddp`` only.
        lora: The adapters and, for QLoRA, the base's quantization.
        merge: Also write ``final/merged/``: base + adapters as a plain Hugging Face checkpoint.
    """

    model: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, warmup_steps=5, weight_decay=0.0))
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRASettings = field(default_factory=LoRASettings)
    merge: bool = False


# ------------------------------------------------------------------------------------------------
# optional dependencies
# ------------------------------------------------------------------------------------------------


def _import(name: Literal["peft", "bitsandbytes"], extra: str) -> ModuleType:
    """Imports peft or bitsandbytes, or says which extra to install."""
    # On CPUs with AVX512-BF16, importing bitsandbytes (peft imports it too) warns that an optional
    # kernel package (`kernels`) is missing; this recipe's CPU path does not use that kernel.
    ops_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = ops_logger.level
    ops_logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise TrainError(
            f"{'QLoRA' if name == 'bitsandbytes' else 'LoRA'} needs {name}: "
            f"pip install 'lmstack-train[{extra}]' ({exc})"
        ) from exc
    finally:
        ops_logger.setLevel(level)


# ------------------------------------------------------------------------------------------------
# building the model
# ------------------------------------------------------------------------------------------------


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _target_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """The full names of the modules ``targets`` selects (peft's suffix matching), checked.

    Raises:
        TrainConfigError: An entry matches nothing (the nearest module names are suggested) or a
            module that is not an ``nn.Linear``.
    """
    names = [name for name, _ in model.named_modules() if name]
    found: list[str] = []
    for target in targets:
        hits = [n for n in names if _matches(n, target)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            close = difflib.get_close_matches(target, leaves, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; the model's module names: {leaves}"
            raise TrainConfigError(
                f"lora.target_modules: {target!r} matches no module of the model{hint}",
                field="lora.target_modules",
            )
        for hit in hits:
            module = model.get_submodule(hit)
            if not isinstance(module, nn.Linear):
                raise TrainConfigError(
                    f"lora.target_modules: {target!r} matches {hit!r}, a {type(module).__name__}; "
                    "adapters go on linear layers only",
                    field="lora.target_modules",
                )
            if hit not in found:
                found.append(hit)
    return found


def _dequantize_4bit(weight: Any) -> Tensor:
    """A bitsandbytes 4-bit weight back in fp32, in plain torch (the CPU path of this recipe).

    bitsandbytes packs two 4-bit codes a byte (first element in the high nibble) and keeps one
    absmax scale per ``blocksize`` consecutive elements of the flattened weight (those scales are
    themselves 8-bit quantized with double quantization). Its CPU dequantization kernel (0.50) gets
    the blocks wrong when ``in_features`` is not a multiple of the block size (64): the codes and
    scales are right, the weights it returns are not (relative error 0.2-0.4 instead of NF4's 0.09).
    This function reads the same codes and scales correctly for any shape.
    """
    state = weight.quant_state
    absmax = state.absmax
    if state.nested:
        bnb = _import("bitsandbytes", "qlora")
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    packed = weight.data.reshape(-1).view(torch.uint8)
    numel = math.prod(state.shape)
    codes = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)[:numel].long()
    scales = absmax.to(torch.float32).repeat_interleave(state.blocksize)[:numel]
    return (state.code.to(torch.float32)[codes] * scales).view(*state.shape)


class _Linear4bitCPU(torch.autograd.Function):
    """``x @ W.T + b`` for a 4-bit ``W``, dequantized in forward and again in backward.

    Only the 4-bit ``W`` is kept for backward, as bitsandbytes' own ``MatMul4Bit`` does.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.weight = weight
        ctx.has_bias = bias is not None
        return F.linear(x, _dequantize_4bit(weight).to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ _dequantize_4bit(ctx.weight).to(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias


@functools.cache
def _linear4bit_class() -> type[nn.Module]:
    """The ``Linear4bit`` of bitsandbytes, computing through :func:`_dequantize_4bit` on CPU.

    A subclass, so that peft wraps it with its own 4-bit LoRA layer and everything that checks for
    ``bnb.nn.Linear4bit`` still recognises it. On other devices bitsandbytes' own kernels run. On CPU
    this also avoids bitsandbytes' AVX512-BF16 inference path, which repacks the weight in place into
    a CPU-only layout and multiplies in bf16 the first time the module runs in eval mode.
    """
    base: Any = _import("bitsandbytes", "qlora").nn.Linear4bit

    class Linear4bit(base):
        def forward(self, x: Tensor) -> Tensor:
            if x.device.type != "cpu":
                return cast(Tensor, super().forward(x))
            dtype = self.compute_dtype or x.dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            out = _Linear4bitCPU.apply(x.to(dtype), self.weight, bias)
            return cast(Tensor, out).to(x.dtype)

    return cast(type[nn.Module], Linear4bit)


def _quantize_linears(
    model: CausalLM, names: list[str], settings: LoRASettings, device: torch.device
) -> None:
    """Replaces each named ``nn.Linear`` by a frozen bitsandbytes 4-bit ``Linear4bit`` on ``device``."""
    bnb = _import("bitsandbytes", "qlora")
    linear4bit = _linear4bit_class()
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        quantized: Any = linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=_DTYPES[settings.compute_dtype],
            compress_statistics=settings.double_quant,
            quant_type=settings.quantize,
            device="meta",
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.detach().to(torch.float32),
            requires_grad=False,
            compress_statistics=settings.double_quant,
            quant_type=settings.quantize,
            module=quantized,
        )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        # Moving a Params4bit to a device (CPU too) is what quantizes it: the weight becomes packed
        # uint8 [in * out / 2, 1] with its quant_state (block scales, code book).
        setattr(parent, child, quantized.to(device))
        del linear


def apply_lora(model: CausalLM, settings: LoRASettings, *, device: torch.device | str = "cpu") -> list[str]:
    """Freezes ``model``, quantizes its targeted linears for QLoRA, and injects peft LoRA layers.

    The model is changed in place and keeps its module names; afterwards only the adapters (and the
    biases ``settings.bias`` selects) require gradients.

    Args:
        model: The base model (fp32).
        settings: The adapters and quantization.
        device: Where a QLoRA base is quantized (the device the run trains on).

    Returns:
        The full names of the adapted modules.

    Raises:
        TrainConfigError: A target matches nothing or a non-linear module, or targets an output
            projection tied to the embedding.
        TrainError: peft (or, for QLoRA, bitsandbytes) is not installed.
    """
    peft = _import("peft", "lora")
    names = _target_linears(model, settings.target_modules)
    if model.config.tie_word_embeddings and "lm_head" in names:
        raise TrainConfigError(
            "lora.target_modules selects lm_head, which this model ties to the input embedding; "
            "leave it out (adapt the projections only)",
            field="lora.target_modules",
        )
    for p in model.parameters():
        p.requires_grad_(False)
    if settings.quantize != "none":
        _quantize_linears(model, names, settings, torch.device(device))
    peft.inject_adapter_in_model(settings.peft_config(), model, adapter_name=_ADAPTER)
    adapted = sorted(name for name, m in model.named_modules() if _is_lora_layer(m))
    if adapted != sorted(names):
        raise TrainError(f"peft adapted {adapted[:4]}... but lmstack selected {sorted(names)[:4]}...")
    return names


@functools.cache
def _lora_layer_type() -> type:
    return cast(type, _import("peft", "lora").tuners.lora.LoraLayer)


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(module, _lora_layer_type())


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, path: str | os.PathLike[str], *, base_model: str | None) -> Path:
    """Writes the model's LoRA adapter in PEFT's own format (atomically).

    The directory gets ``adapter_config.json`` (the ``peft.LoraConfig``, with
    ``base_model_name_or_path`` = ``base_model`` and ``inference_mode`` on) and
    ``adapter_model.safetensors`` (keys such as
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, as ``PeftModel.save_pretrained``
    writes them), so ``peft.PeftModel.from_pretrained(base, path)`` loads it.

    Args:
        model: A model :func:`apply_lora` prepared.
        path: The adapter directory; an existing one is replaced.
        base_model: Where the base model lives, recorded for loaders.

    Returns:
        The adapter directory.
    """
    from safetensors.torch import save_file

    peft = _import("peft", "lora")
    configs = getattr(model, "peft_config", None)
    if not configs or _ADAPTER not in configs:
        raise TrainError("save_adapter() needs a model with a LoRA adapter (see apply_lora())")
    config = copy.deepcopy(configs[_ADAPTER])
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    state = peft.get_peft_model_state_dict(model, adapter_name=_ADAPTER, save_embedding_layers=False)
    tensors = {_PEFT_PREFIX + key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    target = Path(path).absolute()
    with atomic_directory(target) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
    logger.info("saved the adapter (%d tensors) to %s", len(tensors), target)
    return target


def _dense_weight(linear: nn.Linear) -> Tensor:
    """A linear layer's weight in fp32; a bitsandbytes 4-bit weight is dequantized."""
    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:
        return _dequantize_4bit(weight)
    return weight.detach().to(torch.float32, copy=True)


@torch.no_grad()
def merge_lora(model: CausalLM) -> CausalLM:
    """A new fp32 :class:`CausalLM` equal to ``model`` with its adapters folded into the weights.

    Every adapted linear becomes ``W + delta`` with peft's own ``get_delta_weight`` (``scaling *
    B @ A``); for QLoRA, ``W`` is the dequantized 4-bit base, so the merged model computes what the
    QLoRA model computed (up to float rounding). ``model`` is left unchanged.

    Args:
        model: A model :func:`apply_lora` prepared (and trained).

    Returns:
        The merged model, in eval mode, on ``model``'s device.
    """
    merged = CausalLM(model.config, device="meta", dtype=torch.float32)
    missing, unexpected = merged.load_state_dict(merged_lora_state(model), strict=False, assign=True)
    if model.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise TrainError(
            f"merging the adapters went wrong: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    merged.tie_weights()
    return merged.eval()


@torch.no_grad()
def merged_lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The fp32 state of ``model`` with its adapters folded in, under the base's parameter names.

    Every adapted linear's weight is ``W + scaling * B @ A`` (``W`` dequantized for QLoRA); every other
    parameter is copied. :func:`merge_lora` loads it into a plain :class:`CausalLM`; the reward-model
    recipe into a :class:`~lmstack.train.RewardModel`.

    Args:
        model: A model :func:`apply_lora` prepared.

    Returns:
        Parameter name -> fp32 tensor (no ``lora_`` entries).
    """
    merged_state: dict[str, Tensor] = {}
    adapted: list[str] = []
    for name, module in model.named_modules():
        if not _is_lora_layer(module):
            continue
        lora_layer: Any = module
        base = lora_layer.get_base_layer()
        weight = _dense_weight(base)
        for adapter in lora_layer.active_adapters:
            if adapter in lora_layer.lora_A:
                weight += lora_layer.get_delta_weight(adapter).to(torch.float32)
        merged_state[f"{name}.weight"] = weight
        if base.bias is not None:
            merged_state[f"{name}.bias"] = base.bias.detach().to(torch.float32, copy=True)
        adapted.append(name + ".")
    for name, param in model.named_parameters():
        if not name.startswith(tuple(adapted)):
            merged_state[name] = param.detach().to(torch.float32, copy=True)
    return merged_state


# ------------------------------------------------------------------------------------------------
# the recipes
# ------------------------------------------------------------------------------------------------


def lora(cfg: LoRAConfig) -> TrainResult:
    """Train LoRA adapters on ``cfg.model`` (4-bit base when ``cfg.lora.quantize`` is nf4 or fp4).

    Args:
        cfg: The run.

    Returns:
        The run's result; ``model_dir`` (``final/``) holds ``adapter/`` (PEFT format) and, with
        ``cfg.merge``, ``merged/`` (a Hugging Face checkpoint with the tokenizer).

    Raises:
        TrainConfigError: No base model, or targets that do not fit it.
        TrainError: peft/bitsandbytes missing, or what the training loop raises.
    """
    if not cfg.model:
        raise TrainConfigError("lora needs model: the Hugging Face directory of the base.", field="model")
    base_dir = str(Path(cfg.model).absolute())
    device = init_distributed(cfg.run.device).device
    model = load_pretrained(cfg.model, dtype="float32")
    tokenizer = Tokenizer.from_pretrained(cfg.model)
    total = model.num_parameters()
    torch.manual_seed(cfg.run.seed)  # the adapters' initialisation (a resumed run loads them instead)
    names = apply_lora(model, cfg.lora, device=device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "%s: %d adapted linears, %d trainable parameters (%.2f%% of the base's %d)",
        f"QLoRA ({cfg.lora.quantize})" if cfg.lora.quantize != "none" else "LoRA",
        len(names),
        trainable,
        100 * trainable / max(total, 1),
        total,
    )

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
    )


def qlora(cfg: LoRAConfig) -> TrainResult:
    """:func:`lora` on a 4-bit base: NF4 unless ``cfg.lora.quantize`` says ``fp4``.

    So one config file serves both ``lmstack train lora`` and ``lmstack train qlora``.

    Args:
        cfg: The run; ``lora.quantize: none`` (the default) becomes ``nf4``.

    Returns:
        The run's result (see :func:`lora`).
    """
    if cfg.lora.quantize == "none":
        cfg = replace(cfg, lora=replace(cfg.lora, quantize="nf4"))
    return lora(cfg)
