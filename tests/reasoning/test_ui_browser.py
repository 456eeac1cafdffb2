"""The web UI in a real headless Chromium against the app served by uvicorn: a streamed latent-pipeline
answer with expert, confidence and citations, experts with active/target versions, and the evolution
button annotating a real LatentMASStack on a real API server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config
from latentmas.crd import crd
from latentmas.registry import ArtifactVersion, load_registry, save_registry
from latentmas.services.rag_context import RagContext, StackIndex
from latentmas.services.reasoning_api import EVOLVE_ANNOTATION, ReasoningSettings, kube_evolve_trigger
from latentmas.services.sessions import SessionStore
from latentmas.spec import GROUP, PLURAL, VERSION
from latentmas.store import LocalStore
from latentmas.testing.asgi import served_app

from tests.reasoning.cdp import Browser
from tests.reasoning.helpers import BUCKET, NAMESPACE, STACK, build_app, publish_index, service_for
from tests.reasoning.test_reasoning_api import CORPUS_V1

pytestmark = pytest.mark.reasoning
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chromium() -> str:
    result = subprocess.run(["bash", str(ROOT / "hack" / "chromium.sh")], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"chromium unavailable: {result.stderr.strip()}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture
def served(tmp_path, backend, embedder, control_plane) -> Iterator[tuple[str, str, client.ApiClient]]:
    namespace = f"ui-{uuid.uuid4().hex[:6]}"
    control_plane.kubectl("create", "namespace", namespace)
    control_plane.install_crd(json.dumps(crd()))
    stack = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LatentMASStack",
        "metadata": {"name": STACK, "namespace": namespace},
        "spec": {
            "storage": {"endpoint": "minio:9000", "credentialsSecretRef": {"name": "s3"}},
            "experts": [{"name": "finance", "domain": "finance"}],
        },
    }
    control_plane.kubectl("apply", "-f", "-", input_text=json.dumps(stack))
    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))

    store = LocalStore(tmp_path / "s3")
    store.ensure_bucket(BUCKET)
    publish_index(store, embedder, CORPUS_V1, tmp_path)
    registry = load_registry(store, BUCKET, NAMESPACE, STACK)
    for name, target in (("finance", 2), ("law", 1)):
        registry.experts.setdefault(name, registry.index.model_copy(deep=True))
        registry.experts[name].history = [
            ArtifactVersion(version=v, prefix=f"x/{name}/v{v}/", files={}) for v in range(1, target + 1)
        ]
        registry.experts[name].current = target
    save_registry(store, BUCKET, NAMESPACE, STACK, registry)

    rag = RagContext(embedder, StackIndex(store, BUCKET, NAMESPACE, STACK, tmp_path / "idx", embedder, 0), k=3)
    service = service_for(
        backend,
        SessionStore(tmp_path / "sessions.db"),
        rag=rag,
        registry=lambda: load_registry(store, BUCKET, NAMESPACE, STACK),
        evolve=kube_evolve_trigger(namespace, STACK, api),
        settings=ReasoningSettings(),
    )
    try:
        with served_app(build_app(service), ready=lambda url: True, what="the UI's server started") as url:
            yield f"{url}/", namespace, api
    finally:
        control_plane.kubectl("delete", "namespace", namespace, "--wait=false")


def test_ui_chat_streams_an_answer_with_expert_citations_and_triggers_evolution(served, chromium, tmp_path):
    url, namespace, api = served
    browser = Browser(chromium, tmp_path / "profile")
    try:
        browser.send("Page.enable")
        browser.send("Page.navigate", url=url)
        browser.wait_for("document.querySelectorAll('#experts tbody tr').length === 2")
        experts = browser.evaluate(
            "[...document.querySelectorAll('#experts tbody tr')].map(r => [...r.cells].map(c => c.textContent))"
        )
        assert experts == [["finance", "1", "2"], ["law", "1", "1"]]
        assert browser.evaluate("document.querySelector('#experts tbody tr td.stale').textContent") == "1"
        assert browser.evaluate("document.querySelector('#index-version').textContent") == "active 1 / target 1"

        browser.evaluate(
            """(() => {
              document.querySelector('#prompt').value = 'Why do bond prices fall when interest rates rise?';
              document.querySelector('#pipeline').value = 'latent';
              document.querySelector('#max-tokens').value = '12';
              document.querySelector('#ask').requestSubmit();
            })()"""
        )
        browser.wait_for("document.querySelector('.msg.assistant')?.dataset.state === 'done'")
        badges = browser.evaluate("[...document.querySelectorAll('.msg.assistant .badge')].map(b => b.textContent)")
        assert badges[0].startswith("expert: finance (") and "pipeline: latent" in badges
        assert any(b.startswith("latent steps: ") for b in badges)
        cited = browser.evaluate(
            "[...document.querySelectorAll('.msg.assistant .citations li')].map(li => li.dataset.id)"
        )
        assert cited[0] == "bonds-101"
        shown = browser.evaluate("document.querySelector('.msg.assistant .text').textContent")
        conversation = browser.wait_for("document.querySelector('#conversations li')?.dataset.id")
        with urllib_get(f"{url}reasoning/conversations/{conversation}") as stored:
            assert stored["messages"][1]["content"] == shown

        browser.evaluate("document.querySelector('#evolve').click()")
        result = browser.wait_for(
            "document.querySelector('#evolve-result').textContent.startsWith('cycle requested') && "
            "document.querySelector('#evolve-result').textContent"
        )
        shot = tmp_path / "ui.png"
        browser.screenshot(shot)
        assert shot.read_bytes().startswith(b"\x89PNG")
        if os.environ.get("LATENTMAS_UPDATE_SCREENSHOT") == "1":  # refreshes docs/ui.png
            shutil.copyfile(shot, ROOT / "docs" / "ui.png")
    finally:
        browser.close()
    stack = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, STACK)
    assert result == f"cycle requested (nonce {stack['metadata']['annotations'][EVOLVE_ANNOTATION]})"


class urllib_get:
    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.url, timeout=10) as response:
            return json.load(response)

    def __exit__(self, *exc: object) -> None:
        return None
