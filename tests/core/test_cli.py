"""`latentmas …` failures a new user meets first: each exits non-zero with one line naming the file, field or
problem (no bare parser context, no stray quotes, no empty field name), and a closed stdout ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from latentmas.cli import main
from latentmas.registry import ArtifactEntry, Registry, save_registry
from latentmas.spec import LatentMASStackSpec
from latentmas.stage import StageConfig
from latentmas.store import LocalStore

# An unclosed flow sequence at line 4: the parser notices at the end of the stream (line 5).
MALFORMED_YAML = "kind: LatentMASStack\nmetadata: {name: s}\nspec:\n  experts: [a, b\n"


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a command that must exit 1."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error line"
    return lines[-1]


def _stage_config(tmp_path: Path) -> Path:
    spec = LatentMASStackSpec.model_validate(
        {"storage": {"endpoint": f"file://{tmp_path / 'store'}"}, "experts": [{"name": "a", "domain": "a"}]}
    )
    path = tmp_path / "config.json"
    path.write_text(StageConfig(stack="demo", cycle_id="c1", spec=spec).model_dump_json(by_alias=True))
    return path


def test_malformed_yaml_and_json_name_the_file_line_and_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text(MALFORMED_YAML)
    expected = (
        f"{malformed}: invalid YAML at line 5, column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence from line 4)"
    )
    assert _fails(["cycle", "run", "--local", "-f", str(malformed)], capsys) == f"latentmas cycle: error: {expected}"
    demo = ["demo", "--stack", str(malformed), "--workdir", str(tmp_path / "demo")]
    assert _fails(demo, capsys) == f"latentmas demo: error: {expected}"
    assert _fails(["stage", "run", "clean", "--config", str(malformed)], capsys) == (
        f"latentmas stage: error: --config {expected}"
    )
    bad_json = tmp_path / "c.json"
    bad_json.write_text('{"stack": "demo",\n  cycleId: "c1"}\n')
    assert _fails(["stage", "run", "clean", "--config", str(bad_json)], capsys) == (
        f"latentmas stage: error: --config {bad_json}: invalid JSON at line 2, column 3: "
        "Expecting property name enclosed in double quotes"
    )
    stack = Path(__file__).resolve().parents[2] / "core" / "demo-stack-tiny.yaml"
    report = ["report", "-f", str(stack), "--cycle-id", "c1", "--citations", str(bad_json), "--store", str(tmp_path)]
    assert _fails([*report, "-o", str(tmp_path / "report.md")], capsys) == (
        f"latentmas report: error: --citations {bad_json}: invalid JSON at line 2, column 3: "
        "Expecting property name enclosed in double quotes"
    )
    assert not (tmp_path / "report.md").exists()
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(b"stack: d\xe9mo\n")
    assert _fails(["stage", "run", "clean", "--config", str(not_utf8)], capsys) == (
        f"latentmas stage: error: --config {not_utf8}: not UTF-8 text (byte 8: invalid continuation byte)"
    )


def test_a_document_that_is_not_a_mapping_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = tmp_path / "c3.yaml"
    listing.write_text("- a\n- b\n")
    line = _fails(["stage", "run", "clean", "--config", str(listing)], capsys)
    assert line == (
        f"latentmas stage: error: --config {listing}: the document: "
        "Input should be a valid dictionary or instance of StageConfig"
    )


def test_unknown_stage_has_no_stray_quotes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _fails(["stage", "run", "nosuchstage", "--config", str(_stage_config(tmp_path))], capsys)
    assert line.startswith("latentmas stage: error: unknown stage 'nosuchstage'; known: "), line
    assert line.endswith("train"), line


def test_registry_of_an_unknown_stack_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStore(tmp_path)
    store.ensure_bucket("artifacts")
    endpoint = ["--endpoint", f"file://{tmp_path}"]
    no_registry = (
        "latentmas registry: error: no registry exists at artifacts/default/nosuchstack/registry.json "
        "(wrong --stack/--namespace, or nothing promoted yet)"
    )
    assert _fails(["registry", "show", "--stack", "nosuchstack", *endpoint], capsys) == no_registry
    assert _fails(["registry", "rollback", "med", "--stack", "nosuchstack", *endpoint], capsys) == no_registry
    save_registry(store, "artifacts", "default", "demo", Registry(experts={"med": ArtifactEntry()}))
    with pytest.raises(SystemExit) as exit_info:
        main(["registry", "show", "--stack", "demo", *endpoint])
    assert exit_info.value.code == 0 and '"med"' in capsys.readouterr().out
    assert _fails(["registry", "rollback", "nosuch", "--stack", "demo", *endpoint], capsys) == (
        "latentmas registry: error: expert 'nosuch' is not in the registry (known: med)"
    )


def test_closed_stdout_ends_quietly() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written, as after `| head -0`
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from latentmas.cli import main; main()", "stage", "list"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode in (0, 141) and done.stderr == "", (done.returncode, done.stderr)


def test_missing_kubeconfig_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nonexistent"
    assert _fails(["trigger", "s", "--kubeconfig", str(missing)], capsys) == (
        f"latentmas trigger: error: --kubeconfig {missing}: no such file"
    )
    assert _fails(["operator", "run", "--kubeconfig", str(missing)], capsys) == (
        f"latentmas operator: error: --kubeconfig {missing}: no such file"
    )
    monkeypatch.setenv("KUBECONFIG", str(missing))
    assert _fails(["trigger", "s"], capsys) == f"latentmas trigger: error: $KUBECONFIG {missing}: no such file"
    empty = tmp_path / "empty"
    empty.write_text("")
    line = _fails(["trigger", "s", "--kubeconfig", str(empty)], capsys)
    assert line.startswith(f"latentmas trigger: error: --kubeconfig {empty}: Invalid kube-config"), line
