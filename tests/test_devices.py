"""--device and --dtype: one reader for chat, serve and bench. GPUs are simulated on the CPU."""

import pytest
import torch

from qwen2vl.devices import DeviceError, resolve_device, resolve_dtype


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has n CUDA devices of compute capability `capability`."""

    def have(n: int, capability: tuple[int, int] = (9, 0)) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return have


def test_auto_is_the_first_gpu_when_there_is_one(gpus):
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    gpus(2)
    assert resolve_device("auto") == torch.device("cuda:0")


def test_named_devices_get_an_index(gpus):
    gpus(2)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "CUDA", "cuda:-1", "cuda:01", "", "mps"])
def test_a_misspelt_device_names_the_choices(text, gpus):
    gpus(1)
    with pytest.raises(DeviceError, match="expected cpu, cuda, cuda:N or auto"):
        resolve_device(text)


def test_cuda_without_a_gpu_says_so(gpus):
    gpus(0)
    with pytest.raises(DeviceError, match="^--device cuda: no CUDA device is available$"):
        resolve_device("cuda")


def test_a_gpu_index_past_the_last_names_the_ones_there(gpus):
    gpus(1)
    with pytest.raises(DeviceError, match=r"--device cuda:3: this machine has cuda:0$"):
        resolve_device("cuda:3")
    gpus(2)
    with pytest.raises(DeviceError, match="cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_named_dtypes_are_kept_on_any_device():
    for name in ("bfloat16", "float16", "float32"):
        assert resolve_dtype(name, torch.device("cpu")) == getattr(torch, name)


def test_auto_dtype_is_the_commands_own_on_the_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu"), cpu=torch.float32) == torch.float32


def test_auto_dtype_is_bfloat16_on_ampere_and_later_float16_before(gpus):
    gpus(1, capability=(8, 0))
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    gpus(1, capability=(7, 5))  # a T4: bfloat16 only emulated
    assert resolve_dtype("auto", torch.device("cuda:0")) == torch.float16


def test_an_unknown_dtype_is_refused():
    with pytest.raises(DeviceError, match="--dtype half: expected auto, bfloat16"):
        resolve_dtype("half", torch.device("cpu"))
