"""Recipes: every shipped recipe validates; a catalogue of bad input gives clean errors and writes nothing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import ENTRY, ROOT, launch

from framework.recipe.errors import RecipeError
from framework.recipe.resolve import parse_overrides, resolve_recipe

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GOOD = """\
model: {name: resnet18, num_classes: 10}
optimizer: {lr: 0.1}
schedule: {epochs: 2}
"""


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    from framework.data.fashion_mnist import missing_files

    if "fashion_mnist" in path.read_text() and missing_files(None):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist; .ci/run does it)")
    recipe = resolve_recipe(path)
    assert recipe.name == path.stem
    assert recipe.schedule.epochs >= 1


def test_inheritance_keeps_only_differences(tmp_path):
    (tmp_path / "base.yaml").write_text(GOOD)
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptimizer: {weight_decay: 1e-4}\n")
    r = resolve_recipe(tmp_path / "child.yaml")
    assert (r.optimizer.lr, r.optimizer.weight_decay, r.model.name) == (0.1, 1e-4, "resnet18")


def test_overrides_in_both_agent_forms_parse_as_yaml_scalars(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD)
    r = resolve_recipe(tmp_path / "r.yaml", ["--optimizer.lr=1e-5", "schedule.epochs=3", "--optimizer.clip_grad=None",
                                               "logging.progress=False", "output.dir=/tmp/x"])
    assert r.optimizer.lr == pytest.approx(1e-5) and isinstance(r.optimizer.lr, float)
    assert (r.schedule.epochs, r.optimizer.clip_grad, r.logging.progress, r.output.dir) == (3, None, False, "/tmp/x")
    assert parse_overrides(["--a.b=True"]) == [("a.b", True)]


def test_nan_and_bool_are_refused_for_numbers(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD)
    with pytest.raises(RecipeError, match=r"optimizer.lr = nan: must be a finite number"):
        resolve_recipe(tmp_path / "r.yaml", ["optimizer.lr=.nan"])
    with pytest.raises(RecipeError, match=r"data.batch_size = True: expected an integer"):
        resolve_recipe(tmp_path / "r.yaml", ["data.batch_size=true"])


# (id, recipe text or None for "no file", overrides, substrings the error must contain)
BAD = [
    ("name-climbs-out", "name: ../../escape\n" + GOOD, [], ["name = '../../escape'", "letters, digits"]),
    ("unknown-top-key", GOOD + "optimiser: {lr: 0.1}\n", [], ["optimiser: unknown key", "did you mean 'optimizer'"]),
    ("unknown-nested-key", GOOD.replace("lr: 0.1", "lrr: 0.1"), [], ["optimizer.lrr: unknown key", "did you mean 'lr'"]),
    ("wrong-type", GOOD.replace("lr: 0.1", "lr: fast"), [], ["optimizer.lr = 'fast'", "expected a number"]),
    ("out-of-range", GOOD.replace("lr: 0.1", "lr: -0.1"), [], ["optimizer.lr = -0.1", "must be > 0"]),
    ("bad-choice", GOOD + "backend: {precision: fp8}\n", [], ["backend.precision = 'fp8'", "choices are 'fp32', 'bf16', 'fp16'"]),
    ("unknown-model", GOOD.replace("resnet18", "resnet_19"), [], ["model.name = 'resnet_19'", "not a timm model", "did you mean"]),
    ("missing-data-folder", GOOD + "data: {source: folder, root: /nonexistent/imgs}\n", [], ["data.root = '/nonexistent/imgs'", "not found"]),
    ("missing-recipe-file", None, [], ["recipe file not found"]),
    ("yaml-syntax", GOOD + "data: {source: [digits\n", [], ["YAML syntax error", "line"]),
    ("empty-file", "", [], ["recipe file is empty"]),
    ("alias-bomb", 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b]\n' + GOOD,
     [], ["YAML anchors (&a) are not allowed"]),
    ("duplicate-key", GOOD + "optimizer: {lr: 0.2}\n", [], ["duplicate key 'optimizer'"]),
    ("missing-required", GOOD.replace(", num_classes: 10", ""), [], ["model.num_classes: required key is missing"]),
    ("section-is-scalar", GOOD.replace("model: {name: resnet18, num_classes: 10}", "model: resnet18"), [], ["model = 'resnet18'", "expected a mapping"]),
    ("bool-for-int", GOOD + "data: {batch_size: true}\n", [], ["data.batch_size = True", "expected an integer"]),
    ("warmup-too-long", GOOD.replace("epochs: 2", "epochs: 2, warmup_epochs: 2"), [], ["schedule.warmup_epochs = 2", "must be < schedule.epochs"]),
    ("unknown-optimizer", GOOD.replace("lr: 0.1", "name: sgdd"), [], ["optimizer.name = 'sgdd'", "not a timm optimizer", "did you mean 'sgd'"]),
    ("not-a-mapping", "- model\n- data\n", [], ["a recipe must be a mapping"]),
    ("override-unknown-key", GOOD, ["--optimizer.lrr=0.1"], ["override optimizer.lrr: unknown key", "did you mean 'optimizer.lr'"]),
    ("override-no-equals", GOOD, ["optimizer.lr"], ["override 'optimizer.lr'", "expected key=value"]),
    ("override-wrong-type", GOOD, ["schedule.epochs=2.5"], ["schedule.epochs = 2.5", "expected an integer"]),
    ("override-out-of-range", GOOD, ["data.batch_size=0"], ["data.batch_size = 0", "must be >= 1"]),
    ("zero-stage-with-ddp", GOOD + "backend: {type: ddp, zero_stage: 2}\n", [], ["backend.zero_stage = 2", "only with backend.type = 'deepspeed'"]),
    ("zero-stage-out-of-range", GOOD, ["backend.type=deepspeed", "backend.zero_stage=4"], ["backend.zero_stage = 4", "must be <= 3"]),
    ("fsdp-norm-per-tensor-optimizer", GOOD, ["backend.type=fsdp", "optimizer.name=lamb"],
     ["optimizer.name = 'lamb'", "not under backend.type = 'fsdp'", "choose one of sgd"]),
    ("fsdp-agc", GOOD, ["backend.type=fsdp", "optimizer.clip_grad=0.01", "optimizer.clip_mode=agc"],
     ["optimizer.clip_mode = 'agc'", "unit-wise norm of a sharded vector"]),
    ("fsdp-channels-last", GOOD, ["backend.type=fsdp", "model.channels_last=true"], ["model.channels_last = True", "NHWC"]),
    ("fsdp-zero-stage", GOOD, ["backend.type=fsdp", "backend.zero_stage=3"], ["backend.zero_stage = 3", "(got 'fsdp')"]),
    ("fsdp-engine-copy", GOOD, ["backend.type=fsdp", "checkpoint.engine_copy=true"], ["checkpoint.engine_copy = True", "DeepSpeed only"]),
    ("reshard-without-fsdp", GOOD, ["backend.reshard_after_forward=false"], ["backend.reshard_after_forward = False", "only with backend.type = 'fsdp'"]),
    ("unused-parameters-outside-ddp", GOOD, ["backend.type=fsdp", "backend.find_unused_parameters=true"],
     ["backend.find_unused_parameters = True", "DDP only"]),
    ("offload-params-needs-zero3", GOOD + "backend: {type: deepspeed, zero_stage: 2, offload_params: true}\n", [],
     ["backend.offload_params = True", "needs backend.zero_stage 3"]),
    ("unknown-averaging", GOOD + "averaging: {strategy: polyak}\n", [], ["averaging.strategy = 'polyak'", "choices are 'none', 'swa', 'ema'"]),
    ("ema-decay-out-of-range", GOOD + "averaging: {strategy: ema, ema: {decay: 1.0}}\n", [], ["averaging.ema.decay = 1.0", "must be < 1"]),
    ("unknown-bn-mode", GOOD + "bn: {mode: global}\n", [], ["bn.mode = 'global'", "choices are 'local', 'sync', 'reduce'"]),
    ("base-cycle", "base: bad.yaml\n" + GOOD, [], ["recipe inheritance cycle"]),
]


def run_entry(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str]:
    """The workers' entry script (launch/train.py runs it) in this process, from `cwd`: validation is all
    that may run, so training itself is replaced by a failure. A process of its own would prove nothing
    more; tests/test_front_door.py and tests/test_resume.py run the real processes."""
    import framework.entry.train as entry

    def no_training(recipe):
        raise AssertionError("validation passed and training started")

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(entry, "_run", no_training)
    try:
        code = entry.main(argv)
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gives_one_clean_line_and_writes_nothing(tmp_path, case, monkeypatch, capsys):
    _, text, overrides, expected = case
    recipes, cwd = tmp_path / "recipes", tmp_path / "cwd"
    recipes.mkdir()
    cwd.mkdir()
    path = recipes / "bad.yaml"
    if text is not None:
        path.write_text(text)
    out = cwd / "out"
    code, text = run_entry([str(path), *overrides, f"output.dir={out}"], cwd, monkeypatch, capsys)
    assert code == 2, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert errors and len(errors) == len(text.splitlines()), text
    assert any(all(s in line for s in expected) for line in errors), errors
    assert list(cwd.iterdir()) == [], "a bad recipe must write nothing"


def test_validate_command_prints_resolved_recipe_or_errors(tmp_path, monkeypatch, capsys):
    from framework.__main__ import main

    (tmp_path / "r.yaml").write_text(GOOD)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(tmp_path / "r.yaml"), "optimizer.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.5" in out and "num_classes: 10" in out
    with pytest.raises(SystemExit) as stop:
        main(["validate", str(tmp_path / "r.yaml"), "optimizer.lr=-1"])
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == "error: optimizer.lr = -1.0: must be > 0.0"


@pytest.mark.slow
def test_bad_recipe_under_two_process_launch_writes_nothing(tmp_path):
    (tmp_path / "r.yaml").write_text(textwrap.dedent(GOOD))
    out = tmp_path / "out"
    proc = launch([str(tmp_path / "r.yaml"), "optimizer.lr=-1", f"output.dir={out}"], nproc=2, cwd=tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("error: optimizer.lr = -1.0: must be > 0.0") == 1  # local rank 0 prints it once
    assert not out.exists() and not (tmp_path / "wandb").exists()


def test_catalogue_is_large_enough():
    assert len(BAD) >= 15
    assert len({c[0] for c in BAD}) == len(BAD)
    assert Path(ENTRY).is_file()


@pytest.mark.parametrize("link", ["metrics.jsonl", "checkpoints", "checkpoints/epoch-00001-sample-000000000"])
def test_a_symlink_in_output_dir_is_refused_before_anything_is_written(tmp_path, link, monkeypatch, capsys):
    (tmp_path / "r.yaml").write_text(GOOD)
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(outside, target_is_directory=True)
    code, text = run_entry([str(tmp_path / "r.yaml"), f"output.dir={out}"], tmp_path, monkeypatch, capsys)
    assert code == 2 and f"{link} is a symbolic link" in text and "output.dir" in text, text
    assert list(outside.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == [link.split("/")[0]]


def test_an_error_line_stays_one_line_whatever_characters_a_key_holds(capsys):
    """The fuzz found a model.kwargs key with a character str.splitlines() splits on (not only \\n): every
    such character is printed as its escape."""
    from framework.recipe.errors import RecipeError, print_errors

    odd = "".join(chr(c) for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029))
    print_errors([f"model.kwargs.{odd} = 1: not a keyword", *RecipeError("x", [f"k{odd}"]).errors])
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "\\x85" in lines[0] and "\\u2028" in lines[1]
