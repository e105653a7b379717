"""The data pipeline under a ``sequence`` mesh: each process reads only the rows and time slices
its devices hold, as slice windows (jaxbased.data.sequence_slices), and two jax.distributed
processes that split every sequence between them train like one device.

The multi-device checks run tests/sequence_data_worker.py once, in a subprocess with 8 simulated
CPU devices shared out among pretended processes.
"""

import json
import pathlib
import subprocess

import jax
import numpy as np
import pytest

from jaxbased.data.pipeline import PieceWindows, TokenWindows
from jaxbased.data.sequence_slices import BatchPiece, next_token_pairs, slice_windows
from jaxbased.training.checkpointing import load_for_inference
from jaxbased.training.loop import train
from tests.conftest import worker_report
from tests.sequence_data_worker import PIECE_CASES, SEQ_LEN, case_name
from tests.test_sharding import free_port
from tests.test_training import command_line, corpus, tiny_config, train_lines  # noqa: F401

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(corpus) -> dict:  # noqa: F811
    return worker_report("sequence_data_worker", str(corpus), timeout=600)


def reference_slice_windows(windows: np.ndarray, num_slices: int) -> np.ndarray:
    """Slice windows by a loop over rows and slices: slice ``s`` is tokens ``s L .. s L + L``."""
    length = (windows.shape[1] - 1) // num_slices
    rows = [
        [token for s in range(num_slices) for token in row[s * length : s * length + length + 1]]
        for row in windows.tolist()
    ]
    return np.asarray(rows, np.int32)


@pytest.mark.parametrize("num_slices", [1, 2, 3, 4, 12])
def test_slice_windows_hold_each_slices_inputs_and_targets(num_slices):
    windows = np.random.default_rng(num_slices).integers(0, 1000, (3, 13)).astype(np.int32)
    sliced = slice_windows(windows, num_slices)
    np.testing.assert_array_equal(sliced, reference_slice_windows(windows, num_slices))
    inputs, targets = next_token_pairs(sliced, num_slices)
    np.testing.assert_array_equal(inputs, windows[:, :-1])
    np.testing.assert_array_equal(targets, windows[:, 1:])


def test_bad_slicings_are_refused():
    windows = np.zeros((2, 13), np.int32)
    with pytest.raises(ValueError, match="num_slices=5 must be >= 1 and divide the windows' 12"):
        slice_windows(windows, 5)
    with pytest.raises(ValueError, match="width 13 is not 2 slice windows"):
        next_token_pairs(windows, 2)
    with pytest.raises(ValueError, match=r"piece slices 2\.\.3 outside 0\.\.2"):
        BatchPiece(0, 2, 2, 4, 3).check(batch_size=2, seq_len=12)
    with pytest.raises(ValueError, match=r"piece rows 0\.\.2 outside the batch.s 0\.\.1"):
        BatchPiece(0, 3, 0, 1, 3).check(batch_size=2, seq_len=12)
    with pytest.raises(ValueError, match="batch_size=3 must be divisible by the 2 processes"):
        BatchPiece.rows_of_process(3, 0, 2)


class RecordedTokens:
    """A token array that records which ranges are read from it (as a token store would)."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens, self.shape, self.reads = tokens, tokens.shape, []

    def __getitem__(self, index: slice) -> np.ndarray:
        self.reads.append((index.start, index.stop))
        return self.tokens[index]


def test_a_piece_reads_only_its_slices_from_the_store():
    tokens = RecordedTokens(np.arange(100, dtype=np.int32))
    windows = TokenWindows(tokens, 12)
    # Slices 1 and 2 of 4 (L = 3) of window 2 (tokens 24 .. 36): tokens 27 .. 33, read once.
    piece = PieceWindows(windows, BatchPiece(0, 1, 1, 3, 4))
    np.testing.assert_array_equal(piece[2], [27, 28, 29, 30, 30, 31, 32, 33])
    assert tokens.reads == [(27, 34)]


def test_assembled_batches_equal_the_unsliced_ones(report):
    for mesh, processes in PIECE_CASES:
        case = report["pieces"][case_name(mesh, processes)]
        assert case["equal"] == {"batch": True, "inputs": True, "targets": True}, (mesh, case)
        # The inputs leave the reshape split over rows and slices, as the batch was.
        assert case["inputs_spec"] == ["('data', 'fsdp')", "sequence"], case


def test_each_process_holds_only_its_rows_and_slices(report):
    pieces = {name: case["pieces"] for name, case in report["pieces"].items()}
    shapes = {name: case["host_shapes"] for name, case in report["pieces"].items()}
    # [row_start, row_stop, slice_start, slice_stop]; a batch of 4 rows of 24 tokens.
    assert pieces["1x1x1x8/2"] == {"0": [0, 4, 0, 4], "1": [0, 4, 4, 8]}
    assert shapes["1x1x1x8/2"]["1"] == [4, 4 * (SEQ_LEN // 8 + 1)]  # 4 slices of 3 + 1 tokens
    assert pieces["2x1x1x4/4"] == {
        "0": [0, 2, 0, 2], "1": [0, 2, 2, 4], "2": [2, 4, 0, 2], "3": [2, 4, 2, 4],
    }  # fmt: skip
    assert shapes["2x1x1x4/4"]["3"] == [2, 2 * (SEQ_LEN // 4 + 1)]
    # data 1 x fsdp 2 x tensor 2 x sequence 2 on 8 processes: tensor replicas read the same part.
    assert pieces["1x2x2x2/8"]["0"] == pieces["1x2x2x2/8"]["2"] == [0, 2, 0, 1]
    assert pieces["1x2x2x2/8"]["5"] == [2, 4, 1, 2]
    # One process, and a mesh without sequence: whole windows of seq_len + 1 tokens.
    assert shapes["1x1x1x8/1"]["0"] == [4, 8 * (SEQ_LEN // 8 + 1)]
    assert pieces["4x1x2x1/2"] == {"0": [0, 2, 0, 1], "1": [2, 4, 0, 1]}
    assert shapes["4x1x2x1/2"]["0"] == [2, SEQ_LEN + 1]


def test_processes_that_do_not_hold_a_box_are_refused(report):
    assert "not one box of rows x time slices" in report["refused"]["interleaved"]
    assert "process 1 holds no device" in report["refused"]["none"]


def test_no_token_crosses_a_slice_boundary_in_the_train_step(report):
    counts = report["hlo"]
    # Only the mixers' permutes (tests/test_sequence_parallel.py); the targets' one-token shift
    # of a whole-window batch is gone.
    assert counts["other_permutes"] == [], counts
    assert counts["all_gather"] == counts["all_to_all"] == counts["reduce_scatter"] == 0


def test_two_processes_splitting_the_sequence_train_like_one_device(corpus, tmp_path):  # noqa: F811
    port = free_port()
    workdir = tmp_path / "two"
    processes = []
    for process_id in range(2):  # one CPU device each: slice 0 on process 0, slice 1 on 1
        command = command_line(corpus, workdir, num_steps=3, checkpoint_every=3)
        command += [
            "--config.mesh.data=1",
            "--config.mesh.sequence=2",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={process_id}",
        ]
        processes.append(
            subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = [process.communicate(timeout=600)[0].decode() for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    assert "'sequence': 2} over 2 devices in 2 processes" in outputs[0]
    for process_id, output in enumerate(outputs):
        slices = f"time slices {process_id}..{process_id} of 2"
        assert f"process {process_id} reads rows 0..3 and {slices}" in output

    config = tiny_config(corpus, num_steps=3, checkpoint_every=3)
    one = train(config, tmp_path / "one")
    two_lines, one_lines = train_lines(workdir), train_lines(tmp_path / "one")
    assert sorted(two_lines) == sorted(one_lines) == [1, 2, 3]
    for step in one_lines:
        np.testing.assert_allclose(two_lines[step]["loss"], one_lines[step]["loss"], rtol=1e-5)
    final = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(final[-1]["loss"], one.final_eval["loss"], rtol=1e-5)
    _, two_params, _ = load_for_inference(workdir)
    _, one_params, _ = load_for_inference(tmp_path / "one")
    # Not bitwise: the two halves of each sequence are reduced apart and summed across the
    # processes (and the BASED state crosses as a prefix sum), another float32 summation order
    # than one device's. Measured: losses within 1.7e-7 relative, parameters within 1.2e-7
    # after three Adam steps; the bounds leave a margin of about 10x.
    for a, b in zip(jax.tree.leaves(two_params), jax.tree.leaves(one_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_batch_size_must_split_over_the_batch_axes_and_micro_batches(corpus, tmp_path):  # noqa: F811
    config = tiny_config(corpus, num_steps=1, grad_accum_steps=3)
    with pytest.raises(ValueError, match=r"data.batch_size=4 must be divisible by mesh.data \*"):
        train(config, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # refused before anything is written
