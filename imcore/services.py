"""Writes of the messaging domain. Each service validates what only it can know, changes
PostgreSQL in one transaction and then tells :mod:`delivery` what happened (after commit),
which updates counters, sync entries and pushes, so Redis only ever hears of committed
changes. Those updates are idempotent, so a client that retries a request after a 503 repairs
Redis without changing PostgreSQL twice."""

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from functools import cache, partial
from pathlib import Path

import redis
from django.conf import settings
from django.contrib.auth import authenticate
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from counters.redis import STORE_ERRORS, get_redis, is_cluster, register_script
from counters.selectors import counters_get
from delivery.services import (
    delivery_group_size_changed,
    delivery_memberships_changed,
    delivery_message_committed,
    delivery_message_edited,
    delivery_message_recalled,
    delivery_message_sent,
    delivery_read_moved,
    delivery_sender_read,
)
from offline.selectors import badge_version
from offline.services import offline_device_seen, offline_devices_logged_out

from . import keys as token_keys
from .errors import (
    BadRequest,
    Conflict,
    NotAuthenticated,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from .models import Conversation, Device, Membership, Message, User
from .selectors import membership_get_active
from .tracked import TrackedCache, tracked_cache

logger = logging.getLogger(__name__)

LUA_DIR = Path(__file__).with_name("lua")

# ---- users and devices ---------------------------------------------------------------------


def user_create(*, username: str, password: str) -> User:
    if not settings.API_SIGNUP_ENABLED:
        raise PermissionDenied("sign-up is turned off on this server")
    user = User(username=username)
    try:
        User.username_validator(username)
        validate_password(password, user=user)
    except ValidationError as exc:
        raise BadRequest("invalid username or password", details=exc.messages) from exc
    user.set_password(password)
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError as exc:
        raise Conflict(f"username {username!r} is taken") from exc
    return user


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def device_login(
    *,
    username: str,
    password: str,
    device_id: str,
    platform: str,
    pushkey: str | None = None,
    push_app_id: str | None = None,
) -> tuple[Device, str]:
    """Log a device in; returns the device and its new bearer token (shown only now). Logging
    the same device in again replaces its token; a pushkey given registers it."""
    user = authenticate(username=username, password=password)
    if user is None:
        raise NotAuthenticated("wrong username or password")
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        # The user's row lock orders this login with a password change: a login checked
        # against the old password cannot add a device after the change logged the others out.
        current = User.objects.select_for_update().values_list("password", flat=True)
        if current.get(pk=user.pk) != user.password:
            raise NotAuthenticated("wrong username or password")
        # A new login of the same device replaces its token: the old one is revoked.
        replaced = list(
            Device.objects.filter(user=user, device_id=device_id).values_list(
                "token_hash", flat=True
            )
        )
        device, _ = Device.objects.update_or_create(
            user=user,
            device_id=device_id,
            defaults={
                "platform": platform,
                "token_hash": token_hash(token),
                **(
                    {
                        "pushkey": pushkey,
                        "push_app_id": push_app_id or "",
                        "pushkey_updated_at": timezone.now(),
                    }
                    if pushkey
                    else {}
                ),
            },
        )
    # Committed (the block above is the transaction): the replaced token is revoked before
    # the new one is answered. (Inside a caller's transaction this runs before that commits,
    # which is safe too: the tombstone keeps the old row from being cached until it does.)
    device_tokens_revoked(token_hashes=replaced)
    # A device logging in is coming back: its offline package is prepared meanwhile.
    offline_device_seen(device=device)
    return device, token


def device_pushkey_set(*, device: Device, pushkey: str, app_id: str | None) -> None:
    """Register a device's pushkey (empty: no more pushes). A device logged out while the
    request ran (its row is gone) gets 401, as its next request would."""
    fields = {"pushkey": pushkey, "push_app_id": app_id or "", "pushkey_updated_at": timezone.now()}
    if not Device.objects.filter(pk=device.pk).update(**fields):
        raise NotAuthenticated("this device was logged out")
    for name, value in fields.items():
        setattr(device, name, value)


def device_authenticate(*, token: str) -> Device | None:
    """The device of a bearer token, with its user, read from PostgreSQL (None: no such
    token)."""
    return _device_by_hash(token_hash(token))


def _device_by_hash(hashed: str) -> Device | None:
    return Device.objects.select_related("user").filter(token_hash=hashed).first()


# The fields of a device and its user that the token cache holds; any other field of the
# device or user it returns is read from PostgreSQL when first used (deferred).
_CACHED_DEVICE_FIELDS = ("id", "user_id", "device_id", "platform", "token_hash")
_CACHED_USER_FIELDS = ("id", "username", "is_active")


def device_authenticate_cached(*, token: str) -> Device | None:
    """:func:`device_authenticate` through a cache in Redis (as Zulip caches its API-key
    look-up): a hit costs one GET and no SQL. The device comes with the fields the API's
    calls use (:data:`_CACHED_DEVICE_FIELDS`, its user's :data:`_CACHED_USER_FIELDS`); the
    others are deferred (read when used).

    Why a revoked token is never served from the cache:

    - Every revocation (logout, password change, a re-login that replaces the token, a user
      deactivated or deleted) calls :func:`device_tokens_revoked` after its commit and before
      it answers: it deletes the entry and sets the token's tombstone
      (``AUTH_TOKEN_REVOKED_TTL_S``) in one round trip.
    - A miss reads PostgreSQL, then caches with a script that refuses when the tombstone is
      set. A look-up that read the row before the revocation committed therefore cannot
      cache it after the revocation's delete; and one that read it after the commit found
      no row (or the new token hash). A look-up whose read took longer than
      ``AUTH_TOKEN_FILL_MAX_S`` does not cache at all (the tombstone outlives that by far).
    - Only active users are cached; an entry lives ``AUTH_TOKEN_CACHE_TTL_S`` at most, which
      bounds what a revocation made behind the services' back (SQL, a bulk ``update()``)
      leaves.
    - Redis unavailable: the look-up reads PostgreSQL and caches nothing. Redis wiped: every
      look-up misses and refills from PostgreSQL (the tombstones go too, so a fill that read
      a row before a revocation and writes after the wipe could cache it: the window is one
      look-up's duration, bounded by ``AUTH_TOKEN_FILL_MAX_S``). A revocation whose delete
      fails raises after the commit: the call answers 503 and its retry revokes again.

    ``AUTH_TOKEN_CACHE_TTL_S=0`` turns the cache off."""
    ttl = settings.AUTH_TOKEN_CACHE_TTL_S
    if ttl <= 0:
        return device_authenticate(token=token)
    hashed = token_hash(token)
    key = token_keys.token_device(hashed)
    try:
        client = get_redis()  # a cluster client connects when first made
        local = _local_tokens(client)
        cached, mark = local.get(key) if local is not None else (None, None)
        if cached is not None:
            return _device_from_cache(cached)  # the process's copy: no round trip
        if mark is None:
            cached = client.get(key)
        else:
            cached, ttl_ms = client.pipeline(transaction=False).get(key).pttl(key).execute()
    except STORE_ERRORS:
        logger.warning("token cache unavailable; reading PostgreSQL", exc_info=True)
        return device_authenticate(token=token)
    if cached is not None:
        if mark is not None:
            local.put(key, cached, ttl_ms, mark)
        return _device_from_cache(cached)
    started = time.monotonic()
    device = _device_by_hash(hashed)
    if (
        device is not None
        and device.user.is_active
        and time.monotonic() - started < settings.AUTH_TOKEN_FILL_MAX_S
    ):
        entry = json.dumps(
            [
                [getattr(device, f) for f in _CACHED_DEVICE_FIELDS],
                [getattr(device.user, f) for f in _CACHED_USER_FIELDS],
            ]
        )
        try:
            _token_fill_script(client)(
                keys=[token_keys.token_device(hashed), token_keys.token_revoked(hashed)],
                args=[entry, ttl],
            )
        except STORE_ERRORS:
            logger.warning("could not cache a token", exc_info=True)
    return device


def _local_tokens(client) -> TrackedCache | None:
    """This process's copies of token entries (None: ``AUTH_TOKEN_LOCAL_CACHE_SIZE=0``, or
    Redis Cluster)."""
    size = settings.AUTH_TOKEN_LOCAL_CACHE_SIZE
    if size <= 0 or is_cluster():
        return None
    return tracked_cache(client, token_keys.token_prefix(), size)


def _device_from_cache(cached: str) -> Device:
    device_values, user_values = json.loads(cached)
    device = Device.from_db(connection.alias, _CACHED_DEVICE_FIELDS, device_values)
    device.user = User.from_db(connection.alias, _CACHED_USER_FIELDS, user_values)
    return device


@cache
def _token_fill_script(client: redis.Redis):
    return register_script(client, (LUA_DIR / "token_fill.lua").read_text())


def device_logout(*, device: Device) -> None:
    """Log a device out (a lost phone): its token stops working at once, its open WebSocket
    closes with 4401, its pushkey and presence are forgotten. The row is deleted, so the
    device leaves ``GET /devices``, gets no pushes and no longer holds back the trim of the
    offline store; logging the same ``device_id`` in again starts a new device."""
    _devices_logout(user_id=device.user_id, devices=[device])


def password_change(*, device: Device, old_password: str, new_password: str) -> None:
    """Change the password of the device's user; every other device of the user is logged
    out (as :func:`device_logout`), this one stays logged in."""
    user = device.user
    if not user.check_password(old_password):
        raise PermissionDenied("the old password is wrong")
    try:
        validate_password(new_password, user=user)
    except ValidationError as exc:
        raise BadRequest("the new password is not accepted", details=exc.messages) from exc
    with transaction.atomic():
        locked = User.objects.select_for_update().get(pk=user.pk)
        if locked.password != user.password:  # changed meanwhile by another request
            raise PermissionDenied("the old password is wrong")
        user.set_password(new_password)
        user.save(update_fields=["password"])
        others = list(Device.objects.filter(user=user).exclude(pk=device.pk))
        _devices_logout(user_id=user.pk, devices=others)


def _devices_logout(*, user_id: int, devices: list[Device]) -> None:
    """Delete the devices' rows; after commit, forget them wherever they are cached or
    connected."""
    if not devices:
        return
    pks = [d.pk for d in devices]
    hashes = [d.token_hash for d in devices]
    with transaction.atomic():
        Device.objects.filter(pk__in=pks, user_id=user_id).delete()
        transaction.on_commit(partial(_devices_logged_out, user_id=user_id, pks=pks, hashes=hashes))


def _devices_logged_out(*, user_id: int, pks: list[int], hashes: list[str]) -> None:
    device_tokens_revoked(token_hashes=hashes)
    offline_devices_logged_out(user_id=user_id, device_pks=pks)


def device_tokens_revoked(*, token_hashes: list[str]) -> None:
    """These tokens were revoked (their devices logged out, a re-login replaced them, their
    user was deactivated) and that is committed: drop them from the token cache and set their
    tombstones, in one round trip, before the call that revoked them answers (see
    :func:`device_authenticate_cached`). A tombstone only stops the caching: a token that is
    valid again (its user reactivated) is read from PostgreSQL until it expires."""
    if not token_hashes:
        return
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    for hashed in token_hashes:
        pipe.set(token_keys.token_revoked(hashed), 1, ex=settings.AUTH_TOKEN_REVOKED_TTL_S)
        pipe.delete(token_keys.token_device(hashed))
    pipe.execute()
    if (local := _local_tokens(client)) is not None:  # before Redis's message is read
        local.discard([token_keys.token_device(hashed) for hashed in token_hashes])


def user_tokens_revoke(*, user_id: int) -> None:
    """After the commit of the current transaction, revoke every token of the user's devices
    (the user was deactivated or is being deleted). The Django signals of :class:`User` call
    it (:mod:`imcore.apps`), so the admin's change form and any ``save()`` are covered; a
    bulk ``update()`` is not, and is bounded by ``AUTH_TOKEN_CACHE_TTL_S``."""
    hashes = list(Device.objects.filter(user_id=user_id).values_list("token_hash", flat=True))
    if hashes:
        transaction.on_commit(partial(device_tokens_revoked, token_hashes=hashes))


# ---- conversations and members -------------------------------------------------------------


def _users_exist(user_ids: Iterable[int]) -> None:
    wanted = set(user_ids)
    found = set(User.objects.filter(pk__in=wanted, is_active=True).values_list("pk", flat=True))
    if missing := sorted(wanted - found):
        raise BadRequest(f"unknown user ids: {missing}", details={"unknown_user_ids": missing})


def conversation_create(
    *, creator: User, kind: str, member_ids: list[int], title: str = ""
) -> tuple[Conversation, bool]:
    """Create a conversation; the creator is always a member. A direct conversation exists
    once per pair: asking again returns the existing one with ``created=False``."""
    others = set(member_ids) - {creator.pk}
    _users_exist(others)
    if kind == Conversation.Kind.DIRECT:
        if len(others) != 1:
            raise BadRequest("a direct conversation has exactly one other member")
        key = Conversation.direct_key_for(creator.pk, next(iter(others)))
        if existing := Conversation.objects.filter(direct_key=key).first():
            _resend_direct(existing)
            return existing, False
        title = ""
    else:
        key = None
        if len(others) + 1 > settings.GROUP_MAX_MEMBERS:
            raise BadRequest(f"a group has at most {settings.GROUP_MAX_MEMBERS} members")
    now = timezone.now()
    # A group created at the large-group size starts in channel mode (no conversion needed).
    large = key is None and len(others) + 1 >= settings.LARGE_GROUP_MIN_MEMBERS
    try:
        with transaction.atomic():
            conversation = Conversation.objects.create(
                kind=kind,
                title=title,
                direct_key=key,
                created_by=creator,
                mode=Conversation.Mode.CHANNEL if large else Conversation.Mode.AGGREGATE,
                mode_gen=1 if large else 0,
            )
            memberships = Membership.objects.bulk_create(
                Membership(user_id=uid, conversation=conversation, joined_at=now)
                for uid in sorted(others | {creator.pk})
            )
    except IntegrityError:
        if key is None:
            raise
        # Two requests raced to create the same direct pair: the other one won.
        existing = Conversation.objects.get(direct_key=key)
        _resend_direct(existing)
        return existing, False
    delivery_memberships_changed(
        memberships=memberships, conversation=conversation, last_seq=0, change="join"
    )
    return conversation, True


def _resend_direct(conversation: Conversation) -> None:
    """Asking for an existing direct pair re-sends both members' state to Redis (idempotent):
    a client retrying after a 503 repairs what the first try could not write."""
    memberships = list(Membership.objects.filter(conversation=conversation))
    delivery_memberships_changed(
        memberships=memberships,
        conversation=conversation,
        last_seq=conversation.last_seq,
        change="join",
        joined=set(),
    )


def members_add(*, actor: User, conversation: Conversation, user_ids: list[int]) -> list[int]:
    """Add users to a group (rejoining users start again at zero unread); returns the ids that
    were not members before. Users who are members already are left as they are."""
    if conversation.kind != Conversation.Kind.GROUP:
        raise BadRequest("members can only be added to a group")
    _users_exist(user_ids)
    now = timezone.now()
    with transaction.atomic():
        # The row lock holds sends back, so last_seq is exact for the joiners' read pointer.
        conv = Conversation.objects.select_for_update().get(pk=conversation.pk)
        existing = {
            m.user_id: m
            for m in Membership.objects.select_for_update().filter(
                conversation=conv, user_id__in=user_ids
            )
        }
        active = Membership.objects.filter(conversation=conv, left_at__isnull=True).count()
        joining = [uid for uid in dict.fromkeys(user_ids) if not _is_active(existing.get(uid))]
        if active + len(joining) > settings.GROUP_MAX_MEMBERS:
            raise BadRequest(f"a group has at most {settings.GROUP_MAX_MEMBERS} members")
        rejoining = [existing[uid] for uid in joining if uid in existing]
        for m in rejoining:
            m.left_at, m.joined_at, m.muted, m.rev = None, now, False, m.rev + 1
            m.last_read_seq = max(m.last_read_seq, conv.last_seq)
            m.save(update_fields=["left_at", "joined_at", "muted", "rev", "last_read_seq"])
        Membership.objects.bulk_create(
            Membership(user_id=uid, conversation=conv, joined_at=now, last_read_seq=conv.last_seq)
            for uid in joining
            if uid not in existing
        )
    # Re-send the state of every named member: idempotent, and repairs a failed earlier try.
    memberships = list(Membership.objects.filter(conversation=conv, user_id__in=user_ids))
    delivery_memberships_changed(
        memberships=memberships,
        conversation=conv,
        last_seq=conv.last_seq,
        change="join",
        joined=set(joining),
    )
    delivery_group_size_changed(conversation=conv, members=active + len(joining))
    return joining


def _is_active(membership: Membership | None) -> bool:
    return membership is not None and membership.left_at is None


def member_remove(*, actor: User, conversation: Conversation, user_id: int) -> None:
    """Leave a group (any member), or remove another member (the group's creator only)."""
    if conversation.kind != Conversation.Kind.GROUP:
        raise BadRequest("nobody can leave a direct conversation")
    if user_id != actor.pk and actor.pk != conversation.created_by_id:
        raise PermissionDenied("only the group's creator can remove other members")
    with transaction.atomic():
        membership = (
            Membership.objects.select_for_update()
            .filter(conversation=conversation, user_id=user_id)
            .first()
        )
        if membership is None:
            raise NotFound(f"user {user_id} is not a member of conversation {conversation.pk}")
        if membership.left_at is None:
            membership.left_at = timezone.now()
            membership.rev += 1
            membership.save(update_fields=["left_at", "rev"])
        conversation = _conversation_now(conversation.pk)
    delivery_memberships_changed(
        memberships=[membership],
        conversation=conversation,
        last_seq=conversation.last_seq,
        change="leave",
    )
    members = Membership.objects.filter(conversation=conversation, left_at__isnull=True).count()
    delivery_group_size_changed(conversation=conversation, members=members)


def conversation_convert(*, conversation_id: int, mode: str) -> None:
    """Convert a group to ``mode`` (``channel`` or ``aggregate``) whatever its size, in a
    Celery task (the admin's action; a later join or leave converts it again if its size says
    so)."""
    from delivery.tasks import convert_conversation

    convert_conversation.delay(conversation_id=conversation_id, force=mode)


def _conversation_now(conversation_id: int) -> Conversation:
    """The conversation's row as committed now: its last seq and its mode, read together (a
    membership change carries both, so its counters take the form of that mode)."""
    return Conversation.objects.get(pk=conversation_id)


def conversation_mute(
    *, membership: Membership, muted: bool, versioned: bool = False
) -> tuple[int, ...]:
    """Mute or unmute; the conversation's unread leaves or rejoins the badge. Returns
    ``(unread, badge)``, or with ``versioned`` ``(unread, badge, badge_version)``: the user's
    version read once the change is committed, before the counters move."""
    with transaction.atomic():
        m = Membership.objects.select_for_update().get(pk=membership.pk)
        if m.left_at is not None:
            raise NotFound(f"conversation {m.conversation_id} not found")
        if m.muted != muted:
            m.muted = muted
            m.rev += 1
            m.save(update_fields=["muted", "rev"])
        conversation = _conversation_now(m.conversation_id)
    version = (badge_version(m.user_id),) if versioned else ()
    delivery_memberships_changed(
        memberships=[m], conversation=conversation, last_seq=conversation.last_seq, change="mute"
    )
    counts = counters_get(user_id=m.user_id)
    return counts.conversations.get(m.conversation_id, 0), counts.badge, *version


# ---- messages and reads --------------------------------------------------------------------


# One statement stores a message in the common case (a member sends a new client_msg_id):
# bump the conversation's last_seq (its row lock orders concurrent sends, so seqs are dense; a
# conversion, which takes the same lock, is before the send or after it), insert the message
# and move the sender's read pointer. It is one transaction: a failed insert (the same
# client_msg_id racing with itself) rolls the bump back. It does nothing when the sender is
# not an active member, when the client_msg_id is used already, or when the mentions are not
# allowed; then the caller finds out which (see :func:`_send_refused`).
_SEND_SQL = """
WITH allowed AS (
    SELECT 1 FROM imcore_membership m JOIN imcore_conversation c ON c.id = m.conversation_id
    WHERE m.user_id = %(sender)s AND m.conversation_id = %(conversation)s
      AND m.left_at IS NULL
      AND NOT EXISTS (
          SELECT 1 FROM imcore_message
          WHERE sender_id = %(sender)s AND client_msg_id = %(client_msg_id)s
      ){checks}
), bump AS (
    UPDATE imcore_conversation
    SET last_seq = last_seq + 1, last_message_at = clock_timestamp()
    WHERE id = %(conversation)s AND EXISTS (SELECT 1 FROM allowed)
    RETURNING last_seq, mode
), stored AS (
    INSERT INTO imcore_message
        (conversation_id, seq, sender_id, client_msg_id, body, created_at, mentions, mention_all)
    SELECT %(conversation)s, last_seq, %(sender)s, %(client_msg_id)s, %(body)s, %(now)s,
           %(mentions)s::bigint[], %(mention_all)s
    FROM bump
    RETURNING id, seq
), sender_read AS (
    UPDATE imcore_membership SET last_read_seq = GREATEST(last_read_seq, stored.seq)
    FROM stored
    WHERE user_id = %(sender)s AND conversation_id = %(conversation)s
)
SELECT stored.id, stored.seq, bump.mode FROM stored, bump
"""
# mention_all: only the creator of a group.
_SEND_CHECK_MENTION_ALL = "\n      AND c.kind = 'group' AND c.created_by_id = %(sender)s"
# mentions: every one names an active member.
_SEND_CHECK_MENTIONS = """
      AND (SELECT count(*) FROM imcore_membership x
           WHERE x.conversation_id = %(conversation)s AND x.user_id = ANY(%(mentions)s::bigint[])
             AND x.left_at IS NULL) = %(mentioned)s"""


def _send_statement(
    *,
    sender_id: int,
    conversation_id: int,
    body: str,
    client_msg_id: str,
    mentioned: list[int],
    mention_all: bool,
) -> tuple[Message, str] | None:
    """Run :data:`_SEND_SQL`; returns the stored message and the conversation's mode, or None
    when the statement refused (nothing changed). The unique violation of a client_msg_id
    stored meanwhile is an IntegrityError (the statement rolled back, its seq with it)."""
    checks = (_SEND_CHECK_MENTION_ALL if mention_all else "") + (
        _SEND_CHECK_MENTIONS if mentioned else ""
    )
    now = timezone.now()
    params = {
        "sender": sender_id,
        "conversation": conversation_id,
        "client_msg_id": client_msg_id,
        "body": body,
        "now": now,
        "mentions": mentioned,
        "mention_all": mention_all,
        "mentioned": len(mentioned),
    }
    # Outside a transaction (a request) the statement commits by itself: one round trip. Inside
    # one (a caller's atomic block, a test), a savepoint keeps a unique violation from
    # breaking the caller's transaction.
    guard = transaction.atomic() if connection.in_atomic_block else nullcontext()
    with guard, connection.cursor() as cursor:
        cursor.execute(_SEND_SQL.format(checks=checks), params)
        row = cursor.fetchone()
    if row is None:
        return None
    message_id, seq, mode = row
    message = Message(
        id=message_id,
        conversation_id=conversation_id,
        seq=seq,
        sender_id=sender_id,
        client_msg_id=client_msg_id,
        body=body,
        created_at=now,
        mentions=mentioned,
        mention_all=mention_all,
    )
    message._state.adding, message._state.db = False, connection.alias
    return message, mode


def message_send(
    *,
    sender: User,
    conversation: Conversation | int,
    body: str,
    client_msg_id: str,
    mentions: Sequence[int] = (),
    mention_all: bool = False,
) -> tuple[Message, bool]:
    """Store a message with the next seq; returns ``(message, created)``. ``conversation`` is
    the conversation or its id: a sender who is not an active member gets 404, as for a
    conversation that does not exist. The same ``client_msg_id`` from the same sender returns
    the stored message (``created=False``) and re-sends its counter updates, which are
    idempotent; with another body, conversation or mentions it is a 409. Sending marks the
    conversation read for the sender up to the new message.

    ``mentions`` names active members of the conversation (anyone else: 400; duplicates are
    folded, the list is stored sorted). Mentioning yourself is allowed and counts for nobody:
    the send marks the message read for its sender. ``mention_all`` mentions every member but
    the sender: only in a group (400 in a direct conversation) and only by the group's
    creator (403).

    A new message is one SQL statement (:data:`_SEND_SQL`); only a refused one runs the
    queries that say why (:func:`_send_refused`). The message is handed over to delivery once
    committed, in one Redis round trip with the sender's own read
    (:func:`delivery.services.delivery_message_sent`). If Redis or the broker refuses it, the
    exception reaches the caller after the commit (the API answers 503); the client's retry
    with the same ``client_msg_id`` finds the stored message and hands the event over again."""
    conversation_id = conversation if isinstance(conversation, int) else conversation.pk
    mentioned = sorted(set(mentions))
    fields = {
        "sender_id": sender.pk,
        "conversation_id": conversation_id,
        "body": body,
        "client_msg_id": client_msg_id,
        "mentioned": mentioned,
        "mention_all": mention_all,
    }
    refusal = (body, client_msg_id, mentioned, mention_all)
    # A refusal that its queries do not explain (the sender rejoined in between) is tried
    # again.
    for _ in range(3):
        try:
            sent = _send_statement(**fields)
        except IntegrityError:
            # The same client_msg_id raced with itself and the other one is stored: this
            # statement rolled back, its seq bump with it, and the replay answers.
            replay, mode = _send_refused(sender, conversation_id, *refusal)
            if replay is None:
                raise
        else:
            if sent is not None:
                message, mode = sent
                if connection.in_atomic_block:
                    # The caller's transaction commits the message later: the hand-over waits
                    # for it; the sender's own read is applied now, as it always was.
                    transaction.on_commit(
                        partial(delivery_message_committed, **_delivered(message), mode=mode)
                    )
                    delivery_sender_read(
                        user_id=sender.pk, conversation_id=conversation_id, seq=message.seq
                    )
                else:
                    _message_sent(message=message, mode=mode)  # the statement committed
                return message, True
            replay, mode = _send_refused(sender, conversation_id, *refusal)
        if replay is not None:
            _message_sent(message=replay, mode=mode)
            return replay, False
    raise Unavailable("the message could not be stored; retry the same request")


def _delivered(message: Message) -> dict:
    return {
        "conversation_id": message.conversation_id,
        "seq": message.seq,
        "sender_id": message.sender_id,
        "mentions": message.mentions,
        "mention_all": message.mention_all,
    }


def _message_sent(*, message: Message, mode: str) -> None:
    """Hand a committed message over and mark it read for its sender (one Redis round
    trip)."""
    delivery_message_sent(**_delivered(message), mode=mode)


def _send_refused(
    sender: User,
    conversation_id: int,
    body: str,
    client_msg_id: str,
    mentioned: list[int],
    mention_all: bool,
) -> tuple[Message | None, str]:
    """The send statement stored nothing: raise what the sender did wrong, in the order the
    API has always checked (not a member: 404; a client_msg_id used for another message: 409;
    mentions: 400 or 403), or return the stored message of a repeated send (None: nothing
    wrong now, try the statement again), with the conversation's mode now."""
    conversation = membership_get_active(user=sender, conversation_id=conversation_id).conversation
    replay = _message_replay(sender, conversation, body, client_msg_id, mentioned, mention_all)
    if replay is None:
        _mentions_check(sender, conversation, mentioned, mention_all)
    return replay, conversation.mode


def _mentions_check(
    sender: User, conversation: Conversation, mentioned: list[int], mention_all: bool
) -> None:
    """Who a new message may mention (see :func:`message_send`)."""
    if mention_all:
        if conversation.kind != Conversation.Kind.GROUP:
            raise BadRequest("mention_all is only for groups")
        if sender.pk != conversation.created_by_id:
            raise PermissionDenied("only the group's creator can mention everyone")
    if mentioned:
        members = set(
            Membership.objects.filter(
                conversation=conversation, user_id__in=mentioned, left_at__isnull=True
            ).values_list("user_id", flat=True)
        )
        if outsiders := [uid for uid in mentioned if uid not in members]:
            raise BadRequest(
                f"mentions must name members of the conversation, not {outsiders}",
                details={"not_members": outsiders},
            )


def _message_replay(
    sender: User,
    conversation: Conversation,
    body: str,
    client_msg_id: str,
    mentioned: list[int],
    mention_all: bool,
) -> Message | None:
    message = Message.objects.filter(sender=sender, client_msg_id=client_msg_id).first()
    if message is not None and (
        message.conversation_id != conversation.pk
        or message.body != body
        or list(message.mentions) != mentioned
        or message.mention_all != mention_all
    ):
        raise Conflict(
            f"client_msg_id {client_msg_id!r} was already used for another message",
            details={"conversation_id": message.conversation_id, "seq": message.seq},
        )
    return message


# A mark-read in one statement: the conversation's last seq, whether the user is an active
# member, and the move of the read pointer (never back, never past the last seq), which only
# happens when both allow it.
_READ_SQL = """
WITH conversation AS (
    SELECT last_seq FROM imcore_conversation WHERE id = %(conversation)s
), moved AS (
    UPDATE imcore_membership SET last_read_seq = GREATEST(last_read_seq, %(seq)s)
    WHERE user_id = %(user)s AND conversation_id = %(conversation)s AND left_at IS NULL
      AND %(seq)s <= (SELECT last_seq FROM conversation)
    RETURNING 1
)
SELECT (SELECT last_seq FROM conversation),
       EXISTS (SELECT 1 FROM moved),
       EXISTS (SELECT 1 FROM imcore_membership
               WHERE user_id = %(user)s AND conversation_id = %(conversation)s
                 AND left_at IS NULL),
       ARRAY(SELECT id FROM imcore_device WHERE user_id = %(user)s AND pushkey <> '')
"""


def conversation_read(
    *, user_id: int, conversation_id: int, seq: int, versioned: bool = False
) -> tuple[int, ...]:
    """Move the user's read pointer up to ``seq`` (never back); returns ``(unread, badge)``
    with the change already visible, or with ``versioned`` ``(unread, badge, badge_version)``:
    the user's version read once the read is committed, before the counters move (the badge
    reflects every change up to it). One SQL statement (:data:`_READ_SQL`): a conversation
    the user is not an active member of is not found (404), a ``seq`` beyond its last seq is
    a 400, and neither changes anything. It also lists the user's devices with a pushkey, for
    the silent badge push (a round trip less than asking again)."""
    with connection.cursor() as cursor:
        cursor.execute(_READ_SQL, {"user": user_id, "conversation": conversation_id, "seq": seq})
        last_seq, moved, member, push_devices = cursor.fetchone()
    if not member and not moved:
        raise NotFound(f"conversation {conversation_id} not found")
    if not moved:
        raise BadRequest(f"seq {seq} is beyond the conversation's last seq {last_seq}")
    return delivery_read_moved(
        user_id=user_id,
        conversation_id=conversation_id,
        seq=seq,
        last_seq=last_seq,
        push_devices=push_devices,
        versioned=versioned,
    )


def conversation_mark_read(
    *, membership: Membership, seq: int, versioned: bool = False
) -> tuple[int, ...]:
    """:func:`conversation_read` for a membership."""
    return conversation_read(
        user_id=membership.user_id,
        conversation_id=membership.conversation_id,
        seq=seq,
        versioned=versioned,
    )


# ---- recall and edit -----------------------------------------------------------------------


def _message_for_change(
    *, actor: User, conversation_id: int, seq: int, recall: bool
) -> tuple[Message, Conversation]:
    """Inside a transaction: the message ``seq`` locked, and its conversation locked (so a
    conversion between the aggregate and channel forms is wholly before or after the change),
    after the checks: not an active member or no such seq: 404; someone else's message (a
    group's creator may recall any), or past ``MESSAGE_RECALL_WINDOW_S``: 403."""
    membership = membership_get_active(user=actor, conversation_id=conversation_id)
    conversation = Conversation.objects.select_for_update().get(pk=conversation_id)
    message = (
        Message.objects.select_for_update().filter(conversation_id=conversation_id, seq=seq).first()
    )
    if message is None:
        raise NotFound(f"no message {seq} in conversation {membership.conversation_id}")
    creator = (
        recall
        and conversation.kind == Conversation.Kind.GROUP
        and conversation.created_by_id == actor.pk
    )
    if creator:
        return message, conversation
    if message.sender_id != actor.pk:
        raise PermissionDenied(
            "only the sender may recall or edit a message (or, to recall, the group's creator)"
        )
    age = (timezone.now() - message.created_at).total_seconds()
    if age > settings.MESSAGE_RECALL_WINDOW_S and not (recall and message.deleted):
        raise PermissionDenied(
            f"the message is older than {settings.MESSAGE_RECALL_WINDOW_S} s",
            details={"window_s": settings.MESSAGE_RECALL_WINDOW_S},
        )
    return message, conversation


def message_recall(*, actor: User, conversation_id: int, seq: int) -> tuple[Message, bool]:
    """Recall (delete) message ``seq``: its sender within ``MESSAGE_RECALL_WINDOW_S``, or the
    group's creator at any time. It stays as a tombstone with its seq (seqs stay dense): its
    body is erased, ``deleted`` set; it counts for nobody any more, so every member who had
    not read it loses one unread (and one mention if it mentioned them), at once. Returns
    ``(message, changed)``: a second call changes nothing (``changed`` False) but hands the
    recall to delivery again (idempotent), which repairs what a failed first try left."""
    with transaction.atomic():
        message, conversation = _message_for_change(
            actor=actor, conversation_id=conversation_id, seq=seq, recall=True
        )
        changed = not message.deleted
        if changed:
            message.deleted = True
            message.deleted_at = timezone.now()
            message.body = ""
            message.save(update_fields=["deleted", "deleted_at", "body"])
    delivery_message_recalled(
        conversation_id=conversation_id,
        seq=seq,
        sender_id=message.sender_id,
        mentions=message.mentions,
        mode=conversation.mode,
    )
    return message, changed


def message_edit(*, actor: User, conversation_id: int, seq: int, body: str) -> Message:
    """Edit message ``seq``: its sender, within ``MESSAGE_RECALL_WINDOW_S``; a recalled
    message cannot be edited (409). Counts do not change (nor do its mentions); the edit
    count grows and ``edited_at`` is set, and every member's devices learn the new body. The
    same body again changes nothing."""
    with transaction.atomic():
        message, conversation = _message_for_change(
            actor=actor, conversation_id=conversation_id, seq=seq, recall=False
        )
        if message.deleted:
            raise Conflict(f"message {seq} was recalled")
        if message.body != body:
            message.body = body
            message.edit_count += 1
            message.edited_at = timezone.now()
            message.save(update_fields=["body", "edit_count", "edited_at"])
    delivery_message_edited(message=message, mode=conversation.mode)
    return message
