"""A model of a train step's temporary memory, fitted to XLA's own numbers for small probes.

Compiling the whole train step of a large model for every candidate setting (micro-batch x
remat) would take minutes each on a CPU host. Instead, for each remat setting, this module
compiles the one-device train step of a few *probe* models that differ from the config only in
their depth, each at one and at two sequences per micro-batch, and reads
``memory_analysis().temp_size_in_bytes``. Every term below is linear in the micro-batch ``m``
(fitted through ``m = 1`` and ``m = 2``).

- **Scanned layers** (``scan_layers`` and a pattern ``unit * repeats + remainder``): the probes
  are ``unit * 3 + remainder`` and ``unit * 5 + remainder``; one more repeat of the unit adds
  ``unit(m) = (temp(5, m) - temp(3, m)) / 2``, and the whole model holds
  ``temp(3, m) + (repeats - 3) * unit(m)``. Only the scan's trip count differs between the
  probes and the model. (Probes of 2 and 3 repeats were up to 28% off for Transformer++: XLA
  treats a loop of very few iterations differently.)
- **Unrolled layers**: the probes are one and two layers of each mixer kind ``k`` of the
  pattern; ``layer_k(m) = temp(2 x k, m) - temp(1 x k, m)`` is what one more layer adds and
  ``base_k(m) = temp(1 x k, m) - layer_k(m)`` the rest (embedding, head, loss, the working set of
  a layer being differentiated). The model of ``n_k`` layers of each kind holds
  ``max_k base_k(m) + sum_k n_k * layer_k(m)``.

The part that does not grow with ``m`` (the value at ``m = 0``: gradients and the optimizer
update's temporaries, all parameter-sized) is reported apart from the part that does
(activations). ``tests/test_activation_model.py`` checks the prediction against the compiled step
of whole models; docs/planning.md says how close it comes and why XLA:CPU saves memory by remat
only across scanned units.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import jax
import jax.numpy as jnp
from absl import logging

from jaxbased.config import ModelConfig
from jaxbased.layer_layout import find_repeating_unit

#: The micro-batch sizes (sequences) the probes are compiled at; the fit is linear through them.
PROBE_MICRO_BATCHES = (1, 2)
#: The scan repeats of the scanned probes (XLA may unroll a loop of very few iterations, so the
#: probes stay above 2).
PROBE_REPEATS = (3, 5)


@dataclasses.dataclass(frozen=True)
class LinearBytes:
    """``fixed + per_sequence * m`` bytes (``m`` sequences per micro-batch)."""

    fixed: float
    per_sequence: float

    @classmethod
    def through(cls, at_one: float, at_two: float) -> LinearBytes:
        """The line through ``(1, at_one)`` and ``(2, at_two)``."""
        return cls(fixed=2 * at_one - at_two, per_sequence=at_two - at_one)

    def __call__(self, micro_batch: int) -> float:
        return self.fixed + self.per_sequence * micro_batch

    def __add__(self, other: LinearBytes) -> LinearBytes:
        return LinearBytes(self.fixed + other.fixed, self.per_sequence + other.per_sequence)

    def __sub__(self, other: LinearBytes) -> LinearBytes:
        return LinearBytes(self.fixed - other.fixed, self.per_sequence - other.per_sequence)

    def scaled(self, factor: float) -> LinearBytes:
        return LinearBytes(self.fixed * factor, self.per_sequence * factor)


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """The predicted temporaries of one train step on one device.

    Attributes:
      gradients: bytes that do not grow with the micro-batch (gradients, the optimizer update's
        temporaries; the gradient accumulator when accumulating), for the whole model.
      activations: bytes that grow with the micro-batch (saved activations, the head's logits,
        the working set of the backward pass).
    """

    gradients: float
    activations: float

    @property
    def temp(self) -> float:
        return self.gradients + self.activations


@dataclasses.dataclass(frozen=True)
class ActivationModel:
    """The fitted temporaries of one config and remat setting (see the module docstring):
    ``max(bases) + sum(count * line for line, count in layers)``, each a :class:`LinearBytes`.
    """

    remat: str
    seq_len: int
    #: ``"scanned"`` (probes differ in the scan's repeats) or ``"unrolled"`` (per mixer kind).
    probes: str
    bases: tuple[LinearBytes, ...]
    #: ``(what one more repeat or layer adds, how many the model has)``.
    layers: tuple[tuple[LinearBytes, int], ...]
    #: Bytes of the gradient accumulator (the float32 parameters).
    accumulator_bytes: float

    def estimate(self, micro_batch: int, *, accumulating: bool = False) -> StepEstimate:
        """Temporaries of one step of ``micro_batch`` sequences on one device; ``accumulating``
        adds the gradient accumulator to ``gradients``."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch} must be >= 1")
        total = max(self.bases, key=lambda line: line(micro_batch))
        for line, count in self.layers:
            total = total + line.scaled(count)
        gradients = max(total.fixed, 0.0)
        return StepEstimate(
            gradients=gradients + (self.accumulator_bytes if accumulating else 0.0),
            activations=total(micro_batch) - gradients,
        )


def parameter_bytes(config: ModelConfig) -> int:
    """Bytes of the float32 parameters of ``config`` (also the size of a gradient)."""
    from jaxbased.model import LanguageModel, count_parameters

    abstract = jax.eval_shape(
        LanguageModel(config).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
    )
    return 4 * count_parameters(abstract["params"])


def probe_step(config: ModelConfig, *, seq_len: int, micro_batch: int) -> int:
    """Temp bytes of the one-device train step of ``micro_batch`` sequences of ``config``
    (AdamW with clipping, no accumulation), compiled with abstract inputs."""
    import flax.linen as nn
    import optax

    from jaxbased.model import LanguageModel
    from jaxbased.training.optimizer import make_optimizer
    from jaxbased.training.state import TrainState
    from jaxbased.training.steps import make_train_step

    model = LanguageModel(config)
    schedule = optax.constant_schedule(1e-3)
    optimizer = make_optimizer(schedule)
    step = make_train_step(model, optimizer, schedule)
    state = jax.eval_shape(
        lambda: TrainState.create(
            nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]),
            optimizer,
        )
    )
    batch = jax.ShapeDtypeStruct((micro_batch, seq_len + 1), jnp.int32)
    return int(step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes)


def _line(config: ModelConfig, pattern: tuple[str, ...], seq_len: int) -> LinearBytes:
    probe = config.replace(layer_pattern=pattern, num_layers=len(pattern))
    at_one, at_two = (
        probe_step(probe, seq_len=seq_len, micro_batch=m) for m in PROBE_MICRO_BATCHES
    )
    return LinearBytes.through(at_one, at_two)


def fit_activation_model(config: ModelConfig, *, seq_len: int) -> ActivationModel:
    """Compile the probes of ``config`` (under its own ``remat`` and ``scan_layers``) and fit
    the :class:`ActivationModel`: 4 compiles for a scanned pattern, 4 per mixer kind for an
    unrolled one."""
    plan = find_repeating_unit(config.layer_pattern) if config.scan_layers else None
    if plan is not None:
        low, high = PROBE_REPEATS
        shallow = _line(config, plan.unit * low + plan.remainder, seq_len)
        deep = _line(config, plan.unit * high + plan.remainder, seq_len)
        per_repeat = (deep - shallow).scaled(1 / (high - low))
        bases, layers, probes = (shallow,), ((per_repeat, plan.repeats - low),), "scanned"
    else:
        unrolled = config.replace(scan_layers=False)
        counts = Counter(config.layer_pattern)
        bases_list, layers_list = [], []
        for kind, count in counts.items():
            one = _line(unrolled, (kind,), seq_len)
            layer = _line(unrolled, (kind, kind), seq_len) - one
            bases_list.append(one - layer)
            layers_list.append((layer, count))
        bases, layers, probes = tuple(bases_list), tuple(layers_list), "unrolled"
    logging.info(
        "activation model of remat=%s fitted from %d compiled %s probes",
        config.remat,
        2 * (len(bases) + len(layers)),
        probes,
    )
    return ActivationModel(
        remat=config.remat,
        seq_len=seq_len,
        probes=probes,
        bases=bases,
        layers=layers,
        accumulator_bytes=float(parameter_bytes(config)),
    )
