//! Tests that need a PostgreSQL cluster of their own (started with `scripts/pg-cluster.sh`
//! and a private state file; skipped like the others when `TEST_PHAROX_PG` is unset):
//! the server stopped and started under a connected storage, and TLS by `sslmode`.

mod pgsupport;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgsupport::{OwnCluster, eventually};
use pharox::storage::postgres::{PgSettings, TlsMode};
use pharox::{
    AcquireRequest, LeaseError, Pool, PostgresStorage, Proxy, ProxyManager, ProxyProtocol, Storage,
};

fn settings(url: &str, node: &str) -> PgSettings {
    let mut s = PgSettings::new(url, node);
    s.pool_size = 4;
    s.statement_timeout = Duration::from_secs(2);
    s
}

async fn inventory(s: &PostgresStorage) {
    s.upsert_pool(Pool::new("p")).await.unwrap();
    let proxies = (1..=3)
        .map(|i| {
            Proxy::new(
                format!("p{i}"),
                "p",
                ProxyProtocol::Http,
                "10.0.0.1",
                8080 + i,
            )
            .with_max_concurrency(Some(1))
        })
        .collect();
    s.upsert_proxies(proxies).await.unwrap();
}

fn is_backend(e: &LeaseError) -> bool {
    matches!(e, LeaseError::Backend(_))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_under_a_connected_storage() {
    let Some(cluster) = OwnCluster::start("outage", "") else {
        return;
    };
    let s = PostgresStorage::connect(settings(&cluster.url, "outage"))
        .await
        .unwrap();
    inventory(&s).await;
    let m = ProxyManager::new(s.clone());
    let held = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    assert!(s.is_up());

    cluster.pgstop();
    let bound = Duration::from_secs(2) * 2 + Duration::from_secs(1);
    let started = Instant::now();
    let err = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap_err();
    assert!(is_backend(&err), "{err}");
    let err = m.release_proxy(&held).await.unwrap_err();
    assert!(is_backend(&err), "{err}");
    let err = s.pool_stats("p").await.unwrap_err();
    assert!(is_backend(&err), "{err}");
    println!("three calls failed in {:?}: {err}", started.elapsed());
    assert!(
        started.elapsed() < 3 * bound,
        "no call hangs past the statement timeout"
    );
    assert!(!s.is_up());

    cluster.pgstart("");
    // No new connect: the dedicated session reconnects with backoff and `is_up` follows
    // without any traffic; the pool reconnects on use.
    let up = eventually(Duration::from_secs(30), || async {
        s.is_up().then_some(())
    })
    .await;
    assert!(
        up.is_some(),
        "is_up again after the restart, with no call made"
    );
    let lease = eventually(Duration::from_secs(30), || async {
        m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .ok()
            .flatten()
    })
    .await
    .expect("acquire works again after the restart");
    // The release that failed during the outage was retried in the background.
    let retried = eventually(Duration::from_secs(15), || async {
        s.get_lease(held.id).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(retried.is_some(), "the failed release was retried");
    assert!(m.release_proxy(&lease).await.unwrap());
    assert!(s.audit(None).await.unwrap().is_empty());
    assert_eq!(s.pool_stats("p").await.unwrap().unwrap().total_leases, 0);
    s.close().await;
}

/// A CA, and a server certificate for `localhost` only (not 127.0.0.1) signed by it.
fn certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
    let key_path = dir.join("server.key");
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The server runs as `postgres` when the tests run as root: it must own its key.
    let uid = |args: &[&str]| {
        let out = std::process::Command::new("id").args(args).output().ok()?;
        String::from_utf8(out.stdout)
            .ok()?
            .trim()
            .parse::<u32>()
            .ok()
    };
    if uid(&["-u"]) == Some(0)
        && let (Some(u), Some(g)) = (uid(&["-u", "postgres"]), uid(&["-g", "postgres"]))
    {
        std::os::unix::fs::chown(&key_path, Some(u), Some(g)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_follows_sslmode() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let d = dir.path().display();
    let opts = format!("-c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key");
    let Some(cluster) = OwnCluster::start("tls", &opts) else {
        return;
    };
    let ca = dir.path().join("ca.crt");
    let url = |host: &str, mode: &str| {
        let u = cluster.url.replace("127.0.0.1", host);
        format!("{u}?sslmode={mode}")
    };
    let check = |url: String, ca_file: Option<&Path>| {
        let mut s = settings(&url, "tls");
        s.ca_file = ca_file.map(Path::to_path_buf);
        async move { PostgresStorage::check(&s).await }
    };
    let plain = check(url("127.0.0.1", "disable"), None).await.unwrap();
    assert!(!plain.encrypted);
    let required = check(url("127.0.0.1", "require"), None).await.unwrap();
    assert!(
        required.encrypted && required.tls_mode == TlsMode::Require,
        "{required}"
    );
    let full = check(url("localhost", "verify-full"), Some(&ca))
        .await
        .unwrap();
    assert!(full.encrypted, "{full}");
    let err = check(url("127.0.0.1", "verify-full"), Some(&ca))
        .await
        .unwrap_err();
    println!("verify-full with a name the certificate lacks: {err}");
    let chain_only = check(url("127.0.0.1", "verify-ca"), Some(&ca))
        .await
        .unwrap();
    assert!(chain_only.encrypted);
    let err = check(url("localhost", "verify-full"), None)
        .await
        .unwrap_err();
    println!("verify-full without the CA: {err}");
    // require + a CA file = libpq's verify-ca: the chain is verified, the name is not.
    let require_ca = check(url("127.0.0.1", "require"), Some(&ca)).await.unwrap();
    assert!(require_ca.encrypted);
    // A storage over verify-full works end to end.
    let mut s = settings(&url("localhost", "verify-full"), "tls-node");
    s.ca_file = Some(ca.clone());
    let s = PostgresStorage::connect(s).await.unwrap();
    inventory(&s).await;
    let m = ProxyManager::new(s.clone());
    let lease = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    assert!(m.release_proxy(&lease).await.unwrap());
    s.close().await;
}

/// A TCP relay to the test server that can be frozen (it keeps every connection open but
/// stops passing bytes, like a hung server), or partitioned (the connections open now stay
/// open and silent for good, on both ends, while new ones pass: a network partition that
/// healed for new flows only).
struct Relay {
    addr: std::net::SocketAddr,
    state: Arc<RelayState>,
}

#[derive(Default)]
struct RelayState {
    frozen: AtomicBool,
    next_id: AtomicU64,
    cut_below: AtomicU64,
}

impl RelayState {
    /// Waits while connection `id` may not pass bytes.
    async fn wait(&self, id: u64) {
        while self.frozen.load(Ordering::SeqCst) || id < self.cut_below.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    state: Arc<RelayState>,
    id: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        state.wait(id).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        state.wait(id).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // A cut connection stays silent rather than passing the close on.
    state.wait(id).await;
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(RelayState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, shared.clone(), id));
                tokio::spawn(pump(sr, cw, shared.clone(), id));
            }
        });
        Relay { addr, state }
    }

    fn freeze(&self, on: bool) {
        self.state.frozen.store(on, Ordering::SeqCst);
    }

    /// Every connection open now goes silent for good.
    fn partition(&self) {
        let next = self.state.next_id.load(Ordering::SeqCst);
        self.state.cut_below.store(next, Ordering::SeqCst);
    }
}

/// A storage connected through a relay to a database of its own, with at most `pool_size`
/// pooled connections.
async fn relayed(
    tag: &str,
    pool_size: usize,
) -> Option<(pgsupport::TestDb, Relay, PostgresStorage)> {
    let db = pgsupport::TestDb::new(tag).await?;
    let target = db.url.split('@').nth(1)?.split('/').next()?.to_owned();
    let upstream = tokio::net::lookup_host(&target).await.ok()?.next()?;
    let relay = Relay::start(upstream).await;
    let url = db.url.replace(&target, &relay.addr.to_string());
    let mut cfg = settings(&url, tag);
    cfg.pool_size = pool_size;
    let s = PostgresStorage::connect(cfg).await.unwrap();
    inventory(&s).await;
    Some((db, relay, s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_fails_calls_within_the_statement_timeout() {
    // One pooled connection: the frozen acquire runs on the connection where the first one
    // prepared its statement, so its Execute is certainly sent (and reaches the server once
    // the relay thaws). With several, it could land on a fresh connection, hang in the
    // handshake or the prepare, never be sent, and leave no lease to release.
    let Some((db, relay, s)) = relayed("hung", 1).await else {
        return;
    };
    let m = ProxyManager::new(s.clone());
    let held = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();

    relay.freeze(true);
    let started = Instant::now();
    let err = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    println!("acquire on a hung server failed after {took:?}: {err}");
    assert!(is_backend(&err), "{err}");
    assert!(
        took < Duration::from_secs(2) + Duration::from_secs(2),
        "bounded by the statement timeout"
    );
    assert!(!s.is_up());

    relay.freeze(false);
    // The acquire sent before the freeze ends reaches the server late and may have made a
    // lease nobody holds: its id is released in the background. Only `held` remains.
    let sql = db.sql().await;
    let settled = eventually(Duration::from_secs(20), || async {
        let lost: i64 = sql
            .query_one(
                "SELECT count(*) FROM lease WHERE release_reason = 'lost'",
                &[],
            )
            .await
            .ok()?
            .get(0);
        let st = s.pool_stats("p").await.ok()??;
        (lost == 1 && st.total_leases == 1).then_some(())
    })
    .await;
    assert!(settled.is_some(), "the unknown-outcome lease was released");
    assert!(m.release_proxy(&held).await.unwrap());
    assert!(s.audit(None).await.unwrap().is_empty());
    assert!(
        eventually(Duration::from_secs(20), || async {
            s.is_up().then_some(())
        })
        .await
        .is_some()
    );
    s.close().await;
}

/// A caller that stops waiting (the acquire's future dropped, as when a client leaves while
/// its acquire is in flight) leaves no lease behind: the statement still runs once it reaches
/// the server, and the lease it makes, which nobody holds, is released in the background.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_in_flight_leaves_no_lease() {
    // One pooled connection, as in the hung-server test: the statement is certainly sent.
    let Some((db, relay, s)) = relayed("dropped", 1).await else {
        return;
    };
    let m = ProxyManager::new(s.clone());
    let held = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();

    relay.freeze(true);
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        m.acquire_proxy(&AcquireRequest::new("p")),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the acquire was still waiting: {gave_up:?}"
    );
    relay.freeze(false);

    let sql = db.sql().await;
    let settled = eventually(Duration::from_secs(20), || async {
        let row = sql
            .query_one(
                "SELECT count(*) FILTER (WHERE release_reason = 'lost'), \
                        count(*) FILTER (WHERE status = 'active') FROM lease",
                &[],
            )
            .await
            .ok()?;
        let (lost, active): (i64, i64) = (row.get(0), row.get(1));
        (lost == 1 && active == 1).then_some(())
    })
    .await;
    assert!(
        settled.is_some(),
        "the dropped acquire's lease was made and released; only `held` is active"
    );
    assert!(m.release_proxy(&held).await.unwrap());
    assert!(s.audit(None).await.unwrap().is_empty());
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_heals_without_a_new_connect() {
    let Some((db, relay, s)) = relayed("partition", 4).await else {
        return;
    };
    let sql = db.sql().await;
    let session_pid = || async {
        let row = sql
            .query_one(
                "SELECT backend_pid FROM pharox_node WHERE node_id = 'partition'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, Option<i32>>(0)
    };
    let old_pid = session_pid().await;
    let m = ProxyManager::new(s.clone());
    let held = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap()
        .unwrap();
    // Every open connection (the pool's, the dedicated session holding the node lock) goes
    // silent; the server keeps the old backends, and the lock, alive.
    relay.partition();
    let err = m
        .acquire_proxy(&AcquireRequest::new("p"))
        .await
        .unwrap_err();
    assert!(is_backend(&err), "{err}");
    // The silent connections are dropped, new ones pass; the dedicated session notices at
    // its next heartbeat, ends its old backend (which still holds the node lock) and claims
    // the lock again.
    let back = eventually(Duration::from_secs(40), || async {
        m.acquire_proxy(&AcquireRequest::new("p"))
            .await
            .ok()
            .flatten()
    })
    .await
    .expect("leasing works again after the partition");
    let moved = eventually(Duration::from_secs(40), || async {
        (s.is_up() && session_pid().await != old_pid).then_some(())
    })
    .await;
    assert!(
        moved.is_some(),
        "a new dedicated session holds the node lock"
    );
    let old_alive: i64 = sql
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&old_pid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old_alive, 0, "the old session's backend was ended");
    assert!(m.release_proxy(&back).await.unwrap());
    assert!(m.release_proxy(&held).await.unwrap());
    assert!(s.audit(None).await.unwrap().is_empty());
    s.close().await;
}
