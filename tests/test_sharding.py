"""Meshes, sharding rules, resharded restore and multi-process training.

Mesh tests run tests/sharding_worker.py in a subprocess with 8 simulated CPU devices; the
multi-process test joins two train.py processes with jax.distributed on 127.0.0.1.
"""

import json
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxbased.sharding import fit_to_shape, make_mesh, resolve_mesh_shape
from jaxbased.training.checkpointing import load_for_inference
from jaxbased.training.loop import train
from tests.conftest import model_flags
from tests.sharding_worker import SHARDABLE_MODEL
from tests.test_training import command_line, corpus, tiny_config  # noqa: F401 (fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_worker(mode: str, data: pathlib.Path, out: pathlib.Path) -> dict:
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sharding_worker.py"), mode, str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def mesh_report(corpus, tmp_path_factory):  # noqa: F811
    return run_worker("meshes", corpus, tmp_path_factory.mktemp("meshes"))


@pytest.mark.parametrize("mesh", ["8x1x1", "1x8x1", "2x2x2", "1x1x8"])
def test_every_mesh_trains_like_one_device(mesh_report, mesh):
    np.testing.assert_allclose(
        mesh_report["losses"][mesh], mesh_report["losses"]["1x1x1"], rtol=2e-5
    )
    assert mesh_report["param_difference"][mesh] <= 2e-5


def test_checkpoint_restores_onto_another_mesh(mesh_report):
    reshard = mesh_report["reshard"]
    assert len(reshard["switched"]) == 4
    np.testing.assert_allclose(reshard["switched"], reshard["straight"], rtol=2e-5)
    assert reshard["param_difference"] <= 2e-5


def test_parameters_and_optimizer_state_are_sharded_by_the_rules(corpus, tmp_path):  # noqa: F811
    report = run_worker("shardings", corpus, tmp_path)
    assert report["embedding"]["spec"] == ["tensor", "fsdp"]  # vocab -> tensor, embed -> fsdp
    assert report["embedding"]["shard_shape"] == [264 // 2, 64 // 2]
    assert report["qkv_kernel"]["spec"] == ["fsdp", None, "tensor", None]
    assert report["qkv_kernel"]["shard_shape"] == [32, 3, 4, 8]
    assert report["qkv_kernel_mu"] == report["qkv_kernel"]  # Adam moments follow the params
    assert report["fc2_kernel_nu"]["spec"] == ["tensor", "fsdp"]
    assert report["norm_weight"]["spec"] == [None]
    assert report["conv_weight"]["spec"] == [None, "tensor"]
    # jaxbased-plan's numbers are the bytes device 0 really holds.
    assert report["planned_parameters"] == report["real_parameters"]
    assert report["planned_optimizer_state"] == report["real_optimizer_state"]
    assert report["planned_caches"] == report["real_caches_per_device"]
    # With the mesh's devices at hand the planner compiles the step that train() runs, so its
    # activations are XLA's temporary bytes of that step on device 0, exactly.
    assert report["planned_activations_source"] == "sharded step"
    assert report["planned_activations"] == report["real_activations"]
    # Without them it compiles the per-device batch on one device: an estimate that misses the
    # collectives' buffers (data parallel: 0.89x of the real step here) and the activations that
    # tensor parallelism splits (tensor 8: 3.7x). Bounds with ~5% room on those measurements.
    estimate = report["one_device_estimate_ratio"]
    assert 0.85 <= estimate["8x1x1"] <= 1.0, estimate
    assert 3.0 <= estimate["1x1x8"] <= 4.0, estimate
    assert report["generate_sharded_equals_local"]  # generate() takes sharded parameters


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_like_one(corpus, tmp_path):  # noqa: F811
    overrides = model_flags(SHARDABLE_MODEL)
    overrides += ["--config.data.batch_size=8", "--config.mesh.data=-1"]
    port = free_port()
    workdir = tmp_path / "two"
    processes = []
    for process_id in range(2):
        command = command_line(corpus, workdir, num_steps=3, checkpoint_every=3) + overrides
        command += [
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
    assert "in 2 processes" in outputs[0]

    config = tiny_config(corpus, num_steps=3, checkpoint_every=3)
    config.model.update(SHARDABLE_MODEL)
    config.data.batch_size = 8
    train(config, tmp_path / "one")
    _, two, _ = load_for_inference(workdir)
    _, one, _ = load_for_inference(tmp_path / "one")
    # Not bitwise: each process reduces its half of the batch and the halves are summed across
    # processes, another float32 summation order than the one device's reduction over all 8
    # rows; three Adam steps carry those roundings into the parameters.
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def test_mesh_shapes_are_checked():
    assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1, 1)
    with pytest.raises(ValueError, match="needs 16 devices; 8 are available"):
        resolve_mesh_shape((4, 4, 1), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match=r"unknown axes \['pipeline'\]"):
        resolve_mesh_shape({"pipeline": 2}, 8)
    mesh = make_mesh((1, 1, 1))
    spec = jax.sharding.PartitionSpec("fsdp", "tensor")
    assert fit_to_shape(spec, (7, 3), mesh) == spec  # size-1 axes divide anything


def test_plan_command_prints_every_part():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxbased.cli.plan",
            "--config=configs/based_tiny.py",
            "--mesh=1,1,1",
            "--config.data.seq_len=64",
            "--config.data.batch_size=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for part in ("parameters", "optimizer state", "activations", "generation caches", "total"):
        assert part in result.stdout
    parameters_mib = float(result.stdout.split("parameters")[1].split("MiB")[0])
    assert abs(parameters_mib * 2**20 - 272_576 * 4) < 0.01 * 2**20  # based_tiny, float32
