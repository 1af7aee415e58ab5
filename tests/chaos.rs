//! Issue 10: chaos. About 40 client tasks, for a few seconds, open CONNECT tunnels, plain
//! HTTP keep-alive connections and SOCKS5 tunnels and abandon them at random points (FIN or
//! reset), against upstreams with `max_concurrency` caps that keep flipping between
//! answering, refusing, stalling, resetting and rejecting. At the end: no lease left, no
//! upstream ever saw more connections at once than its cap (counted at the upstream), nothing
//! malformed reached an upstream, no panic, and the daemon stops cleanly.
//!
//! Fails on the bugs it guards against: a lease leaked on some abort path (leased never
//! back to 0), an upstream carrying more connections than its cap (a slot handed out while
//! its connection still runs, a lost lease not closing its connection), a panic anywhere, or
//! a daemon that cannot drain.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::daemon::*;
use common::hostile::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const SEED: u64 = 0xc4a0_5eed;
const CLIENTS: u64 = 40;
const RUN: Duration = Duration::from_secs(5);
const CAPS: [usize; 4] = [1, 2, 3, 2];
/// Longest one client operation may take before the client abandons it.
const OP_BOUND: Duration = Duration::from_secs(2);

fn behaviour(rng: &mut fastrand::Rng) -> Behaviour {
    match rng.usize(0..10) {
        0..5 => Behaviour::Ok,
        5 => Behaviour::Refuse,
        6 => Behaviour::Stall,
        7 => Behaviour::Reset,
        8 => Behaviour::ResetMidTunnel(rng.usize(0..4096)),
        _ => Behaviour::Status([403, 407, 502, 503][rng.usize(0..4)]),
    }
}

/// Drops a stream with a FIN or, at random, a reset.
fn abandon(s: TcpStream, rng: &mut fastrand::Rng) {
    if rng.bool() {
        reset(s);
    }
}

#[derive(Default)]
struct Tally {
    ops: AtomicUsize,
    tunnels: AtomicUsize,
    responses: AtomicUsize,
}

async fn connect_op(addr: std::net::SocketAddr, rng: &mut fastrand::Rng, t: &Tally) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    let head = format!(
        "CONNECT chaos.test:443 HTTP/1.1\r\nHost: chaos.test:443\r\nProxy-Authorization: {}\r\n\r\n",
        basic("w", "x")
    );
    if s.write_all(head.as_bytes()).await.is_err() || rng.usize(0..5) == 0 {
        return abandon(s, rng);
    }
    let reply = read_head(&mut s).await;
    if status(&reply) != 200 || rng.usize(0..4) == 0 {
        return abandon(s, rng);
    }
    t.tunnels.fetch_add(1, Ordering::Relaxed);
    let data: Vec<u8> = (0..rng.usize(1..20_000)).map(|_| rng.u8(..)).collect();
    if s.write_all(&data).await.is_err() {
        return abandon(s, rng);
    }
    let want = if rng.bool() {
        data.len()
    } else {
        rng.usize(0..=data.len())
    };
    let mut echo = vec![0; want];
    let _ = s.read_exact(&mut echo).await;
    abandon(s, rng);
}

async fn plain_op(addr: std::net::SocketAddr, rng: &mut fastrand::Rng, t: &Tally) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    for i in 0..rng.usize(1..4) {
        let req = format!(
            "GET http://chaos.test/{i} HTTP/1.1\r\nHost: chaos.test\r\nProxy-Authorization: {}\r\n\r\n",
            basic("w", "x")
        );
        if s.write_all(req.as_bytes()).await.is_err() || rng.usize(0..6) == 0 {
            return abandon(s, rng);
        }
        let head = read_head(&mut s).await;
        if head.is_empty() || rng.usize(0..6) == 0 {
            return abandon(s, rng);
        }
        let len: usize = header(&head, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if s.read_exact(&mut body).await.is_err() {
            return abandon(s, rng);
        }
        t.responses.fetch_add(1, Ordering::Relaxed);
        if header(&head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
            return abandon(s, rng);
        }
    }
    abandon(s, rng);
}

async fn socks_op(addr: std::net::SocketAddr, rng: &mut fastrand::Rng, t: &Tally) {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return;
    };
    let mut all = vec![5, 1, 2, 1, 1, b'w', 1, b'x'];
    all.extend_from_slice(&socks_request(3, &socks_domain(b"chaos.test"), 443));
    let cut = if rng.usize(0..5) == 0 {
        rng.usize(0..all.len())
    } else {
        all.len()
    };
    if s.write_all(&all[..cut]).await.is_err() || cut < all.len() {
        return abandon(s, rng);
    }
    let mut reply = [0u8; 14];
    if s.read_exact(&mut reply).await.is_err() || reply[11] != 0 || rng.usize(0..4) == 0 {
        return abandon(s, rng);
    }
    t.tunnels.fetch_add(1, Ordering::Relaxed);
    let data: Vec<u8> = (0..rng.usize(1..8_000)).map(|_| rng.u8(..)).collect();
    if s.write_all(&data).await.is_ok() {
        let mut echo = vec![0; rng.usize(0..=data.len())];
        let _ = s.read_exact(&mut echo).await;
    }
    abandon(s, rng);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_aborts_and_faults_leak_nothing_and_respect_every_cap() {
    let panics = panic_counter();
    let panics_before = panics.load(Ordering::SeqCst);
    let ups: Vec<Upstream> = CAPS
        .iter()
        .map(|_| Upstream::start(Behaviour::Ok, None))
        .collect();
    let mut cfg = String::from(
        r#"
[limits]
connect_timeout_ms = 300
head_timeout_ms = 1000
idle_timeout_secs = 2
drain_timeout_secs = 2
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
selector = "random"
failover_attempts = 2
[pools.retry]
max_attempts = 2
backoff_ms = 20
[pools.health]
max_failures = 3
cooldown_seconds = 1
"#,
    );
    for (i, (up, cap)) in ups.iter().zip(CAPS).enumerate() {
        cfg.push_str(&format!(
            "[[pools.proxies]]\nurl = \"http://{}\"\nid = \"u{i}\"\nmax_concurrency = {cap}\n",
            up.addr
        ));
    }
    let d = TestDaemon::start(&cfg).await;
    let deadline = Instant::now() + RUN;

    // The upstreams change their ways every 50-250 ms.
    let flipper = tokio::spawn({
        let ups = ups.clone();
        async move {
            let mut rng = fastrand::Rng::with_seed(SEED);
            while Instant::now() < deadline {
                for up in &ups {
                    up.set(behaviour(&mut rng));
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(50..250))).await;
            }
        }
    });
    let tally = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (addr, tally) = (d.addr, tally.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(SEED + 1 + c);
            while Instant::now() < deadline {
                let op = async {
                    match rng.usize(0..100) {
                        0..40 => connect_op(addr, &mut rng, &tally).await,
                        40..75 => plain_op(addr, &mut rng, &tally).await,
                        _ => socks_op(addr, &mut rng, &tally).await,
                    }
                };
                let _ = tokio::time::timeout(OP_BOUND, op).await;
                tally.ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for c in clients {
        c.await.expect("a client task panicked");
    }
    flipper.await.unwrap();
    for up in &ups {
        up.set(Behaviour::Ok);
    }

    // Every client is gone: every lease comes back.
    d.wait_leased("p", 0).await;
    assert!(
        eventually(|| d.state.registry.is_empty()).await,
        "held leases left"
    );
    let mut problems = Vec::new();
    for (i, (up, cap)) in ups.iter().zip(CAPS).enumerate() {
        if up.max_open() > cap {
            problems.push(format!(
                "upstream u{i} (cap {cap}) carried {} connections at once",
                up.max_open()
            ));
        }
        problems.extend(
            up.violations()
                .into_iter()
                .take(3)
                .map(|v| format!("u{i}: {v}")),
        );
    }
    let stopped = tokio::time::timeout(Duration::from_secs(60), d.stop()).await;
    if stopped.is_err() {
        problems.push("the daemon did not stop".into());
    }
    let panicked = panics.load(Ordering::SeqCst) - panics_before;
    if panicked > 0 {
        problems.push(format!("{panicked} panics"));
    }
    let (ops, tunnels, responses) = (
        tally.ops.load(Ordering::Relaxed),
        tally.tunnels.load(Ordering::Relaxed),
        tally.responses.load(Ordering::Relaxed),
    );
    assert!(
        tunnels > 0 && responses > 0,
        "the run exercised nothing: {ops} operations, {tunnels} tunnels, {responses} responses"
    );
    assert!(
        problems.is_empty(),
        "{ops} operations ({tunnels} tunnels, {responses} plain responses):\n{}",
        problems.join("\n")
    );
}
