"""An MQAR sweep: mixers x model sizes x learning rates, one JSON per run, a summary with the
best learning rate per model, and the recall-vs-state figure (docs/mqar.md).

The sweep config (an ml_collections ``ConfigDict``; see :func:`base_sweep_config` and
``configs/mqar_*.py``) names the data, the training settings and the model groups. A group is::

    models.<group> = dict(mixer="based",                       # a name of config.MIXER_NAMES
                          grid=dict(d_model=(48, 64), feature_dim=(8, 16, 24)),  # product
                          fixed=dict(linear_attention_heads=1),  # ModelConfig overrides
                          learning_rates=(),                    # () = the sweep's list
                          train=dict(max_epochs=16),            # {} = the sweep's config.train
                          train_mix=((64, 4, 100_000),))        # () = the sweep's train_mix

so a new mixer joins a sweep with a config entry alone; every ``grid`` and ``fixed`` key is a
``ModelConfig`` field, every ``train`` key a field of ``config.train`` (a group that needs a
longer budget than the rest, say, states it there; the run's JSON records the settings used).
``train_mix`` replaces the sweep's training mix for the group alone (a model that memorizes a
small mix gets a larger one, drawn from the same seed); the test mix is always the sweep's.

Each (group, grid point, learning rate) is a run. Its JSON is written to
``<output_dir>/runs/<name>.json`` atomically (written to a temporary file, then renamed), and a
run whose JSON exists with the same settings is skipped: a killed sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import platform
import time
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from jaxbased.data.mqar import MQARSegment, SegmentSpec, make_segments
from jaxbased.model import count_parameters
from jaxbased.mqar.models import init_params, mqar_model_config, state_size
from jaxbased.mqar.training import TrainSettings, train_mqar

RUNS_FOLDER = "runs"
SUMMARY_FILE = "summary.json"
FIGURE_FILE = "mqar.png"


def base_sweep_config() -> ml_collections.ConfigDict:
    """Every field of a sweep config, with the paper's data and training protocol
    (docs/mqar.md) and no model groups; ``configs/mqar_*.py`` start from this."""
    config = ml_collections.ConfigDict()
    config.vocab_size = 8192
    config.power_a = 0.01
    config.seed = 0
    # (seq_len, num_pairs, num_examples), in training order.
    config.train_mix = (
        (64, 4, 100_000),
        (128, 8, 20_000),
        (256, 16, 20_000),
        (256, 32, 20_000),
        (256, 64, 20_000),
    )
    config.test_mix = (
        (64, 4, 1000),
        (64, 8, 1000),
        (64, 16, 1000),
        (128, 32, 1000),
        (256, 64, 1000),
        (512, 128, 1000),
        (1024, 256, 1000),
    )
    # Full attention's KV cache grows with the sequence: its state is counted at this length.
    config.state_size_seq_len = 1024
    config.learning_rates = (1e-3, 3.2e-3, 1e-2, 3.2e-2)
    config.train = ml_collections.ConfigDict(
        dict(
            batch_size=256,
            max_epochs=32,
            max_steps=0,  # 0: no cap beyond max_epochs
            eval_every=0,  # 0: at the end of each epoch
            eval_batch_size=256,
            early_stop_accuracy=0.99,
            weight_decay=0.1,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            interleave_segments=False,
            warmup_steps=0,
            grad_clip=0.0,
            seed=0,
        )
    )
    config.models = ml_collections.ConfigDict()
    return config


def model_group(
    mixer: str,
    grid: Mapping[str, Iterable[Any]],
    fixed: Mapping[str, Any] | None = None,
    learning_rates: Iterable[float] = (),
    train: Mapping[str, Any] | None = None,
    train_mix: Iterable[tuple[int, int, int]] = (),
) -> ml_collections.ConfigDict:
    """One entry of ``config.models`` (see the module docstring)."""
    return ml_collections.ConfigDict(
        dict(
            mixer=mixer,
            grid={key: tuple(values) for key, values in grid.items()},
            fixed=dict(fixed or {}),
            learning_rates=tuple(learning_rates),
            train=dict(train or {}),
            train_mix=tuple(tuple(segment) for segment in train_mix),
        )
    )


def check_train_mix(group: str, train_mix: Any) -> tuple[tuple[int, int, int], ...]:
    """``train_mix`` as ``((seq_len, num_pairs, num_examples), ...)`` of positive ints, or
    ``ValueError`` naming the group and the bad entry."""
    segments = []
    for segment in train_mix:
        values = tuple(segment) if isinstance(segment, list | tuple) else (segment,)
        if len(values) != 3 or not all(
            isinstance(value, int) and not isinstance(value, bool) and value > 0 for value in values
        ):
            raise ValueError(
                f"model group {group!r}: train_mix entry {segment!r} must be "
                "(seq_len, num_pairs, num_examples), three positive ints"
            )
        segments.append(values)
    return tuple(segments)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a model (group, mixer, grid point, fixed overrides) and a learning
    rate. ``grid`` and ``fixed`` are ``(field, value)`` pairs of ``ModelConfig`` overrides,
    ``train`` the group's ``(field, value)`` overrides of the sweep's ``config.train`` and
    ``train_mix`` its training mix (empty: the sweep's)."""

    group: str
    mixer: str
    grid: tuple[tuple[str, Any], ...]
    fixed: tuple[tuple[str, Any], ...]
    learning_rate: float
    train: tuple[tuple[str, Any], ...] = ()
    train_mix: tuple[tuple[int, int, int], ...] = ()

    @property
    def model_key(self) -> str:
        """The model without its learning rate, e.g. ``based-d_model64-feature_dim16``."""
        return "-".join([self.group] + [f"{key}{value}" for key, value in self.grid])

    @property
    def name(self) -> str:
        """File stem of the run's JSON: the model key and the learning rate."""
        return f"{self.model_key}-lr{self.learning_rate:.1e}"

    def model_overrides(self) -> dict[str, Any]:
        """Every ``ModelConfig`` override of the run (``d_model`` included)."""
        return {**dict(self.fixed), **dict(self.grid)}

    def model_config(self, vocab_size: int):
        """The run's :class:`~jaxbased.config.ModelConfig`."""
        overrides = self.model_overrides()
        d_model = overrides.pop("d_model")
        return mqar_model_config(self.mixer, d_model=d_model, vocab_size=vocab_size, **overrides)


def _plain(value: Any) -> Any:
    """ConfigDicts, tuples and NumPy scalars as JSON-ready Python values."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, str):
        return value.item()
    return value


def expand_runs(
    config: ml_collections.ConfigDict, groups: Iterable[str] | None = None
) -> list[RunSpec]:
    """Every run of the sweep (groups in config order, then grid points, then learning rates).

    ``groups``: run only these groups (default: all). Raises ``ValueError`` for an unknown group,
    an empty grid or learning-rate list, or a model config that does not validate.
    """
    available = list(config.models.keys())
    selected = available if groups is None else list(groups)
    unknown = [group for group in selected if group not in available]
    if unknown:
        raise ValueError(f"model groups {unknown} are not in the config; allowed: {available}")
    runs = []
    for group in selected:
        entry = config.models[group]
        if not entry.get("mixer"):
            raise ValueError(
                f"model group {group!r} names no mixer; give mixer=<a MIXER_NAMES name>"
            )
        grid = {key: tuple(values) for key, values in _plain(entry.get("grid", {})).items()}
        if "d_model" not in grid and "d_model" not in entry.get("fixed", {}):
            raise ValueError(f"model group {group!r} sets no d_model (in grid or fixed)")
        fixed = _plain(entry.get("fixed", {}))
        train = _plain(entry.get("train", {}))
        unknown_train = sorted(set(train) - set(config.train.keys()))
        if unknown_train:
            raise ValueError(
                f"model group {group!r}: train overrides {unknown_train} are not fields of "
                f"config.train; allowed: {sorted(config.train.keys())}"
            )
        train_mix = check_train_mix(group, _plain(entry.get("train_mix", ())))
        learning_rates = tuple(entry.get("learning_rates", ())) or tuple(config.learning_rates)
        if not learning_rates:
            raise ValueError(f"model group {group!r} has no learning rates")
        for key, values in grid.items():
            if not values:
                raise ValueError(f"model group {group!r}: grid {key} is empty")
        for point in itertools.product(*grid.values()):
            spec = RunSpec(
                group,
                entry.mixer,
                tuple(zip(grid, point, strict=True)),
                tuple(sorted(fixed.items())),
                0.0,
                tuple(sorted(train.items())),
                train_mix,
            )
            spec.model_config(config.vocab_size)  # validates now, not in the middle of a sweep
            train_settings(config, 1.0, spec.train)  # and the training settings
            for learning_rate in learning_rates:
                runs.append(dataclasses.replace(spec, learning_rate=float(learning_rate)))
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"runs {duplicates} appear twice; make the grids distinct")
    return runs


def train_settings(
    config: ml_collections.ConfigDict,
    learning_rate: float,
    overrides: Iterable[tuple[str, Any]] = (),
) -> TrainSettings:
    """The ``TrainSettings`` of ``config.train`` with a group's ``overrides`` applied."""
    values = {**_plain(config.train), **dict(overrides)}
    values["max_steps"] = values["max_steps"] or None
    return TrainSettings(learning_rate=learning_rate, **values)


def data_description(
    config: ml_collections.ConfigDict, train_mix: Iterable[tuple[int, int, int]] = ()
) -> dict[str, Any]:
    """The data settings of a run (part of its fingerprint): the sweep's, with ``train_mix``
    (a group's override) in place of the sweep's training mix when given."""
    return dict(
        vocab_size=config.vocab_size,
        power_a=config.power_a,
        seed=config.seed,
        train_mix=_plain(tuple(train_mix) or config.train_mix),
        test_mix=_plain(config.test_mix),
    )


def build_data(
    config: ml_collections.ConfigDict, train_mix: Iterable[tuple[int, int, int]] = ()
) -> tuple[list[MQARSegment], list[MQARSegment]]:
    """The training and test mixes of the sweep (drawn from independent seeds); ``train_mix``
    replaces the sweep's training mix when given."""
    train_mix = tuple(train_mix) or config.train_mix

    def specs(mix) -> list[SegmentSpec]:
        return [SegmentSpec(int(t), int(p), int(n)) for t, p, n in mix]

    common = dict(vocab_size=config.vocab_size, power_a=config.power_a)
    train_segments = make_segments(specs(train_mix), seed=(config.seed, 0), **common)
    test_segments = make_segments(specs(config.test_mix), seed=(config.seed, 1), **common)
    return train_segments, test_segments


def run_fingerprint(config: ml_collections.ConfigDict, run: RunSpec) -> str:
    """A hash of everything that determines a run's result (data, training, model, lr)."""
    description = dict(
        data=data_description(config, run.train_mix),
        train=_plain(config.train),
        model=_plain(run.model_overrides()),
        mixer=run.mixer,
        learning_rate=run.learning_rate,
        state_size_seq_len=config.state_size_seq_len,
    )
    if run.train:  # only when set, so that the runs of groups without overrides keep their hash
        description["train_overrides"] = _plain(dict(run.train))
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomically(path: pathlib.Path, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` via a temporary file and ``os.replace``: readers see
    the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def load_finished(path: pathlib.Path, fingerprint: str) -> dict[str, Any] | None:
    """The run's JSON if it exists and was made with the same settings, else None."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logging.warning("%s is not valid JSON; the run is redone", path)
        return None
    if result.get("fingerprint") != fingerprint:
        logging.warning("%s was made with other settings; the run is redone", path)
        return None
    return result


def run_one(
    config: ml_collections.ConfigDict,
    run: RunSpec,
    train_segments: list[MQARSegment],
    test_segments: list[MQARSegment],
) -> dict[str, Any]:
    """Train one run and return its JSON record."""
    model_config = run.model_config(config.vocab_size)
    settings = train_settings(config, run.learning_rate, run.train)
    sizes = state_size(model_config, config.state_size_seq_len)
    parameters = count_parameters(jax.eval_shape(lambda: init_params(model_config, settings.seed)))
    result = train_mqar(
        model_config, train_segments, test_segments, settings, log_prefix=f"{run.name}: "
    )
    return dict(
        name=run.name,
        group=run.group,
        mixer=run.mixer,
        model_key=run.model_key,
        grid=_plain(dict(run.grid)),
        learning_rate=run.learning_rate,
        fingerprint=run_fingerprint(config, run),
        model_config=_plain(model_config.to_dict()),
        parameters=parameters,
        state_size=dict(mixer=sizes.mixer, total=sizes.total, seq_len=config.state_size_seq_len),
        accuracy=result.final.accuracy,
        loss=result.final.loss,
        accuracy_by_segment=result.final.accuracy_by_segment,
        history=result.history,
        steps=result.steps,
        stopped_early=result.stopped_early,
        seconds=result.seconds,
        train=_plain(dataclasses.asdict(settings)),
        data=data_description(config, run.train_mix),
        finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def summarize(config: ml_collections.ConfigDict, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The best learning rate of each model (highest final test accuracy), as plot points."""
    best: dict[str, dict[str, Any]] = {}
    for record in records:
        current = best.get(record["model_key"])
        if current is None or record["accuracy"] > current["accuracy"]:
            best[record["model_key"]] = record
    tried: dict[str, list[float]] = {}
    for record in records:
        tried.setdefault(record["model_key"], []).append(record["learning_rate"])
    points = [
        dict(
            model_key=key,
            group=record["group"],
            mixer=record["mixer"],
            grid=record["grid"],
            state_size=record["state_size"]["mixer"],
            state_size_total=record["state_size"]["total"],
            parameters=record["parameters"],
            accuracy=record["accuracy"],
            accuracy_by_segment=record["accuracy_by_segment"],
            best_learning_rate=record["learning_rate"],
            learning_rates=sorted(tried[key]),
            steps=record["steps"],
            train_examples=sum(segment[2] for segment in record["data"]["train_mix"]),
            stopped_early=record["stopped_early"],
            seconds=record["seconds"],
        )
        for key, record in best.items()
    ]
    points.sort(key=lambda point: (point["group"], point["state_size"], point["model_key"]))
    return dict(
        data=data_description(config),
        train=_plain(config.train),
        state_size_seq_len=config.state_size_seq_len,
        runs=len(records),
        total_seconds=sum(record["seconds"] for record in records),
        machine=dict(
            platform=platform.platform(),
            processor=platform.processor() or platform.machine(),
            cpu_count=os.cpu_count(),
            jax_backend=jax.default_backend(),
            jax_version=jax.__version__,
        ),
        points=points,
    )


def collect_finished(
    config: ml_collections.ConfigDict,
    output_dir: str | os.PathLike,
    *,
    groups: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """The records of the sweep's runs already finished in ``output_dir`` (same settings)."""
    folder = pathlib.Path(output_dir) / RUNS_FOLDER
    records = []
    for run in expand_runs(config, groups):
        record = load_finished(folder / f"{run.name}.json", run_fingerprint(config, run))
        if record is not None:
            records.append(record)
    return records


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """``summary`` (see :func:`summarize`), the per-run ``records``, what was trained now
    (``trained``) and what was found finished (``skipped``), and the files written."""

    summary: dict[str, Any]
    records: list[dict[str, Any]]
    trained: list[str]
    skipped: list[str]
    summary_path: pathlib.Path
    figure_path: pathlib.Path | None


def run_sweep(
    config: ml_collections.ConfigDict,
    output_dir: str | os.PathLike,
    *,
    groups: Iterable[str] | None = None,
    figure: bool = True,
) -> SweepResult:
    """Run every run of ``config`` not finished yet in ``output_dir``, then write
    ``summary.json`` and (``figure``) ``mqar.png`` there from all finished runs of the sweep."""
    output = pathlib.Path(output_dir)
    runs = expand_runs(config, groups)
    logging.info("MQAR sweep: %d runs into %s", len(runs), output)
    data: dict[tuple, tuple[list[MQARSegment], list[MQARSegment]]] = {}
    records, trained, skipped = [], [], []
    for index, run in enumerate(runs):
        path = output / RUNS_FOLDER / f"{run.name}.json"
        fingerprint = run_fingerprint(config, run)
        record = load_finished(path, fingerprint)
        if record is not None:
            logging.info("[%d/%d] %s: finished before, skipped", index + 1, len(runs), run.name)
            skipped.append(run.name)
        else:
            if run.train_mix not in data:
                data[run.train_mix] = build_data(config, run.train_mix)
            logging.info("[%d/%d] %s: training", index + 1, len(runs), run.name)
            record = run_one(config, run, *data[run.train_mix])
            write_json_atomically(path, record)
            trained.append(run.name)
            logging.info(
                "[%d/%d] %s: accuracy %.4f after %d steps (%.0f s), state %d floats",
                index + 1,
                len(runs),
                run.name,
                record["accuracy"],
                record["steps"],
                record["seconds"],
                record["state_size"]["mixer"],
            )
        records.append(record)
    summary = summarize(config, records)
    summary_path = output / SUMMARY_FILE
    write_json_atomically(summary_path, summary)
    figure_path = None
    if figure:
        from jaxbased.mqar.plot import plot_summary

        figure_path = plot_summary(summary, output / FIGURE_FILE)
    return SweepResult(summary, records, trained, skipped, summary_path, figure_path)
