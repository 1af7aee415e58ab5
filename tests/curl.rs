//! Real clients: curl through the daemon to a local TLS origin (CONNECT, `-k`) and to a plain
//! HTTP origin. `.ci/run` installs curl; the test fails loudly if it is missing.

mod common;

use common::daemon::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::Command;

/// An HTTPS origin (certificate for `localhost` from a test CA) answering `tls-origin:PATH`.
async fn tls_origin() -> std::net::SocketAddr {
    let (acceptor, _) = test_tls();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let head = read_head(&mut s).await;
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let body = format!("tls-origin:{path}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn curl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--noproxy", ""])
        .args(args)
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CONFIG: &str = r#"
[security]
allow_private_targets = true
[[consumers]]
name = "worker-1"
password = "s3cret"
[[pools]]
name = "local"
[[pools.proxies]]
url = "direct"
"#;

#[tokio::test]
async fn curl_https_through_a_tunnel_and_plain_http() {
    let d = TestDaemon::start(CONFIG).await;
    let proxy = format!("http://worker-1:s3cret@{}", d.addr);
    let tls = tls_origin().await;
    let (ok, out, err) = curl(&[
        "-k",
        "-i",
        "-x",
        &proxy,
        &format!("https://localhost:{}/hello", tls.port()),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("x-pharox-proxy-id: local/direct")
            || out.contains("X-Pharox-Proxy-Id: local/direct"),
        "{out}"
    );
    assert!(out.ends_with("tls-origin:/hello"), "{out}");

    let origin = Origin::start().await;
    let (ok, out, err) = curl(&[
        "-i",
        "-x",
        &proxy,
        &format!("http://{}/plain?q=1", origin.addr),
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.ends_with("origin:/plain?q=1"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("x-pharox-lease-id:"),
        "{out}"
    );
    let seen = origin.requests();
    assert!(
        !seen[0].to_ascii_lowercase().contains("proxy-authorization"),
        "{}",
        seen[0]
    );

    let (ok, _, err) = curl(&[
        "-f",
        "-x",
        &format!("http://worker-1:wrong@{}", d.addr),
        &format!("http://{}/", origin.addr),
    ])
    .await;
    assert!(!ok && err.contains("407"), "{err}");
    d.wait_leased("local", 0).await;
    d.stop().await;
}
