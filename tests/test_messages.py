"""Library messages name API keywords (`lr`, `overwrite=True`); the CLI renders them as its flags (--lr,
--overwrite): fishseg.errors.render_flags with the table fishseg.cli.option_flags reads from the commands."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from fishseg.cli import main, option_flags
from fishseg.config import TrainConfig
from fishseg.errors import KEYWORD, FishsegError, Flag, render_flags
from fishseg.features.extract import run_extraction
from fishseg.training.train import run_training
from tests.helpers import tiny_extract_config

PACKAGE = Path(__file__).resolve().parents[1] / "fishseg"
ARGV_ELEMENT = re.compile(r"--[a-z][a-z0-9-]*")  # a string that is one flag: part of a command line fishseg builds
ALLOWED = {  # (file, flag) of a message that names a command line's flag on purpose, and why
    ("distributed.py", "--nproc-per-node"): "torchrun's own option: the user types it in a shell, not in fishseg",
    ("bench/bench.py", "--processes"): "a row of the table only `fishseg bench` prints",
}


def _strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in ``path``, f-string parts included, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def _library_strings() -> list[tuple[str, int, str]]:
    return [(path.relative_to(PACKAGE).as_posix(), line, text) for path in sorted(PACKAGE.rglob("*.py"))
            if path.name != "cli.py" for line, text in _strings(path)]


def test_no_library_message_names_a_flag() -> None:
    offending = [f"{name}:{line}: {text!r}" for name, line, text in _library_strings()
                 if not ARGV_ELEMENT.fullmatch(text)
                 for flag in re.findall(r"--[a-z][a-z0-9-]*", text) if (name, flag) not in ALLOWED]
    assert not offending, "\n".join(offending)
    found = {(name, flag) for name, _, text in _library_strings() for flag in re.findall(r"--[a-z][a-z0-9-]*", text)}
    assert set(ALLOWED) <= found  # an allowance nothing needs any more is removed


API_ONLY = {"`config`", "`confirm`"}  # keywords of fishseg.api alone: the CLI never passes them wrongly


def test_every_keyword_a_library_message_names_has_a_flag() -> None:
    flags = option_flags()
    named = [(name, line, match.group(0)) for name, line, text in _library_strings()
             for match in KEYWORD.finditer(text) if match.group(0) not in API_ONLY]
    assert {keyword for *_, keyword in named} >= {"`lr`", "`overwrite=True`", "`resume=True`", "`skip_bad=True`"}
    unrenderable = [f"{name}:{line}: {keyword}" for name, line, keyword in named
                    if render_flags(keyword, flags) == keyword]
    assert not unrenderable, unrenderable


def test_option_flags_come_from_the_commands_with_the_api_keywords() -> None:
    flags = option_flags()
    assert flags["lr"] == Flag("--lr") and flags["overwrite"] == Flag("--overwrite")
    assert flags["folds"] == Flag("--cv") and flags["compiled"] == Flag("--compile")
    assert flags["grid_file"] == Flag("--grid") and flags["stream"] == Flag("--stream", "--in-memory")
    assert flags["cache"] == Flag("--cache") and flags["run"] == Flag("--run") and flags["json"] == Flag("--json")
    assert flags["data_root"] == Flag("--data-root") and flags["skip_bad"] == Flag("--skip-bad")
    assert not {"cache_path", "run_dir", "json_path"} & set(flags)


FLAGS = {"lr": Flag("--lr"), "overwrite": Flag("--overwrite"), "stream": Flag("--stream", "--in-memory"),
         "resume": Flag("--resume"), "folds": Flag("--cv"), "layers": Flag("--layers"),
         "device": Flag("--device"), "group_pattern": Flag("--group-pattern"), "views": Flag("--views")}


@pytest.mark.parametrize("message, rendered", [
    ("lower `lr`", "lower --lr"),
    ("pass `overwrite=True` to replace it", "pass --overwrite to replace it"),
    ("`stream=True` reads the file", "--stream reads the file"),
    ("`stream=False` holds it in memory", "--in-memory holds it in memory"),
    ("`resume=False`: no negative flag", "`resume=False`: no negative flag"),
    ("use `folds=5` or fewer", "use --cv 5 or fewer"),
    ("`lr=0.0003`: too high", "--lr 0.0003: too high"),
    ("use `device='cpu'`", "use --device cpu"),
    ('use `device="cpu"`', "use --device cpu"),
    ("`group_pattern='(x'`: not a regex", "--group-pattern '(x': not a regex"),
    ("`group_pattern='a b'`: no match", "--group-pattern 'a b': no match"),
    ("extract with `layers=(6, 9, 12)`", "extract with --layers 6,9,12"),
    ("extract with `layers=(12,)`", "extract with --layers 12"),
    ("e.g. `views=('hflip', 'rot90')`", "e.g. --views hflip,rot90"),
    ("`out`, `seed` unknown, `fishseg compare`, `hf auth login`",
     "`out`, `seed` unknown, `fishseg compare`, `hf auth login`"),
    ("`resume=True` and `overwrite=True` exclude each other", "--resume and --overwrite exclude each other"),
])
def test_render_flags(message: str, rendered: str) -> None:
    assert render_flags(message, FLAGS) == rendered


def test_a_flag_starts_with_two_dashes() -> None:
    with pytest.raises(ValueError, match="'-o': a flag starts with --"):
        Flag("-o")


def test_a_refusal_names_flags_on_the_command_line_and_keywords_in_python(tmp_path: Path, tiny_backbone: Path,
                                                                          kaggle_root: Path, tiny_cache: Path,
                                                                          tiny_run: Path) -> None:
    out = tmp_path / "notes.h5"
    out.write_text("my notes")
    result = CliRunner().invoke(main, ["extract", "--data-root", str(kaggle_root), "--out", str(out), "--backbone",
                                       str(tiny_backbone), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.endswith("choose another --out, or pass --overwrite to replace it\n")
    with pytest.raises(FishsegError, match=r"choose another `out`, or pass `overwrite=True` to replace it$"):
        run_extraction(kaggle_root, out, tiny_extract_config(tiny_backbone), device="cpu")

    with pytest.raises(FishsegError, match=r"pass `resume=True` to continue it or `overwrite=True` to replace it$"):
        run_training(tiny_cache, tiny_run, TrainConfig(epochs=1, batch_size=4), device="cpu")
    result = CliRunner().invoke(main, ["train", "--cache", str(tiny_cache), "--out", str(tiny_run), "--epochs", "1",
                                       "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 2 and result.output.endswith("pass --resume to continue it or --overwrite to replace "
                                                            "it\n")
    assert "`" not in result.output
