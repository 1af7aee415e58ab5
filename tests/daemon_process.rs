//! The real binary: readiness through `NOTIFY_SOCKET` only once the proxy port accepts, a
//! reload through SIGHUP with a tunnel open across it, and SIGTERM draining to exit code 0.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::Duration;

use common::admin::{admin, metric};
use common::daemon::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn config(password: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[limits]
drain_timeout_secs = 5
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "{password}"
[[pools]]
name = "p"
[[pools.proxies]]
url = "direct"
"#
    )
}

fn kill(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {pid}");
}

#[tokio::test]
async fn notify_sighup_and_sigterm() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pharox.toml");
    std::fs::write(&path, config("first")).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_pharox"))
        .args(["serve", "--log-format", "json", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();

    // READY=1 arrives, and by then the proxy port accepts.
    let ready = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 256];
        let n = notify.recv(&mut buf).unwrap();
        (String::from_utf8_lossy(&buf[..n]).into_owned(), notify)
    });
    let (message, notify) = ready.await.unwrap();
    assert_eq!(message, "READY=1");
    let (mut proxy, mut admin_addr) = (None, None);
    while proxy.is_none() {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the daemon logs its addresses");
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["fields"]["message"] == "listening" {
            proxy = v["fields"]["proxy"]
                .as_str()
                .map(|s| s.parse::<std::net::SocketAddr>().unwrap());
            admin_addr = v["fields"]["admin"]
                .as_str()
                .map(|s| s.parse::<std::net::SocketAddr>().unwrap());
        }
    }
    let (proxy, admin_addr) = (proxy.unwrap(), admin_addr.unwrap());
    let log_task = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(l)) = lines.next_line().await {
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    let (mut tunnel, head) = connect(
        proxy,
        &origin.addr.to_string(),
        Some(&basic("w", "first")),
        "",
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");

    // SIGHUP: the new password applies; the open tunnel keeps working.
    std::fs::write(&path, config("second")).unwrap();
    kill(pid, "-HUP");
    let mut reloaded = false;
    for _ in 0..500 {
        let text = admin(admin_addr, "GET", "/metrics", None, "").await.1;
        if metric(&text, "pharox_config_reloads_total", &[("result", "ok")]) == Some(1.0) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reloaded, "SIGHUP reloaded the config");
    let (_, head) = connect(
        proxy,
        &origin.addr.to_string(),
        Some(&basic("w", "second")),
        "",
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    assert!(
        get_over(&mut tunnel, "o", "/across")
            .await
            .ends_with("origin:/across")
    );
    drop(tunnel);

    // SIGTERM: drain, release, exit 0, and tell systemd.
    kill(pid, "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    let logs = log_task.await.unwrap();
    assert!(logs.contains("\"stopped\""), "{logs}");
    assert!(
        !logs.contains("first") && !logs.contains("second"),
        "no password in the logs: {logs}"
    );
}
