"""The one typed configuration: dataclasses, loaded from a JSON/YAML file plus `--set a.b=value`.

Every key is checked against the dataclasses; an unknown key or a value of the wrong type
stops the run at start with the dotted path of the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


@dataclass
class DataConfig:
    shards: str = "build/world-shards"  # a folder written by tools/build_shards.py
    batch_size: int = 32  # per rank, per micro-step
    num_workers: int = 2
    shuffle_buffer: int = 1000
    history_content: bool = False  # decode history items' images/text (else ids only)
    seed: int = 0
    # Logical streams of the training order (0: one per rank when the run starts). The order depends on them, not on
    # the world size: one process with streams=64 reads a 64-rank run's global batches. A resume keeps the run's own.
    streams: int = 0


@dataclass
class EncoderConfig:
    kind: str = "clip"  # clip | vlmo (see mmscale.models.build_encoder)
    # clip: an open_clip model name or architecture JSON; vlmo: a VLMo JSON or vlmo-tiny|base|large
    model: str = "ViT-B-32"
    tokenizer: str | None = None  # vlmo: a local tokenizer.json / vocab.txt / folder (else the VLMo JSON's)
    pretrained: str | None = None  # local checkpoint path; nothing is downloaded
    grad_checkpointing: bool = False
    # Train only the top k groups of each tower (clip: open_clip's lock_image_tower / lock_text_tower groups); the
    # projections and logit scale always train. Unset: every parameter trains.
    trainable_blocks: int | None = None
    # With trainable_blocks: compute the frozen blocks' outputs once per item (at the start, in eval mode, across ranks)
    # and train on them; batches then carry no images or text and each step runs only the trained top of each tower.
    # Costs device memory per item, each rank holding its share of the catalogue: the activations where the towers
    # split (see the README).
    cache_frozen_blocks: bool = False
    image_size: int | None = None  # clip: the image side in pixels (unset: the architecture's)
    context_length: int | None = None  # clip: text tokens per item (unset: the architecture's)
    # end_to_end: recommender gradients flow into the encoder; frozen: every item encoded once and
    # cached; fine_tuned: the encoder first adapts with its vision-language losses alone (itc, itm, mlm as
    # weighted) for adapt_steps (on the training stream's items), then is frozen and cached for the
    # recommender. Unset: the task's own (two_tower and sequential joint: end_to_end; sequential
    # pretrain/finetune on encoder features: frozen); a setting the task contradicts is an error.
    paradigm: str | None = None
    adapt_steps: int = 200
    # How the item tower sees an item: "dual" (the image and text embeddings) or, for VLMo, "fusion"
    # (its fusion-mode [CLS] over the image and text together).
    item_representation: str = "dual"


@dataclass
class RecommenderConfig:
    embed_dim: int = 128  # width of the item and user towers' output
    item_id_embedding: bool = True  # add a learned id vector to each item's content embedding
    user_id_embedding: bool = True
    history_pooling: str = "mean"  # mean | none: pool the history items' tower embeddings into the user


@dataclass
class SequenceConfig:
    """The sequential task (config.task = "sequential"): SASRec or MP4SR."""

    model: str = "mp4sr"  # sasrec (item ids only) | mp4sr
    mode: str = "finetune"  # mp4sr: pretrain | finetune | joint (the item encoder trains end-to-end too)
    features: str = "encoder"  # encoder (the item encoder's image/text embeddings) | files (tools/extract_features.py)
    text_features: str = "minilm-text"  # feature file names under SHARDS/features/ when features = files
    image_features: str = "effnet-image"
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    temperature: float = 0.07
    experts: int = 8  # MoE adaptor experts per modality
    adaptor_dropout: float = 0.2
    mixup_max: float = 0.5  # each sequence's mixup ratio is drawn from U(0, mixup_max)
    drop_max: float = 0.2  # each sequence's item-drop ratio is drawn from U(0, drop_max)
    pretrained: str | None = None  # finetune: model.safetensors of a consolidated pretrain run
    # mp4sr finetune / joint: each training step leaves out each item's id vector with this probability (wherever the
    # item appears that step), so the model also learns to rank items by content alone, as it must rank cold items
    # (DropoutNet's input dropout, Volkovs et al. 2017). 0: off.
    id_dropout: float = 0.0
    # joint: the item table the next-item and MP4SR losses score against.
    #   cached      every item's content from a cache refreshed every cache_refresh_steps; only the batch's items
    #               carry the encoder's gradient, so the loss's push away from the other items never reaches it
    #   every_step  every warm item through the encoder's trained blocks each step, with gradient (the loss's exact
    #               gradient; the catalogue split across ranks); needs encoder.cache_frozen_blocks
    item_table: str = "cached"
    cache_refresh_steps: int = 50  # joint, cached table: the cached content is at most this many steps old


@dataclass
class ObjectiveConfig:
    # Loss weights; each task uses the names it defines: two_tower rec, itc; sequential rec (next-item
    # cross-entropy over all items), seq_item and seq_seq (MP4SR pre-training), itc (joint); with a VLMo
    # encoder also itm (image-text matching, hard negatives) and mlm (masked language modelling), both
    # in fusion mode, in two_tower and in sequential joint mode. Unset names default to 0 there.
    weights: dict[str, float] = field(default_factory=lambda: {"rec": 1.0, "itc": 0.1, "seq_item": 1.0, "seq_seq": 0.01})
    rec_loss: str = "softmax"  # softmax (in-batch sampled softmax) | bpr
    rec_temperature: float = 0.1
    # two_tower softmax: subtract each item's log share of the training interactions from its logit. In-batch
    # negatives are drawn as often as items are interacted with, so without it the loss pushes popular items down
    # (the sampling-bias correction of Yi et al., RecSys 2019). Training only; evaluation ranks by the plain score.
    logq_correction: bool = False


@dataclass
class OptimConfig:
    lr_encoder: float = 1e-5
    lr_recommender: float = 1e-3
    lr_scaling_batch: int = 0  # if > 0: learning rates scale by global_batch / this (linear rule)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    deepspeed_config: str = "ds_configs/zero2.json"
    epochs: float = 1.0  # fractional epochs allowed
    max_steps: int = 0  # if > 0, overrides epochs
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # steps; 0: only at the end
    save_every: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    collective_timeout_s: float = 600.0  # a lost rank fails the others after this, instead of a hang
    # A non-finite (NaN, inf) loss: "stop" before that step's update, keeping the last checkpoint (exit 5); "skip"
    # drops the batch without an update and counts it (10 in a row stop the run all the same).
    on_nonfinite_loss: str = "stop"
    # Early stopping and the best checkpoint: each evaluation's SPLIT/METRIC named here (e.g. valid/ndcg@10) is
    # compared with the best so far; a better one is saved as a checkpoint that pruning keeps and is described in
    # RUN/best.json; after `patience` evaluations in a row without a better one the run stops (0: never early).
    best_metric: str = ""
    patience: int = 0
    # Where scalars go besides RUN/metrics.jsonl: any of tensorboard, wandb, mlflow (mmscale/engine/monitor.py).
    report_to: tuple[str, ...] = ("tensorboard",)
    # The accelerator's peak dense TFLOP/s at the training precision (e.g. 989 for an H100/H200 in bf16): logs
    # perf/encoder_mfu, the item encoder's model FLOPs utilisation. 0: unknown, not logged.
    peak_tflops: float = 0.0
    # torch's deterministic algorithms: the same run gives the same bits (restarts included). Off, torch may pick
    # faster kernels whose float sums depend on thread timing (on the CPU, index_put's parallel accumulate):
    # then two runs of one config differ from the first step in the last bits.
    deterministic: bool = True


RANKING_METRICS = ("recall", "ndcg", "mrr", "hit")  # each reported @K for every K of eval.ks (mmscale/eval/metrics.py)


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = (10, 20, 50)
    splits: tuple[str, ...] = ("valid", "test", "cold")
    batch_size: int = 256
    exclude_seen: bool = True  # drop each user's training items from the ranking
    # The cold split's candidates: "cold" ranks a cold target among the items held out of training (which new
    # item will the user take?); "all" among the whole catalogue, where warm items carry learnt id vectors.
    cold_candidates: str = "cold"


@dataclass
class Config:
    task: str = "two_tower"  # two_tower (encoder + towers) | sequential (SASRec, MP4SR)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    recommender: RecommenderConfig = field(default_factory=RecommenderConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, hint, path: str):
    """Converts a parsed value to the field's annotated type, or raises naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a section (mapping), got {value!r}")
        return _build(hint, value, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_types = args if args and args[-1] is not Ellipsis else [args[0]] * len(value)
        if len(item_types) != len(value):
            raise ConfigError(f"{path}: expected {len(item_types)} values, got {len(value)}")
        return tuple(_coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"{path}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls, values: dict, path: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown config key '{where}' (known in this section: {sorted(names)})")
    defaults = cls()
    kwargs = {}
    for name in names:
        where = f"{path}.{name}" if path else name
        if name in values:
            value = values[name]
            default = getattr(defaults, name)
            if isinstance(default, dict) and isinstance(value, dict):
                value = {**default, **value}  # a mapping (loss weights) updates the defaults; 0 turns one off
            kwargs[name] = _coerce(value, hints[name], where)
        else:
            kwargs[name] = getattr(defaults, name)
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def dotted_items(values: dict, prefix: str = "") -> typing.Iterator[tuple[str, object]]:
    """A nested dict's leaves as (dotted key, value), keys sorted: the names `--set` uses."""
    for key, value in sorted(values.items()):
        if isinstance(value, dict):
            yield from dotted_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:  # e.g. a !!python tag: safe_load refuses to construct it
        raise ConfigError(f"override {text!r}: cannot parse the value ({str(e).splitlines()[0]})") from None
    node: dict = {}
    out = node
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def config_from_values(values: dict, overrides: list[str] = ()) -> Config:
    """Defaults <- parsed values (a file's, a run's config.json) <- `--set` overrides, validated as a whole."""
    for text in overrides:
        values = _merge(values, parse_override(text))
    config = _build(Config, values)
    validate(config)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- file (JSON or YAML) <- `--set` overrides, validated as a whole."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: cannot parse ({e})") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return config_from_values(values, overrides)


def _resolve_paradigm(config: Config) -> None:
    """Fills an unset encoder.paradigm with the task's own; rejects one the task contradicts, naming the key."""
    encoder = config.encoder
    if config.task != "sequential":
        encoder.paradigm = encoder.paradigm or "end_to_end"
        return
    seq = config.sequence
    if seq.model == "mp4sr" and seq.mode == "joint":
        if seq.features != "encoder":
            raise ConfigError("sequence.features: joint mode trains the item encoder; it needs features = encoder")
        natural, why = "end_to_end", "sequence.mode=joint trains the item encoder end to end with the sequence losses"
    elif seq.model == "mp4sr" and seq.features == "encoder":
        natural, why = "frozen", f"sequence.mode={seq.mode} reads the cached features of a frozen item encoder (joint mode trains it)"
    else:
        natural, why = "frozen", f"sequence.{'model=sasrec' if seq.model == 'sasrec' else 'features=files'} has no item encoder to adapt"
        if encoder.paradigm in (None, "end_to_end", "frozen"):  # moot without an encoder
            encoder.paradigm = encoder.paradigm or natural
            return
    if encoder.paradigm not in (None, natural):
        raise ConfigError(f"encoder.paradigm: {encoder.paradigm!r} contradicts the sequential task: {why}; leave it unset or set {natural!r}")
    encoder.paradigm = natural


def _able(capability: str) -> str:
    from .models import ENCODERS

    return " or ".join(f"encoder.kind={kind}" for kind, entry in ENCODERS.items() if capability in entry.capabilities)


def _validate_report_to(config: Config) -> None:
    import importlib.util

    from .engine.monitor import TRACKERS

    for name in config.train.report_to:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: {name!r} is not one of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"train.report_to: {name} needs the package {TRACKERS[name]!r}, which is not installed "
                              f"(pip install {TRACKERS[name]})")


def _validate_best_metric(config: Config) -> None:
    train = config.train
    if not train.best_metric:
        if train.patience:
            raise ConfigError("train.patience: early stopping needs train.best_metric (e.g. valid/ndcg@10)")
        return
    split, _, metric = train.best_metric.partition("/")
    name, _, k = metric.partition("@")
    if split not in config.eval.splits or name not in RANKING_METRICS or not k.isdigit() or int(k) not in config.eval.ks:
        raise ConfigError(f"train.best_metric: {train.best_metric!r} is not SPLIT/METRIC@K with METRIC one of "
                          f"{', '.join(RANKING_METRICS)}, SPLIT in "
                          f"eval.splits {list(config.eval.splits)} and K in eval.ks {list(config.eval.ks)}")
    if split == "test":
        raise ConfigError("train.best_metric: choosing a checkpoint on the test split reports an optimistic test figure; "
                          "use valid")
    if train.patience and not train.eval_every:
        raise ConfigError("train.patience: early stopping needs periodic evaluations (train.eval_every > 0)")


def validate(config: Config) -> None:
    """Checks that each value is allowed, naming the key; fills encoder.paradigm from the task when unset."""
    choices = {
        "task": (config.task, ("two_tower", "sequential")),
        "sequence.model": (config.sequence.model, ("sasrec", "mp4sr")),
        "sequence.mode": (config.sequence.mode, ("pretrain", "finetune", "joint")),
        "sequence.features": (config.sequence.features, ("encoder", "files")),
        "sequence.item_table": (config.sequence.item_table, ("cached", "every_step")),
        "encoder.paradigm": (config.encoder.paradigm, (None, "end_to_end", "frozen", "fine_tuned")),
        "recommender.history_pooling": (config.recommender.history_pooling, ("mean", "none")),
        "objectives.rec_loss": (config.objectives.rec_loss, ("softmax", "bpr")),
        "train.precision": (config.train.precision, ("auto", "fp32", "bf16")),
        "train.on_nonfinite_loss": (config.train.on_nonfinite_loss, ("stop", "skip")),
        "eval.cold_candidates": (config.eval.cold_candidates, ("cold", "all")),
        "encoder.item_representation": (config.encoder.item_representation, ("dual", "fusion")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {allowed}")
    _resolve_paradigm(config)
    at_least_one = {
        "data.batch_size": config.data.batch_size,
        "optim.grad_accum": config.optim.grad_accum,
        "recommender.embed_dim": config.recommender.embed_dim,
        "train.keep_last": config.train.keep_last,
        "train.log_every": config.train.log_every,
        "eval.batch_size": config.eval.batch_size,
        "sequence.cache_refresh_steps": config.sequence.cache_refresh_steps,
        "sequence.hidden": config.sequence.hidden,
        "sequence.layers": config.sequence.layers,
        "sequence.heads": config.sequence.heads,
        "sequence.experts": config.sequence.experts,
        **{f"eval.ks[{i}]": k for i, k in enumerate(config.eval.ks)},
    }
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    not_negative = {
        "optim.lr_encoder": config.optim.lr_encoder,
        "optim.lr_recommender": config.optim.lr_recommender,
        "optim.lr_scaling_batch": config.optim.lr_scaling_batch,
        "optim.weight_decay": config.optim.weight_decay,
        "optim.warmup_steps": config.optim.warmup_steps,
        "optim.grad_clip": config.optim.grad_clip,
        "train.epochs": config.train.epochs,
        "train.max_steps": config.train.max_steps,
        "train.eval_every": config.train.eval_every,
        "train.save_every": config.train.save_every,
        "train.patience": config.train.patience,
        **{f"encoder.{key}": getattr(config.encoder, key) for key in ("trainable_blocks", "image_size", "context_length")
           if getattr(config.encoder, key) is not None},
        "encoder.adapt_steps": config.encoder.adapt_steps,
        "train.peak_tflops": config.train.peak_tflops,
        "data.num_workers": config.data.num_workers,
        "data.shuffle_buffer": config.data.shuffle_buffer,
        "data.streams": config.data.streams,
        **{f"objectives.weights.{name}": w for name, w in config.objectives.weights.items()},
    }
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
    below_one = {"optim.betas[0]": config.optim.betas[0], "optim.betas[1]": config.optim.betas[1],
                 "sequence.dropout": config.sequence.dropout, "sequence.adaptor_dropout": config.sequence.adaptor_dropout,
                 "sequence.mixup_max": config.sequence.mixup_max, "sequence.drop_max": config.sequence.drop_max,
                 "sequence.id_dropout": config.sequence.id_dropout}
    for key, value in below_one.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    positive = {"optim.eps": config.optim.eps, "sequence.temperature": config.sequence.temperature,
                "objectives.rec_temperature": config.objectives.rec_temperature,
                "train.collective_timeout_s": config.train.collective_timeout_s}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if config.train.epochs == 0 and config.train.max_steps == 0:
        raise ConfigError("train.epochs and train.max_steps are both 0: the run would train nothing")
    if not config.recommender.user_id_embedding and config.recommender.history_pooling == "none":
        raise ConfigError("recommender: user_id_embedding=false with history_pooling=none leaves the user tower empty")
    from .models import ENCODERS, encoder_can
    from .objectives import LOSSES

    if config.encoder.kind not in ENCODERS:
        raise ConfigError(f"encoder.kind: unknown encoder {config.encoder.kind!r} (known: {', '.join(ENCODERS)})")
    for name, weight in config.objectives.weights.items():
        if name not in LOSSES:
            raise ConfigError(f"objectives.weights.{name}: unknown loss (known: {list(LOSSES)})")
        needs = LOSSES[name]
        if weight and needs and not encoder_can(config.encoder.kind, needs):
            raise ConfigError(f"objectives.weights.{name}: needs an encoder with the {needs!r} capability "
                              f"({_able(needs)}), not encoder.kind={config.encoder.kind!r}")
    for key in ("trainable_blocks", "image_size", "context_length"):
        if getattr(config.encoder, key) is not None and not encoder_can(config.encoder.kind, "open_clip_towers"):
            raise ConfigError(f"encoder.{key}: needs an encoder with the 'open_clip_towers' capability "
                              f"({_able('open_clip_towers')}), not encoder.kind={config.encoder.kind!r}")
    _validate_frozen_block_cache(config)
    _validate_item_table(config)
    _validate_id_dropout(config)
    _validate_best_metric(config)
    _validate_report_to(config)
    if config.encoder.item_representation == "fusion" and not encoder_can(config.encoder.kind, "fusion"):
        raise ConfigError(f"encoder.item_representation: fusion needs an encoder with the 'fusion' capability "
                          f"({_able('fusion')}), not encoder.kind={config.encoder.kind!r}")
    if config.task == "sequential" and config.encoder.item_representation == "fusion":
        raise ConfigError("encoder.item_representation: fusion is for the two_tower task (MP4SR reads image and text features apart)")
    if config.task == "two_tower" and not any(config.objectives.weights.get(n) for n in ("rec", "itc")):
        raise ConfigError("objectives.weights: rec and itc are both 0; the two_tower task would train nothing")
    if config.objectives.logq_correction and (config.task != "two_tower" or config.objectives.rec_loss != "softmax"):
        raise ConfigError("objectives.logq_correction: corrects the two_tower task's in-batch softmax (rec_loss=softmax) "
                          f"for its sampled negatives; not task={config.task!r}, rec_loss={config.objectives.rec_loss!r}")
    if config.task == "two_tower" and config.encoder.paradigm == "frozen" and config.objectives.weights.get("itc", 0) != 0:
        raise ConfigError("objectives.weights.itc: the frozen paradigm does not train the encoder; set it to 0")
    if config.encoder.paradigm == "fine_tuned" and not config.objectives.weights.get("rec"):
        raise ConfigError("objectives.weights.rec: the fine_tuned paradigm trains the recommender after adaptation; it needs a rec weight")
    if config.encoder.paradigm == "fine_tuned" and not any(config.objectives.weights.get(n) for n in ("itc", "itm", "mlm")):
        raise ConfigError("objectives.weights: the fine_tuned paradigm adapts the encoder with its vision-language losses first; "
                          "give itc (or, for VLMo, itm or mlm) a weight")


def _validate_frozen_block_cache(config: Config) -> None:
    from .models import encoder_can

    encoder, key = config.encoder, "encoder.cache_frozen_blocks"
    if not encoder.cache_frozen_blocks:
        return
    if not encoder_can(encoder.kind, "frozen_block_cache"):
        raise ConfigError(f"{key}: needs an encoder with the 'frozen_block_cache' capability ({_able('frozen_block_cache')}), "
                          f"not encoder.kind={encoder.kind!r}")
    if encoder.trainable_blocks is None:
        raise ConfigError(f"{key}: needs encoder.trainable_blocks (the blocks below the trained ones are what is cached)")
    if config.data.history_content:
        raise ConfigError(f"data.history_content: batches carry item ids only under {key} (the history items' content "
                          f"is not decoded); turn one of them off")
    if encoder.paradigm == "frozen":
        raise ConfigError(f"{key}: the encoder is frozen here (encoder.paradigm=frozen, or a sequential mode that reads a "
                          f"frozen encoder's cached features): every item's whole encoding is cached already")


def _validate_item_table(config: Config) -> None:
    seq, key = config.sequence, "sequence.item_table"
    if seq.item_table != "every_step":
        return
    if config.task != "sequential" or seq.model != "mp4sr" or seq.mode != "joint":
        raise ConfigError(f"{key}: every_step is joint mode's item table (task=sequential, sequence.model=mp4sr, "
                          f"sequence.mode=joint); nothing else trains the encoder through an item table")
    if not config.encoder.cache_frozen_blocks:
        raise ConfigError(f"{key}: every_step runs the encoder's trained blocks over every item each step, from their "
                          f"cached inputs: it needs encoder.cache_frozen_blocks=true (and encoder.trainable_blocks)")


def _validate_id_dropout(config: Config) -> None:
    seq = config.sequence
    if seq.id_dropout and (config.task != "sequential" or seq.model != "mp4sr" or seq.mode == "pretrain"):
        raise ConfigError("sequence.id_dropout: leaves out the item id vectors of MP4SR finetune or joint (task=sequential, "
                          "sequence.model=mp4sr); SASRec has nothing but ids, and pretrain and the two-tower task have none")


def dump_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2))
