//! Issue 10, item 5: running out of file descriptors is a local shortage, answered 503
//! `resource_exhausted` (SOCKS5: general failure), and never counted against the upstream.
//! (Its own test binary: it lowers the process's open-file limit.)
#![cfg(target_os = "linux")]

mod common;

use common::daemon::*;
use common::hostile::*;
use pharox::ProxyStatus;
use pharox::storage::Storage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn open_fds() -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Fills every free descriptor below the highest open one and caps the limit there, so that
/// no descriptor can be created. Returns the fillers (drop them after restoring the limit).
fn exhaust_descriptors() -> Vec<std::fs::File> {
    let highest = open_fds().into_iter().max().unwrap();
    let mut fillers = Vec::new();
    loop {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        fillers.push(f);
        if fd >= highest {
            break;
        }
    }
    let top = std::os::fd::AsRawFd::as_raw_fd(fillers.last().unwrap()) as u64;
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, top + 1, hard).unwrap();
    assert!(
        std::os::unix::net::UnixDatagram::pair().is_err(),
        "limit not in force"
    );
    fillers
}

fn restore_descriptors(fillers: Vec<std::fs::File>) {
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).unwrap();
    drop(fillers);
}

/// Fails on the bug: EMFILE on the dial was counted as the upstream's failure (answered
/// 502 and, with `max_failures = 1`, the upstream rested: the next request got 503
/// `pool_exhausted` for the whole cooldown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_answers_resource_exhausted_and_rests_no_upstream() {
    let up = Upstream::start(Behaviour::Ok, None);
    let cfg = format!(
        r#"
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
failover_attempts = 0
[pools.retry]
max_attempts = 1
[pools.health]
max_failures = 1
cooldown_seconds = 3600
[[pools.proxies]]
url = "http://{}"
id = "up"
"#,
        up.addr
    );
    let d = TestDaemon::start(&cfg).await;
    let auth = basic("w", "x");
    let (s, head) = connect(d.addr, "example.test:443", Some(&auth), "").await;
    assert_eq!(status(&head), 200, "{head}");
    drop(s);
    d.wait_leased("p", 0).await;
    assert!(eventually(|| up.open() == 0).await);

    // Two clients connected (and accepted) while descriptors are still available: an HTTP
    // one that has sent half its head, and a SOCKS5 one that has authenticated.
    let mut http = TcpStream::connect(d.addr).await.unwrap();
    http.write_all(b"CONNECT example.test:443 HTTP/1.1\r\n")
        .await
        .unwrap();
    let mut socks = TcpStream::connect(d.addr).await.unwrap();
    socks
        .write_all(&[5, 1, 2, 1, 1, b'w', 1, b'x'])
        .await
        .unwrap();
    let mut answers = [0u8; 4];
    socks.read_exact(&mut answers).await.unwrap();
    assert_eq!(answers, [5, 2, 1, 0]);

    let fillers = exhaust_descriptors();
    let rest = format!("Proxy-Authorization: {auth}\r\n\r\n");
    let sent = http.write_all(rest.as_bytes()).await;
    let http_head = read_head(&mut http).await;
    // The daemon closes that connection, which frees one descriptor: take it back before
    // the SOCKS5 request, or its dial would get it.
    let _ = read_all(&mut http, std::time::Duration::from_secs(10)).await;
    let mut fillers = fillers;
    for _ in 0..400 {
        if let Ok(f) = std::fs::File::open("/dev/null") {
            fillers.push(f);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let sent_socks = socks
        .write_all(&socks_request(3, &socks_domain(b"example.test"), 443))
        .await;
    let mut reply = [0u8; 10];
    let socks_reply = socks.read_exact(&mut reply).await.map(|_| reply[1]);
    restore_descriptors(fillers);

    sent.unwrap();
    sent_socks.unwrap();
    assert_eq!(status(&http_head), 503, "{http_head}");
    assert_eq!(
        header(&http_head, "x-pharox-error"),
        Some("resource_exhausted")
    );
    assert!(header(&http_head, "retry-after").is_some(), "{http_head}");
    assert_eq!(socks_reply.unwrap(), 0x01, "SOCKS5: general failure");
    assert_eq!(d.leased("p").await, 0);

    // Descriptors are back: the very next request goes through the same upstream.
    let info = d
        .state
        .manager
        .storage()
        .get_proxy(&"up".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        info.proxy.status,
        ProxyStatus::Active,
        "the upstream was rested"
    );
    assert!(
        d.state.failures.get(&pharox::ProxyId::from("up")).is_none(),
        "a failure was counted"
    );
    let (s, head) = connect(d.addr, "example.test:443", Some(&auth), "").await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(header(&head, "x-pharox-proxy-id"), Some("up"));
    drop(s);
    d.wait_leased("p", 0).await;
    d.stop().await;
}
