//! Shipped operational files: the systemd unit has the directives operators rely on, and the
//! Grafana dashboard is importable and charts only metrics that exist.

use std::collections::HashMap;
use std::path::Path;

use pharox::metrics::names;

fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn unit() -> HashMap<String, Vec<String>> {
    let text = std::fs::read_to_string(repo("systemd/pharox.service")).unwrap();
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
    {
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        map.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    map
}

#[test]
fn the_systemd_unit_has_what_operators_rely_on() {
    let u = unit();
    let one = |k: &str| {
        u.get(k)
            .and_then(|v| v.first())
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{k} missing"))
    };
    assert_eq!(one("Type"), "notify");
    assert!(one("ExecStartPre").contains(" check --config /etc/pharox/"));
    assert!(one("ExecStart").contains(" serve --config /etc/pharox/"));
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    let stop: u64 = one("TimeoutStopSec").parse().unwrap();
    let drain = pharox::config::LimitsConfig::default().drain_timeout_secs;
    assert!(
        stop > drain,
        "TimeoutStopSec {stop} must exceed the drain deadline {drain}"
    );
    assert!(one("LimitNOFILE").parse::<u64>().unwrap() >= 65536);
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    assert!(one("RestrictAddressFamilies").contains("AF_INET6"));
    if let Ok(out) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        && out.status.success()
    {
        let verify = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(repo("systemd/pharox.service"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&verify.stderr);
        // The binary path does not exist on a build machine; anything else is a real error.
        let real: Vec<&str> = err
            .lines()
            .filter(|l| !l.contains("/usr/local/bin/pharox") && !l.trim().is_empty())
            .collect();
        assert!(real.is_empty(), "systemd-analyze verify: {err}");
    }
}

#[test]
fn the_grafana_dashboard_is_importable_and_uses_real_metrics() {
    let text = std::fs::read_to_string(repo("config/grafana/pharox.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(d["uid"].is_string() && d["title"] == "pharox");
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars.iter().any(|v| v["type"] == "datasource"
        && v["name"] == "datasource"
        && v["query"] == "prometheus"));
    let known = [
        names::ACQUIRE_TOTAL,
        names::ACQUIRE_DURATION,
        names::RELEASE_TOTAL,
        names::LEASE_DURATION,
        names::POOL_AVAILABLE,
        names::POOL_ACTIVE,
        names::POOL_LEASED,
        names::CONNECTIONS_ACTIVE,
        names::CONNECTIONS_TOTAL,
        names::BYTES_TOTAL,
        names::UPSTREAM_FAILURES,
        names::CONFIG_RELOADS,
        names::SESSIONS_ACTIVE,
        names::HEALTH_CHECKS,
        names::PROXY_LATENCY,
        names::STORAGE_UP,
        names::STORAGE_ERRORS,
        names::STORAGE_DURATION,
        names::LEASES_LOST,
        names::API_REQUESTS,
    ];
    let mut used = std::collections::HashSet::new();
    let panels = d["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let metrics: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("pharox_"))
                .collect();
            assert!(!metrics.is_empty(), "{expr}");
            for m in metrics {
                let base = m
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum");
                assert!(known.contains(&base), "unknown metric {m} in {expr}");
                used.insert(base);
            }
        }
    }
    assert_eq!(used.len(), known.len(), "every metric is charted: {used:?}");
}
