"""Bad requests: each gets a 4xx JSON error ``{"error", "message"}`` and changes nothing.

Every case runs against the same small world (``state.World``: groups, a direct conversation,
messages, a read pointer, a mute, a member who left), built once per module inside a
transaction that each test's ``db`` savepoint nests in. Each case compares everything a
request could change before and after: the rows of PostgreSQL, every key of the counters'
Redis database and each member's counts as the API's read path returns them. The counter
increments of the world's messages are applied with ``delivery_fanout`` directly, since the
world's transaction never commits.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from .state import World, assert_error, shared_client, snapshot

BIG = 2**63


def test_world_is_as_described(world):
    """The world the cases run against has the counts its description says."""
    ids = world.ids
    assert world.bob.unread() == {
        "badge": 2,
        "conversations": {str(ids["g"]): 2, str(ids["d"]): 0},
        "mentions": {},
    }
    assert world.carol.unread() == {"badge": 0, "conversations": {str(ids["g"]): 3}, "mentions": {}}
    assert world.alice.unread()["badge"] == 1
    assert world.dave.unread() == {"badge": 0, "conversations": {}, "mentions": {}}


@dataclass
class Case:
    name: str
    actor: str  # a world member, or "anon" (no Authorization header)
    method: str
    path: str  # formatted with the world's ids
    status: int
    code: str | None = None
    body: Any = None  # JSON-encoded; a callable gets the world's ids
    raw: str | bytes | None = None  # sent as is
    params: dict = field(default_factory=dict)  # query string, formatted with the world's ids
    settings: dict = field(default_factory=dict)
    marks: tuple = ()


def call(world: World, case: Case):
    ids = world.ids
    path = "/api/v1" + case.path.format(**ids)
    body = case.body(ids) if isinstance(case.body, Callable) else case.body
    if case.raw is not None:
        data = case.raw
    elif body is not None:
        data = json.dumps(body)
    else:
        data = "" if case.method == "GET" else "{}"
    if case.actor == "anon":
        client, headers = shared_client(), {}
    else:
        member = world.members[case.actor]
        client, headers = member.client, {"Authorization": f"Bearer {member.token}"}
    if case.method == "GET":
        params = {k: str(v).format(**ids) for k, v in case.params.items()}
        return client.get(path, params, headers=headers)
    return client.generic(case.method, path, data, content_type="application/json", headers=headers)


R, M, MSG, MEM = (
    "/conversations/{g}/read",
    "/conversations/{g}/mute",
    "/conversations/{g}/messages",
    "/conversations/{g}/members",
)
ok_device = {"username": "alice", "password": "pw-for-tests-1", "device_id": "x", "platform": "ios"}


def dev(**changes):
    return {**ok_device, **changes}


def msg(**changes):
    return {"body": "hello", "client_msg_id": "new-1", **changes}


CASES = [
    # ---- malformed JSON and bodies that are not an object ----
    Case("read-malformed", "bob", "POST", R, 400, "malformed_body", raw="{not json"),
    Case("read-truncated", "bob", "POST", R, 400, "malformed_body", raw='{"seq": 1'),
    Case("read-bad-utf8", "bob", "POST", R, 400, "malformed_body", raw=b'{"seq": "\xff"}'),
    Case("send-malformed", "alice", "POST", MSG, 400, "malformed_body", raw="{'body': 'x'}"),
    Case("create-malformed", "alice", "POST", "/conversations", 400, raw="kind=group"),
    Case("members-malformed", "alice", "POST", MEM, 400, raw="[1,"),
    Case("mute-malformed", "bob", "POST", M, 400, raw="{muted: true}"),
    Case("users-malformed", "anon", "POST", "/users", 400, raw="{"),
    Case("devices-malformed", "anon", "POST", "/devices", 400, raw="}"),
    Case("read-array", "bob", "POST", R, 422, "invalid_request", raw="[1]"),
    Case("read-string", "bob", "POST", R, 422, "invalid_request", raw='"seq"'),
    Case("read-number", "bob", "POST", R, 422, raw="5"),
    Case("read-null", "bob", "POST", R, 422, raw="null"),
    Case("read-empty-body", "bob", "POST", R, 422, raw=""),
    Case("read-deeply-nested", "bob", "POST", R, 400, raw="[" * 30000 + "]" * 30000),
    Case("read-5000-digit-int", "bob", "POST", R, 400, raw='{"seq": ' + "1" * 5000 + "}"),
    Case("users-5000-digit-int", "anon", "POST", "/users", 400, raw='{"u": ' + "9" * 5000 + "}"),
    Case("mute-array", "bob", "POST", M, 422, raw='[{"muted": true}]'),
    Case("send-array", "alice", "POST", MSG, 422, raw=json.dumps([msg()])),
    Case("create-array", "alice", "POST", "/conversations", 422, raw='[{"kind": "group"}]'),
    Case("create-string", "alice", "POST", "/conversations", 422, raw='"group"'),
    Case("members-string", "alice", "POST", MEM, 422, raw='"5"'),
    Case("users-array", "anon", "POST", "/users", 422, raw='["u", "p"]'),
    Case("devices-string", "anon", "POST", "/devices", 422, raw='"alice"'),
    # ---- wrong types (strict: "5" is not a number, 1 is not a bool) ----
    Case("read-seq-string", "bob", "POST", R, 422, "invalid_request", body={"seq": "3"}),
    Case("read-seq-float", "bob", "POST", R, 422, body={"seq": 3.5}),
    # an integral float is the integer it writes (JSON Schema agrees), then checked as one
    Case("read-seq-integral-float", "bob", "POST", R, 400, "bad_request", body={"seq": 4.0}),
    Case("read-seq-bool", "bob", "POST", R, 422, body={"seq": True}),
    Case("read-seq-null", "bob", "POST", R, 422, body={"seq": None}),
    Case("read-seq-list", "bob", "POST", R, 422, body={"seq": [3]}),
    Case("read-seq-nan", "bob", "POST", R, 422, raw='{"seq": NaN}'),
    Case("mute-yes", "bob", "POST", M, 422, body={"muted": "yes"}),
    Case("mute-string-true", "bob", "POST", M, 422, body={"muted": "true"}),
    Case("mute-int", "bob", "POST", M, 422, body={"muted": 1}),
    Case("mute-null", "bob", "POST", M, 422, body={"muted": None}),
    Case("members-strings", "alice", "POST", MEM, 422, body={"user_ids": ["x"]}),
    Case(
        "members-id-as-string",
        "alice",
        "POST",
        MEM,
        422,
        body=lambda i: {"user_ids": [str(i["dave"])]},
    ),
    Case("members-not-list", "alice", "POST", MEM, 422, body=lambda i: {"user_ids": i["dave"]}),
    Case("members-bool", "alice", "POST", MEM, 422, body={"user_ids": [True]}),
    Case("members-nested", "alice", "POST", MEM, 422, body=lambda i: {"user_ids": [[i["dave"]]]}),
    Case(
        "create-members-strings",
        "alice",
        "POST",
        "/conversations",
        422,
        body={"kind": "group", "members": ["x"]},
    ),
    Case(
        "create-members-id-string",
        "alice",
        "POST",
        "/conversations",
        422,
        body=lambda i: {"kind": "direct", "members": [str(i["dave"])]},
    ),
    Case(
        "create-members-null",
        "alice",
        "POST",
        "/conversations",
        422,
        body={"kind": "group", "members": None},
    ),
    Case("create-kind-int", "alice", "POST", "/conversations", 422, body={"kind": 5}),
    Case(
        "create-title-int",
        "alice",
        "POST",
        "/conversations",
        422,
        body={"kind": "group", "title": 5},
    ),
    Case("send-body-int", "alice", "POST", MSG, 422, body=msg(body=5)),
    Case("send-body-null", "alice", "POST", MSG, 422, body=msg(body=None)),
    Case("send-body-list", "alice", "POST", MSG, 422, body=msg(body=["hi"])),
    Case("send-body-object", "alice", "POST", MSG, 422, body=msg(body={"text": "hi"})),
    Case("send-cmid-int", "alice", "POST", MSG, 422, body=msg(client_msg_id=7)),
    Case(
        "users-username-int",
        "anon",
        "POST",
        "/users",
        422,
        body={"username": 5, "password": "a-Long-enough-pass-42"},
    ),
    Case(
        "users-password-list",
        "anon",
        "POST",
        "/users",
        422,
        body={"username": "newbie", "password": ["x"]},
    ),
    Case("devices-platform-int", "anon", "POST", "/devices", 422, body=dev(platform=1)),
    Case("devices-password-int", "anon", "POST", "/devices", 422, body=dev(password=123)),
    # ---- missing fields ----
    Case("read-missing-seq", "bob", "POST", R, 422, body={}),
    Case("mute-missing", "bob", "POST", M, 422, body={}),
    Case("members-missing", "alice", "POST", MEM, 422, body={}),
    Case("send-missing-cmid", "alice", "POST", MSG, 422, body={"body": "hi"}),
    Case("send-missing-body", "alice", "POST", MSG, 422, body={"client_msg_id": "new-2"}),
    Case(
        "create-missing-kind",
        "alice",
        "POST",
        "/conversations",
        422,
        body=lambda i: {"members": [i["dave"]]},
    ),
    Case("users-missing-password", "anon", "POST", "/users", 422, body={"username": "newbie"}),
    Case(
        "devices-missing-platform",
        "anon",
        "POST",
        "/devices",
        422,
        body={k: v for k, v in ok_device.items() if k != "platform"},
    ),
    Case(
        "devices-missing-device-id",
        "anon",
        "POST",
        "/devices",
        422,
        body={k: v for k, v in ok_device.items() if k != "device_id"},
    ),
    # ---- unknown extra fields ----
    Case("read-extra", "bob", "POST", R, 422, body={"seq": 3, "user_id": 1}),
    Case("mute-extra", "bob", "POST", M, 422, body={"muted": True, "for": 60}),
    Case(
        "members-extra",
        "alice",
        "POST",
        MEM,
        422,
        body=lambda i: {"user_ids": [i["dave"]], "role": "admin"},
    ),
    Case("send-extra", "alice", "POST", MSG, 422, body=msg(seq=9)),
    Case(
        "send-typo",
        "alice",
        "POST",
        MSG,
        422,
        body={"body": "hi", "client_msg_id": "n", "clientMsgId": "n"},
    ),
    Case(
        "create-extra",
        "alice",
        "POST",
        "/conversations",
        422,
        body=lambda i: {"kind": "group", "members": [i["dave"]], "owner": i["dave"]},
    ),
    Case(
        "users-extra",
        "anon",
        "POST",
        "/users",
        422,
        body={"username": "newbie", "password": "a-Long-enough-pass-42", "is_staff": True},
    ),
    Case("devices-extra", "anon", "POST", "/devices", 422, body=dev(token="mine")),
    # ---- negative, zero and huge ids and seqs ----
    Case("read-seq-negative", "bob", "POST", R, 422, body={"seq": -1}),
    Case("read-seq-2**63", "bob", "POST", R, 422, body={"seq": BIG}),
    Case("read-seq-huge", "bob", "POST", R, 422, body={"seq": 10**30}),
    Case("read-seq-beyond-last", "bob", "POST", R, 400, "bad_request", body={"seq": 4}),
    Case("read-seq-bigint-max", "bob", "POST", R, 400, "bad_request", body={"seq": BIG - 1}),
    Case("path-conv-2**63", "bob", "POST", "/conversations/{big}/read", 422, body={"seq": 0}),
    Case("path-conv-zero", "bob", "POST", "/conversations/0/read", 422, body={"seq": 0}),
    Case("path-conv-negative", "bob", "POST", "/conversations/-1/read", 422, body={"seq": 0}),
    Case(
        "path-conv-5000-digits",
        "bob",
        "POST",
        "/conversations/" + "9" * 5000 + "/read",
        422,
        body={"seq": 0},
    ),
    Case("path-conv-not-int", "bob", "GET", "/conversations/abc/messages", 422),
    Case("path-conv-float", "bob", "GET", "/conversations/1.5/messages", 422),
    Case("path-user-2**63", "alice", "DELETE", "/conversations/{g}/members/{big}", 422),
    Case("path-user-zero", "alice", "DELETE", "/conversations/{g}/members/0", 422),
    Case("path-user-negative", "alice", "DELETE", "/conversations/{g}/members/-3", 422),
    Case("path-user-not-int", "alice", "DELETE", "/conversations/{g}/members/bob", 422),
    Case("members-negative", "alice", "POST", MEM, 422, body={"user_ids": [-1]}),
    Case("members-zero", "alice", "POST", MEM, 422, body={"user_ids": [0]}),
    Case("members-2**63", "alice", "POST", MEM, 422, body={"user_ids": [BIG]}),
    Case("members-empty", "alice", "POST", MEM, 422, body={"user_ids": []}),
    Case(
        "members-over-1000",
        "alice",
        "POST",
        MEM,
        422,
        body=lambda i: {"user_ids": [i["dave"]] * 1001},
    ),
    Case(
        "create-members-2**63",
        "alice",
        "POST",
        "/conversations",
        422,
        body={"kind": "group", "members": [BIG]},
    ),
    Case(
        "create-members-negative",
        "alice",
        "POST",
        "/conversations",
        422,
        body={"kind": "direct", "members": [-5]},
    ),
    Case("history-after-negative", "bob", "GET", MSG, 422, params={"after_seq": -1}),
    Case("history-after-2**63", "bob", "GET", MSG, 422, params={"after_seq": BIG}),
    Case("history-after-5000-digits", "bob", "GET", MSG, 422, params={"after_seq": "9" * 5000}),
    Case("history-after-text", "bob", "GET", MSG, 422, params={"after_seq": "three"}),
    Case("history-limit-zero", "bob", "GET", MSG, 422, params={"limit": 0}),
    Case("history-limit-over-max", "bob", "GET", MSG, 422, params={"limit": 201}),
    Case("history-limit-negative", "bob", "GET", MSG, 422, params={"limit": -1}),
    Case("history-limit-text", "bob", "GET", MSG, 422, params={"limit": "ten"}),
    Case("history-limit-float", "bob", "GET", MSG, 422, params={"limit": "1.5"}),
    Case("history-limit-repeated", "bob", "GET", MSG + "?limit=1&limit=500", 422),
    # ---- unknown conversations ----
    Case(
        "read-unknown-conv",
        "bob",
        "POST",
        "/conversations/{missing_conv}/read",
        404,
        "not_found",
        body={"seq": 0},
    ),
    Case(
        "mute-unknown-conv",
        "bob",
        "POST",
        "/conversations/{missing_conv}/mute",
        404,
        "not_found",
        body={"muted": True},
    ),
    Case(
        "send-unknown-conv",
        "bob",
        "POST",
        "/conversations/{missing_conv}/messages",
        404,
        "not_found",
        body=msg(),
    ),
    Case(
        "history-unknown-conv",
        "bob",
        "GET",
        "/conversations/{missing_conv}/messages",
        404,
        "not_found",
    ),
    Case(
        "members-add-unknown-conv",
        "bob",
        "POST",
        "/conversations/{missing_conv}/members",
        404,
        "not_found",
        body=lambda i: {"user_ids": [i["dave"]]},
    ),
    Case(
        "members-del-unknown-conv",
        "bob",
        "DELETE",
        "/conversations/{missing_conv}/members/{bob}",
        404,
        "not_found",
    ),
    # ---- unknown or inactive users ----
    Case(
        "group-unknown-user",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body=lambda i: {"kind": "group", "members": [i["dave"], i["missing_user"]]},
    ),
    Case(
        "group-inactive-user",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body=lambda i: {"kind": "group", "members": [i["eve"]]},
    ),
    Case(
        "direct-unknown-user",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body=lambda i: {"kind": "direct", "members": [i["missing_user"]]},
    ),
    Case(
        "direct-inactive-user",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body=lambda i: {"kind": "direct", "members": [i["eve"]]},
    ),
    Case(
        "members-add-unknown-user",
        "alice",
        "POST",
        MEM,
        400,
        "bad_request",
        body=lambda i: {"user_ids": [i["dave"], i["missing_user"]]},
    ),
    Case(
        "members-add-inactive-user",
        "alice",
        "POST",
        MEM,
        400,
        "bad_request",
        body=lambda i: {"user_ids": [i["eve"]]},
    ),
    Case(
        "members-del-never-member",
        "alice",
        "DELETE",
        "/conversations/{g}/members/{dave}",
        404,
        "not_found",
    ),
    Case(
        "members-del-missing-user",
        "alice",
        "DELETE",
        "/conversations/{g}/members/{missing_user}",
        404,
        "not_found",
    ),
    # ---- direct conversations ----
    Case(
        "direct-no-other",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body={"kind": "direct", "members": []},
    ),
    Case(
        "direct-members-omitted",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body={"kind": "direct"},
    ),
    Case(
        "direct-only-self",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body=lambda i: {"kind": "direct", "members": [i["alice"]]},
    ),
    Case(
        "direct-two-others",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body=lambda i: {"kind": "direct", "members": [i["bob"], i["carol"]]},
    ),
    Case(
        "direct-add-members",
        "alice",
        "POST",
        "/conversations/{d}/members",
        400,
        "bad_request",
        body=lambda i: {"user_ids": [i["dave"]]},
    ),
    Case(
        "direct-add-other-member",
        "alice",
        "POST",
        "/conversations/{d}/members",
        400,
        "bad_request",
        body=lambda i: {"user_ids": [i["bob"]]},
    ),
    Case("direct-leave", "bob", "DELETE", "/conversations/{d}/members/{bob}", 400, "bad_request"),
    Case(
        "direct-remove-other",
        "alice",
        "DELETE",
        "/conversations/{d}/members/{bob}",
        400,
        "bad_request",
    ),
    Case("kind-unknown", "alice", "POST", "/conversations", 422, body={"kind": "channel"}),
    Case(
        "title-too-long",
        "alice",
        "POST",
        "/conversations",
        422,
        body={"kind": "group", "title": "t" * 201},
    ),
    # ---- group size limit (GROUP_MAX_MEMBERS = 3 for these) ----
    Case(
        "group-too-big",
        "alice",
        "POST",
        "/conversations",
        400,
        "bad_request",
        body=lambda i: {"kind": "group", "members": [i["bob"], i["carol"], i["dave"]]},
        settings={"GROUP_MAX_MEMBERS": 3},
    ),
    Case(
        "members-add-past-limit",
        "alice",
        "POST",
        MEM,
        400,
        "bad_request",
        body=lambda i: {"user_ids": [i["dave"]]},
        settings={"GROUP_MAX_MEMBERS": 3},
    ),
    # ---- message bodies ----
    Case("send-empty-body", "alice", "POST", MSG, 422, body=msg(body="")),
    Case("send-body-too-long", "alice", "POST", MSG, 422, body=msg(body="x" * 8001)),
    Case("send-empty-cmid", "alice", "POST", MSG, 422, body=msg(client_msg_id="")),
    Case("send-cmid-too-long", "alice", "POST", MSG, 422, body=msg(client_msg_id="c" * 65)),
    Case(
        "send-lone-surrogate",
        "alice",
        "POST",
        MSG,
        422,
        raw='{"body": "\\ud800", "client_msg_id": "s"}',
    ),
    Case(
        "send-replay-other-body",
        "alice",
        "POST",
        MSG,
        409,
        "conflict",
        body={"body": "changed", "client_msg_id": "g-0"},
    ),
    Case(
        "send-replay-other-conv",
        "alice",
        "POST",
        "/conversations/{g2}/messages",
        409,
        "conflict",
        body={"body": "g 0", "client_msg_id": "g-0"},
    ),
    # ---- devices and users ----
    Case("device-id-spaces", "anon", "POST", "/devices", 422, body=dev(device_id="my phone")),
    Case("device-id-empty", "anon", "POST", "/devices", 422, body=dev(device_id="")),
    Case("device-id-too-long", "anon", "POST", "/devices", 422, body=dev(device_id="d" * 65)),
    Case("device-id-slash", "anon", "POST", "/devices", 422, body=dev(device_id="a/b")),
    Case("device-id-newline", "anon", "POST", "/devices", 422, body=dev(device_id="phone\n")),
    Case("platform-unknown", "anon", "POST", "/devices", 422, body=dev(platform="windows")),
    Case("platform-uppercase", "anon", "POST", "/devices", 422, body=dev(platform="IOS")),
    Case(
        "device-wrong-password",
        "anon",
        "POST",
        "/devices",
        401,
        "not_authenticated",
        body=dev(password="nope"),
    ),
    Case(
        "device-inactive-user",
        "anon",
        "POST",
        "/devices",
        401,
        "not_authenticated",
        body=dev(username="eve"),
    ),
    Case(
        "users-empty-username",
        "anon",
        "POST",
        "/users",
        422,
        body={"username": "", "password": "a-Long-enough-pass-42"},
    ),
    Case(
        "users-long-username",
        "anon",
        "POST",
        "/users",
        422,
        body={"username": "u" * 151, "password": "a-Long-enough-pass-42"},
    ),
    Case(
        "users-empty-password",
        "anon",
        "POST",
        "/users",
        422,
        body={"username": "newbie", "password": ""},
    ),
    Case(
        "users-taken",
        "anon",
        "POST",
        "/users",
        409,
        "conflict",
        body={"username": "bob", "password": "a-Long-enough-pass-42"},
    ),
    Case(
        "users-weak-password",
        "anon",
        "POST",
        "/users",
        400,
        "bad_request",
        body={"username": "newbie", "password": "12345"},
    ),
    Case(
        "users-signup-off",
        "anon",
        "POST",
        "/users",
        403,
        "forbidden",
        body={"username": "newbie", "password": "a-Long-enough-pass-42"},
        settings={"API_SIGNUP_ENABLED": False},
    ),
    # ---- unknown paths and wrong methods ----
    Case("unknown-path", "alice", "GET", "/nope", 404, "not_found"),
    Case(
        "unknown-path-anon", "anon", "POST", "/conversations/{g}/archive", 404, "not_found", body={}
    ),
    Case("unknown-version", "anon", "GET", "/../v2/unread", 404, "not_found"),
    Case("trailing-slash", "alice", "GET", "/conversations/", 404, "not_found"),
    Case(
        "put-read",
        "bob",
        "PUT",
        R,
        405,
        body={"seq": 3},
    ),
    Case(
        "get-read",
        "bob",
        "GET",
        R,
        405,
    ),
    Case(
        "delete-conversations",
        "alice",
        "DELETE",
        "/conversations",
        405,
    ),
    Case(
        "patch-mute",
        "bob",
        "PATCH",
        M,
        405,
        body={"muted": False},
    ),
    Case(
        "post-unread",
        "bob",
        "POST",
        "/unread",
        405,
        body={},
    ),
    Case(
        "get-users",
        "anon",
        "GET",
        "/users",
        405,
    ),
    Case(
        "get-members",
        "alice",
        "GET",
        MEM,
        405,
    ),
    # ---- NUL characters ----
    Case(
        "send-body-nul",
        "alice",
        "POST",
        MSG,
        422,
        body=msg(body="a\x00b"),
    ),
    Case(
        "send-cmid-nul",
        "alice",
        "POST",
        MSG,
        422,
        body=msg(client_msg_id="n\x00"),
    ),
    Case(
        "create-title-nul",
        "alice",
        "POST",
        "/conversations",
        422,
        body={"kind": "group", "title": "t\x00"},
    ),
    Case(
        "devices-username-nul",
        "anon",
        "POST",
        "/devices",
        422,
        body=dev(username="alice\x00"),
    ),
    Case(
        "users-username-nul",
        "anon",
        "POST",
        "/users",
        422,
        body={"username": "a\x00", "password": "a-Long-enough-pass-42"},
    ),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_request_changes_nothing(world, settings, case):
    """A bad request gets its 4xx JSON error and leaves PostgreSQL, Redis and counts alone."""
    for name, value in case.settings.items():
        setattr(settings, name, value)
    members = world.members.values()
    before = snapshot(members, api=False)
    response = call(world, case)
    assert_error(response, case.status, case.code)
    assert snapshot(members, api=False) == before


def test_case_names_are_unique():
    """Every bad-request case has its own name (so a failure points at one case)."""
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("actor", "path", "body"),
    [
        ("alice", MSG, lambda i: msg(body="x" * 2000)),
        ("bob", R, lambda i: {"seq": 3, "pad": " " * 2000}),
        ("bob", M, lambda i: {"muted": True, "pad": " " * 2000}),
        ("alice", MEM, lambda i: {"user_ids": [i["dave"]] * 400}),
        ("alice", "/conversations", lambda i: {"kind": "group", "title": "t" * 1500}),
        ("anon", "/users", lambda i: {"username": "newbie", "password": "p" * 2000}),
        ("anon", "/devices", lambda i: dev(password="p" * 2000)),
    ],
    ids=["send", "read", "mute", "members", "create", "users", "devices"],
)
def test_body_over_limit(world, settings, actor, path, body):
    """A body over API_MAX_BODY_BYTES gets 413 body_too_large and changes nothing."""
    settings.API_MAX_BODY_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    members = world.members.values()
    before = snapshot(members, api=False)
    case = Case("too-big", actor, "POST", path, 413, "body_too_large", body=body)
    assert len(json.dumps(body(world.ids))) > 1000
    response = call(world, case)
    message = assert_error(response, 413, "body_too_large")["message"]
    assert "1000" in message
    assert snapshot(members, api=False) == before


def test_body_under_limit_is_accepted(world, settings):
    """A body just under API_MAX_BODY_BYTES is accepted (the limit is not off by far)."""
    settings.API_MAX_BODY_BYTES = 1000
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    payload = msg(body="x" * 900)
    assert len(json.dumps(payload)) <= 1000
    response = world.alice.post(f"/conversations/{world.ids['g']}/messages", payload)
    assert response.status_code == 201, response.content


def test_error_shape_of_validation(world):
    """A validation error names the field in its message and details."""
    response = world.bob.post(f"/conversations/{world.ids['g']}/read", {"seq": "3"})
    body = assert_error(response, 422, "invalid_request")
    assert "seq" in body["message"]
    assert any(d["loc"][-1] == "seq" for d in body["details"])


def test_no_error_leaks_a_traceback(world):
    """Error messages are short sentences, never a Python traceback or SQL."""
    responses = [
        world.bob.post(f"/conversations/{world.ids['g']}/read", raw="{not json"),
        world.bob.post(f"/conversations/{world.ids['missing_conv']}/read", {"seq": 0}),
        world.alice.post("/conversations", {"kind": "direct", "members": []}),
    ]
    for response in responses:
        text = response.content.decode()
        assert "Traceback" not in text
        assert 'File "' not in text
        assert "SELECT " not in text
