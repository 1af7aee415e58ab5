//! Issue 10, plain HTTP: items 4 (upstream response timeout), 8 (username length), 11 (every
//! error carries its code and closes the connection, bad framing included, on any request of a
//! keep-alive connection), 12 (the head limit on every request), 13 (Host from the URI) and 14
//! (a malformed chunked body is the client's error; an upstream's 407 is our credentials'
//! fault: fail over).
//!
//! The plain-HTTP path is being rewritten: these are written to the expectations.

mod common;

use std::time::Duration;

use common::daemon::*;
use common::hostile::*;
use pharox::ProxyStatus;
use pharox::storage::Storage;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// How long a connection the daemon should close may stay open before the test calls it
/// open (a bound on a wait, not a speed requirement).
const CLOSE_BOUND: Duration = Duration::from_secs(15);

fn config(upstreams: &[(&str, &Upstream)], pool_extra: &str, top: &str) -> String {
    let mut s = format!(
        "{top}\n[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\n{pool_extra}\n"
    );
    for (id, up) in upstreams {
        s.push_str(&format!(
            "[[pools.proxies]]\nurl = \"http://up:secret@{}\"\nid = \"{id}\"\n",
            up.addr
        ));
    }
    s
}

fn up_auth() -> Option<String> {
    Some(basic("up", "secret"))
}

fn auth() -> String {
    basic("w", "x")
}

/// A plain GET for `path` on `example.test`, keep-alive.
fn get(path: &str) -> String {
    format!(
        "GET http://example.test{path} HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: {}\r\n\r\n",
        auth()
    )
}

/// [`get`], closing the connection after the response.
fn get_close(path: &str) -> String {
    get(path).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
}

/// What went wrong with the answer to `raw` (the last response must be `status` with
/// `code`, a body, and the connection closed afterwards), or `None`.
fn judge(got: &Exchange, responses_wanted: usize, status: u16, code: &str) -> Option<String> {
    let (resp, rest) = responses(&got.bytes);
    let mut problems = Vec::new();
    if resp.len() != responses_wanted || !rest.is_empty() {
        problems.push(format!("{} responses", resp.len()));
    }
    if let Some(last) = resp.last() {
        if last.status != status || last.code() != Some(code) {
            problems.push(format!("answered {} {:?}", last.status, last.code()));
        }
        if last.body.is_empty() {
            problems.push("no body".into());
        }
        if !last
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
        {
            problems.push("no `Connection: close`".into());
        }
    }
    if got.error == Some(std::io::ErrorKind::TimedOut) {
        problems.push("connection left open".into());
    }
    (!problems.is_empty()).then(|| format!("{}: {}", problems.join(", "), preview(&got.bytes)))
}

/// Malformed framings (the body, if any, is `hello`).
fn bad_framings() -> Vec<(&'static str, String)> {
    let h = |extra: &str, version: &str| {
        format!(
            "POST http://example.test/bad HTTP/{version}\r\nHost: example.test\r\nProxy-Authorization: {}\r\n{extra}\r\nhello",
            auth()
        )
    };
    vec![
        ("CL -1", h("Content-Length: -1\r\n", "1.1")),
        ("CL +5", h("Content-Length: +5\r\n", "1.1")),
        ("CL 1.5", h("Content-Length: 1.5\r\n", "1.1")),
        ("CL list", h("Content-Length: 5, 6\r\n", "1.1")),
        (
            "CL twice",
            h("Content-Length: 5\r\nContent-Length: 6\r\n", "1.1"),
        ),
        ("CL hex", h("Content-Length: 0x5\r\n", "1.1")),
        (
            "CL overflow",
            h("Content-Length: 99999999999999999999999\r\n", "1.1"),
        ),
        (
            "CL and TE",
            h("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "1.1"),
        ),
        ("TE gzip", h("Transfer-Encoding: gzip\r\n", "1.1")),
        (
            "TE chunked, gzip",
            h("Transfer-Encoding: chunked, gzip\r\n", "1.1"),
        ),
        ("TE identity", h("Transfer-Encoding: identity\r\n", "1.1")),
        (
            "TE twice",
            h(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "1.1",
            ),
        ),
        ("TE on HTTP/1.0", h("Transfer-Encoding: chunked\r\n", "1.0")),
        ("TE obfuscated", h("Transfer-Encoding: xchunked\r\n", "1.1")),
        (
            "space before colon",
            h("Transfer-Encoding : chunked\r\n", "1.1"),
        ),
        ("header without colon", h("Bad Header\r\n", "1.1")),
        ("obsolete line folding", h("X-Folded: a\r\n b\r\n", "1.1")),
    ]
}

/// Item 11: bad framing, as the first request of a connection and as the second on a
/// keep-alive one. Fails on the bug: hyper answered a bare 400 (no code, no body), and the
/// second-request forms were not even answered by pharox.
#[tokio::test]
async fn bad_framing_is_answered_with_a_code_and_closes_on_any_request() {
    let up = Upstream::start(Behaviour::Ok, up_auth());
    let d = TestDaemon::start(&config(&[("up", &up)], "", "")).await;
    let mut cases = JoinSet::new();
    for (name, raw) in bad_framings() {
        let addr = d.addr;
        let first = raw.clone();
        cases.spawn(async move {
            let got = exchange(addr, first.as_bytes(), false, CLOSE_BOUND).await;
            judge(&got, 1, 400, "bad_request").map(|p| format!("{name} (first request): {p}"))
        });
        cases.spawn(async move {
            let both = format!("{}{raw}", get("/good"));
            let got = exchange(addr, both.as_bytes(), false, CLOSE_BOUND).await;
            judge(&got, 2, 400, "bad_request").map(|p| format!("{name} (second request): {p}"))
        });
    }
    let mut wrong: Vec<String> = cases.join_all().await.into_iter().flatten().collect();
    wrong.sort();
    let forwarded: Vec<String> = up
        .seen()
        .iter()
        .filter(|s| s.head.contains("/bad"))
        .map(|s| preview(s.head.as_bytes()))
        .collect();
    wrong.extend(forwarded.into_iter().map(|f| format!("forwarded: {f}")));
    wrong.extend(up.violations());
    assert!(wrong.is_empty(), "{} problems: {wrong:#?}", wrong.len());
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Item 11: every refusal on plain HTTP closes the connection, 407 included. Fails on the
/// bug: a plain-HTTP 407 (and 403) left the keep-alive connection open.
#[tokio::test]
async fn refusals_on_plain_http_carry_their_code_and_close() {
    let up = Upstream::start(Behaviour::Ok, up_auth());
    let d = TestDaemon::start(&config(&[("up", &up)], "", "")).await;
    let bad = |auth: &str, extra: &str| {
        format!(
            "GET http://example.test/refused HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: {auth}\r\n{extra}\r\n"
        )
    };
    let cases = [
        (
            "wrong password",
            bad(&basic("w", "nope"), ""),
            407,
            "auth_failed",
        ),
        (
            "no credentials",
            "GET http://example.test/refused HTTP/1.1\r\nHost: example.test\r\n\r\n".into(),
            407,
            "auth_required",
        ),
        (
            "unknown pool",
            bad(&auth(), "X-Pharox-Pool: nope\r\n"),
            403,
            "unknown_pool",
        ),
        (
            "bad username",
            bad(&basic("w-pool-p-colour-red", "x"), ""),
            400,
            "bad_username",
        ),
        (
            "https URL",
            format!(
                "GET https://example.test/refused HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: {}\r\n\r\n",
                auth()
            ),
            400,
            "bad_request",
        ),
    ];
    let mut runs = JoinSet::new();
    for (name, raw, status_code, code) in cases {
        for (n, input) in [(1, raw.clone()), (2, format!("{}{raw}", get("/good")))] {
            let addr = d.addr;
            runs.spawn(async move {
                let got = exchange(addr, input.as_bytes(), false, CLOSE_BOUND).await;
                judge(&got, n, status_code, code).map(|p| format!("{name} (request {n}): {p}"))
            });
        }
    }
    let mut wrong: Vec<String> = runs.join_all().await.into_iter().flatten().collect();
    wrong.sort();
    if up.seen().iter().any(|s| s.head.contains("/refused")) {
        wrong.push("a refused request was forwarded".into());
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Item 12: `limits.max_head_bytes` holds for every request of a connection. Fails on the
/// bug: only the first head was measured; a later one with a long header line was forwarded.
#[tokio::test]
async fn the_head_limit_holds_on_every_request() {
    let up = Upstream::start(Behaviour::Ok, up_auth());
    let mut wrong = Vec::new();
    for (limit, line) in [(4096usize, 5000usize), (64 * 1024, 70 * 1024)] {
        let top = format!("[limits]\nmax_head_bytes = {limit}");
        let d = TestDaemon::start(&config(&[("up", &up)], "", &top)).await;
        let big = format!(
            "GET http://example.test/big HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: {}\r\nX-Big: {}\r\n\r\n",
            auth(),
            "b".repeat(line)
        );
        let big_connect = format!(
            "CONNECT example.test:443 HTTP/1.1\r\nProxy-Authorization: {}\r\nX-Big: {}\r\n\r\n",
            auth(),
            "b".repeat(line)
        );
        for (name, n, input) in [
            ("first plain", 1, big.clone()),
            ("second plain", 2, format!("{}{big}", get("/good"))),
            ("first CONNECT", 1, big_connect),
        ] {
            let got = exchange(d.addr, input.as_bytes(), false, CLOSE_BOUND).await;
            if let Some(p) = judge(&got, n, 431, "bad_request") {
                wrong.push(format!("{name}, {line} bytes over a limit of {limit}: {p}"));
            }
        }
        d.wait_leased("p", 0).await;
        d.stop().await;
    }
    if up.seen().iter().any(|s| s.head.contains("/big")) {
        wrong.push("an oversized head was forwarded".into());
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Item 13: the Host header sent on is the request target's authority (RFC 9112 §3.2.2),
/// whatever the client put in its own. Fails on the bug: a disagreeing or duplicated Host
/// was forwarded unchanged.
#[tokio::test]
async fn the_host_header_comes_from_the_request_target() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(DIRECT_POOL).await;
    let authority = origin.addr.to_string();
    let cases = [
        ("disagreeing", "Host: evil.test\r\n"),
        ("duplicated", "Host: evil.test\r\nHost: other.test\r\n"),
        (
            "duplicated, right one first",
            "Host: AUTH\r\nHost: evil.test\r\n",
        ),
        ("missing", ""),
    ];
    let mut wrong = Vec::new();
    for (name, hosts) in cases {
        let before = origin.requests().len();
        let hosts = hosts.replace("AUTH", &authority);
        let req = format!(
            "GET http://{authority}/host HTTP/1.1\r\n{hosts}Proxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            basic("w", "x")
        );
        let got = exchange(d.addr, req.as_bytes(), false, CLOSE_BOUND).await;
        let (resp, _) = responses(&got.bytes);
        let seen: Vec<String> = origin.requests()[before..].to_vec();
        match (resp.first(), seen.as_slice()) {
            // Refusing a duplicated Host is allowed too, with its code, sending nothing.
            (Some(r), []) if r.status == 400 && r.code() == Some("bad_request") => {}
            (Some(r), [head]) if r.status == 200 => {
                let hosts: Vec<&str> = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
                    .map(|(_, v)| v.trim())
                    .collect();
                if hosts != [authority.as_str()] {
                    wrong.push(format!("{name}: the origin got Host {hosts:?}"));
                }
            }
            (r, s) => wrong.push(format!("{name}: answered {r:?}, origin saw {s:?}")),
        }
    }
    // Through an HTTP upstream the absolute form goes on, with the URI's Host.
    let up = Upstream::start(Behaviour::Ok, up_auth());
    let d2 = TestDaemon::start(&config(&[("up", &up)], "", "")).await;
    let req = format!(
        "GET http://example.test/host HTTP/1.1\r\nHost: evil.test\r\nHost: other.test\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        auth()
    );
    let got = exchange(d2.addr, req.as_bytes(), false, CLOSE_BOUND).await;
    let (resp, _) = responses(&got.bytes);
    for s in up.seen() {
        if header(&s.head, "host") != Some("example.test") {
            wrong.push(format!("the upstream got {}", preview(s.head.as_bytes())));
        }
    }
    let refused = resp
        .first()
        .is_some_and(|r| r.code() == Some("bad_request"));
    if up.seen().is_empty() && !refused {
        wrong.push(format!("upstream case answered {}", preview(&got.bytes)));
    }
    wrong.extend(up.violations());
    assert!(wrong.is_empty(), "{wrong:#?}");
    d2.stop().await;
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Item 14: a chunked body the client botched is the client's error. Fails on the bug:
/// answered 502 upstream_failed (and counted against the upstream).
#[tokio::test]
async fn a_malformed_chunked_body_is_a_bad_request() {
    let up = Upstream::start(Behaviour::Ok, up_auth());
    let d = TestDaemon::start(&config(
        &[("up", &up)],
        "failover_attempts = 0\n[pools.health]\nmax_failures = 1\ncooldown_seconds = 3600",
        "",
    ))
    .await;
    let mut wrong = Vec::new();
    for (name, body) in [
        ("bad size", "zz\r\nhello\r\n0\r\n\r\n"),
        ("no CRLF after the data", "5\r\nhelloXX0\r\n\r\n"),
        (
            "size overflow",
            "ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        ),
        ("negative size", "-5\r\nhello\r\n0\r\n\r\n"),
    ] {
        let req = format!(
            "POST http://example.test/chunked HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
            auth()
        );
        let got = exchange(d.addr, req.as_bytes(), false, CLOSE_BOUND).await;
        if let Some(p) = judge(&got, 1, 400, "bad_request") {
            wrong.push(format!("{name}: {p}"));
        }
    }
    let info = d
        .state
        .manager
        .storage()
        .get_proxy(&"up".into())
        .await
        .unwrap()
        .unwrap();
    if info.proxy.status != ProxyStatus::Active {
        wrong.push("the client's error rested the upstream".into());
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Item 14: an upstream's 407 on plain HTTP means our credentials for it are wrong: count
/// it, fail over, 502 when every upstream refuses. Fails on the bug: the upstream's bare
/// 407 (with its own Proxy-Authenticate) reached the client.
#[tokio::test]
async fn an_upstream_407_on_plain_http_fails_over() {
    let wrong_creds = Upstream::start(Behaviour::Status(407), up_auth());
    let good = Upstream::start(Behaviour::Ok, up_auth());
    let d = TestDaemon::start(&config(
        &[("bad", &wrong_creds), ("good", &good)],
        "failover_attempts = 1\n[pools.health]\nmax_failures = 1\ncooldown_seconds = 3600",
        "",
    ))
    .await;
    let got = exchange(d.addr, get_close("/a").as_bytes(), false, CLOSE_BOUND).await;
    let (resp, _) = responses(&got.bytes);
    let first = resp
        .first()
        .unwrap_or_else(|| panic!("no answer: {}", preview(&got.bytes)));
    assert_eq!(first.status, 200, "{}", first.head);
    assert_eq!(first.header("x-pharox-proxy-id"), Some("good"));
    assert_eq!(
        String::from_utf8_lossy(&first.body),
        "proxied:http://example.test/a"
    );
    let bad = d
        .state
        .manager
        .storage()
        .get_proxy(&"bad".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        bad.proxy.status,
        ProxyStatus::Inactive,
        "the 407 was counted"
    );
    d.wait_leased("p", 0).await;
    d.stop().await;

    // Only upstreams that refuse our credentials: 502, and no upstream challenge leaks.
    let d = TestDaemon::start(&config(
        &[("bad", &wrong_creds)],
        "failover_attempts = 0",
        "",
    ))
    .await;
    let got = exchange(d.addr, get("/b").as_bytes(), false, CLOSE_BOUND).await;
    if let Some(p) = judge(&got, 1, 502, "upstream_failed") {
        panic!("{p}");
    }
    assert!(!String::from_utf8_lossy(&got.bytes).contains("upstream\""));
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Item 4: an upstream that accepts a plain request and never answers holds neither the
/// client nor the lease: 504 upstream_timeout, counted against it. Fails on the bug: the
/// client waited as long as it cared to, with the lease held.
#[tokio::test]
async fn a_silent_upstream_answers_504_and_is_counted() {
    let silent = Upstream::start(Behaviour::Stall, up_auth());
    let d = TestDaemon::start(&config(
        &[("silent", &silent)],
        "failover_attempts = 0\n[pools.health]\nmax_failures = 1\ncooldown_seconds = 3600",
        "[limits]\nconnect_timeout_ms = 500\nresponse_timeout_ms = 500\nidle_timeout_secs = 1",
    ))
    .await;
    let got = exchange(
        d.addr,
        get("/silent").as_bytes(),
        false,
        Duration::from_secs(60),
    )
    .await;
    if let Some(p) = judge(&got, 1, 504, "upstream_timeout") {
        panic!("{p}");
    }
    assert_eq!(silent.seen().len(), 1, "the request was sent");
    d.wait_leased("p", 0).await;
    let info = d
        .state
        .manager
        .storage()
        .get_proxy(&"silent".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        info.proxy.status,
        ProxyStatus::Inactive,
        "counted against the upstream"
    );
    d.stop().await;
}

/// Item 4: a request that can be sent again (bodiless, idempotent) fails over from a silent
/// upstream to a live one. Fails on the bug: it waited on the silent one for ever.
#[tokio::test]
async fn a_silent_upstream_is_failed_over_for_a_resendable_request() {
    let silent = Upstream::start(Behaviour::Stall, up_auth());
    let live = Upstream::start(Behaviour::Ok, up_auth());
    let d = TestDaemon::start(&config(
        &[("silent", &silent), ("live", &live)],
        "failover_attempts = 1",
        "[limits]\nconnect_timeout_ms = 500\nresponse_timeout_ms = 500\nidle_timeout_secs = 1",
    ))
    .await;
    let got = exchange(
        d.addr,
        get_close("/again").as_bytes(),
        false,
        Duration::from_secs(60),
    )
    .await;
    let (resp, _) = responses(&got.bytes);
    let first = resp.first().unwrap_or_else(|| panic!("no answer: {got:?}"));
    assert_eq!(first.status, 200, "{}", first.head);
    assert_eq!(first.header("x-pharox-proxy-id"), Some("live"));
    assert_eq!(silent.seen().len(), 1, "tried the silent one first");
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// Item 4: a response body that stalls midway is cut by the idle timeout and frees the
/// lease, though the client keeps waiting. Fails on the bug: client and lease were held.
#[tokio::test]
async fn a_body_that_stalls_midway_is_cut_by_the_idle_timeout() {
    let stalls = Upstream::start(Behaviour::StallMidBody, up_auth());
    let d = TestDaemon::start(&config(
        &[("stalls", &stalls)],
        "failover_attempts = 0",
        "[limits]\nidle_timeout_secs = 1",
    ))
    .await;
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    c.write_all(get("/stall").as_bytes()).await.unwrap();
    let end = read_all(&mut c, Duration::from_secs(60)).await;
    assert_ne!(
        end.error,
        Some(std::io::ErrorKind::TimedOut),
        "still open with a stalled body ({} bytes)",
        end.bytes.len()
    );
    let text = String::from_utf8_lossy(&end.bytes);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(end.bytes.len() < 100_000, "the body was not complete");
    d.wait_leased("p", 0).await;
    drop(c);
    d.stop().await;
}

/// Item 8: a username longer than the limit is refused as such (not parsed segment by
/// segment, nor taken for a consumer name). Fails on the bug: there was no limit; a 16 KiB
/// name was parsed in full and answered 407 auth_failed.
#[tokio::test]
async fn an_overlong_username_is_a_bad_username() {
    let up = Upstream::start(Behaviour::Ok, up_auth());
    let d = TestDaemon::start(&config(&[("up", &up)], "", "")).await;
    let long = vec!["a"; 8 * 1024].join("-");
    let mut wrong = Vec::new();
    for user in [long.clone(), format!("w-pool-{long}")] {
        let creds = basic(&user, "x");
        let (_, head) = connect(d.addr, "example.test:443", Some(&creds), "").await;
        if status(&head) != 400 || header(&head, "x-pharox-error") != Some("bad_username") {
            wrong.push(format!(
                "CONNECT: {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        let req = format!(
            "GET http://example.test/u HTTP/1.1\r\nHost: example.test\r\nProxy-Authorization: {creds}\r\n\r\n"
        );
        let got = exchange(d.addr, req.as_bytes(), false, CLOSE_BOUND).await;
        if let Some(p) = judge(&got, 1, 400, "bad_username") {
            wrong.push(format!("plain: {p}"));
        }
    }
    if !up.seen().is_empty() {
        wrong.push("forwarded".into());
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    d.stop().await;
}

/// Spec §4 ("an upstream never carries more connections than its max_concurrency"), found
/// by the chaos test: clients queue for an exclusive upstream and take turns. A plain-HTTP
/// connection must close its upstream connection before its lease goes to the next client.
/// Fails on the bug: the lease was released first and the upstream connection closed
/// afterwards (in a task of its own), so the next client's connection overlapped it. The
/// CONNECT half is the control: tunnels close first, and the same count holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclusive_upstream_never_carries_two_connections() {
    for tunnel in [true, false] {
        let up = Upstream::start(Behaviour::Ok, None);
        let cfg = format!(
            "[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\n[pools.retry]\nmax_attempts = 1000\nbackoff_ms = 5\nmax_backoff_ms = 5\n[[pools.proxies]]\nurl = \"http://{}\"\nmax_concurrency = 1\n",
            up.addr
        );
        let d = TestDaemon::start(&cfg).await;
        let mut clients = JoinSet::new();
        for c in 0..4 {
            let addr = d.addr;
            clients.spawn(async move {
                for i in 0..50 {
                    if tunnel {
                        let (mut s, head) = connect(addr, "x.test:443", Some(&auth()), "").await;
                        assert_eq!(status(&head), 200, "{head}");
                        s.write_all(b"ping").await.unwrap();
                        let mut echo = [0u8; 4];
                        tokio::io::AsyncReadExt::read_exact(&mut s, &mut echo)
                            .await
                            .unwrap();
                    } else {
                        let mut s = TcpStream::connect(addr).await.unwrap();
                        let (head, _) =
                            get_keep_alive(&mut s, "x.test", &format!("/{c}/{i}"), &auth()).await;
                        assert_eq!(status(&head), 200, "{head}");
                    }
                }
            });
        }
        clients.join_all().await;
        d.wait_leased("p", 0).await;
        d.stop().await;
        let what = if tunnel { "CONNECT" } else { "plain HTTP" };
        assert_eq!(up.accepted(), 200, "{what}");
        assert_eq!(
            up.max_open(),
            1,
            "{what}: connections at once on an exclusive upstream"
        );
    }
}
