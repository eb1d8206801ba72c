"""Smoke: the API answers a full round trip."""


def test_unread_round_trip(make_member):
    """A new member sees a zero badge."""
    alice = make_member("alice")
    assert alice.unread() == {"badge": 0, "conversations": {}, "mentions": {}}
