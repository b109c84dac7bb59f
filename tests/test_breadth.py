"""Issue 10: no traceback on any input, and each defect found on real architectures, with its test."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from builder.build import build
from builder.cli import app
from builder.errors import RunError
from builder.manifest import read_manifest

FACTORIES = '''
import torch


class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 1:  # the example run at load time works; the references then hit a bug
            return self.lin(x).no_such_method()
        return self.lin(x)


def broken():
    torch.manual_seed(0)
    return Broken(), {"x": torch.randn(2, 4)}


class Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        logits = self.lin(x)
        return logits, logits.argmax(-1)


def small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()), {"x": torch.randn(2, 4)}


def with_argmax():
    torch.manual_seed(0)
    return Counter(), {"x": torch.randn(2, 4)}
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    folder = tmp_path_factory.mktemp("factories")
    (folder / "tb_breadth_factories.py").write_text(FACTORIES)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.fixture()
def logs(tmp_path, monkeypatch):
    folder = tmp_path / "logs"
    monkeypatch.setenv("TRITON_BUILDER_LOGS", str(folder))
    return folder


def model(name: str, factory: str, variants: str = "[{format: torch, precision: fp32}]") -> str:
    return f"""
  - name: {name}
    task: feature-extraction
    source: {{factory: "tb_breadth_factories:{factory}"}}
    variants: {variants}
"""


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_an_unexpected_exception_is_one_line_with_a_log_and_keep_going_goes_on(factories, logs, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("bad", "broken") + model("good", "small"))
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / "repo"), "--keep-going", "--no-cache"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert line.startswith("error: models[bad]: reference: AttributeError: 'Tensor' object has no attribute "
                           "'no_such_method' (unexpected; full traceback: ")
    log = Path(line.split("full traceback: ")[1].rstrip(")"))
    assert log.parent == logs and "Traceback (most recent call last)" in log.read_text()
    assert sorted(read_manifest(tmp_path / "repo")["models"]) == ["good_torch_fp32"]


def test_without_keep_going_the_unexpected_exception_stops_the_build_in_one_line(factories, logs, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("bad", "broken") + model("good", "small"))
    result = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / "repo"), "--no-cache"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert error_lines(result.output)[0].startswith("error: models[bad]: reference: AttributeError")
    assert not (tmp_path / "repo" / "good_torch_fp32").exists()


def test_an_unexpected_exception_in_one_variant_fails_that_variant_only(factories, logs, tmp_path, monkeypatch):
    from builder.convert import torch2exported

    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(torch2exported, "export", bug)
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:" + model("m", "small", "[{format: torch, precision: fp32}, {format: onnx, precision: fp32}]"))
    result = build(spec, tmp_path / "repo", keep_going=True, cache=False)
    status = {r.triton_name: (r.status, r.step) for r in result.results}
    assert status == {"m_torch_fp32": ("error", "export"), "m_onnx_fp32": ("passed", "verify")}
    assert result.failed[0].describe().startswith("models[m].variants[torch_fp32]: export: KeyError: 'oops' (unexpected")


def test_the_command_line_turns_any_exception_into_one_line(logs, tmp_path, monkeypatch, capsys):
    from builder import cli, validate

    def bug(repo):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(validate, "validate_repository", bug)
    monkeypatch.setattr(sys, "argv", ["triton-builder", "validate", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: validate: ZeroDivisionError: division by zero (unexpected; full traceback: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert len(list(logs.iterdir())) == 1
