"""Django settings for imcore.

Everything that differs between machines is read from the environment, with defaults that
work on a developer machine where PostgreSQL and Redis listen on 127.0.0.1:

- ``DATABASE_URL``      PostgreSQL, default ``postgres://postgres@127.0.0.1:5432/imcore``
- ``DATABASE_POOL_MAX`` connections in each process's pool (default 8; 0: no pool)
- ``DATABASE_POOL_TIMEOUT_S`` how long a request waits for a pooled connection (default 5)
- ``DATABASE_CONN_HEALTH_CHECKS`` without the pool: a ``SELECT 1`` before each request's first
  query on a reused connection (default 1; the Procfile's uWSGI runs with 0)
- ``REDIS_URL``         Redis for counters, default ``redis://127.0.0.1:6379/0``
- ``REDIS_CLUSTER_NODES`` ``host:port,host:port,...``: the hot state on a Redis Cluster instead
- ``CHANNELS_REDIS_URL`` (alias ``CHANNEL_REDIS_URL``) the Channels layer, default REDIS_URL
- ``CELERY_BROKER_URL`` Celery's broker, default ``redis://127.0.0.1:6379/1``
- ``COUNTERS_STRATEGY`` ``lua`` (default), ``watch``, ``lock`` or ``naive``
- ``DELIVERY_WRITE_PATH`` ``pipeline`` (default), ``batches`` (celery-batches) or ``fanout``
  (``COUNTERS_WRITE_PATH``, its name before the delivery app, is read when it is not set)
- ``COUNTERS_BATCHES_FLUSH_EVERY`` ``batches``: a worker runs a batch every this many task
  messages (default 1000), or every ``COUNTERS_FLUSH_INTERVAL`` seconds; a worker started
  with ``DELIVERY_WRITE_PATH=batches`` prefetches twice that many messages per process
"""

import os
from pathlib import Path

import dj_database_url
from kombu import Queue

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "imcore-dev-only-insecure-secret-key-change-me")
DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "*").split(",")
CSRF_TRUSTED_ORIGINS = [
    o for o in os.environ.get("DJANGO_CSRF_TRUSTED_ORIGINS", "").split(",") if o
] or ["http://127.0.0.1:8000", "http://localhost:8000"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "ninja",
    "django_celery_beat",
    "django_ratelimit",
    "imcore",
    "counters",
    "offline",
    "delivery",
]

# The API's calls stop at ApiMiddleware: what follows it serves the admin (its docstring).
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "imcore.middleware.ApiMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "imcore.urls"
WSGI_APPLICATION = "imcore.wsgi.application"
ASGI_APPLICATION = "imcore.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# Connections come from Django's PostgreSQL pool (psycopg_pool), one pool per process, at most
# DATABASE_POOL_MAX connections each. Under ASGI every request runs its ORM code in a thread of
# its own and Django's connections belong to a thread, so persistent connections
# (CONN_MAX_AGE) would open a session per request and leave it open until PostgreSQL refuses
# more (`make bench` saw 503s at 16 concurrent senders); the pool lends one connection per
# request and takes it back at the end. DATABASE_POOL_MAX=0 turns the pool off (then
# DATABASE_CONN_MAX_AGE applies, as under a WSGI server): the Procfile's uWSGI workers run
# so, each thread keeping its own connection. DATABASE_CONN_HEALTH_CHECKS=0 drops the
# `SELECT 1` that Django then sends before a request's first query on a reused connection; a
# connection that broke meanwhile fails that one request (503) and is closed after it, as a
# broken pooled connection does (the pool checks none either).
DATABASE_POOL_MAX = env_int("DATABASE_POOL_MAX", 8)
# How long a request waits for a pooled connection before the API answers 503, in seconds.
# While PostgreSQL is down the pool cannot connect and every request waits this long: keep it
# well below a client's patience (the fault tests require an answer within 10 s).
DATABASE_POOL_TIMEOUT_S = float(os.environ.get("DATABASE_POOL_TIMEOUT_S", "5"))
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/imcore"),
        conn_max_age=0 if DATABASE_POOL_MAX else env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=not DATABASE_POOL_MAX and env_bool("DATABASE_CONN_HEALTH_CHECKS", True),
    )
}
# Server-side binding: psycopg sends the parameters apart from the statement, instead of
# quoting each one into the SQL text in Python. With it, psycopg prepares a statement it has
# run DATABASE_PREPARE_THRESHOLD (5) times on a connection, so PostgreSQL parses and plans it
# once per pooled connection: half of PostgreSQL's CPU for a send (Django turns this off by
# default for transaction-mode poolers such as PgBouncer; set 0 behind one).
if os.environ.get("DATABASE_SERVER_SIDE_BINDING", "1") == "1":
    DATABASES["default"].setdefault("OPTIONS", {})["server_side_binding"] = True
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = (
        env_int("DATABASE_PREPARE_THRESHOLD", 5) or None
    )
if DATABASE_POOL_MAX:
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 0,  # a process that never queries (or idles) holds no session
        "max_size": DATABASE_POOL_MAX,
        "max_idle": 300,
        "timeout": DATABASE_POOL_TIMEOUT_S,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "imcore.User"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}

# --- HTTP API -------------------------------------------------------------------------------
# Whether POST /api/v1/users (self sign-up) is open.
API_SIGNUP_ENABLED = env_bool("API_SIGNUP_ENABLED", True)
# Longest message body, in characters.
MESSAGE_BODY_MAX_CHARS = env_int("MESSAGE_BODY_MAX_CHARS", 8000)
# Most user ids one message may mention (``mentions``); larger lists get 422.
MESSAGE_MENTIONS_MAX = env_int("MESSAGE_MENTIONS_MAX", 1000)
# How long after sending (seconds) its sender may recall (DELETE) or edit (PATCH) a message.
# A group's creator may recall any message of the group at any time.
MESSAGE_RECALL_WINDOW_S = env_int("MESSAGE_RECALL_WINDOW_S", 24 * 3600)
# Most members a group may have.
GROUP_MAX_MEMBERS = env_int("GROUP_MAX_MEMBERS", 50_000)
# Large groups run in channel mode (docs/channel-mode.md): a message costs O(1) whatever the
# group's size, and each member's unread is the conversation's top minus the member's read
# pointer. A group converts when its active members reach LARGE_GROUP_MIN_MEMBERS and back
# only when they fall to LARGE_GROUP_EXIT_MEMBERS (hysteresis: a group near the line converts
# at most once per MIN - EXIT joins or leaves). 1,000: below it the aggregate path costs at
# most ~1,000 counter calls per flush and every member keeps per-message sync entries; above
# it the per-member work dominates a storm (make bench-storm).
LARGE_GROUP_MIN_MEMBERS = env_int("LARGE_GROUP_MIN_MEMBERS", 1000)
LARGE_GROUP_EXIT_MEMBERS = env_int("LARGE_GROUP_EXIT_MEMBERS", LARGE_GROUP_MIN_MEMBERS * 4 // 5)
if not 0 <= LARGE_GROUP_EXIT_MEMBERS < LARGE_GROUP_MIN_MEMBERS:
    raise ValueError("LARGE_GROUP_EXIT_MEMBERS must be below LARGE_GROUP_MIN_MEMBERS")
# Conversion: memberships re-sent per pipelined chunk.
LARGE_GROUP_CONVERT_CHUNK = env_int("LARGE_GROUP_CONVERT_CHUNK", 1000)
# Largest request body the API accepts, in bytes; larger ones get 413 before any parsing. The
# default holds every body the OpenAPI schema allows, so a 413 always means a body the schema
# forbids: a message of MESSAGE_BODY_MAX_CHARS characters outside the BMP written as \u escapes
# (12 bytes each) with MESSAGE_MENTIONS_MAX ids of 19 digits, or a group of GROUP_MAX_MEMBERS
# such ids; 16 KiB cover the rest.
API_SCHEMA_BODY_BYTES = (
    max(12 * MESSAGE_BODY_MAX_CHARS + 21 * MESSAGE_MENTIONS_MAX, 21 * GROUP_MAX_MEMBERS) + 16 * 1024
)
API_MAX_BODY_BYTES = env_int("API_MAX_BODY_BYTES", API_SCHEMA_BODY_BYTES)
DATA_UPLOAD_MAX_MEMORY_SIZE = API_MAX_BODY_BYTES
# Largest page of GET .../messages.
MESSAGES_PAGE_MAX = env_int("MESSAGES_PAGE_MAX", 200)

# --- sign-up and login rate limits (imcore.ratelimit) -----------------------------------------
# Attempts per username and per client address, in django-ratelimit's "<count>/<period>"
# (period s, m, h or d: "10/m" is ten a minute); empty: no limit. Counted in Redis.
AUTH_RATE_LOGIN_PER_USERNAME = os.environ.get("AUTH_RATE_LOGIN_PER_USERNAME", "10/m")
AUTH_RATE_LOGIN_PER_ADDRESS = os.environ.get("AUTH_RATE_LOGIN_PER_ADDRESS", "60/m")
AUTH_RATE_SIGNUP_PER_USERNAME = os.environ.get("AUTH_RATE_SIGNUP_PER_USERNAME", "5/m")
AUTH_RATE_SIGNUP_PER_ADDRESS = os.environ.get("AUTH_RATE_SIGNUP_PER_ADDRESS", "20/h")

# --- bearer-token cache (imcore.services.device_authenticate_cached) -------------------------
# How long a token's device is cached in Redis (seconds; 0: no cache, every call reads
# PostgreSQL). Revocations drop it at once; this bounds one made behind the services' back.
AUTH_TOKEN_CACHE_TTL_S = env_int("AUTH_TOKEN_CACHE_TTL_S", 300)
# How long a revoked token's tombstone keeps a look-up that read it before the revocation
# from caching it (seconds); far longer than AUTH_TOKEN_FILL_MAX_S.
AUTH_TOKEN_REVOKED_TTL_S = env_int("AUTH_TOKEN_REVOKED_TTL_S", 86400)
# A look-up whose PostgreSQL read took longer than this (seconds) does not cache.
AUTH_TOKEN_FILL_MAX_S = float(os.environ.get("AUTH_TOKEN_FILL_MAX_S", "5"))
# Tokens each server process keeps a copy of, kept exact by Redis's key tracking, so that a
# look-up costs no round trip (imcore.tracked; 0: every look-up reads Redis). Not on Redis
# Cluster.
AUTH_TOKEN_LOCAL_CACHE_SIZE = env_int("AUTH_TOKEN_LOCAL_CACHE_SIZE", 10_000)

# --- Redis and counters ---------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# Redis Cluster for the hot state (counters, delivery queues, offline store, versions,
# presence, push schedules): "host:port,host:port,..." (any of its nodes; the client learns
# the rest). Empty: all of it lives on REDIS_URL. The Celery broker, the Channels layer and the
# rate-limit cache stay on plain Redis (CELERY_BROKER_URL, CHANNELS_REDIS_URL, REDIS_URL).
REDIS_CLUSTER_NODES = [
    n.strip() for n in os.environ.get("REDIS_CLUSTER_NODES", "").split(",") if n.strip()
]
# Consistency strategy of the counter store: lua (default), watch, lock, naive.
COUNTERS_STRATEGY = os.environ.get("COUNTERS_STRATEGY", "lua")
# `lock` strategy: lock lifetime (PX) and how long a writer waits for it, in milliseconds.
COUNTERS_LOCK_TTL_MS = env_int("COUNTERS_LOCK_TTL_MS", 2000)
COUNTERS_LOCK_WAIT_MS = env_int("COUNTERS_LOCK_WAIT_MS", 5000)
# `watch` strategy: optimistic transaction attempts before giving up.
COUNTERS_WATCH_MAX_RETRIES = env_int("COUNTERS_WATCH_MAX_RETRIES", 100)
# How often Celery beat rebuilds every user's counters from PostgreSQL, in seconds (0 = never).
COUNTERS_RECONCILE_INTERVAL_S = env_int("COUNTERS_RECONCILE_INTERVAL_S", 6 * 3600)

# --- counter aggregation pipeline (storms) --------------------------------------------------
# How a committed message reaches its members (counters, sync entries, pushes; the delivery
# app): "pipeline" (sharded durable queues, Timer, Flusher, Aggregator), "batches" (one
# celery-batches task message per message, buffered and folded in the worker, applied by the
# Aggregator's code) or "fanout" (one Celery task per message, the foundation's path, kept for
# comparison). COUNTERS_WRITE_PATH is its old name, still read when DELIVERY_WRITE_PATH is unset.
DELIVERY_WRITE_PATH = os.environ.get(
    "DELIVERY_WRITE_PATH", os.environ.get("COUNTERS_WRITE_PATH", "pipeline")
)
if DELIVERY_WRITE_PATH not in {"pipeline", "batches", "fanout"}:
    raise ValueError(f"DELIVERY_WRITE_PATH={DELIVERY_WRITE_PATH!r}: pipeline, batches or fanout")
# "batches": a worker applies its buffer every this many task messages (or every
# COUNTERS_FLUSH_INTERVAL seconds, whichever comes first).
COUNTERS_BATCHES_FLUSH_EVERY = env_int("COUNTERS_BATCHES_FLUSH_EVERY", 1000)
# "batches": a batch that failed on Redis or PostgreSQL sends its events again, each event at
# most this many times (1 s, 2 s, 4 s ... apart, at most 60 s); then it is dropped and logged,
# and the next message of its conversation or the reconcile repairs the counts.
COUNTERS_BATCHES_MAX_RESENDS = env_int("COUNTERS_BATCHES_MAX_RESENDS", 8)
# Number of queue shards (Redis Streams); a conversation always goes to shard id % N.
# Drain the queues (no traffic, Timer running) before lowering it: higher shards are not read.
COUNTERS_SHARDS = env_int("COUNTERS_SHARDS", 8)
# Flusher: a shard holding this many events is flushed at once, in events.
COUNTERS_FLUSH_THRESHOLD = env_int("COUNTERS_FLUSH_THRESHOLD", 1000)
# Timer: Celery beat flushes every non-empty shard this often, in seconds.
COUNTERS_FLUSH_INTERVAL = float(os.environ.get("COUNTERS_FLUSH_INTERVAL", "1.0"))
# Aggregator: events read from a shard per batch.
COUNTERS_BATCH_SIZE = env_int("COUNTERS_BATCH_SIZE", 2000)
# Aggregator: a shard's lock lives this long, in milliseconds; a worker that died holding it
# delays that shard by at most this much, then the next aggregator takes its unacked events.
COUNTERS_SHARD_LOCK_TTL_MS = env_int("COUNTERS_SHARD_LOCK_TTL_MS", 10_000)
# Aggregator: one task works a shard at most this long, in seconds, then hands over.
COUNTERS_AGGREGATE_BUDGET_S = float(os.environ.get("COUNTERS_AGGREGATE_BUDGET_S", "5"))
# Aggregator: users whose counters a batch applies between two renewals of the shard lock.
COUNTERS_APPLY_CHUNK_USERS = env_int("COUNTERS_APPLY_CHUNK_USERS", 20_000)
# Flushes kept for the admin page.
COUNTERS_RECENT_FLUSHES = env_int("COUNTERS_RECENT_FLUSHES", 100)
# Test-only failpoints (the kill and pause tests arm them in Redis); off in production.
COUNTERS_FAILPOINTS = env_bool("COUNTERS_FAILPOINTS", False)

# --- multi-device sync (offline store) ------------------------------------------------------
# Entries older than this are dropped by the periodic trim, in seconds (default 7 days); the
# Redis keys of a user without writes for this long expire.
OFFLINE_RETENTION_S = env_int("OFFLINE_RETENTION_S", 7 * 24 * 3600)
# Most entries kept per user; past it the oldest go at once (on write).
OFFLINE_MAX_ENTRIES = env_int("OFFLINE_MAX_ENTRIES", 1000)
# How often Celery beat runs the trim (retention and entries every device acknowledged), in s.
OFFLINE_TRIM_INTERVAL_S = env_int("OFFLINE_TRIM_INTERVAL_S", 600)
# Versions PostgreSQL's bound moves ahead at a time: one database write per user per this
# many versions; after Redis loses a user, versions jump by up to this much.
OFFLINE_VERSION_STEP = env_int("OFFLINE_VERSION_STEP", 10_000)
# Pages of GET /api/v1/sync: default and largest `limit`.
SYNC_PAGE_DEFAULT = env_int("SYNC_PAGE_DEFAULT", 200)
SYNC_PAGE_MAX = env_int("SYNC_PAGE_MAX", 1000)
# Messages per conversation in the gap snapshot.
SYNC_SNAPSHOT_MESSAGES = env_int("SYNC_SNAPSHOT_MESSAGES", 3)
# /sync's ``channels`` lists a large group whose top changed after the time of the device's
# ``since`` entry minus this margin (ms): the clock skew between Redis nodes, with room.
SYNC_CHANNELS_MARGIN_MS = env_int("SYNC_CHANNELS_MARGIN_MS", 2000)
# Delayed acks (and last-seen times): written to PostgreSQL this often (s), or at once when
# this many devices have acks waiting.
SYNC_ACK_FLUSH_INTERVAL_S = float(os.environ.get("SYNC_ACK_FLUSH_INTERVAL_S", "2.0"))
SYNC_ACK_FLUSH_THRESHOLD = env_int("SYNC_ACK_FLUSH_THRESHOLD", 5000)
# A device unseen for this long (s) "comes back" on its next call: its package is prepared.
SYNC_AWAY_AFTER_S = env_int("SYNC_AWAY_AFTER_S", 300)
# How long a prepared package or snapshot is kept (s).
SYNC_PACKAGE_TTL_S = env_int("SYNC_PACKAGE_TTL_S", 600)

# The rate limits' counters live in Redis (never per-process memory: every server process
# must see the same counts), under their own key prefix.
RATELIMIT_REDIS_URL = os.environ.get("RATELIMIT_REDIS_URL", REDIS_URL)
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "ratelimit": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": RATELIMIT_REDIS_URL,
        "KEY_PREFIX": "imc:rl",
    },
}
RATELIMIT_USE_CACHE = "ratelimit"
RATELIMIT_CACHE_PREFIX = ""  # the cache's KEY_PREFIX is enough
# Where the client address is: REMOTE_ADDR (None), or a header a reverse proxy sets. Behind
# `make run`'s nginx, uWSGI gets the client's address as REMOTE_ADDR (bin/nginx.conf). A header
# only for a server no client reaches but through a proxy that overwrites it, or clients choose
# their address.
RATELIMIT_IP_META_KEY = os.environ.get("RATELIMIT_IP_META_KEY") or None
# django-ratelimit lists only django-redis among Redis caches; Django's own RedisCache does an
# atomic INCR as well.
SILENCED_SYSTEM_CHECKS = ["django_ratelimit.W001"]

# --- live sync over WebSocket and presence -----------------------------------------------------
# The channel layer (Django Channels) that carries "new entries" pokes to connected devices.
# CHANNEL_REDIS_URL (the name issue 16 uses) is an alias of CHANNELS_REDIS_URL. Several URLs,
# comma separated, shard the layers over that many Redis servers (channels_redis hashes each
# channel and group name to one of its hosts; docs/scale-out.md).
CHANNELS_REDIS_URL = os.environ.get(
    "CHANNELS_REDIS_URL", os.environ.get("CHANNEL_REDIS_URL", REDIS_URL)
)
CHANNELS_REDIS_URLS = [u.strip() for u in CHANNELS_REDIS_URL.split(",") if u.strip()]
RELAY_LAYER = "relay"
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 reads with a 5 s socket timeout by default, the same as the
            # layer's blocking BZPOPMIN: give the blocking reads room;
            # and its pools stop at 100 connections, which a wave of connects or disconnects
            # on one server process exceeds.
            "hosts": [
                {"address": url, "socket_timeout": 15, "max_connections": 2000}
                for url in CHANNELS_REDIS_URLS
            ],
            "prefix": "imc:ws",
            # Pokes are tiny; a process's inbox holds this many before the layer drops them.
            "capacity": 100_000,
        },
    },
    # The relay of channel-mode groups' messages (``sync.c.<cid>`` groups only): Redis pub/sub,
    # so one PUBLISH per message whatever the number of connected members (the default layer
    # runs per-channel commands for every socket of the group); each server process subscribes
    # once per group. Nothing is queued for a process that is not listening: a device that
    # misses a relayed message learns it from ``/sync``'s ``channels``.
    RELAY_LAYER: {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": CHANNELS_REDIS_URLS, "prefix": "imc:ws:relay:"},
    },
}
# A connected device is online for this long (s) after the server last refreshed it (every
# third of it while the socket lives); the ASGI server pings every third of it and closes a
# connection that does not answer, so one that dies without a close frame drops out by itself.
PRESENCE_TTL_S = float(os.environ.get("PRESENCE_TTL_S", "60"))
# Entries per WebSocket frame of the offline package and of live updates.
SYNC_WS_FRAME_ENTRIES = env_int("SYNC_WS_FRAME_ENTRIES", 500)

# --- push notifications for offline devices ----------------------------------------------------
# "log" (default: logs each push) or "matrix" (a Matrix push gateway such as Sygnal).
PUSH_BACKEND = os.environ.get("PUSH_BACKEND", "log")
PUSH_GATEWAY_URL = os.environ.get("PUSH_GATEWAY_URL", "http://127.0.0.1:5000")
# app_id sent with pushkeys registered without one.
PUSH_APP_ID = os.environ.get("PUSH_APP_ID", "org.imcore.app")
# At most one push per device this often (s); each carries the newest badge.
PUSH_INTERVAL_S = float(os.environ.get("PUSH_INTERVAL_S", "10"))
# How often Celery beat sends the pushes that are due (s), and the gateway's timeout (s).
PUSH_TICK_S = float(os.environ.get("PUSH_TICK_S", "1.0"))
PUSH_TIMEOUT_S = float(os.environ.get("PUSH_TIMEOUT_S", "5"))

# --- Celery ---------------------------------------------------------------------------------
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/1")
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 4
if DELIVERY_WRITE_PATH == "batches":
    # celery-batches keeps the messages it buffers unacknowledged until their batch has run
    # (acks_late), and the broker stops delivering at the prefetch limit (multiplier x
    # processes): with 4 x 2 the buffer never reaches COUNTERS_BATCHES_FLUSH_EVERY and only the
    # interval flushes it, 8 messages at a time. Room for a full buffer plus the batch being
    # applied, per process. It applies to every queue of the worker (Celery has no per-task
    # prefetch): run the counters queue on workers of its own where that matters.
    CELERY_WORKER_PREFETCH_MULTIPLIER = 2 * COUNTERS_BATCHES_FLUSH_EVERY
CELERY_TASK_DEFAULT_QUEUE = "default"
# Declared up front so `celery purge`, Flower and the workers' -Q see both queues.
CELERY_TASK_QUEUES = (Queue("default"), Queue("counters"))
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A request that publishes a task (the Flusher, a package to prepare) answers within 10 s when
# the broker is gone or hangs: bounded socket waits (the workers' BRPOP polls every second, so
# 5 s never cuts it) and one retry of a publish.
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_timeout": 5, "socket_connect_timeout": 2}
# A publish first makes sure of its connection: kombu retries the connect, 2 s apart, for up
# to this many seconds (Celery's default 4), which would be 4 s of a request's 10.
CELERY_BROKER_CONNECTION_TIMEOUT = 2
# Every publish of a task is bounded by this, its task-sent event's too (imcore.celery.App).
CELERY_TASK_PUBLISH_RETRY_POLICY = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}
# Beat's schedule starts from these entries; with the DatabaseScheduler (`make run`) they are
# stored by django-celery-beat and can be edited in the admin.
CELERY_BEAT_SCHEDULE = {
    "counters-timer": {"task": "counters.timer", "schedule": COUNTERS_FLUSH_INTERVAL},
}
CELERY_BEAT_SCHEDULE["offline-flush-acks"] = {
    "task": "offline.flush_acks",
    "schedule": SYNC_ACK_FLUSH_INTERVAL_S,
}
CELERY_BEAT_SCHEDULE["offline-push-due"] = {"task": "offline.push_due", "schedule": PUSH_TICK_S}
# The badges of channel-mode groups' members, once per push interval (not per message).
CELERY_BEAT_SCHEDULE["delivery-channel-badges"] = {
    "task": "delivery.channel_badges",
    "schedule": PUSH_INTERVAL_S,
}
CELERY_BEAT_SCHEDULE["offline-trim"] = {
    "task": "offline.trim",
    "schedule": float(OFFLINE_TRIM_INTERVAL_S),
}
if COUNTERS_RECONCILE_INTERVAL_S > 0:
    CELERY_BEAT_SCHEDULE["counters-reconcile-all"] = {
        "task": "counters.reconcile",
        "schedule": float(COUNTERS_RECONCILE_INTERVAL_S),
    }
