"""The engine, the planner and the exporters read what a model says of itself
(models/description.py) and never name a model class or one of its attributes: renaming a
GPT attribute is then a change to models/ alone (issue 28). Docstrings and comments aside."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "bigmodel_cli"
READERS = ("engine", "plan", "export")
#: attribute names only bigmodel's own models use (generic words such as `head` or `blocks`
#: also name the descriptions' fields, and are left out)
MODEL_ATTRIBUTES = {"tok_emb", "pos_emb", "lm_head", "ln_f", "cls_token", "ln_1", "ln_2", "c_attn"}


def model_classes():
    """The nn.Module classes of models/ (not the descriptions the engine is meant to read)."""
    names = set()
    for path in (PACKAGE / "models").glob("*.py"):
        names |= {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
                  and any("Module" in ast.unparse(base) for base in node.bases)}
    return names


def docstrings(tree):
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def mentions(path: Path, classes):
    """(line, what) for each place the module's code names a model class or attribute."""
    tree = ast.parse(path.read_text())
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in MODEL_ATTRIBUTES | classes:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in classes:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            words = set(node.value.replace(".", " ").replace("_target_=", " ").split())
            named = words & MODEL_ATTRIBUTES or ({node.value} if node.value.startswith("bigmodel_cli.models.") else set())
            found += [(node.lineno, word) for word in sorted(named)]
    return found


def test_the_check_sees_a_model_named(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text('"""GPT\'s tok_emb, in a docstring: fine."""\nx = model.tok_emb\ny = GPT(3)\n'
                    'z = "bigmodel_cli.models.gpt.GPT"\n')
    assert sorted(what for _, what in mentions(path, {"GPT"})) == ["GPT", "bigmodel_cli.models.gpt.GPT", "tok_emb"]


def test_the_engine_planner_and_exporters_name_no_model():
    classes = model_classes()
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
             for folder in READERS for path in sorted((PACKAGE / folder).rglob("*.py"))
             for line, what in mentions(path, classes)]
    assert not found, "\n".join(found)


# ------------------------------------------------------------------ one builder

#: the commands that need a model, data or a Trainer: each gets them from build/
BUILDING_COMMANDS = ("train", "eval", "generate", "explain", "compress", "export", "lr_find", "plan")
#: calls that make what a run or an inference is made of: in build/ only (the Trainer's own
#: module defines it; the stored config of a checkpoint is vetted where it is opened)
BUILDER_CALLS = {"Trainer", "instantiate", "FakeTensorMode", "vetted_config", "Telemetry"}


def builder_calls(path: Path):
    tree = ast.parse(path.read_text())
    return [(node.lineno, name) for node in ast.walk(tree) if isinstance(node, ast.Call)
            for name in [node.func.id if isinstance(node.func, ast.Name) else
                         node.func.attr if isinstance(node.func, ast.Attribute) else None]
            if name in BUILDER_CALLS]


def test_the_builder_check_sees_a_trainer_built_by_hand(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("t = Trainer(parts, settings, context)\nm = hydra.utils.instantiate(cfg)\nx = Trainers()\n")
    assert builder_calls(path) == [(1, "Trainer"), (2, "instantiate")]


def test_only_the_builder_makes_what_a_run_is_made_of():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {name}(...)"
             for path in sorted(PACKAGE.rglob("*.py")) if "build" not in path.relative_to(PACKAGE).parts[:1]
             for line, name in builder_calls(path)]
    assert not found, "outside bigmodel_cli/build/:\n" + "\n".join(found)


def test_every_command_that_needs_a_model_reaches_the_builder():
    from test_import_graph import import_graph

    graph = import_graph()
    for command in BUILDING_COMMANDS:
        seen, todo = set(), [f"bigmodel_cli.commands.{command}"]
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        assert any(m.startswith("bigmodel_cli.build.") for m in seen), f"{command} builds outside bigmodel_cli/build/"


# ------------------------------------------------------------------ commands declared once


def command_name_tables(path: Path, names) -> list:
    """(line, names) of each literal dict, tuple, list or set in the module that holds three
    or more command names: a second table of the commands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
        held = {item.value for item in items if isinstance(item, ast.Constant) and item.value in names}
        if len(held) >= 3:
            found.append((node.lineno, sorted(held)))
    return found


def test_the_table_check_sees_a_second_table(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text('SCHEMAS = {"eval": 1, "export": 2, "explain": 3}\nok = ("eval", "x")\n')
    assert command_name_tables(path, {"eval", "export", "explain"}) == [(1, ["eval", "explain", "export"])]


def test_every_command_is_declared_once_in_the_command_table():
    """cli, preflight, --help and the key check derive what they know of a command from
    command_table.py and the command's own module; no other module lists the commands."""
    from bigmodel_cli.command_table import COMMANDS, config_name
    from bigmodel_cli.config_keys import command_keys, command_module

    conf = PACKAGE.parent / "conf"
    for name, command in COMMANDS.items():
        module = command_module(name)
        assert callable(getattr(module, "main", None)), f"{command.module} has no main"
        if command.hydra:
            text = (conf / f"{config_name(name)}.yaml").read_text()
            assert command_keys(name), name
            if getattr(module, "SCHEMA", None) is not None:
                assert f"{config_name(name)}_schema" in text, f"conf/{config_name(name)}.yaml does not start from its schema"
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {held}" for path in sorted(PACKAGE.rglob("*.py"))
             if path.name != "command_table.py" for line, held in command_name_tables(path, set(COMMANDS))]
    assert not found, "a second table of the commands (declare a command in command_table.py only):\n" + "\n".join(found)
