"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    names: dict = {}  # every block runs alone; their results are checked together
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        names.update(namespace)
    assert names["y"].shape == (1, 128, 4, 64)
    assert names["some"].shape == (1, 2, names["logits"].shape[-1])
    assert names["next_token"].shape == (1,)
    assert len(names["result"].tokens) == 2  # "Generate": two prompts


# --- The README's shell commands ----------------------------------------------------------------
#
# Every command of every ```bash block is extracted and checked in a fresh temporary folder (the
# repository's train.py, configs/ and benchmarks/ linked in), with `.venv/bin/python` and
# `.venv/bin/jaxbased-*` run as this interpreter and the console scripts' modules:
# - fast ones run for real: the demo training (shrunk to one step on a smaller corpus: the
#   README's flags plus overrides), generation from its workdir, data preparation;
# - slow, online or cluster ones run with --help, and every --flag they use must be one that
#   help lists (so a renamed or removed flag fails here);
# - make targets must exist (make -n); other tools (pip, jupyter, gcloud, srun, bash) must name
#   files or extras that exist.

import configparser  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = README.parent
TINY_DEMO = [
    "--config.train.num_steps=1",
    "--config.data.builtin_max_bytes=60000",
    "--config.data.batch_size=2",
    "--config.data.seq_len=64",
    "--config.train.eval_batches=1",
    "--config.train.peak_flops=1e12",
    "--config.sample.max_new_tokens=4",
    "--config.train.tensorboard=false",
]
RUN_FOR_REAL = (
    "train.py --config=configs/demo.py --workdir=workdirs/demo",
    "jaxbased-generate --workdir=workdirs/demo",
    "jaxbased-prepare-data --output=data/mytext",
    "jaxbased-prepare-data --output=data/bpe",
)


def readme_shell_commands() -> list[str]:
    """Each command of the README's ```bash blocks: continuation lines joined, comments and
    blank lines dropped, ``gcloud``'s quoted inner command kept whole."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            if shlex.split(line, comments=True):
                commands.append(line.split("  #")[0].strip())
    return commands


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    scripts = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (part.strip() for part in line.split("="))
        scripts[name] = target.split(":")[0]
    return scripts


def as_runnable(words: list[str]) -> list[str]:
    """``.venv/bin/python`` -> this interpreter, ``.venv/bin/jaxbased-x`` -> its module."""
    program = words[0]
    if program == ".venv/bin/python":
        return [sys.executable, *words[1:]]
    name = program.removeprefix(".venv/bin/")
    scripts = console_scripts()
    assert name in scripts, f"{program}: not a console script of setup.cfg"
    return [sys.executable, "-m", scripts[name], *words[1:]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    for name in ("train.py", "configs", "benchmarks", "colab"):
        (root / name).symlink_to(REPO / name)
    for name in ("notes/a.txt", "books/x/b.txt", "extra.md", "corpus/c.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("def main():\n    return 'hello world'\n" * 40)
    return root


def run(words: list[str], folder, stdin: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        words, cwd=folder, capture_output=True, text=True, env=env, input=stdin, timeout=600
    )


HELP_OUTPUTS: dict[tuple[str, ...], subprocess.CompletedProcess] = {}


def check_with_help(words: list[str], folder) -> None:
    runnable = as_runnable(words)
    program = tuple(runnable[:3] if runnable[1] == "-m" else runnable[:2])
    if program not in HELP_OUTPUTS:  # one --help per program
        HELP_OUTPUTS[program] = run([*program, "--help"], folder)
    done = HELP_OUTPUTS[program]
    assert done.returncode == 0, (words, done.stderr)
    if program[-1].startswith("benchmarks/"):
        return  # a benchmark script's own absl help
    assert "usage" in done.stdout and "--helpfull" in done.stdout, done.stdout
    assert "--logtostderr" not in done.stdout  # absl's own flags only under --helpfull
    for word in words[1:]:
        flag = re.match(r"--(?:no)?([a-z_]+)(?:=|$)", word)
        if flag and not word.startswith("--config."):
            assert f"--{flag.group(1)}" in done.stdout or f"]{flag.group(1)}" in done.stdout, (
                f"{shlex.join(words)}: {word} is not among the flags of its --help"
            )


def test_every_readme_shell_command_works(folder):
    commands = readme_shell_commands()
    assert len(commands) >= 25
    checked = []
    # The demo first (the generation commands read its workdir).
    ordered = sorted(commands, key=lambda c: "train.py --config=configs/demo.py" not in c)
    for command in ordered:
        pipe_input = None
        if command.startswith("echo "):
            pipe_input = shlex.split(command.split("|")[0])[1] + "\n"
            command = command.split("|", 1)[1].strip()
        words = shlex.split(command)
        while re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VARIABLE=value before the program
            words = words[1:]
        if words[0] == "make":
            done = subprocess.run(["make", "-n", "-C", str(REPO), *words[1:]], capture_output=True)
            assert done.returncode == 0, (command, done.stderr)
        elif words[0] in ("pip", ".venv/bin/pip"):
            extras = re.findall(r"\[([a-z,]+)\]", command)
            parser = configparser.ConfigParser()
            parser.read(REPO / "setup.cfg")
            for extra in ",".join(extras).split(",") if extras else []:
                assert extra in parser["options.extras_require"], (command, extra)
        elif words[0] in ("gcloud", "srun", "bash") or "jupyter" in words[0]:
            # cluster tools, a notebook server (tests/test_notebooks.py runs the notebooks), a
            # GPU script: the files they name exist and any train.py flag they use is real
            inner = shlex.split(command.split("--command=", 1)[1]) if "gcloud" in command else words
            for word in inner:
                if not word.startswith("-") and (
                    word.endswith((".sh", ".ipynb", ".py")) or word.startswith("colab/")
                ):
                    assert (REPO / word.rstrip("/")).exists(), (command, word)
            if "train.py" in inner:
                start = inner.index(".venv/bin/python")
                check_with_help(inner[start:], folder)
        elif words[0] == ".venv/bin/mkdocs":
            assert (REPO / "mkdocs.yml").is_file()
        elif any(real in command for real in RUN_FOR_REAL):
            extra = TINY_DEMO if "train.py" in command else []
            done = run([*as_runnable(words), *extra], folder, stdin=pipe_input)
            assert done.returncode == 0, (command, done.stderr[-3000:])
            assert "Traceback" not in done.stderr and "Unable to initialize backend" not in (
                done.stderr
            )
        else:
            check_with_help(words, folder)
        checked.append(command)
    assert len(checked) == len(commands)
    assert (folder / "workdirs" / "demo" / "checkpoints").is_dir()
    assert (folder / "data" / "mytext" / "metadata.json").is_file()
