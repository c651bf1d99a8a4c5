"""``GET /v1/models/{id}``, OpenAI's "retrieve model", through the openai SDK and httpx on 127.0.0.1.

SDKs call it (``client.models.retrieve``) to check a name before they send work; before the route
existed every such call was a 404 ``not_found`` whatever the name.
"""

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from serve_helpers import in_process_server  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.toy import ToyBackend  # noqa: E402

NAME = "acme/gemma-3-1b:persona"  # a slash and a colon, as hub names and tags have
KEY = "sk-test"


@pytest.fixture(scope="module")
def base():
    with PersonaJudge({"backend": {"name": "toy"}}, backend=ToyBackend()) as pj:
        with in_process_server(pj, model_name=NAME, api_key=KEY) as url:
            yield url


def test_the_sdk_retrieves_the_served_model_by_its_name(base):
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    listed = client.models.list().data
    got = client.models.retrieve(NAME)
    assert [m.id for m in listed] == [NAME]
    assert got.id == NAME and got.object == "model"
    assert got.model_dump() == listed[0].model_dump()  # the same object either way


def test_another_name_is_an_openai_shaped_404_that_names_the_served_model(base):
    r = httpx.get(base + "/v1/models/gpt-4o", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert NAME in err["message"] and "gpt-4o" in err["message"]
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("acme/gemma-3-1b")  # a prefix of the name is another name


def test_retrieving_needs_the_key_like_listing(base):
    assert httpx.get(base + f"/v1/models/{NAME}", timeout=30).status_code == 401
    assert httpx.get(base + "/v1/models", timeout=30).status_code == 401


def test_the_route_is_one_metrics_label_whatever_the_name(base):
    auth = {"Authorization": f"Bearer {KEY}"}
    for i in range(5):
        httpx.get(base + f"/v1/models/probe-{i}", headers=auth, timeout=30)
    page = httpx.get(base + "/metrics", timeout=30).text
    lines = [ln for ln in page.splitlines() if ln.startswith("personajudge_requests_total{")]
    assert not any("probe-" in ln for ln in lines)
    assert any('endpoint="/v1/models/{model_id:path}"' in ln and 'status="404"' in ln for ln in lines)
