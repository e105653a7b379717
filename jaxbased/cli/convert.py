"""``jaxbased-convert``: a released PyTorch checkpoint -> a ``train.py`` workdir, and back.

    # import: config.json + model.safetensors / pytorch_model.bin -> Orbax workdir
    jaxbased-convert --checkpoint=based-360m/ --workdir=workdirs/based-360m
    jaxbased-convert --checkpoint=hf:hazyresearch/based-360m --workdir=workdirs/based-360m
    jaxbased-convert --checkpoint=hf:hazyresearch/mamba-360m --workdir=workdirs/mamba-360m
    jaxbased-convert --checkpoint=based-360m/ --workdir=w --tokenizer_file=gpt2.tiktoken

    # export: a workdir's latest checkpoint -> config.json + model.safetensors (released layout)
    jaxbased-convert --workdir=workdirs/based-360m --export_to=exported/ --format=safetensors

Both checkpoint families are read, told apart by ``config.json``
(:func:`jaxbased.interop.checkpoint_family`): BASED and attention models (HazyResearch/based's
``GPT2Config``) and Mamba / Mamba-2 models (mamba_ssm's ``MambaConfig``). Export writes the
layout the model can have (:func:`jaxbased.interop.export_family`): mamba_ssm's for
all-Mamba models without MLPs, HazyResearch/based's for the others it can hold.

The workdir then works with ``jaxbased-generate --workdir=...``, the lm-eval model
(``python -m jaxbased.evaluation --model jaxbased --model_args workdir=...``) and
``train.py --workdir=...`` for fine-tuning (its model config must
equal the imported one; the command to use is printed). The GPT-2 tokenizer comes from
``--tokenizer_file``, a tokenizer file in the checkpoint folder, or the hub when online.
``hf:NAME`` downloads the checkpoint with ``huggingface_hub`` (online only).
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags, logging

from jaxbased.cli import command, errors

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "released checkpoint folder (config.json + weights) or hf:OWNER/NAME"
)
_WORKDIR = flags.DEFINE_string("workdir", None, "train.py workdir to write (or to export from)")
_EXPORT_TO = flags.DEFINE_string(
    "export_to", None, "export --workdir's checkpoint to this folder in the released layout"
)
_FORMAT = flags.DEFINE_enum("format", "safetensors", ["safetensors", "bin"], "export format")
_STEP = flags.DEFINE_integer("step", None, "export: checkpoint step (default: the latest)")
_TOKENIZER_FILE = flags.DEFINE_string(
    "tokenizer_file",
    None,
    "import: a gpt2.tiktoken or tokenizer.json (default: a tokenizer file in the checkpoint "
    "folder, else the GPT-2 tokenizer from the hub when online)",
)
_WEIGHTS_FILE = flags.DEFINE_string("weights_file", None, "weights file to use instead")
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "activation dtype stored in the model config"
)
_IMPLEMENTATION = flags.DEFINE_enum(
    "implementation", "auto", ["auto", "xla", "pallas"], "attention kernels (model config)"
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace existing checkpoints or files")
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, "let torch.load unpickle non-tensor objects (trusted files only)"
)

HF_PREFIX = "hf:"
TOKENIZER_SPEC_FILE = "jaxbased_tokenizer.json"
HF_PATTERNS = [
    "config.json",
    "model.safetensors",
    "pytorch_model.bin",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
]


def download(name: str) -> pathlib.Path:
    """The files of hub repository ``name`` (config, weights, tokenizer) in the local cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise errors.UsageError(
            "hf: checkpoints need huggingface_hub (pip install huggingface_hub); or download "
            "config.json and the weights yourself and pass the folder"
        ) from error
    return pathlib.Path(snapshot_download(name, allow_patterns=HF_PATTERNS))


def closest_preset(config) -> tuple[str, list[str]] | None:
    """The preset (train.py's ``configs/<name>.py``) with ``config``'s layer pattern that needs
    the fewest ``--config.model.FIELD=VALUE`` overrides (``--config.model.based.chunk_size=16``
    for a section's field) to equal ``config``, and those flags."""
    from jaxbased.presets import PRESETS

    def flat(values: dict, prefix: str = "") -> dict:
        items: dict = {}
        for key, value in values.items():
            if isinstance(value, dict):
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    best = None
    wanted = flat(config.to_dict())
    for name, make in PRESETS.items():
        preset = make()
        if preset.layer_pattern != config.layer_pattern:
            continue
        have = flat(preset.to_dict())
        flags_needed = [
            f"--config.model.{key}={value}" for key, value in wanted.items() if have[key] != value
        ]
        if best is None or len(flags_needed) < len(best[1]):
            best = (name, flags_needed)
    return best


def import_checkpoint() -> None:
    from jaxbased.interop import load_checkpoint, write_workdir
    from jaxbased.interop.tokenizer import checkpoint_tokenizer

    source = _CHECKPOINT.value
    folder = download(source[len(HF_PREFIX) :]) if source.startswith(HF_PREFIX) else source
    folder = pathlib.Path(folder)
    imported = load_checkpoint(
        folder,
        weights_file=_WEIGHTS_FILE.value,
        allow_pickle=_ALLOW_PICKLE.value,
        dtype=_DTYPE.value,
        implementation=_IMPLEMENTATION.value,
    )
    config = imported.config
    logging.info(
        "read %s (%s layout): %d layers %s, d_model %d; dropped %d metric keys, ignored %s",
        imported.weights_file,
        imported.family,
        config.num_layers,
        sorted(set(config.layer_pattern)),
        config.d_model,
        len(imported.dropped_keys),
        list(imported.ignored_keys),
    )
    spec_file = folder / TOKENIZER_SPEC_FILE
    if _TOKENIZER_FILE.value is None and spec_file.is_file():  # a jaxbased export
        from jaxbased.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(json.loads(spec_file.read_text()), folder)
    else:
        tokenizer = checkpoint_tokenizer(folder, _TOKENIZER_FILE.value)
    if tokenizer.vocab_size != config.vocab_size:
        logging.warning(
            "the tokenizer has %d ids, the model %d", tokenizer.vocab_size, config.vocab_size
        )
    checkpoints = write_workdir(
        _WORKDIR.value,
        config,
        imported.params,
        tokenizer,
        source={
            "checkpoint": source,
            "weights_file": str(imported.weights_file),
            "family": imported.family,
        },
        overwrite=_OVERWRITE.value,
    )
    workdir = pathlib.Path(_WORKDIR.value)
    print(f"wrote {checkpoints} (step 0) and {workdir / 'tokenizer'}")
    print(f"generate: jaxbased-generate --workdir={workdir} --prompt='The capital of France is'")
    print(
        "evaluate: python -m jaxbased.evaluation --model jaxbased "
        f"--model_args workdir={workdir} --tasks lambada_openai"
    )
    preset = closest_preset(config)
    if preset is not None:
        name, overrides = preset
        print(
            f"fine-tune: python train.py --config=configs/{name}.py {' '.join(overrides)} "
            f"--config.data.path=<data tokenized with this tokenizer> --workdir={workdir}"
        )
    else:
        print(
            "fine-tune: train.py resumes this workdir when its --config.model equals the imported "
            f"model config: {config.to_dict()}"
        )


def make_readable(folder: pathlib.Path) -> None:
    """Give the files of ``folder`` the mode a new file gets under the umask (0644 under the
    usual 022): the safetensors writer leaves 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def export_checkpoint() -> None:
    from jaxbased.interop import export_family, save_checkpoint
    from jaxbased.training.checkpointing import load_for_inference

    target = pathlib.Path(_EXPORT_TO.value)
    if target.exists() and any(target.iterdir()) and not _OVERWRITE.value:
        raise errors.UsageError(f"--export_to={target} is not empty (pass --overwrite)")
    config, params, tokenizer = load_for_inference(_WORKDIR.value, _STEP.value)
    family = export_family(config)  # raises, naming the layers, before anything is written
    weights = save_checkpoint(target, config, params, format=_FORMAT.value)
    tokenizer.save(target)
    # which tokenizer this is, so that importing the export back needs no hub (a byte-level
    # model has no tokenizer file at all)
    (target / TOKENIZER_SPEC_FILE).write_text(json.dumps(tokenizer.spec()) + "\n")
    make_readable(target)
    print(f"wrote {target / 'config.json'} and {weights} ({family} layout)")


def check_flags() -> None:
    """Usage errors for flags that cannot work, before anything is read or written."""
    if _WORKDIR.value is None:
        raise errors.UsageError("--workdir is required (see --help)")
    if _EXPORT_TO.value is not None and _CHECKPOINT.value is not None:
        raise errors.UsageError("give --checkpoint (import) or --export_to (export), not both")
    if _EXPORT_TO.value is None and _CHECKPOINT.value is None:
        raise errors.UsageError("give --checkpoint to import or --export_to to export")
    workdir = pathlib.Path(_WORKDIR.value)
    if _EXPORT_TO.value is not None:
        if not (workdir / "checkpoints").is_dir():
            raise errors.UsageError(
                f"--workdir={workdir} holds no checkpoints/ folder: nothing to export"
            )
        return
    source = _CHECKPOINT.value
    if not source.startswith(HF_PREFIX) and not pathlib.Path(source).is_dir():
        raise errors.UsageError(
            f"--checkpoint={source} is not a folder (give a released checkpoint folder holding "
            "config.json and the weights, or hf:OWNER/NAME)"
        )
    for name, value in (("tokenizer_file", _TOKENIZER_FILE.value),
                        ("weights_file", _WEIGHTS_FILE.value)):  # fmt: skip
        if value is not None and not pathlib.Path(value).is_file():
            raise errors.UsageError(f"--{name}={value}: no such file")
    checkpoints = workdir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()) and not _OVERWRITE.value:
        raise errors.UsageError(
            f"--workdir={workdir} already holds checkpoints (pass --overwrite to replace them)"
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise errors.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    check_flags()
    if _EXPORT_TO.value is not None:
        export_checkpoint()
    else:
        import_checkpoint()


COMMAND = command.Command(
    name="jaxbased-convert",
    summary="import a released PyTorch checkpoint (BASED, attention, Mamba) into a train.py "
    "workdir, or export a workdir back to the released layout",
    usage="jaxbased-convert --workdir=DIR (--checkpoint=FOLDER|hf:NAME | --export_to=FOLDER) "
    "[flags]",
    examples=(
        "jaxbased-convert --checkpoint=based-360m/ --tokenizer_file=gpt2.tiktoken "
        "--workdir=workdirs/based-360m",
        "jaxbased-convert --checkpoint=hf:hazyresearch/based-360m --workdir=workdirs/based-360m",
        "jaxbased-convert --workdir=workdirs/based-360m --export_to=exported/ --format=safetensors",
    ),
    notes="Import writes step 0 of a workdir that jaxbased-generate, jaxbased-perplexity, "
    "python -m jaxbased.evaluation and train.py (fine-tuning) read; it prints the commands. "
    "Export writes config.json, the weights and the tokenizer of the workdir's newest intact "
    "checkpoint (or --step).",
    groups=(
        (
            "import",
            (
                "checkpoint",
                "tokenizer_file",
                "weights_file",
                "dtype",
                "implementation",
                "allow_pickle",
            ),
        ),
        ("export", ("export_to", "format", "step")),
        ("both", ("workdir", "overwrite")),
    ),
    required=("workdir",),
)


def run() -> None:
    """Console-script entry point."""
    command.run(main, COMMAND)


if __name__ == "__main__":
    run()
