"""The command line documents itself (every argument has help; --version) and says things once."""

from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretune.cli import _parser, _plain_library_logs, main


def help_of(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"pretune {version('pretune')}"


def test_every_argument_of_every_command_has_help():
    parser = _parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    undocumented = [f"{name} {action.dest}" for name, sub in commands.items() for action in sub._actions
                    if action.dest != "help" and not action.help]
    assert not undocumented, undocumented


def test_predict_help_names_text_image_and_vector_inputs(capsys):
    text = " ".join(help_of(capsys, "predict").split())
    for word in (".txt", ".jsonl", ".csv", "image", "folder of images", "vector", ".npy", "--column", "--batch-size"):
        assert word in text, word


def test_compare_and_search_have_their_own_help(capsys):
    compare, search = help_of(capsys, "compare"), help_of(capsys, "search")
    assert "budgets" in compare and "scratch" in compare and "Optuna" not in compare
    assert "Optuna" in search and "trials" in search and "budgets" not in search
    assert "run directory" in help_of(capsys, "report")
    assert "--run-dir" in (demo := help_of(capsys, "demo")) and "reports go" in " ".join(demo.split())


@pytest.mark.parametrize("rank, times", [("0", 1), ("1", 0)])
def test_model_saved_is_printed_once_per_job(monkeypatch, capsys, tmp_path, rank, times):
    import pretune.run

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(pretune.run, "train", lambda *args, **kwargs: SimpleNamespace(model_dir=Path(tmp_path) / "model"))
    assert main(["pretrain", "recipes/text-mlm.yaml", f"run_dir={tmp_path}"]) == 0
    out = capsys.readouterr()
    assert (out.out + out.err).count("model saved to") == times


def test_transformers_colour_codes_are_stripped_when_stderr_is_not_a_terminal(monkeypatch):
    import io
    import logging

    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    _plain_library_logs()
    _plain_library_logs()  # idempotent
    handlers = logging.getLogger("transformers").handlers  # transformers' own stderr handler
    assert handlers and all(sum(type(f).__name__ == "_StripColour" for f in h.filters) == 1 for h in handlers)
    record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1,
                               "\x1b[1m%s LOAD REPORT\x1b[0m from: x\n\x1b[31mMISSING\x1b[0m", ("BertModel",), None)
    assert all(h.filter(record) for h in handlers)
    assert record.getMessage() == "BertModel LOAD REPORT from: x\nMISSING"


def test_export_and_serve_without_their_extras_say_how_to_install_in_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    from pretune.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnxruntime", "fastapi") else real(name, *a))
    assert main(["export", str(tmp_path)]) == 2
    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "Traceback" not in "".join(err)
    assert err[0].endswith("pretune export needs onnxruntime, not installed: pip install 'pretune[export]'")
    assert err[1].endswith("pretune serve needs fastapi, not installed: pip install 'pretune[serve]'")
