//! Secrets never reach the logs, the admin API or error bodies: a capture of every log line
//! (debug level) while consumers authenticate, fail to, and use upstreams with credentials
//! that fail in several ways.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use common::admin::admin;
use common::daemon::*;

const CONSUMER_SECRET: &str = "hunter2-consumer-secret";
const UPSTREAM_SECRET: &str = "upstream-secret-pw";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn passwords_never_appear() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let origin = Origin::start().await;
    let refusing = FakeProxy::start(Mode::Status(407)).await;
    let good = FakeProxy::start(Mode::Ok).await;
    let cfg = format!(
        r#"
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "{CONSUMER_SECRET}"
[[pools]]
name = "p"
failover_attempts = 1
[[pools.proxies]]
url = "http://vendor:{UPSTREAM_SECRET}@{}"
id = "bad"
[[pools.proxies]]
url = "http://vendor:{UPSTREAM_SECRET}@{}"
id = "good"
"#,
        refusing.addr, good.addr
    );
    let d = TestDaemon::start(&cfg).await;
    let mut bodies = String::new();
    for (user, pass) in [
        ("w", CONSUMER_SECRET),
        ("w", "wrong-guess"),
        ("w-pool-p", CONSUMER_SECRET),
        ("x", CONSUMER_SECRET),
    ] {
        let (mut s, head) = connect(
            d.addr,
            &origin.addr.to_string(),
            Some(&basic(user, pass)),
            "",
        )
        .await;
        bodies.push_str(&head);
        if status(&head) == 200 {
            bodies.push_str(&get_over(&mut s, "o", "/").await);
        }
    }
    let mut c = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let req = format!(
        "GET http://{0}/p HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: {1}\r\nConnection: close\r\n\r\n",
        origin.addr,
        basic("w", CONSUMER_SECRET)
    );
    tokio::io::AsyncWriteExt::write_all(&mut c, req.as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut c, &mut out)
        .await
        .unwrap();
    bodies.push_str(&out);
    bodies.push_str(&admin(d.admin, "GET", "/api/v1/pools/p", None, "").await.1);
    bodies.push_str(&admin(d.admin, "GET", "/api/v1/leases", None, "").await.1);
    d.wait_leased("p", 0).await;
    d.stop().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("connection closed") && logs.contains("upstream failed"),
        "the capture works: {logs}"
    );
    for secret in [CONSUMER_SECRET, UPSTREAM_SECRET] {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("vendor:{secret}"));
        let b64c = base64::engine::general_purpose::STANDARD.encode(format!("w:{secret}"));
        for text in [&logs, &bodies] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
            assert!(
                !text.contains(&b64) && !text.contains(&b64c),
                "encoded credentials leaked: {text}"
            );
        }
    }
    // The upstream did get its own credentials.
    assert!(
        good.requests()
            .iter()
            .any(|r| r.contains(&basic("vendor", UPSTREAM_SECRET)))
    );
}
