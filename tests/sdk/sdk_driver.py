#!/usr/bin/env python3
"""CI driver: the real pharox-sdk 0.2.0 (remote mode) against a pharox lease API (API.md).

    venv/bin/python sdk_driver.py --base-url http://127.0.0.1:9899 --api-key KEY \
        --proxy 127.0.0.1:18080 --proxy 127.0.0.1:18081 [--proxy socks5://u:p@127.0.0.1:1080]

Every check goes through the SDK: PharoxSDK (pool-name resolution, acquire_proxy, with_lease,
release_proxy) and its low-level PharoxClient (sdk._client: pools, proxies, leases). The SDK's
add_proxy cannot send max_concurrency/source/isp/asn, so the upstream proxies are created with
the SDK's own transport (PharoxClient._request + _raise_for_status: same httpx client, same
X-API-Key, same error mapping) and those extension fields; one more proxy is created with the
stock add_proxy to check the server's defaults. A few raw checks (exact timestamp format, no
redirects, lease extension fields, validation) use the same transport.

Writes progress to stderr and one JSON summary to stdout. Exit 0 when every expectation held,
1 on the first failed one (message on stderr and in the summary's "failure"), 2 on bad usage.
The upstream addresses are only registered, never connected to.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
import traceback
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Optional
from urllib.parse import quote_plus, unquote, urlsplit

# httpx (inside the SDK) honours HTTP(S)_PROXY/ALL_PROXY with no loopback exception, and the SDK
# offers no trust_env switch: drop them so the admin API is never reached through a proxy.
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    if "--honour-proxy-env" not in sys.argv:
        os.environ.pop(_var, None)

from pharox import (  # noqa: E402
    LeaseStatus,
    PoolNotFoundError,
    Proxy,
    ProxyFilters,
    ProxyProtocol,
    ProxyStatus,
    SelectorStrategy,
)
from pharox_sdk import PharoxSDK, RemoteError  # noqa: E402

FIRST, LEAST, RR = SelectorStrategy.FIRST_AVAILABLE, SelectorStrategy.LEAST_USED, SelectorStrategy.ROUND_ROBIN
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6})?\+00:00$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
METADATA = [  # per upstream, cycled: (country as sent, city, source, lat, lon)
    ("ar", "Cordoba", "ci-a", -31.4201, -64.1888),
    ("BR", "Sao Paulo", "ci-b", -23.5505, -46.6333),
    ("US", "Austin", "ci-c", 30.2672, -97.7431),
]


class Fail(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_upstream(spec: str) -> dict:
    if "://" not in spec:
        spec = "http://" + spec
    u = urlsplit(spec)
    if u.scheme not in ("http", "https", "socks5"):
        raise argparse.ArgumentTypeError(f"--proxy {spec!r}: scheme must be http, https or socks5")
    if not u.hostname or not u.port:
        raise argparse.ArgumentTypeError(f"--proxy {spec!r}: need host:port")
    out = {"protocol": u.scheme, "host": u.hostname, "port": u.port}
    if u.username is not None:
        out["username"], out["password"] = unquote(u.username), unquote(u.password or "")
    return out


class CountingSDK(PharoxSDK):
    """The real PharoxSDK; only counts what acquire/release (also inside with_lease) did."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.acquires: Counter = Counter()  # (pool, consumer, selector, outcome)
        self.release_calls: list[str] = []

    async def acquire_proxy(self, pool_name, consumer_id="default", ttl_seconds=300, filters=None, selector=None):
        key = (pool_name, consumer_id, (selector or FIRST).value)
        try:
            lease = await super().acquire_proxy(pool_name, consumer_id, ttl_seconds, filters, selector)
        except PoolNotFoundError:
            self.acquires[key + ("pool_not_found",)] += 1
            raise
        except RemoteError as e:
            self.acquires[key + (f"http_{e.status_code}",)] += 1
            raise
        self.acquires[key + ("hit" if lease else "miss",)] += 1
        return lease

    async def release_proxy(self, lease) -> None:
        self.release_calls.append(str(lease.id))
        await super().release_proxy(lease)


class BodyError(Exception):
    pass


class Driver:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.sdk = CountingSDK.remote(a.base_url, a.api_key, timeout=a.timeout)
        self.c = self.sdk._client
        self.checks: list[str] = []
        self.step = "start"
        self.pool_id: Optional[str] = None
        self.pool_name = a.pool_name or f"sdk-ci-{uuid.uuid4().hex[:8]}"
        self.proxies: list[dict] = []  # server's objects for the upstreams
        self.plain: Optional[dict] = None
        self.leases: dict[str, Any] = {}  # id -> Lease (every lease we were given)
        self.held: dict[str, Any] = {}  # id -> Lease still to release
        self.released: set[str] = set()  # ids we released while active
        self.expired: set[str] = set()  # ids that ended by expiry
        self.repeat_releases = 0
        self.consumer_ids: dict[str, str] = {}
        self.per_proxy_hits: Counter = Counter()
        self.capacity_observed: Optional[int] = None
        self.pool_deleted = False
        self.raw_acquires: Counter = Counter()  # status of raw POST /v1/leases/ (validation probes)

    # ---------------------------------------------------------------- helpers
    def ok(self, name: str) -> None:
        self.checks.append(name)
        log(f"ok   {name}")

    def expect(self, cond: bool, msg: str) -> None:
        if not cond:
            raise Fail(f"[{self.step}] {msg}")

    async def expect_remote(self, coro, status: int | tuple, what: str) -> RemoteError:
        statuses = (status,) if isinstance(status, int) else status
        try:
            r = await coro
        except RemoteError as e:
            self.expect(e.status_code in statuses, f"{what}: expected HTTP {statuses}, got {e.status_code} ({e.detail})")
            return e
        raise Fail(f"[{self.step}] {what}: expected RemoteError {statuses}, got success {r!r:.200}")

    async def raw(self, method: str, path: str, **kw: Any):
        return await self.c._request(method, path, **kw)  # the SDK's own transport

    async def raw_json(self, method: str, path: str, **kw: Any):
        r = await self.raw(method, path, **kw)
        self.c._raise_for_status(r)
        return r.status_code, r.json()

    async def acquire(self, *, consumer: Optional[str] = None, ttl: Optional[int] = None,
                      filters: Optional[ProxyFilters] = None, selector: Optional[SelectorStrategy] = None):
        lease = await self.sdk.acquire_proxy(self.pool_name, consumer or self.a.consumer,
                                             ttl or self.a.ttl, filters, selector)
        if lease is not None:
            self.track(lease, consumer or self.a.consumer, ttl or self.a.ttl)
        return lease

    def track(self, lease, consumer: str, ttl: int) -> None:
        lid = str(lease.id)
        self.expect(lid not in self.leases, f"lease id {lid} was handed out twice")
        self.check_lease(lease, ttl)
        self.expect(lease.status == LeaseStatus.ACTIVE, f"new lease {lid} has status {lease.status}")
        cid = str(lease.consumer_id)
        prev = self.consumer_ids.setdefault(consumer, cid)
        self.expect(prev == cid, f"consumer {consumer!r} got consumer_id {cid}, earlier {prev}")
        self.leases[lid] = lease
        self.held[lid] = lease
        self.per_proxy_hits[str(lease.proxy_id)] += 1

    def check_lease(self, lease, ttl: Optional[int]) -> None:
        lid = str(lease.id)
        self.expect(str(lease.pool_id) == self.pool_id, f"lease {lid}: pool_id {lease.pool_id} != {self.pool_id}")
        known = {p["id"] for p in self.proxies} | ({self.plain["id"]} if self.plain else set())
        self.expect(str(lease.proxy_id) in known, f"lease {lid}: proxy_id {lease.proxy_id} is not a proxy of the pool")
        for f in ("acquired_at", "expires_at"):
            d = getattr(lease, f)
            self.expect(d.tzinfo is not None and d.utcoffset() == timedelta(0), f"lease {lid}: {f} {d} is not UTC-aware")
        if ttl is not None:
            span = (lease.expires_at - lease.acquired_at).total_seconds()
            self.expect(abs(span - ttl) <= 1.0, f"lease {lid}: expires_at - acquired_at = {span}s, ttl was {ttl}s")
            skew = abs((lease.acquired_at - datetime.now(timezone.utc)).total_seconds())
            self.expect(skew <= self.a.clock_skew, f"lease {lid}: acquired_at {lease.acquired_at} is {skew:.0f}s off this host's clock")

    async def release(self, lease) -> None:
        lid = str(lease.id)
        await self.sdk.release_proxy(lease)
        if lid in self.held:
            del self.held[lid]
            (self.expired if lid in self.expired else self.released).add(lid)
        else:
            self.repeat_releases += 1

    async def release_all(self) -> None:
        for lease in list(self.held.values()):
            await self.release(lease)

    async def listing(self) -> list[dict]:
        items = await self.c.list_proxies(self.pool_id)
        self.expect(isinstance(items, list), f"GET /v1/pools/{{id}}/proxies/ must return a JSON array, got {type(items).__name__}")
        return items

    def oracle(self, listing: list[dict]) -> list[Proxy]:
        out = []
        for d in listing:
            try:
                out.append(Proxy.model_validate(d))
            except Exception as e:  # noqa: BLE001
                raise Fail(f"[{self.step}] proxy object does not validate as a pharox 0.8 Proxy: {e}\n{d}")
        return out

    # ---------------------------------------------------------------- steps
    async def wait_ready(self) -> None:
        self.step = "wait"
        deadline = time.monotonic() + self.a.wait_seconds
        while True:
            try:
                await self.sdk.list_pools()
                return
            except RemoteError as e:
                if e.status_code != 0 or time.monotonic() > deadline:
                    raise Fail(f"[wait] GET /v1/pools/ failed: HTTP {e.status_code}: {e.detail}")
            await asyncio.sleep(0.25)

    async def step_auth(self) -> None:
        self.step = "auth"
        for bad in ("wrong-" + self.a.api_key, ""):
            other = PharoxSDK.remote(self.a.base_url, bad, timeout=self.a.timeout)
            try:
                await self.expect_remote(other.list_pools(), 401, f"GET /v1/pools/ with API key {bad!r}")
                await self.expect_remote(other._client.acquire_lease(str(uuid.uuid4()), "x"), 401,
                                         "POST /v1/leases/ with a bad API key")
            finally:
                await other.aclose()
        self.ok("auth: wrong or empty X-API-Key -> 401 RemoteError")

    async def step_pools(self) -> None:
        self.step = "pools"
        try:
            await self.sdk.acquire_proxy(self.pool_name, self.a.consumer)
            raise Fail("[pools] acquire from a pool that does not exist yet did not raise PoolNotFoundError")
        except PoolNotFoundError:
            pass
        pool = await self.sdk.create_pool(self.pool_name, "pharox-sdk CI driver")
        self.pool_id = str(pool.id)
        self.expect(pool.name == self.pool_name, f"create_pool returned name {pool.name!r}")
        self.expect(pool.description == "pharox-sdk CI driver", f"create_pool returned description {pool.description!r}")
        self.ok("pools: POST /v1/pools/ -> pool with UUID id")
        await self.expect_remote(self.sdk.create_pool(self.pool_name), 409, "creating a pool with a taken name")
        self.ok("pools: duplicate name -> 409")
        pools = await self.sdk.list_pools()
        mine = [p for p in pools if p.name == self.pool_name]
        self.expect(len(mine) == 1 and str(mine[0].id) == self.pool_id, f"GET /v1/pools/ lists {mine}")
        got = await self.c.get_pool(self.pool_id)
        self.expect(str(got.id) == self.pool_id and got.name == self.pool_name, f"GET /v1/pools/{{id}} -> {got}")
        await self.expect_remote(self.c.get_pool(str(uuid.uuid4())), 404, "GET of an unknown pool id")
        await self.expect_remote(self.c.get_pool("not-a-uuid"), 404, "GET of a malformed pool id")
        self.ok("pools: list, get, unknown/malformed id -> 404")

    async def step_proxies(self) -> None:
        self.step = "proxies"
        mc = self.a.max_concurrency
        for i, up in enumerate(self.a.proxy):
            country, city, source, lat, lon = METADATA[i % len(METADATA)]
            body = {**up, "country": country, "city": city, "source": f"{source}-{i}", "isp": f"isp-{i}",
                    "asn": 64500 + i, "latitude": lat, "longitude": lon, "max_concurrency": mc}
            status, d = await self.raw_json("POST", f"/v1/pools/{self.pool_id}/proxies/", json=body)
            self.expect(status in (200, 201), f"create proxy: status {status}")
            self.check_proxy_obj(d, body, expect_status="active", expect_mc=mc)
            self.proxies.append(d)
        self.ok(f"proxies: {len(self.proxies)} upstreams created with max_concurrency={mc} and metadata")

        up = self.a.proxy[0]
        d = await self.c.add_proxy(self.pool_id, up["host"], up["port"], ProxyProtocol(up["protocol"]),
                                   username="ci-user", password="p@ss:w/rd", country="ZZ", city="Nowhere",
                                   latitude=0.0, longitude=0.0)
        self.check_proxy_obj(d, {**up, "username": "ci-user", "country": "ZZ", "city": "Nowhere",
                                 "latitude": 0.0, "longitude": 0.0}, expect_status="active", expect_mc=None)
        self.plain = d
        self.ok("proxies: stock add_proxy -> defaults status=active, max_concurrency=null, no password echoed")

        listing = await self.listing()
        ids = [p["id"] for p in listing]
        want = [p["id"] for p in self.proxies] + [self.plain["id"]]
        self.expect(sorted(ids) == sorted(want), f"listing has ids {ids}, want {want}")
        for p in listing:
            self.expect(p["current_leases"] == 0, f"fresh proxy {p['id']} has current_leases {p['current_leases']}")
            self.expect("password" not in p and "credentials" not in p, f"listing exposes credentials: {p}")
        self.oracle(listing)
        self.ok("proxies: GET .../proxies/ lists them all; each validates as a pharox Proxy")
        await self.expect_remote(self.c.list_proxies(str(uuid.uuid4())), 404, "listing proxies of an unknown pool")

    def check_proxy_obj(self, d: Any, sent: dict, *, expect_status: str, expect_mc: Optional[int]) -> None:
        self.expect(isinstance(d, dict), f"proxy response is not an object: {d!r}")
        for k in ("id", "pool_id", "host", "port", "protocol", "status", "max_concurrency", "current_leases"):
            self.expect(k in d, f"proxy object lacks {k!r}: {d}")
        self.expect(bool(UUID_RE.match(str(d["id"]))), f"proxy id {d['id']!r} is not a lowercase hyphenated UUID")
        self.expect(d["pool_id"] == self.pool_id, f"proxy pool_id {d['pool_id']} != {self.pool_id}")
        self.expect(d["status"] == expect_status, f"new proxy status {d['status']!r}, want {expect_status!r}")
        self.expect(d["max_concurrency"] == expect_mc, f"max_concurrency {d['max_concurrency']!r}, want {expect_mc!r}")
        self.expect(d["current_leases"] == 0, f"new proxy current_leases {d['current_leases']}")
        self.expect("password" not in d and "credentials" not in d, f"proxy object exposes credentials: {d}")
        for k, v in sent.items():
            if k == "password":
                continue
            want = v.upper() if k == "country" else v
            self.expect(d.get(k) == want, f"proxy field {k}: sent {v!r}, server answered {d.get(k)!r}")
        self.oracle([d])

    async def step_plain_proxy(self) -> None:
        """Lease the stock-created proxy by filter, check every lease field, then PATCH and DELETE it."""
        self.step = "lease-fields"
        zz = ProxyFilters(country="ZZ")
        lease = await self.acquire(filters=zz, selector=LEAST)
        self.expect(lease is not None, "acquire with country=ZZ found nothing")
        self.expect(str(lease.proxy_id) == self.plain["id"], f"country=ZZ leased {lease.proxy_id}, want {self.plain['id']}")
        again = await self.c.get_lease(str(lease.id))
        self.expect(again is not None, "GET /v1/leases/{id} of a live lease -> None (404)")
        self.expect((again.id, again.proxy_id, again.consumer_id, again.pool_id, again.status, again.acquired_at, again.expires_at)
                    == (lease.id, lease.proxy_id, lease.consumer_id, lease.pool_id, lease.status, lease.acquired_at, lease.expires_at),
                    f"GET lease differs from the acquire answer:\n{again}\n{lease}")
        st, raw = await self.raw_json("GET", f"/v1/leases/{lease.id}")
        for f in ("acquired_at", "expires_at"):
            self.expect(isinstance(raw.get(f), str) and bool(TS_RE.match(raw[f])),
                        f"{f} {raw.get(f)!r}: want YYYY-MM-DDTHH:MM:SS[.fff|.ffffff]+00:00")
        for f in ("id", "proxy_id", "consumer_id", "pool_id"):
            self.expect(bool(UUID_RE.match(str(raw.get(f)))), f"lease {f} {raw.get(f)!r} is not a lowercase hyphenated UUID")
        self.ok("lease: fields, UTC timestamps (Python 3.10-parsable), GET == acquire answer")
        if not self.a.skip_lease_extras:
            self.check_lease_extras(raw, self.plain, "ci-user", "p@ss:w/rd", "active")
            self.ok("lease: extension fields (pool_name, consumer_name, proxy{url,credentials}, pharox_username)")

        d = await self.acquire(consumer="default", filters=zz)
        self.expect(d is not None, "acquire as consumer 'default' on an unlimited proxy failed")
        self.expect(self.consumer_ids["default"] != self.consumer_ids[self.a.consumer],
                    "consumers 'default' and the named consumer got the same consumer_id")
        await self.release(d)
        await self.release(lease)
        self.ok("lease: consumer_id is a stable UUID per consumer name; 'default' works")

        self.step = "patch"
        d = await self.c.update_proxy_status(self.pool_id, self.plain["id"], ProxyStatus.BANNED)
        self.expect(isinstance(d, dict) and d.get("status") == "banned" and d.get("id") == self.plain["id"],
                    f"PATCH status=banned answered {d!r}")
        self.expect(await self.acquire(filters=zz) is None, "a banned proxy was leased")
        listing = {p["id"]: p for p in await self.listing()}
        self.expect(listing[self.plain["id"]]["status"] == "banned", "listing does not show the ban")
        d = await self.c.update_proxy_status(self.pool_id, self.plain["id"], ProxyStatus.ACTIVE)
        self.expect(d.get("status") == "active", f"PATCH status=active answered {d!r}")
        l2 = await self.acquire(filters=zz)
        self.expect(l2 is not None and str(l2.proxy_id) == self.plain["id"], "re-activated proxy is not leasable")
        await self.release(l2)
        await self.expect_remote(self.c.update_proxy_status(self.pool_id, str(uuid.uuid4()), ProxyStatus.ACTIVE), 404,
                                 "PATCH of an unknown proxy")
        await self.expect_remote(self.c.update_proxy_status(str(uuid.uuid4()), self.plain["id"], ProxyStatus.ACTIVE), 404,
                                 "PATCH of a proxy under the wrong pool id")
        if not self.a.skip_lease_extras:
            await self.expect_remote(self.raw_json("PATCH", f"/v1/pools/{self.pool_id}/proxies/{self.plain['id']}",
                                                   json={"status": "dead"}), 422, "PATCH with an invalid status")
        self.ok("patch: status banned -> not leasable -> active -> leasable; unknown -> 404")

        self.step = "delete-proxy"
        await self.c.delete_proxy(self.pool_id, self.plain["id"])
        ids = [p["id"] for p in await self.listing()]
        self.expect(self.plain["id"] not in ids, "deleted proxy still listed")
        self.expect(await self.acquire(filters=zz) is None, "deleted proxy was leased")
        await self.expect_remote(self.c.delete_proxy(self.pool_id, self.plain["id"]), 404, "second DELETE of a proxy")
        self.ok("delete proxy: 2xx, gone from listing and rotation, second delete -> 404")

    def check_lease_extras(self, raw: dict, proxy: dict, user: Optional[str], pw: Optional[str], status: str) -> None:
        self.expect(raw.get("pool_name") == self.pool_name, f"lease pool_name {raw.get('pool_name')!r}")
        self.expect(raw.get("consumer_name") == self.a.consumer, f"lease consumer_name {raw.get('consumer_name')!r}")
        self.expect(raw.get("status") == status, f"lease status {raw.get('status')!r}")
        self.expect("released_at" in raw, "lease lacks released_at")
        if status == "active":
            self.expect(raw["released_at"] is None, f"active lease has released_at {raw['released_at']!r}")
        else:
            self.expect(isinstance(raw["released_at"], str) and bool(TS_RE.match(raw["released_at"])),
                        f"released lease has released_at {raw['released_at']!r}")
        px = raw.get("proxy")
        self.expect(isinstance(px, dict), f"lease lacks the proxy object: {raw}")
        for k in ("id", "host", "port", "protocol"):
            self.expect(px.get(k) == proxy[k], f"lease.proxy.{k} {px.get(k)!r} != {proxy[k]!r}")
        self.expect(px.get("username") == user and px.get("password") == pw,
                    f"lease.proxy credentials {px.get('username')!r}/{px.get('password')!r}, want {user!r}/{pw!r}")
        auth = f"{quote_plus(user)}:{quote_plus(pw)}@" if user is not None else ""
        host = proxy["host"] if ":" not in proxy["host"] else f"[{proxy['host']}]"
        want_url = f"{proxy['protocol']}://{auth}{host}:{proxy['port']}"
        self.expect(px.get("url") == want_url, f"lease.proxy.url {px.get('url')!r}, want {want_url!r}")
        pu = raw.get("pharox_username")
        prefix = f"{self.a.consumer}-lease-"
        self.expect(isinstance(pu, str) and pu.startswith(prefix), f"pharox_username {pu!r} does not start with {prefix!r}")
        try:
            tail = uuid.UUID(pu[len(prefix):])
        except ValueError:
            raise Fail(f"[{self.step}] pharox_username {pu!r} does not end with the lease id")
        self.expect(str(tail) == raw["id"], f"pharox_username {pu!r} names another lease than {raw['id']}")

    async def step_filters(self) -> None:
        self.step = "filters"
        cases: list[tuple[str, ProxyFilters, SelectorStrategy]] = [
            ("no filters", ProxyFilters(), FIRST),
            ("country=AR", ProxyFilters(country="AR"), LEAST),
            ("country=ar (normalised to upper case)", ProxyFilters(country="ar"), FIRST),
            ("city=Sao Paulo", ProxyFilters(city="Sao Paulo"), RR),
            ("source+asn of upstream 0", ProxyFilters(all_of=[ProxyFilters(source="ci-a-0"), ProxyFilters(asn=64500)]), FIRST),
            ("isp of last upstream", ProxyFilters(isp=f"isp-{len(self.proxies) - 1}"), LEAST),
            ("any_of BR | Cordoba", ProxyFilters(any_of=[ProxyFilters(country="BR"), ProxyFilters(city="Cordoba")]), RR),
            ("none_of AR", ProxyFilters(none_of=[ProxyFilters(country="AR")]), FIRST),
            ("geo 50 km around Cordoba", ProxyFilters(latitude=-31.4, longitude=-64.2, radius_km=50), LEAST),
            ("geo 1500 km around Sao Paulo", ProxyFilters(latitude=-23.55, longitude=-46.63, radius_km=1500), FIRST),
            ("geo exact point of upstream 0", ProxyFilters(latitude=-31.4201, longitude=-64.1888), FIRST),
            ("nested none_of(any_of)", ProxyFilters(none_of=[ProxyFilters(any_of=[ProxyFilters(country="US"), ProxyFilters(country="BR")])]), RR),
            ("empty string = no constraint", ProxyFilters(country="", city=""), FIRST),
            ("matches nothing (XX)", ProxyFilters(country="XX"), FIRST),
            ("asn 0 is a constraint", ProxyFilters(asn=0), FIRST),
            ("city is case-sensitive", ProxyFilters(city="cordoba"), FIRST),
        ]
        pool = self.oracle(await self.listing())
        for label, f, sel in cases:
            oracle_f = f.model_copy(deep=True)
            upper_country(oracle_f)
            want = {str(p.id) for p in pool if oracle_f.matches(p)}
            lease = await self.acquire(filters=f, selector=sel)
            if not want:
                self.expect(lease is None, f"filter {label}: nothing matches, but leased {lease and lease.proxy_id}")
            else:
                self.expect(lease is not None, f"filter {label}: expected one of {sorted(want)}, got None (409)")
                self.expect(str(lease.proxy_id) in want, f"filter {label}: leased {lease.proxy_id}, not in {sorted(want)}")
                await self.release(lease)
        self.ok(f"filters: {len(cases)} filter trees select exactly what pharox 0.8 ProxyFilters.matches() selects")

        if not self.a.skip_lease_extras:
            base = {"pool_id": self.pool_id, "consumer_id": self.a.consumer, "ttl_seconds": 30, "strategy": "first_available"}
            bad = [
                ("ttl_seconds=0", {**base, "ttl_seconds": 0}),
                ("ttl_seconds=-5", {**base, "ttl_seconds": -5}),
                ("unknown strategy", {**base, "strategy": "fastest"}),
                ("unknown filter key", {**base, "filters": {"contry": "AR"}}),
                ("latitude without longitude", {**base, "filters": {"latitude": 1.0}}),
                ("radius_km without a point", {**base, "filters": {"radius_km": 5}}),
                ("radius_km=0", {**base, "filters": {"latitude": 1.0, "longitude": 1.0, "radius_km": 0}}),
            ]
            for label, body in bad:
                e = await self.expect_remote(self.raw_json("POST", "/v1/leases/", json=body), 422, f"acquire with {label}")
                self.raw_acquires[str(e.status_code)] += 1
            e = await self.expect_remote(self.raw_json("POST", "/v1/leases/", json={**base, "pool_id": str(uuid.uuid4())}),
                                         404, "acquire on an unknown pool_id")
            self.raw_acquires[str(e.status_code)] += 1
            self.ok(f"validation: {len(bad)} bad acquire bodies -> 422; unknown pool_id -> 404")
        await self.expect_remote(self.sdk.acquire_proxy(self.pool_name, self.a.consumer, 0), 422, "SDK acquire with ttl_seconds=0")
        self.ok("validation: SDK acquire ttl_seconds=0 -> RemoteError 422")

    async def step_selectors(self) -> None:
        self.step = "selectors"
        n = len(self.proxies)
        if n >= 2:
            seen = []
            for _ in range(n):
                lease = await self.acquire(selector=RR)
                self.expect(lease is not None, "round_robin acquire failed")
                seen.append(str(lease.proxy_id))
                await self.release(lease)
            self.expect(len(set(seen)) == n, f"{n} round_robin acquires (released in between) visited {seen}")
            self.ok(f"selectors: round_robin visits all {n} proxies once in {n} acquires")
            hold = await self.acquire(selector=FIRST)
            nxt = await self.acquire(selector=LEAST)
            self.expect(nxt is not None and nxt.proxy_id != hold.proxy_id,
                        f"least_used picked the proxy that already holds a lease ({hold.proxy_id})")
            await self.release(nxt)
            await self.release(hold)
            self.ok("selectors: least_used avoids the loaded proxy")
        else:
            log("skip selectors: need >= 2 --proxy")

    async def step_with_lease(self) -> None:
        self.step = "with_lease"
        async with self.sdk.with_lease(self.pool_name, self.a.consumer, self.a.ttl, selector=LEAST) as lease:
            self.expect(lease is not None, "with_lease yielded None on a free pool")
            self.track(lease, self.a.consumer, self.a.ttl)
            inside = await self.c.get_lease(str(lease.id))
            self.expect(inside is not None and inside.status == LeaseStatus.ACTIVE, f"inside with_lease, GET says {inside}")
        self.mark_released_by_sdk(lease)
        after = await self.c.get_lease(str(lease.id))
        self.expect(after is not None and after.status == LeaseStatus.RELEASED, f"after with_lease, GET says {after}")
        self.ok("with_lease: active inside, released on normal exit")

        holder: dict = {}
        try:
            async with self.sdk.with_lease(self.pool_name, self.a.consumer, self.a.ttl, selector=RR) as lease:
                self.expect(lease is not None, "with_lease yielded None on a free pool")
                self.track(lease, self.a.consumer, self.a.ttl)
                holder["lease"] = lease
                raise BodyError("boom")
        except BodyError:
            pass
        else:
            raise Fail("[with_lease] the body's exception did not propagate")
        lease = holder["lease"]
        self.mark_released_by_sdk(lease)
        after = await self.c.get_lease(str(lease.id))
        self.expect(after is not None and after.status == LeaseStatus.RELEASED, f"after a raising body, GET says {after}")
        self.ok("with_lease: released when the body raises, exception propagates")

    def mark_released_by_sdk(self, lease) -> None:
        lid = str(lease.id)
        self.expect(lid in self.sdk.release_calls, f"with_lease did not release {lid}")
        self.held.pop(lid, None)
        self.released.add(lid)

    async def step_exhaustion(self) -> None:
        self.step = "exhaustion"
        cap = len(self.proxies) * self.a.max_concurrency
        selectors = ([FIRST, LEAST, RR] * (cap + 2))[: cap + 2]
        results = await asyncio.gather(*[self.sdk.acquire_proxy(self.pool_name, self.a.consumer, self.a.ttl, None, sel)
                                         for sel in selectors])
        got = [r for r in results if r is not None]
        for r in got:
            self.track(r, self.a.consumer, self.a.ttl)
        self.capacity_observed = len(got)
        per = Counter(str(r.proxy_id) for r in got)
        self.expect(len(got) == cap, f"{cap + 2} concurrent acquires got {len(got)} leases, capacity is {cap}")
        self.expect(all(v <= self.a.max_concurrency for v in per.values()), f"max_concurrency exceeded: {dict(per)}")
        self.ok(f"exhaustion: {cap + 2} concurrent acquires -> exactly {cap} leases, 2 x 409 -> None")

        listing = await self.listing()
        for p in listing:
            self.expect(p["current_leases"] == self.a.max_concurrency,
                        f"proxy {p['id']} shows current_leases {p['current_leases']} at capacity")
        self.expect(await self.acquire(selector=LEAST) is None, "acquire on a full pool did not return None")
        async with self.sdk.with_lease(self.pool_name, self.a.consumer, self.a.ttl) as none_lease:
            self.expect(none_lease is None, f"with_lease on a full pool yielded {none_lease}")
        self.ok("exhaustion: sequential acquire -> None, with_lease yields None; current_leases == max_concurrency")

        victim = got[0]
        await self.release(victim)
        again = await self.acquire(selector=RR)
        self.expect(again is not None, "after releasing one lease of a full pool, acquire returned None")
        self.expect(again.proxy_id == victim.proxy_id, f"the freed slot was on {victim.proxy_id}, leased {again.proxy_id}")
        self.expect(await self.acquire() is None, "pool should be full again")
        await self.release_all()
        listing = await self.listing()
        self.expect(all(p["current_leases"] == 0 for p in listing), f"after releasing all: {[p['current_leases'] for p in listing]}")
        self.ok("exhaustion: a released slot is leasable at once; all released -> current_leases 0")

    async def step_release_semantics(self) -> None:
        self.step = "release"
        lease = await self.acquire()
        await self.release(lease)
        r = await self.c.release_lease(str(lease.id))
        self.repeat_releases += 1
        self.expect(r.status == LeaseStatus.RELEASED and r.id == lease.id, f"second release answered {r}")
        got = await self.c.get_lease(str(lease.id))
        self.expect(got is not None and got.status == LeaseStatus.RELEASED, f"GET of a released lease -> {got}")
        if not self.a.skip_lease_extras:
            _, raw = await self.raw_json("GET", f"/v1/leases/{lease.id}")
            i = [p["id"] for p in self.proxies].index(str(lease.proxy_id))
            up = self.a.proxy[i]
            self.check_lease_extras(raw, self.proxies[i], up.get("username"), up.get("password"), "released")
        self.ok("release: idempotent (2nd release -> 200 released); GET released lease -> status released")
        self.expect(await self.c.get_lease(str(uuid.uuid4())) is None, "GET of an unknown lease id did not give None")
        self.expect(await self.c.get_lease("nonexistent") is None, "GET of a malformed lease id did not give None")
        await self.expect_remote(self.c.release_lease(str(uuid.uuid4())), 404, "release of an unknown lease")
        self.ok("release: unknown/malformed lease -> GET None (404); release unknown -> RemoteError 404")

    async def step_expiry(self) -> None:
        self.step = "expiry"
        target = ProxyFilters(all_of=[ProxyFilters(source="ci-a-0"), ProxyFilters(asn=64500)])
        keep = [await self.acquire(filters=target) for _ in range(self.a.max_concurrency - 1)]
        self.expect(all(keep), "could not fill upstream 0")
        short = await self.acquire(filters=target, ttl=1)
        self.expect(short is not None, "could not take the 1 s lease")
        self.expect(await self.acquire(filters=target) is None, "upstream 0 should be full")
        await asyncio.sleep(2.2)
        got = await self.c.get_lease(str(short.id))
        self.expect(got is not None and got.status == LeaseStatus.RELEASED,
                    f"GET of a lease past expires_at -> {got and got.status} (want released; there is no 'expired')")
        self.held.pop(str(short.id), None)
        self.expired.add(str(short.id))
        back = await self.acquire(filters=target)
        self.expect(back is not None, "the expired lease's slot did not come back")
        r = await self.c.release_lease(str(short.id))
        self.repeat_releases += 1
        self.expect(r.status == LeaseStatus.RELEASED, f"release of an expired lease -> {r.status}")
        await self.release_all()
        self.ok("expiry: a 1 s lease reads 'released' after expiry, its slot returns, releasing it is a no-op 200")

    async def step_raw_paths(self) -> None:
        self.step = "paths"
        for path in ("/v1/pools", f"/v1/pools/{self.pool_id}/", f"/v1/pools/{self.pool_id}/proxies"):
            r = await self.raw("GET", path)
            self.expect(r.status_code == 200, f"GET {path} -> {r.status_code} (no redirects: serve both slash forms)")
        r = await self.raw("GET", "/v1/no-such-route/")
        self.expect(r.status_code == 404 and isinstance(r.json(), dict) and isinstance(r.json().get("detail"), str),
                    f"unknown route -> {r.status_code} {r.text[:100]}")
        self.ok("paths: both trailing-slash forms served without redirect; errors are {\"detail\": str}")

    async def step_delete_pool(self) -> None:
        self.step = "delete-pool"
        lease = await self.acquire()
        self.expect(lease is not None, "acquire before pool deletion failed")
        await self.c.delete_pool(self.pool_id)
        self.pool_deleted = True
        await self.expect_remote(self.c.get_pool(self.pool_id), 404, "GET of a deleted pool")
        self.expect(all(p.name != self.pool_name for p in await self.c.list_pools()), "deleted pool still listed")
        await self.expect_remote(self.c.list_proxies(self.pool_id), 404, "listing proxies of a deleted pool")
        still = await self.c.get_lease(str(lease.id))
        self.expect(still is not None and still.status == LeaseStatus.ACTIVE, f"a live lease of a deleted pool reads {still}")
        await self.release(lease)
        self.ok("delete pool: 2xx with proxies inside; gone; its live lease drains and releases with 200")
        # the SDK still has the old id cached: the server must answer 404 (-> PoolNotFoundError), not 409
        for attempt in ("cached id -> 404", "after cache eviction"):
            try:
                await self.sdk.acquire_proxy(self.pool_name, self.a.consumer)
                raise Fail(f"[{self.step}] acquire from a deleted pool ({attempt}) did not raise PoolNotFoundError")
            except PoolNotFoundError:
                pass
        await self.expect_remote(self.c.delete_pool(self.pool_id), 404, "second DELETE of a pool")
        self.ok("delete pool: acquire -> PoolNotFoundError (server 404 on cached id); second delete -> 404")

    async def cleanup(self) -> None:
        try:
            for lease in list(self.held.values()):
                await self.sdk.release_proxy(lease)
            if self.pool_id and not self.pool_deleted and not self.a.keep:
                await self.c.delete_pool(self.pool_id)
        except Exception as e:  # noqa: BLE001
            log(f"cleanup: {e!r}")

    async def run(self) -> dict:
        t0 = time.monotonic()
        failure = None
        try:
            await self.wait_ready()
            await self.step_auth()
            await self.step_pools()
            await self.step_proxies()
            await self.step_plain_proxy()
            await self.step_filters()
            await self.step_selectors()
            await self.step_with_lease()
            await self.step_exhaustion()
            await self.step_release_semantics()
            if not self.a.skip_expiry:
                await self.step_expiry()
            await self.step_raw_paths()
            self.expect(not self.held, f"leases left unreleased: {sorted(self.held)}")
            if not self.a.keep:
                await self.step_delete_pool()
        except Fail as e:
            failure = str(e)
        except Exception as e:  # noqa: BLE001
            failure = f"[{self.step}] unexpected {type(e).__name__}: {e}\n{traceback.format_exc()}"
        if failure:
            log(f"FAIL {failure}")
            await self.cleanup()
        await self.sdk.aclose()
        return self.summary(failure, time.monotonic() - t0)

    def summary(self, failure: Optional[str], elapsed: float) -> dict:
        acq = [{"pool": p, "consumer": c, "selector": s, "outcome": o, "count": n}
               for (p, c, s, o), n in sorted(self.sdk.acquires.items())]
        tot = Counter()
        for (p, _c, _s, o), n in self.sdk.acquires.items():
            if p == self.pool_name:
                tot[o] += n
        return {
            "ok": failure is None,
            "failure": failure,
            "base_url": self.a.base_url,
            "pool": {"id": self.pool_id, "name": self.pool_name, "deleted": self.pool_deleted},
            "consumers": self.consumer_ids,
            "proxies": [{"id": p["id"], "host": p["host"], "port": p["port"], "protocol": p["protocol"],
                         "country": p.get("country"), "max_concurrency": p.get("max_concurrency")} for p in self.proxies],
            "plain_proxy_id": self.plain and self.plain["id"],
            "acquire_totals": {k: tot.get(k, 0) for k in ("hit", "miss", "pool_not_found", "http_422")},
            "acquire_by_label": acq,
            "raw_acquire_requests": dict(self.raw_acquires),
            "releases": {"effective": len(self.released), "repeat_noop": self.repeat_releases,
                         "expired": len(self.expired), "http_calls": len(self.sdk.release_calls) + self.repeat_releases},
            "lease_ids": sorted(self.leases),
            "leases_total": len(self.leases),
            "leases_active_at_end": len(self.held),
            "per_proxy_hits": dict(self.per_proxy_hits),
            "capacity": {"expected": len(self.proxies) * self.a.max_concurrency, "observed": self.capacity_observed},
            "checks_passed": self.checks,
            "elapsed_seconds": round(elapsed, 3),
        }


def upper_country(f: ProxyFilters) -> None:
    if f.country:
        f.country = f.country.upper()
    for kids in (f.all_of, f.any_of, f.none_of):
        for k in kids or []:
            upper_country(k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="admin listener, e.g. http://127.0.0.1:9899")
    ap.add_argument("--api-key", default=os.environ.get("PHAROX_SDK_API_KEY"),
                    help="X-API-Key (default: $PHAROX_SDK_API_KEY)")
    ap.add_argument("--proxy", action="append", type=parse_upstream, required=True,
                    help="upstream to register: host:port or scheme://[user:pass@]host:port (repeat; >= 2 advised)")
    ap.add_argument("--pool-name", help="default: sdk-ci-<random>")
    ap.add_argument("--consumer", default="sdk-ci", help="consumer name sent as consumer_id")
    ap.add_argument("--max-concurrency", type=int, default=2)
    ap.add_argument("--ttl", type=int, default=120)
    ap.add_argument("--timeout", type=float, default=10.0, help="SDK request timeout, seconds")
    ap.add_argument("--wait-seconds", type=float, default=15.0, help="wait this long for the API to answer")
    ap.add_argument("--clock-skew", type=float, default=60.0, help="tolerated |acquired_at - local now|, seconds")
    ap.add_argument("--skip-expiry", action="store_true", help="skip the 1 s lease expiry check (~2 s)")
    ap.add_argument("--skip-lease-extras", action="store_true",
                    help="skip checks of pharox extensions the SDK ignores (lease.proxy, pharox_username, 422s)")
    ap.add_argument("--keep", action="store_true", help="do not delete the pool at the end")
    ap.add_argument("--honour-proxy-env", action="store_true", help="keep HTTP(S)_PROXY/ALL_PROXY for the SDK")
    a = ap.parse_args()
    if not a.api_key:
        ap.error("--api-key or PHAROX_SDK_API_KEY is required")
    if a.max_concurrency < 1 or a.ttl < 5:
        ap.error("--max-concurrency must be >= 1 and --ttl >= 5")
    summary = asyncio.run(Driver(a).run())
    print(json.dumps(summary, indent=2))
    if summary["ok"]:
        log(f"{len(summary['checks_passed'])} passed, 0 failed")
        return 0
    log(f"{len(summary['checks_passed'])} passed, 1 failed")
    return 1


if __name__ == "__main__":
    sys.exit(main())
