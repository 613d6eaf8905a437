"""Typed task definitions and lmstack's own YAML/dict form of them.

A :class:`TaskConfig` says where the documents come from, how each becomes a prompt (jinja2 templates or
field names, as lm-evaluation-harness), how few-shot examples are chosen, what kind of request is sent
and which metrics score it. It is plain data: building it reads no file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from lmstack.eval._errors import TaskConfigError

if TYPE_CHECKING:
    from collections.abc import Collection

    from lmstack.infer import SamplingParams

__all__ = [
    "ChatConfig",
    "CodeConfig",
    "DatasetConfig",
    "DatasetFormat",
    "FewshotSampler",
    "GenerationKwargs",
    "GroupConfig",
    "GroupMetric",
    "MetricConfig",
    "OutputType",
    "SplitConfig",
    "TaskConfig",
]

OutputType = Literal["multiple_choice", "generate_until", "loglikelihood_rolling", "loglikelihood"]
DatasetFormat = Literal["jsonl", "json", "csv", "parquet", "hf"]
FewshotSampler = Literal["random", "first_n"]

OUTPUT_TYPES: tuple[str, ...] = get_args(OutputType)
DATASET_FORMATS: tuple[str, ...] = get_args(DatasetFormat)
FEWSHOT_SAMPLERS: tuple[str, ...] = get_args(FewshotSampler)

# lm-evaluation-harness's default few-shot seed (its evaluator's ``fewshot_random_seed``).
DEFAULT_SEED = 1234
DEFAULT_MAX_GEN_TOKS = 256
GENERATION_KEYS = ("until", "max_gen_toks", "temperature", "do_sample", "top_p", "top_k")


class _Where:
    """Where a config value came from, to name it in errors (the task file and the key path)."""

    def __init__(self, source: Path | None, prefix: str = "") -> None:
        self.source = source
        self.prefix = prefix

    def child(self, key: str) -> _Where:
        return _Where(self.source, f"{self.prefix}{key}.")

    def key(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def error(self, key: str, message: str) -> TaskConfigError:
        where = f" in {self.source}" if self.source is not None else ""
        return TaskConfigError(
            f"task key {self.key(key)!r}{where}: {message}", key=self.key(key), source=self.source
        )

    def check_keys(self, data: Mapping[str, Any], allowed: Collection[str], what: str) -> None:
        for name in data:
            if name not in allowed:
                raise self.error(
                    str(name), f"unknown {what} key; the known ones are {', '.join(sorted(allowed))}"
                )


def _expect(where: _Where, key: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    # bool is an int subclass: a YAML `true` must not pass as a number.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise where.error(key, f"expected {what}, got {value!r}")
    return value


def _optional_str(where: _Where, data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else _expect(where, key, value, str, "a string")


def _str_tuple(where: _Where, key: str, value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(item, str) for item in items):
        raise where.error(key, f"expected a string or a list of strings, got {value!r}")
    return tuple(items)


@dataclass(frozen=True)
class DatasetConfig:
    """Where a task's documents live.

    Attributes:
        format: ``jsonl``, ``json`` (a JSON array or JSON lines, as Hugging Face's ``json`` builder reads),
            ``csv``, ``parquet``, or ``hf`` (``datasets.load_dataset(path, name, data_files=...)``; needs
            the optional ``datasets`` package).
        data_files: Split name -> the files holding that split, read in order and concatenated.
        path: The Hugging Face dataset name or directory (``hf`` format only).
        name: The Hugging Face configuration name (``hf`` format only).
    """

    format: DatasetFormat
    data_files: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    path: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.format not in DATASET_FORMATS:
            raise TaskConfigError(
                f"dataset format {self.format!r} is not one of {', '.join(DATASET_FORMATS)}",
                key="dataset.format",
            )
        if self.format != "hf" and not self.data_files:
            raise TaskConfigError(
                f"a {self.format} dataset needs data_files (split name -> file)", key="dataset.data_files"
            )
        if self.format == "hf" and not self.path and not self.data_files:
            raise TaskConfigError("an hf dataset needs a path or data_files", key="dataset.path")
        # Normalise to tuples of Paths whatever the caller passed (a str, a Path, a list).
        files = {
            split: tuple(Path(f) for f in ([paths] if isinstance(paths, (str, Path)) else paths))
            for split, paths in self.data_files.items()
        }
        object.__setattr__(self, "data_files", files)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: Path | None, where: _Where) -> DatasetConfig:
        """Read lmstack's ``dataset`` mapping; relative data files resolve against ``base_dir``."""
        where.check_keys(data, ("format", "data_files", "path", "name"), "dataset")
        fmt = data.get("format")
        if fmt not in DATASET_FORMATS:
            raise where.error("format", f"expected one of {', '.join(DATASET_FORMATS)}, got {fmt!r}")
        files = resolve_data_files(data.get("data_files"), base_dir=base_dir, where=where, key="data_files")
        return cls(
            format=fmt,
            data_files=files,
            path=_optional_str(where, data, "path"),
            name=_optional_str(where, data, "name"),
        )


def resolve_data_files(
    value: Any, *, base_dir: Path | None, where: _Where, key: str
) -> dict[str, tuple[Path, ...]]:
    """Normalise ``data_files`` (a file, a list of files, or split -> file(s)) to split -> absolute paths.

    A bare file or list is the ``train`` split, as Hugging Face ``datasets`` reads it.
    """
    if value is None:
        return {}
    mapping = value if isinstance(value, Mapping) else {"train": value}
    files: dict[str, tuple[Path, ...]] = {}
    for split, paths in mapping.items():
        names = _str_tuple(where, f"{key}.{split}", paths)
        files[str(split)] = tuple(
            Path(name) if base_dir is None or Path(name).is_absolute() else base_dir / name for name in names
        )
    return files


@dataclass(frozen=True)
class SplitConfig:
    """Which dataset split plays which role.

    Attributes:
        test: The split evaluated when set.
        validation: The split evaluated when ``test`` is not set.
        train: A split for few-shot examples only.
        fewshot: The split few-shot examples come from; unset, lm-evaluation-harness's rule applies:
            ``train``, else ``validation``, else ``test``.
    """

    test: str | None = None
    validation: str | None = None
    train: str | None = None
    fewshot: str | None = None

    def __post_init__(self) -> None:
        if self.test is None and self.validation is None:
            raise TaskConfigError("a task needs a test or a validation split to evaluate", key="splits.test")

    @property
    def eval_split(self) -> str:
        """The split whose documents are evaluated."""
        split = self.test if self.test is not None else self.validation
        assert split is not None  # checked in __post_init__
        return split

    @property
    def fewshot_split(self) -> str:
        """The split few-shot examples are drawn from."""
        for split in (self.fewshot, self.train, self.validation, self.test):
            if split is not None:
                return split
        raise AssertionError("unreachable: __post_init__ requires test or validation")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: _Where) -> SplitConfig:
        """Read the ``splits`` mapping of lmstack's task YAML."""
        names = ("test", "validation", "train", "fewshot")
        where.check_keys(data, names, "splits")
        return cls(**{name: _optional_str(where, data, name) for name in names})


@dataclass(frozen=True)
class GenerationKwargs:
    """How a ``generate_until`` request is decoded (lm-evaluation-harness's ``generation_kwargs``).

    Attributes:
        until: Stop strings; the completion ends before the first one.
        max_gen_toks: Most tokens to generate.
        temperature: Sampling temperature; only used when ``do_sample``.
        do_sample: Sample instead of greedy decoding.
        top_p: Nucleus sampling threshold, when sampling.
        top_k: Top-k sampling, when sampling.
    """

    until: tuple[str, ...] = ()
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    temperature: float = 0.0
    do_sample: bool = False
    top_p: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "until", tuple(self.until))
        if self.max_gen_toks < 1:
            raise TaskConfigError(f"max_gen_toks must be >= 1, got {self.max_gen_toks}", key="max_gen_toks")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, default_until: str, where: _Where) -> GenerationKwargs:
        """Read a generation mapping; a missing ``until`` stops at ``default_until`` as lm-eval does."""
        where.check_keys(data, GENERATION_KEYS, "generation")
        until = _str_tuple(where, "until", data["until"]) if "until" in data else (default_until,)
        top_p = data.get("top_p")
        top_k = data.get("top_k")
        return cls(
            until=until,
            max_gen_toks=_expect(
                where, "max_gen_toks", data.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS), int, "an int"
            ),
            temperature=float(
                _expect(where, "temperature", data.get("temperature", 0.0), (int, float), "a number")
            ),
            do_sample=_expect(where, "do_sample", data.get("do_sample", False), bool, "true or false"),
            top_p=None if top_p is None else float(_expect(where, "top_p", top_p, (int, float), "a number")),
            top_k=None if top_k is None else _expect(where, "top_k", top_k, int, "an int"),
        )

    def as_dict(self) -> dict[str, Any]:
        """The kwargs as lm-evaluation-harness spells them (the canonical form hashed into requests)."""
        return {
            "until": list(self.until),
            "max_gen_toks": self.max_gen_toks,
            "temperature": self.temperature,
            "do_sample": self.do_sample,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }

    def to_sampling_params(self) -> SamplingParams:
        """The :class:`lmstack.infer.SamplingParams` that decode as these kwargs say."""
        from lmstack.infer import SamplingParams

        return SamplingParams(
            n=1,
            max_tokens=self.max_gen_toks,
            temperature=self.temperature if self.do_sample else 0.0,
            top_p=self.top_p if self.do_sample and self.top_p is not None else 1.0,
            top_k=self.top_k if self.do_sample and self.top_k is not None else -1,
            stop=list(self.until),
        )


@dataclass(frozen=True)
class MetricConfig:
    """One metric a task reports, named as the metric registry names it.

    Attributes:
        name: The metric's name (``acc``, ``acc_norm``, ``exact_match``, ...); resolved by the metric
            registry when the task is scored, not here.
        options: Keyword options for the metric (``ignore_case``, ``ignore_punctuation``, ...).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TaskConfigError(
                f"a metric name must be a non-empty string, got {self.name!r}", key="metrics"
            )
        object.__setattr__(self, "options", dict(self.options))


@dataclass(frozen=True)
class ChatConfig:
    """Chat-template mode: prompts become conversations that the model's chat template renders.

    Attributes:
        system_prompt: A system message put first (before the task description, which joins it).
        fewshot_as_multiturn: Few-shot examples as user/assistant turns (lm-eval's
            ``--fewshot_as_multiturn``); otherwise everything is one user message.
    """

    system_prompt: str | None = None
    fewshot_as_multiturn: bool = True

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: _Where) -> ChatConfig:
        """Read the ``chat`` mapping of lmstack's task YAML."""
        where.check_keys(data, ("system_prompt", "fewshot_as_multiturn"), "chat")
        multiturn = _expect(
            where, "fewshot_as_multiturn", data.get("fewshot_as_multiturn", True), bool, "true or false"
        )
        return cls(system_prompt=_optional_str(where, data, "system_prompt"), fewshot_as_multiturn=multiturn)


@dataclass(frozen=True)
class CodeConfig:
    r"""Code execution for a ``generate_until`` task scored by running what the model wrote (pass@k).

    Each completion is pasted into :attr:`program` and the result runs in
    :func:`lmstack.core.sandbox.run_python`; a sample passes when the program exits cleanly.

    Attributes:
        program: A jinja2 template over the document's fields plus ``completion`` (the model's reply),
            rendering the whole program to run, e.g. HumanEval's
            ``"{{prompt}}{{completion}}\n\n{{test}}\ncheck({{entry_point}})"``.
        timeout_s: Wall-clock limit of one run, in seconds.
        memory_mb: Address-space limit of one run, in MiB.
        samples: Completions generated per document (pass@k's ``n``); unset, the largest ``k`` among the
            task's ``pass@k`` metrics (1 without any).
    """

    program: str
    timeout_s: float = 10.0
    memory_mb: int = 512
    samples: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.program, str) or not self.program.strip():
            raise TaskConfigError(
                f"code.program must be a non-empty template, got {self.program!r}", key="code.program"
            )
        if not self.timeout_s > 0:
            raise TaskConfigError(f"code.timeout_s must be > 0, got {self.timeout_s}", key="code.timeout_s")
        if self.memory_mb < 1:
            raise TaskConfigError(f"code.memory_mb must be >= 1, got {self.memory_mb}", key="code.memory_mb")
        if self.samples is not None and self.samples < 1:
            raise TaskConfigError(f"code.samples must be >= 1, got {self.samples}", key="code.samples")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: _Where) -> CodeConfig:
        """Read the ``code`` mapping of lmstack's task YAML."""
        where.check_keys(data, ("program", "timeout_s", "memory_mb", "samples"), "code")
        if "program" not in data:
            raise where.error("program", "is required (the template of the program to run)")
        samples = data.get("samples")
        return cls(
            program=_expect(where, "program", data["program"], str, "a string"),
            timeout_s=float(
                _expect(where, "timeout_s", data.get("timeout_s", 10.0), (int, float), "a number")
            ),
            memory_mb=_expect(where, "memory_mb", data.get("memory_mb", 512), int, "an int"),
            samples=None if samples is None else _expect(where, "samples", samples, int, "an int"),
        )


TemplateSpec = str | tuple[str, ...]


@dataclass(frozen=True)
class TaskConfig:
    """A complete, typed task definition.

    ``doc_to_text``, ``doc_to_target`` and ``doc_to_choice`` are each a field name of the documents or a
    jinja2 template rendered with the document's fields, exactly as lm-evaluation-harness reads them
    (a template rendering to digits is an index when the task has choices; ``doc_to_choice`` as a
    template must render a Python list literal). ``doc_to_choice`` may also be a fixed list of choices.

    Attributes:
        name: The task's name (results and caches are keyed by it).
        dataset: Where the documents live.
        output_type: ``multiple_choice`` (one log-likelihood request per choice), ``generate_until``,
            ``loglikelihood_rolling`` (perplexity of ``doc_to_target``) or ``loglikelihood`` (of
            ``doc_to_target`` after the context).
        doc_to_text: The prompt of a document (unused by ``loglikelihood_rolling``).
        doc_to_target: The answer: an index into the choices, a string, or a list of either.
        doc_to_choice: The choices of a multiple-choice document.
        splits: Which split is evaluated and which gives few-shot examples.
        description: Text put before everything else (a template or field name, as lm-eval).
        target_delimiter: Between a question and its answer (in few-shot examples and before each choice).
        fewshot_delimiter: After each few-shot example.
        num_fewshot: Few-shot examples per document.
        fewshot_sampler: ``random`` (seeded per document) or ``first_n`` (the split's first examples).
        seed: The task's few-shot seed; each document's sampler is seeded from it and the doc id.
        generation: Decoding of ``generate_until`` requests (default: greedy, stop at the
            few-shot delimiter).
        metrics: The metrics reported.
        chat: Chat-template mode when set, else plain text prompts.
        code: Code execution of the completions (``generate_until`` only), for ``pass@k`` metrics.
        repeats: Completions generated per document (lm-evaluation-harness's ``repeats``;
            ``generate_until`` only). Every completion is recorded; pass@k scores them all, other
            metrics the first one (lm-eval's default ``take_first``).
        limit: Evaluate only the first ``limit`` documents.
        source: The file the task was read from, when any (named in errors).
    """

    name: str
    dataset: DatasetConfig
    output_type: OutputType
    doc_to_text: str | None = None
    doc_to_target: str | None = None
    doc_to_choice: TemplateSpec | None = None
    splits: SplitConfig = field(default_factory=lambda: SplitConfig(test="test"))
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    fewshot_sampler: FewshotSampler = "random"
    seed: int = DEFAULT_SEED
    generation: GenerationKwargs | None = None
    metrics: tuple[MetricConfig, ...] = ()
    chat: ChatConfig | None = None
    code: CodeConfig | None = None
    repeats: int = 1
    limit: int | None = None
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = _Where(self.source)
        if not isinstance(self.name, str) or not self.name:
            raise where.error("name", f"expected a non-empty task name, got {self.name!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise where.error(
                "output_type", f"expected one of {', '.join(OUTPUT_TYPES)}, got {self.output_type!r}"
            )
        if self.doc_to_target is None:
            raise where.error("doc_to_target", "is required (the answer, or the text to score)")
        if self.output_type != "loglikelihood_rolling" and self.doc_to_text is None:
            raise where.error("doc_to_text", f"is required for output_type {self.output_type}")
        if self.output_type == "multiple_choice" and self.doc_to_choice is None:
            raise where.error("doc_to_choice", "is required for output_type multiple_choice")
        if isinstance(self.doc_to_choice, list):
            object.__setattr__(self, "doc_to_choice", tuple(self.doc_to_choice))
        if self.num_fewshot < 0:
            raise where.error("num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        if self.fewshot_sampler not in FEWSHOT_SAMPLERS:
            raise where.error("fewshot_sampler", f"expected one of {', '.join(FEWSHOT_SAMPLERS)}")
        if self.limit is not None and self.limit < 1:
            raise where.error("limit", f"must be >= 1, got {self.limit}")
        if self.output_type == "generate_until" and self.generation is None:
            # lm-eval's default: greedy, stop at the few-shot delimiter.
            object.__setattr__(self, "generation", GenerationKwargs(until=(self.fewshot_delimiter,)))
        elif self.output_type != "generate_until" and self.generation is not None:
            raise where.error("generation", f"only applies to generate_until, not {self.output_type}")
        if self.code is not None and self.output_type != "generate_until":
            raise where.error("code", f"only applies to generate_until, not {self.output_type}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise where.error("repeats", f"must be an int >= 1, got {self.repeats!r}")
        if self.repeats > 1 and self.output_type != "generate_until":
            # A log-likelihood is deterministic: n copies would only cost n times the compute.
            raise where.error("repeats", f"only applies to generate_until, not {self.output_type}")
        code_samples = None if self.code is None else self.code.samples
        if self.repeats > 1 and code_samples is not None and code_samples != self.repeats:
            raise where.error(
                "repeats", f"is {self.repeats} but code.samples is {code_samples}; give one of them"
            )
        object.__setattr__(self, "metrics", tuple(self.metrics))
        names = [metric.name for metric in self.metrics]
        for name in names:
            if names.count(name) > 1:
                raise where.error("metrics", f"metric {name!r} is listed twice")

    @property
    def code_samples(self) -> int:
        """Completions generated per document.

        ``code.samples`` when set, else the larger of ``repeats`` and the largest pass@k ``k`` (1 for a
        task that is not ``generate_until``).
        """
        if self.code is not None and self.code.samples is not None:
            return self.code.samples
        ks = [int(m.name[5:]) for m in self.metrics if m.name.startswith("pass@") and m.name[5:].isdigit()]
        return max([self.repeats, *ks])

    def check_metrics(self, known: Collection[str]) -> None:
        """Raise a :class:`TaskConfigError` naming any metric not in ``known`` (the registry's names)."""
        for metric in self.metrics:
            if metric.name not in known:
                raise _Where(self.source).error(
                    "metrics",
                    f"unknown metric {metric.name!r}; the known ones are {', '.join(sorted(known))}",
                )

    def replace(self, **changes: Any) -> TaskConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, source: str | Path | None = None, base_dir: Path | None = None
    ) -> TaskConfig:
        """Read lmstack's own task format (the mapping a task YAML file holds).

        Relative ``dataset.data_files`` resolve against ``base_dir`` when given, else the directory of
        ``source`` when given, else the current directory. Unknown keys are errors naming the key and
        the file.
        """
        path = None if source is None else Path(source)
        where = _Where(path)
        where.check_keys(data, _OWN_KEYS, "task")
        for required in ("name", "dataset", "output_type"):
            if required not in data:
                raise where.error(required, "is required")
        if base_dir is None and path is not None:
            base_dir = path.parent
        dataset = _mapping(where, data, "dataset")
        fewshot_delimiter = data.get("fewshot_delimiter", "\n\n")
        generation = None
        if data.get("generation") is not None:
            generation = GenerationKwargs.from_dict(
                _mapping(where, data, "generation"),
                default_until=_expect(where, "fewshot_delimiter", fewshot_delimiter, str, "a string"),
                where=where.child("generation"),
            )
        return cls(
            name=_expect(where, "name", data["name"], str, "a string"),
            dataset=DatasetConfig.from_dict(dataset, base_dir=base_dir, where=where.child("dataset")),
            output_type=data["output_type"],
            doc_to_text=_optional_str(where, data, "doc_to_text"),
            doc_to_target=_optional_str(where, data, "doc_to_target"),
            doc_to_choice=parse_choice_spec(where, "doc_to_choice", data.get("doc_to_choice")),
            splits=SplitConfig.from_dict(
                _mapping(where, data, "splits", {"test": "test"}), where=where.child("splits")
            ),
            description=_expect(where, "description", data.get("description", ""), str, "a string"),
            target_delimiter=_expect(
                where, "target_delimiter", data.get("target_delimiter", " "), str, "a string"
            ),
            fewshot_delimiter=fewshot_delimiter,
            num_fewshot=_expect(where, "num_fewshot", data.get("num_fewshot", 0), int, "an int"),
            fewshot_sampler=data.get("fewshot_sampler", "random"),
            seed=_expect(where, "seed", data.get("seed", DEFAULT_SEED), int, "an int"),
            generation=generation,
            metrics=parse_metrics(where, "metrics", data.get("metrics", ()), name_key="name"),
            chat=None
            if data.get("chat") is None
            else ChatConfig.from_dict(_mapping(where, data, "chat"), where=where.child("chat")),
            code=None
            if data.get("code") is None
            else CodeConfig.from_dict(_mapping(where, data, "code"), where=where.child("code")),
            repeats=data.get("repeats", 1),
            limit=None
            if data.get("limit") is None
            else _expect(where, "limit", data["limit"], int, "an int"),
            source=path,
        )


@dataclass(frozen=True)
class GroupMetric:
    """One metric a group aggregates over its members (lm-evaluation-harness's ``aggregate_metric_list``).

    Attributes:
        metric: The metric's name; every member must report it.
        weight_by_size: Micro average (each member weighted by its sample count) when true, else the
            macro average (each member counts once), as lm-eval's ``weight_by_size``.
    """

    metric: str
    weight_by_size: bool = False


@dataclass(frozen=True)
class GroupConfig:
    """A group of tasks (an lm-evaluation-harness group YAML) whose scores are averaged.

    Attributes:
        name: The group's name (results key it under ``groups``).
        members: Its tasks and subgroups; a string is a built-in task name.
        aggregate: The metrics averaged over the members (none: the group only lists its tasks).
        alias: A display name (``group_alias``).
        source: The file the group was read from.
    """

    name: str
    members: tuple[TaskConfig | GroupConfig | str, ...]
    aggregate: tuple[GroupMetric, ...] = ()
    alias: str | None = None
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = _Where(self.source)
        if not isinstance(self.name, str) or not self.name:
            raise where.error("group", f"expected a non-empty group name, got {self.name!r}")
        object.__setattr__(self, "members", tuple(self.members))
        if not self.members:
            raise where.error("task", f"group {self.name} lists no tasks")
        names = [m if isinstance(m, str) else m.name for m in self.members]
        for name in names:
            if names.count(name) > 1:
                raise where.error("task", f"group {self.name} lists {name!r} twice")


_OWN_KEYS = tuple(f.name for f in dataclasses.fields(TaskConfig) if f.name != "source")


def _mapping(where: _Where, data: Mapping[str, Any], key: str, default: Any = None) -> Mapping[str, Any]:
    value = data.get(key, default)
    return _expect(where, key, value, Mapping, "a mapping")


def parse_choice_spec(where: _Where, key: str, value: Any) -> TemplateSpec | None:
    """A ``doc_to_choice``: a field name or template, a fixed list, or a mapping (its values, as lm-eval)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise where.error(key, f"expected a field name, a template or a list of strings, got {value!r}")


def parse_metrics(where: _Where, key: str, value: Any, *, name_key: str) -> tuple[MetricConfig, ...]:
    """A metric list: names, or mappings with the name under ``name_key`` and options beside it."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise where.error(key, f"expected a list of metrics, got {value!r}")
    metrics = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            metrics.append(MetricConfig(item))
        elif isinstance(item, Mapping) and isinstance(item.get(name_key), str):
            options = {k: v for k, v in item.items() if k != name_key}
            metrics.append(MetricConfig(item[name_key], options))
        else:
            raise where.error(
                f"{key}[{i}]", f"expected a metric name or a mapping with {name_key!r}, got {item!r}"
            )
    return tuple(metrics)
