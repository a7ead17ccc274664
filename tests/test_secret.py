"""lmtier.secret: a Secret never prints and compares in constant time; URLs lose passwords."""

from __future__ import annotations

import copy
import hmac

import pytest

from lmtier.secret import Secret, redact_url, redact_urls


def test_a_secret_never_prints_its_bytes() -> None:
    secret = Secret(b"hunter2-key")
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert "hunter2" not in shown
        assert "Secret('***')" in shown
    assert secret.reveal() == b"hunter2-key"
    assert copy.deepcopy(secret).reveal() == b"hunter2-key"


def test_secrets_compare_through_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr("lmtier.secret.hmac.compare_digest", recording)
    assert Secret(b"abc") == Secret(b"abc")
    assert Secret(b"abc") != Secret(b"abd")
    assert calls == [(b"abc", b"abc"), (b"abc", b"abd")]
    assert Secret(b"abc") != b"abc"  # never equal to the bare bytes
    assert hash(Secret(b"abc")) == hash(Secret(b"xyz"))  # a hash tells nothing about the bytes


def test_a_secret_holds_bytes_only() -> None:
    with pytest.raises(TypeError, match="bytes"):
        Secret("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:pw@host", "rediss://:***@host"),
        ("redis://u:p@ss/w@rd@host", "redis://u:***@host"),
        ("redis://user@host", "redis://user@host"),
        ("redis://host:6379", "redis://host:6379"),
        ("user:pw@host", "user:***@host"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_urls_in_text() -> None:
    text = "cannot reach redis://lm:s3cret@cache:6379 nor rediss://:other@h2 now"
    assert redact_urls(text) == "cannot reach redis://lm:***@cache:6379 nor rediss://:***@h2 now"
