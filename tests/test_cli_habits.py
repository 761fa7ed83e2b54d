"""What users type from MAE, timm and torch habit: underscore spellings, -b/-j/--workers, a bare --amp, --pretrained,
typos answered with "did you mean", --version, ``python -m beyond_cls``, a closed pipe, and warnings as one line."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import beyond_cls
from beyond_cls import cli
from beyond_cls.cli import build_parser, main
from beyond_cls.cli_args import MIXED
from tests.test_cli import _command_parsers

ROOT = Path(__file__).resolve().parents[1]


def _fails(argv: list[str], capsys) -> str:
    """The error line of ``main(argv)``, which must exit 2 with that one line (and at most a two-line usage)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) <= 3 and not any("Traceback" in line for line in lines), lines
    assert lines[-1].startswith("beyond-cls"), lines
    return lines[-1]


def _parsed(argv: list[str]) -> dict:
    return {k: v for k, v in vars(build_parser().parse_args(argv)).items() if k != "job"}


# ----------------------------------------------------------------------------------------------- did you mean
@pytest.mark.parametrize("argv,expected", [
    (["probe", "--modle", "m"], "beyond-cls probe: error: unknown flag --modle; did you mean --model?"),
    (["localize", "--boxs", "b"], "beyond-cls localize: error: unknown flag --boxs; did you mean --boxes?"),
    (["bench", "probe", "--baseline-off"], "beyond-cls bench probe: error: unknown flag --baseline-off; did you mean "
                                           "--no-baseline?"),
    (["analyze", "--max-imgs=5"], "beyond-cls analyze: error: unknown flag --max-imgs; did you mean --max-images?"),
    (["analyse"], "beyond-cls: error: unknown command 'analyse'; did you mean analyze?"),
    (["bench", "analize"], "beyond-cls bench: error: unknown command 'analize'; did you mean analyze?"),
])
def test_an_unknown_flag_or_command_is_answered_with_the_closest(argv, expected, capsys):
    assert _fails(argv, capsys).startswith(expected)


def test_a_flag_of_no_likeness_points_to_the_help_and_an_extra_argument_is_named(capsys):
    assert _fails(["zoo", "--xyzzy"], capsys) == "beyond-cls zoo: error: unknown flag --xyzzy; beyond-cls zoo --help " \
                                                "lists the flags"
    assert "unexpected argument 'b'" in _fails(["probe-report", "a", "b"], capsys)


# ----------------------------------------------------------------------------------------------------- aliases
def _value(action) -> list[str]:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    return ["1"]


@pytest.mark.parametrize("name", sorted(_command_parsers()))
def test_every_flag_takes_its_underscore_spelling(name):
    parser = _command_parsers()[name]
    words = name.split()
    for action in parser._actions:
        for option in action.option_strings:
            if "-" not in option[2:] or not option.startswith("--") or option in ("--help",):
                continue
            spelled = "--" + option[2:].replace("-", "_")
            assert _parsed([*words, spelled, *_value(action)]) == _parsed([*words, option, *_value(action)]), spelled


def test_mae_spellings_are_the_same_settings():
    mae = ["probe", "--batch_size", "64", "--accum_iter", "2", "--warmup_epochs", "5", "--blr", "0.1", "--min_lr",
           "0", "--weight_decay=0", "--output_dir", "o", "--data_path", "d"]
    ours = ["probe", "--batch-size", "64", "--accum-iter", "2", "--warmup-epochs", "5", "--blr", "0.1", "--min-lr",
            "0", "--weight-decay=0", "--out", "o", "--data", "d"]
    assert _parsed(mae) == _parsed(ours)
    assert _parsed(mae)["accum_iter"] == 2 and _parsed(mae)["out"] == "o"


@pytest.mark.parametrize("command", [["analyze"], ["probe"], ["aggregations"], ["localize"], ["demo"],
                                     ["bench", "probe"]])
@pytest.mark.parametrize("timm,ours", [
    (["-b", "32", "-j", "3"], ["--batch-size", "32", "--num-workers", "3"]),
    (["-b32", "--workers", "3"], ["--batch-size", "32", "--num-workers", "3"]),
    (["-j3", "--data-dir", "d"], ["--num-workers", "3", "--data", "d"]),
])
def test_timm_spellings_are_the_same_settings(command, timm, ours):
    if "--data" in ours and command == ["demo"]:
        ours, timm = ours[:2], timm[:1]  # demo brings its own data
    assert _parsed([*command, *timm]) == _parsed([*command, *ours])
    assert _parsed([*command, *timm])["batch_size" if "32" in ours else "num_workers"] is not None


@pytest.mark.parametrize("command", [["analyze"], ["probe"], ["demo"], ["bench", "analyze"], ["bench", "probe"]])
def test_a_bare_amp_is_mixed_precision(command):
    assert _parsed([*command, "--amp"])["precision"] == MIXED == "bf16"
    assert _parsed([*command, "--amp", "--no-progress" if command[0] != "bench" else "--steps=2"])["precision"] == MIXED
    assert _parsed([*command, "--amp", "fp16"])["precision"] == "fp16"
    assert _parsed([*command, "--amp=fp32"])["precision"] == "fp32"
    assert _parsed(command)["precision"] is None


def test_aliases_are_mentioned_once_not_listed_as_settings():
    parser = _command_parsers()["probe"]
    text = " ".join(parser.format_help().split())
    assert "Also taken from MAE/timm habit: any flag with _ for - (--batch_size), -b (--batch-size), -j and " \
           "--workers (--num-workers), --output_dir (--out), --data_path and --data-dir (--data), a bare --amp " \
           "(--precision bf16)." in text
    assert not re.search(r"^\s+(-b|-j|--workers|--batch_size|--output_dir)\b", parser.format_help(), re.M)
    zoo = " ".join(_command_parsers()["zoo"].format_help().split())
    assert "-b (" not in zoo and "--amp" not in zoo


@pytest.mark.parametrize("argv,needed", [
    (["analyze", "--pretrained"], "nothing is downloaded here; give the encoder weights with --checkpoint FILE"),
    (["probe", "--model", "m", "--pretrained"], "--checkpoint FILE"),
    (["probe", "--finetune", "mae.pth"], "here that is --checkpoint FILE"),
    (["probe", "--global_pool"], "--heads mean"),
    (["probe", "--global-pool"], "--heads mean"),
    (["bench", "analyze", "--amp-dtype", "bfloat16"], "--precision bf16 or fp16"),
])
def test_flags_that_mean_something_else_here_are_answered(argv, needed, capsys):
    line = _fails(argv, capsys)
    assert line.startswith(f"beyond-cls {' '.join(argv[:2] if argv[0] == 'bench' else argv[:1])}: error: ")
    assert needed in line


def test_pretrained_where_no_checkpoint_is_taken_is_an_unknown_flag(capsys):
    assert "unknown flag --pretrained" in _fails(["zoo", "--pretrained"], capsys)


# ----------------------------------------------------------------------------------------- identity and citing
def test_version_names_the_package_torch_triton_and_the_extension(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"beyond-cls {beyond_cls.__version__} (Python ")
    import torch

    assert lines[1].startswith(f"torch {torch.__version__} (")
    assert re.search(r"triton (\d+\.\d+|not installed)", lines[1]) and "C++ extension " in lines[1]


def test_help_links_the_paper_and_the_readme_cites_it_the_same_way(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "https://arxiv.org/abs/2412.03215" in out and cli.CITATION in out  # verbatim: copyable BibTeX
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bibtex\n(.*?)```", readme, re.S)
    assert block and block.group(1).strip() == cli.CITATION
    assert "arxiv.org/abs/2412.03215" in readme and "pip install --no-build-isolation ." in readme


def test_subpackages_are_reachable_and_the_lazy_ones_are_not_imported_by_the_package():
    found = {p.parent.name for p in (ROOT / "beyond_cls").glob("*/__init__.py")}
    assert found | {"optim", "reference"} == set(beyond_cls.SUBPACKAGES)
    for name in beyond_cls.SUBPACKAGES:
        assert getattr(beyond_cls, name) is importlib.import_module(f"beyond_cls.{name}"), name
        assert name in dir(beyond_cls) and name in beyond_cls.__all__
    with pytest.raises(AttributeError, match="no attribute 'probes'"):
        beyond_cls.probes  # noqa: B018
    tree = ast.parse((ROOT / "beyond_cls" / "__init__.py").read_text(encoding="utf-8"))
    eager = {a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "beyond_cls" for a in n.names}
    eager |= {n.module.split(".")[1] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module
              and n.module.startswith("beyond_cls.")}
    assert {"probe", "localization", "kernels"}.isdisjoint(eager)  # heavy or optional: loaded on first use


def test_python_m_beyond_cls_help_and_a_closed_pipe(tmp_path):
    env = {**os.environ, "BEYOND_CLS_WEIGHTS": str(tmp_path)}
    cmd, pipes = [sys.executable, "-m", "beyond_cls"], {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    # both at once (each is mostly imports, one core each); `zoo | head -1`: the reader is gone before zoo writes
    helped = subprocess.Popen([*cmd, "--help"], text=True, env=env, **pipes)
    piped = subprocess.Popen([*cmd, "zoo"], text=True, env=env, **pipes)
    piped.stdout.close()
    out, err = helped.communicate(timeout=120)
    assert helped.returncode == 0 and err == "", err
    assert out.startswith("usage: beyond-cls") and "probe-report" in out and "arxiv.org/abs/2412.03215" in out
    err = piped.communicate(timeout=120)[1]
    assert err == "" and piped.returncode == 141  # as a tool killed by SIGPIPE: no traceback, no error line


def test_a_broken_pipe_in_process_returns_quietly(tmp_path, monkeypatch, capsys):
    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli.COMMANDS, "zoo", dataclasses.replace(cli.COMMANDS["zoo"], run=lambda cfg: print("row")))
    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["zoo", "--weights-dir", str(tmp_path)]) == 141
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------- warnings
def test_warnings_reach_the_console_as_one_line_and_harmless_ones_not_at_all(monkeypatch, capsys):
    site = Path(sys.prefix) / "lib" / "site-packages"
    loader = str(site / "torch" / "utils" / "data" / "dataloader.py")
    too_many = ("This DataLoader will create 6 worker processes in total. Our suggested max number of worker in "
                "current system is 2, which is smaller than what this DataLoader is going to create. Please be aware")

    def job(cfg):
        for module, filename, text in [
            ("PIL.Image", "Image.py", "Palette images with Transparency expressed in bytes should be converted to "
                                      "RGBA images"),
            ("PIL.TiffImagePlugin", "TiffImagePlugin.py", "Possibly corrupt EXIF data.  Expecting to read 8 bytes"),
            ("torch.utils.data.dataloader", loader, too_many),
            ("torch.utils.data.dataloader", loader, too_many),  # a second loader: told once
            ("timm.layers", str(site / "timm" / "layers" / "x.py"), "something\n  changed"),
        ]:
            warnings.warn_explicit(text, UserWarning, filename, 1, module=module)
        warnings.warn("checkpoint 'w.pth': the file looks like checkpoint_format 'timm'", UserWarning, stacklevel=1)

    monkeypatch.setitem(cli.COMMANDS, "zoo", dataclasses.replace(cli.COMMANDS["zoo"], run=job))
    shown_before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert main(["zoo"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "beyond-cls zoo: note: --num-workers 6 is more than the 2 CPUs this process may use: loading may slow down "
        "or freeze (give --num-workers 2 or fewer)",
        "beyond-cls zoo: note: something changed (timm UserWarning)",
        "beyond-cls zoo: note: checkpoint 'w.pth': the file looks like checkpoint_format 'timm'",
    ]
    assert warnings.showwarning is shown_before  # restored after the command
