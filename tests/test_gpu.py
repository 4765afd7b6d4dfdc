"""GPU paths (NCCL, mixed precision). Skipped without CUDA; run them on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, check_ok, launch, read_summary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")


def test_bf16_on_one_gpu(tmp_path):
    out = tmp_path / "run"
    check_ok(launch([QUICKSTART, "backend.precision=bf16", "schedule.epochs=4", "logging.wandb.mode=disabled",
                     f"output.dir={out}"], nproc=1, cwd=tmp_path))
    s = read_summary(out)
    assert (s["device"], s["precision"]) == ("cuda", "bf16")
    assert s["eval"]["online"]["top1"] >= 90.0 and s["memory"]["peak_mb"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_processes_fp16(tmp_path):
    out = tmp_path / "run"
    check_ok(launch([QUICKSTART, "backend.precision=fp16", "logging.wandb.mode=disabled", f"output.dir={out}"],
                    nproc=2, cwd=tmp_path))
    s = read_summary(out)
    assert (s["device"], s["world_size"], s["precision"]) == ("cuda", 2, "fp16")
    assert s["eval"]["online"]["top1"] >= 95.0 and s["eval"]["online"]["images"] == 360


def test_fp16_overflows_on_one_gpu_are_skipped_counted_and_survived(tmp_path):
    """The scaler is the framework's on GPU too (Accelerate builds with mixed_precision='no'): an initial
    scale that overflows is halved step by step; those steps are not updates; the run reaches the bar."""
    out = tmp_path / "run"
    check_ok(launch([QUICKSTART, "backend.precision=fp16", "backend.loss_scale.init=16777216.0", "schedule.epochs=4",
                     "averaging.start=0.0", "logging.wandb.mode=disabled", f"output.dir={out}"], nproc=1, cwd=tmp_path))
    s = read_summary(out)
    assert (s["device"], s["precision"]) == ("cuda", "fp16")
    assert s["amp"]["overflow_steps"] >= 3 and s["amp"]["loss_scale"] == 2.0**24 / 2 ** s["amp"]["overflow_steps"]
    assert s["averaging"]["updates"] == 4 * 44 - s["amp"]["overflow_steps"]  # 1437 // 32 = 44 steps per epoch
    assert s["eval"]["online"]["top1"] >= 90.0


def _gpus() -> int:
    return min(torch.cuda.device_count(), 2)


def test_zero3_bf16_averaging_is_shard_local_and_matches_ddp_bf16(tmp_path):
    """ZeRO-3 in bf16 (the engine's bf16 weights, fp32 master partitions) against DDP's bf16 autocast: each
    process keeps 1/N of the fp32 averaged copy, sends nothing per update, and reaches DDP's accuracy."""
    runs = {}
    for name, extra in (("ddp", []), ("zero3", ["backend.type=deepspeed", "backend.zero_stage=3"])):
        out = tmp_path / name
        check_ok(launch([QUICKSTART, "backend.precision=bf16", "schedule.epochs=4", "logging.wandb.mode=disabled",
                         *extra, f"output.dir={out}"], nproc=_gpus(), cwd=tmp_path))
        runs[name] = read_summary(out)
    ddp, zero = runs["ddp"], runs["zero3"]
    assert (zero["zero_stage"], zero["precision"], zero["device"]) == (3, "bf16", "cuda")
    world = zero["world_size"]
    assert zero["throughput"]["averaging_state_bytes_per_process"] == pytest.approx(
        ddp["throughput"]["averaging_state_bytes_per_process"] / world, rel=0.01)
    assert zero["throughput"]["averaging_comm_bytes_per_update"] == 0
    assert abs(zero["eval"]["averaged"]["recompute"]["top1"] - ddp["eval"]["averaged"]["recompute"]["top1"]) <= 2.0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_fsdp_and_zero2_averaging_is_shard_local_and_matches_ddp(tmp_path, precision):
    """FSDP2 (16-bit gathers, fp32 reductions and master shards, BN units in fp32) and ZeRO-2 against DDP's
    autocast in the same precision: 1/N of the fp32 averaged copy per process, nothing sent per update."""
    runs = {}
    engines = {"ddp": [], "fsdp": ["backend.type=fsdp"], "zero2": ["backend.type=deepspeed", "backend.zero_stage=2"]}
    for name, extra in engines.items():
        out = tmp_path / name
        check_ok(launch([QUICKSTART, f"backend.precision={precision}", "schedule.epochs=4", "logging.wandb.mode=disabled",
                         *extra, f"output.dir={out}"], nproc=_gpus(), cwd=tmp_path))
        runs[name] = read_summary(out)
    ddp = runs["ddp"]
    for name in ("fsdp", "zero2"):
        s = runs[name]
        assert (s["precision"], s["device"]) == (precision, "cuda")
        assert s["throughput"]["averaging_state_bytes_per_process"] == pytest.approx(
            ddp["throughput"]["averaging_state_bytes_per_process"] / s["world_size"], rel=0.01)
        assert s["throughput"]["averaging_comm_bytes_per_update"] == 0
        assert abs(s["eval"]["averaged"]["recompute"]["top1"] - ddp["eval"]["averaged"]["recompute"]["top1"]) <= 2.0, name


def test_offloaded_averaged_copy_matches_the_device_copy(tmp_path):
    """averaging.offload: the fp32 averaged copy in pinned CPU memory, fed by async copies, averages the same
    weights as the on-device copy (the same run otherwise; cuDNN's own nondeterminism is the tolerance)."""
    from safetensors.torch import load_file

    outs = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        check_ok(launch([QUICKSTART, "backend.precision=bf16", "schedule.epochs=4", "logging.wandb.mode=disabled",
                         f"averaging.offload={str(offload).lower()}", f"output.dir={out}"], nproc=1, cwd=tmp_path))
        outs[offload] = out
    a, b = (load_file(outs[o] / "model_averaged.safetensors") for o in (False, True))
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], atol=2e-2, rtol=2e-2, msg=k)
    assert read_summary(outs[True])["eval"]["averaged"]["recompute"]["top1"] >= 90.0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_timm_syncbn_over_nccl_equals_bn_over_the_concatenated_batch(tmp_path):
    """Two processes, each with half a batch: timm's model converted to SyncBatchNorm gives the outputs and
    running statistics of plain BN over the whole batch in one process."""
    script = tmp_path / "syncbn.py"
    script.write_text(SYNCBN_SCRIPT)
    check_ok(launch_script(script, tmp_path))


SYNCBN_SCRIPT = """
import os, torch, torch.distributed as dist, timm
dist.init_process_group("nccl")
rank = dist.get_rank(); torch.cuda.set_device(rank)
torch.manual_seed(0)
ref = timm.create_model("test_resnet", num_classes=10).cuda().train()
model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(timm.create_model("test_resnet", num_classes=10)).cuda().train()
model.load_state_dict(ref.state_dict())
x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
full = ref(x)
half = model(x[8 * rank: 8 * rank + 8])
torch.testing.assert_close(half, full[8 * rank: 8 * rank + 8], atol=1e-4, rtol=1e-4)
for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
    if "running" in k:
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=k)
dist.destroy_process_group()
"""


def launch_script(script, cwd):
    import subprocess
    import sys

    from conftest import clean_env

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=600)


def test_the_prefetcher_path_trains_on_real_jpegs_like_the_cpu_path(tmp_path):
    """data.prefetcher (uint8 batches, normalisation and random erasing on the device) against the CPU path on the
    same JPEG folder: both train to the same bar; the prefetcher's batches are float on the device."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_data import write_jpeg_folder

    data = write_jpeg_folder(tmp_path / "jpegs", 600, (200, 180))
    results = {}
    for prefetcher in (True, False):
        out = tmp_path / f"run-{prefetcher}"
        check_ok(launch([QUICKSTART, "model.name=test_resnet", "data.source=folder", f"data.root={data}",
                         "data.image_size=128", "data.augment.re_prob=0.25", "data.augment.auto_augment=rand-m9-mstd0.5-inc1",
                         "schedule.epochs=3", f"data.prefetcher={prefetcher}", "logging.wandb.mode=disabled",
                         f"output.dir={out}"], nproc=1, cwd=tmp_path))
        results[prefetcher] = read_summary(out)
    for s in results.values():
        assert s["device"] == "cuda" and s["eval"]["online"]["images"] == 60
        assert s["eval"]["averaged"]["recompute"]["top1"] >= 30.0  # 10 classes of colour fields: well above chance
