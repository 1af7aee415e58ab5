//! The real client: `pharox-sdk` 0.2.0 (remote mode, pharox 0.8 models, httpx) drives the lease
//! API of a running daemon through `tests/sdk/sdk_driver.py` — pools, proxies, acquire with
//! selectors and filters, `with_lease` (released on an exception too), `None` on exhaustion,
//! release, expiry, deletes — and the daemon's own counts must agree with what it saw.
//!
//! The SDK's virtual environment comes from `TEST_PHAROX_SDK_VENV` (`.ci/run` makes it:
//! `pip install pharox-sdk==0.2.0`). Without it the test says so and passes, except under
//! `CI=true`, where it fails.

mod common;

use std::path::PathBuf;

use common::admin::admin;
use common::daemon::*;
use pharox::storage::Storage;

const KEY: &str = "sdk-ci-key-0123456789";

fn sdk_python() -> Option<PathBuf> {
    match std::env::var_os("TEST_PHAROX_SDK_VENV") {
        Some(v) => Some(PathBuf::from(v).join("bin/python")),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("TEST_PHAROX_SDK_VENV is not set: CI must provide the pharox-sdk venv")
        }
        None => {
            eprintln!("skipped: set TEST_PHAROX_SDK_VENV to a venv with pharox-sdk==0.2.0");
            None
        }
    }
}

/// The sum of every series of `name` whose labels include all of `labels`.
fn total(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pharox_sdk_drives_the_lease_api() {
    let Some(python) = sdk_python() else { return };
    let upstreams = [
        FakeProxy::start(Mode::Ok).await,
        FakeProxy::start(Mode::Ok).await,
        FakeProxy::start(Mode::Ok).await,
    ];
    let cfg = format!(
        r#"
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "cfg"
[[pools.proxies]]
url = "direct"
[[api.keys]]
name = "sdk"
key = "{KEY}"
manage = true
reveal_credentials = true
"#
    );
    let d = TestDaemon::start(&cfg).await;
    let pool_name = "sdk-ci-pool";
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sdk/sdk_driver.py"
    ))
    .args(["--base-url", &format!("http://{}", d.admin)])
    .args([
        "--api-key",
        KEY,
        "--pool-name",
        pool_name,
        "--consumer",
        "sdk-ci",
    ])
    .args(["--max-concurrency", "2", "--timeout", "10"]);
    for (i, up) in upstreams.iter().enumerate() {
        let spec = match i {
            1 => format!("socks5://alice:s3cr%40t@{}", up.addr),
            _ => up.addr.to_string(),
        };
        cmd.args(["--proxy", &spec]);
    }
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().await.expect("the SDK driver runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("driver summary ({e}); stderr:\n{stderr}"));
    assert!(
        out.status.success() && summary["ok"] == true,
        "the SDK driver failed: {}\n{stderr}",
        summary["failure"]
    );
    // The daemon's own counts agree with what the client saw.
    let (_, metrics) = admin(d.admin, "GET", "/metrics", None, "").await;
    let hits = summary["acquire_totals"]["hit"].as_f64().unwrap();
    let misses = summary["acquire_totals"]["miss"].as_f64().unwrap();
    let labels = [("pool", pool_name)];
    assert_eq!(
        total(
            &metrics,
            "pharox_acquire_total",
            &[labels[0], ("status", "hit")]
        ),
        hits,
        "{summary}"
    );
    assert_eq!(
        total(
            &metrics,
            "pharox_acquire_total",
            &[labels[0], ("status", "miss")]
        ),
        misses
    );
    assert_eq!(summary["leases_total"].as_f64(), Some(hits));
    let released = total(&metrics, "pharox_release_total", &labels);
    let effective = summary["releases"]["effective"].as_f64().unwrap();
    let expired = summary["releases"]["expired"].as_f64().unwrap();
    assert_eq!(
        released,
        effective + expired,
        "every lease released once: {summary}"
    );
    assert_eq!(summary["leases_active_at_end"], 0);
    // Nothing of the client's is left in the storage.
    let storage = d.state.manager.storage();
    let left: Vec<_> = storage
        .list_leases(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| &*l.pool_name == pool_name)
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(summary["pool"]["deleted"] == true);
    assert!(storage.pool_stats(pool_name).await.unwrap().is_none());
    d.stop().await;
}
