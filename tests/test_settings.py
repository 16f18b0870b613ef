"""settings.py is the one list: README and docs/ document exactly it, scripts read nothing else, and a set
variable that looks like a misspelled setting gets one warning line."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import plot_metrics
import settings
from env import UserError, read

ROOT = Path(__file__).resolve().parents[1]


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # wherever the tables are


def readme_rows():
    """(variable, default) of every row of the variable tables (`| variable | default | meaning |`) in
    README.md and docs/.

    A combined row such as `N_LAYER` / `N_HEAD` / `N_EMBD` | 12 / 12 / 768 is read as one row per
    variable, pairing the names and the defaults in order. A variable may appear in several tables
    (LOG_DIR, DEVICE, ...): every row is checked."""
    rows, in_table = [], False
    for line in "\n".join(path.read_text() for path in DOCUMENTS).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            in_table = False
        elif cells[:2] == ["variable", "default"]:
            in_table = True
        elif in_table and not set(cells[0]) <= set("-: "):
            names = [name.strip().strip("`") for name in cells[0].split(" / ")]
            defaults = [value.strip().strip("`") for value in cells[1].split(" / ")]
            assert len(names) == len(defaults), f"README row {line!r}: names and defaults do not pair up"
            rows += zip(names, defaults)
    return rows


def code_defaults():
    """{VARIABLE: default} of every settings dataclass; a variable in two of them has one default."""
    defaults = {}
    for cls in settings.SETTINGS:
        for field in dataclasses.fields(cls):
            name = field.name.upper()
            assert defaults.get(name, field.default) == field.default, f"{name} has two defaults"
            defaults[name] = field.default
    return defaults


def same_default(documented, default):
    """README writes `(unset)` for an empty or zero default, numbers as it likes (1e8, 6e-4), flags as 0/1."""
    if documented == "(unset)":
        return default in ("", 0, 0.0)
    if isinstance(default, bool):
        return documented == str(int(default))
    if isinstance(default, (int, float)):
        return float(documented) == default
    return documented == default


def test_readme_tables_list_exactly_the_settings_with_their_defaults():
    rows, defaults = readme_rows(), code_defaults()
    assert {name for name, _ in rows} == set(defaults)
    wrong = [(name, documented, defaults[name]) for name, documented in rows if not same_default(documented, defaults[name])]
    assert wrong == []


def variables_read_outside_settings():
    """Every literal variable name a top-level script or module passes to os.environ or an env.py reader."""
    readers = {"get", "getenv", "env_str", "env_int", "env_float", "env_flag", "is_set", "_raw"}
    found = {}
    for path in ROOT.glob("*.py"):
        if path.name in ("env.py", "settings.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                key = node.slice
            elif isinstance(node, ast.Call) and node.args and getattr(node.func, "attr", getattr(node.func, "id", "")) in readers:
                if node.func.__class__ is ast.Attribute and ast.unparse(node.func.value) not in ("os.environ", "os"):
                    continue
                key = node.args[0]
            else:
                continue
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and re.fullmatch(r"[A-Z_]+", key.value):
                found.setdefault(key.value, []).append(path.name)
    return found


def test_scripts_read_no_variable_that_is_not_in_the_list():
    found = variables_read_outside_settings()
    assert "WORLD_SIZE" in found  # the scan does see direct reads (device.py asks torchrun's WORLD_SIZE)
    # torchrun's variables (RANK, MASTER_ADDR, TORCHELASTIC_*, ...) are set by torchrun, never by hand
    others = {name for name in found if name in settings.TORCHRUN or name.startswith(settings.OTHER_TOOLS)}
    assert set(found) - others <= set(code_defaults()), found


@pytest.mark.parametrize("variable, meant", [
    ("MAX_STEP", "MAX_STEPS"), ("N_LAYERS", "N_LAYER"), ("BATCHSIZE", "BATCH_SIZE"), ("max_steps", "MAX_STEPS"),
    ("MAX_SETPS", "MAX_STEPS"), ("LEARNING_RATE", "MAX_LR"), ("LR", "MAX_LR"), ("MAX_ITERS", "MAX_STEPS"),
    ("OUT_DIR", "LOG_DIR"), ("TEMPRATURE", "TEMPERATURE"), ("HELLASWAG_LIMT", "HELLASWAG_LIMIT"),
])
def test_a_misspelled_setting_gets_one_warning_naming_the_setting(monkeypatch, capsys, variable, meant):
    monkeypatch.setenv(variable, "100")
    settings.warn_misspelled()
    err = capsys.readouterr().err
    assert err == f"Warning: {variable} is not a setting and is ignored; did you mean {meant}?\n"


@pytest.mark.parametrize("variable", ["CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "HF_HOME", "NCCL_DEBUG",
                                      "TORCH_LOGS", "MASTER_PORT", "LOCAL_WORLD_SIZE", "MAX_STEPS", "PATH",
                                      "HOME", "CI", "SEED"])
def test_settings_and_other_tools_variables_are_never_warned_about(monkeypatch, capsys, variable):
    monkeypatch.setenv(variable, "1")
    settings.warn_misspelled()
    assert capsys.readouterr().err == ""


def test_only_rank_0_warns(monkeypatch, capsys):
    monkeypatch.setenv("MAX_STEP", "100")
    monkeypatch.setenv("RANK", "1")
    settings.warn_misspelled()
    assert capsys.readouterr().err == ""


def test_every_script_warns_before_it_works(monkeypatch, capsys, tmp_path):
    """cli() warns before main() runs: here plot_metrics.py, which then stops on a missing metrics.csv."""
    monkeypatch.setenv("N_LAYERS", "4")
    monkeypatch.setenv("LOG_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        plot_metrics.main()
    assert exit_info.value.code == 1
    warning, error = capsys.readouterr().err.splitlines()
    assert warning == "Warning: N_LAYERS is not a setting and is ignored; did you mean N_LAYER?"
    assert error.startswith("Error: ")


@pytest.mark.parametrize("value, compile_setting, resume", [
    ("yes", "1", "1"), ("Off", "0", ""), ("TRUE", "1", "1"), ("no", "0", ""),
])
def test_on_off_words_go_through_one_parser(monkeypatch, value, compile_setting, resume):
    for name in ("COMPILE", "RESUME", "FORCE"):
        monkeypatch.setenv(name, value)
    config = settings.TrainConfig.from_env()
    assert (config.compile, config.resume, config.force) == (compile_setting, resume, compile_setting == "1")


def test_compile_auto_and_resume_paths_stay_as_they_are(monkeypatch):
    monkeypatch.setenv("COMPILE", "AUTO")
    monkeypatch.setenv("RESUME", "log/model_00099.pt")
    config = settings.TrainConfig.from_env()
    assert (config.compile, config.resume) == ("auto", "log/model_00099.pt")
    monkeypatch.setenv("COMPILE", "maybe")
    with pytest.raises(UserError, match="COMPILE must be 0 or 1, got 'maybe'"):
        settings.TrainConfig.from_env()


@pytest.mark.parametrize("value, offline", [("1", True), ("ON", True), ("yes", True), ("0", False),
                                            ("", False), ("whatever", False)])
def test_hf_hub_offline_takes_whatever_hugging_face_takes(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert settings.HubConfig.from_env().offline is offline  # never an error


def test_read_only_reads_the_fields_named(monkeypatch):
    monkeypatch.setenv("LOG_DIR", "runs/a")
    monkeypatch.setenv("MAX_STEPS", "not a number")  # not read, so not an error
    assert read(settings.TrainConfig, only=["log_dir"]).log_dir == "runs/a"
    assert settings.shared("log_dir") == "runs/a"
    with pytest.raises(UserError, match="MAX_STEPS must be an integer"):
        settings.TrainConfig.from_env()
