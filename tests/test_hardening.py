"""Hardening against malformed input, slow or vanishing clients, shutdown and start-up failure (issue 11)."""

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.settings import Settings


def post_raw(url: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/classify", content=body, headers={"content-type": "application/json"}, timeout=30)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        # valid JSON, but no valid Unicode: the tokenizer used to raise a TypeError (plain-text 500)
        (rb'{"texts": "\udc80"}', "texts[0] has a lone UTF-16 surrogate"),
        (rb'{"texts": ["fine", "a\ud83d"]}', "texts[1] has a lone UTF-16 surrogate"),
        (rb'{"texts": ["\u200b\u200b\u2060"]}', "texts[0] has only control, zero-width"),
        (rb'{"texts": ["\u0001\u0002 \ufeff"]}', "texts[0] has only control, zero-width"),
        (b'{"texts": ["ok"], "top_k": true}', "top_k: Input should be a valid integer"),
        (b'{"texts": ["ok"], "top_k": "2"}', "top_k: Input should be a valid integer"),
        (b'{"texts": ["ok"], "truncate": 1}', "truncate: Input should be a valid boolean"),
        (b'{"texts": ["ok"], "truncate": "false"}', "truncate: Input should be a valid boolean"),
    ],
)
def test_malformed_texts_and_loosely_typed_fields_get_a_422(service_url, body, fragment):
    response = post_raw(service_url, body)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["error"]


def test_a_visible_text_with_zero_width_characters_is_still_classified(service_url):
    response = post_raw(service_url, rb'{"texts": ["good\u200b film", "\ud83d\ude00 great"]}')
    assert response.status_code == 200, response.text


def test_wrong_method_and_unknown_path_answer_with_the_error_body(service_url):
    wrong_method = httpx.get(f"{service_url}/classify")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json() == {"error": "GET is not allowed on /classify; use POST"}
    unknown = httpx.get(f"{service_url}/classfy")
    assert unknown.status_code == 404 and "no such endpoint: /classfy" in unknown.json()["error"]


def test_an_unexpected_exception_is_a_json_500(tiny_model_dir):
    app = create_app(Settings(model=str(tiny_model_dir)))
    engine = app.state.engine
    engine.ready = True  # as if loaded: the request reaches encode, which fails like a bug would

    async def broken_encode(texts, truncate):
        raise RuntimeError("a bug")

    engine.encode = broken_encode
    response = TestClient(app, raise_server_exceptions=False).post("/classify", json={"texts": ["hi"]})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (RuntimeError); the server log has the details"}
