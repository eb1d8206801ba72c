"""Push notifications that carry the badge, for devices that are offline.

- **When**: a flush of the counter pipeline raised a user's badge (a message in an unmuted
  conversation they have not read) → an alert push; a read, mute or unmute changed it → a
  silent badge update. Only devices with a pushkey and not online (no live WebSocket) get
  one.
- **Throttled**: at most one push per device per ``PUSH_INTERVAL_S``. A push is scheduled
  (Redis, :mod:`offline.keys`), and ``offline.push_due`` (Celery beat, every ``PUSH_TICK_S``)
  sends what is due with the badge of that moment, so a storm becomes one push per interval
  carrying the newest badge, and an alert wins over a silent update in the same interval.
- **Unchanged badges**: a silent update is not sent when the device's last push carried the
  same badge.
- **Channel-mode groups** (large groups): a message alerts only the users it mentions; the
  badges of the other members follow from a beat task once per ``PUSH_INTERVAL_S``
  (``delivery.channel_badges``), never from a per-member write per message.
- **Backends** (``PUSH_BACKEND``): ``matrix`` speaks the Matrix push gateway API
  (``POST <PUSH_GATEWAY_URL>/_matrix/push/v1/notify``, ``counts.unread`` = the badge, and
  beside it ``counts.badge_version``, the version it was read at), so an
  existing gateway such as Sygnal delivers to APNs/FCM; a pushkey the gateway rejects is
  forgotten. ``log`` only logs (the default: ``make run`` has no gateway).
"""

import logging
import uuid
from collections.abc import Iterable

import requests
from django.conf import settings
from django.db import connection
from django.utils import timezone

from counters.selectors import counters_get
from imcore.models import Device

from . import store

logger = logging.getLogger(__name__)


class LogBackend:
    name = "log"

    def send(self, device: Device, *, badge: int, alert: bool, version: int = 0) -> bool:
        logger.info(
            "push %s to device %s of user %s: badge %s (version %s)",
            "alert" if alert else "silent update",
            device.device_id,
            device.user_id,
            badge,
            version,
        )
        return True


class MatrixBackend:
    """The Matrix push gateway API (spec: Push Gateway API, ``/_matrix/push/v1/notify``). A
    silent badge update has no ``event_id`` and ``prio: low``, as Sygnal expects."""

    name = "matrix"

    def __init__(self, url: str, timeout: float):
        self.url = url.rstrip("/") + "/_matrix/push/v1/notify"
        self.timeout = timeout
        self.http = requests.Session()

    def send(self, device: Device, *, badge: int, alert: bool, version: int = 0) -> bool:
        """Returns False when the gateway rejected the pushkey. ``counts.badge_version``, a
        custom field beside ``counts.unread`` (the badge), is the version the badge was read at:
        the app keeps the badge with the highest version, as from every other answer."""
        notification = {
            "prio": "high" if alert else "low",
            "counts": {"unread": badge, "badge_version": version},
            "devices": [
                {
                    "app_id": device.push_app_id or settings.PUSH_APP_ID,
                    "pushkey": device.pushkey,
                    "pushkey_ts": int(device.created_at.timestamp()),
                    "data": {"device_id": device.device_id},
                }
            ],
        }
        if alert:
            notification["event_id"] = f"imc-{uuid.uuid4().hex}"
            notification["type"] = "imcore.message"
        response = self.http.post(
            self.url, json={"notification": notification}, timeout=self.timeout
        )
        response.raise_for_status()
        return device.pushkey not in (response.json().get("rejected") or [])


def backend():
    if settings.PUSH_BACKEND == "matrix":
        return MatrixBackend(settings.PUSH_GATEWAY_URL, settings.PUSH_TIMEOUT_S)
    return LogBackend()


def push_badge_changed(*, user_ids: Iterable[int], alert: bool) -> int:
    """These users' badges changed: schedule a push for each of their offline devices that
    has a pushkey. Returns how many devices were scheduled."""
    user_ids = list(set(user_ids))
    if not user_ids:
        return 0
    # On every read and mention: one statement written once, not an ORM query compiled each time.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, user_id FROM imcore_device WHERE user_id = ANY(%s) AND pushkey <> ''",
            [user_ids],
        )
        devices = cursor.fetchall()
    return push_devices_badge_changed(devices=devices, alert=alert)


def push_devices_badge_changed(*, devices: list[tuple[int, int]], alert: bool) -> int:
    """:func:`push_badge_changed` for these ``(device pk, user id)`` with a pushkey."""
    if not devices:
        return 0
    online = store.presence_online({uid for _, uid in devices})
    offline = [(pk, alert) for pk, uid in devices if pk not in online.get(uid, set())]
    store.push_schedule(offline, interval_s=settings.PUSH_INTERVAL_S)
    return len(offline)


def push_send_due() -> int:
    """Send the pushes that are due, each with the user's badge now; returns how many."""
    due = store.push_take()
    if not due:
        return 0
    kinds = dict(due)
    devices = list(Device.objects.filter(pk__in=kinds).exclude(pushkey=""))
    online = store.presence_online({d.user_id for d in devices})
    sender = backend()
    sent = 0
    badges: dict[int, int] = {}
    versions: dict[int, int] = {}
    last_sent = store.push_badges_sent(d.pk for d in devices)
    carried: dict[int, int] = {}
    for device in devices:
        if device.pk in online.get(device.user_id, set()):
            continue  # it came online meanwhile: the socket brings everything
        if device.user_id not in badges:
            # the version first: the badge read after it reflects every change up to it
            versions[device.user_id] = store.current_version(device.user_id)
            badges[device.user_id] = counters_get(user_id=device.user_id).badge
        if kinds[device.pk] != "alert" and last_sent.get(device.pk) == badges[device.user_id]:
            continue  # a silent update that would change nothing on the device
        try:
            accepted = sender.send(
                device,
                badge=badges[device.user_id],
                alert=kinds[device.pk] == "alert",
                version=versions[device.user_id],
            )
        except requests.RequestException:
            logger.warning("push to device %s failed", device.pk, exc_info=True)
            continue
        sent += 1
        carried[device.pk] = badges[device.user_id]
        if not accepted:
            Device.objects.filter(pk=device.pk, pushkey=device.pushkey).update(
                pushkey="", pushkey_updated_at=timezone.now()
            )
            logger.info("the gateway rejected the pushkey of device %s: forgotten", device.pk)
    store.push_badges_note(carried)
    return sent
