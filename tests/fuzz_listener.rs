//! Issue 10: a seeded black-box fuzz of the proxy port. About 3 000 hostile openings (HTTP
//! heads with random mutations, the smuggling forms CL.TE, TE.CL, TE.TE, CL.CL, obfuscated TE
//! and bare-LF lines, bad framing, pipelined garbage, SOCKS5 dialogues with random fields),
//! each sent to a daemon whose only upstream is a strict recording HTTP proxy. A deadline
//! stops generating after about 30 s (a bound, not an assertion).
//!
//! Checked: every HTTP answer is a success or carries a documented `X-Pharox-Error` code
//! with its status; every SOCKS5 answer is a documented message; no smuggled request and
//! nothing malformed ever reaches the upstream; no panic; no lease left; a clean stop.
//!
//! Fails on the bugs of items 1, 11 and 12 (bare hyper answers, the head limit after the
//! first request, destinations written raw) and on any smuggling the daemon lets through.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::daemon::*;
use common::hostile::*;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

const SEED: u64 = 0x0f02_2a11_5eed;
const CASES: usize = 3000;
const DEADLINE: Duration = Duration::from_secs(30);
const PARALLEL: usize = 24;
/// How long one case may take before its connection counts as left open.
const CASE_BOUND: Duration = Duration::from_secs(20);

/// What a case expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Well-formed: `n` successful responses (a CONNECT: the 200, then the echo).
    Success(usize),
    /// Refused with 400 (or 431) `bad_request` after `ok` successful responses, nothing of it
    /// forwarded, then closed.
    Refused { ok: usize },
    /// Anything documented (a success or a code), nothing malformed forwarded.
    Documented,
    /// A SOCKS5 dialogue.
    Socks,
}

struct Case {
    id: usize,
    kind: &'static str,
    bytes: Vec<u8>,
    /// Half-close after sending (tunnels, SOCKS5, inputs that may be incomplete).
    half_close: bool,
    expect: Expect,
    dialogue: Option<Dialogue>,
    /// A CONNECT: sent once the tunnel is open, and read back (the upstream echoes).
    tunnel_data: Option<Vec<u8>>,
}

struct Gen {
    rng: fastrand::Rng,
    auth: String,
}

impl Gen {
    fn get(&self, id: usize, path: &str, close: bool) -> String {
        format!(
            "GET http://c{id}.test/{path} HTTP/1.1\r\nHost: c{id}.test\r\nProxy-Authorization: {}\r\n{}\r\n",
            self.auth,
            if close { "Connection: close\r\n" } else { "" }
        )
    }

    /// A request that would be a second, smuggled one if the framing were read two ways.
    fn inner(&self, id: usize) -> String {
        format!(
            "GET http://smuggled.invalid/c{id} HTTP/1.1\r\nHost: smuggled.invalid\r\nProxy-Authorization: {}\r\n\r\n",
            self.auth
        )
    }

    /// The head of a POST to this case's marker, with `framing` header lines.
    fn post(&self, id: usize, framing: &str) -> String {
        format!(
            "POST http://c{id}.test/outer HTTP/1.1\r\nHost: c{id}.test\r\nProxy-Authorization: {}\r\n{framing}\r\n",
            self.auth
        )
    }

    fn valid(&mut self, id: usize) -> Case {
        let (kind, bytes, half_close, expect) = match self.rng.usize(0..4) {
            0 => (
                "valid GET",
                self.get(id, "ok", true),
                false,
                Expect::Success(1),
            ),
            1 => {
                let body = "x".repeat(self.rng.usize(0..64));
                let head = self.post(
                    id,
                    &format!("Content-Length: {}\r\nConnection: close\r\n", body.len()),
                );
                (
                    "valid POST",
                    format!("{head}{body}"),
                    false,
                    Expect::Success(1),
                )
            }
            2 => {
                let head = self.post(id, "Transfer-Encoding: chunked\r\nConnection: close\r\n");
                (
                    "valid chunked POST",
                    format!("{head}5\r\nhello\r\n0\r\n\r\n"),
                    false,
                    Expect::Success(1),
                )
            }
            _ => {
                let head = format!(
                    "CONNECT c{id}.test:443 HTTP/1.1\r\nHost: c{id}.test:443\r\nProxy-Authorization: {}\r\n\r\n",
                    self.auth
                );
                // Inside a tunnel anything goes, a "smuggled" request included.
                let data = self.inner(id).into_bytes();
                return Case {
                    id,
                    kind: "valid CONNECT",
                    bytes: head.into_bytes(),
                    half_close: false,
                    expect: Expect::Success(1),
                    dialogue: None,
                    tunnel_data: Some(data),
                };
            }
        };
        Case {
            id,
            kind,
            bytes: bytes.into_bytes(),
            half_close,
            expect,
            dialogue: None,
            tunnel_data: None,
        }
    }

    fn smuggle(&mut self, id: usize) -> Case {
        let inner = self.inner(id);
        let chunked_then_inner = format!("0\r\n\r\n{inner}");
        let whole = chunked_then_inner.len();
        let te_obfuscations = [
            "Transfer-Encoding : chunked",
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding:\tchunked",
            "Transfer-Encoding: chunked, identity",
            "Transfer-Encoding: identity, chunked",
            "Transfer-encoding: cHuNkEd",
            "Transfer-Encoding: \"chunked\"",
            "Transfer-Encoding: chunked\r\n ",
            "X-Padding: y\r\n Transfer-Encoding: chunked",
            "Transfer-Encoding\r\n: chunked",
            "Transfer_Encoding: chunked",
        ];
        let (kind, bytes) = match self.rng.usize(0..7) {
            0 => (
                "CL.TE",
                format!(
                    "{}{chunked_then_inner}",
                    self.post(
                        id,
                        &format!("Content-Length: {whole}\r\nTransfer-Encoding: chunked\r\n")
                    )
                ),
            ),
            1 => (
                "TE.CL",
                format!(
                    "{}{:x}\r\n{inner}\r\n0\r\n\r\n",
                    self.post(id, "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n"),
                    inner.len()
                ),
            ),
            2 => (
                "TE.TE",
                format!(
                    "{}{chunked_then_inner}",
                    self.post(id, "Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n")
                ),
            ),
            3 => (
                "CL.CL",
                format!(
                    "{}{inner}",
                    self.post(
                        id,
                        &format!("Content-Length: 0\r\nContent-Length: {}\r\n", inner.len())
                    )
                ),
            ),
            4 => {
                let te = te_obfuscations[self.rng.usize(..te_obfuscations.len())];
                (
                    "obfuscated TE",
                    format!(
                        "{}{chunked_then_inner}",
                        self.post(id, &format!("Content-Length: {whole}\r\n{te}\r\n"))
                    ),
                )
            }
            5 => {
                let get = self.get(id, "lf", false);
                let lf = match self.rng.usize(0..3) {
                    0 => get.replace("\r\n", "\n"),
                    1 => get.replacen("\r\n", "\n", 2),
                    _ => get.replacen("\r\nHost", "\nHost", 1),
                };
                ("bare LF", format!("{lf}{inner}"))
            }
            _ => {
                let get = self.get(id, "cr", false);
                let cr = match self.rng.usize(0..2) {
                    0 => get.replacen("\r\nHost", "\rHost", 1),
                    _ => get.replacen("\r\nHost", "\r\r\nHost", 1),
                };
                ("bare CR", format!("{cr}{inner}"))
            }
        };
        Case {
            id,
            kind,
            bytes: bytes.into_bytes(),
            half_close: true,
            expect: Expect::Refused { ok: 0 },
            dialogue: None,
            tunnel_data: None,
        }
    }

    fn bad_framing(&mut self) -> String {
        let cl = [
            "-1",
            "+5",
            "1.5",
            "5, 6",
            "0x5",
            "99999999999999999999",
            "5 5",
            "",
            "5\x0b",
        ];
        match self.rng.usize(0..4) {
            0 => format!("Content-Length: {}\r\n", cl[self.rng.usize(..cl.len())]),
            1 => "Content-Length: 5\r\nContent-Length: 6\r\n".into(),
            2 => {
                let te = ["gzip", "chunked, gzip", "identity", "compress"];
                format!("Transfer-Encoding: {}\r\n", te[self.rng.usize(..te.len())])
            }
            _ => "Transfer-Encoding: chunked\r\nHTTP10".into(),
        }
    }

    fn framing(&mut self, id: usize) -> Case {
        let framing = self.bad_framing();
        let head = match framing.strip_suffix("HTTP10") {
            Some(f) => self.post(id, f).replacen("HTTP/1.1", "HTTP/1.0", 1),
            None => self.post(id, &framing),
        };
        Case {
            id,
            kind: "bad framing",
            bytes: format!("{head}hello").into_bytes(),
            half_close: true,
            expect: Expect::Refused { ok: 0 },
            dialogue: None,
            tunnel_data: None,
        }
    }

    /// A good keep-alive request, then a bad one on the same connection.
    fn pipelined(&mut self, id: usize) -> Case {
        let first = self.get(id, "first", false);
        let (kind, second) = match self.rng.usize(0..4) {
            0 => {
                let f = self.bad_framing().replace("HTTP10", "");
                (
                    "pipelined bad framing",
                    format!("{}hello", self.post(id, &f)),
                )
            }
            1 => (
                "pipelined oversized head",
                format!(
                    "GET http://c{id}.test/big HTTP/1.1\r\nHost: c{id}.test\r\nProxy-Authorization: {}\r\nX-Big: {}\r\n\r\n",
                    self.auth,
                    "b".repeat(70 * 1024)
                ),
            ),
            2 => ("pipelined garbage", "NOT HTTP AT ALL\r\n\r\n".into()),
            _ => (
                "pipelined bare LF",
                self.get(id, "lf", true).replace("\r\n", "\n"),
            ),
        };
        Case {
            id,
            kind,
            bytes: format!("{first}{second}").into_bytes(),
            half_close: false,
            expect: Expect::Refused { ok: 1 },
            dialogue: None,
            tunnel_data: None,
        }
    }

    fn mutated(&mut self, id: usize) -> Case {
        let mut b = self.valid(id).bytes;
        for _ in 0..self.rng.usize(1..5) {
            if b.is_empty() {
                break;
            }
            let at = self.rng.usize(..b.len());
            let special = [b'\r', b'\n', 0, b' ', b':', b'\t', b'%', 0xff, b'\x7f'];
            match self.rng.usize(0..5) {
                0 => b[at] = self.rng.u8(..),
                1 => b.insert(at, special[self.rng.usize(..special.len())]),
                2 => {
                    b.remove(at);
                }
                3 => {
                    let line_end = b[at..].iter().position(|&c| c == b'\n').map(|p| at + p + 1);
                    let line_start = b[..at]
                        .iter()
                        .rposition(|&c| c == b'\n')
                        .map_or(0, |p| p + 1);
                    if let Some(e) = line_end {
                        let line = b[line_start..e].to_vec();
                        b.splice(e..e, line);
                    }
                }
                _ => b.truncate(at),
            }
        }
        if b.first() == Some(&5) {
            b[0] = b'G';
        }
        Case {
            id,
            kind: "mutated",
            bytes: b,
            half_close: true,
            expect: Expect::Documented,
            dialogue: None,
            tunnel_data: None,
        }
    }

    fn garbage(&mut self, id: usize) -> Case {
        let mut b: Vec<u8> = (0..self.rng.usize(1..200))
            .map(|_| self.rng.u8(..))
            .collect();
        if b[0] == 5 {
            b[0] = 6;
        }
        Case {
            id,
            kind: "garbage",
            bytes: b,
            half_close: true,
            expect: Expect::Documented,
            dialogue: None,
            tunnel_data: None,
        }
    }

    fn socks(&mut self, id: usize) -> Case {
        let r = &mut self.rng;
        let pick = |r: &mut fastrand::Rng, good: &[u8]| -> Vec<u8> {
            if r.usize(0..4) > 0 {
                good.to_vec()
            } else {
                (0..r.usize(0..8)).map(|_| r.u8(..)).collect()
            }
        };
        let methods: Vec<u8> = (0..r.usize(0..5))
            .map(|_| [2u8, 0, 1, r.u8(..)][r.usize(0..4)])
            .collect();
        let user = pick(r, b"w");
        let pass = pick(r, b"x");
        let atyp = [1u8, 3, 4, r.u8(..)][r.usize(0..4)];
        let addr = match r.usize(0..6) {
            0 => vec![127, 0, 0, 1],
            1 => (0..4).map(|_| r.u8(..)).collect(),
            2 => (0..16).map(|_| r.u8(..)).collect(),
            3 => socks_domain(format!("c{id}.test").as_bytes()),
            4 => {
                let n = r.usize(0..=255);
                socks_domain(&(0..n).map(|_| r.u8(..)).collect::<Vec<_>>())
            }
            _ => socks_domain(
                b"example.com:80 HTTP/1.1\r\nHost: x\r\n\r\nGET http://smuggled.invalid/ HTTP/1.1",
            ),
        };
        let dialogue = Dialogue {
            methods,
            auth_version: if r.usize(0..5) > 0 { 1 } else { r.u8(..) },
            user,
            pass,
            version: if r.usize(0..5) > 0 { 5 } else { r.u8(..) },
            command: if r.usize(0..4) > 0 { 1 } else { r.u8(..) },
            reserved: r.u8(..),
            atyp,
            addr,
            port: [443u16, 0, r.u16(..)][r.usize(0..3)],
            payload: (0..r.usize(0..32)).map(|_| r.u8(..)).collect(),
            cut: r.usize(0..400),
        };
        Case {
            id,
            kind: "socks5",
            bytes: dialogue.bytes(),
            half_close: true,
            expect: Expect::Socks,
            dialogue: Some(dialogue),
            tunnel_data: None,
        }
    }

    fn case(&mut self, id: usize) -> Case {
        match self.rng.usize(0..100) {
            0..10 => self.valid(id),
            10..35 => self.smuggle(id),
            35..45 => self.framing(id),
            45..55 => self.pipelined(id),
            55..75 => self.mutated(id),
            75..80 => self.garbage(id),
            _ => self.socks(id),
        }
    }
}

/// What is wrong with the answer to `case`, if anything.
fn judge(case: &Case, got: &Exchange, up: &Upstream) -> Option<String> {
    if got.error == Some(std::io::ErrorKind::TimedOut) && case.expect != Expect::Success(1) {
        return Some("connection left open".into());
    }
    if let Some(d) = &case.dialogue {
        return judge_socks(d, &got.bytes).err();
    }
    let (resp, rest) = responses(&got.bytes);
    let tunnel = resp
        .first()
        .is_some_and(|r| r.status == 200 && r.head.contains("Connection established"));
    let judged: &[Response] = if tunnel { &resp[..1] } else { &resp };
    for r in judged {
        let fine =
            (200..300).contains(&r.status) || r.code().is_some_and(|c| documented(r.status, c));
        if !fine {
            return Some(format!(
                "undocumented answer {}",
                preview(r.head.as_bytes())
            ));
        }
    }
    if !tunnel && !rest.is_empty() {
        return Some(format!("unparsable answer bytes {}", preview(&rest)));
    }
    let marker = format!("/c{} ", case.id);
    let forwarded = up
        .seen()
        .iter()
        .filter(|s| s.head.contains(&format!("c{}.test/", case.id)) || s.head.contains(&marker))
        .count();
    match case.expect {
        Expect::Success(n) => {
            if judged.len() != n || !judged.iter().all(|r| (200..300).contains(&r.status)) {
                return Some(format!("expected {n} successes: {}", preview(&got.bytes)));
            }
        }
        Expect::Refused { ok } => {
            let refused = judged.get(ok);
            let ok_first = judged[..ok.min(judged.len())]
                .iter()
                .all(|r| r.status == 200);
            if judged.len() != ok + 1
                || !ok_first
                || !refused.is_some_and(|r| {
                    matches!(r.status, 400 | 431) && r.code() == Some("bad_request")
                })
            {
                return Some(format!(
                    "expected {ok} success(es) then 400 bad_request: {}",
                    preview(&got.bytes)
                ));
            }
            if forwarded > ok {
                return Some(format!("forwarded {forwarded} requests, {ok} good"));
            }
        }
        Expect::Documented => {
            if resp.is_empty() && !got.bytes.is_empty() {
                return Some(format!("not HTTP: {}", preview(&got.bytes)));
            }
        }
        Expect::Socks => unreachable!(),
    }
    None
}

/// Opens a tunnel with `head`, sends `data` through it and reads the echo; the answer is the
/// reply head and the echo.
async fn through_tunnel(addr: std::net::SocketAddr, head: &[u8], data: &[u8]) -> Exchange {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let run = async {
        s.write_all(head).await?;
        let reply = read_head(&mut s).await;
        let mut bytes = reply.clone().into_bytes();
        if status(&reply) == 200 {
            s.write_all(data).await?;
            let mut echo = vec![0; data.len()];
            s.read_exact(&mut echo).await?;
            bytes.extend_from_slice(&echo);
        }
        Ok::<_, std::io::Error>(bytes)
    };
    match tokio::time::timeout(CASE_BOUND, run).await {
        Ok(Ok(bytes)) => Exchange { bytes, error: None },
        Ok(Err(e)) => Exchange {
            bytes: Vec::new(),
            error: Some(e.kind()),
        },
        Err(_) => Exchange {
            bytes: Vec::new(),
            error: Some(std::io::ErrorKind::TimedOut),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_hostile_openings_never_get_through() {
    let panics = panic_counter();
    let panics_before = panics.load(Ordering::SeqCst);
    let up = Upstream::start(Behaviour::Ok, Some(basic("up", "secret")));
    let cfg = format!(
        r#"
[limits]
head_timeout_ms = 1000
connect_timeout_ms = 2000
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
failover_attempts = 0
[pools.health]
max_failures = 1000000
[[pools.proxies]]
url = "http://up:secret@{}"
"#,
        up.addr
    );
    let d = TestDaemon::start(&cfg).await;
    let mut generator = Gen {
        rng: fastrand::Rng::with_seed(SEED),
        auth: basic("w", "x"),
    };
    let deadline = Instant::now() + DEADLINE;
    let slots = Arc::new(Semaphore::new(PARALLEL));
    let mut runs = JoinSet::new();
    let mut generated = 0;
    for id in 0..CASES {
        if Instant::now() >= deadline {
            break;
        }
        let case = generator.case(id);
        generated += 1;
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (addr, up) = (d.addr, up.clone());
        runs.spawn(async move {
            let got = match &case.tunnel_data {
                Some(data) => through_tunnel(addr, &case.bytes, data).await,
                None => exchange(addr, &case.bytes, case.half_close, CASE_BOUND).await,
            };
            drop(permit);
            judge(&case, &got, &up).map(|why| {
                let sent = preview(&case.bytes);
                (case.kind, format!("#{}: {why} (sent {sent})", case.id))
            })
        });
    }
    let mut failures: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    while let Some(r) = runs.join_next().await {
        if let Some((kind, why)) = r.expect("a case task panicked") {
            failures.entry(kind).or_default().push(why);
        }
    }
    d.wait_leased("p", 0).await;
    // The daemon still serves.
    let (s, head) = connect(d.addr, "after.test:443", Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 200, "after the fuzz: {head}");
    drop(s);
    d.wait_leased("p", 0).await;
    d.stop().await;

    let mut report = Vec::new();
    for (kind, list) in &failures {
        report.push(format!("{kind}: {} failures, e.g.", list.len()));
        report.extend(
            list.iter()
                .take(3)
                .map(|l| format!("    {}", &l[..l.len().min(300)])),
        );
    }
    let violations = up.violations();
    if !violations.is_empty() {
        report.push(format!(
            "upstream saw {} things it must never get, e.g.",
            violations.len()
        ));
        report.extend(
            violations
                .iter()
                .take(5)
                .map(|v| format!("    {}", &v[..v.len().min(300)])),
        );
    }
    let panicked = panics.load(Ordering::SeqCst) - panics_before;
    if panicked > 0 {
        report.push(format!("{panicked} panics"));
    }
    assert!(
        generated >= 300,
        "only {generated} cases before the deadline"
    );
    assert!(
        report.is_empty(),
        "{generated} cases:\n{}",
        report.join("\n")
    );
}
