"""The OpenAI-compatible provider against a real `/chat/completions` server on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from governance.policy.actions import LLMCall, Message
from governance.policy.errors import ActionError, ErrorKind
from tests.workers.loopback import LoopbackServer, Reply
from workers.providers import OpenAICompatibleProvider, build_provider

PATH = "/v1/chat/completions"


def completion_body(text: str = "Hi!", usage: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-test-0613",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
    }
    body["usage"] = usage if usage is not None else {"prompt_tokens": 12, "completion_tokens": 3}
    return body


CALL = LLMCall(
    provider="openai",
    model="gpt-test",
    messages=[
        Message(role="system", content="Be brief."),
        Message(role="user", content="Say hi"),
    ],
    max_tokens=64,
)


@pytest.fixture
def provider(http_server: LoopbackServer) -> Iterator[OpenAICompatibleProvider]:
    with OpenAICompatibleProvider("openai", http_server.url + "/v1/", None, timeout_s=5) as p:
        yield p


def test_completion_and_usage(
    http_server: LoopbackServer, provider: OpenAICompatibleProvider
) -> None:
    http_server.route("POST", PATH, Reply(200, completion_body()))
    completion = provider.complete(CALL, attempt=0)
    assert completion.text == "Hi!"
    assert (completion.input_tokens, completion.output_tokens) == (12, 3)
    assert completion.model == "gpt-test-0613"
    assert completion.finish_reason == "stop"
    [request] = http_server.requests
    assert request.json() == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"},
        ],
        "max_tokens": 64,
    }
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers


def test_bearer_key_is_sent_when_set(http_server: LoopbackServer) -> None:
    http_server.route("POST", PATH, Reply(200, completion_body()))
    with OpenAICompatibleProvider("openai", http_server.url + "/v1", "sk-test-123") as provider:
        provider.complete(CALL, attempt=0)
        assert "sk-test-123" not in repr(provider)
    assert http_server.requests[0].headers["authorization"] == "Bearer sk-test-123"


def test_429_is_rate_limited_with_retry_after(
    http_server: LoopbackServer, provider: OpenAICompatibleProvider
) -> None:
    http_server.route(
        "POST", PATH, Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"})
    )
    with pytest.raises(ActionError) as info:
        provider.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.rate_limited
    assert info.value.retry_after_ms == 1000
    assert info.value.status == 429
    assert "slow down" in str(info.value)


def test_500_is_transient_then_the_retry_succeeds(
    http_server: LoopbackServer, provider: OpenAICompatibleProvider
) -> None:
    http_server.route("POST", PATH, Reply(500, "upstream exploded"), Reply(200, completion_body()))
    with pytest.raises(
        ActionError, match="HTTP 500 Internal Server Error: upstream exploded"
    ) as info:
        provider.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.transient
    assert info.value.status == 500
    assert provider.complete(CALL, attempt=1).text == "Hi!"
    assert len(http_server.requests) == 2


def test_400_is_permanent_with_the_body_cut(
    http_server: LoopbackServer, provider: OpenAICompatibleProvider
) -> None:
    http_server.route("POST", PATH, Reply(400, "bad request " + "x" * 2000))
    with pytest.raises(ActionError) as info:
        provider.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.permanent
    assert "bad request" in str(info.value)
    assert len(str(info.value)) < 600


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, (None, None)),
        ({"completion_tokens": 3}, (None, 3)),
        ({"prompt_tokens": 12}, (12, None)),
        ({"prompt_tokens": "12", "completion_tokens": -1}, (None, None)),
    ],
)
def test_an_answer_without_usage_is_returned_with_unknown_counts(
    http_server: LoopbackServer,
    provider: OpenAICompatibleProvider,
    usage: dict[str, Any] | None,
    expected: tuple[int | None, int | None],
) -> None:
    # The answer is there (and was billed): it is returned, and the task counts the call's
    # whole reservation, since what it used is unknown.
    body = completion_body()
    if usage is None:
        del body["usage"]
    else:
        body["usage"] = usage
    http_server.route("POST", PATH, Reply(200, body))
    completion = provider.complete(CALL, attempt=0)
    assert completion.text == "Hi!"
    assert (completion.input_tokens, completion.output_tokens) == expected
    assert not completion.usage_known


def test_invalid_json_is_transient_with_an_unknown_outcome(
    http_server: LoopbackServer, provider: OpenAICompatibleProvider
) -> None:
    http_server.route("POST", PATH, Reply(200, "<html>proxy error</html>"))
    with pytest.raises(ActionError, match="not JSON") as info:
        provider.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.transient
    assert info.value.outcome_unknown


def test_no_choices_is_permanent(
    http_server: LoopbackServer, provider: OpenAICompatibleProvider
) -> None:
    body = completion_body()
    body["choices"] = []
    http_server.route("POST", PATH, Reply(200, body))
    with pytest.raises(ActionError, match=r"missing choices\.0") as info:
        provider.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.permanent


def test_a_timeout_after_sending_is_transient_with_an_unknown_outcome(
    http_server: LoopbackServer,
) -> None:
    http_server.route("POST", PATH, Reply(200, completion_body(), delay_s=5))
    with (
        OpenAICompatibleProvider("openai", http_server.url + "/v1", None, timeout_s=0.2) as p,
        pytest.raises(ActionError, match="timed out after the request was sent") as info,
    ):
        p.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.transient
    assert info.value.outcome_unknown
    # The server did receive it: the provider may bill it.
    assert [r.json()["max_tokens"] for r in http_server.requests] == [64]


def test_a_connection_closed_after_sending_leaves_the_outcome_unknown(
    http_server: LoopbackServer, provider: OpenAICompatibleProvider
) -> None:
    http_server.route("POST", PATH, Reply(hang_up=True))
    with pytest.raises(ActionError, match="after the request was sent") as info:
        provider.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.transient
    assert info.value.outcome_unknown
    assert len(http_server.requests) == 1


@pytest.mark.parametrize(("status", "unknown"), [(504, True), (502, True), (500, False)])
def test_a_gateway_failure_leaves_the_outcome_unknown(
    http_server: LoopbackServer, provider: OpenAICompatibleProvider, status: int, unknown: bool
) -> None:
    http_server.route("POST", PATH, Reply(status, "upstream"))
    with pytest.raises(ActionError) as info:
        provider.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.transient
    assert info.value.outcome_unknown is unknown


def test_connection_refused_is_transient_and_nothing_was_sent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        OpenAICompatibleProvider("local", f"http://127.0.0.1:{port}/v1", None) as provider,
        pytest.raises(ActionError, match=r"ConnectError: .*\(the request was not sent\)") as info,
    ):
        provider.complete(CALL, attempt=0)
    assert info.value.kind is ErrorKind.transient
    assert not info.value.outcome_unknown


def test_client_ownership(http_server: LoopbackServer) -> None:
    own = OpenAICompatibleProvider("a", http_server.url, None)
    own.close()
    assert own._client.is_closed
    with httpx.Client() as shared:
        borrowed = OpenAICompatibleProvider("b", http_server.url, None, client=shared)
        borrowed.close()
        assert not shared.is_closed


def test_build_provider_gives_an_openai_compatible_provider(http_server: LoopbackServer) -> None:
    http_server.route("POST", PATH, Reply(200, completion_body()))
    provider = build_provider(
        "local-vllm", base_url=http_server.url + "/v1", api_key=None, timeout_s=7
    )
    try:
        assert isinstance(provider, OpenAICompatibleProvider)
        assert provider._timeout.read == 7
        assert provider.name == "local-vllm"
        assert provider.complete(CALL, attempt=0).output_tokens == 3
    finally:
        provider.close()


def test_base_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAICompatibleProvider("x", "api.openai.com/v1", None)
