//! Active health checks: upstreams that are up, slow or down get the matching status, a
//! resting upstream recovers when a probe succeeds, `lowest_latency` uses the measured
//! latency, and probes are counted.

mod common;

use std::time::Duration;

use common::admin::{admin, metric};
use common::daemon::*;
use pharox::storage::Storage;
use pharox::{ProxyId, ProxyStatus};

fn config(origin: &Origin, selector: &str, proxies: &[(&str, &FakeProxy)], extra: &str) -> String {
    let mut s = format!(
        r#"
[[consumers]]
name = "w"
password = "pw"
[[pools]]
name = "p"
selector = "{selector}"
failover_attempts = 0
{extra}
[pools.health_check]
target = "{}"
url = "http://{}/health"
interval_secs = 1
timeout_ms = 2000
slow_threshold_ms = 300
"#,
        origin.addr, origin.addr
    );
    for (id, p) in proxies {
        s.push_str(&format!(
            "[[pools.proxies]]\nurl = \"http://{}\"\nid = \"{id}\"\n",
            p.addr
        ));
    }
    s
}

async fn wait_status(d: &TestDaemon, id: &str, want: ProxyStatus) {
    let id = ProxyId::from(id);
    for _ in 0..600 {
        let info = d
            .state
            .manager
            .storage()
            .get_proxy(&id)
            .await
            .unwrap()
            .unwrap();
        if info.proxy.status == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never became {want}");
}

#[tokio::test]
async fn probes_set_active_slow_and_inactive() {
    let origin = Origin::start().await;
    let up = FakeProxy::start(Mode::Ok).await;
    let slow = FakeProxy::start(Mode::Delay(800)).await;
    let down = FakeProxy::start(Mode::Refuse).await;
    let d = TestDaemon::start(&config(
        &origin,
        "first_available",
        &[("up", &up), ("slow", &slow), ("down", &down)],
        "",
    ))
    .await;
    wait_status(&d, "down", ProxyStatus::Inactive).await;
    wait_status(&d, "slow", ProxyStatus::Slow).await;
    wait_status(&d, "up", ProxyStatus::Active).await;
    let info = d
        .state
        .manager
        .storage()
        .get_proxy(&ProxyId::from("slow"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        info.proxy.latency.unwrap() >= Duration::from_millis(400),
        "{:?}",
        info.proxy.latency
    );
    assert!(info.proxy.checked_at > std::time::SystemTime::UNIX_EPOCH);
    assert!(
        origin
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /health ")),
        "the URL was fetched"
    );
    // Slow upstreams stay leasable by default: with "up" banned, "slow" serves.
    d.state
        .manager
        .storage()
        .set_proxy_status(&ProxyId::from("up"), ProxyStatus::Banned)
        .await
        .unwrap();
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "pw")),
        "",
    )
    .await;
    assert_eq!(header(&head, "x-pharox-proxy-id"), Some("slow"), "{head}");
    let text = admin(d.admin, "GET", "/metrics", None, "").await.1;
    for result in ["active", "slow", "inactive"] {
        assert!(
            metric(
                &text,
                "pharox_health_checks_total",
                &[("pool", "p"), ("result", result)]
            )
            .unwrap_or(0.0)
                >= 1.0,
            "{result}: {text}"
        );
    }
    assert!(
        text.contains("pharox_proxy_latency_seconds_bucket{"),
        "{text}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_resting_upstream_recovers_when_a_probe_succeeds() {
    let origin = Origin::start().await;
    let flaky = FakeProxy::start(Mode::Refuse).await;
    let extra = "[pools.health]\nmax_failures = 1\ncooldown_seconds = 3600";
    let d = TestDaemon::start(&config(
        &origin,
        "first_available",
        &[("flaky", &flaky)],
        extra,
    ))
    .await;
    wait_status(&d, "flaky", ProxyStatus::Inactive).await;
    // Passive rest for an hour after a client's failure...
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "pw")),
        "",
    )
    .await;
    assert!(matches!(status(&head), 502 | 503), "{head}");
    // ...but the upstream comes back, and the next probe ends the rest.
    *flaky.mode.lock().unwrap() = Mode::Ok;
    wait_status(&d, "flaky", ProxyStatus::Active).await;
    let (_, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic("w", "pw")),
        "",
    )
    .await;
    assert_eq!(status(&head), 200, "{head}");
    d.stop().await;
}

#[tokio::test]
async fn lowest_latency_picks_the_fastest_measured_upstream() {
    let origin = Origin::start().await;
    let slower = FakeProxy::start(Mode::Delay(120)).await;
    let fast = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&config(
        &origin,
        "lowest_latency",
        &[("slower", &slower), ("fast", &fast)],
        "",
    ))
    .await;
    for id in ["slower", "fast"] {
        let id = ProxyId::from(id);
        for _ in 0..600 {
            if d.state
                .manager
                .storage()
                .get_proxy(&id)
                .await
                .unwrap()
                .unwrap()
                .proxy
                .latency
                .is_some()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for _ in 0..3 {
        let (s, head) = connect(
            d.addr,
            &origin.addr.to_string(),
            Some(&basic("w", "pw")),
            "",
        )
        .await;
        assert_eq!(header(&head, "x-pharox-proxy-id"), Some("fast"), "{head}");
        drop(s);
    }
    d.stop().await;
}
