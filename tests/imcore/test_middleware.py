"""``imcore.middleware.ApiMiddleware``: API calls skip the admin's middleware and answer the
same."""

import json
import re

import pytest
from django.conf import settings
from django.test import Client, override_settings

REACHED = []


class Spy:
    """A middleware that notes every path it sees."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        REACHED.append(request.path)
        return self.get_response(request)


SPY = "tests.imcore.test_middleware.Spy"


@pytest.fixture
def reached():
    REACHED.clear()
    yield REACHED
    REACHED.clear()


def test_api_calls_skip_the_middleware_after_it_and_the_admin_does_not(
    make_member, admin_user, reached
):
    """Without ``ApiMiddleware`` every middleware sees every call (this fails)."""
    member = make_member()
    with override_settings(MIDDLEWARE=[*settings.MIDDLEWARE, SPY]):
        assert member.get("/unread").status_code == 200
        assert member.get("/nowhere").status_code == 404
        assert reached == []
        client = Client()
        client.force_login(admin_user)
        assert client.get("/admin/").status_code == 200
        assert reached == ["/admin/"]


def api_calls(member, conversation_id, tag):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {member.token}"}
    body = json.dumps({"body": "hello", "client_msg_id": f"same-answer-{tag}"})
    return [
        ("get", "/api/v1/unread", {}, auth),
        ("get", "/api/v1/unread", {}, {}),  # 401
        ("get", "/api/v1/conversations", {}, auth),
        ("get", "/api/v1/conversations/999999/messages", {}, auth),  # 404
        ("get", "/api/v2/nothing", {}, auth),  # the catch-all's 404
        ("post", "/api/v1/conversations/999999/read", {"data": '{"seq": "x"}'}, auth),  # 422
        ("post", f"/api/v1/conversations/{conversation_id}/messages", {"data": body}, auth),
        ("post", f"/api/v1/conversations/{conversation_id}/messages", {"data": body}, auth),
        ("get", "/api/v1/schema", {}, {}),
    ]


def answers(make_member, tag) -> list[tuple]:
    """The answers to :func:`api_calls` of a new member in a new conversation."""
    member, other = make_member(), make_member()
    created = member.post("/conversations", {"kind": "direct", "members": [other.user.pk]})
    conversation_id = created.json()["id"]
    client, out = Client(), []
    for method, path, kwargs, headers in api_calls(member, conversation_id, tag):
        kwargs = {"content_type": "application/json", **kwargs} if method == "post" else kwargs
        response = getattr(client, method)(path, **kwargs, **headers)
        # the ids, seqs and times of the two runs differ: their digits are left out
        content = re.sub(rb"\d+", b"0", response.content.replace(tag.encode(), b"*"))
        out.append(
            (
                method,
                re.sub(r"\d+", "0", path),
                response.status_code,
                dict(response.headers),
                content,
            )
        )
    return out


def test_api_answers_are_the_same_as_through_the_whole_chain(make_member):
    """Statuses, headers (Content-Length, the security headers) and bodies of a send, its
    replay, reads and refusals are the same with and without ``ApiMiddleware``."""
    short = answers(make_member, "short-chain")
    whole = [m for m in settings.MIDDLEWARE if m != "imcore.middleware.ApiMiddleware"]
    with override_settings(MIDDLEWARE=whole):
        long = answers(make_member, "whole-chain")
    for a, b in zip(short, long, strict=True):
        assert a == b, a[:2]
    assert [a[2] for a in short] == [200, 401, 200, 404, 404, 422, 201, 200, 200]
    for *_, headers, _ in short:
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert "Content-Length" in headers
