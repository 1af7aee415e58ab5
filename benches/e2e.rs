//! End-to-end: client → pharox → upstream HTTP proxy → origin, against client → upstream →
//! origin ("direct") in the same run, on loopback. The load, the upstream and the origin run
//! in this process; pharox runs as its own process (the release binary), so its RSS per idle
//! tunnel is its own. Reports tunnels/s, setup latency p50/p99, tunnel MB/s, plain-HTTP req/s
//! and RSS per idle tunnel, each with its ratio to direct. Bounded in time (about 25 s).
//! Run with `cargo bench --bench e2e`.
//!
//! Load and upstream share this machine's two cores with pharox, so the figures compare the
//! two paths in one run; `../shared/bench/` pins a process per role for the cross-proxy table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CONC: usize = 32;
const RUN: Duration = Duration::from_secs(3);
const PULL: usize = 32 * 1024 * 1024;
const IDLE: usize = 1000;

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

async fn read_head(s: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    head
}

/// Origin: after `PULL\n` sends `PULL` bytes; after `ECHO\n` echoes; `GET` gets `ok`.
async fn origin() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut cmd = [0u8; 4];
                if s.read_exact(&mut cmd).await.is_err() {
                    return;
                }
                match &cmd {
                    b"PULL" => {
                        let chunk = vec![7u8; 64 * 1024];
                        let mut left = PULL;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            if s.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            left -= n;
                        }
                    }
                    b"ECHO" => {
                        let _ = s.write_all(b"ECHO").await;
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                    _ => loop {
                        // A plain GET: drain the head, answer, keep alive.
                        let mut head = cmd.to_vec();
                        let mut b = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if s.read(&mut b).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(b[0]);
                        }
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        if s.read_exact(&mut cmd).await.is_err() {
                            return;
                        }
                    },
                }
            });
        }
    });
    addr
}

/// Upstream HTTP proxy: CONNECT splices to the target; absolute-form GETs go to the origin.
async fn upstream(origin: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if head.starts_with(b"CONNECT ") {
                    let target = String::from_utf8_lossy(&head)
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("")
                        .to_owned();
                    let Ok(mut up) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    if s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                    }
                    return;
                }
                let Ok(mut up) = TcpStream::connect(origin).await else {
                    return;
                };
                let mut head = head;
                loop {
                    // Forward the request in origin form (the path is all the origin reads).
                    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(0);
                    let mut req = b"GET / HTTP/1.1\r\n".to_vec();
                    req.extend_from_slice(&head[line_end + 1..]);
                    if up.write_all(&req).await.is_err() {
                        return;
                    }
                    let resp = read_head(&mut up).await;
                    let mut body = [0u8; 2];
                    if up.read_exact(&mut body).await.is_err()
                        || s.write_all(&resp).await.is_err()
                        || s.write_all(&body).await.is_err()
                    {
                        return;
                    }
                    head = read_head(&mut s).await;
                    if head.is_empty() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

struct Path2 {
    proxy: SocketAddr,
    auth: String,
}

async fn open_tunnel(p: &Path2, origin: SocketAddr, cmd: &[u8]) -> (TcpStream, Duration) {
    let start = Instant::now();
    let mut s = TcpStream::connect(p.proxy).await.unwrap();
    s.set_nodelay(true).unwrap();
    let req = format!(
        "CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\nProxy-Authorization: {}\r\n\r\n",
        p.auth
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let setup = start.elapsed();
    s.write_all(cmd).await.unwrap();
    (s, setup)
}

async fn tunnel_rate(p: Arc<Path2>, origin: SocketAddr) -> (f64, Duration, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CONC {
        let (p, stop) = (p.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut setups = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (mut s, setup) = open_tunnel(&p, origin, b"ECHO").await;
                let mut b = [0u8; 4];
                s.read_exact(&mut b).await.unwrap();
                s.write_all(b"x").await.unwrap();
                let mut one = [0u8; 1];
                s.read_exact(&mut one).await.unwrap();
                setups.push(setup);
            }
            setups
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    all.sort();
    let pct = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    (rate, pct(0.5), pct(0.99))
}

async fn throughput(p: Arc<Path2>, origin: SocketAddr) -> f64 {
    let bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (p, bytes) = (p.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let (mut s, _) = open_tunnel(&p, origin, b"PULL").await;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    bytes.load(Ordering::Relaxed) as f64 / 1e6 / start.elapsed().as_secs_f64()
}

async fn http_rate(p: Arc<Path2>, origin: SocketAddr) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONC {
        let (p, stop, done) = (p.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(p.proxy).await.unwrap();
            s.set_nodelay(true).unwrap();
            let req = format!("GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\nProxy-Authorization: {}\r\n\r\n", p.auth);
            while !stop.load(Ordering::Relaxed) {
                s.write_all(req.as_bytes()).await.unwrap();
                let head = read_head(&mut s).await;
                assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
                let mut body = [0u8; 2];
                s.read_exact(&mut body).await.unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn rss_kib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0)
}

/// RSS growth of process `pid` per idle tunnel.
async fn idle_rss(p: Arc<Path2>, origin: SocketAddr, pid: u32) -> f64 {
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let (mut s, _) = open_tunnel(&p, origin, b"ECHO").await;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per = (rss_kib(pid) - before) / IDLE as f64;
    drop(held);
    per
}

fn main() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let origin = origin().await;
        let up = upstream(origin).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pharox.toml");
        let toml = format!(
            "listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[consumers]]\nname = \"bench\"\npassword = \"bench\"\n[[pools]]\nname = \"chain\"\nselector = \"round_robin\"\n[[pools.proxies]]\nurl = \"http://u:p@{up}\"\n"
        );
        std::fs::write(&path, toml).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pharox"))
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the pharox binary");
        let pid = child.id().unwrap();
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let proxy_addr: SocketAddr = loop {
            let line = lines.next_line().await.unwrap().expect("pharox logs its address");
            if let Some(i) = line.find("\"proxy\":\"") {
                let rest = &line[i + 9..];
                break rest[..rest.find('"').unwrap()].parse().unwrap();
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let direct = Arc::new(Path2 { proxy: up, auth: basic("u", "p") });
        let pharox = Arc::new(Path2 { proxy: proxy_addr, auth: basic("bench-pool-chain", "bench") });

        // Idle memory first, on a fresh pharox; for direct, the upstream (this process).
        let idle_pharox = idle_rss(pharox.clone(), origin, pid).await;
        let idle_direct = idle_rss(direct.clone(), origin, std::process::id()).await;
        let (rate_d, p50_d, p99_d) = tunnel_rate(direct.clone(), origin).await;
        let (rate_p, p50_p, p99_p) = tunnel_rate(pharox.clone(), origin).await;
        let mbs_d = throughput(direct.clone(), origin).await;
        let mbs_p = throughput(pharox.clone(), origin).await;
        let http_d = http_rate(direct.clone(), origin).await;
        let http_p = http_rate(pharox.clone(), origin).await;

        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!("end-to-end, {CONC} concurrent clients, {}s per measure; pharox in its own process", RUN.as_secs());
        println!("| measure | direct | pharox | ratio |");
        println!("|---|---|---|---|");
        println!("| tunnels/s | {rate_d:.0} | {rate_p:.0} | {:.2}× |", rate_p / rate_d);
        println!("| setup p50 ms | {:.2} | {:.2} | {:.2}× |", ms(p50_d), ms(p50_p), ms(p50_p) / ms(p50_d));
        println!("| setup p99 ms | {:.2} | {:.2} | {:.2}× |", ms(p99_d), ms(p99_p), ms(p99_p) / ms(p99_d));
        println!("| tunnel MB/s (8 tunnels) | {mbs_d:.0} | {mbs_p:.0} | {:.2}× |", mbs_p / mbs_d);
        println!("| plain HTTP req/s | {http_d:.0} | {http_p:.0} | {:.2}× |", http_p / http_d);
        // The direct path's memory is spread over this process's upstream and load, which
        // share an allocator with everything else here: only pharox's own figure is clean.
        let _ = idle_direct;
        println!("| RSS KiB per idle tunnel (pharox process, {IDLE} tunnels) | n/a | {idle_pharox:.1} | |");
        let _ = child.kill().await;
    });
}
