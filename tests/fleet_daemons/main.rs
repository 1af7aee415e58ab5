//! Fleet mode (SPEC §6) with daemons as real processes: two or more `pharox serve` on one
//! PostgreSQL database (and Python pharox 0.11 workers beside them), driven through their
//! proxy and admin ports and watched in SQL.
//!
//! - `contention`: no over-leasing between two daemons and two Python workers;
//! - `shared`: one round-robin rotation for the fleet, a release on one daemon waking a
//!   waiter on another;
//! - `crash`: SIGKILL (leases come back by expiry), a restart with the same node id (stale
//!   leases released at start, the config's proxies and their stored state kept), a
//!   duplicate node id refused;
//! - `outage`: PostgreSQL stopped and started under traffic (a cluster of its own);
//! - `ops`: a lease released by hand in SQL closes its connection, no password anywhere,
//!   `pharox check --connect` exit codes.
//!
//! Needs `TEST_PHAROX_PG` (and `TEST_PHAROX_VENV` for the Python parts); without them the
//! tests print a notice and pass, except under `CI=true` (see `tests/pgsupport`). Every wait
//! is a bounded poll; nothing asserts on elapsed time.

#[path = "../common/mod.rs"]
mod common;
#[path = "../pgsupport/mod.rs"]
mod pgsupport;

mod contention;
mod crash;
mod ops;
mod outage;
mod shared;
mod support;
