"""``imcore.direct``: the send and the mark-read skip ninja's generic run and answer the same,
right or wrong."""

import json
import re

import pytest
from django.conf import settings
from ninja.operation import Operation

from imcore import apis
from imcore.api import api

DIRECT = (apis.message_send_api, apis.conversation_read_api)


def mounted_operations():
    """The operations the API serves (ninja mounts clones of its routers' operations)."""
    for router in api._get_bound_routers():
        for path_view in router.path_operations.values():
            for operation in path_view.operations:
                if operation.auth_callbacks:
                    yield operation


@pytest.fixture
def generic(monkeypatch):
    """Every operation run by ninja's own ``Operation.run``."""

    def use():
        for operation in mounted_operations():
            monkeypatch.setattr(operation, "run", Operation.run.__get__(operation))

    return use


@pytest.fixture
def generic_steps(monkeypatch):
    """Counts the calls of ninja's generic parameter step (``Operation._get_values``)."""
    calls = []
    original = Operation._get_values

    def counted(self, *args, **kwargs):
        calls.append(self.view_func.__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Operation, "_get_values", counted)
    return calls


def test_the_send_and_the_read_are_run_directly(make_member, generic_steps):
    """A valid send and read never reach ninja's generic steps (without ``direct`` they
    do: this fails); a refused one is answered by them."""
    member, other = make_member(), make_member()
    cid = member.post("/conversations", {"kind": "direct", "members": [other.id]}).json()["id"]
    generic_steps.clear()
    sent = member.post(f"/conversations/{cid}/messages", {"body": "hi", "client_msg_id": "d1"})
    assert sent.status_code == 201, sent.content
    assert other.post(f"/conversations/{cid}/read", {"seq": 1}).json()["unread"] == 0
    assert generic_steps == []
    assert member.post(f"/conversations/{cid}/read", {"seq": "1"}).status_code == 422
    assert generic_steps == ["conversation_read_api"]
    assert {op.view_func for op in mounted_operations() if op.run.__name__ == "direct_run"} == set(
        DIRECT
    )


def calls(member, other, cid: int, outsider_cid: int) -> list[tuple]:
    """(path, body as sent, token) of sends and reads, right and wrong in every way the API
    tells apart."""
    send, read = f"/conversations/{cid}/messages", f"/conversations/{cid}/read"
    ok = {"body": "hello", "client_msg_id": "m1"}
    too_big = json.dumps({**ok, "body": "x" * (settings.API_MAX_BODY_BYTES + 1)})
    return [
        (send, json.dumps(ok), None),  # 201
        (send, json.dumps(ok), None),  # 200: the replay
        (send, json.dumps({**ok, "body": "other"}), None),  # 409
        (send, json.dumps({**ok, "client_msg_id": "m2", "mentions": [other.id, other.id]}), None),
        (send, json.dumps({**ok, "client_msg_id": "m3", "mentions": [999_999_999]}), None),  # 400
        (send, json.dumps({**ok, "client_msg_id": "m4", "mention_all": True}), None),  # 400
        (send, json.dumps({**ok, "client_msg_id": "m5", "mentions": [2.0]}), None),  # 2.0 is 2
        (send, json.dumps({**ok, "client_msg_id": "m6", "mentions": ["2"]}), None),  # 422
        (send, json.dumps({**ok, "client_msg_id": "m7", "extra": 1}), None),  # 422
        (send, json.dumps({**ok, "client_msg_id": "m8", "body": "a\u0000b"}), None),  # 422
        (send, json.dumps({**ok, "client_msg_id": "m9", "body": ""}), None),  # 422
        (send, json.dumps({"client_msg_id": "m10"}), None),  # 422
        (send, json.dumps([ok]), None),  # 422
        (send, "{not json", None),  # 400
        (send, "", None),  # 422
        (send, too_big, None),  # 413
        (send, json.dumps(ok), ""),  # 401: no token
        (send, json.dumps(ok), "not-a-token"),  # 401
        (send, "{not json", "not-a-token"),  # 401 before the body
        (f"/conversations/{outsider_cid}/messages", json.dumps(ok), None),  # 404
        ("/conversations/0/messages", json.dumps(ok), None),  # 422
        ("/conversations/x/messages", json.dumps(ok), None),  # 422
        (f"/conversations/{2**63}/messages", json.dumps(ok), None),  # 422
        (read, json.dumps({"seq": 1}), None),  # 200
        (read, json.dumps({"seq": 99}), None),  # 400: past the last seq
        (read, json.dumps({"seq": True}), None),  # 422
        (f"/conversations/{outsider_cid}/read", json.dumps({"seq": 1}), None),  # 404
        (read, json.dumps({"seq": 1}), "not-a-token"),  # 401
    ]


def answers(make_member) -> list[tuple]:
    """The answers to :func:`calls` in a new direct conversation (ids, seqs and times
    masked: they differ between two runs)."""
    member, other, outsider = make_member(), make_member(), make_member()
    cid = member.post("/conversations", {"kind": "direct", "members": [other.id]}).json()["id"]
    mine = outsider.post("/conversations", {"kind": "direct", "members": [other.id]})
    out = []
    for path, raw, token in calls(member, other, cid, mine.json()["id"]):
        response = member.post(path, raw=raw, token=token)
        masked = re.sub(rb"\d+", b"0", response.content)
        out.append(
            (re.sub(r"\d+", "0", path), response.status_code, dict(response.headers), masked)
        )
    return out


def test_answers_are_ninjas_answers(make_member, generic):
    """Statuses, headers and bodies of sends and reads, valid and refused, are the same with
    the direct run and with ninja's generic run."""
    direct = answers(make_member)
    generic()
    assert all(op.run.__name__ == "run" for op in mounted_operations())
    for a, b in zip(direct, answers(make_member), strict=True):
        assert a == b, a[:2]
    statuses = [a[1] for a in direct]
    assert statuses[:3] == [201, 200, 409]
    assert set(statuses) == {200, 201, 400, 401, 404, 409, 413, 422}
