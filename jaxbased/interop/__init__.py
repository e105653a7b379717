"""Import and export of the released PyTorch checkpoints (SPEC.md §4).

    from jaxbased.interop import load_checkpoint
    imported = load_checkpoint("based-360m/")     # config.json + model.safetensors / .bin
    model = jaxbased.LanguageModel(imported.config)
    logits = model.apply({"params": imported.params}, tokens)

- :func:`load_checkpoint` / :func:`save_checkpoint`: a checkpoint folder <-> config and params.
- :func:`config_from_reference` / :func:`config_to_reference`: ``config.json`` <-> ModelConfig
  (layer lists, window halving, rotary fraction, vocabulary padding).
- :func:`import_state_dict` / :func:`export_state_dict`: state dict <-> parameter tree (exact
  inverses); :class:`CheckpointMismatchError` names every missing, unexpected and mis-shaped key.
- :func:`write_workdir`: a ``train.py`` workdir (Orbax) for fine-tuning and generation.

``jaxbased-convert`` (:mod:`jaxbased.cli.convert`) runs these from the command line. Mamba and
Mamba-2 checkpoints in mamba_ssm's layout (``mamba-360m``, ``mamba2-370m``, ...) map with
:mod:`jaxbased.interop.mamba_checkpoint` (:func:`mamba_config_from_reference`,
:func:`import_mamba_state_dict`, :func:`export_mamba_state_dict`); ``load_checkpoint`` and
``jaxbased-convert`` do not call it yet.
"""

from jaxbased.interop.files import (
    ImportedCheckpoint,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from jaxbased.interop.mamba_checkpoint import (
    export_mamba_state_dict,
    import_mamba_state_dict,
    mamba_config_from_reference,
)
from jaxbased.interop.reference_config import (
    UnsupportedCheckpointError,
    config_from_reference,
    config_to_reference,
)
from jaxbased.interop.state_dict import (
    CheckpointMismatchError,
    clean_state_dict,
    export_state_dict,
    import_state_dict,
    reference_shapes,
)
from jaxbased.interop.workdir import write_workdir

__all__ = [
    "CheckpointMismatchError",
    "ImportedCheckpoint",
    "UnsupportedCheckpointError",
    "clean_state_dict",
    "config_from_reference",
    "config_to_reference",
    "export_mamba_state_dict",
    "export_state_dict",
    "import_mamba_state_dict",
    "import_state_dict",
    "load_checkpoint",
    "mamba_config_from_reference",
    "read_state_dict",
    "reference_shapes",
    "save_checkpoint",
    "write_workdir",
]
