"""The API's description (``app/routes/docs.py`` and the app factory's OpenAPI): /openapi.json,
/docs, a description on every route. In process."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.anyio


async def test_openapi_describes_the_api(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths) == {
        "/detect",
        "/detect/batch",
        "/healthz",
        "/readyz",
        "/metrics",
        "/model",
        "/models",
        "/models/{name}/reload",
        "/v1/vision/detection",
        "/v1/vision/custom/{model}",
        "/",
    }
    deepstack = paths["/v1/vision/detection"]["post"]["requestBody"]["content"]
    assert set(deepstack["multipart/form-data"]["schema"]["properties"]) == {
        "image",
        "min_confidence",
        "api_key",
    }
    errors = paths["/v1/vision/custom/{model}"]["post"]["responses"]["404"]["content"]
    assert errors["application/json"]["schema"]["$ref"].endswith("/DeepStackError")
    detect = paths["/detect"]["post"]
    assert detect["description"].startswith("Detect objects in one image")
    content = detect["requestBody"]["content"]
    assert set(content) == {
        "multipart/form-data",
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/bmp",
    }
    assert content["multipart/form-data"]["schema"]["required"] == ["image"]
    params = {p["name"]: p for p in detect["parameters"]}
    threshold = params["score_threshold"]["schema"]["anyOf"][0]
    assert (threshold["minimum"], threshold["maximum"]) == (0, 1)
    limits = params["max_detections"]["schema"]["anyOf"][0]
    assert (limits["minimum"], limits["maximum"]) == (1, 1000)
    responses = detect["responses"]
    assert set(responses) == {
        "200", "400", "401", "404", "408", "413", "415", "422", "500", "503", "504"
    }  # fmt: skip
    assert "model" in params
    ok = responses["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok.endswith("/DetectResponse")
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    reload = paths["/models/{name}/reload"]["post"]["responses"]
    assert set(reload) == {"200", "401", "403", "404", "422", "503"}
    # The key schemes, so the docs page's Authorize button can send one.
    assert set(spec["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    assert detect["security"] == [{"HTTPBearer": []}, {"APIKeyHeader": []}]
    batch = paths["/detect/batch"]["post"]["requestBody"]["content"]
    assert batch["multipart/form-data"]["schema"]["properties"]["images"]["type"] == "array"
    schemas = spec["components"]["schemas"]
    assert set(schemas["Box"]["properties"]) == {"x_min", "y_min", "x_max", "y_max"}
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


async def test_every_route_has_a_description(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("description"), f"{method.upper()} {path}"


def _service_errors() -> list[type]:
    from app.errors import ServiceError

    found, todo = [], [ServiceError]
    while todo:
        kind = todo.pop()
        todo.extend(kind.__subclasses__())
        if "code" in vars(kind):
            found.append(kind)
    return found


def test_every_error_code_is_documented_with_its_status() -> None:
    from tests.support.server_process import REPO

    rows = [
        line for line in (REPO / "docs" / "errors.md").read_text().splitlines()
        if line.startswith("| ") and line[2:5].isdigit()
    ]  # fmt: skip
    errors = _service_errors()
    assert len(errors) >= 15
    for error in errors:
        status, code = error.status, error.code
        assert any(row.startswith(f"| {status}") and f"`{code}`" in row for row in rows), (
            f"docs/errors.md lacks a row for {status} {code} ({error.__name__})"
        )
