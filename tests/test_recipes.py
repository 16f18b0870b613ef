"""recipes/*.env: each loads through `uv run --env-file` and holds settings only, with values the
settings accept; demo.env trains, the shell's variables winning over the file's."""

import json
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest

import settings
from test_train import ROOT, read_metrics

RECIPES = sorted((ROOT / "recipes").glob("*.env"))
UV = shutil.which("uv")
pytestmark = pytest.mark.skipif(UV is None, reason="uv is not on PATH: the recipes are read by uv run --env-file")
# what the settings make of the environment uv hands over: every variable the file sets, and each
# group of settings read through its own from_env, as the scripts read them
READ_BACK = """
import json, os, sys
from dataclasses import asdict
import settings
print(json.dumps({"environment": {name: os.environ.get(name) for name in sys.argv[1:]},
                  "settings": {cls.__name__: asdict(cls.from_env()) for cls in settings.SETTINGS}}))
settings.warn_misspelled()
"""


def file_variables(path):
    """The file's NAME=value lines, as a dotenv file is read (comments and blank lines skipped)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_there_is_a_recipe_for_each_documented_run():
    assert [path.name for path in RECIPES] == ["demo.env", "finetune-gpt2.env", "fsdp-gpt2-large.env", "gpt2-124m.env",
                                               "muon-small.env", "shakespeare.env"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_a_recipe_holds_settings_only_and_loads_through_uv(recipe):
    variables = file_variables(recipe)
    assert variables and set(variables) <= settings.names(), set(variables) - settings.names()
    assert recipe.read_text().startswith(f"# {recipe.name}: "), "a comment block first: what it trains, time, result"
    result = subprocess.run([UV, "run", "--no-sync", "--env-file", str(recipe), sys.executable, "-c", READ_BACK,
                             *variables], cwd=ROOT, env=settings.cleared_environment(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no error, no misspelling warning
    read = json.loads(result.stdout)
    assert read["environment"] == variables
    for cls in settings.SETTINGS:  # every value read as the file says (a number as a number, 1 as on)
        for field in fields(cls):
            if field.name.upper() in variables:
                assert read["settings"][cls.__name__][field.name] == parsed(variables[field.name.upper()], field.default)


def parsed(text, default):
    """A variable's text as a setting of the default's type holds it."""
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    return type(default)(text)


def test_the_demo_recipe_trains_and_the_shell_wins(demo_dataset, tmp_path):
    env = settings.cleared_environment(DATASET_PATH=str(demo_dataset), LOG_DIR=str(tmp_path), MAX_STEPS="3", EVAL_INTERVAL="2",
                            OMP_NUM_THREADS="1")
    result = subprocess.run([UV, "run", "--no-sync", "--env-file", str(ROOT / "recipes" / "demo.env"), "train.py"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("  N_EMBD: 128", "  TOTAL_BATCH_SIZE: 2048", "  MAX_STEPS: 3", f"  DATASET_PATH: {demo_dataset}"):
        assert line in result.stdout
    rows = read_metrics(tmp_path)
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
