"""MQAR, the recall benchmark of the BASED paper (docs/mqar.md): 2-layer models built from the
language model's code, their training, the sweep over mixers, sizes and learning rates, and the
recall-vs-state figure. The data generator is :mod:`jaxbased.data.mqar`."""

from jaxbased.mqar.models import (
    MQAR_DEFAULTS,
    StateSize,
    answer_logits,
    init_params,
    mqar_model_config,
    state_size,
)
from jaxbased.mqar.plot import plot_summary
from jaxbased.mqar.sweep import (
    RunSpec,
    SweepResult,
    base_sweep_config,
    collect_finished,
    expand_runs,
    model_group,
    run_sweep,
    summarize,
)
from jaxbased.mqar.training import (
    MQAREvaluation,
    MQARResult,
    TrainSettings,
    evaluate_mqar,
    train_mqar,
)

__all__ = [
    "MQAR_DEFAULTS",
    "MQAREvaluation",
    "MQARResult",
    "RunSpec",
    "StateSize",
    "SweepResult",
    "TrainSettings",
    "answer_logits",
    "base_sweep_config",
    "collect_finished",
    "evaluate_mqar",
    "expand_runs",
    "init_params",
    "model_group",
    "mqar_model_config",
    "plot_summary",
    "run_sweep",
    "state_size",
    "summarize",
    "train_mqar",
]
