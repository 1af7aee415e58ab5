//! SOCKS5 on the proxy port: a table of handshakes against the real listener, the reply code
//! of each refusal, and curl through it to a local origin.

mod common;

use common::daemon::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

const CONFIG: &str = r#"
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "pw"
pools = ["p"]
default_pool = "p"
[[pools]]
name = "p"
[pools.retry]
max_attempts = 1
[[pools.proxies]]
url = "direct"
max_concurrency = 1
[[pools]]
name = "q"
[[pools.proxies]]
url = "direct"
"#;

fn userpass(user: &str, pass: &str) -> Vec<u8> {
    let mut v = vec![1, user.len() as u8];
    v.extend_from_slice(user.as_bytes());
    v.push(pass.len() as u8);
    v.extend_from_slice(pass.as_bytes());
    v
}

fn request(cmd: u8, atyp: u8, addr: &[u8], port: u16) -> Vec<u8> {
    let mut v = vec![5, cmd, 0, atyp];
    v.extend_from_slice(addr);
    v.extend_from_slice(&port.to_be_bytes());
    v
}

fn domain(name: &str) -> Vec<u8> {
    let mut v = vec![name.len() as u8];
    v.extend_from_slice(name.as_bytes());
    v
}

/// Greets with `methods`, authenticates if the server picks 2, sends `req`; returns the
/// method chosen, the auth status (if any) and the reply code (if any), plus the stream.
async fn socks(
    addr: std::net::SocketAddr,
    methods: &[u8],
    user: (&str, &str),
    req: &[u8],
) -> (u8, Option<u8>, Option<u8>, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut greet = vec![5, methods.len() as u8];
    greet.extend_from_slice(methods);
    s.write_all(&greet).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    if m[1] == 0xff {
        return (m[1], None, None, s);
    }
    let mut auth = None;
    if m[1] == 2 {
        s.write_all(&userpass(user.0, user.1)).await.unwrap();
        let mut a = [0u8; 2];
        s.read_exact(&mut a).await.unwrap();
        auth = Some(a[1]);
        if a[1] != 0 {
            return (m[1], auth, None, s);
        }
    }
    s.write_all(req).await.unwrap();
    let mut r = [0u8; 10];
    let code = match s.read_exact(&mut r).await {
        Ok(_) => Some(r[1]),
        Err(_) => None,
    };
    (m[1], auth, code, s)
}

#[tokio::test]
async fn socks5_handshake_table() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(CONFIG).await;
    let port = origin.addr.port();
    let v4 = request(1, 1, &[127, 0, 0, 1], port);

    // No-auth offered only, auth required: method refused.
    let (m, ..) = socks(d.addr, &[0], ("w", "pw"), &v4).await;
    assert_eq!(m, 0xff);
    // Wrong password, unknown consumer, bad username: RFC 1929 failure.
    for user in [("w", "nope"), ("x", "pw"), ("w-colour-red", "pw")] {
        let (m, auth, ..) = socks(d.addr, &[0, 2], user, &v4).await;
        assert_eq!((m, auth), (2, Some(1)), "{user:?}");
    }
    // IPv4, domain and IPv6 targets.
    let (_, auth, code, mut s) = socks(d.addr, &[2], ("w", "pw"), &v4).await;
    assert_eq!((auth, code), (Some(0), Some(0)));
    assert!(get_over(&mut s, "o", "/v4").await.ends_with("origin:/v4"));
    drop(s);
    d.wait_leased("p", 0).await;
    let (_, _, code, mut s) = socks(
        d.addr,
        &[2],
        ("w", "pw"),
        &request(1, 3, &domain("localhost"), port),
    )
    .await;
    assert_eq!(code, Some(0));
    assert!(
        get_over(&mut s, "o", "/name")
            .await
            .ends_with("origin:/name")
    );
    drop(s);
    d.wait_leased("p", 0).await;
    let v6_origin = tokio::net::TcpListener::bind("[::1]:0").await;
    if let Ok(l) = v6_origin {
        let v6port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            c.write_all(b"v6-ok").await.unwrap();
        });
        let (_, _, code, mut s) = socks(
            d.addr,
            &[2],
            ("w", "pw"),
            &request(1, 4, &std::net::Ipv6Addr::LOCALHOST.octets(), v6port),
        )
        .await;
        assert_eq!(code, Some(0));
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"v6-ok");
        drop(s);
        d.wait_leased("p", 0).await;
    }
    // BIND and UDP ASSOCIATE: command not supported.
    for cmd in [2, 3] {
        let (_, _, code, _) = socks(
            d.addr,
            &[2],
            ("w", "pw"),
            &request(cmd, 1, &[127, 0, 0, 1], port),
        )
        .await;
        assert_eq!(code, Some(7), "cmd {cmd}");
    }
    // Unknown address type.
    let (_, _, code, _) = socks(
        d.addr,
        &[2],
        ("w", "pw"),
        &request(1, 9, &[1, 2, 3, 4], port),
    )
    .await;
    assert_eq!(code, Some(8));
    // A forbidden pool and an exhausted one: not allowed by ruleset.
    let (_, _, code, _) = socks(d.addr, &[2], ("w-pool-q", "pw"), &v4).await;
    assert_eq!(code, Some(2));
    let (_, _, code, held) = socks(d.addr, &[2], ("w", "pw"), &v4).await;
    assert_eq!(code, Some(0));
    let (_, _, code, _) = socks(d.addr, &[2], ("w", "pw"), &v4).await;
    assert_eq!(code, Some(2), "exhausted");
    drop(held);
    d.wait_leased("p", 0).await;
    // The daemon's own port is denied.
    let own = request(1, 1, &[127, 0, 0, 1], d.addr.port());
    let (_, _, code, _) = socks(d.addr, &[2], ("w", "pw"), &own).await;
    assert_eq!(code, Some(2));
    d.stop().await;
}

#[tokio::test]
async fn socks5_upstream_failures_map_to_reply_codes() {
    let refuse = FakeProxy::start(Mode::Refuse).await;
    let stall = FakeProxy::start(Mode::Stall).await;
    for (url, want) in [
        (format!("http://{}", refuse.addr), 5u8),
        (format!("http://{}", stall.addr), 6),
    ] {
        let cfg = format!(
            "[limits]\nconnect_timeout_ms = 300\n[[consumers]]\nname = \"w\"\npassword = \"pw\"\n[[pools]]\nname = \"p\"\nfailover_attempts = 0\n[[pools.proxies]]\nurl = \"{url}\"\n"
        );
        let d = TestDaemon::start(&cfg).await;
        let (_, _, code, _) = socks(
            d.addr,
            &[2],
            ("w", "pw"),
            &request(1, 3, &domain("example.test"), 443),
        )
        .await;
        assert_eq!(code, Some(want), "{url}");
        assert_eq!(d.leased("p").await, 0);
        d.stop().await;
    }
}

#[tokio::test]
async fn curl_through_socks5() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(CONFIG).await;
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            &format!("w:pw@{}", d.addr),
        ])
        .arg(format!("http://localhost:{}/via-socks", origin.addr.port()))
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "origin:/via-socks");
    d.wait_leased("p", 0).await;
    let metrics = common::admin::admin(d.admin, "GET", "/metrics", None, "")
        .await
        .1;
    assert!(
        metrics.contains("pharox_connections_total{kind=\"socks5\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
    d.stop().await;
}

/// A client that sends greeting, credentials, request and its first payload bytes in one
/// write (without waiting for any answer) gets every answer, and the payload reaches the
/// target, in order.
#[tokio::test]
async fn socks5_pipelined_handshake_and_early_data() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(CONFIG).await;
    let mut all = vec![5, 1, 2];
    all.extend_from_slice(&userpass("w", "pw"));
    all.extend_from_slice(&request(1, 1, &[127, 0, 0, 1], origin.addr.port()));
    // A request head far longer than the handshake's read buffer.
    let padding = "p".repeat(6000);
    all.extend_from_slice(
        format!(
            "GET /early HTTP/1.1\r\nHost: o\r\nX-Padding: {padding}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    let mut s = TcpStream::connect(d.addr).await.unwrap();
    s.write_all(&all).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    // Method choice, auth status, success reply, then the origin's answer.
    assert_eq!(&out[..4], &[5, 2, 1, 0]);
    assert_eq!(&out[4..6], &[5, 0]);
    let body = String::from_utf8_lossy(&out[14..]);
    assert!(body.ends_with("origin:/early"), "{body}");
    d.wait_leased("p", 0).await;
    d.stop().await;
}
