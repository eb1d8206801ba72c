"""The admin pages open and show the counters beside the truth."""

import pytest
from django.contrib import admin

from delivery.services import delivery_fanout
from imcore.models import Membership, User


@pytest.fixture
def admin_client(client, db):
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_admin_pages_open(admin_client, make_member):
    """Every model's list and a conversation's page answer 200; memberships show the unread
    from PostgreSQL and from Redis."""
    alice, bob = make_member("alice"), make_member("bob")
    gid = alice.post("/conversations", {"kind": "group", "members": [bob.id]}).json()["id"]
    seq = alice.send(gid, "hello")["seq"]
    delivery_fanout(conversation_id=gid, seq=seq, sender_id=alice.id)
    bob.unread()
    for url in (
        "/admin/",
        "/admin/imcore/conversation/",
        f"/admin/imcore/conversation/{gid}/change/",
        "/admin/imcore/membership/",
        "/admin/imcore/message/",
        "/admin/imcore/device/",
        "/admin/imcore/user/",
        "/admin/offline/versionbound/",
    ):
        assert admin_client.get(url).status_code == 200, url
    page = admin_client.get("/admin/imcore/membership/").content.decode().lower()
    assert "unread (postgresql)" in page and "unread (redis)" in page
    membership_admin = admin.site._registry[Membership]
    row = Membership.objects.select_related("conversation").get(user=bob.user, conversation=gid)
    assert membership_admin.unread_truth(row) == 1
    assert membership_admin.unread_redis(row) == 1


def test_admin_cannot_add_or_edit_invariant_rows(admin_client, make_member):
    """Messages and memberships are read-only; conversations cannot be added by hand."""
    assert admin_client.get("/admin/imcore/message/add/").status_code == 403
    assert admin_client.get("/admin/imcore/membership/add/").status_code == 403
    assert admin_client.get("/admin/imcore/conversation/add/").status_code == 403


def test_admin_shows_each_devices_ack_against_the_users_latest(admin_client, make_member):
    from imcore.models import Device
    from offline import services as sync

    alice, bob = make_member("alice"), make_member("bob")
    gid = alice.post("/conversations", {"kind": "group", "members": [bob.id]}).json()["id"]
    latest = bob.get("/sync").json()["latest_version"]
    assert bob.post("/sync/ack", {"version": latest}).status_code == 200
    page = admin_client.get("/admin/imcore/device/").content.decode().lower()
    assert "acked version" in page and "user&#x27;s latest version" in page
    device_admin = admin.site._registry[Device]
    device = Device.objects.get(user=bob.user)
    assert device_admin.acked(device) == latest  # pending in Redis, not flushed yet
    sync.offline_flush_acks()
    device.refresh_from_db()
    assert device.acked_version == latest and device_admin.behind(device) == 0
    assert gid


def test_deleting_devices_in_the_admin_logs_them_out(
    admin_client, make_member, django_capture_on_commit_callbacks
):
    """The admin's delete (one device, or a selection) goes through the logout service: the
    rows go and Redis forgets the devices' presence."""
    from imcore import services
    from imcore.models import Device
    from offline import store

    alice = make_member("alice")
    for name in ("laptop", "tablet", "watch"):
        services.device_login(
            username="alice", password="pw-for-tests-1", device_id=name, platform="ios"
        )
    pks = dict(Device.objects.filter(user=alice.user).values_list("device_id", "pk"))
    for pk in pks.values():
        store.presence_touch(user_id=alice.id, device_pk=pk, ttl_s=60)
    with django_capture_on_commit_callbacks(execute=True):
        one = admin_client.post(f"/admin/imcore/device/{pks['watch']}/delete/", {"post": "yes"})
        selected = admin_client.post(
            "/admin/imcore/device/",
            {
                "action": "delete_selected",
                "_selected_action": [pks["laptop"], pks["tablet"]],
                "post": "yes",
            },
        )
    assert one.status_code == 302 and selected.status_code == 302
    assert list(Device.objects.filter(user=alice.user).values_list("device_id", flat=True)) == [
        "phone"
    ]
    assert store.presence_online([alice.id])[alice.id] == {pks["phone"]}
