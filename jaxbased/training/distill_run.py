"""EchoAtt distillation in ``train.py`` (docs/echoatt.md#distillation-in-trainpy).

With ``config.distill.teacher_workdir`` set, the run trains a **student**: ``config.model`` (the
teacher's model) with ``attention_sharing`` from ``distill.shared_layers`` or
``distill.share_fraction``. A fresh student starts from
:func:`jaxbased.echoatt.student_params` of the teacher's newest intact checkpoint. Steps
``1 .. distill.steps`` minimise the distillation loss (:mod:`jaxbased.training.distillation`)
against the frozen teacher, run in the same jitted step (both models via
``LanguageModel.with_block_outputs``); the later steps up to ``train.num_steps`` are ordinary
language-model steps. The phase follows from the step number alone, so a resumed run continues
in the right one (the teacher is read again from its workdir).

A distillation step's metrics: ``loss`` (the distillation loss), ``accuracy`` (the student's
next-token accuracy on the data), ``distill/hidden_mse``, ``distill/kl``,
``distill/teacher_ce`` (the three terms, means over tokens) and ``distill/lm_loss`` (the
student's cross-entropy on the data, the language-model step's ``loss``).
"""

from __future__ import annotations

import dataclasses
import filecmp
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jaxtyping import Array, Float, Int

from jaxbased.config import ModelConfig
from jaxbased.data.token_store import TokenDataset
from jaxbased.data.tokenizers import Tokenizer
from jaxbased.echoatt import (
    attention_similarity,
    mean_similarity,
    most_similar_layers,
    student_params,
    unrolled,
)
from jaxbased.model import LanguageModel
from jaxbased.sharding import logical_shardings
from jaxbased.training.checkpointing import (
    TOKENIZER_SUBDIR,
    load_for_inference,
    model_differences,
)
from jaxbased.training.distillation import (
    DistillationWeights,
    block_boundaries,
    distillation_token_losses,
)
from jaxbased.training.state import TrainState
from jaxbased.training.steps import LossFunction, apply_with_metrics, make_train_step

#: Rows per forward pass when measuring the teacher's attention similarity.
SIMILARITY_BATCH_ROWS = 4


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """The checked ``distill`` section.

    Attributes:
      teacher_workdir: the teacher's ``train.py`` workdir (absolute).
      steps: the last distillation step (steps ``1 .. steps`` distill; 0: none).
      shared_layers: ``{sharing layer: anchor or None}`` from ``distill.shared_layers`` (None
        when the layers come from ``share_fraction``).
      share_fraction: the share of full-attention layers to share (0 with ``shared_layers``).
      similarity_sequences: validation rows the similarity is measured on.
      weights: the loss's weights.
    """

    teacher_workdir: pathlib.Path
    steps: int
    shared_layers: dict[int, int | None] | None
    share_fraction: float
    similarity_sequences: int
    weights: DistillationWeights


def parse_shared_layers(text: str) -> dict[int, int | None]:
    """``"2,3"`` -> ``{2: None, 3: None}``; ``"2:1,4:1"`` -> ``{2: 1, 4: 1}`` (sharing layer,
    optionally ``:anchor``). ``ValueError`` naming ``distill.shared_layers`` otherwise; which
    layers may share is checked by ``ModelConfig`` (:func:`student_config`)."""
    field = f"distill.shared_layers={text!r}"
    sharing: dict[int, int | None] = {}
    for entry in text.split(","):
        sharer, colon, anchor = (part.strip() for part in entry.partition(":"))
        if not sharer.isdigit() or (colon and not anchor.isdigit()):
            raise ValueError(
                f"{field}: {entry.strip()!r} is not a layer index or a sharer:anchor pair of "
                "layer indices (e.g. '2,3' or '2:1,3:1')"
            )
        if int(sharer) in sharing:
            raise ValueError(f"{field}: layer {sharer} is listed twice")
        sharing[int(sharer)] = int(anchor) if colon else None
    return sharing


def distill_settings(config: ml_collections.ConfigDict) -> DistillSettings | None:
    """The ``distill`` section checked (None when it is absent or ``teacher_workdir`` is
    empty). Raises ``ValueError`` naming the field for a bad value; nothing is read but the
    teacher workdir's existence."""
    section = config.get("distill")
    if section is None or not section.teacher_workdir:
        return None
    model = config.model
    if model.get("scan_layers", False):
        raise ValueError(
            "model.scan_layers=True: a distillation student shares attention and is unrolled; "
            "set --config.model.scan_layers=False (a scanned teacher is read as it is)"
        )
    if model.get("attention_sharing"):
        raise ValueError(
            f"model.attention_sharing={model.attention_sharing!r} must be empty with "
            "distill.teacher_workdir set: config.model is the teacher's model, and the student "
            "shares the layers of distill.shared_layers or distill.share_fraction"
        )
    steps = section.steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < -1:
        raise ValueError(
            f"distill.steps={steps!r} must be an integer >= 0, or -1 (every step distills)"
        )
    steps = config.train.num_steps if steps == -1 else steps
    fraction = section.share_fraction
    if bool(section.shared_layers) == bool(fraction):
        raise ValueError(
            f"set exactly one of distill.shared_layers (now {section.shared_layers!r}) and "
            f"distill.share_fraction (now {fraction!r}): the layers the student shares"
        )
    if fraction and not 0 < fraction < 1:
        raise ValueError(f"distill.share_fraction={fraction!r} must be in (0, 1)")
    sequences = section.similarity_sequences
    if isinstance(sequences, bool) or not isinstance(sequences, int) or sequences < 1:
        raise ValueError(f"distill.similarity_sequences={sequences!r} must be an integer >= 1")
    try:
        weights = DistillationWeights(
            hidden_weight=section.hidden_weight,
            kl_weight=section.kl_weight,
            hard_weight=section.hard_weight,
        )
    except ValueError as error:
        raise ValueError(f"distill.{error}") from None
    teacher_workdir = pathlib.Path(section.teacher_workdir).absolute()
    if not teacher_workdir.is_dir():
        raise ValueError(
            f"distill.teacher_workdir={section.teacher_workdir!r} does not exist (a train.py "
            "workdir of the teacher)"
        )
    return DistillSettings(
        teacher_workdir=teacher_workdir,
        steps=steps,
        shared_layers=parse_shared_layers(section.shared_layers) if section.shared_layers else None,
        share_fraction=float(fraction),
        similarity_sequences=sequences,
        weights=weights,
    )


@dataclasses.dataclass
class Teacher:
    """The teacher read from its workdir: its unrolled config, its float32 host parameters in
    that layout, and its tokenizer."""

    workdir: pathlib.Path
    config: ModelConfig
    params: Any
    tokenizer: Tokenizer


def load_teacher(settings: DistillSettings, model_config: ModelConfig) -> Teacher:
    """The teacher of ``settings`` (its newest intact checkpoint), checked against
    ``model_config`` (``config.model``: the same model, layout fields aside) and required to
    have at least two full-attention layers. ``ValueError`` naming
    ``distill.teacher_workdir`` otherwise."""
    field = f"distill.teacher_workdir={str(settings.teacher_workdir)!r}"
    try:
        config, params, tokenizer = load_for_inference(settings.teacher_workdir)
    except ValueError as error:
        raise ValueError(f"{field}: {error}") from None
    differences = model_differences(config.to_dict(), model_config)
    if differences:
        raise ValueError(
            f"{field}: the teacher's model differs from config.model ("
            + "; ".join(differences).replace("checkpoint", "teacher")
            + "); train the student with the teacher's model config"
        )
    if len(config.attention_map_layers) < 2:
        raise ValueError(
            f"{field}: the teacher has {len(config.attention_map_layers)} full-attention "
            "layers; attention sharing needs at least 2"
        )
    config, params = unrolled(config, params)
    return Teacher(settings.teacher_workdir, config, params, tokenizer)


def check_teacher_tokenizer(teacher: Teacher, dataset: TokenDataset) -> None:
    """``ValueError`` unless the teacher was trained with the data's tokenizer (the same spec
    and, for a file-based tokenizer, the same file)."""
    data_tokenizer = dataset.tokenizer()
    same = teacher.tokenizer.spec() == data_tokenizer.spec()
    file = data_tokenizer.spec().get("file")
    if same and file:
        same = filecmp.cmp(
            teacher.workdir / TOKENIZER_SUBDIR / file, dataset.path / file, shallow=False
        )
    if not same:
        raise ValueError(
            f"distill.teacher_workdir={str(teacher.workdir)!r}: the teacher's tokenizer "
            f"{teacher.tokenizer.spec()} is not the data's {data_tokenizer.spec()} "
            f"({dataset.path}); distill on data tokenized as the teacher's"
        )


def share_count(settings: DistillSettings, teacher: Teacher) -> int:
    """How many layers ``share_fraction`` shares: ``round(fraction * L)`` (ties to even) of
    the teacher's ``L`` full-attention layers; ``ValueError`` when that is 0."""
    layers = len(teacher.config.attention_map_layers)
    count = round(settings.share_fraction * layers)
    if count < 1:
        raise ValueError(
            f"distill.share_fraction={settings.share_fraction} of the teacher's {layers} "
            "full-attention layers rounds to 0 layers; raise it"
        )
    return count


def similarity_rows(
    validation: Sequence[Int[np.ndarray, "B L"]], count: int
) -> list[Int[np.ndarray, "b T"]]:
    """The inputs (``[:, :-1]``) of the first ``count`` validation rows, in batches of at most
    :data:`SIMILARITY_BATCH_ROWS` rows."""
    if not validation:
        raise ValueError(
            "the data has no validation batch to measure the teacher's attention similarity on "
            "(distill.share_fraction); set data.validation_fraction > 0 or use "
            "distill.shared_layers"
        )
    rows = np.concatenate([batch[:, :-1] for batch in validation])[:count]
    return [
        rows[start : start + SIMILARITY_BATCH_ROWS]
        for start in range(0, len(rows), SIMILARITY_BATCH_ROWS)
    ]


def student_config(
    settings: DistillSettings,
    model_config: ModelConfig,
    teacher: Teacher,
    validation: Sequence[np.ndarray] = (),
) -> ModelConfig:
    """``model_config`` with the student's ``attention_sharing``: ``settings.shared_layers``,
    or the :func:`share_count` layers whose attention maps are most alike (mean cosine
    similarity, :func:`jaxbased.echoatt.most_similar_layers`; never the first layer) on the
    first ``similarity_sequences`` rows of ``validation``. ``ValueError`` naming
    ``distill.shared_layers`` for a sharing ``ModelConfig`` refuses."""
    if settings.shared_layers is not None:
        text = ",".join(
            str(sharer) if anchor is None else f"{sharer}:{anchor}"
            for sharer, anchor in settings.shared_layers.items()
        )
        try:
            return model_config.replace(attention_sharing=settings.shared_layers)
        except ValueError as error:
            raise ValueError(f"distill.shared_layers={text!r}: {error}") from None
    count = share_count(settings, teacher)
    similarity = attention_similarity(
        LanguageModel(teacher.config),
        teacher.params,
        similarity_rows(validation, settings.similarity_sequences),
    )
    sharing = most_similar_layers(teacher.config, similarity, count)
    logging.info(
        "distill.share_fraction=%s: layers %s are the %d most alike of %s (mean similarity %s)",
        settings.share_fraction,
        [sharer for sharer, _ in sharing],
        count,
        list(teacher.config.attention_map_layers),
        np.round(mean_similarity(similarity), 3).tolist(),
    )
    return model_config.replace(attention_sharing=sharing)


def distillation_losses(
    teacher_model: LanguageModel, boundaries: Sequence[int], weights: DistillationWeights
) -> LossFunction:
    """The :data:`~jaxbased.training.steps.LossFunction` of a distillation step, called as
    ``losses(student_model, params, batch, teacher_params)`` on ``[B, seq_len + 1]`` windows:
    the per-token distillation loss of the student against the teacher on the inputs
    ``[:, :-1]`` (hidden states compared after the layers ``boundaries``), the student's
    correctness on the targets ``[:, 1:]``, and the reported means (module docstring)."""
    boundaries = tuple(boundaries)

    def losses(
        model: LanguageModel, params: Any, batch: Int[Array, "B L"], teacher_params: Any
    ) -> tuple[Float[Array, "B T"], Float[Array, "B T"], dict[str, Array]]:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        (student_logits, student_blocks), reported = apply_with_metrics(
            model, params, inputs, method="with_block_outputs"
        )
        teacher_logits, teacher_blocks = teacher_model.apply(
            {"params": jax.lax.stop_gradient(teacher_params)}, inputs, method="with_block_outputs"
        )
        token_loss, parts = distillation_token_losses(
            student_logits,
            teacher_logits,
            [student_blocks[layer] for layer in boundaries],
            [teacher_blocks[layer] for layer in boundaries],
            weights,
        )
        student_logits = student_logits.astype(jnp.float32)
        language_loss = optax.softmax_cross_entropy_with_integer_labels(student_logits, targets)
        correct = (jnp.argmax(student_logits, axis=-1) == targets).astype(jnp.float32)
        reported = {
            **reported,
            **{f"distill/{name}": values.mean() for name, values in parts.items()},
            "distill/lm_loss": language_loss.mean(),
        }
        return token_loss, correct, reported

    return losses


@dataclasses.dataclass
class Distillation:
    """The distillation of a run (:class:`jaxbased.training.setup.RunSetup` holds it).

    Attributes:
      steps: the last distillation step; steps ``1 .. steps`` call ``train_step``.
      teacher_workdir: where the teacher was read from.
      attention_sharing: the student's ``(sharer, anchor)`` pairs.
      train_step: ``step(state, batch, teacher_params) -> (state, metrics)``, jit-compiled
        (None when no distillation step is left to run).
      teacher_params: the teacher's parameters on the mesh (None with no ``train_step``).
    """

    steps: int
    teacher_workdir: pathlib.Path
    attention_sharing: tuple[tuple[int, int], ...]
    train_step: Callable[..., tuple[TrainState, dict[str, Array]]] | None
    teacher_params: Any


def initial_student_params(teacher: Teacher, config: ModelConfig, shardings: Any) -> Any:
    """The student's first parameters (:func:`jaxbased.echoatt.student_params` of the
    teacher's), float32, placed with ``shardings`` (the student's parameter shardings)."""
    params = student_params(teacher.params, config)
    params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)
    return jax.device_put(params, shardings)


def make_distillation(
    settings: DistillSettings,
    teacher: Teacher,
    model: LanguageModel,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    grad_accum_steps: int,
    state_shardings: Any,
    batch_sharding: Any,
    mesh: jax.sharding.Mesh,
    start_step: int,
    num_steps: int,
) -> Distillation:
    """The run's :class:`Distillation` from step ``start_step`` on: the teacher's parameters
    placed on ``mesh`` (sharded by their logical names, as the student's) and the compiled
    distillation step, or neither when ``start_step >= settings.steps``. ``num_steps``
    (``train.num_steps``) only bounds the steps the log announces."""
    sharing = model.config.attention_sharing
    if start_step >= settings.steps:
        return Distillation(settings.steps, teacher.workdir, sharing, None, None)
    teacher_model = LanguageModel(teacher.config)

    def teacher_boxed_params() -> Any:
        return teacher_model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]

    teacher_shardings = logical_shardings(jax.eval_shape(teacher_boxed_params), mesh)
    teacher_params = jax.device_put(
        jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), teacher.params), teacher_shardings
    )
    train_step = make_train_step(
        model,
        optimizer,
        schedule,
        grad_accum_steps,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        losses=distillation_losses(teacher_model, block_boundaries(model.config), settings.weights),
        extra_shardings=(teacher_shardings,),
    )
    logging.info(
        "distillation: steps %d..%d from the teacher in %s (student sharing %s, hidden states "
        "compared after layers %s), then language-model training",
        start_step + 1,
        min(settings.steps, num_steps),
        teacher.workdir,
        list(sharing),
        list(block_boundaries(model.config)),
    )
    return Distillation(settings.steps, teacher.workdir, sharing, train_step, teacher_params)
