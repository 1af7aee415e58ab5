//! Fakes and helpers for the hardening, fuzz and chaos tests: an HTTP upstream proxy that
//! parses strictly what the daemon forwards (and records anything it should never have been
//! sent), counts its concurrent connections and can misbehave on demand; a target that cuts
//! its connections with a reset; a raw client that reads every response on a connection; and
//! a process-wide panic counter.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Every `X-Pharox-Error` code with its status, as README.md's error table documents them
/// (rows ending `| STATUS | `code` |`): the oracle is the documentation itself.
pub fn codes() -> &'static [(String, u16)] {
    static CODES: OnceLock<Vec<(String, u16)>> = OnceLock::new();
    CODES.get_or_init(|| {
        let rows: Vec<(String, u16)> = include_str!("../../README.md")
            .lines()
            .filter_map(|line| {
                let cells: Vec<&str> = line.trim().trim_matches('|').split('|').collect();
                let [.., status, code] = cells.as_slice() else {
                    return None;
                };
                let status: u16 = status.trim().parse().ok()?;
                let code = code.trim().strip_prefix('`')?.strip_suffix('`')?;
                (code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
                    .then(|| (code.to_owned(), status))
            })
            .collect();
        assert!(rows.len() >= 18, "README's error table: {rows:?}");
        rows
    })
}

/// SOCKS5 reply codes pharox may send (RFC 1928 §6, `ProxyError::socks_reply`).
pub const SOCKS_REPLIES: &[u8] = &[0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08];

/// True when `status` is the documented status of `code`.
pub fn documented(status: u16, code: &str) -> bool {
    codes().iter().any(|(c, s)| c == code && *s == status)
}

/// How a [`Upstream`] treats a new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// CONNECT: `200`, then echo the tunnel. Plain requests: `200` with `proxied:TARGET`.
    Ok,
    /// Close at once.
    Refuse,
    /// Reset at once (`SO_LINGER` 0).
    Reset,
    /// Read everything, answer nothing (until the peer closes).
    Stall,
    /// Answer every request (CONNECT or plain) with this status; 407 carries
    /// `Proxy-Authenticate`.
    Status(u16),
    /// Plain requests: a `200` head announcing 100 000 bytes, 10 bytes of body, then silence.
    StallMidBody,
    /// CONNECT: `200`, this many bytes, then a reset.
    ResetMidTunnel(usize),
}

/// A request as the upstream parsed it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The head, as received.
    pub head: String,
    /// The body (plain requests).
    pub body: Vec<u8>,
}

#[derive(Default)]
struct Record {
    seen: Vec<Seen>,
    /// Things the daemon must never forward, one line each.
    violations: Vec<String>,
    accepted: usize,
    open: usize,
    max_open: usize,
}

/// A fake HTTP upstream proxy on its own thread (a single-threaded runtime, so its
/// connection count is exact: connections whose close had already reached it are counted
/// closed before a new one is counted).
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    record: Arc<Mutex<Record>>,
    /// The `Proxy-Authorization` value the daemon must send (the upstream's own
    /// credentials), or `None` for none at all.
    expect_auth: Arc<Option<String>>,
}

impl Upstream {
    /// Starts an upstream; `expect_auth` is the exact `Proxy-Authorization` it must receive.
    pub fn start(behaviour: Behaviour, expect_auth: Option<String>) -> Upstream {
        let (tx, rx) = std::sync::mpsc::channel();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let record: Arc<Mutex<Record>> = Arc::default();
        let expect_auth = Arc::new(expect_auth);
        let (b, r, a) = (behaviour.clone(), record.clone(), expect_auth.clone());
        std::thread::Builder::new()
            .name("fake-upstream".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                    let me = Upstream {
                        addr: l.local_addr().unwrap(),
                        behaviour: b,
                        record: r,
                        expect_auth: a,
                    };
                    tx.send(me.addr).unwrap();
                    loop {
                        let Ok((s, _)) = l.accept().await else {
                            continue;
                        };
                        // Let connections whose FIN already arrived see it first.
                        for _ in 0..4 {
                            tokio::task::yield_now().await;
                        }
                        {
                            let mut rec = me.record.lock().unwrap();
                            rec.accepted += 1;
                            rec.open += 1;
                            rec.max_open = rec.max_open.max(rec.open);
                        }
                        let me = me.clone();
                        tokio::spawn(async move {
                            me.serve(s).await;
                            me.record.lock().unwrap().open -= 1;
                        });
                    }
                });
            })
            .unwrap();
        let addr = rx.recv().unwrap();
        Upstream {
            addr,
            behaviour,
            record,
            expect_auth,
        }
    }

    pub fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.record.lock().unwrap().seen.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.record.lock().unwrap().violations.clone()
    }

    /// Most connections open at once.
    pub fn max_open(&self) -> usize {
        self.record.lock().unwrap().max_open
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.record.lock().unwrap().open
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.record.lock().unwrap().accepted
    }

    fn violation(&self, v: String) {
        self.record.lock().unwrap().violations.push(v);
    }

    async fn serve(&self, mut s: TcpStream) {
        let behaviour = *self.behaviour.lock().unwrap();
        match behaviour {
            Behaviour::Refuse => return,
            Behaviour::Reset => return reset(s),
            _ => {}
        }
        let mut buf = Vec::new();
        loop {
            let Some((head, len)) = self.read_head(&mut s, &mut buf).await else {
                return;
            };
            buf.drain(..len);
            if behaviour == Behaviour::Stall {
                self.record.lock().unwrap().seen.push(Seen {
                    head,
                    body: Vec::new(),
                });
                return drain(s).await;
            }
            let connect = head.starts_with("CONNECT ");
            let body = if connect {
                Vec::new()
            } else {
                match self.read_body(&mut s, &head, &mut buf).await {
                    Some(b) => b,
                    None => return,
                }
            };
            self.record.lock().unwrap().seen.push(Seen {
                head: head.clone(),
                body,
            });
            let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
            match behaviour {
                Behaviour::Status(code) => {
                    let extra = if code == 407 {
                        "Proxy-Authenticate: Basic realm=\"upstream\"\r\n"
                    } else {
                        ""
                    };
                    let resp = format!(
                        "HTTP/1.1 {code} Upstream Says No\r\n{extra}Content-Length: 8\r\n\r\nupstream"
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                    if connect {
                        return;
                    }
                }
                Behaviour::StallMidBody if !connect => {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n0123456789")
                        .await;
                    return drain(s).await;
                }
                Behaviour::ResetMidTunnel(n) if connect => {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await;
                    let _ = s.write_all(&vec![7u8; n]).await;
                    return reset(s);
                }
                _ if connect => {
                    if s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if !buf.is_empty() && s.write_all(&buf).await.is_err() {
                        return;
                    }
                    return echo(s).await;
                }
                _ => {
                    let body = format!("proxied:{target}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Reads one head; records what is wrong with it. `None` at EOF or when unusable.
    async fn read_head(&self, s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, usize)> {
        loop {
            if let Some(end) = find(buf, b"\r\n\r\n") {
                let raw = &buf[..end + 4];
                let head = String::from_utf8_lossy(raw).into_owned();
                self.check_head(raw, &head);
                return Some((head, end + 4));
            }
            if buf.len() > 256 * 1024 {
                self.violation(format!("a head over 256 KiB: {}", preview(buf)));
                return None;
            }
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    if !buf.is_empty() {
                        self.violation(format!("an incomplete head: {}", preview(buf)));
                    }
                    return None;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn check_head(&self, raw: &[u8], head: &str) {
        let mut bad = Vec::new();
        if raw.contains(&0) {
            bad.push("NUL in the head".to_owned());
        }
        for (i, &b) in raw.iter().enumerate() {
            if b == b'\n' && (i == 0 || raw[i - 1] != b'\r') {
                bad.push("a bare LF".into());
                break;
            }
            if b == b'\r' && raw.get(i + 1) != Some(&b'\n') {
                bad.push("a bare CR".into());
                break;
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 256];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(raw) {
            Ok(httparse::Status::Complete(_)) => {}
            other => bad.push(format!("does not parse: {other:?}")),
        }
        let line = head.split("\r\n").next().unwrap_or_default();
        let parts: Vec<&str> = line.split(' ').collect();
        // HTTP/1.0 when the client spoke it (no chunked answer it could not read).
        if parts.len() != 3 || (parts[2] != "HTTP/1.1" && parts[2] != "HTTP/1.0") {
            bad.push(format!("request line `{line}`"));
        } else if parts[0] == "CONNECT" {
            if !canonical_authority(parts[1]) {
                bad.push(format!("CONNECT target `{}` not canonical", parts[1]));
            }
        } else if !absolute_host(parts[1]).is_some_and(canonical_host) {
            bad.push(format!("target `{}` without a valid host", parts[1]));
        }
        let (mut hosts, mut cl, mut te, mut auth) = (0, 0, 0, Vec::new());
        for h in req.headers.iter() {
            let name = h.name.to_ascii_lowercase();
            if name.starts_with("x-pharox-") {
                bad.push(format!("identity header `{}` forwarded", h.name));
            }
            match name.as_str() {
                "host" => hosts += 1,
                "content-length" => cl += 1,
                "transfer-encoding" => {
                    te += 1;
                    if !h.value.eq_ignore_ascii_case(b"chunked") {
                        bad.push(format!(
                            "Transfer-Encoding `{}`",
                            String::from_utf8_lossy(h.value)
                        ));
                    }
                }
                "proxy-authorization" => auth.push(String::from_utf8_lossy(h.value).into_owned()),
                _ => {}
            }
        }
        if hosts != 1 {
            bad.push(format!("{hosts} Host headers"));
        }
        if cl > 1 || te > 1 || (cl > 0 && te > 0) {
            bad.push(format!(
                "framing: {cl} Content-Length, {te} Transfer-Encoding"
            ));
        }
        let want: Vec<String> = self.expect_auth.iter().cloned().collect();
        if auth != want {
            bad.push(format!("Proxy-Authorization {auth:?}, expected {want:?}"));
        }
        if head.to_ascii_lowercase().contains("smuggled") {
            bad.push("a smuggled request".into());
        }
        for b in bad {
            self.violation(format!("{b}: {}", preview(raw)));
        }
    }

    /// Reads a plain request's body by its framing. `None` if the framing is unusable.
    async fn read_body(&self, s: &mut TcpStream, head: &str, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        let lower = head.to_ascii_lowercase();
        let value = |name: &str| {
            lower.split("\r\n").find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_owned())
            })
        };
        if value("transfer-encoding").as_deref() == Some("chunked") {
            let mut body = Vec::new();
            loop {
                let line_end = loop {
                    if let Some(i) = find(buf, b"\r\n") {
                        break i;
                    }
                    fill(s, buf).await?;
                };
                let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
                let size = line.split(';').next().unwrap_or_default().trim();
                let Ok(size) = usize::from_str_radix(size, 16) else {
                    self.violation(format!("chunk size `{line}` forwarded"));
                    return None;
                };
                buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailers, then the blank line.
                    loop {
                        if buf.starts_with(b"\r\n") {
                            buf.drain(..2);
                            return Some(body);
                        }
                        if let Some(i) = find(buf, b"\r\n") {
                            buf.drain(..i + 2);
                            continue;
                        }
                        fill(s, buf).await?;
                    }
                }
                while buf.len() < size + 2 {
                    fill(s, buf).await?;
                }
                body.extend_from_slice(&buf[..size]);
                if &buf[size..size + 2] != b"\r\n" {
                    self.violation("a chunk not followed by CRLF".into());
                    return None;
                }
                buf.drain(..size + 2);
            }
        }
        let len = match value("content-length") {
            None => 0,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => {
                    self.violation(format!("Content-Length `{v}` forwarded"));
                    return None;
                }
            },
        };
        while buf.len() < len {
            fill(s, buf).await?;
        }
        Some(buf.drain(..len).collect())
    }
}

/// An IP literal (IPv6 bracketed, never IPv4-mapped) or a lower-case host name of LDH
/// labels whose last label starts with a letter: this file's own oracle, independent of the
/// daemon's parser.
pub fn canonical_host(h: &str) -> bool {
    if let Some(v6) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .is_ok_and(|ip| ip.to_ipv4_mapped().is_none());
    }
    if h.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    h.len() <= 253
        && h.split('.').all(label_ok)
        && h.rsplit('.')
            .next()
            .is_some_and(|l| l.starts_with(|c: char| c.is_ascii_lowercase()))
}

/// `host:port` with a [`canonical_host`] and a decimal port 1-65535 without sign or zeros
/// in front.
pub fn canonical_authority(a: &str) -> bool {
    let Some((host, port)) = a.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && !port.starts_with('0')
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok();
    port_ok && canonical_host(host)
}

/// The host of an absolute `http://` URI (brackets kept for IPv6).
fn absolute_host(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.contains('@') {
        return None;
    }
    if authority.starts_with('[') {
        let end = authority.find(']')?;
        return Some(&authority[..=end]);
    }
    Some(authority.split(':').next().unwrap_or(authority))
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 8192];
    match s.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Some(())
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The first bytes of `b`, printable.
pub fn preview(b: &[u8]) -> String {
    b.iter()
        .take(160)
        .flat_map(|&c| std::ascii::escape_default(c))
        .map(char::from)
        .collect()
}

/// Closes `s` with a reset.
pub fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

async fn drain(mut s: TcpStream) {
    let mut b = [0u8; 8192];
    while let Ok(n) = s.read(&mut b).await {
        if n == 0 {
            return;
        }
    }
}

async fn echo(s: TcpStream) {
    let (mut r, mut w) = s.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

/// A target that, on every connection, sends `n` bytes and then resets it.
pub async fn reset_after(n: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(&vec![b'z'; n]).await;
                // Let the bytes leave before the reset discards what is still queued.
                let _ = s.flush().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                reset(s);
            });
        }
    });
    addr
}

/// How a read of a whole connection ended.
#[derive(Debug)]
pub struct Exchange {
    pub bytes: Vec<u8>,
    /// `None`: clean end of stream; `Some(kind)`: an error; `Some(TimedOut)` for no end
    /// within the bound.
    pub error: Option<std::io::ErrorKind>,
}

/// Sends `input` on a fresh connection (half-closing after it when `half_close`), then reads
/// until the daemon closes, at most `bound`.
pub async fn exchange(
    addr: SocketAddr,
    input: &[u8],
    half_close: bool,
    bound: Duration,
) -> Exchange {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(input).await;
    if half_close {
        let _ = s.shutdown().await;
    }
    read_all(&mut s, bound).await
}

/// Reads until end of stream or error, at most `bound`.
pub async fn read_all(s: &mut TcpStream, bound: Duration) -> Exchange {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(bound, async {
        let mut chunk = [0u8; 16384];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) => return None,
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) => return Some(e.kind()),
            }
        }
    })
    .await;
    Exchange {
        error: read.unwrap_or(Some(std::io::ErrorKind::TimedOut)),
        bytes,
    }
}

/// One response read off a connection.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        super::daemon::header(&self.head, name)
    }

    /// The `X-Pharox-Error` code.
    pub fn code(&self) -> Option<&str> {
        self.header("x-pharox-error")
    }
}

/// Splits what a connection received into responses (bodies by `Content-Length`); the
/// second value is what is left that does not parse as a response (empty normally).
pub fn responses(mut b: &[u8]) -> (Vec<Response>, Vec<u8>) {
    let mut out = Vec::new();
    while !b.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = resp.parse(b) else {
            break;
        };
        let status = resp.code.unwrap_or(0);
        let clen = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0);
        let head = String::from_utf8_lossy(&b[..len]).into_owned();
        let end = (len + clen).min(b.len());
        out.push(Response {
            status,
            head,
            body: b[len..end].to_vec(),
        });
        b = &b[end..];
    }
    (out, b.to_vec())
}

/// Counts panics in this process from the first call on (the default hook still prints).
pub fn panic_counter() -> Arc<AtomicUsize> {
    static COUNT: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
    COUNT
        .get_or_init(|| {
            let count = Arc::new(AtomicUsize::new(0));
            let c = count.clone();
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                c.fetch_add(1, Ordering::SeqCst);
                previous(info);
            }));
            count
        })
        .clone()
}

/// Waits (bounded, polling) until `f` holds; false if it never did.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..1000 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// A SOCKS5 CONNECT request (RFC 1928 §4) for address type `atyp` and raw address bytes
/// (a domain carries its length byte here).
pub fn socks_request(atyp: u8, addr: &[u8], port: u16) -> Vec<u8> {
    let mut v = vec![5, 1, 0, atyp];
    v.extend_from_slice(addr);
    v.extend_from_slice(&port.to_be_bytes());
    v
}

/// A SOCKS5 domain address: length byte, then the bytes.
pub fn socks_domain(name: &[u8]) -> Vec<u8> {
    let mut v = vec![name.len() as u8];
    v.extend_from_slice(name);
    v
}

/// Greets offering username/password, authenticates, sends `req`; returns the reply code
/// (`None` if the daemon closed first) and the stream.
pub async fn socks_connect(
    addr: SocketAddr,
    user: &str,
    pass: &str,
    req: &[u8],
) -> (Option<u8>, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = vec![5, 1, 2, 1, user.len() as u8];
    out.extend_from_slice(user.as_bytes());
    out.push(pass.len() as u8);
    out.extend_from_slice(pass.as_bytes());
    s.write_all(&out).await.unwrap();
    let mut m = [0u8; 4];
    if s.read_exact(&mut m).await.is_err() || m != [5, 2, 1, 0] {
        return (None, s);
    }
    let _ = s.write_all(req).await;
    let mut r = [0u8; 10];
    let code = match tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut r)).await {
        Ok(Ok(_)) => Some(r[1]),
        _ => None,
    };
    (code, s)
}

/// A SOCKS5 dialogue with random fields, cut at a random point.
#[derive(Clone, Debug)]
pub struct Dialogue {
    pub methods: Vec<u8>,
    pub auth_version: u8,
    pub user: Vec<u8>,
    pub pass: Vec<u8>,
    pub version: u8,
    pub command: u8,
    pub reserved: u8,
    pub atyp: u8,
    pub addr: Vec<u8>,
    pub port: u16,
    pub payload: Vec<u8>,
    pub cut: usize,
}

impl Dialogue {
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = vec![5, self.methods.len() as u8];
        b.extend_from_slice(&self.methods);
        b.extend_from_slice(&[self.auth_version, self.user.len() as u8]);
        b.extend_from_slice(&self.user);
        b.push(self.pass.len() as u8);
        b.extend_from_slice(&self.pass);
        b.extend_from_slice(&[self.version, self.command, self.reserved, self.atyp]);
        b.extend_from_slice(&self.addr);
        b.extend_from_slice(&self.port.to_be_bytes());
        b.extend_from_slice(&self.payload);
        b.truncate(self.cut);
        b
    }

    pub fn good_credentials(&self) -> bool {
        self.auth_version == 1 && self.user == b"w" && self.pass == b"x"
    }
}

/// Checks the daemon's side of a SOCKS5 dialogue: only documented messages, each allowed
/// by what the client sent; nothing after a refusal.
pub fn judge_socks(dialogue: &Dialogue, out: &[u8]) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    if out.len() < 2 || out[0] != 5 {
        return Err("not a method selection".into());
    }
    match out[1] {
        2 if dialogue.methods.contains(&2) => {}
        0xff if !dialogue.methods.contains(&2) => {
            return (out.len() == 2)
                .then_some(())
                .ok_or("bytes after 0xFF".into());
        }
        m => return Err(format!("method {m:#x} chosen")),
    }
    let rest = &out[2..];
    if rest.is_empty() {
        return Ok(());
    }
    if rest.len() < 2 || rest[0] != 1 || rest[1] > 1 {
        return Err("not an RFC 1929 status".into());
    }
    if rest[1] == 0 && !dialogue.good_credentials() {
        return Err("bad credentials accepted".into());
    }
    let rest = &rest[2..];
    if rest[..].is_empty() || out[3] != 0 {
        return rest
            .is_empty()
            .then_some(())
            .ok_or("bytes after an auth failure".into());
    }
    if rest.len() < 10 || rest[0] != 5 || rest[2] != 0 || !SOCKS_REPLIES.contains(&rest[1]) {
        return Err("not a SOCKS5 reply".into());
    }
    if rest[1] != 0 && rest.len() != 10 {
        return Err("bytes after a refusal".into());
    }
    if rest[1] == 0 && (dialogue.command != 1 || dialogue.version != 5) {
        return Err("a tunnel for a request that is not CONNECT".into());
    }
    Ok(())
}
