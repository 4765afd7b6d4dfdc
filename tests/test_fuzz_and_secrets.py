"""Bad input at scale (property-based fuzzing of recipes) and secrets kept out of every output."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import ROOT, check_ok, clean_env, launch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.__main__ import main as front_door
from framework.recipe.errors import RecipeError
from framework.recipe.resolve import load_raw, resolve_recipe
from framework.recipe.schema import Recipe, field_paths

BASE = load_raw(ROOT / "recipes" / "quickstart.yaml")
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=40), st.sampled_from(["resnet18", "sgd", "cosine", "sync", "ema", "digits", "folder"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=8), SCALARS, max_size=3))


def _paths(data: dict, prefix=()) -> list[tuple]:
    out = []
    for k, v in data.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


PATHS = _paths(BASE)


@st.composite
def mutated_recipes(draw):
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        node = data
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict):
            continue
        action = draw(st.sampled_from(["set", "delete", "unknown"]))
        if action == "set":
            node[path[-1]] = draw(VALUES)
        elif action == "delete":
            node.pop(path[-1], None)
        else:
            node[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
    return data


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=mutated_recipes(), text_noise=st.one_of(st.none(), st.tuples(st.integers(0, 2000), st.text(max_size=3))))
def test_fuzzed_recipes_give_only_clean_errors(tmp_path_factory, data, text_noise):
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if text_noise is not None:  # also damage the YAML text itself
        at, junk = text_noise
        text = text[:at % (len(text) + 1)] + junk + text[at % (len(text) + 1):]
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        resolve_recipe(path)
    except RecipeError as err:
        assert err.errors and all(line and "\n" not in line for line in err.errors)


def _through_front_door(argv: list[str], capsys) -> None:
    """`bnswa validate ARGV`: it prints the recipe (exit 0) or only `error:` lines (exit 2); never a traceback."""
    try:
        code = front_door(["validate", *argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err.splitlines()
    assert code in (0, 2) and (code == 0) == (not err), (code, err)
    assert all(line.startswith("error: ") for line in err), err


YAML_DOCS = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                         max_leaves=12)
KEYS = field_paths(Recipe)  # every key of the schema, not only the quickstart's


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(noise=st.one_of(st.binary(max_size=300), YAML_DOCS.map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode())))
def test_random_files_through_the_front_door(tmp_path_factory, capsys, noise):
    path = tmp_path_factory.mktemp("noise", numbered=True) / "r.yaml"
    path.write_bytes(noise)
    _through_front_door([str(path)], capsys)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(overrides=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_random_values_for_every_key_through_the_front_door(capsys, overrides):
    text = [f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
            for key, value in overrides]
    _through_front_door([str(ROOT / "recipes" / "quickstart.yaml"), "output.dir=/nonexistent-fuzz/run", *text], capsys)


SECRETS = {"WANDB_API_KEY": "wandb-SECRET-0000000000000000000000000000000000000000",
           "HF_TOKEN": "hf_SECRET_token_123", "AWS_SECRET": "aws-SECRET-xyz", "MY_SERVICE_KEY": "svc-SECRET-key"}


@pytest.mark.slow
def test_secrets_stay_out_and_every_write_stays_under_output_dir(tmp_path):
    out, home, tmp = tmp_path / "run", tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = clean_env(**SECRETS, HOME=str(home), TMPDIR=str(tmp))
    env.pop("XDG_CACHE_HOME", None)
    proc = launch([str(ROOT / "recipes" / "quickstart.yaml"), "model.name=test_resnet", "schedule.epochs=2", "logging.wandb.mode=offline",
                   "checkpoint.every=1", f"output.dir={out}"], nproc=2, cwd=tmp_path, env=env)
    check_ok(proc)
    # Outside output.dir: only the shared digits cache (the bundled dataset, written once per machine)
    elsewhere = [p for p in [*home.rglob("*"), *tmp.rglob("*")] if p.is_file()]
    assert elsewhere and all(p.is_relative_to(home / ".cache" / "bnswa" / "digits-v1") for p in elsewhere), [
        str(p) for p in elsewhere if "digits-v1" not in str(p)]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "manifest.json" for p in files)
    for secret in SECRETS.values():
        assert secret not in proc.stdout + proc.stderr
        for p in files:
            assert secret.encode() not in p.read_bytes(), f"{secret[:12]}... found in {p}"
