"""One definition per stage (pipeline.config): the CLI flags, the YAML keys and the README's flag
tables all come from it, and the library never reaches up into the recipes or the CLI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import config as C
from pipeline.cli import cli
from pipeline.errors import KDError

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"teacher": C.TeacherConfig, "train": C.TrainConfig, "eval": C.EvalConfig, "tune": C.TuneConfig}


def _readme_tables() -> dict[str, list[list[str]]]:
    """The rows (cells) of the flag table in each `### `kd STAGE`` section of the README."""
    tables, stage = {}, None
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("### "):
            m = re.match(r"### `kd (\w+)`", line)
            stage = m.group(1) if m and m.group(1) in SECTIONS else None
        elif stage and line.startswith("| `--"):
            tables.setdefault(stage, []).append([c.strip() for c in line.strip("|").split("|")])
    return tables


@pytest.mark.parametrize("stage", SECTIONS)
def test_readme_flag_table_lists_exactly_the_config_flags(stage):
    rows = _readme_tables()[stage]
    documented = {f for cells in rows for f in re.findall(r"--[a-z][a-z-]*", cells[0])} - {"--config"}
    flags = {C.flag_name(f) for f in C.flags(SECTIONS[stage])}
    flags |= {f.metadata["secondary"] for f in C.flags(SECTIONS[stage]) if f.metadata.get("secondary")}
    assert documented == flags, f"README lacks {sorted(flags - documented)}, names unknown {sorted(documented - flags)}"


@pytest.mark.parametrize("stage", SECTIONS)
def test_readme_defaults_of_single_flag_rows_match(stage):
    fields = {C.flag_name(f): f for f in C.flags(SECTIONS[stage])}
    checked = 0
    for cells in _readme_tables()[stage]:
        names = re.findall(r"--[a-z][a-z-]*", cells[0])
        literal = re.fullmatch(r"`?([\w.+-]+)`?", cells[1])
        if len(names) != 1 or not literal or names[0] not in fields or literal.group(1) in ("required", "all", "on"):
            continue
        default = fields[names[0]].default
        want = literal.group(1)
        if want == "none":
            assert default is None, names[0]
        else:
            assert str(default) == want or (isinstance(default, float) and float(want) == default), (names[0], want, default)
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("stage", SECTIONS)
def test_cli_options_are_generated_from_the_config(stage):
    params = {p.name: p for p in cli.commands[stage].params}
    for f in C.flags(SECTIONS[stage]):
        p = params[f.name]
        assert p.required == bool(f.metadata.get("required")), f.name
        if not p.required:
            assert p.default == f.default, f.name
    assert {n for n in params if n != "config"} == {f.name for f in C.flags(SECTIONS[stage])}


def test_yaml_config_keys_are_checked_and_normalised(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("top-k: 4\ntempreature: 2\n")
    r = CliRunner().invoke(cli, ["teacher", "--config", str(bad), "--model", "m", "--data", "d", "--task-type", "causal-lm"])
    assert r.exit_code != 0 and "unknown key 'tempreature'" in r.output
    assert C.normalize_keys({"max-length": 3, "top_k": 2}, "x") == {"max_length": 3, "top_k": 2}
    with pytest.raises(KDError, match="x must be a mapping"):
        C.normalize_keys([1, 2], "x")
    with pytest.raises(KDError, match=r"missing --model, --data, --task-type"):
        C.build(C.TeacherConfig, {}, "targets")


def test_result_settings_leave_out_what_does_not_change_the_result():
    cfg = C.TrainConfig(out="a", save_every=3, lr=0.1)
    settings = C.result_settings(cfg)
    assert "lr" in settings and not {"out", "save_every", "progress", "sweep", "task_index", "eval_targets"} & set(settings)


def _imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return mods


def test_library_never_imports_the_recipes_or_the_cli():
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        if path.name == "cli.py":
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] == "stages" or m in ("pipeline.cli", "pipeline.cli.cli")}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_no_import_cycles_among_library_modules():
    graph = {}
    for path in (ROOT / "pipeline").glob("*.py"):
        deps = {m.split(".")[1] for m in _imports(path) if m.startswith("pipeline.") and len(m.split(".")) > 1}
        graph[path.stem] = {d for d in deps if (ROOT / "pipeline" / f"{d}.py").exists()} - {path.stem}
    for node in graph:  # a module can never reach itself
        seen, todo = set(), list(graph[node])
        while todo:
            n = todo.pop()
            assert n != node, f"import cycle through pipeline.{node}"
            if n not in seen:
                seen.add(n)
                todo += graph.get(n, [])
