"""Python pharox 0.11 on a database a daemon migrated and filled (tests/pg_backend.rs): it
reads back everything the daemon wrote (pools, proxies, leases, health records), leases,
releases and cleans up.

    python on_migrated.py URL POOL

Prints one JSON object on its last line."""
import json
import re
import sys
import uuid


def main(url: str, pool: str) -> dict:
    from sqlalchemy import create_engine
    from pharox import ProxyManager
    from pharox.models import SelectorStrategy
    from pharox.storage.postgres import PostgresStorage

    engine = create_engine(re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url), pool_size=2)
    storage = PostgresStorage(engine)
    mgr = ProxyManager(storage=storage)
    out = {}
    pools = {p.name: p for p in storage.list_pools()}
    out["pools"] = sorted(pools)
    proxies = storage.list_proxies(str(pools[pool].id))
    out["protocols"] = sorted(p.protocol.value for p in proxies)
    out["with_credentials"] = sum(p.credentials is not None for p in proxies)
    out["daemon_leases"] = len(storage.list_leases())
    out["health_records"] = sum(len(storage.list_health_records(uuid.UUID(str(p.id)))) for p in proxies)
    lease = mgr.acquire_proxy(pool, consumer_name="py-check", duration_seconds=30,
                              selector=SelectorStrategy.FIRST_AVAILABLE)
    out["hit"] = lease is not None
    s = storage.get_pool_stats(pool)
    out["stats"] = [s.total_proxies, s.active_proxies, s.available_proxies, s.leased_proxies,
                    s.total_leases]
    if lease is not None:
        mgr.release_proxy(lease)
    out["cleanup"] = mgr.cleanup_expired_leases()
    engine.dispose()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2]), default=str))
