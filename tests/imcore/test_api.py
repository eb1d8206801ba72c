"""Round trips of every call of the HTTP API v1.

Most tests run in the ``db`` fixture's transaction, where ``transaction.on_commit`` never
fires, so the Celery fan-out that raises the other members' counts does not run by itself:
the tests whose docstring says "(direct fan-out)" apply each message's increments by calling
``delivery.services.delivery_fanout`` directly (``fanout`` in ``state.py``). The tests marked
``worker`` go through a real Celery worker process instead (``transactional_db``).
"""

import json
from unittest.mock import ANY

import pytest

from imcore.models import Conversation, Device, Membership, Message, User
from tests.conftest import wait_until
from tests.helpers import counter_mismatches

from .state import assert_error, fanout, row_counts, shared_client, snapshot

PASSWORD = "a-Long-enough-pass-42"


@pytest.fixture
def make_member(make_member):
    """conftest's ``make_member``, with the members sharing one test client (a new client
    builds the middleware chain on its first request, ~50 ms with WhiteNoise's file scan)."""

    def make(*args, **kwargs):
        member = make_member(*args, **kwargs)
        member.client = shared_client()
        return member

    return make


def anon_post(path, body):
    return shared_client().post(f"/api/v1{path}", json.dumps(body), content_type="application/json")


def create_group(creator, *others, title="team"):
    response = creator.post(
        "/conversations", {"kind": "group", "members": [o.id for o in others], "title": title}
    )
    assert response.status_code == 201, response.content
    return response.json()["id"]


def create_direct(creator, other):
    response = creator.post("/conversations", {"kind": "direct", "members": [other.id]})
    assert response.status_code in (200, 201), response.content
    return response.json()["id"]


def send_and_fanout(member, conversation_id, n=1, prefix="m"):
    """Send ``n`` messages and apply their increments to the other members directly."""
    sent = []
    for i in range(n):
        message = member.send(conversation_id, f"{prefix} {i}", client_msg_id=f"{prefix}-{i}")
        fanout(message)
        sent.append(message)
    return sent


def unread_of(member, conversation_id):
    return member.unread()["conversations"].get(str(conversation_id))


def listing_of(member, conversation_id):
    for item in member.get("/conversations").json():
        if item["id"] == conversation_id:
            return item
    return None


# ---- POST /users -------------------------------------------------------------------------


def test_signup_creates_user(db):
    """POST /users with a fresh username and a strong password answers 201 {id, username}."""
    response = anon_post("/users", {"username": "newbie", "password": PASSWORD})
    assert response.status_code == 201, response.content
    body = response.json()
    user = User.objects.get(username="newbie")
    assert body == {"id": user.pk, "username": "newbie"}
    assert user.check_password(PASSWORD)


def test_signup_duplicate_username_conflicts(db):
    """Signing up a username that exists answers 409 and creates nobody."""
    assert anon_post("/users", {"username": "twin", "password": PASSWORD}).status_code == 201
    before = row_counts()
    response = anon_post("/users", {"username": "twin", "password": PASSWORD + "x"})
    assert_error(response, 409, "conflict")
    assert row_counts() == before
    assert User.objects.get(username="twin").check_password(PASSWORD)


@pytest.mark.parametrize("password", ["123", "12345678901", "password", "newbie-user"])
def test_signup_weak_password_rejected(db, password):
    """A password the validators refuse (short, numeric, common, like the name) gets 400."""
    response = anon_post("/users", {"username": "newbie-user", "password": password})
    body = assert_error(response, 400, "bad_request")
    assert body["details"], body
    assert not User.objects.filter(username="newbie-user").exists()


def test_signup_invalid_username_rejected(db):
    """A username with characters Django refuses gets 400."""
    response = anon_post("/users", {"username": "has space", "password": PASSWORD})
    assert_error(response, 400, "bad_request")
    assert not User.objects.exists()


def test_signup_disabled(db, settings):
    """With API_SIGNUP_ENABLED=False, POST /users answers 403 and creates nobody."""
    settings.API_SIGNUP_ENABLED = False
    response = anon_post("/users", {"username": "late", "password": PASSWORD})
    assert_error(response, 403, "forbidden")
    assert not User.objects.exists()


def test_signup_login_and_call(db):
    """A user signs up, logs a device in and calls an authenticated endpoint with the token."""
    assert anon_post("/users", {"username": "zoe", "password": PASSWORD}).status_code == 201
    login = anon_post(
        "/devices",
        {"username": "zoe", "password": PASSWORD, "device_id": "pixel-7", "platform": "android"},
    )
    assert login.status_code == 201, login.content
    token = login.json()["token"]
    response = shared_client().get("/api/v1/unread", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.content
    assert response.json() == {
        "badge": 0,
        "conversations": {},
        "mentions": {},
        "badge_version": ANY,
    }


# ---- POST /devices -----------------------------------------------------------------------


def test_device_login(make_member):
    """POST /devices answers 201 {device_id, user_id, token}; only the token's hash is kept."""
    alice = make_member("alice")
    response = anon_post(
        "/devices",
        {"username": "alice", "password": "pw-for-tests-1", "device_id": "ipad", "platform": "ios"},
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["device_id"] == "ipad"
    assert body["user_id"] == alice.id
    assert isinstance(body["token"], str) and len(body["token"]) >= 32
    device = Device.objects.get(user=alice.user, device_id="ipad")
    assert device.platform == "ios"
    assert body["token"] not in device.token_hash
    assert alice.get("/unread", token=body["token"]).status_code == 200


@pytest.mark.parametrize(
    ("username", "password"), [("alice", "wrong-password"), ("nobody", "pw-for-tests-1")]
)
def test_device_login_bad_credentials(make_member, username, password):
    """A wrong password or an unknown username gets 401 and no device."""
    make_member("alice")
    before = row_counts()
    response = anon_post(
        "/devices",
        {"username": username, "password": password, "device_id": "tab", "platform": "web"},
    )
    assert_error(response, 401, "not_authenticated")
    assert row_counts() == before


def test_device_relogin_replaces_token(make_member):
    """Logging the same device in again replaces its token: the old one gets 401 after."""
    alice = make_member("alice", device_id="phone")
    other = make_member("bob")
    old = alice.token
    assert alice.get("/unread").status_code == 200
    response = anon_post(
        "/devices",
        {
            "username": "alice",
            "password": "pw-for-tests-1",
            "device_id": "phone",
            "platform": "android",
        },
    )
    assert response.status_code == 201, response.content
    new = response.json()["token"]
    assert new != old
    assert_error(alice.get("/unread", token=old), 401, "not_authenticated")
    assert alice.get("/unread", token=new).status_code == 200
    assert Device.objects.filter(user=alice.user).count() == 1
    assert Device.objects.get(user=alice.user).platform == "android"
    assert other.get("/unread").status_code == 200


def test_second_device_keeps_first_token(make_member):
    """Logging a second device in leaves the first device's token valid."""
    alice = make_member("alice", device_id="phone")
    response = anon_post(
        "/devices",
        {
            "username": "alice",
            "password": "pw-for-tests-1",
            "device_id": "laptop",
            "platform": "desktop",
        },
    )
    assert response.status_code == 201, response.content
    assert alice.get("/unread").status_code == 200
    assert alice.get("/unread", token=response.json()["token"]).status_code == 200
    assert Device.objects.filter(user=alice.user).count() == 2


# ---- POST /conversations -----------------------------------------------------------------


def test_direct_create(make_member):
    """A direct conversation is created with 201 and holds exactly the two users."""
    alice, bob = make_member("alice"), make_member("bob")
    response = alice.post("/conversations", {"kind": "direct", "members": [bob.id]})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["kind"] == "direct"
    assert body["members"] == sorted([alice.id, bob.id])
    assert body["last_seq"] == 0
    assert Conversation.objects.get(pk=body["id"]).direct_key is not None


def test_direct_same_pair_returns_existing(make_member):
    """Asking for an existing direct pair again, from either side, answers 200 with its id."""
    alice, bob = make_member("alice"), make_member("bob")
    first = alice.post("/conversations", {"kind": "direct", "members": [bob.id]})
    assert first.status_code == 201
    cid = first.json()["id"]
    alice.send(cid, "hello")
    before = row_counts()
    again = alice.post("/conversations", {"kind": "direct", "members": [bob.id]})
    assert again.status_code == 200, again.content
    assert again.json()["id"] == cid
    assert again.json()["last_seq"] == 1
    other_side = bob.post("/conversations", {"kind": "direct", "members": [alice.id]})
    assert other_side.status_code == 200, other_side.content
    assert other_side.json()["id"] == cid
    assert row_counts() == before


def test_direct_naming_self_too_is_accepted(make_member):
    """A direct conversation may list the caller as well as the other user."""
    alice, bob = make_member("alice"), make_member("bob")
    response = alice.post("/conversations", {"kind": "direct", "members": [alice.id, bob.id]})
    assert response.status_code == 201, response.content
    assert response.json()["members"] == sorted([alice.id, bob.id])


def test_direct_title_is_dropped(make_member):
    """A direct conversation has no title, whatever the request says."""
    alice, bob = make_member("alice"), make_member("bob")
    response = alice.post(
        "/conversations", {"kind": "direct", "members": [bob.id], "title": "ignored"}
    )
    assert response.status_code == 201
    assert response.json()["title"] == ""


def test_group_create(make_member):
    """A group is created with 201, its title, the creator and the named members."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    response = alice.post(
        "/conversations", {"kind": "group", "members": [bob.id, carol.id], "title": "Team"}
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["kind"] == "group"
    assert body["title"] == "Team"
    assert body["members"] == sorted([alice.id, bob.id, carol.id])
    assert body["last_seq"] == 0
    conversation = Conversation.objects.get(pk=body["id"])
    assert conversation.created_by_id == alice.id
    assert conversation.direct_key is None


def test_group_creator_always_member(make_member):
    """The creator is a member once whether or not the members list names them."""
    alice, bob = make_member("alice"), make_member("bob")
    alone = alice.post("/conversations", {"kind": "group", "title": "me"})
    assert alone.status_code == 201, alone.content
    assert alone.json()["members"] == [alice.id]
    named = alice.post(
        "/conversations", {"kind": "group", "members": [alice.id, bob.id, bob.id], "title": "x"}
    )
    assert named.status_code == 201, named.content
    assert named.json()["members"] == sorted([alice.id, bob.id])
    assert Membership.objects.filter(conversation_id=named.json()["id"]).count() == 2


def test_groups_are_never_deduplicated(make_member):
    """Two groups with the same members are two conversations."""
    alice, bob = make_member("alice"), make_member("bob")
    assert create_group(alice, bob) != create_group(alice, bob)


# ---- POST /conversations/{id}/members ----------------------------------------------------


def test_members_add(make_member):
    """Adding users answers 200 with the ids added and the conversation's members."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = create_group(alice)
    response = alice.post(f"/conversations/{gid}/members", {"user_ids": [bob.id, carol.id]})
    assert response.status_code == 200, response.content
    body = response.json()
    assert sorted(body["added"]) == sorted([bob.id, carol.id])
    assert body["conversation"]["members"] == sorted([alice.id, bob.id, carol.id])
    assert listing_of(bob, gid) is not None


def test_members_add_mixed_and_repeated(make_member):
    """Naming a member, the caller and a newcomer twice adds the newcomer once."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = create_group(alice, bob)
    response = bob.post(
        f"/conversations/{gid}/members", {"user_ids": [alice.id, carol.id, carol.id, bob.id]}
    )
    assert response.status_code == 200, response.content
    assert response.json()["added"] == [carol.id]
    assert response.json()["conversation"]["members"] == sorted([alice.id, bob.id, carol.id])
    assert Membership.objects.filter(conversation_id=gid, user=carol.user).count() == 1


def test_members_add_active_member_is_noop(make_member):
    """Re-adding an active member adds nobody and changes nothing (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    send_and_fanout(alice, gid, 2)
    assert unread_of(bob, gid) == 2
    before = snapshot([alice, bob])
    response = alice.post(f"/conversations/{gid}/members", {"user_ids": [bob.id, alice.id]})
    assert response.status_code == 200, response.content
    assert response.json()["added"] == []
    assert snapshot([alice, bob]) == before


def test_new_member_starts_at_zero_unread(make_member):
    """A user added after messages starts at zero unread (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice)
    send_and_fanout(alice, gid, 3)
    assert alice.post(f"/conversations/{gid}/members", {"user_ids": [bob.id]}).status_code == 200
    assert bob.unread() == {"badge": 0, "conversations": {str(gid): 0}, "mentions": {}}
    assert listing_of(bob, gid)["last_read_seq"] == 3
    # Messages after the join count (increments applied directly with delivery_fanout).
    send_and_fanout(alice, gid, 1, prefix="late")
    assert bob.unread() == {"badge": 1, "conversations": {str(gid): 1}, "mentions": {}}
    assert counter_mismatches() == []


def test_rejoin_after_leave_starts_at_zero_unread(make_member):
    """A member who left and is added back starts at zero unread, unmuted (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    send_and_fanout(alice, gid, 2, prefix="before")
    assert bob.post(f"/conversations/{gid}/mute", {"muted": True}).status_code == 200
    assert unread_of(bob, gid) == 2
    assert bob.delete(f"/conversations/{gid}/members/{bob.id}").status_code == 204
    send_and_fanout(alice, gid, 3, prefix="while-away")
    response = alice.post(f"/conversations/{gid}/members", {"user_ids": [bob.id]})
    assert response.status_code == 200, response.content
    assert response.json()["added"] == [bob.id]
    assert bob.unread() == {"badge": 0, "conversations": {str(gid): 0}, "mentions": {}}
    item = listing_of(bob, gid)
    assert item["unread"] == 0
    assert item["muted"] is False
    assert Membership.objects.filter(conversation_id=gid, user=bob.user).count() == 1
    send_and_fanout(alice, gid, 1, prefix="after")
    assert bob.unread() == {"badge": 1, "conversations": {str(gid): 1}, "mentions": {}}
    assert counter_mismatches() == []


# ---- DELETE /conversations/{id}/members/{user_id} ----------------------------------------


def test_member_leaves(make_member):
    """Leaving answers 204 and drops the group from list, counts and badge (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    did = create_direct(alice, bob)
    send_and_fanout(alice, gid, 2)
    send_and_fanout(alice, did, 1, prefix="dm")
    assert bob.unread() == {"badge": 3, "conversations": {str(gid): 2, str(did): 1}, "mentions": {}}
    response = bob.delete(f"/conversations/{gid}/members/{bob.id}")
    assert response.status_code == 204, response.content
    assert response.content == b""
    assert bob.unread() == {"badge": 1, "conversations": {str(did): 1}, "mentions": {}}
    assert listing_of(bob, gid) is None
    assert Membership.objects.get(conversation_id=gid, user=bob.user).left_at is not None
    members = alice.post(f"/conversations/{gid}/members", {"user_ids": [alice.id]}).json()
    assert members["conversation"]["members"] == [alice.id]
    assert counter_mismatches() == []


def test_creator_removes_member(make_member):
    """The group's creator removes another member with 204 (direct fan-out)."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = create_group(alice, bob, carol)
    send_and_fanout(alice, gid, 1)
    response = alice.delete(f"/conversations/{gid}/members/{bob.id}")
    assert response.status_code == 204, response.content
    assert listing_of(bob, gid) is None
    assert bob.unread() == {"badge": 0, "conversations": {}, "mentions": {}}
    assert listing_of(carol, gid) is not None


def test_non_creator_cannot_remove_other(make_member):
    """A member who did not create the group gets 403 removing someone else; nothing changes."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = create_group(alice, bob, carol)
    everyone = [alice, bob, carol]
    snapshot(everyone)
    before = snapshot(everyone)
    for target in (carol, alice):
        response = bob.delete(f"/conversations/{gid}/members/{target.id}")
        assert_error(response, 403, "forbidden")
    assert snapshot(everyone) == before


def test_creator_removing_twice_is_idempotent(make_member):
    """Removing a member who already left answers 204 again and changes nothing."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    assert alice.delete(f"/conversations/{gid}/members/{bob.id}").status_code == 204
    snapshot([alice, bob])
    before = snapshot([alice, bob])
    assert alice.delete(f"/conversations/{gid}/members/{bob.id}").status_code == 204
    assert snapshot([alice, bob]) == before


def test_self_leave_twice_is_idempotent(make_member):
    """A member leaving a group twice gets 204 both times; the second changes nothing."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    assert bob.delete(f"/conversations/{gid}/members/{bob.id}").status_code == 204
    snapshot([alice, bob])
    before = snapshot([alice, bob])
    response = bob.delete(f"/conversations/{gid}/members/{bob.id}")
    assert snapshot([alice, bob]) == before
    assert response.status_code == 204, response.content


def test_remove_unknown_user(make_member):
    """Removing a user who is not (and never was) a member, or does not exist, gets 404."""
    alice, bob, stranger = make_member("alice"), make_member("bob"), make_member("stranger")
    gid = create_group(alice, bob)
    snapshot([alice, bob])
    before = snapshot([alice, bob])
    assert_error(alice.delete(f"/conversations/{gid}/members/{stranger.id}"), 404, "not_found")
    missing = User.objects.order_by("-pk").first().pk + 1000
    assert_error(alice.delete(f"/conversations/{gid}/members/{missing}"), 404, "not_found")
    assert snapshot([alice, bob]) == before


def test_creator_who_left_cannot_remove(make_member):
    """After leaving, the creator can no longer remove members (the group is 404 to them)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    assert alice.delete(f"/conversations/{gid}/members/{alice.id}").status_code == 204
    assert_error(alice.delete(f"/conversations/{gid}/members/{bob.id}"), 404, "not_found")
    assert listing_of(bob, gid) is not None


# ---- GET /conversations ------------------------------------------------------------------


def test_conversation_list(make_member):
    """GET /conversations lists my conversations with their counts (direct fan-out)."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    quiet = create_group(alice, bob, title="quiet")
    busy = create_group(alice, bob, title="busy")
    did = create_direct(bob, alice)
    create_group(alice, carol, title="not bob's")
    send_and_fanout(alice, busy, 3)
    send_and_fanout(bob, did, 1, prefix="dm")
    assert bob.post(f"/conversations/{busy}/read", {"seq": 1}).status_code == 200
    assert bob.post(f"/conversations/{quiet}/mute", {"muted": True}).status_code == 200
    listing = bob.get("/conversations")
    assert listing.status_code == 200
    items = listing.json()
    assert sorted(i["id"] for i in items) == sorted([busy, did, quiet])
    by_id = {i["id"]: i for i in items}
    assert by_id[busy] == {
        "id": busy,
        "kind": "group",
        "title": "busy",
        "last_seq": 3,
        "last_read_seq": 1,
        "unread": 2,
        "unread_mentions": 0,
        "muted": False,
    }
    assert by_id[did]["kind"] == "direct"
    assert by_id[did]["unread"] == 0  # bob sent it: read for the sender
    assert by_id[did]["last_read_seq"] == 1
    assert by_id[quiet]["muted"] is True
    assert by_id[quiet]["unread"] == 0
    assert len(alice.get("/conversations").json()) == 4


def test_conversation_list_newest_activity_first(make_member):
    """GET /conversations lists the conversation with the most recent message first."""
    alice, bob = make_member("alice"), make_member("bob")
    old_busy = create_group(alice, bob, title="old but busy")
    fresh = create_group(alice, bob, title="fresh")
    quiet = create_group(alice, bob, title="no messages")
    for i in range(3):
        alice.send(old_busy, f"old {i}", client_msg_id=f"old-{i}")
    alice.send(fresh, "just now", client_msg_id="fresh-0")
    order = [i["id"] for i in bob.get("/conversations").json()]
    assert order[:2] == [fresh, old_busy], order
    assert order[2] == quiet


def test_conversation_list_empty(make_member):
    """A user without conversations gets an empty list."""
    assert make_member("alice").get("/conversations").json() == []


# ---- POST /conversations/{id}/messages ---------------------------------------------------


def test_send_message(make_member):
    """Sending answers 201 with the message and the next seq; it is read for the sender."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    response = alice.post(f"/conversations/{gid}/messages", {"body": "hi", "client_msg_id": "c1"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["seq"] == 1
    assert body["conversation_id"] == gid
    assert body["sender_id"] == alice.id
    assert body["body"] == "hi"
    assert body["client_msg_id"] == "c1"
    assert body["created_at"]
    assert Message.objects.get(pk=body["id"]).seq == 1
    second = alice.send(gid, "again")
    assert second["seq"] == 2
    assert Conversation.objects.get(pk=gid).last_seq == 2
    assert alice.unread() == {"badge": 0, "conversations": {str(gid): 0}, "mentions": {}}
    assert listing_of(alice, gid)["last_read_seq"] == 2


def test_send_replay_returns_same_message(make_member):
    """The same client_msg_id again answers 200 with the same message (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    payload = {"body": "once", "client_msg_id": "dup-1"}
    first = alice.post(f"/conversations/{gid}/messages", payload)
    assert first.status_code == 201
    fanout(first.json())
    before = row_counts()
    again = alice.post(f"/conversations/{gid}/messages", payload)
    assert again.status_code == 200, again.content
    assert again.json() == first.json()
    assert row_counts() == before
    assert Conversation.objects.get(pk=gid).last_seq == 1
    # Replaying re-sends idempotent counter updates: bob still has exactly one unread.
    fanout(again.json())
    assert unread_of(bob, gid) == 1
    assert counter_mismatches() == []


def test_send_replay_with_other_body_conflicts(make_member):
    """The same client_msg_id with a different body answers 409 and changes nothing."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    assert alice.send(gid, "original", client_msg_id="dup-2")["seq"] == 1
    snapshot([alice, bob])
    before = snapshot([alice, bob])
    response = alice.post(
        f"/conversations/{gid}/messages", {"body": "changed", "client_msg_id": "dup-2"}
    )
    body = assert_error(response, 409, "conflict")
    assert body["details"] == {"conversation_id": gid, "seq": 1}
    assert snapshot([alice, bob]) == before


def test_send_replay_in_other_conversation_conflicts(make_member):
    """A client_msg_id already used in another conversation answers 409 and changes nothing."""
    alice, bob = make_member("alice"), make_member("bob")
    first, second = create_group(alice, bob), create_group(alice, bob)
    alice.send(first, "same", client_msg_id="dup-3")
    snapshot([alice, bob])
    before = snapshot([alice, bob])
    response = alice.post(
        f"/conversations/{second}/messages", {"body": "same", "client_msg_id": "dup-3"}
    )
    assert_error(response, 409, "conflict")
    assert snapshot([alice, bob]) == before


def test_replaying_old_message_keeps_newer_unread(make_member):
    """Replaying an old send keeps newer messages unread for the sender (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    payload = {"body": "first", "client_msg_id": "old-1"}
    first = alice.post(f"/conversations/{gid}/messages", payload)
    assert first.status_code == 201
    fanout(first.json())
    send_and_fanout(bob, gid, 2, prefix="bob")
    assert unread_of(alice, gid) == 2
    again = alice.post(f"/conversations/{gid}/messages", payload)
    assert again.status_code == 200, again.content
    assert again.json()["seq"] == 1
    assert unread_of(alice, gid) == 2
    assert listing_of(alice, gid)["last_read_seq"] == 1
    assert counter_mismatches() == []


def test_client_msg_id_is_per_sender(make_member):
    """Two senders may use the same client_msg_id: two messages."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    a = alice.send(gid, "from alice", client_msg_id="same")
    b = bob.send(gid, "from bob", client_msg_id="same")
    assert (a["seq"], b["seq"]) == (1, 2)
    assert a["id"] != b["id"]


# ---- GET /conversations/{id}/messages ----------------------------------------------------


def test_history_pages(make_member):
    """History is ascending by seq, starts after after_seq, and has_more tells of a next page."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    for i in range(5):
        (alice if i % 2 == 0 else bob).send(gid, f"text {i}", client_msg_id=f"h-{i}")
    full = bob.get(f"/conversations/{gid}/messages")
    assert full.status_code == 200, full.content
    assert [m["seq"] for m in full.json()["messages"]] == [1, 2, 3, 4, 5]
    assert [m["body"] for m in full.json()["messages"]] == [f"text {i}" for i in range(5)]
    assert full.json()["has_more"] is False

    seen, after = [], 0
    while True:
        page = bob.get(f"/conversations/{gid}/messages", after_seq=after, limit=2).json()
        seen.append([m["seq"] for m in page["messages"]])
        if not page["has_more"]:
            break
        after = page["messages"][-1]["seq"]
    assert seen == [[1, 2], [3, 4], [5]]

    exact = bob.get(f"/conversations/{gid}/messages", after_seq=1, limit=4).json()
    assert [m["seq"] for m in exact["messages"]] == [2, 3, 4, 5]
    assert exact["has_more"] is False
    tail = bob.get(f"/conversations/{gid}/messages", after_seq=5).json()
    assert tail == {"messages": [], "has_more": False}
    beyond = bob.get(f"/conversations/{gid}/messages", after_seq=10**12).json()
    assert beyond == {"messages": [], "has_more": False}


def test_history_only_of_that_conversation(make_member):
    """History holds only the messages of the conversation asked for."""
    alice, bob = make_member("alice"), make_member("bob")
    one, two = create_group(alice, bob), create_group(alice, bob)
    alice.send(one, "in one")
    alice.send(two, "in two")
    messages = alice.get(f"/conversations/{one}/messages").json()["messages"]
    assert [m["body"] for m in messages] == ["in one"]
    assert {m["conversation_id"] for m in messages} == {one}


# ---- POST /conversations/{id}/read -------------------------------------------------------


def test_read_returns_counts(make_member):
    """Marking read answers {unread, badge} with the change applied (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    did = create_direct(alice, bob)
    send_and_fanout(alice, gid, 3)
    send_and_fanout(alice, did, 1, prefix="dm")
    assert bob.unread() == {"badge": 4, "conversations": {str(gid): 3, str(did): 1}, "mentions": {}}
    response = bob.post(f"/conversations/{gid}/read", {"seq": 2})
    assert response.status_code == 200, response.content
    assert response.json() == {"unread": 1, "badge": 2, "badge_version": ANY}
    assert bob.unread() == {"badge": 2, "conversations": {str(gid): 1, str(did): 1}, "mentions": {}}
    assert listing_of(bob, gid)["last_read_seq"] == 2
    assert bob.post(f"/conversations/{did}/read", {"seq": 1}).json() == {
        "unread": 0,
        "badge": 1,
        "badge_version": ANY,
    }
    assert counter_mismatches() == []


def test_read_never_moves_back(make_member):
    """Reading an older seq after a newer one keeps the lower unread (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    send_and_fanout(alice, gid, 4)
    assert bob.post(f"/conversations/{gid}/read", {"seq": 3}).json() == {
        "unread": 1,
        "badge": 1,
        "badge_version": ANY,
    }
    for seq in (1, 0, 2):
        response = bob.post(f"/conversations/{gid}/read", {"seq": seq})
        assert response.status_code == 200, response.content
        assert response.json() == {"unread": 1, "badge": 1, "badge_version": ANY}
    assert listing_of(bob, gid)["last_read_seq"] == 3
    assert Membership.objects.get(conversation_id=gid, user=bob.user).last_read_seq == 3
    assert counter_mismatches() == []


def test_read_beyond_last_seq(make_member):
    """Reading past the last seq answers 400 and changes nothing (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    send_and_fanout(alice, gid, 2)
    snapshot([alice, bob])
    before = snapshot([alice, bob])
    assert_error(bob.post(f"/conversations/{gid}/read", {"seq": 3}), 400, "bad_request")
    assert snapshot([alice, bob]) == before


def test_read_same_seq_twice_is_idempotent(make_member):
    """Marking the same seq read twice answers the same counts, changes nothing (direct
    fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    send_and_fanout(alice, gid, 3)
    first = bob.post(f"/conversations/{gid}/read", {"seq": 2}).json()
    before = snapshot([alice, bob])
    again = bob.post(f"/conversations/{gid}/read", {"seq": 2}).json()
    # the same counts; the version may have moved past the first read's own entry, never back
    assert again.pop("badge_version") >= first.pop("badge_version")
    assert again == first
    assert snapshot([alice, bob]) == before


# ---- POST /conversations/{id}/mute -------------------------------------------------------


def test_mute_and_unmute(make_member):
    """Muting takes the unread out of the badge; unmuting puts it back (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    did = create_direct(alice, bob)
    send_and_fanout(alice, gid, 3)
    send_and_fanout(alice, did, 2, prefix="dm")
    assert bob.unread()["badge"] == 5
    muted = bob.post(f"/conversations/{gid}/mute", {"muted": True})
    assert muted.status_code == 200, muted.content
    assert muted.json() == {
        "conversation_id": gid,
        "muted": True,
        "unread": 3,
        "badge": 2,
        "badge_version": ANY,
    }
    assert bob.unread() == {"badge": 2, "conversations": {str(gid): 3, str(did): 2}, "mentions": {}}
    assert listing_of(bob, gid)["muted"] is True
    # Muting again changes nothing.
    again = bob.post(f"/conversations/{gid}/mute", {"muted": True})
    first, repeat = muted.json(), again.json()
    assert repeat.pop("badge_version") >= first.pop("badge_version")  # (after the mute's entry)
    assert repeat == first
    # A message while muted counts in the conversation but not in the badge.
    send_and_fanout(alice, gid, 1, prefix="muted")
    assert bob.unread() == {"badge": 2, "conversations": {str(gid): 4, str(did): 2}, "mentions": {}}
    unmuted = bob.post(f"/conversations/{gid}/mute", {"muted": False})
    assert unmuted.json() == {
        "conversation_id": gid,
        "muted": False,
        "unread": 4,
        "badge": 6,
        "badge_version": ANY,
    }
    assert listing_of(bob, gid)["muted"] is False
    assert counter_mismatches() == []


def test_read_while_muted(make_member):
    """Reading a muted conversation lowers its count, not the badge (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    did = create_direct(alice, bob)
    send_and_fanout(alice, gid, 3)
    send_and_fanout(alice, did, 1, prefix="dm")
    bob.post(f"/conversations/{gid}/mute", {"muted": True})
    assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).json() == {
        "unread": 1,
        "badge": 1,
        "badge_version": ANY,
    }
    unmuted = bob.post(f"/conversations/{gid}/mute", {"muted": False}).json()
    assert (unmuted["unread"], unmuted["badge"]) == (1, 2)
    assert counter_mismatches() == []


def test_mute_is_per_user(make_member):
    """One member muting leaves another member's badge alone (direct fan-out)."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = create_group(alice, bob, carol)
    send_and_fanout(alice, gid, 2)
    bob.post(f"/conversations/{gid}/mute", {"muted": True})
    assert bob.unread()["badge"] == 0
    assert carol.unread()["badge"] == 2


# ---- GET /unread -------------------------------------------------------------------------


def test_unread_lists_every_conversation(make_member):
    """GET /unread has the badge and every conversation's count (direct fan-out)."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    g1 = create_group(alice, bob, carol)
    g2 = create_group(carol, bob)
    did = create_direct(bob, alice)
    send_and_fanout(alice, g1, 2)
    send_and_fanout(carol, g2, 1, prefix="c")
    assert bob.unread() == {
        "badge": 3,
        "conversations": {str(g1): 2, str(g2): 1, str(did): 0},
        "mentions": {},
    }
    assert alice.unread() == {
        "badge": 0,
        "conversations": {str(g1): 0, str(did): 0},
        "mentions": {},
    }
    assert carol.unread() == {"badge": 2, "conversations": {str(g1): 2, str(g2): 0}, "mentions": {}}
    assert counter_mismatches() == []


def test_unread_after_redis_loss(make_member, redis_clean):
    """GET /unread rebuilds from PostgreSQL when Redis lost the counters (direct fan-out)."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = create_group(alice, bob)
    send_and_fanout(alice, gid, 3)
    bob.post(f"/conversations/{gid}/read", {"seq": 1})
    redis_clean.flushdb()
    assert bob.unread() == {"badge": 2, "conversations": {str(gid): 2}, "mentions": {}}
    assert alice.unread() == {"badge": 0, "conversations": {str(gid): 0}, "mentions": {}}


# ---- GET /schema -------------------------------------------------------------------------


def test_schema_lists_paths(db):
    """GET /api/v1/schema is an OpenAPI document listing every path, without a token."""
    response = shared_client().get("/api/v1/schema")
    assert response.status_code == 200, response.content
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    expected = {
        "/api/v1/users": {"post"},
        "/api/v1/devices": {"post"},
        "/api/v1/conversations": {"get", "post"},
        "/api/v1/conversations/{conversation_id}/members": {"post"},
        "/api/v1/conversations/{conversation_id}/members/{user_id}": {"delete"},
        "/api/v1/conversations/{conversation_id}/messages": {"get", "post"},
        "/api/v1/conversations/{conversation_id}/read": {"post"},
        "/api/v1/conversations/{conversation_id}/mute": {"post"},
        "/api/v1/unread": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, sorted(paths)
        assert methods <= set(paths[path]), (path, sorted(paths[path]))
    assert "bearer" in json.dumps(schema.get("components", {})).lower()


# ---- through a real Celery worker ----------------------------------------------------------


@pytest.mark.worker
def test_group_round_trip_with_worker(transactional_db, celery_worker, make_member):
    """Through the real worker: sends raise the others' counts; read and mute answer at once."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    gid = create_group(alice, bob, carol)
    # Load the counters of everyone so the increments go through the Lua scripts.
    for m in (alice, bob, carol):
        assert m.unread() == {"badge": 0, "conversations": {str(gid): 0}, "mentions": {}}
    for i in range(3):
        alice.send(gid, f"hello {i}", client_msg_id=f"w-{i}")
    wait_until(
        lambda: unread_of(bob, gid) == 3 and unread_of(carol, gid) == 3,
        message="the worker did not count the messages",
    )
    assert alice.unread() == {"badge": 0, "conversations": {str(gid): 0}, "mentions": {}}
    assert bob.post(f"/conversations/{gid}/read", {"seq": 2}).json() == {
        "unread": 1,
        "badge": 1,
        "badge_version": ANY,
    }
    muted = carol.post(f"/conversations/{gid}/mute", {"muted": True}).json()
    assert (muted["unread"], muted["badge"]) == (3, 0)
    bob.send(gid, "reply", client_msg_id="w-reply")
    wait_until(
        lambda: unread_of(alice, gid) == 1 and unread_of(carol, gid) == 4,
        message="the worker did not count the reply",
    )
    assert bob.unread() == {"badge": 0, "conversations": {str(gid): 0}, "mentions": {}}
    assert carol.unread()["badge"] == 0
    assert alice.unread()["badge"] == 1
    assert counter_mismatches() == []


@pytest.mark.worker
def test_direct_replay_and_leave_with_worker(transactional_db, celery_worker, make_member):
    """Through the real worker: a replayed send counts once; a member who left is not counted."""
    alice, bob, carol = make_member("alice"), make_member("bob"), make_member("carol")
    did = create_direct(alice, bob)
    gid = create_group(alice, bob, carol)
    for m in (alice, bob, carol):
        m.unread()
    payload = {"body": "once", "client_msg_id": "rp-1"}
    assert alice.post(f"/conversations/{did}/messages", payload).status_code == 201
    assert alice.post(f"/conversations/{did}/messages", payload).status_code == 200
    wait_until(lambda: unread_of(bob, did) == 1, message="the worker did not count the DM")
    assert carol.delete(f"/conversations/{gid}/members/{carol.id}").status_code == 204
    alice.send(gid, "after carol left", client_msg_id="rp-2")
    wait_until(lambda: unread_of(bob, gid) == 1, message="the worker did not count the group")
    # The replay's second fan-out and the group message are processed; counts stay exact.
    wait_until(lambda: counter_mismatches() == [], timeout=5, message=str(counter_mismatches()))
    assert bob.unread() == {"badge": 2, "conversations": {str(did): 1, str(gid): 1}, "mentions": {}}
    assert carol.unread() == {"badge": 0, "conversations": {}, "mentions": {}}
