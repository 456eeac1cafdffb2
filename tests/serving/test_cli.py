"""`latentmas serve`: help, and one-line errors with a non-zero exit for bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serving


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from latentmas.cli import main; main()", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_serve_help_and_config_errors(tmp_path: Path) -> None:
    shown = _serve("--help")
    assert shown.returncode == 0 and "--config" in shown.stdout
    assert "follows registry.json for new versions" in " ".join(shown.stdout.split())
    missing = _serve("--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().splitlines()[-1]
        == f"latentmas serve: error: --config {tmp_path / 'nope.yaml'}: no such file"
    )
    partial = tmp_path / "serve.yaml"
    partial.write_text("stack: demo\n")
    wrong = _serve("--config", str(partial))
    assert wrong.returncode == 1 and "expected a mapping with 'stack' and 'spec'" in wrong.stderr
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("stack: demo\nspec: {experts: []}\n")
    refused = _serve("--config", str(invalid))
    assert refused.returncode == 1 and "latentmas serve: error:" in refused.stderr and "experts" in refused.stderr
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("stack: demo\nspec: {experts: [a\n")
    unparsed = _serve("--config", str(malformed))
    assert unparsed.returncode == 1
    line = unparsed.stderr.strip().splitlines()[-1]
    assert line.startswith(f"latentmas serve: error: --config {malformed}: invalid YAML at line 3, column 1: ")
    listed = tmp_path / "listed.json"
    listed.write_text('{"stack": "demo", "spec": [1]}')
    not_mapping = _serve("--config", str(listed))
    assert not_mapping.returncode == 1
    assert not_mapping.stderr.strip().splitlines()[-1] == (
        f"latentmas serve: error: --config {listed}: spec: Input should be a valid dictionary or instance of "
        "LatentMASStackSpec"
    )
    valid = tmp_path / "valid.yaml"
    valid.write_text("stack: demo\nspec: {experts: [{name: a, domain: a}]}\n")
    unknown = _serve("--config", str(valid), "--device", "tpu")
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines()[-1] == (
        "latentmas serve: error: --device tpu: unknown device; use auto, cpu, cuda or cuda:N"
    )


def test_a_cuda_device_this_machine_lacks_is_refused_at_start() -> None:
    import torch
    from latentmas.services.servecli import device_problem

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert device_problem("cpu") is None and device_problem("auto") is None
    assert device_problem("cuda:x") == device_problem("gpu") == "unknown device; use auto, cpu, cuda or cuda:N"
    if count == 0:
        assert device_problem("cuda") == "torch sees no CUDA device on this machine; use cpu or auto"
    else:
        assert device_problem("cuda") is None
        assert device_problem(f"cuda:{count}") == f"this machine has {count} CUDA device(s), numbered from 0"


def test_engine_knobs_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefill chunk and the decode compiler are process knobs (env), checked with one-line errors."""
    import torch
    from latentmas.services.engine import decode_compiler
    from latentmas.services.settings import ServeSettings
    from latentmas.spec import StorageSpec

    def settings() -> ServeSettings:
        return ServeSettings(namespace="n", stack="s", storage=StorageSpec(endpoint="file:///tmp/x"))

    monkeypatch.delenv("LATENTMAS_PREFILL_CHUNK_TOKENS", raising=False)
    monkeypatch.delenv("LATENTMAS_COMPILE_DECODE", raising=False)
    assert (settings().prefill_chunk_tokens, settings().compile_decode) == (512, "auto")
    monkeypatch.setenv("LATENTMAS_PREFILL_CHUNK_TOKENS", "64")
    monkeypatch.setenv("LATENTMAS_COMPILE_DECODE", "off")
    assert (settings().prefill_chunk_tokens, settings().compile_decode) == (64, "off")
    assert decode_compiler(settings().compile_decode, torch.device("cuda")) is None
    for bad in ("0", "12k", "-3"):
        monkeypatch.setenv("LATENTMAS_PREFILL_CHUNK_TOKENS", bad)
        with pytest.raises(ValueError, match=f"^LATENTMAS_PREFILL_CHUNK_TOKENS: '{bad}' is not a positive whole"):
            settings()
