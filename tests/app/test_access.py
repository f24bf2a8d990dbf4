"""Every request's id, metrics labels and access-log line (``app/access.py``).

The route labels are tested in process. The request-id test uses the real server: its point
includes the access-log line that ``python -m app`` writes on its stdout.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.app.support import Server, encode, eventually, metric, shapes_image

PNG = encode(shapes_image((320, 240)), "PNG")


@pytest.mark.anyio
async def test_unknown_paths_share_one_route_label(client: httpx.AsyncClient) -> None:
    async def metrics() -> str:
        return (await client.get("/metrics")).text

    before = metric(await metrics(), "ssd_requests_total", route="unmatched", status="404")
    for path in ("/nope", "/random/123", "/x?y=z"):
        response = await client.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    text = await metrics()
    assert metric(text, "ssd_requests_total", route="unmatched", status="404") == before + 3
    assert "/random/123" not in text
    # Paths under the docs' static mount share the mount's label, found or not.
    mount = "/static-offline-docs"
    before = metric(text, "ssd_requests_total", route=mount, status="404")
    for name in ("nope1", "nope2"):
        assert (await client.get(f"{mount}/{name}")).status_code == 404
    assert (await client.get(f"{mount}/swagger-ui.css")).status_code == 200
    text = await metrics()
    assert metric(text, "ssd_requests_total", route=mount, status="404") == before + 2
    assert metric(text, "ssd_requests_total", route=mount, status="200") >= 1
    assert "nope1" not in text


def test_request_id_is_echoed_and_logged(guarded: Server) -> None:
    response = httpx.post(
        guarded.url + "/detect", content=b"hello", headers={"X-Request-ID": "abc-123"}
    )
    assert response.status_code == 415
    assert response.headers["X-Request-ID"] == "abc-123"
    assert response.json()["error"]["request_id"] == "abc-123"
    made = httpx.post(guarded.url + "/detect", content=PNG, headers={"X-Request-ID": "bad id!"})
    assert made.status_code == 200
    assert made.headers["X-Request-ID"] not in ("", "bad id!")

    def logged_lines() -> dict[str, dict]:
        output = guarded.output().splitlines()
        lines = [json.loads(line) for line in output if line.startswith("{")]
        logged = {line["request_id"]: line for line in lines}
        return logged if made.headers["X-Request-ID"] in logged else {}

    logged = eventually(logged_lines, "both requests' access-log lines")
    assert logged["abc-123"]["status"] == 415 and logged["abc-123"]["route"] == "/detect"
    line = logged[made.headers["X-Request-ID"]]
    assert line["image_sizes"] == [[320, 240]] and line["batch_sizes"] == [1]
    assert line["latency_ms"] > 0
