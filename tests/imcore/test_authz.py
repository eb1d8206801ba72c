"""Who may call what: every authenticated call refuses a missing or bad token with 401, and
every conversation-scoped call answers 404 to a user who is not (or no longer) a member,
exactly as for a conversation that does not exist, and changes nothing.

The cases run against the shared world of ``state.World`` (built once per module; the
counter increments of its messages are applied with ``delivery_fanout`` directly)."""

import base64
import json
import secrets

import pytest

from counters.selectors import counters_truth
from imcore.models import Device

from .state import assert_error, shared_client, snapshot

# (name, method, path, body) of every call that needs a token; paths name conversation {c}.
CALLS = [
    ("create", "POST", "/conversations", lambda i: {"kind": "group", "members": [i["dave"]]}),
    ("list", "GET", "/conversations", None),
    ("unread", "GET", "/unread", None),
    ("members-add", "POST", "/conversations/{c}/members", lambda i: {"user_ids": [i["dave"]]}),
    ("members-remove-other", "DELETE", "/conversations/{c}/members/{alice}", None),
    ("members-leave", "DELETE", "/conversations/{c}/members/{me}", None),
    ("send", "POST", "/conversations/{c}/messages", lambda i: {"body": "x", "client_msg_id": "z"}),
    ("history", "GET", "/conversations/{c}/messages", None),
    ("read", "POST", "/conversations/{c}/read", lambda i: {"seq": 1}),
    ("mute", "POST", "/conversations/{c}/mute", lambda i: {"muted": True}),
    ("recall", "DELETE", "/conversations/{c}/messages/1", None),
    ("edit", "PATCH", "/conversations/{c}/messages/1", lambda i: {"body": "edited"}),
]
SCOPED = [c for c in CALLS if "{c}" in c[2]]


def request(world, method, path, body, *, headers, conversation, me):
    ids = {**world.ids, "c": conversation, "me": me}
    url = "/api/v1" + path.format(**ids)
    client = shared_client()
    if method == "GET":
        return client.get(url, headers=headers)
    data = json.dumps(body(ids)) if body else ""
    return client.generic(method, url, data, content_type="application/json", headers=headers)


def bearer(member):
    return {"Authorization": f"Bearer {member.token}"}


BAD_HEADERS = {
    "no-header": lambda w: {},
    "empty-bearer": lambda w: {"Authorization": "Bearer "},
    "bearer-only": lambda w: {"Authorization": "Bearer"},
    "garbage": lambda w: {"Authorization": "Bearer garbage"},
    "random-token": lambda w: {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"},
    "truncated-token": lambda w: {"Authorization": f"Bearer {w.alice.token[:-1]}"},
    "token-plus-char": lambda w: {"Authorization": f"Bearer {w.alice.token}x"},
    "stored-hash-as-token": lambda w: {
        "Authorization": f"Bearer {Device.objects.get(user=w.alice.user).token_hash}"
    },
    "basic-password": lambda w: {
        "Authorization": "Basic " + base64.b64encode(b"alice:pw-for-tests-1").decode()
    },
    "wrong-scheme": lambda w: {"Authorization": f"Token {w.alice.token}"},
    "token-without-scheme": lambda w: {"Authorization": w.alice.token},
    "token-in-query-only": lambda w: {},  # a token anywhere but the header does not count
    "deactivated-user": lambda w: bearer(w.inactive),
}


@pytest.mark.parametrize("variant", list(BAD_HEADERS))
def test_calls_refuse_missing_or_bad_token(world, variant):
    """Every authenticated call answers 401 JSON to a missing or bad token; nothing changes."""
    headers = BAD_HEADERS[variant](world)
    members = world.members.values()
    before = snapshot(members, api=False)
    for name, method, path, body in CALLS:
        if variant == "token-in-query-only":
            path = path + f"?token={world.alice.token}&access_token={world.alice.token}"
        response = request(
            world,
            method,
            path,
            body,
            headers=headers,
            conversation=world.ids["g"],
            me=world.alice.id,
        )
        assert response.status_code == 401, (name, response.status_code, response.content)
        assert_error(response, 401, "not_authenticated")
    assert snapshot(members, api=False) == before


def test_valid_token_passes(world):
    """The control for the 401 cases: the same calls with alice's token are not refused."""
    for name, method, path, body in CALLS:
        if method == "GET":  # the writes are tried by the other tests
            response = request(
                world,
                method,
                path,
                body,
                headers=bearer(world.alice),
                conversation=world.ids["g"],
                me=world.alice.id,
            )
            assert response.status_code == 200, (name, response.content)


def test_bearer_scheme_is_case_insensitive(world):
    """``bearer`` in lower case is accepted like ``Bearer`` (RFC 6750 schemes ignore case)."""
    response = shared_client().get(
        "/api/v1/unread", headers={"Authorization": f"bearer {world.bob.token}"}
    )
    assert response.status_code == 200, response.content


def test_auth_checked_before_the_body(world):
    """Without a token even a malformed or invalid body gets 401, not a validation error."""
    c = world.ids["g"]
    client = shared_client()
    for path, raw in [
        (f"/api/v1/conversations/{c}/read", "{not json"),
        (f"/api/v1/conversations/{c}/read", '{"seq": "x"}'),
        (f"/api/v1/conversations/{world.ids['missing_conv']}/mute", '{"muted": true}'),
        ("/api/v1/conversations", "[]"),
    ]:
        response = client.post(path, raw, content_type="application/json")
        assert_error(response, 401, "not_authenticated")


# ---- outsiders and former members ----------------------------------------------------------

# (who, which conversation): dave is in nothing; carol is not in alice and bob's direct
# conversation; bob left g2.
STRANGERS = [("dave", "g"), ("dave", "d"), ("carol", "d"), ("bob", "g2")]
# Repeating one's own leave is left out: see test_api.test_self_leave_twice_is_idempotent.
NON_MEMBER_CASES = [
    pytest.param(who, conv, call, id=f"{call[0]}-{who}-on-{conv}")
    for who, conv in STRANGERS
    for call in SCOPED
    if (who, conv, call[0]) != ("bob", "g2", "members-leave")
]


@pytest.mark.parametrize(("who", "conv", "call"), NON_MEMBER_CASES)
def test_non_member_gets_404(world, who, conv, call):
    """A non-member gets 404, as for a missing conversation, and changes nothing."""
    _, method, path, body = call
    member = world.members[who]
    members = world.members.values()
    before = snapshot(members, api=False)
    cid = world.ids[conv]
    response = request(
        world, method, path, body, headers=bearer(member), conversation=cid, me=member.id
    )
    error = assert_error(response, 404, "not_found")
    assert snapshot(members, api=False) == before
    missing = world.ids["missing_conv"]
    control = request(
        world, method, path, body, headers=bearer(member), conversation=missing, me=member.id
    )
    control_error = assert_error(control, 404, "not_found")
    assert error["message"].replace(str(cid), "<id>") == control_error["message"].replace(
        str(missing), "<id>"
    )


def test_outsider_never_sees_the_conversation(world):
    """A user sees only their own conversations and counts in GET /conversations and /unread."""
    ids = world.ids
    assert world.dave.get("/conversations").json() == []
    assert world.dave.unread() == {"badge": 0, "conversations": {}, "mentions": {}}
    carol_ids = {c["id"] for c in world.carol.get("/conversations").json()}
    assert carol_ids == {ids["g"]}
    assert set(world.carol.unread()["conversations"]) == {str(ids["g"])}
    bob_ids = {c["id"] for c in world.bob.get("/conversations").json()}
    assert bob_ids == {ids["g"], ids["d"]}  # not g2, which bob left
    assert set(world.bob.unread()["conversations"]) == {str(ids["g"]), str(ids["d"])}


def test_each_token_reads_its_own_counters(world):
    """Each member's token reads that member's counters, which equal the truth for them."""
    for member in world.members.values():
        truth = counters_truth(user_id=member.id)
        unread = member.unread()
        assert unread["badge"] == truth.badge
        assert unread["conversations"] == {str(c): n for c, n in truth.conversations.items()}


def test_outsider_attempts_leave_counts_alone(world):
    """An outsider's tries on every call leave the counts and history as they were."""
    ids = world.ids
    before = {m.id: m.unread() for m in world.members.values()}
    last_seq = world.alice.get(f"/conversations/{ids['g']}/messages").json()["messages"][-1]["seq"]
    for _, method, path, body in SCOPED:
        request(
            world,
            method,
            path,
            body,
            headers=bearer(world.dave),
            conversation=ids["g"],
            me=ids["dave"],
        )
    assert {m.id: m.unread() for m in world.members.values()} == before
    messages = world.alice.get(f"/conversations/{ids['g']}/messages").json()["messages"]
    assert messages[-1]["seq"] == last_seq
    assert world.dave.get("/conversations").json() == []


def test_outsider_direct_conversation_is_their_own(world):
    """An outsider asking a member for a direct chat gets a new one, never another's."""
    response = world.dave.post("/conversations", {"kind": "direct", "members": [world.alice.id]})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] not in (world.ids["d"], world.ids["g"], world.ids["g2"])
    assert body["members"] == sorted([world.alice.id, world.dave.id])
    assert body["last_seq"] == 0


def test_member_who_left_gets_404(world):
    """A member who leaves a group gets 404 on it afterwards and no longer sees it."""
    ids = world.ids
    carol = world.carol
    assert carol.delete(f"/conversations/{ids['g']}/members/{carol.id}").status_code == 204
    for name, method, path, body in SCOPED:
        if name == "members-leave":  # see test_api.test_self_leave_twice_is_idempotent
            continue
        response = request(
            world, method, path, body, headers=bearer(carol), conversation=ids["g"], me=carol.id
        )
        assert response.status_code == 404, (name, response.status_code, response.content)
        assert_error(response, 404, "not_found")
    assert carol.get("/conversations").json() == []
    assert carol.unread() == {"badge": 0, "conversations": {}, "mentions": {}}


def test_removed_member_gets_404_until_added_back(world):
    """A member removed by the creator gets 404 on the group until someone adds them back."""
    ids = world.ids
    bob = world.bob
    assert world.alice.delete(f"/conversations/{ids['g']}/members/{bob.id}").status_code == 204
    assert_error(bob.get(f"/conversations/{ids['g']}/messages"), 404, "not_found")
    assert_error(bob.post(f"/conversations/{ids['g']}/read", {"seq": 1}), 404, "not_found")
    assert str(ids["g"]) not in bob.unread()["conversations"]
    added = world.alice.post(f"/conversations/{ids['g']}/members", {"user_ids": [bob.id]})
    assert added.status_code == 200, added.content
    assert bob.get(f"/conversations/{ids['g']}/messages").status_code == 200
    assert bob.unread()["conversations"][str(ids["g"])] == 0


def test_former_member_cannot_add_themselves_back(world):
    """A user who left cannot rejoin on their own (adding is for members only)."""
    ids = world.ids
    bob = world.bob
    members = world.members.values()
    before = snapshot(members, api=False)
    response = bob.post(f"/conversations/{ids['g2']}/members", {"user_ids": [bob.id]})
    assert_error(response, 404, "not_found")
    assert snapshot(members, api=False) == before


def test_unauthenticated_paths_need_no_token(world):
    """Sign-up, device login and the schema are open: no token needed (and none is checked)."""
    client = shared_client()
    assert client.get("/api/v1/schema").status_code == 200
    login = client.post(
        "/api/v1/devices",
        json.dumps(
            {
                "username": "dave",
                "password": "pw-for-tests-1",
                "device_id": "tablet",
                "platform": "web",
            }
        ),
        content_type="application/json",
        headers={"Authorization": "Bearer garbage"},
    )
    assert login.status_code == 201, login.content
