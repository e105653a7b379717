"""Import and export of the released PyTorch checkpoints (docs/checkpoints.md).

    from jaxbased.interop import load_checkpoint
    imported = load_checkpoint("based-360m/")     # config.json + model.safetensors / .bin
    model = jaxbased.LanguageModel(imported.config)
    logits = model.apply({"params": imported.params}, tokens)

- :func:`load_checkpoint` / :func:`save_checkpoint`: a checkpoint folder <-> config and params,
  in either family: BASED / attention (``GPT2Config``, ``transformer.*``) or Mamba / Mamba-2
  (mamba_ssm's ``MambaConfig``, ``backbone.*``); :func:`checkpoint_family` reads it from
  ``config.json``, :func:`export_family` picks the layout a model is written in.
- :func:`config_from_reference` / :func:`config_to_reference`: ``config.json`` <-> ModelConfig
  (layer lists, window halving, rotary fraction, vocabulary padding).
- :func:`import_state_dict` / :func:`export_state_dict`: state dict <-> parameter tree (exact
  inverses); :class:`CheckpointMismatchError` names every missing, unexpected and mis-shaped key.
- :func:`mamba_config_from_reference` / :func:`mamba_config_to_reference`,
  :func:`import_mamba_state_dict` / :func:`export_mamba_state_dict`: the same for mamba_ssm's
  layout (``mamba-360m``, ``mamba-1b``, ``mamba2-370m``, ...;
  :mod:`jaxbased.interop.mamba_checkpoint`).
- :func:`transnormer_config_from_reference`, :func:`import_transnormer_state_dict`: the
  released TransNormerLLM layout (``TransnormerForCausalLM``;
  :mod:`jaxbased.interop.transnormer_checkpoint`), import only.
- :func:`write_workdir`: a ``train.py`` workdir (Orbax) for fine-tuning and generation.

``jaxbased-convert`` (:mod:`jaxbased.cli.convert`) runs these from the command line.
"""

from jaxbased.interop.files import (
    ImportedCheckpoint,
    checkpoint_family,
    export_family,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from jaxbased.interop.mamba_checkpoint import (
    export_mamba_state_dict,
    import_mamba_state_dict,
    mamba_config_from_reference,
    mamba_config_to_reference,
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
from jaxbased.interop.transnormer_checkpoint import (
    import_transnormer_state_dict,
    transnormer_config_from_reference,
)
from jaxbased.interop.workdir import write_workdir

__all__ = [
    "CheckpointMismatchError",
    "ImportedCheckpoint",
    "UnsupportedCheckpointError",
    "checkpoint_family",
    "clean_state_dict",
    "config_from_reference",
    "config_to_reference",
    "export_family",
    "export_mamba_state_dict",
    "export_state_dict",
    "import_mamba_state_dict",
    "import_state_dict",
    "import_transnormer_state_dict",
    "load_checkpoint",
    "mamba_config_from_reference",
    "mamba_config_to_reference",
    "read_state_dict",
    "reference_shapes",
    "save_checkpoint",
    "transnormer_config_from_reference",
    "write_workdir",
]
