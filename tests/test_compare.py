"""`python -m framework compare` on real runs: varying keys as columns, seeds grouped with mean ± std."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, check_ok, clean_env, read_summary, run_in_process

from framework.reporting.wandb_file import find_run_files

pytestmark = pytest.mark.slow
RUNS = {"local-s0": ["bn.mode=local", "seed=0"], "local-s1": ["bn.mode=local", "seed=1"], "reduce-s0": ["bn.mode=reduce", "seed=0"]}


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmp")
    dirs = {}
    for name, args in RUNS.items():
        dirs[name] = base / name
        # small synthetic data, in this process: compare reads run files, it needs no trained model or launch
        run_in_process(["model.name=test_resnet", "schedule.epochs=2", "data.source=synthetic",
                        "data.synthetic_train_size=256", "data.synthetic_val_size=64", f"output.dir={dirs[name]}", *args])
    return dirs


def test_compare_groups_seeds_and_writes_table_and_plots(run_dirs, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "framework", "compare", *map(str, run_dirs.values()), "--out", str(out),
                           "--wandb", "offline"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    check_ok(proc)
    table = (out / "compare.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| bn.mode | runs | live top1 | avg+initial top1")  # only what differs; seed groups
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert set(rows) == {"local", "reduce"} and rows["local"][1] == "2" and rows["reduce"][1] == "1"
    live = [read_summary(run_dirs[n])["eval"]["online"]["top1"] for n in ("local-s0", "local-s1")]
    assert rows["local"][2] == f"{statistics.fmean(live):.2f} ± {statistics.stdev(live):.2f}"
    assert rows["reduce"][2] == f"{read_summary(run_dirs['reduce-s0'])['eval']['online']['top1']:.2f}"
    assert table.strip() in proc.stdout
    for png in ("top1_per_epoch.png", "throughput.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert len(find_run_files(out)) == 1  # the comparison as a wandb run of its own


def test_compare_refuses_a_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "framework", "compare", str(tmp_path / "nope")], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: run dir") and "Traceback" not in proc.stderr


def test_a_tiny_cell_of_the_fashion_mnist_grid_runs_resumes_and_keeps_the_digits_section(tmp_path):
    """The Fashion-MNIST grid cannot rot: its first cell, shrunk, through the documented command. A second
    invocation skips the finished run; the page keeps the digits section and gains one Fashion-MNIST section."""
    import shutil

    from framework.data.fashion_mnist import missing_files

    if missing_files(None):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; .ci/run does it)")
    page = tmp_path / "docs" / "RESULTS.md"
    page.parent.mkdir()
    shutil.copy(ROOT / "docs" / "RESULTS.md", page)
    cmd = [sys.executable, str(ROOT / "studies" / "run_grid.py"), "--dataset", "fashion_mnist", "--seeds", "0", "--limit", "1",
           "--out", str(tmp_path / "grid"), "--page", str(page), "--set", "data.train_subset=512", "schedule.epochs=2",
           "schedule.warmup_epochs=0", "bn.recompute_batches=4"]
    for attempt in ("first", "again"):
        proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
        check_ok(proc)
        expected = "done in" if attempt == "first" else "already complete"
        assert f"swa-local-b8-seed0: {expected}" in proc.stdout, proc.stdout[-2000:]
    s = read_summary(tmp_path / "grid" / "swa-local-b8-seed0")
    assert s["eval"]["online"]["images"] == 10000 and s["eval"]["online"]["top1"] > 30.0  # chance is 10%
    text = page.read_text()
    assert text.count("<!-- grid:digits -->") == 1 and "## Measured on the bundled digits" in text
    assert text.count("<!-- grid:fashion_mnist -->") == 1 and "## Measured on Fashion-MNIST" in text
    assert (page.parent / "results" / "fashion_mnist" / "top1_per_epoch.png").is_file()



def test_the_grid_together_runs_swa_and_ema_as_two_averagers_of_one_run(tmp_path):
    """`--together`: one launch per cell gives the SWA and the EMA row (an `averaging.name` column), each
    averager sized by its name (averaging.<name>.<key>), in its own section of the page."""
    from framework.data.fashion_mnist import missing_files

    if missing_files(None):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; .ci/run does it)")
    page = tmp_path / "docs" / "RESULTS.md"
    cmd = [sys.executable, str(ROOT / "studies" / "run_grid.py"), "--dataset", "fashion_mnist", "--together", "--seeds", "0",
           "--limit", "1", "--out", str(tmp_path / "grid"), "--page", str(page), "--set", "data.train_subset=512",
           "schedule.epochs=2", "schedule.warmup_epochs=0", "bn.recompute_batches=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600)
    check_ok(proc)
    assert "together-local-b8-seed0: done in" in proc.stdout, proc.stdout[-2000:]
    run = tmp_path / "grid" / "together-local-b8-seed0"
    s = read_summary(run)
    assert s["averagers"] == ["swa", "ema"] and all(s["eval"]["averaged"][n]["recompute"]["top1"] > 30.0 for n in s["averagers"])
    swa, ema = yaml.safe_load((run / "recipe.yaml").read_text())["averaging"]
    assert swa["swa"]["lr"] == pytest.approx(0.0025) and ema["ema"]["decay"] == pytest.approx(0.99875)  # batch 8 of 64
    text = page.read_text()
    assert text.count("<!-- grid:fashion_mnist-together -->") == 1 and "SWA and EMA in one run" in text
    header, _, *rows = (page.parent / "results" / "fashion_mnist-together" / "compare.md").read_text().splitlines()
    names = [c.strip() for c in header.strip("|").split("|")].index("averaging.name")
    assert sorted(r.strip("|").split("|")[names].strip() for r in rows) == ["ema", "swa"]


def test_a_plot_label_names_the_averager_instead_of_its_options():
    from framework.reporting.compare import _label

    keys = ["averaging.ema.decay", "averaging.name", "averaging.strategy", "bn.mode"]
    assert _label(keys, ("0.99", "ema", "ema", "sync")) == "name=ema, mode=sync"
    assert _label(keys, ("-", "None", "swa", "local")) == "decay=-, name=None, strategy=swa, mode=local"  # a single run
