"""Placement rules with fixed numbers: no GPU, no NVML, no llama.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.backend.ggufmeta import read_gguf
from corral.backend.memory import MemoryEstimate, estimate
from corral.backend.placement import (AUTO, HEADROOM, GPURoom, eviction_target, fewer_layers, gpu_oom_line,
                                      most_layers, plan)
from ggufs import write_tiny_llama

MiB, GiB = 2**20, 2**30

# 32 blocks of 100 MiB weights + 10 MiB KV each, a 300 MiB output head, 400 MiB compute:
# everything on the GPU is 32 * 110 + 300 + 400 = 4220 MiB.
MODEL = MemoryEstimate(weights=32 * 100 * MiB + 2 * 300 * MiB, kv_cache=32 * 10 * MiB, compute=400 * MiB,
                       n_layer=32, layer_weights=100 * MiB, head_weights=300 * MiB, head_tied=False)
ALL = 4220 * MiB


def gpu(index: int = 0, free: int = 24 * GiB, total: int = 24 * GiB, **kw: int) -> GPURoom:
    return GPURoom(index=index, free=free, total=total, budget=kw.pop("budget", total), **kw)


def test_vram_and_ram_split_over_layers() -> None:
    assert MODEL.gpu_layers_total == 33
    assert MODEL.vram(0) == 0
    assert MODEL.vram(1) == 110 * MiB + 400 * MiB
    assert MODEL.vram(32) == 32 * 110 * MiB + 400 * MiB  # every block, not yet the head
    assert MODEL.vram(33) == MODEL.vram(99) == ALL
    assert MODEL.ram(0) == MODEL.total
    assert MODEL.ram(33) == 300 * MiB + 400 * MiB  # token embeddings and the host compute buffers
    tied = MemoryEstimate(**{**MODEL.__dict__, "head_tied": True})
    assert tied.ram(33) == MODEL.ram(33) + 300 * MiB  # a tied head is copied, the embeddings stay


def test_estimate_splits_a_real_header(tmp_path: Path) -> None:
    info = read_gguf(write_tiny_llama(tmp_path / "m.gguf", n_layer=4))
    e = estimate(info, n_ctx=256, n_parallel=2)
    assert (e.n_layer, e.head_tied) == (4, False)  # tiny llamas write a separate output.weight
    assert 4 * e.layer_weights + 2 * e.head_weights == info.tensor_bytes
    assert e.ram(0) == e.total and e.vram(0) == 0
    assert [e.vram(k) for k in range(6)] == sorted(e.vram(k) for k in range(6))


def test_all_layers_when_they_fit() -> None:
    p = plan(MODEL, [gpu(free=10 * GiB)], AUTO)
    assert (p.gpu, p.n_gpu_layers, p.vram, p.full) == (0, 33, ALL, True)
    assert p.reason == "all 33 layers on GPU 0 (4.1 GiB of 9.8 GiB room)"
    assert p.ram == MODEL.ram(33)


def test_partial_offload_when_they_do_not() -> None:
    free = HEADROOM + 2 * GiB
    p = plan(MODEL, [gpu(free=free)], AUTO)
    assert p.n_gpu_layers == (2 * 1024 - 400) // 110 == 14
    assert p.vram <= 2 * GiB < MODEL.vram(15)
    assert p.gpu == 0 and not p.full
    assert p.reason == "14 of 33 layers on GPU 0: only 2.0 GiB room, 4.1 GiB needed for all"


def test_cpu_when_not_one_layer_fits_or_no_gpu_or_configured() -> None:
    tight = plan(MODEL, [gpu(free=HEADROOM + 500 * MiB)], AUTO)
    assert (tight.gpu, tight.n_gpu_layers, tight.vram, tight.ram) == (None, 0, 0, MODEL.total)
    assert tight.reason.startswith("CPU: not one layer fits (510.0 MiB needed")
    none = plan(MODEL, [], AUTO, no_gpu="no GPU (NVML library not found)")
    assert none.reason == "CPU: no GPU (NVML library not found)" and none.n_gpu_layers == 0
    off = plan(MODEL, [gpu()], 0)
    assert off.reason == "CPU: n_gpu_layers = 0" and off.n_gpu_layers == 0 and not off.auto


def test_the_budget_and_corrals_own_models_limit_the_room() -> None:
    budgeted = gpu(free=20 * GiB, budget=3 * GiB, reserved=1 * GiB)
    assert budgeted.room == 2 * GiB
    assert plan(MODEL, [budgeted], AUTO).n_gpu_layers == 14
    assert gpu(free=HEADROOM // 2).room == 0


def test_the_gpu_that_takes_most_layers_wins() -> None:
    gpus = [gpu(0, free=HEADROOM + 2 * GiB), gpu(1, free=HEADROOM + 3 * GiB), gpu(2, free=HEADROOM + GiB)]
    assert plan(MODEL, gpus, AUTO).gpu == 1
    both_fit = [gpu(0, free=8 * GiB), gpu(1, free=12 * GiB)]
    assert plan(MODEL, both_fit, AUTO).gpu == 1  # equal layers: the most room


def test_forced_layers_are_kept_and_may_not_fit() -> None:
    p = plan(MODEL, [gpu(free=10 * GiB)], 20)
    assert (p.n_gpu_layers, p.gpu, p.fits, p.auto, p.vram) == (20, 0, True, False, MODEL.vram(20))
    assert p.reason.startswith("20 of 33 layers on GPU 0 (forced;")
    every = plan(MODEL, [gpu(free=10 * GiB)], -1)
    assert every.n_gpu_layers == 33 and every.full
    tight = plan(MODEL, [gpu(free=HEADROOM + GiB)], 20)
    assert not tight.fits and tight.reason.endswith(": does not fit")
    blind = plan(MODEL, [], 20, no_gpu="no GPU (NVML library not found)")  # Metal, ROCm: llama.cpp decides
    assert (blind.gpu, blind.n_gpu_layers, blind.vram) == (None, 20, 0)
    assert "NVML library not found" in blind.reason


def test_eviction_helps_only_where_it_would_make_the_model_fit() -> None:
    partial_gpu = gpu(free=HEADROOM + 2 * GiB, reserved=3 * GiB, evictable=3 * GiB)
    p = plan(MODEL, [partial_gpu], AUTO)
    assert not p.full and eviction_target(MODEL, p, [partial_gpu]) == 0
    pinned = gpu(free=HEADROOM + 2 * GiB, reserved=3 * GiB, evictable=0)
    assert eviction_target(MODEL, plan(MODEL, [pinned], AUTO), [pinned]) is None  # partial it is
    too_big = gpu(free=HEADROOM + 2 * GiB, reserved=GiB, evictable=GiB)
    assert eviction_target(MODEL, plan(MODEL, [too_big], AUTO), [too_big]) is None
    fits = gpu(free=10 * GiB, evictable=GiB)
    assert eviction_target(MODEL, plan(MODEL, [fits], AUTO), [fits]) is None
    forced = gpu(free=HEADROOM + GiB, reserved=2 * GiB, evictable=2 * GiB)
    assert eviction_target(MODEL, plan(MODEL, [forced], 20), [forced]) == 0


def test_fewer_layers_after_an_out_of_memory() -> None:
    first = plan(MODEL, [gpu(free=10 * GiB)], AUTO)
    retry = fewer_layers(MODEL, first, [gpu(free=10 * GiB)], "cudaMalloc failed: out of memory")
    assert retry.n_gpu_layers == 16 and retry.gpu == 0
    assert retry.reason == ("16 of 33 layers on GPU 0: retried, out of GPU memory with 33 of 33 layers "
                            "(cudaMalloc failed: out of memory)")
    shrunk = fewer_layers(MODEL, first, [gpu(free=HEADROOM + GiB)], "oom")
    assert shrunk.n_gpu_layers == most_layers(MODEL, GiB) == 5
    gone = fewer_layers(MODEL, first, [], "oom")
    assert gone.n_gpu_layers == 0 and gone.reason.startswith("CPU: out of GPU memory with 33 of 33 layers")


@pytest.mark.parametrize("line, oom", [
    ("ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: cudaMalloc failed: "
     "out of memory", True),
    ("alloc_tensor_range: failed to allocate CUDA0 buffer of size 4294967296", True),
    ("llama_model_load: error loading model: unable to allocate CUDA0 buffer", True),
    ("ggml_vulkan: Device memory allocation of size 1 failed. vk::Device::allocateMemory: "
     "ErrorOutOfDeviceMemory", True),
    ("llama_model_load: error loading model: tensor 'blk.0.attn_q.weight' data is not within the file "
     "bounds", False),
    ("failed to allocate CPU buffer", False),
])
def test_gpu_out_of_memory_is_recognised_in_llama_cpp_lines(line: str, oom: bool) -> None:
    message = f"/m.gguf: llama.cpp could not load this file: llama_model_load: a warning; {line}"
    assert gpu_oom_line(message) == (line if oom else None)
    context = f"/m.gguf: could not create a context (n_ctx 4096): {line}"
    assert gpu_oom_line(context) == (line if oom else None)


def test_the_console_shows_where_each_model_sits() -> None:
    from corral.console.widgets.models_table import format_placement
    from fake_backend import model_info

    assert format_placement(model_info("m")) is None  # not loaded: nothing placed
    assert format_placement(model_info("m", gpu=0, gpu_layers=14, gpu_layers_total=33)) == "GPU0 14/33"
    assert format_placement(model_info("m", gpu=1, gpu_layers=33, gpu_layers_total=33)) == "GPU1 33/33"
    assert format_placement(model_info("m", gpu=None, gpu_layers=0, gpu_layers_total=33)) == "CPU"
    assert format_placement(model_info("m", gpu=None, gpu_layers=20, gpu_layers_total=33)) == "GPU 20/33"
