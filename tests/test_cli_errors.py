"""Every command answers a user's mistake with one clear line and the right exit status, and
leaves no file behind (jaxbased/cli/errors.py, jaxbased/cli/command.py).

Each case runs the command in a fresh folder (holding a small valid workdir, a workdir whose
only checkpoint is damaged and an existing output folder) and checks: the exit status (2 for a
usage error, 1 for a run that cannot complete), at most 3 lines on stderr that name the
offending value, and every file of the folder as it was.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys

import numpy as np
import optax
import pytest

from jaxbased import ModelConfig
from jaxbased.data.tokenizers import ByteTokenizer
from jaxbased.training.checkpointing import Checkpointer
from jaxbased.training.optimizer import make_optimizer
from jaxbased.training.state import TrainState
from tests.conftest import init_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [str(REPO / "train.py"), f"--config={REPO / 'configs/demo.py'}"]
TINY_CONFIG = REPO / "configs" / "based_tiny.py"
MQAR = ["-m", "jaxbased.cli.mqar", f"--config={REPO / 'configs/mqar_cpu.py'}"]
GENERATE = ["-m", "jaxbased.cli.generate"]
CONVERT = ["-m", "jaxbased.cli.convert"]
PERPLEXITY = ["-m", "jaxbased.cli.perplexity"]
PLAN = ["-m", "jaxbased.cli.plan"]
PREPARE = ["-m", "jaxbased.cli.prepare_data"]
EVALUATE = ["-m", "jaxbased.evaluation", "--model", "jaxbased"]

# (command, arguments, exit status, text stderr must hold). "run" is the folder's valid
# workdir, "broken" one whose only checkpoint is damaged, "taken" an existing folder.
CASES = [
    (TRAIN, ["--config.train.bogus=1"], 2, "--config.train.bogus"),
    (TRAIN, ["--config.model.d_modl=3"], 2, "did you mean --config.model.d_model?"),
    (TRAIN, ["--config.model.d_model=-3"], 2, "d_model=-3"),
    (TRAIN, ["--config.train.num_steps=abc"], 2, "num_steps=abc"),
    (TRAIN, ["--config.data.path=nowhere"], 2, "'nowhere' does not exist"),
    (TRAIN, ["--config.model.vocab_size=100"], 2, "vocab_size=100"),
    (TRAIN, ["--config.data.seq_len=0"], 2, "seq_len=0"),
    (
        TRAIN,
        ["--config.distill.teacher_workdir=nowhere", "--config.distill.share_fraction=0.5"],
        2,
        "distill.teacher_workdir='nowhere' does not exist",
    ),
    ([str(REPO / "train.py")], ["--config=nope.py"], 2, "--config=nope.py"),
    (TRAIN, ["--wrkdir=x"], 2, "did you mean --workdir?"),
    (TRAIN, ["stray"], 2, "stray"),
    (GENERATE, ["--prompt=a"], 2, "--workdir is required"),
    (GENERATE, ["--workdir=missing", "--prompt=a"], 2, "--workdir=missing"),
    (GENERATE, ["--workdir=run", "--top_p=2"], 2, "--top_p=2.0"),
    (GENERATE, ["--workdir=run", "--temperature=-1"], 2, "--temperature=-1.0"),
    (GENERATE, ["--workdir=run", "--prompt_file=none.txt"], 2, "none.txt"),
    (GENERATE, ["--workdir=broken", "--prompt=a"], 1, "step 7: its folder is empty"),
    (CONVERT, ["--export_to=out"], 2, "--workdir is required"),
    (CONVERT, ["--checkpoint=nofolder", "--workdir=new"], 2, "--checkpoint=nofolder"),
    (CONVERT, ["--workdir=run", "--export_to=out", "--format=onnx"], 2, "onnx"),
    (CONVERT, ["--workdir=run", "--export_to=taken"], 2, "--export_to=taken"),
    (PERPLEXITY, ["--workdir=missing", "--data=taken"], 2, "--workdir=missing"),
    (PERPLEXITY, ["--workdir=run", "--data=taken"], 2, "--data=taken"),
    (PLAN, [f"--config={TINY_CONFIG}", "--mesh=1,x,1"], 2, "--mesh=1,x,1"),
    (PLAN, [f"--config={TINY_CONFIG}", "--config.model.bogus=1"], 2, "--config.model.bogus"),
    (PLAN, ["--mesh=1,1,1"], 2, "--config is required"),
    (PREPARE, ["--output=data"], 2, "give text files"),
    (PREPARE, ["--output=data", "absent.txt"], 2, "absent.txt"),
    (PREPARE, ["--output=taken", "--builtin"], 2, "--overwrite"),
    (PREPARE, ["--output=data", "--tokenizer=bpee", "x"], 2, "bpee"),
    (MQAR, ["--groups=basd"], 2, "did you mean based?"),
    (MQAR, ["--config.train.max_epoch=2"], 2, "did you mean --config.train.max_epochs?"),
    (EVALUATE, ["--model_args", "wrkdir=run", "--tasks", "x"], 2, "did you mean workdir?"),
    (EVALUATE, ["--model_args", "workdir=missing", "--tasks", "x"], 2, "workdir=missing"),
]


def save_tiny_workdir(path: pathlib.Path, config: ModelConfig, step: int = 1) -> None:
    """A workdir as train.py leaves it: one checkpoint of ``config`` with byte tokens."""
    _, params = init_model(config)
    checkpointer = Checkpointer(path, async_save=False)
    metadata = {"model": config.to_dict(), "tokenizer": ByteTokenizer().spec()}
    state = TrainState.create(params, make_optimizer(optax.constant_schedule(1e-3)))
    checkpointer.save(step, state.replace(step=np.int32(step)), {}, metadata)
    checkpointer.close()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("cli")
    save_tiny_workdir(root / "run", ModelConfig.from_preset("based_tiny", vocab_size=257))
    (root / "broken" / "checkpoints" / "7").mkdir(parents=True)
    (root / "taken").mkdir()
    (root / "taken" / "keep.txt").write_text("kept")
    return root


def snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


def run_command(command: list[str], cwd: pathlib.Path, **environment: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), **environment}
    env.pop("JAXBASED_DEBUG", None) if "JAXBASED_DEBUG" not in environment else None
    return subprocess.run(
        [sys.executable, *command], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def test_the_table_covers_every_command():
    assert len(CASES) >= 25
    used = {tuple(command[:3]) for command, *_ in CASES}
    assert len({command[1] if command[0] == "-m" else "train.py" for command in used}) >= 8


@pytest.mark.parametrize(
    "command, arguments, status, named",
    CASES,
    ids=[f"{pathlib.Path(c[0][1 if c[0][0] == '-m' else 0]).name} {' '.join(c[1])}" for c in CASES],
)
def test_a_mistake_is_one_line_and_changes_nothing(folder, command, arguments, status, named):
    before = snapshot(folder)
    done = run_command([*command, *arguments], folder)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status, done.stderr
    assert 1 <= len(lines) <= 3, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    assert named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert snapshot(folder) == before


def test_verbose_and_the_environment_show_the_traceback(folder):
    for flags, environment in ((["--verbose"], {}), ([], {"JAXBASED_DEBUG": "1"})):
        done = run_command(
            [*GENERATE, "--workdir=missing", "--prompt=a", *flags], folder, **environment
        )
        assert done.returncode == 2
        assert "Traceback" in done.stderr and "--workdir=missing" in done.stderr


def test_lm_eval_batch_size_in_model_args_wins(folder):
    """lm-eval passes its own --batch_size too; the README's model_args gave it twice."""
    pytest.importorskip("lm_eval")
    from jaxbased.evaluation.lm_eval_model import JaxBasedLM

    lm = JaxBasedLM.create_from_arg_string(
        f"workdir={folder / 'run'},batch_size=3,max_length=64",
        {"batch_size": 1, "max_batch_size": None, "device": None},
    )
    assert lm.batch_size == 3 and lm.max_length == 64
    lm = JaxBasedLM.create_from_arg_string(f"workdir={folder / 'run'}", {"batch_size": 5})
    assert lm.batch_size == 5
    with pytest.raises(ValueError, match="unknown model argument batchsize; did you mean"):
        JaxBasedLM.create_from_arg_string(f"workdir={folder / 'run'},batchsize=3")


def test_a_byte_level_export_is_readable_and_imports_offline(tmp_path):
    config = ModelConfig.from_preset(
        "based_tiny", vocab_size=257, mlp={"multiple_of": 256}, based={"chunk_size": 16}
    )
    save_tiny_workdir(tmp_path / "run", config)
    exported = tmp_path / "exported"
    done = run_command([*CONVERT, "--workdir=run", f"--export_to={exported}"], tmp_path)
    assert done.returncode == 0, done.stderr
    weights = exported / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~_umask()
    assert json.loads((exported / "jaxbased_tokenizer.json").read_text()) == {"kind": "byte"}
    done = run_command(
        [*CONVERT, f"--checkpoint={exported}", "--workdir=back"], tmp_path, HF_HUB_OFFLINE="1"
    )
    assert done.returncode == 0, done.stderr
    from jaxbased.training.checkpointing import load_for_inference

    back_config, _, tokenizer = load_for_inference(tmp_path / "back")
    assert isinstance(tokenizer, ByteTokenizer) and back_config.vocab_size == 257


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
