"""`averaging` as a list: several averagers in one run, each evaluated, checkpointed, resumed and exported."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from framework.recipe.errors import RecipeError
from framework.recipe.resolve import resolve_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
COMMON = ["model.name=test_resnet", "schedule.epochs=2", "schedule.warmup_epochs=0", "bn.recompute_batches=8"]
SWA = {"strategy": "swa", "start_epoch": 1, "swa": {"lr": None}}  # no SWALR: neither averager steers training
EMA = {"name": "ema_fast", "strategy": "ema", "start_epoch": 0, "ema": {"decay": 0.9}}


def _override(entry: dict) -> list[str]:
    flat = []
    for k, v in entry.items():
        if isinstance(v, dict):
            flat += [f"averaging.{k}.{kk}={'null' if vv is None else vv}" for kk, vv in v.items()]
        else:
            flat.append(f"averaging.{k}={v}")
    return flat


def test_each_averager_of_a_list_is_the_run_it_would_be_alone_and_resumes_exactly(train_in_process, tmp_path, capsys):
    """Two averagers in one run give, file for file and number for number, what each gives in a run of its
    own (training is the same: neither sets the learning rate); a run resumed from its epoch-1 checkpoint
    ends the same; compare shows one row per averager."""
    both = json.dumps([SWA, EMA])
    out = tmp_path / "both"
    s = train_in_process([*COMMON, f"averaging={both}", "checkpoint.every=1", f"output.dir={out}"])
    assert s["averagers"] == ["swa", "ema_fast"]
    assert sorted(s["eval"]["averaged"]["swa"]) == ["averaged", "initial", "online", "recompute", "swa_start"]
    reports = s["averaging"]["averagers"]
    assert s["averaging"]["state_bytes_per_process"] == 2 * reports["swa"]["state_bytes_per_process"]
    assert (reports["swa"]["updates"], reports["ema_fast"]["updates"]) == (45, 88)  # 44 updates per epoch, from 44 and 1
    passes = [reports[n]["recompute_s"] for n in ("swa", "ema_fast")]  # each averager times its own pass
    assert min(passes) > 0 and s["averaging"]["recompute_s"] == pytest.approx(sum(passes))
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"eval/averaged/swa/recompute/top1", "eval/averaged/ema_fast/initial/top1"} <= set(record)
    for entry, name in ((SWA, "swa"), (EMA, "ema_fast")):
        alone = tmp_path / name
        single = train_in_process([*COMMON, *_override(entry), f"output.dir={alone}"])
        numbers = lambda rs: {(src, k): r[k] for src, r in rs.items() for k in ("top1", "top5", "loss")}  # noqa: E731
        assert numbers(single["eval"]["averaged"]) == numbers(s["eval"]["averaged"][name]), name
        a, b = load_file(alone / "model_averaged.safetensors"), load_file(out / f"model_averaged-{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    part, first = tmp_path / "part", sorted((out / "checkpoints").glob("epoch-00001-*"))[0]
    capsys.readouterr()
    resumed = train_in_process([*COMMON, f"averaging={both}", "checkpoint.every=1", f"output.dir={part}", f"resume={first}"])
    assert f"resumed from {first} at epoch 2" in capsys.readouterr().out  # not a second run from scratch
    for name in ("swa", "ema_fast"):
        assert resumed["eval"]["averaged"][name]["recompute"]["top1"] == s["eval"]["averaged"][name]["recompute"]["top1"]
        a, b = load_file(part / f"model_averaged-{name}.safetensors"), load_file(out / f"model_averaged-{name}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name

    from framework.reporting.compare import compare

    table, keys, rows, _ = compare([out, tmp_path / "swa"], tmp_path / "compare")
    assert "averaging.name" in keys and len(rows) == 3  # the list's two averagers, and the single run
    swa_rows = [r for r in rows if r["key"][keys.index("averaging.name")] == "swa"]
    assert len(swa_rows) == 1 and len(swa_rows[0]["runs"]) == 1  # the single run's name is None: its own row


def test_a_list_of_averagers_is_validated_entry_by_entry():
    def errors(value: str) -> str:
        with pytest.raises(RecipeError) as err:
            resolve_recipe(QUICKSTART, [f"averaging={value}"])
        return "\n".join(err.value.errors)

    two_swalr = json.dumps([{"strategy": "swa", "swa": {"lr": 0.02}}, {"name": "late", "strategy": "swa", "start": 0.9,
                                                                       "swa": {"lr": 0.01}}])
    assert "averaging: swa, late each set the learning rate (SWALR: swa.lr)" in errors(two_swalr)
    assert "averaging[1].name = None: 'ema' names an earlier averager too" in errors(
        json.dumps([{"strategy": "ema"}, {"strategy": "ema"}]))
    assert "averaging[0].strategy = 'none': every entry of the list averages" in errors(json.dumps([{"strategy": "none"}]))
    assert "averaging[0].name = 'recompute': letters, digits" in errors(json.dumps([{"name": "recompute", "strategy": "ema"}]))
    assert "averaging[0].strateg: unknown key; did you mean 'strategy'?" in errors(json.dumps([{"strateg": "ema"}]))
    r = resolve_recipe(QUICKSTART, [f"averaging={json.dumps([SWA, EMA])}", "export.best=eval/averaged/ema_fast/recompute/top1",
                                    "eval.bn_sources=[recompute]"])
    assert [a.strategy for a in r.averaging] == ["swa", "ema"]
    with pytest.raises(RecipeError) as err:
        resolve_recipe(QUICKSTART, [f"averaging={json.dumps([SWA, EMA])}", "export.best=eval/averaged/recompute/top1"])
    assert "with several averagers name one: eval/averaged/<averager>/recompute/..." in "\n".join(err.value.errors)


def test_an_override_names_one_averager_of_a_list():
    recipe = ROOT / "recipes" / "several_averagers.yaml"
    r = resolve_recipe(recipe, ["averaging.ema_999.ema.decay=0.995", "--averaging.swa.start=0.6",
                                "averaging.ema_99={ema: {warmup: true}}"])  # a sweep agent's forms, and a whole section
    assert [(a.start, a.ema.decay, a.ema.warmup) for a in r.averaging] == [(0.6, 0.999, False), (0.0, 0.99, True),
                                                                            (0.0, 0.995, False)]
    for override, message in (
            ("averaging.ema.decay=0.9", "override averaging.ema.decay: averaging is a list of averagers (swa, ema_99, "
                                        "ema_999); name one: averaging.<name>.ema.decay"),
            ("averaging.ema_99.ema.decai=0.9", "override averaging.ema_99.ema.decai: unknown key; did you mean "
                                               "'averaging.ema_99.ema.decay'?"),
            ("averaging.swa.lr=0.1", "override averaging.swa.lr: unknown key; did you mean 'averaging.swa.swa.lr'?"),
            ("averaging.ema_99.ema.decay=1.5", "averaging[1].ema.decay = 1.5: must be < 1.0")):
        with pytest.raises(RecipeError) as err:
            resolve_recipe(recipe, [override])
        assert message in str(err.value)
