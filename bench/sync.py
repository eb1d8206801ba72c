"""``make bench-sync``: multi-device sync through gunicorn (2 workers x 4 threads, as the
Procfile) with SQL counted per request (:func:`counted_wsgi`): catch-up, gap snapshot, entry
writes of one message to a big group, PostgreSQL writes per 1,000 acks."""

import contextlib
import datetime
import itertools
import json
import statistics
import sys
import threading
import time
import timeit
from collections import Counter
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common

common.django_setup()  # the imports below need Django's settings
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from counters.services import counters_reconcile
from delivery.pipeline import delivery_drain
from imcore import services
from imcore.models import Device, User
from offline import keys, store
from offline.services import offline_flush_acks, offline_prepare_device, offline_record_messages

QUICK = "--runs 1 --catchup-messages 100 --sweep 25,50,100 --big-group 500"  # --quick: smoke sizes

SQL_HEADER = "X-Bench-SQL"
GUNICORN = "gunicorn bench.sync:counted_wsgi --bind 127.0.0.1:$IMCORE_PORT --workers 2 --threads 4"


@contextlib.contextmanager
def sql_counted():
    """A Counter of the statements run through Django's connection: ``queries``, ``updates``
    and the ``rows`` they changed, ``last_seen`` (UPDATEs of last_seen_at) and their rows."""
    count = Counter()

    def wrapper(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        count["queries"] += 1
        if sql.lstrip()[:6].upper() == "UPDATE":
            rows, seen = max(context["cursor"].rowcount, 0), "last_seen_at" in sql
            count.update(updates=1, rows=rows, last_seen=seen, last_seen_rows=rows * seen)
        return result

    with connection.execute_wrapper(wrapper):
        yield count


def counted_wsgi(environ, start_response):
    """``imcore.wsgi.application``, plus the ``X-Bench-SQL`` header: queries, UPDATE
    statements, rows they changed, last_seen_at UPDATEs and their rows, for this request."""
    from imcore.wsgi import application

    with sql_counted() as count:

        def start(status, headers, exc_info=None):
            return start_response(status, [*headers, (SQL_HEADER, json.dumps(count))], exc_info)

        return application(environ, start)


class Http(requests.Session):
    """One keep-alive connection (a device's); :meth:`call` returns the JSON, its size and the
    server's SQL counts."""

    def call(self, method: str, path: str, token: str, payload=None) -> tuple[dict, int, Counter]:
        auth = {"Authorization": f"Bearer {token}"}
        r = self.request(method, f"{self.base}{path}", json=payload, headers=auth)
        if r.status_code != 200:
            raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
        return r.json(), len(r.content), Counter(json.loads(r.headers[SQL_HEADER]))


def sync_state(user_id: int) -> dict[str, int]:
    raw = store.client().hgetall(keys.state(user_id))
    return {k: int(raw[k]) for k in ("cur", "floor", "bound") if k in raw}


def setup(args) -> dict:
    """Every user, conversation, message and device the measurements use."""
    common.reset_data()
    # 1. catch-up: one small group; its second member's device last synced after the join.
    ids = common.make_users(args.group_members, "catchup")
    conversation = common.make_group(ids, "catch-up")
    reader, joined = ids[1], sync_state(ids[1])["cur"]
    common.send_messages(conversation.pk, [ids[0], *ids[2:]], args.catchup_messages, "catchup")
    delivery_drain()
    device = common.make_devices([reader], acked_version=joined)[0]
    out = {"catchup": {"device": device, "since": joined, "state": sync_state(reader)}}

    # 2. gap: one user in N direct conversations, each with M messages from the other side;
    # more entries than OFFLINE_MAX_ENTRIES, so the floor is above 0 and since=0 is behind it.
    gap_user, *partners = common.make_users(args.gap_conversations + 1, "gap")
    user = User.objects.get(pk=gap_user)
    for partner in partners:
        direct, _ = services.conversation_create(creator=user, kind="direct", member_ids=[partner])
        common.send_messages(direct.pk, [partner], args.gap_messages, "gap")
    counters_reconcile(user_ids=[gap_user, *partners])
    delivery_drain()
    state = sync_state(gap_user)
    if state.get("floor", 0) <= 0:
        raise RuntimeError(f"the gap user's floor is not above 0: {state}")
    out["gap"] = {"device": common.make_devices([gap_user])[0], "state": state}

    # 3 and 4. one big group (its members are loaded in Redis by their join entries).
    big = common.make_users(args.big_group, "big")
    conversation = common.make_group(big, "big", reconcile=False)
    out["big"] = {"conversation_id": conversation.pk, "members": big}
    # Fresh devices for every run of both flush modes: never acked, last seen an hour ago.
    sets, n = 2 * args.runs, args.ack_devices
    if args.big_group <= sets * n:
        raise RuntimeError("--big-group is too small for the ack runs")
    seen = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    devices = common.make_devices(big[1 : 1 + sets * n], last_seen_at=seen)
    out["ack"] = {"devices": [devices[i * n : (i + 1) * n] for i in range(sets)]}
    return out


def pull_until_done(http: Http, device: Device, since: int, limit: int) -> dict:
    """Pull pages until has_more is false; what it took."""
    trips, entries, nbytes, missing, sql, versions = 0, 0, 0, 0, Counter(), []
    gap, conversations, t0 = False, 0, time.perf_counter()
    while True:
        url = f"/api/v1/sync?since={since}&limit={limit}"
        page, size, count = http.call("GET", url, device.token)
        trips, nbytes, entries = trips + 1, nbytes + size, entries + len(page["entries"])
        sql.update(count)
        versions += [e["version"] for e in page["entries"]]
        missing += sum(1 for e in page["entries"] if e["type"] == "message" and not e["message"])
        if page["gap"]:
            gap, conversations = True, len(page["snapshot"]["conversations"])
            since = page["latest_version"]
        elif page["entries"]:
            since = page["entries"][-1]["version"]
        if not page["has_more"]:
            break
    ok = versions == sorted(set(versions)) and not missing and since == page["latest_version"]
    return {"ms": (time.perf_counter() - t0) * 1000, "round_trips": trips, "entries": entries,
            "kb": nbytes / 1024, "sql": sql["queries"], "gap": gap, "conversations": conversations,
            "ok": ok}  # fmt: skip


def run_pulls(http: Http, device, since: int, limit: int, mode: str, runs: int) -> dict:
    """``runs`` timed pulls after 2 untimed ones, each on a fresh connection, after dropping
    (cold) or preparing (prepared) the device's package, and marking the device seen (as its
    login would, so the pull sends no prepare task); the runs summarized."""
    results, prepares, prepared_as = [], [], set()
    for _ in range(2 + runs):
        package = [k(device.user_id, device.pk) for k in (keys.package, keys.snapshot)]
        store.client().delete(*package)
        if mode == "prepared":
            t0 = time.perf_counter()
            prepared_as.add(offline_prepare_device(device_pk=device.pk))
            prepares.append((time.perf_counter() - t0) * 1000)
        Device.objects.filter(pk=device.pk).update(last_seen_at=timezone.now())
        http.close()
        results.append(pull_until_done(http, device, since, limit))
    results, prepares = results[2:], prepares[2:]
    kinds = ("round_trips", "entries", "sql", "conversations")
    return {k: sorted({r[k] for r in results}) for k in kinds} | {
        "ms": [r["ms"] for r in results], "kb": common.median([r["kb"] for r in results]),
        "ok": all(r["ok"] for r in results), "gap": all(r["gap"] for r in results),
        "prepare_ms": prepares, "prepared_as": sorted(prepared_as), "mode": mode, "limit": limit,
    }  # fmt: skip


def measure_pulls(http: Http, data: dict, since: list[int], limits, modes, runs: int) -> list:
    """Pulls from each of ``since``, in each mode (cold, prepared), at each page limit."""
    out, cur = [], data["state"]["cur"]
    for mode, limit, start in [(m, x, s) for m in modes for x in limits for s in since]:
        s, n = run_pulls(http, data["device"], start, limit, mode, runs), cur - start
        out.append(s | {"behind": n, "expected_round_trips": -(-n // limit) or 1})
        print(f"  since={start} {mode} limit={limit}: {common.median(s['ms']):.0f} ms", flush=True)
    return out


def measure_entry_writes(data: dict, args) -> dict:
    """One message to the big group: its entries through the offline store, beside bumping a
    PostgreSQL row per member (one statement, or one statement per row)."""
    cid, members, n, top = data["conversation_id"], data["members"], len(data["members"]), [0]

    def record(messages: int = 1) -> None:
        top[0] += messages
        written = offline_record_messages([(u, [(cid, top[0], 0)]) for u in members])
        assert sum(b - a + 1 for a, b in written.values()) == n * messages, written

    def sql(where: str, rows: list) -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            for params in rows:
                cursor.execute(
                    f"UPDATE {table} SET latest = latest + 1 WHERE user_id {where}", params
                )
                cursor.fetchall()

    table, pipelines = "bench_sync_latest", -(-n // store.PIPELINE_CHUNK)
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE IF EXISTS {table}")
        cursor.execute(f"CREATE TABLE {table} (user_id bigint PRIMARY KEY, latest bigint)")
        cursor.execute(f"INSERT INTO {table} SELECT u, 0 FROM unnest(%s::bigint[]) u", [members])
        cursor.execute(f"VACUUM ANALYZE {table}")
    paths = [  # (what, how, messages a call, round trips); a Timer interval's flush folds 10
        ("Redis: `offline_record_messages` (Lua append, pipelined)", record, 1,
         f"{pipelines + 1} (INFO + {pipelines} pipelines)"),
        ("Redis, 10 messages folded in one flush (per message)", lambda: record(10), 10,
         f"{pipelines + 1} per 10 messages"),
        ("PostgreSQL: 1 `UPDATE … WHERE user_id = ANY(%s) RETURNING` + commit",
         lambda: sql("= ANY(%s) RETURNING latest", [[members]]), 1, "3"),
        (f"PostgreSQL: {n:,} single-row `UPDATE … RETURNING` in 1 transaction",
         lambda: sql("= %s RETURNING latest", [[u] for u in members]), 1, f"{n + 2:,}"),
    ]  # fmt: skip
    out = []
    try:
        for name, fn, k, trips in paths:
            ms = [t * 1000 / k for t in timeit.repeat(fn, number=1, repeat=args.runs + 1)[1:]]
            common.record(f"entry writes: {name} ms", ms)  # after one warm-up each
            out.append({"path": name, "ms": ms, "versions_per_s": [n / t * 1000 for t in ms],
                        "round_trips": trips})  # fmt: skip
            print(f"  {name}: {common.median(ms):.1f} ms", flush=True)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE {table}")
    data["seq"] = top[0]  # the acks' entries come after
    return {"members": n, "paths": out}


def periodic_flush(stop: threading.Event, interval: float, count: Counter, calls: list[int]):
    """What Celery beat does with ``offline.flush_acks``: flush every ``interval`` seconds (0:
    never)."""
    try:
        with sql_counted() as mine:
            while interval > 0 and not stop.wait(interval):
                calls[0] += 1
                offline_flush_acks()
        count.update(mine)
    finally:
        connection.close()


def measure_acks(http: Http, data: dict, big: dict, args) -> dict:
    """Per run, ``--ack-devices`` fresh devices each ack ``--acks-per-device`` versions,
    round-robin over one connection, while a thread flushes acks as Celery beat would (or
    nothing does); one last flush after the last ack. Statements counted where they run."""
    # Every acking user gets acks_per_device new entries (the pipeline's bulk writer).
    cid, top = big["conversation_id"], big["seq"] + args.acks_per_device
    users = [d.user_id for devices in data["devices"] for d in devices]
    written = offline_record_messages([(uid, [(cid, top, 0)]) for uid in users])
    runs, intervals = [], [settings.SYNC_ACK_FLUSH_INTERVAL_S, 0]
    for i, devices in enumerate(data["devices"]):
        interval = intervals[i // args.runs]
        server, flushed, stop, calls = Counter(), Counter(), threading.Event(), [0]
        flusher = threading.Thread(target=periodic_flush, args=(stop, interval, flushed, calls))
        flusher.start()
        http.close()
        sent, t0 = 0, time.perf_counter()
        try:
            for k, d in itertools.product(range(args.acks_per_device), devices):
                ack = {"version": written[d.user_id][0] + k}
                server.update(http.call("POST", "/api/v1/sync/ack", d.token, ack)[2])
                sent += 1
            http_s = time.perf_counter() - t0
        finally:
            stop.set()
            flusher.join()
        with sql_counted() as last:
            calls[0] += 1
            offline_flush_acks()
        flushed.update(last)
        rows = Device.objects.filter(pk__in=[d.pk for d in devices])
        acked, last = dict(rows.values_list("pk", "acked_version")), args.acks_per_device - 1
        wrong = sum(acked[d.pk] != written[d.user_id][0] + last for d in devices)
        runs.append({
            "flush_interval_s": interval, "acks": sent, "http_ms": http_s * 1000,
            "flush_calls": calls[0], "ack_updates": flushed["updates"], "ack_rows": flushed["rows"],
            "last_seen_updates": server["last_seen"], "last_seen_rows": server["last_seen_rows"],
            "other_server_updates": server["updates"] - server["last_seen"],
            "server_queries": server["queries"], "wrong_acked_version": wrong,
        })  # fmt: skip
        print(f"  acks (flush every {interval:g} s): {flushed['updates']} UPDATEs", flush=True)
    return {"runs": runs}


def one(values: list) -> str:
    return " / ".join(map(str, values))


def checks(res: dict, args) -> list[str]:
    """The pulls and ack runs that did not come out as expected (empty: all did): entries,
    round trips, snapshot conversations, order and bodies, what prepare_device made."""
    behind = res["catchup"]["entries_behind"]
    bad = [f"{'gap' if s['gap'] else 'catch-up'} {s['mode']} limit={s['limit']}"
           for s in res["catchup"]["results"] + res["gap"]["results"]
           if not s["ok"] or s["prepared_as"] not in ([], ["snapshot" if s["gap"] else "package"])
           or (s["conversations"] != [args.gap_conversations] if s["gap"] else s["entries"]
               != [behind] or s["round_trips"] != [s["expected_round_trips"]])]  # fmt: skip
    wrong = sum(r["wrong_acked_version"] for r in res["acks"]["runs"])
    return bad + ([f"acks: {wrong} devices with a wrong acked_version"] if wrong else [])


ACK_COLUMNS = {"acks sent": "acks", "HTTP ms": "http_ms", "flushes run": "flush_calls",
               "flush UPDATEs (acks + last seen)": "ack_updates", "rows they updated": "ack_rows",
               "last_seen UPDATEs from the requests": "last_seen_updates",
               "their rows": "last_seen_rows", "other UPDATEs": "other_server_updates",
               "server SQL queries": "server_queries"}  # fmt: skip


def tables(res: dict, args) -> list[str]:
    catchup, gap, w, a = res["catchup"], res["gap"], res["writes"], res["acks"]

    def ms(s: dict, key: str = "ms") -> str:
        name = f"{'gap' if s['gap'] else 'catch-up'} {s['behind']} {s['mode']} {s['limit']} {key}"
        return common.spread(name.replace("_ms", " ms"), s[key]) if s[key] else "-"

    rows = [
        [f"{'gap' if s['gap'] else 'catch-up'}, {s['mode']}", s["limit"],
         one(s["round_trips"]) + ("" if s["gap"] else f" ({s['expected_round_trips']})"),
         f"{one(s['conversations'])} conversations" if s["gap"] else one(s["entries"]), ms(s),
         one(s["sql"]), f"{s['kb']:.0f}", ms(s, "prepare_ms")]
        for s in catchup["results"] + gap["results"]
    ]  # fmt: skip
    lines = common.table(
        ["pull, package", "limit", "round trips (expected)", "entries", "total ms",
         "server SQL queries", "response KB", "prepare ms"], rows,
        f"1. Catch-up ({catchup['entries_behind']:,} entries behind) and gap (since=0 behind the "
        f"floor {gap['state']['floor']:,})", "Cold, against entries behind: "
        + ", ".join(f"{s['behind']:,}: {ms(s)} ms" for s in res["sweep"]) + ".",
    )  # fmt: skip
    rows = [[p["path"], common.spread(f"entry writes: {p['path']} ms", p["ms"]),
             f"{common.median(p['versions_per_s']):,.0f}", p["round_trips"]]
            for p in w["paths"]]  # fmt: skip
    head = ["path", "ms / message", "versions / s", "round trips to the store"]
    lines += common.table(head, rows, f"2. Versions for one message to {w['members']:,} members")
    rows = []
    for interval in dict.fromkeys(r["flush_interval_s"] for r in a["runs"]):
        mine = [r for r in a["runs"] if r["flush_interval_s"] == interval]
        cells = (common.spread(f"acks {interval:g} s {k}", [r[k] for r in mine], "{:.0f}")
                 for k in ACK_COLUMNS.values())  # fmt: skip
        rows.append([f"every {interval:g} s, + once after" if interval else "once, after", *cells])
    problems = checks(res, args)
    return lines + common.table(
        ["ack flush", *ACK_COLUMNS], rows, f"3. PostgreSQL writes per {a['runs'][0]['acks']:,} "
        f"acks ({args.ack_devices} devices x {args.acks_per_device} acks over HTTP, fresh devices "
        "each run)", "Checks: " + ("; ".join(problems) if problems else "all passed."),
    )  # fmt: skip


def plot(sweep: list[dict]) -> str:
    fig, (ax,) = common.figure("sync", "Catch-up: one device pulls until has_more is false")
    xs = [s["behind"] for s in sweep]
    ax.plot(xs, [statistics.median(s["ms"]) for s in sweep], marker="o", label="cold, median")
    ax.fill_between(xs, [min(s["ms"]) for s in sweep], [max(s["ms"]) for s in sweep], alpha=0.2)
    ax.set(xlabel="entries behind (count)", ylabel="catch-up time (ms)", ylim=(0, None))
    return common.save_figure(fig, "sync")


def main() -> None:
    args = common.parse(
        __doc__, QUICK, runs=(5, "timed runs of each measurement"), catchup_messages=1000,
        sweep=([100, 250, 500, 1000], "entries behind, plotted"), group_members=4,
        gap_conversations=50, gap_messages=(20, "per gap conversation"), big_group=5000,
        ack_devices=100, acks_per_device=10)  # fmt: skip
    with common.section():
        data, res = setup(args), {}
        connection.close()  # not held open across the server's start
        with common.stack({"server": f"{GUNICORN} --log-level warning"}) as server:
            http, machine = Http(), common.machine()
            http.base = f"http://127.0.0.1:{server.port}"
            c, page, both = data["catchup"], settings.SYNC_PAGE_MAX, ("cold", "prepared")
            n = c["state"]["cur"] - c["since"]
            catchup = measure_pulls(http, c, [c["since"]], [page, 200], both, args.runs)
            res["catchup"] = {"entries_behind": n, "results": catchup}
            behind = [c["state"]["cur"] - b for b in args.sweep if b <= n]
            res["sweep"] = measure_pulls(http, c, behind, [page], ["cold"], args.runs)
            gap = measure_pulls(http, data["gap"], [0], [page], both, args.runs)
            res["gap"] = {"state": data["gap"]["state"], "results": gap}
            res["writes"] = measure_entry_writes(data["big"], args)
            res["acks"] = measure_acks(http, data["ack"], data["big"], args)
    lines = common.header("Sync", machine, f"`{GUNICORN}`; median (min..max) of {args.runs}.")
    lines += [*tables(res, args), plot(res["sweep"])]
    common.write_results("sync", "\n".join(lines), {"args": vars(args), **res})


if __name__ == "__main__":
    main()
