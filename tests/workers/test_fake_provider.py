"""The scripted fake provider: echo, usage figures and failure directives."""

from __future__ import annotations

import time

import pytest

from governance.policy.actions import LLMCall, Message, estimate_input_tokens
from governance.policy.errors import ActionError, ErrorKind
from workers.providers import FakeProvider, build_provider
from workers.providers.fake import parse_script


def llm_call(content: str, max_tokens: int = 50, system: str | None = None) -> LLMCall:
    messages = [Message(role="system", content=system)] if system else []
    messages.append(Message(role="user", content=content))
    return LLMCall(provider="fake", model="fake-1", messages=messages, max_tokens=max_tokens)


def test_echoes_the_last_user_message_with_exact_usage() -> None:
    call = LLMCall(
        provider="fake",
        model="fake-1",
        messages=[
            Message(role="system", content="You are terse."),
            Message(role="user", content="first question"),
            Message(role="assistant", content="an answer"),
            Message(role="user", content="hello there world"),
        ],
        max_tokens=50,
    )
    completion = FakeProvider().complete(call, attempt=0)
    assert completion.text == "echo: hello there world"
    assert completion.input_tokens == estimate_input_tokens(call.messages)
    assert completion.output_tokens == 4
    assert completion.model == "fake-1"
    assert completion.finish_reason == "stop"
    usage = completion.token_usage()
    assert (usage.input_tokens, usage.output_tokens) == (completion.input_tokens, 4)


def test_reply_is_cut_to_max_tokens_words() -> None:
    completion = FakeProvider().complete(llm_call("one two three four five", 3), attempt=0)
    assert completion.text == "echo: one two three"
    assert completion.output_tokens == 3
    assert completion.finish_reason == "length"


def test_fill_uses_exactly_max_tokens() -> None:
    call = llm_call("[[fill]] short", max_tokens=500)
    completion = FakeProvider().complete(call, attempt=0)
    assert completion.text == "echo: short"
    assert completion.output_tokens == 500
    assert completion.input_tokens == estimate_input_tokens(call.messages)


def test_transient_n_times_then_success() -> None:
    provider = FakeProvider()
    call = llm_call("[[fail transient 2]] hi")
    for attempt in (0, 1):
        with pytest.raises(ActionError) as info:
            provider.complete(call, attempt=attempt)
        assert info.value.kind is ErrorKind.transient
        assert str(info.value) == (f"fake provider: transient failure (attempt {attempt + 1} of 2)")
    assert provider.complete(call, attempt=2).text == "echo: hi"


def test_429_with_retry_after() -> None:
    provider = FakeProvider()
    call = llm_call("hi [[fail 429 1500]]")
    with pytest.raises(ActionError) as info:
        provider.complete(call, attempt=0)
    assert info.value.kind is ErrorKind.rate_limited
    assert info.value.retry_after_ms == 1500
    assert info.value.status == 429
    assert str(info.value) == "fake provider: 429 Too Many Requests"
    assert provider.complete(call, attempt=1).text == "echo: hi"


def test_429_repeated_n_times() -> None:
    provider = FakeProvider()
    call = llm_call("[[fail 429 10 3]] hi")
    for attempt in range(3):
        with pytest.raises(ActionError):
            provider.complete(call, attempt=attempt)
    assert provider.complete(call, attempt=3).text == "echo: hi"


def test_timeout_n_times_leaves_the_outcome_unknown_then_success() -> None:
    provider = FakeProvider()
    call = llm_call("[[fail timeout 2]] hi")
    for attempt in (0, 1):
        with pytest.raises(ActionError, match="timed out after the request was sent") as info:
            provider.complete(call, attempt=attempt)
        assert info.value.kind is ErrorKind.transient
        assert info.value.outcome_unknown
    assert provider.complete(call, attempt=2).text == "echo: hi"


def test_input_reports_the_given_count_instead_of_the_estimate() -> None:
    call = llm_call("[[input 900]] hi")
    completion = FakeProvider().complete(call, attempt=0)
    assert completion.text == "echo: hi"
    assert (completion.input_tokens, completion.output_tokens) == (900, 2)
    assert estimate_input_tokens(call.messages) < 900


def test_no_usage_answers_without_token_counts() -> None:
    completion = FakeProvider().complete(llm_call("[[no usage]] hi"), attempt=0)
    assert completion.text == "echo: hi"
    assert (completion.input_tokens, completion.output_tokens) == (None, None)
    assert not completion.usage_known
    assert completion.token_usage().tokens == 0


def test_permanent_always_fails() -> None:
    provider = FakeProvider()
    for attempt in range(3):
        with pytest.raises(ActionError) as info:
            provider.complete(llm_call("[[fail permanent]]"), attempt=attempt)
        assert info.value.kind is ErrorKind.permanent


def test_sleep_is_capped_and_happens_before_answering() -> None:
    slept: list[float] = []
    provider = FakeProvider(sleep=slept.append)
    provider.complete(llm_call("[[sleep 250]] hi"), attempt=0)
    with pytest.raises(ActionError):
        provider.complete(llm_call("[[sleep 999999]] [[fail permanent]]"), attempt=0)
    assert slept == [0.25, 60.0]


def test_real_sleep() -> None:
    started = time.monotonic()
    FakeProvider().complete(llm_call("[[sleep 50]] hi"), attempt=0)
    assert time.monotonic() - started >= 0.05


def test_directives_only_count_in_the_last_user_message() -> None:
    call = LLMCall(
        provider="fake",
        model="fake-1",
        messages=[
            Message(role="user", content="[[fail permanent]]"),
            Message(role="user", content="fine"),
        ],
        max_tokens=10,
    )
    assert FakeProvider().complete(call, attempt=0).text == "echo: fine"


def test_parse_script_strips_directives_and_keeps_other_brackets() -> None:
    script = parse_script("a [[ FILL ]] b [[fail transient 3]]\n c [[unknown]]")
    assert script.text == "a b c [[unknown]]"
    assert script.fill is True
    assert script.transient_failures == 3
    assert script.rate_limit_failures == 0


def test_no_user_message() -> None:
    call = LLMCall(
        provider="fake",
        model="m",
        messages=[Message(role="system", content="sys")],
        max_tokens=5,
    )
    completion = FakeProvider().complete(call, attempt=0)
    assert completion.text == "echo:"
    assert completion.output_tokens == 1


def test_build_provider() -> None:
    fake = build_provider("fake", base_url=None, api_key=None)
    assert isinstance(fake, FakeProvider)
    assert fake.name == "fake"
    with pytest.raises(ValueError, match="provider 'openai' needs a base_url"):
        build_provider("openai", base_url=None, api_key="sk")
    with pytest.raises(ValueError, match="must not be empty"):
        build_provider("", base_url="http://127.0.0.1:1", api_key=None)
