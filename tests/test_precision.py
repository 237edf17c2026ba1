"""The GPU support check, the precision policy and determinism, on the CPU with torch.cuda mocked."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fishseg import runtime
from fishseg.cli import main
from fishseg.config import TrainConfig
from fishseg.errors import FishsegError
from fishseg.formats.cache import FeatureCache, PartStore
from fishseg.formats.runs import RUN_FILE, RunFolder
from fishseg.models.decoders import bilinear_by_matmul, upsample
from fishseg.runtime import (UNRECORDED, Precision, autocast, backward_step, ddp_no_buffer_sync, precision_policy,
                             precision_scope, resolve_device)
from fishseg.training.train import run_training
from tests.helpers import interrupt_at_pass, write_toy_cache

BUILD = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]  # a torch build without sm_60 kernels or PTX
CUDA = torch.device("cuda")


def fake_gpu(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int],
             arches: list[str] = BUILD) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arches)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_auto_on_a_gpu_the_build_cannot_run_falls_back_to_the_cpu_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    monkeypatch.setattr(runtime, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_device("auto") == torch.device("cpu")
    [record] = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert "Tesla P100-PCIE-16GB" in message and "6.0" in message and "sm_70..sm_90" in message


@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_asking_for_a_gpu_the_build_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    with pytest.raises(FishsegError, match=r"Tesla P100.*6\.0.*sm_70\.\.sm_90.*`device='cpu'`") as error:
        resolve_device(name)
    assert "\n" not in str(error.value)


def test_the_cli_exits_2_on_a_gpu_the_build_cannot_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_gpu(monkeypatch, "Tesla P100-PCIE-16GB", (6, 0))
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=4)
    result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                       "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: --device cuda: Tesla P100-PCIE-16GB (compute capability 6.0)")
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("capability, arches", [
    ((6, 0), ["sm_70", "compute_60"]),  # PTX at or below the GPU: the driver compiles it
    ((8, 6), ["sm_80"]),  # a cubin for an earlier minor of the same major runs
    ((7, 5), BUILD),
])
def test_gpus_the_build_can_run_are_used(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int],
                                         arches: list[str]) -> None:
    fake_gpu(monkeypatch, "GPU", capability, arches)
    assert resolve_device("auto") == CUDA
    assert resolve_device("cuda") == CUDA


def test_a_newer_major_without_ptx_is_not_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, "NVIDIA B200", (10, 0), ["sm_80", "sm_90"])
    assert "sm_80..sm_90" in runtime.gpu_support_problem()


@pytest.mark.parametrize("name, capability, backbone, decoder", [
    ("Tesla T4", (7, 5), torch.float16, None),  # no bf16 units: fp16 inference, fp32 training
    ("NVIDIA A100-SXM4-40GB", (8, 0), torch.bfloat16, torch.bfloat16),
    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16, torch.bfloat16),
])
def test_auto_precision_follows_the_compute_capability(monkeypatch: pytest.MonkeyPatch, name: str,
                                                       capability: tuple[int, int], backbone: torch.dtype,
                                                       decoder: torch.dtype | None) -> None:
    fake_gpu(monkeypatch, name, capability)
    assert precision_policy(CUDA) == Precision("auto", backbone, decoder)
    assert precision_policy(CUDA, "fp32") == Precision("fp32", None, None)
    assert precision_policy(CUDA, "fp16") == Precision("fp16", torch.float16, torch.float16)


def test_explicit_precisions_and_their_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert precision_policy(cpu) == Precision("auto", None, None)
    assert precision_policy(cpu, "bf16") == Precision("bf16", torch.bfloat16, torch.bfloat16)
    with pytest.raises(FishsegError, match="^`precision='fp16'`: needs a CUDA GPU"):
        precision_policy(cpu, "fp16")
    with pytest.raises(FishsegError, match="precision 'bogus': expected one of auto, fp32, bf16, fp16"):
        precision_policy(cpu, "bogus")
    fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    with pytest.raises(FishsegError, match=r"^`precision='bf16'`: Tesla T4 \(compute capability 7\.5\) has no "
                                           r"bf16 units"):
        precision_policy(CUDA, "bf16")
    fake_gpu(monkeypatch, "NVIDIA A100", (8, 0))
    assert precision_policy(CUDA, "bf16").decoder_name == "bf16"


def test_precision_scope_sets_the_autocast_of_each_part_and_is_undone_after() -> None:
    cpu = torch.device("cpu")
    square = torch.ones(2, 2)
    with autocast(cpu, "decoder"):
        assert (square @ square).dtype == torch.float32
    with precision_scope("bf16"), autocast(cpu, "backbone"):
        assert (square @ square).dtype == torch.bfloat16
    assert runtime.active_precision(cpu).requested == "auto"
    with pytest.raises(FishsegError), precision_scope("fp8"):
        pass


def test_an_fp16_decoder_steps_through_a_grad_scaler_that_unscales(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "active_precision", lambda device: Precision("fp16", torch.float16, torch.float16))
    weights = [torch.nn.Parameter(torch.tensor([1.0, -2.0])) for _ in range(2)]
    optimizers = [torch.optim.SGD([w], lr=0.5) for w in weights]
    backward_step(optimizers[0], (weights[0] ** 2).sum(), torch.device("cpu"))
    assert optimizers[0] in runtime._SCALERS
    monkeypatch.setattr(runtime, "active_precision", lambda device: Precision("fp32", None, None))
    backward_step(optimizers[1], (weights[1] ** 2).sum(), torch.device("cpu"))
    assert optimizers[1] not in runtime._SCALERS
    assert torch.equal(weights[0].detach(), weights[1].detach())  # the scaled step is the plain step


def test_the_cache_records_its_precision_and_older_caches_read_as_unrecorded(tiny_cache: Path,
                                                                             tmp_path: Path) -> None:
    with FeatureCache(tiny_cache) as cache:
        assert cache.precision == "fp32"
    with FeatureCache(write_toy_cache(tmp_path / "old.h5", n_images=4)) as cache:
        assert cache.precision == UNRECORDED


def test_resuming_an_extraction_at_another_precision_is_refused(tmp_path: Path) -> None:
    manifest = {"batch_size": 2, "image_ids": ["a", "b", "c"], "precision": "fp32"}
    PartStore.open(tmp_path / "c.h5", manifest)
    with pytest.raises(FishsegError, match=r"started at precision fp32, this run would use bf16; resume with its "
                                           r"`precision`"):
        PartStore.open(tmp_path / "c.h5", {**manifest, "precision": "bf16"})
    PartStore.open(tmp_path / "c.h5", {**manifest, "precision": "bf16"}, discard_other=True)  # --overwrite


def test_the_run_records_precision_and_refuses_to_resume_at_another(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)
    config = TrainConfig(epochs=2, batch_size=4)
    interrupt_at_pass(monkeypatch, 3)  # Ctrl-C after the first epoch
    with pytest.raises(KeyboardInterrupt):
        run_training(cache, tmp_path / "run", config, device="cpu")
    record = RunFolder(tmp_path / "run").read_record()
    assert (record.precision, record.deterministic) == ("fp32", False)
    with pytest.raises(FishsegError, match="started at precision fp32, this run would use bf16"), \
            precision_scope("bf16"):
        run_training(cache, tmp_path / "run", config, device="cpu", resume=True)
    data = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    del data["precision"], data["deterministic"]
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps(data))
    assert RunFolder(tmp_path / "run").read_record().precision == UNRECORDED


def test_train_deterministic_is_recorded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # restored after the test
    try:
        result = CliRunner().invoke(main, ["train", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                           "--epochs", "1", "--device", "cpu", "--precision", "fp32",
                                           "--deterministic"])
    finally:
        torch.use_deterministic_algorithms(False)
    assert result.exit_code == 0, result.output
    record = RunFolder(tmp_path / "run").read_record()
    assert (record.precision, record.deterministic) == ("fp32", True)


@pytest.mark.parametrize("command", ["extract", "train", "sweep", "predict", "evaluate"])
def test_an_unknown_precision_is_a_one_line_usage_error(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--precision", "bogus"])
    assert result.exit_code == 2
    [line] = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert "'--precision': 'bogus' is not one of 'auto', 'fp32', 'bf16', 'fp16'" in line


@pytest.mark.parametrize("source, target", [((8, 8), (16, 16)), ((7, 5), (13, 22)), ((28, 28), (448, 448)),
                                            ((12, 9), (5, 4))])
def test_bilinear_by_matmul_equals_interpolate_with_its_gradient(source: tuple[int, int],
                                                                 target: tuple[int, int]) -> None:
    torch.manual_seed(0)
    tensor = torch.randn(2, 3, *source, requires_grad=True)
    upstream = torch.randn(2, 3, *target)
    expected = F.interpolate(tensor, size=target, mode="bilinear", align_corners=False)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), tensor)
    actual = bilinear_by_matmul(tensor, target)
    (actual_grad,) = torch.autograd.grad((actual * upstream).sum(), tensor)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(actual_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_upsample_stays_interpolate_on_the_cpu_even_when_deterministic() -> None:
    tensor = torch.randn(1, 1, 5, 5)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(upsample(tensor, (9, 9)), F.interpolate(tensor, size=(9, 9), mode="bilinear",
                                                                     align_corners=False))
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_ddp_buffer_keyword_is_the_one_this_torch_has() -> None:
    def newer(self: object, module: object, broadcast_buffers: bool | None = None,
              forward_sync_buffers: bool | None = None) -> None: ...

    def older(self: object, module: object, broadcast_buffers: bool = True) -> None: ...

    assert ddp_no_buffer_sync(newer) == {"forward_sync_buffers": False}
    assert ddp_no_buffer_sync(older) == {"broadcast_buffers": False}


def test_a_run_is_refused_on_a_cache_extracted_at_another_precision(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=8)
    with h5py.File(cache, "r+") as file:
        file.attrs["precision"] = "fp32"
    run_training(cache, tmp_path / "run", TrainConfig(epochs=1, batch_size=4), device="cpu")
    with h5py.File(cache, "r+") as file:  # the same images and settings, extracted at bf16: the same fingerprint
        file.attrs["precision"] = "bf16"
    with FeatureCache(cache) as opened, pytest.raises(FishsegError, match="extracted at precision .* but .* at bf16"):
        opened.require(RunFolder(tmp_path / "run").read_record().cache, tmp_path / "run" / RUN_FILE)
    with pytest.raises(FishsegError, match="extracted at precision"):
        run_training(cache, tmp_path / "run", TrainConfig(epochs=1, batch_size=4), device="cpu", resume=True)


def test_concurrent_sweep_jobs_train_at_the_asked_precision(tmp_path: Path) -> None:
    cache = write_toy_cache(tmp_path / "toy.h5", n_images=12)
    result = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--out", str(tmp_path / "sweep"), "--device",
                                       "cpu", "--precision", "bf16", "--decoder", "seed-cnn,linear", "--epochs", "1",
                                       "--batch-size", "4", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    records = [RunFolder(path.parent).read_record() for path in (tmp_path / "sweep").glob("*/run.json")]
    assert len(records) == 2 and {record.precision for record in records} == {"bf16"}
