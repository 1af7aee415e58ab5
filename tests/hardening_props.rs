//! Issue 10, property tests (fixed seeds): the username grammar (items 1 and 8), destination
//! validation (item 1), and the real listener fed arbitrary SOCKS5 dialogues and HTTP heads:
//! no panic, every answer a documented code or SOCKS5 reply, and nothing reaches the
//! upstream that is not a well-formed request built from validated input.

mod common;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::daemon::*;
use common::hostile::*;
use pharox::identity::{USERNAME_KEYS, parse_username};
use pharox::target::{Host, Target};
use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};

const SEED: u64 = 0x7068_6172_6f78;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(SEED),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    }
}

fn pools(p: &str) -> bool {
    ["latam", "latam-residential", "eu", "a-b-c"].contains(&p)
}

/// Usernames: arbitrary text, and dash-joined mixes of keys, values and empty segments.
fn usernames() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        prop::sample::select(USERNAME_KEYS.to_vec()).prop_map(str::to_owned),
        "[a-zA-Z0-9_.:]{0,6}",
        Just(String::new()),
        Just("latam".to_owned()),
        Just("residential".to_owned()),
        any::<String>(),
    ];
    prop_oneof![
        any::<String>(),
        "[a-z0-9-]{0,60}",
        prop::collection::vec(segment, 0..16).prop_map(|v| v.join("-")),
    ]
}

proptest! {
    #![proptest_config(config(3000))]

    /// Item 8 (and the identity half of item 1): any string, however hostile, parses or is
    /// refused as `bad_username`; the pieces of a parsed one hold together.
    #[test]
    fn usernames_parse_or_are_bad_usernames(user in usernames()) {
        match parse_username(&user, &pools, 2) {
            Err(e) => prop_assert_eq!(e.code(), "bad_username", "{}", e),
            Ok(p) => {
                prop_assert!(!p.consumer.is_empty());
                prop_assert!(p.consumer.split('-').all(|s| !s.is_empty() && !USERNAME_KEYS.contains(&s)));
                prop_assert!(user.starts_with(&p.consumer));
                if let Some(c) = &p.meta.country {
                    prop_assert_eq!(c.clone(), c.to_ascii_uppercase());
                }
                for v in [&p.pool, &p.meta.city, &p.meta.source, &p.meta.isp, &p.session].into_iter().flatten() {
                    prop_assert!(!v.is_empty());
                }
                prop_assert!(p.ttl != Some(0));
            }
        }
    }
}

/// Item 8: a username far over any sane length is refused outright. Fails on the bug: there
/// was no limit; a 64 KiB name without keys parsed as a consumer name.
#[test]
fn a_64_kib_username_is_refused() {
    let long = vec!["a"; 32 * 1024].join("-");
    for user in [
        long.clone(),
        format!("w-pool-{long}"),
        "-".repeat(64 * 1024),
    ] {
        let r = parse_username(&user, &pools, 2);
        assert!(
            r.as_ref().is_err_and(|e| e.code() == "bad_username"),
            "{} bytes: {:?}",
            user.len(),
            r.map(|p| p.consumer.len())
        );
    }
}

/// Item 8: the work of parsing grows linearly with the username: the bytes handed to the
/// pool lookup for a name twice as long are about twice as many. Fails on the bug: the
/// longest-pool search joined every run of segments (quadratic: four times as many).
#[test]
fn username_parsing_work_is_linear() {
    let work = |n: usize| {
        let looked = std::cell::Cell::new(0usize);
        let user = format!("w-pool-{}", vec!["a"; n].join("-"));
        // A pool value spans at most as many segments as the longest configured pool name.
        let _ = parse_username(
            &user,
            &|p| {
                looked.set(looked.get() + p.len());
                pools(p)
            },
            2,
        );
        looked.get()
    };
    let (small, big) = (work(50), work(100));
    assert!(
        big <= 3 * small + 64,
        "50 segments: {small} bytes looked up; 100: {big}"
    );
}

/// Destination text: arbitrary strings, and near-misses of host names, IP literals and
/// authorities with the characters that break heads.
fn hostish() -> impl Strategy<Value = String> {
    let label = prop_oneof![
        "[a-zA-Z0-9-]{0,12}",
        "[0-9]{1,4}",
        Just("xn--bcher-kva".to_owned()),
        "[a-z]{1,3}[\r\n\0 \t_%@/?#]{1,2}[a-z]{0,3}",
        any::<String>().prop_map(|s| s.chars().take(4).collect()),
    ];
    let name = prop::collection::vec(label, 1..6).prop_map(|v| v.join("."));
    let v6 = prop_oneof![
        Just("::1".to_owned()),
        Just("::ffff:127.0.0.1".to_owned()),
        Just("::ffff:7f00:1".to_owned()),
        Just("::".to_owned()),
        "[0-9a-f:]{0,20}",
        "::ffff:[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
    ];
    let host = prop_oneof![
        name,
        v6.clone(),
        v6.prop_map(|v| format!("[{v}]")),
        "[0-9]{1,3}(\\.[0-9]{1,3}){0,4}",
        any::<String>(),
    ];
    let port = prop_oneof![
        "[0-9]{1,5}",
        Just("0".to_owned()),
        Just("65536".to_owned()),
        "[+-]?[0-9]{1,3}",
        "[0-9]{1,3}[\r\n ]",
        Just(String::new()),
    ];
    prop_oneof![
        host.clone(),
        (host, port).prop_map(|(h, p)| format!("{h}:{p}")),
        any::<String>(),
    ]
}

/// Bytes that may appear in an authority written into a head.
fn safe_authority_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.:[]".contains(&b)
}

proptest! {
    #![proptest_config(config(5000))]

    /// Item 1: a destination either fails validation (`bad_request`) or is an IP literal
    /// (canonical) or an LDH name whose authority is safe to write into a head and parses
    /// back to itself.
    #[test]
    fn destinations_are_refused_or_safe_to_write(s in hostish()) {
        match Host::parse(&s) {
            Err(e) => prop_assert_eq!(e.code(), "bad_request"),
            Ok(Host::Ip(ip)) => {
                if let IpAddr::V6(v6) = ip {
                    prop_assert!(v6.to_ipv4_mapped().is_none(), "not canonical: {}", v6);
                }
            }
            Ok(Host::Name(n)) => {
                prop_assert!(!n.is_empty() && n.len() <= 253, "{:?}", n);
                prop_assert!(n.bytes().all(safe_authority_byte) && !n.contains(':'), "{:?}", n);
                prop_assert!(n.split('.').all(|l| (1..=63).contains(&l.len())
                    && !l.starts_with('-') && !l.ends_with('-')), "{:?}", n);
                prop_assert!(n.parse::<IpAddr>().is_err(), "a name that reads as an address: {:?}", n);
                let last = n.rsplit('.').next().unwrap_or_default();
                prop_assert!(last.starts_with(|c: char| c.is_ascii_alphabetic()), "{:?}", n);
            }
        }
        match Target::parse_authority(&s) {
            Err(e) => prop_assert_eq!(e.code(), "bad_request"),
            Ok(t) => {
                let a = t.authority();
                prop_assert!(t.port != 0);
                prop_assert!(a.bytes().all(safe_authority_byte), "unsafe authority {:?} from {:?}", a, s);
                prop_assert_eq!(Target::parse_authority(&a).ok(), Some(t.clone()), "round trip of {:?}", a);
                prop_assert_eq!(Host::parse(&t.host_str()).ok(), Some(t.host.clone()));
            }
        }
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// The authority written digit by digit (every tunnel's CONNECT) is what `fmt` writes.
    #[test]
    fn authorities_are_written_as_fmt_writes_them(
        ip in any::<IpAddr>(),
        port in 1..=u16::MAX,
        name in "[a-z][a-z0-9-]{0,20}[a-z0-9](\\.[a-z]{1,10}){0,3}",
    ) {
        let want = match ip {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => format!("[{v6}]:{port}"),
            IpAddr::V6(v6) => format!("{}:{port}", v6.to_ipv4_mapped().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED)),
            IpAddr::V4(v4) => format!("{v4}:{port}"),
        };
        let host = Host::parse(&ip.to_string()).unwrap();
        prop_assert_eq!(Target::new(host, port).unwrap().authority(), want);
        let mut out = String::from("x");
        Target::new(Host::parse(&name).unwrap(), port).unwrap().push_authority(&mut out);
        prop_assert_eq!(out, format!("x{name}:{port}"));
    }
}

/// A daemon with one strict recording HTTP upstream (with credentials), on a runtime of its
/// own so that proptest's synchronous runner can drive it.
struct Listener {
    rt: tokio::runtime::Runtime,
    d: Option<TestDaemon>,
    up: Upstream,
}

impl Listener {
    fn start() -> Listener {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let up = Upstream::start(Behaviour::Ok, Some(basic("up", "secret")));
        let cfg = format!(
            "[limits]\nhead_timeout_ms = 1000\nconnect_timeout_ms = 2000\n[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\nfailover_attempts = 0\n[pools.health]\nmax_failures = 100000\n[[pools.proxies]]\nurl = \"http://up:secret@{}\"\n",
            up.addr
        );
        let d = rt.block_on(TestDaemon::start(&cfg));
        Listener { rt, d: Some(d), up }
    }

    fn daemon(&self) -> &TestDaemon {
        self.d.as_ref().unwrap()
    }

    /// Runs the property over `cases` inputs from `strategy`, then checks the daemon is
    /// clean: no violation at the upstream, no lease left, no panic, a clean stop.
    fn run<S: Strategy>(
        mut self,
        cases: u32,
        strategy: S,
        check: impl AsyncFn(&TestDaemon, &Upstream, S::Value) -> Result<(), TestCaseError>,
    ) where
        S::Value: Clone,
    {
        let panics = panic_counter();
        let before = panics.load(Ordering::SeqCst);
        let mut runner = TestRunner::new(config(cases));
        let result = runner.run(&strategy, |input| {
            self.rt.block_on(check(self.daemon(), &self.up, input))
        });
        let d = self.d.take().unwrap();
        self.rt.block_on(async {
            d.wait_leased("p", 0).await;
            d.stop().await;
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        assert!(
            self.up.violations().is_empty(),
            "{:#?}",
            self.up.violations()
        );
        assert_eq!(
            panics.load(Ordering::SeqCst),
            before,
            "a panic in the daemon"
        );
    }
}

/// SOCKS5 domains: arbitrary bytes, LDH-ish names, IP literals and injection attempts.
fn socks_domains() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=255),
        hostish().prop_map(|s| s.into_bytes().into_iter().take(255).collect()),
        "[a-zA-Z0-9-]{1,20}(\\.[a-zA-Z0-9-]{1,20}){0,3}".prop_map(String::into_bytes),
        Just(
            b"example.com:80 HTTP/1.1\r\nHost: x\r\n\r\nGET http://evil.test/ HTTP/1.1\r\nX-A: b"
                .to_vec()
        ),
    ]
}

/// Item 1 through the real listener: a SOCKS5 domain that validates reaches the upstream
/// as exactly one canonical CONNECT; one that does not is answered 0x01 and sends nothing.
/// Fails on the bug: any UTF-8 went into the upstream's CONNECT line.
#[test]
fn socks5_domains_reach_the_upstream_only_validated() {
    Listener::start().run(400, socks_domains(), async |d, up, name| {
        let before = up.seen().len();
        let (code, s) = socks_connect(
            d.addr,
            "w",
            "x",
            &socks_request(3, &socks_domain(&name), 443),
        )
        .await;
        drop(s);
        let host = std::str::from_utf8(&name)
            .ok()
            .and_then(|s| Host::parse(s).ok());
        let seen = up.seen()[before..].to_vec();
        match host {
            Some(h) => {
                let a = Target::new(h, 443).unwrap().authority();
                prop_assert_eq!(code, Some(0), "{}", preview(&name));
                prop_assert_eq!(seen.len(), 1);
                prop_assert_eq!(
                    &seen[0].head,
                    &format!(
                        "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nProxy-Authorization: {}\r\n\r\n",
                        basic("up", "secret")
                    )
                );
            }
            None => {
                prop_assert_eq!(code, Some(0x01), "{}", preview(&name));
                prop_assert!(seen.is_empty(), "forwarded {:?}", seen);
            }
        }
        Ok(())
    });
}

fn dialogues() -> impl Strategy<Value = Dialogue> {
    let methods = prop::collection::vec(prop_oneof![Just(2u8), Just(0), any::<u8>()], 0..6);
    let cred = |good: &'static [u8]| {
        prop_oneof![
            3 => Just(good.to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..8),
        ]
    };
    let addr = prop_oneof![
        Just(vec![127, 0, 0, 1]),
        Just(vec![0, 0, 0, 0]),
        prop::collection::vec(any::<u8>(), 4),
        prop::collection::vec(any::<u8>(), 16),
        socks_domains().prop_map(|d| socks_domain(&d)),
        prop::collection::vec(any::<u8>(), 0..40),
    ];
    (
        methods,
        prop_oneof![4 => Just(1u8), 1 => any::<u8>()],
        cred(b"w"),
        cred(b"x"),
        prop_oneof![4 => Just(5u8), 1 => any::<u8>()],
        prop_oneof![3 => Just(1u8), 1 => any::<u8>()],
        any::<u8>(),
        prop_oneof![Just(1u8), Just(3), Just(4), any::<u8>()],
        addr,
        prop_oneof![Just(443u16), Just(0), any::<u16>()],
        prop::collection::vec(any::<u8>(), 0..32),
        0usize..400,
    )
        .prop_map(
            |(
                methods,
                auth_version,
                user,
                pass,
                version,
                command,
                reserved,
                atyp,
                addr,
                port,
                payload,
                cut,
            )| {
                Dialogue {
                    methods,
                    auth_version,
                    user,
                    pass,
                    version,
                    command,
                    reserved,
                    atyp,
                    addr,
                    port,
                    payload,
                    cut,
                }
            },
        )
}

/// Arbitrary SOCKS5 dialogues against the real listener. Fails on the bug forms: a reply
/// outside RFC 1928, a tunnel opened on bad input, a malformed head at the upstream.
#[test]
fn socks5_dialogues_get_only_documented_answers() {
    Listener::start().run(400, dialogues(), async |d, _up, dialogue| {
        let got = exchange(d.addr, &dialogue.bytes(), true, Duration::from_secs(20)).await;
        prop_assert_ne!(got.error, Some(std::io::ErrorKind::TimedOut), "left open");
        if let Err(e) = judge_socks(&dialogue, &got.bytes) {
            return Err(TestCaseError::fail(format!(
                "{e}: answered {}",
                preview(&got.bytes)
            )));
        }
        Ok(())
    });
}

/// Request heads built from pieces that are valid, nearly valid and hostile.
fn heads() -> impl Strategy<Value = Vec<u8>> {
    let auth = basic("w", "x");
    let start = prop_oneof![
        Just("GET http://example.test/p HTTP/1.1".to_owned()),
        Just("POST http://example.test/p HTTP/1.1".to_owned()),
        Just("GET http://example.test/p HTTP/1.0".to_owned()),
        Just("CONNECT example.test:443 HTTP/1.1".to_owned()),
        Just("GET /p HTTP/1.1".to_owned()),
        "[A-Z]{1,8} http://[a-z0-9._-]{0,12}(:[0-9]{0,6})?/[ -~]{0,10} HTTP/1\\.[0-9]",
        "CONNECT [ -~]{0,24} HTTP/1\\.1",
        any::<String>().prop_map(|s| s.replace('\u{5}', "")),
    ];
    let line = prop_oneof![
        3 => Just(format!("Proxy-Authorization: {auth}")),
        1 => Just("Proxy-Authorization: Basic !!".to_owned()),
        2 => Just("Host: example.test".to_owned()),
        1 => Just("Content-Length: 5".to_owned()),
        1 => "Content-Length: [ -~]{0,8}",
        1 => Just("Transfer-Encoding: chunked".to_owned()),
        1 => "Transfer-Encoding:[ -~]{0,12}",
        1 => "X-Pharox-[A-Za-z]{1,8}: [a-z0-9-]{0,8}",
        1 => "[A-Za-z-]{1,10}: [ -~]{0,20}",
        1 => "[ -~\t]{0,30}",
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    let eol = prop_oneof![8 => Just("\r\n"), 1 => Just("\n"), 1 => Just("\r"), 1 => Just("\r\r\n")];
    (
        start,
        prop::collection::vec((line, eol.clone()), 0..8),
        eol,
        prop::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(start, lines, end, body)| {
            let mut b = start.into_bytes();
            b.extend_from_slice(b"\r\n");
            for (l, e) in lines {
                b.extend_from_slice(l.as_bytes());
                b.extend_from_slice(e.as_bytes());
            }
            b.extend_from_slice(end.as_bytes());
            b.extend_from_slice(&body);
            b
        })
}

/// Arbitrary heads against the real listener: every answer is a success or carries a
/// documented code with its status; an unanswered connection is allowed only for a complete
/// head the client half-closed after. Fails on the bug: hyper's bare 400s.
#[test]
fn http_heads_get_documented_answers() {
    Listener::start().run(400, heads(), async |d, _up, input| {
        prop_assume!(input.first() != Some(&5));
        let got = exchange(d.addr, &input, true, Duration::from_secs(20)).await;
        prop_assert_ne!(got.error, Some(std::io::ErrorKind::TimedOut), "left open");
        let (resp, _rest) = responses(&got.bytes);
        if resp.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let complete = matches!(
                httparse::Request::new(&mut headers).parse(&input),
                Ok(httparse::Status::Complete(_))
            );
            prop_assert!(
                complete || input.is_empty(),
                "no answer to {}: {}",
                preview(&input),
                preview(&got.bytes)
            );
        }
        for r in &resp {
            let fine =
                (200..300).contains(&r.status) || r.code().is_some_and(|c| documented(r.status, c));
            prop_assert!(
                fine,
                "{} answered {}",
                preview(&input),
                preview(r.head.as_bytes())
            );
            if r.status == 200 && r.head.contains("Connection established") {
                break; // what follows is the tunnel
            }
        }
        Ok(())
    });
}
