//! An in-process daemon on port 0, and fakes that record what they saw: an HTTP upstream
//! proxy (optionally behind TLS), a SOCKS5 upstream, an origin, and a raw client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use pharox::app::Daemon;
use pharox::config::Config;
use pharox::proxy::ProxyState;
use pharox::storage::Storage;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A daemon running in this process.
pub struct TestDaemon {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub state: Arc<ProxyState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestDaemon {
    /// Starts a daemon with `toml` (listen addresses are replaced by port 0).
    pub async fn start(toml: &str) -> TestDaemon {
        Self::start_with_env(toml, &|_| None).await
    }

    pub async fn start_with_env(toml: &str, env: &dyn Fn(&str) -> Option<String>) -> TestDaemon {
        let config = Config::from_toml_str(toml, Path::new("."), env).expect("valid test config");
        Self::start_config(config).await
    }

    pub async fn start_config(config: Config) -> TestDaemon {
        Self::start_inner(config, None).await
    }

    /// Starts from a config file (which reloads re-read).
    pub async fn start_file(path: &Path) -> TestDaemon {
        let config = Config::load(path).expect("valid test config");
        Self::start_inner(config, Some(path.to_owned())).await
    }

    async fn start_inner(config: Config, path: Option<std::path::PathBuf>) -> TestDaemon {
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (daemon, runner) = Daemon::start(config, path, proxy, admin)
            .await
            .expect("daemon starts");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(runner.run(async {
            let _ = rx.await;
        }));
        TestDaemon {
            addr: daemon.proxy_addr,
            admin: daemon.admin_addr,
            state: daemon.state,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Live leases in `pool`.
    pub async fn leased(&self, pool: &str) -> u64 {
        self.state
            .manager
            .storage()
            .pool_stats(pool)
            .await
            .unwrap()
            .unwrap()
            .total_leases
    }

    /// Waits (in bounded steps, no sleeps) until `pool` has `n` live leases.
    pub async fn wait_leased(&self, pool: &str, n: u64) {
        for _ in 0..2000 {
            if self.leased(pool).await == n {
                return;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!(
            "pool {pool} has {} leases, expected {n}",
            self.leased(pool).await
        );
    }

    /// Shuts down and waits; panics from the run loop surface here.
    pub async fn stop(mut self) {
        self.begin_stop();
        self.join().await;
    }

    /// Signals shutdown (the daemon starts draining) without waiting.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the run loop to finish.
    pub async fn join(mut self) {
        self.task.take().unwrap().await.unwrap();
    }
}

/// One consumer `w` (password `x`) and one pool `p` with a single `direct` upstream that may
/// reach loopback targets. Tables before it (`[limits]`, ...) go in front.
pub const DIRECT_POOL: &str = r#"
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
[[pools.proxies]]
url = "direct"
"#;

/// `Proxy-Authorization: Basic ...` value.
pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Reads an HTTP head (through the blank line) from a stream, byte by byte.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(0) | Err(_) => break,
            Ok(_) => head.push(b[0]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The value of a header in a head (case-insensitive name).
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Status code of a response head.
pub fn status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Sends CONNECT through the daemon; returns the stream and the reply head.
pub async fn connect(
    daemon: SocketAddr,
    target: &str,
    auth: Option<&str>,
    extra: &str,
) -> (TcpStream, String) {
    let mut s = TcpStream::connect(daemon).await.unwrap();
    let auth = auth
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// Sends a plain HTTP GET inside an open stream and reads the whole response (close).
pub async fn get_over<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    host: &str,
    path: &str,
) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An origin server: answers `GET PATH` with body `origin:PATH` (keep-alive), records each
/// request head.
#[derive(Clone)]
pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Origin {
    pub async fn start() -> Origin {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let rec = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let rec = rec.clone();
                tokio::spawn(async move {
                    loop {
                        let head = read_head(&mut s).await;
                        if head.is_empty() {
                            return;
                        }
                        rec.lock().unwrap().push(head.clone());
                        let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                        let body = format!("origin:{path}");
                        let close = header(&head, "connection")
                            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\nX-Hop: secret\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        Origin { addr, seen }
    }

    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// How the fake upstream proxy behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// CONNECT: dial the target and splice; absolute-form: answer itself.
    Ok,
    /// Close every connection at once.
    Refuse,
    /// Answer CONNECT with this status.
    Status(u16),
    /// Never answer.
    Stall,
    /// Like `Ok`, but answer CONNECT after this many milliseconds.
    Delay(u64),
    /// Like `Ok`, but close the connection after each plain-HTTP response.
    OkClose,
}

/// A fake HTTP upstream proxy that records each request head.
#[derive(Clone)]
pub struct FakeProxy {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
    pub mode: Arc<Mutex<Mode>>,
}

impl FakeProxy {
    pub async fn start(mode: Mode) -> FakeProxy {
        Self::start_tls(mode, None).await
    }

    /// With `tls`, the proxy is reached over TLS.
    pub async fn start_tls(mode: Mode, tls: Option<tokio_rustls::TlsAcceptor>) -> FakeProxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = FakeProxy {
            addr: l.local_addr().unwrap(),
            seen: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
        };
        let me = p.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (me, tls) = (me.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(s).await {
                                me.serve(s).await;
                            }
                        }
                        None => me.serve(s).await,
                    }
                });
            }
        });
        p
    }

    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, mut s: S) {
        let mode = *self.mode.lock().unwrap();
        match mode {
            Mode::Refuse => return,
            Mode::Stall => {
                let _ = read_head(&mut s).await;
                std::future::pending::<()>().await;
            }
            _ => {}
        }
        loop {
            let head = read_head(&mut s).await;
            if head.is_empty() {
                return;
            }
            self.seen.lock().unwrap().push(head.clone());
            let target = head
                .split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            if head.starts_with("CONNECT ") {
                if let Mode::Delay(ms) = mode {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                }
                if let Mode::Status(code) = mode {
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {code} No\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                    return;
                }
                let Ok(mut up) = TcpStream::connect(&target).await else {
                    let _ = s.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = s
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                return;
            }
            let body = format!("proxied:{target}");
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_err() || mode == Mode::OkClose {
                return;
            }
        }
    }
}

/// A fake SOCKS5 upstream (RFC 1928/1929) that records the targets asked for.
#[derive(Clone)]
pub struct FakeSocks {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl FakeSocks {
    pub async fn start(user: &'static str, pass: &'static str) -> FakeSocks {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let f = FakeSocks {
            addr: l.local_addr().unwrap(),
            seen: Arc::default(),
        };
        let seen = f.seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 2];
                    s.read_exact(&mut b).await.ok()?;
                    let mut methods = vec![0u8; b[1] as usize];
                    s.read_exact(&mut methods).await.ok()?;
                    if !methods.contains(&2) {
                        s.write_all(&[5, 0xff]).await.ok()?;
                        return None;
                    }
                    s.write_all(&[5, 2]).await.ok()?;
                    let mut v = [0u8; 2];
                    s.read_exact(&mut v).await.ok()?;
                    let mut u = vec![0u8; v[1] as usize];
                    s.read_exact(&mut u).await.ok()?;
                    let mut pl = [0u8; 1];
                    s.read_exact(&mut pl).await.ok()?;
                    let mut p = vec![0u8; pl[0] as usize];
                    s.read_exact(&mut p).await.ok()?;
                    let ok = u == user.as_bytes() && p == pass.as_bytes();
                    s.write_all(&[1, if ok { 0 } else { 1 }]).await.ok()?;
                    if !ok {
                        return None;
                    }
                    let mut req = [0u8; 4];
                    s.read_exact(&mut req).await.ok()?;
                    let host = match req[3] {
                        1 => {
                            let mut a = [0u8; 4];
                            s.read_exact(&mut a).await.ok()?;
                            std::net::Ipv4Addr::from(a).to_string()
                        }
                        3 => {
                            let mut l = [0u8; 1];
                            s.read_exact(&mut l).await.ok()?;
                            let mut h = vec![0u8; l[0] as usize];
                            s.read_exact(&mut h).await.ok()?;
                            String::from_utf8(h).ok()?
                        }
                        _ => return None,
                    };
                    let mut port = [0u8; 2];
                    s.read_exact(&mut port).await.ok()?;
                    let port = u16::from_be_bytes(port);
                    seen.lock().unwrap().push(format!("{host}:{port}"));
                    let addr = if host == "localhost" {
                        "127.0.0.1".to_string()
                    } else {
                        host
                    };
                    let mut up = TcpStream::connect((addr.as_str(), port)).await.ok()?;
                    s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await.ok()?;
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                    Some(())
                });
            }
        });
        f
    }

    pub fn targets(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

/// A CA and a `localhost` server certificate made now; returns (acceptor, CA PEM).
pub fn test_tls() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
}

/// Sends a keep-alive absolute-form GET on an open connection; returns the response head and
/// body (read by `Content-Length`; an error response's body is read too).
pub async fn get_keep_alive(
    c: &mut TcpStream,
    authority: &str,
    path: &str,
    auth: &str,
) -> (String, String) {
    let req = format!(
        "GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {auth}\r\n\r\n"
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(c).await;
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    c.read_exact(&mut body).await.unwrap();
    (head, String::from_utf8_lossy(&body).into_owned())
}
