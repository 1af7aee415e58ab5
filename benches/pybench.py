"""Python pharox 0.11's own leasing benchmark against PostgreSQL: the baseline of
`cargo bench --bench pg` (benches/README.md, PostgreSQL section).

`python -m pharox.benchmarks --adapter postgres --dsn ...` cannot run in pharox 0.11.0: its
seeding calls `storage.add_pool` / `add_proxy`, which `PostgresStorage` lacks (it has
`save_pool` / `save_proxy`). This adds the two methods and otherwise runs pharox's own
`run_leasing_benchmark` (one thread, acquire + release pairs) with its arguments, in a
database of its own (created, then dropped):

    .venv/bin/python benches/pybench.py --url postgres://postgres@127.0.0.1:PORT/postgres \
        [--iterations 1000] [--pool-size 32] [--selector round_robin]

The virtual environment: scripts/python-venv.sh (pharox[postgres]==0.11.0).
"""
import argparse
import os
import re

import psycopg
from sqlalchemy import create_engine

from pharox.benchmarks import run_leasing_benchmark
from pharox.models import SelectorStrategy
from pharox.storage.postgres import PostgresStorage
from pharox.storage.postgres.tables import metadata


class BenchStorage(PostgresStorage):
    def add_pool(self, pool):
        self.save_pool(pool)

    def add_proxy(self, proxy):
        self.save_proxy(proxy)


def with_database(url, db):
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{db}" + (f"?{query}" if query else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--pool-size", type=int, default=32)
    ap.add_argument("--selector", default="round_robin")
    a = ap.parse_args()
    db = f"pharox_pybench_{os.getpid()}"
    admin = re.sub(r"^postgres(ql)?://", "postgresql://", a.url)
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {db}")
    try:
        url = with_database(re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", a.url), db)
        engine = create_engine(url)
        metadata.create_all(engine)
        r = run_leasing_benchmark(
            BenchStorage(engine),
            iterations=a.iterations,
            pool_size=a.pool_size,
            selector=SelectorStrategy(a.selector),
        )
        print(
            f"[leasing] {r.ops_per_second:.1f} pairs/s ({r.iterations} iterations in "
            f"{r.elapsed_seconds:.3f}s) hits={r.metadata['hits']} misses={r.metadata['misses']} "
            f"selector={a.selector} pool_size={a.pool_size}"
        )
        engine.dispose()
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"DROP DATABASE {db} WITH (FORCE)")


if __name__ == "__main__":
    main()
