"""A Python pharox 0.11 worker, as a user would write it: acquire / hold / release in a loop
(adapted from the SQL lab's tests/pyworker.py). Run by tests/pg_fleet.rs:

    python worker.py URL POOL SECONDS IDX

URL is postgres://... (turned into postgresql+psycopg:// for SQLAlchemy). Prints one JSON
object of counters on its last line: hit, miss, unavailable_error (Python's own find ->
create_lease race), error:... (anything else)."""
import json
import random
import re
import sys
import time
from collections import Counter


def work(url: str, pool: str, idx: int, seconds: float) -> dict:
    from sqlalchemy import create_engine
    from pharox import ProxyManager
    from pharox.exceptions import ProxyUnavailableError
    from pharox.models import SelectorStrategy
    from pharox.storage.postgres import PostgresStorage

    engine = create_engine(re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url), pool_size=2)
    mgr = ProxyManager(storage=PostgresStorage(engine))
    rng = random.Random(idx)
    stats = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sel = SelectorStrategy(rng.choice(["first_available", "least_used", "round_robin"]))
        try:
            lease = mgr.acquire_proxy(pool, consumer_name=f"py-{idx}", duration_seconds=30, selector=sel)
        except ProxyUnavailableError:
            stats["unavailable_error"] += 1
            continue
        except Exception as e:  # noqa: BLE001
            stats["error:" + type(e).__name__ + ":" + str(e)[:80]] += 1
            continue
        if lease is None:
            stats["miss"] += 1
            time.sleep(0.001)
            continue
        stats["hit"] += 1
        time.sleep(rng.uniform(0, 0.003))
        mgr.release_proxy(lease)
    engine.dispose()
    return dict(stats)


if __name__ == "__main__":
    print(json.dumps(work(sys.argv[1], sys.argv[2], int(sys.argv[4]), float(sys.argv[3]))))
