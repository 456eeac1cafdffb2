"""Expert names the API and status reserve, and duplicate names or domains, are refused by the local
spec loader with one line naming the field (the CRD test proves the API server refuses the same)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from latentmas.localrun import load_stack
from latentmas.names import RESERVED_EXPERT_NAMES
from latentmas.spec import LatentMASStackSpec


def _write(tmp_path: Path, experts: list[dict[str, str]]) -> Path:
    path = tmp_path / "stack.yaml"
    document = {
        "apiVersion": "latentmas.io/v1alpha1",
        "kind": "LatentMASStack",
        "metadata": {"name": "s"},
        "spec": {"storage": {"endpoint": "file:///tmp/x"}, "experts": experts},
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_reserved_set_covers_the_api_and_status_keys() -> None:
    assert {"base", "auto", "router", "index"} <= RESERVED_EXPERT_NAMES


@pytest.mark.parametrize("name", sorted(RESERVED_EXPERT_NAMES))
def test_reserved_expert_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=rf"spec\.experts\.1\.name: .*'{name}': name is reserved") as err:
        load_stack(_write(tmp_path, [{"name": "law", "domain": "law"}, {"name": name, "domain": "x"}]))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        ([{"name": "a", "domain": "x"}, {"name": "a", "domain": "y"}], "experts[1].name: duplicate name 'a'"),
        (
            [{"name": "a", "domain": "x"}, {"name": "b", "domain": "y"}, {"name": "c", "domain": "x"}],
            "experts[2].domain: duplicate domain 'x'",
        ),
    ],
)
def test_duplicate_names_and_domains_are_refused(tmp_path: Path, experts: list[dict[str, str]], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_stack(_write(tmp_path, experts))
    assert "\n" not in str(err.value)


def test_names_close_to_reserved_ones_are_accepted() -> None:
    spec = LatentMASStackSpec.model_validate(
        {"experts": [{"name": n, "domain": n} for n in ("base2", "my-router", "indexes", "autos")]}
    )
    assert [e.name for e in spec.experts] == ["base2", "my-router", "indexes", "autos"]
