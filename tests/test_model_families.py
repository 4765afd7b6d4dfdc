"""Every timm normalisation family trains, averages (SWA and EMA), evaluates its averaged weights and
exports, under each bn.mode: timm's tiny test models plus LeViT, in-process (1 process) for the matrix,
and real 2-process launches (DDP with CPU SyncBatchNorm, DeepSpeed ZeRO-3) for what needs them."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROOT, assert_console_is_ours, check_ok, launch, read_summary

pytestmark = pytest.mark.slow
BN_SOURCES = ["initial", "swa_start", "online", "averaged", "recompute"]

# (model, image size, has BN running statistics): every kind of normalisation timm ships
FAMILIES = [
    ("test_resnet", 32, True),  # BatchNorm2d
    ("test_efficientnet", 32, True),  # BatchNormAct2d (fused activation)
    ("test_byobnet", 32, True),  # BatchNormAct2d in a ByobNet
    ("test_convnext", 32, False),  # LayerNorm2d
    ("test_vit", 48, False),  # LayerNorm, built for a non-default size (img_size)
    ("test_efficientnet_gn", 32, False),  # GroupNormAct
    ("test_nfnet", 32, False),  # norm-free
    ("test_coatnet", 64, True),  # hybrid: BN and LayerNorm; at 64 px it must be built for 64
    ("levit_128s", 32, True),  # BatchNorm1d inside linear blocks
]
MODES = ["local", "sync", "reduce"]
# one cell per family (CI time); strategy and bn.mode alternate so every (strategy, mode) pair runs
CELLS = [(model, size, has_bn, ("swa", "ema")[i % 2], MODES[i % 3]) for i, (model, size, has_bn) in enumerate(FAMILIES)]


def _load_with_timm_alone(name: str, size: int, path) -> torch.nn.Module:
    import timm

    kwargs = {"img_size": size} if name in ("test_vit", "test_coatnet", "levit_128s", "test_byobnet") else {}
    return timm.create_model(name, num_classes=10, checkpoint_path=str(path), **kwargs)


def _cell_args(out, model, size, strategy, mode):
    # norm-free nets diverge at the quickstart's lr 0.1 without adaptive clipping (clip_mode agc is not here yet)
    extra = ["optimizer.clip_grad=1.0"] if model == "test_nfnet" else []
    return [*extra, f"model.name={model}", f"data.image_size={size}", "schedule.epochs=1", "schedule.warmup_epochs=0", "averaging.start=0.5",
            f"averaging.strategy={strategy}", f"bn.mode={mode}", "bn.recompute_batches=4", "data.batch_size=32",
            f"output.dir={out}"]


@pytest.mark.parametrize("model,size,has_bn,strategy,mode", CELLS, ids=[f"{c[0]}-{c[3]}-{c[4]}" for c in CELLS])
def test_family_trains_averages_and_exports(train_in_process, tmp_path, model, size, has_bn, strategy, mode):
    out = tmp_path / "run"
    s = train_in_process(_cell_args(out, model, size, strategy, mode))
    assert s["status"] == "completed" and s["averaging"]["updates"] > 0
    averaged = s["eval"]["averaged"]
    bn = s["averaging"]["bn"]
    if has_bn:
        assert list(averaged) == BN_SOURCES and bn["bn_with_stats"] > 0 and "BatchNorm layers keep" in bn["why"]
        assert s["throughput"]["bn_recompute_s"] > 0
    else:  # one evaluation, no recompute pass, and the reason in words
        assert list(averaged) == ["none"] and bn["bn_with_stats"] == 0 and "evaluated once" in bn["why"]
        assert s["throughput"]["bn_recompute_s"] == 0
    for r in averaged.values():
        assert 0 <= r["top1"] <= 100 and math.isfinite(r["loss"])
    online = _load_with_timm_alone(model, size, out / "model_online.safetensors").state_dict()
    avg = _load_with_timm_alone(model, size, out / "model_averaged.safetensors").state_dict()
    assert all(torch.isfinite(t.float()).all() for t in (*online.values(), *avg.values()))
    weights = [k for k, t in avg.items() if t.is_floating_point() and "running" not in k]
    assert any(not torch.equal(online[k], avg[k]) for k in weights)  # the export holds averaged weights


def test_hybrid_bn_layers_get_recomputed_stats_and_layernorm_is_untouched(train_in_process, tmp_path):
    """CoAtNet: the exported BN statistics are the recompute pass's (not the live model's); LayerNorm has none."""
    out = tmp_path / "run"
    s = train_in_process(_cell_args(out, "test_coatnet", 64, "swa", "local") + ["bn.export_stats=recompute"])
    online = _load_with_timm_alone("test_coatnet", 64, out / "model_online.safetensors").state_dict()
    avg = _load_with_timm_alone("test_coatnet", 64, out / "model_averaged.safetensors").state_dict()
    means = [k for k in avg if k.endswith("running_mean")]
    assert means and all(not torch.equal(online[k], avg[k]) for k in means)
    assert s["averaging"]["bn"]["other"] == ["LayerNorm2d"]


@pytest.mark.parametrize("name", ["plateau", "multistep", "step", "poly", "tanh"])
def test_every_scheduler_runs(train_in_process, tmp_path, name):
    extra = {"plateau": ["schedule.patience_epochs=0", "schedule.plateau_metric=eval/online/loss"],
             "multistep": ["schedule.decay_milestones=[1]"], "step": ["schedule.decay_epochs=1"]}.get(name, [])
    s = train_in_process([f"schedule.name={name}", "schedule.epochs=2", "model.name=test_resnet", "averaging.strategy=none",
                          f"output.dir={tmp_path / 'run'}", *extra])
    assert s["status"] == "completed" and s["epochs"] == 2


class _BNVariants(torch.nn.Module):
    def __init__(self, num_classes=10, in_chans=3, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_chans, 8, 3, padding=1)
        self.bn_cumulative = torch.nn.BatchNorm2d(8, momentum=None)
        self.bn_batch_only = torch.nn.BatchNorm2d(8, track_running_stats=False)
        self.unused = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8))  # never called
        self.fc1 = torch.nn.Linear(8, 16)
        self.bn1d = torch.nn.BatchNorm1d(16)
        self.head = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.bn_batch_only(self.bn_cumulative(self.conv(x)).relu()).mean((2, 3))
        return self.head(self.bn1d(self.fc1(x)).relu())


def bnswa_test_bn_variants(pretrained=False, **kwargs):
    return _BNVariants(**kwargs)


def _register_bn_variants() -> None:
    """A model of this test's own, in timm's registry (this process only: the run is in-process)."""
    import timm
    from timm.models import register_model

    if not timm.is_model("bnswa_test_bn_variants"):
        register_model(bnswa_test_bn_variants)


def test_bn_variants_and_a_layer_the_pass_never_reaches(train_in_process, tmp_path):
    """BN with momentum=None, with track_running_stats=False, BatchNorm1d, and a BN branch the forward skips:
    the run completes, the skipped layer keeps its statistics (never NaN), the others are recomputed."""
    _register_bn_variants()
    s = train_in_process(_cell_args(tmp_path / "run", "bnswa_test_bn_variants", 16, "swa", "local"))
    assert list(s["eval"]["averaged"]) == BN_SOURCES and s["averaging"]["bn"]["bn_without_stats"] == 1
    from safetensors.torch import load_file

    avg = load_file(str(tmp_path / "run" / "model_averaged.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in avg.values())
    assert torch.equal(avg["unused.1.running_mean"], torch.zeros(8)) and torch.equal(avg["unused.1.running_var"], torch.ones(8))
    assert not torch.equal(avg["bn_cumulative.running_var"], torch.ones(8))


def test_recompute_keeps_statistics_of_an_unreached_layer():
    """The defect: 0 samples gave 0/0 = NaN statistics."""
    from framework.bn.recompute import recompute_bn_stats

    model = torch.nn.ModuleDict({"used": torch.nn.BatchNorm1d(4), "unused": torch.nn.BatchNorm1d(4)})
    model.forward = lambda x: model["used"](x)
    model.unused.running_mean.fill_(0.5)
    recompute_bn_stats(model, [(torch.randn(8, 4),)])
    assert torch.equal(model.unused.running_mean, torch.full((4,), 0.5)) and torch.isfinite(model.unused.running_var).all()
    assert not torch.equal(model.used.running_mean, torch.zeros(4))


LAUNCHES = [  # what in-process runs cannot show: gloo SyncBatchNorm across 2 processes (in bf16), and DeepSpeed
    ("test_coatnet", 64, "swa", "sync", ["backend.precision=bf16"], True),
    ("test_vit", 48, "ema", "reduce", ["backend.type=deepspeed", "backend.zero_stage=3"], False),
    ("test_efficientnet", 32, "swa", "local", ["backend.type=deepspeed", "backend.zero_stage=2"], True),
    # FSDP2: a BN family in bf16 (BN units kept fp32), a LayerNorm one in fp16 (ShardedGradScaler), the hybrid
    ("test_efficientnet", 32, "ema", "sync", ["backend.type=fsdp", "backend.precision=bf16"], True),
    ("test_convnext", 32, "swa", "local", ["backend.type=fsdp", "backend.precision=fp16"], False),
    ("test_coatnet", 64, "ema", "reduce", ["backend.type=fsdp", "backend.precision=bf16", "model.grad_checkpointing=true"], True),
]


@pytest.mark.parametrize("model,size,strategy,mode,args,has_bn", LAUNCHES, ids=[
    "ddp-bf16-coatnet", "zero3-vit", "zero2-efficientnet", "fsdp-bf16-efficientnet", "fsdp-fp16-convnext", "fsdp-bf16-coatnet"])
def test_two_process_families(tmp_path, model, size, strategy, mode, args, has_bn):
    out = tmp_path / "run"
    proc = launch([str(ROOT / "recipes" / "quickstart.yaml"), "logging.wandb.mode=disabled",
                   *_cell_args(out, model, size, strategy, mode), *args], nproc=2, cwd=tmp_path)
    check_ok(proc)
    assert_console_is_ours(proc)  # bf16 SyncBN, ZeRO-3 and ZeRO-2: nothing but the framework's lines
    s = read_summary(out)
    assert s["world_size"] == 2 and s["averaging"]["updates"] > 0
    wanted = next((a.split("=")[1] for a in args if a.startswith("backend.precision=")), "fp32")
    assert s["precision"] == wanted  # CPU autocast under DDP and FSDP2
    if "backend.type=fsdp" in args:
        assert s["backend"] == "fsdp" and s["throughput"]["averaging_comm_bytes_per_update"] == 0
    assert list(s["eval"]["averaged"]) == (BN_SOURCES if has_bn else ["none"])
    digests = s["averaging"]["recompute_bn_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    table = proc.stdout[proc.stdout.index("model / BN statistics"):]
    assert ("averaged + recompute" in table) == has_bn and ("averaged (no BN statistics)" in table) != has_bn
    state = _load_with_timm_alone(model, size, out / "model_averaged.safetensors").state_dict()
    assert all(torch.isfinite(t.float()).all() for t in state.values())


def test_live_training_does_not_depend_on_what_is_evaluated(train_in_process, tmp_path):
    """Same seed: no averaging, SWA (no SWALR: the same learning rates) and SWA with another recompute budget
    train bitwise the same live model. The defect: evaluation loaders and the recompute pass's crops drew
    from the training streams, so every extra evaluation shifted later augmentation."""
    from conftest import read_metrics
    from safetensors.torch import load_file

    base = ["model.name=test_resnet", "schedule.epochs=2", "averaging.start=0.3", "averaging.swa.lr=None"]
    runs = {}
    for name, extra in (("none", ["averaging.strategy=none"]), ("swa", ["averaging.strategy=swa", "bn.recompute_batches=3"]),
                        ("swa-all", ["averaging.strategy=swa", "bn.recompute_batches=None"])):
        out = tmp_path / name
        train_in_process([*base, *extra, f"output.dir={out}"])
        runs[name] = ([r["train/loss"] for r in read_metrics(out)], load_file(str(out / "model_online.safetensors")))
    losses, weights = runs["none"]
    for name in ("swa", "swa-all"):
        assert runs[name][0] == losses, name
        assert all(torch.equal(weights[k], runs[name][1][k]) for k in weights), name


def test_step_checkpoints_count_over_the_whole_run(train_in_process, tmp_path):
    """every=30 with 22 steps per epoch: the defect counted within the epoch and never saved."""
    out = tmp_path / "run"
    train_in_process(["model.name=test_resnet", "schedule.epochs=2", "averaging.strategy=none", "data.batch_size=64",
                      "checkpoint.every=30", "checkpoint.unit=steps", f"output.dir={out}"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-00001-sample-000000512"]


UNREACHABLE_WANDB = {"WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567", "WANDB_BASE_URL": "http://127.0.0.1:9"}


def test_an_unreachable_wandb_server_falls_back_to_offline_under_auto(train_in_process, tmp_path, monkeypatch, capsys):
    """The defect: with an API key and no reachable server, auto chose online and the run died in wandb.init."""
    for k, v in UNREACHABLE_WANDB.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    s = train_in_process(["model.name=test_resnet", "schedule.epochs=1", "schedule.warmup_epochs=0", "averaging.strategy=none",
                          "logging.wandb.mode=auto", "logging.wandb.init_timeout=3", f"output.dir={out}"])
    assert s["status"] == "completed" and s["wandb"]["mode"] == "offline"
    printed = capsys.readouterr().out
    assert "note: wandb online could not start" in printed and "wandb sync" in printed
    assert UNREACHABLE_WANDB["WANDB_API_KEY"] not in printed
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_explicit_online_that_cannot_start_stops_before_training(train_in_process, tmp_path, monkeypatch):
    from framework.reporting.tracking import LoggerStartError

    for k, v in UNREACHABLE_WANDB.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(LoggerStartError, match=r"logging.wandb.mode = 'online': wandb could not start \(CommError"):
        train_in_process(["model.name=test_resnet", "schedule.epochs=1", "schedule.warmup_epochs=0", "averaging.strategy=none",
                          "logging.wandb.mode=online", "logging.wandb.init_timeout=3", f"output.dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run" / "metrics.jsonl").read_text()  # stopped before the first epoch


def test_explicit_online_failure_stops_every_process_with_one_line(tmp_path):
    from conftest import clean_env

    proc = launch([str(ROOT / "recipes" / "quickstart.yaml"), "model.name=test_resnet", "logging.wandb.mode=online",
                   "logging.wandb.init_timeout=3", f"output.dir={tmp_path / 'run'}"], nproc=2, cwd=tmp_path,
                  env=clean_env(**UNREACHABLE_WANDB))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "logging.wandb.mode = 'online': wandb could not start" in lines[0], proc.stderr[-3000:]
    assert "lost contact" not in proc.stderr and UNREACHABLE_WANDB["WANDB_API_KEY"] not in proc.stdout + proc.stderr
