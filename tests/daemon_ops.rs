//! Operations: metrics values after known traffic, every admin endpoint (token, 404s, a
//! banned proxy getting no lease, closing a lease's connection), and reloads applied and
//! rejected with a tunnel open across them.

mod common;

use common::admin::{admin, metric};
use common::daemon::*;
use serde_json::Value;

const TOKEN: &str = "admin-token-123";

fn config(pool: &str, password: &str, proxies: &str) -> String {
    format!(
        r#"
[admin]
token = "{TOKEN}"
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "{password}"
[[pools]]
name = "{pool}"
{proxies}
"#
    )
}

const DIRECT: &str = "[[pools.proxies]]\nurl = \"direct\"\nid = \"d1\"\nmax_concurrency = 5";

#[tokio::test]
async fn metrics_count_known_traffic() {
    let origin = Origin::start().await;
    let d = TestDaemon::start(&config("mpool", "x", DIRECT)).await;
    let (mut tx, mut rx) = (0usize, 0usize);
    for i in 0..3 {
        let (mut s, head) =
            connect(d.addr, &origin.addr.to_string(), Some(&basic("w", "x")), "").await;
        assert_eq!(status(&head), 200);
        let path = format!("/n{i}");
        tx += format!("GET {path} HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n").len();
        rx += get_over(&mut s, "o", &path).await.len();
    }
    d.wait_leased("mpool", 0).await;
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "bad")),
        "",
    )
    .await;
    assert_eq!(status(&head), 407);
    // Connection ends are recorded after the lease is released: wait for the third.
    let mut text = String::new();
    for _ in 0..200 {
        text = admin(d.admin, "GET", "/metrics", None, "").await.1;
        if metric(
            &text,
            "pharox_connections_total",
            &[("kind", "connect"), ("outcome", "ok")],
        ) == Some(3.0)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let hit = [
        ("pool", "mpool"),
        ("consumer", "w"),
        ("selector", "first_available"),
        ("status", "hit"),
    ];
    assert_eq!(
        metric(&text, "pharox_acquire_total", &hit),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "pharox_release_total", &[("pool", "mpool")]),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "pharox_pool_leased_proxies", &[("pool", "mpool")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&text, "pharox_pool_available_proxies", &[("pool", "mpool")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "pharox_connections_active", &[("pool", "mpool")]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "pharox_connections_total",
            &[("kind", "connect"), ("outcome", "ok")]
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            "pharox_connections_total",
            &[("kind", "connect"), ("outcome", "auth_failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "pharox_bytes_total",
            &[("pool", "mpool"), ("direction", "tx")]
        ),
        Some(tx as f64)
    );
    assert_eq!(
        metric(
            &text,
            "pharox_bytes_total",
            &[("pool", "mpool"), ("direction", "rx")]
        ),
        Some(rx as f64)
    );
    assert_eq!(
        metric(
            &text,
            "pharox_acquire_duration_seconds_count",
            &[("pool", "mpool"), ("status", "hit")]
        ),
        Some(3.0)
    );
    assert!(
        text.contains("pharox_acquire_duration_seconds_bucket{"),
        "explicit buckets, not a summary"
    );
    assert!(text.contains("# HELP pharox_acquire_total"), "{text}");
    d.stop().await;
}

#[tokio::test]
async fn upstream_failures_are_counted_by_reason() {
    let dead = FakeProxy::start(Mode::Refuse).await;
    let cfg = config(
        "fpool",
        "x",
        &format!(
            "failover_attempts = 0\n[[pools.proxies]]\nurl = \"http://{}\"",
            dead.addr
        ),
    );
    let d = TestDaemon::start(&cfg).await;
    let (_, head) = connect(d.addr, "example.test:443", Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 502);
    let text = admin(d.admin, "GET", "/metrics", None, "").await.1;
    let failures: f64 = ["io", "refused"]
        .iter()
        .filter_map(|r| {
            metric(
                &text,
                "pharox_upstream_failures_total",
                &[("pool", "fpool"), ("reason", r)],
            )
        })
        .sum();
    assert_eq!(failures, 1.0, "{text}");
    d.stop().await;
}

#[tokio::test]
async fn admin_api_endpoints() {
    let origin = Origin::start().await;
    let up = FakeProxy::start(Mode::Ok).await;
    let proxies = format!(
        "{DIRECT}\n[[pools.proxies]]\nurl = \"http://vendor:vendor-pass@{}\"\nid = \"v1\"",
        up.addr
    );
    let d = TestDaemon::start(&config("apool", "x", &proxies)).await;
    let a = d.admin;

    // The token guards /api/v1, not probes or metrics.
    assert_eq!(admin(a, "GET", "/api/v1/pools", None, "").await.0, 401);
    assert_eq!(
        admin(a, "GET", "/api/v1/pools", Some("wrong"), "").await.0,
        401
    );
    assert_eq!(admin(a, "GET", "/metrics", None, "").await.0, 200);
    assert_eq!(admin(a, "GET", "/healthz", None, "").await.0, 200);

    let (code, body) = admin(a, "GET", "/api/v1/pools", Some(TOKEN), "").await;
    assert_eq!(code, 200, "{body}");
    let pools: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pools["pools"][0]["name"], "apool");
    assert_eq!(pools["pools"][0]["stats"]["total"], 2);

    let (code, body) = admin(a, "GET", "/api/v1/pools/apool", Some(TOKEN), "").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.contains("vendor-pass"),
        "credentials are masked: {body}"
    );
    let pool: Value = serde_json::from_str(&body).unwrap();
    let v1 = pool["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "v1")
        .unwrap();
    assert_eq!(v1["url"], format!("http://vendor:***@{}", up.addr));
    assert_eq!(v1["status"], "active");
    assert_eq!(
        admin(a, "GET", "/api/v1/pools/nope", Some(TOKEN), "")
            .await
            .0,
        404
    );
    assert_eq!(
        admin(a, "GET", "/api/v1/nothing", Some(TOKEN), "").await.0,
        404
    );

    // A live lease is listed, and deleting it closes its connection.
    let (mut s, head) = connect(d.addr, &origin.addr.to_string(), Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 200);
    let lease_id = header(&head, "x-pharox-lease-id").unwrap().to_owned();
    let (_, body) = admin(a, "GET", "/api/v1/leases", Some(TOKEN), "").await;
    let leases: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(leases["leases"][0]["id"], lease_id.as_str());
    assert_eq!(leases["leases"][0]["consumer"], "w");
    let (code, _) = admin(
        a,
        "DELETE",
        &format!("/api/v1/leases/{lease_id}"),
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(code, 200);
    let mut buf = [0u8; 1];
    assert_eq!(
        tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap_or(0),
        0,
        "connection closed"
    );
    assert_eq!(d.leased("apool").await, 0);
    assert_eq!(
        admin(
            a,
            "DELETE",
            &format!("/api/v1/leases/{lease_id}"),
            Some(TOKEN),
            ""
        )
        .await
        .0,
        404
    );
    assert_eq!(
        admin(a, "DELETE", "/api/v1/leases/zz", Some(TOKEN), "")
            .await
            .0,
        400
    );

    // Banning both proxies leaves nothing to lease.
    for id in ["d1", "v1"] {
        let (code, body) = admin(
            a,
            "PUT",
            &format!("/api/v1/proxies/{id}/status"),
            Some(TOKEN),
            r#"{"status":"banned"}"#,
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains(r#""previous":"active""#), "{body}");
    }
    let (_, head) = connect(d.addr, &origin.addr.to_string(), Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 503, "{head}");
    let (code, _) = admin(
        a,
        "PUT",
        "/api/v1/proxies/v1/status",
        Some(TOKEN),
        r#"{"status":"active"}"#,
    )
    .await;
    assert_eq!(code, 200);
    let (_, head) = connect(d.addr, &origin.addr.to_string(), Some(&basic("w", "x")), "").await;
    assert_eq!(header(&head, "x-pharox-proxy-id"), Some("v1"), "{head}");
    assert_eq!(
        admin(
            a,
            "PUT",
            "/api/v1/proxies/zz/status",
            Some(TOKEN),
            r#"{"status":"banned"}"#
        )
        .await
        .0,
        404
    );
    assert_eq!(
        admin(
            a,
            "PUT",
            "/api/v1/proxies/v1/status",
            Some(TOKEN),
            r#"{"status":"gone"}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(
        admin(
            a,
            "PUT",
            "/api/v1/proxies/v1/status",
            Some(TOKEN),
            "nonsense"
        )
        .await
        .0,
        400
    );
    assert_eq!(
        admin(a, "POST", "/api/v1/reload", Some(TOKEN), "").await.0,
        409,
        "no config file to re-read"
    );
    d.stop().await;
}

#[tokio::test]
async fn reload_applies_a_valid_config_and_rejects_an_invalid_one() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pharox.toml");
    std::fs::write(&path, config("rpool", "old-pass", DIRECT)).unwrap();
    let d = TestDaemon::start_file(&path).await;
    let (mut tunnel, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "old-pass")),
        "",
    )
    .await;
    assert_eq!(status(&head), 200);

    // New password, the direct upstream replaced by another one, a second pool.
    let mut next = config(
        "rpool",
        "new-pass",
        "[[pools.proxies]]\nurl = \"direct\"\nid = \"d2\"",
    );
    next.push_str(
        "[[pools]]\nname = \"extra\"\n[[pools.proxies]]\nurl = \"direct\"\nid = \"e1\"\n",
    );
    std::fs::write(&path, next).unwrap();
    let (code, body) = admin(d.admin, "POST", "/api/v1/reload", Some(TOKEN), "").await;
    assert_eq!(code, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["report"]["pools_added"][0], "extra");
    assert_eq!(report["report"]["proxies_removed"], 1);

    // The tunnel opened before the reload still works; its old upstream drains.
    let (_, body) = admin(d.admin, "GET", "/api/v1/pools/rpool", Some(TOKEN), "").await;
    let pool: Value = serde_json::from_str(&body).unwrap();
    let d1 = pool["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "d1")
        .unwrap()
        .clone();
    assert_eq!(d1["draining"], true);
    assert!(
        get_over(&mut tunnel, "o", "/after-reload")
            .await
            .ends_with("origin:/after-reload")
    );
    drop(tunnel);
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "old-pass")),
        "",
    )
    .await;
    assert_eq!(status(&head), 407, "old password gone");
    // Two pools and no default now: the username names the pool.
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "new-pass")),
        "",
    )
    .await;
    assert_eq!(
        header(&head, "x-pharox-error"),
        Some("bad_request"),
        "{head}"
    );
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w-pool-rpool", "new-pass")),
        "",
    )
    .await;
    assert_eq!(header(&head, "x-pharox-proxy-id"), Some("d2"), "{head}");

    // An invalid file is rejected with its reason; the running config stays.
    std::fs::write(&path, "[[pools]]\nname = \"broken\"\n").unwrap();
    let (code, body) = admin(d.admin, "POST", "/api/v1/reload", Some(TOKEN), "").await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body.contains("pools[0].proxies: the pool has no upstream"),
        "{body}"
    );
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w-pool-extra", "new-pass")),
        "",
    )
    .await;
    assert_eq!(
        status(&head),
        200,
        "still serving the last good config: {head}"
    );
    let text = admin(d.admin, "GET", "/metrics", None, "").await.1;
    assert_eq!(
        metric(&text, "pharox_config_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "pharox_config_reloads_total",
            &[("result", "invalid")]
        ),
        Some(1.0)
    );
    d.stop().await;
}
