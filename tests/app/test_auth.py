"""API keys (app/auth.py) and CORS (app/cors.py) on a real server: every operation in
/openapi.json walked without a key, with a wrong one, a client key and an admin key; DeepStack's
form field through deepstack-python; the demo page asking for a key, and a page of another
origin calling the API, in a real browser."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from deepstack.core import DeepstackException, DeepstackObject

from app.auth import Keys
from app.settings import SettingsError
from tests.app.support import (
    DEFAULT_ENV,
    PATIENCE_S,
    Server,
    chromium,
    encode,
    eventually,
    metric,
    settings_from,
    shapes_image,
)
from tests.support.server_process import free_port

CLIENT, OTHER_CLIENT, ADMIN = "client-key-0123456789", "client-key-abcdefghij", "admin-key-42"
JPEG = encode(shapes_image(), "JPEG", quality=90)
# The operations that answer without a key: probes, the scrape, the docs and the demo page.
OPEN = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"), ("get", "/")}


@pytest.fixture(scope="module")
def other_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A static page server on another port: another origin, for the browser's CORS."""
    folder = tmp_path_factory.mktemp("origin")
    (folder / "index.html").write_text("<!doctype html><title>another app</title>")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    origin = f"http://127.0.0.1:{port}"

    def serving() -> bool:
        try:
            return httpx.get(origin + "/index.html").status_code == 200
        except httpx.TransportError:
            return False

    eventually(serving, "the page server")
    yield origin
    process.terminate()
    process.wait(timeout=PATIENCE_S)


@pytest.fixture(scope="module")
def keyed(
    tiny_weights: Path, other_origin: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("keys")
    admin_file = folder / "admin-keys"
    admin_file.write_text(f"# mounted from a secret\n{ADMIN}\n\n")
    env = {
        **DEFAULT_ENV,
        "SSD_WEIGHTS": str(tiny_weights),
        "SSD_API_KEYS": f"{CLIENT}, {OTHER_CLIENT}",
        "SSD_ADMIN_KEYS_FILE": str(admin_file),
        "SSD_ALLOW_RELOAD": "true",
        "SSD_CORS_ORIGINS": f"https://app.example, {other_origin}",
    }
    running = Server(env, folder / "server.log", log_level="info").wait_ready()  # access log on
    yield running
    running.stop()


def _call(server: Server, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    url = server.url + path.replace("{name}", "tiny").replace("{model}", "tiny")
    files = {"image": JPEG} if method == "post" else None
    return httpx.request(method, url, headers=headers, files=files, timeout=PATIENCE_S)


def test_no_operation_but_the_open_ones_answers_without_a_key(keyed):
    spec = httpx.get(keyed.url + "/openapi.json").json()
    operations = {(m, path) for path, item in spec["paths"].items() for m in item}
    assert operations > OPEN and len(operations) >= 11
    for method, path in sorted(operations):
        response = _call(keyed, method, path, {})
        if (method, path) in OPEN:
            assert response.status_code == 200, (method, path)
            continue
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == 'Bearer realm="ssd"'
        body = response.json()
        code = body["reason"] if path.startswith("/v1/") else body["error"]["code"]
        assert code == "unauthorized", body
        wrong = _call(keyed, method, path, {"X-API-Key": "not-a-key"})
        assert wrong.status_code == 401, (method, path)
        assert "invalid_token" in wrong.headers["www-authenticate"]
        assert CLIENT not in wrong.text and "not-a-key" not in wrong.text


def test_client_keys_open_detection_and_admin_keys_the_reload(keyed):
    for headers in ({"X-API-Key": CLIENT}, {"Authorization": f"Bearer {OTHER_CLIENT}"}):
        assert _call(keyed, "post", "/detect", headers).status_code == 200
        assert _call(keyed, "get", "/models", headers).status_code == 200
        refused = _call(keyed, "post", "/models/{name}/reload", headers)
        assert refused.status_code == 401, refused.text
        assert "not an admin key" in refused.json()["error"]["message"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert _call(keyed, "post", "/detect", admin).status_code == 200
    assert _call(keyed, "post", "/models/{name}/reload", admin).status_code == 200


def test_deepstack_clients_send_the_key_in_the_form(keyed):
    good = DeepstackObject(ip="127.0.0.1", port=keyed.port, api_key=CLIENT, timeout=30)
    assert isinstance(good.detect(JPEG), list)
    for key in ("", "wrong"):
        client = DeepstackObject(ip="127.0.0.1", port=keyed.port, api_key=key, timeout=30)
        with pytest.raises(DeepstackException, match="status code: 401"):
            client.detect(JPEG)
    answer = httpx.post(
        keyed.url + "/v1/vision/detection", files={"image": JPEG}, data={"api_key": "wrong"}
    )
    assert answer.status_code == 401
    # Without a key, a model that does not exist is not told apart from one that does.
    hidden = httpx.post(keyed.url + "/v1/vision/custom/nope", files={"image": JPEG})
    assert hidden.status_code == 401
    assert answer.json()["success"] is False and answer.json()["reason"] == "unauthorized"


def test_refusals_are_counted_by_reason(keyed):
    def count(reason: str) -> float:
        return metric(keyed.metrics(), "ssd_rejected_total", reason=reason)

    before = count("missing_key"), count("wrong_key")
    _call(keyed, "post", "/detect", {})
    _call(keyed, "post", "/detect", {"X-API-Key": "wrong"})
    _call(keyed, "post", "/detect", {"X-API-Key": "wrong"})
    assert (count("missing_key") - before[0], count("wrong_key") - before[1]) == (1, 2)
    log = keyed.output()
    assert '"route": "/detect", "status": 401' in log  # the access log, which names no key
    assert CLIENT not in log and ADMIN not in log and "wrong" not in log


def test_the_demo_page_asks_for_a_key(keyed, tmp_path):
    image = tmp_path / "shapes.png"
    image.write_bytes(encode(shapes_image(), "PNG"))
    wait = PATIENCE_S * 1000  # Playwright counts in milliseconds
    with chromium() as browser:
        page = browser.new_page()
        page.goto(keyed.url + "/")
        assert page.locator("#key-field").is_hidden()
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#stage[data-state=error]", state="attached", timeout=wait)
        assert "needs an API key" in page.locator("#status").inner_text()
        assert page.locator("#key-field").is_visible()
        page.locator("#key").fill(CLIENT)
        page.locator("#key").dispatch_event("change")
        page.wait_for_selector("#stage[data-state=drawn]", timeout=wait)


def test_which_keys_open_which_routes():
    keys = Keys.of(["c1", "c2"], ["a1"])
    assert keys.on
    assert keys.allows("c2", admin=False) and keys.allows("a1", admin=False)
    assert keys.allows("a1", admin=True) and not keys.allows("c1", admin=True)
    assert not keys.allows("c3", admin=False) and not keys.allows(None, admin=False)
    clients_only = Keys.of(["c1"], [])
    assert clients_only.allows("c1", admin=True)  # no admin key set: client keys open reloads
    assert not Keys.of([], []).on


def test_key_settings_name_the_variable(tmp_path):
    missing = tmp_path / "nope"
    settings = settings_from({**DEFAULT_ENV, "SSD_API_KEYS_FILE": str(missing)})
    with pytest.raises(SettingsError, match="SSD_API_KEYS_FILE"):
        settings.keys()
    with pytest.raises(SettingsError, match="SSD_ADMIN_KEYS: a key may not hold whitespace"):
        settings_from({**DEFAULT_ENV, "SSD_ADMIN_KEYS": "two words"}).keys()
    assert settings_from({**DEFAULT_ENV, "SSD_API_KEYS": " a, b ,,"}).keys() == (["a", "b"], [])


def test_cors_preflight_and_a_page_of_another_origin(keyed, other_origin, server):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key",
    }
    allowed = httpx.options(keyed.url + "/detect", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    refused = httpx.options(keyed.url + "/detect", headers={**preflight, "Origin": "https://evil"})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    # Off by default: the shared test server names no origin.
    plain = httpx.options(server.url + "/detect", headers=preflight)
    assert "access-control-allow-origin" not in plain.headers

    # A browser on the other origin posts an image with its key: preflight, then the request.
    with chromium() as browser:
        page = browser.new_page()
        page.goto(other_origin + "/index.html")
        result = page.evaluate(
            """async ([api, key]) => {
                const canvas = new OffscreenCanvas(64, 48);
                canvas.getContext("2d").fillRect(8, 8, 32, 24);
                const form = new FormData();
                form.append("image", await canvas.convertToBlob({type: "image/png"}), "a.png");
                const response = await fetch(api + "/detect", {
                    method: "POST", body: form, headers: {"X-API-Key": key}});
                return [response.status, (await response.json()).image,
                        response.headers.get("x-request-id") !== null];
            }""",
            [keyed.url, CLIENT],
        )
        assert result == [200, {"width": 64, "height": 48}, True]
