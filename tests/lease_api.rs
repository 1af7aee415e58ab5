//! The lease API (SPEC §7) against a daemon in this process: every route with its statuses and
//! errors, keys and their permissions, the shapes pharox-sdk parses, and leases shared with the
//! proxy port (one cap for both; `CONSUMER-lease-ID` on CONNECT, plain HTTP and SOCKS5).

mod common;

use std::time::Duration;

use common::admin::{admin, api};
use common::daemon::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "k-0123456789abcdef";
const READONLY: &str = "r-0123456789abcdef";

fn config(extra: &str) -> String {
    format!(
        r#"
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "x"
[[consumers]]
name = "other"
password = "y"
[[pools]]
name = "cfg"
[pools.retry]
max_attempts = 1
[[pools.proxies]]
url = "direct"
id = "cfg-direct"
[[api.keys]]
name = "ci"
key = "{KEY}"
manage = true
reveal_credentials = true
[[api.keys]]
name = "ro"
key = "{READONLY}"
consumers = ["w"]
{extra}
"#
    )
}

async fn call(d: &TestDaemon, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, _, json) = api(d.admin, method, path, Some(KEY), body).await;
    (status, json)
}

/// A pool made through the API, with one upstream (`proxy`) of cap `max`; returns (pool id,
/// proxy id).
async fn pool_with(d: &TestDaemon, name: &str, proxy: &FakeProxy, max: u32) -> (String, String) {
    let (status, pool) = call(
        d,
        "POST",
        "/v1/pools/",
        Some(json!({"name": name, "description": ""})),
    )
    .await;
    assert_eq!(status, 201, "{pool}");
    let pool_id = pool["id"].as_str().unwrap().to_owned();
    let body = json!({
        "host": "127.0.0.1", "port": proxy.addr.port(), "protocol": "http",
        "username": "up", "password": "p@ss", "country": "ar", "max_concurrency": max,
    });
    let (status, p) = call(
        d,
        "POST",
        &format!("/v1/pools/{pool_id}/proxies/"),
        Some(body),
    )
    .await;
    assert_eq!(status, 201, "{p}");
    (pool_id, p["id"].as_str().unwrap().to_owned())
}

async fn acquire(d: &TestDaemon, pool_id: &str, consumer: &str, ttl: u64) -> (u16, Value) {
    let body = json!({"pool_id": pool_id, "consumer_id": consumer, "ttl_seconds": ttl, "strategy": "first_available"});
    call(d, "POST", "/v1/leases/", Some(body)).await
}

fn is_iso(s: &str) -> bool {
    s.len() == 32 && s.ends_with("+00:00") && s.as_bytes()[10] == b'T' && s.as_bytes()[19] == b'.'
}

#[tokio::test]
async fn the_api_is_off_without_keys() {
    let d = TestDaemon::start(DIRECT_POOL).await;
    for path in ["/v1/pools/", "/v1/leases/"] {
        let (status, _, body) = api(d.admin, "GET", path, Some(KEY), None).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    d.stop().await;
}

#[tokio::test]
async fn keys_are_checked_first_and_limit_what_they_may_do() {
    let d = TestDaemon::start(&config("")).await;
    for key in [None, Some(""), Some("wrong-key-0000000000")] {
        for (method, path) in [("GET", "/v1/pools/"), ("POST", "/v1/leases/")] {
            let (status, head, body) = api(d.admin, method, path, key, Some(json!({}))).await;
            assert_eq!(status, 401, "{key:?} {path}: {body}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("www-authenticate: apikey"),
                "{head}"
            );
            assert!(body["detail"].is_string());
        }
    }
    // A key without `manage` leases but does not change the inventory.
    let (status, _, body) = api(
        d.admin,
        "POST",
        "/v1/pools/",
        Some(READONLY),
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (_, _, pools) = api(d.admin, "GET", "/v1/pools/", Some(READONLY), None).await;
    let cfg = pools.as_array().unwrap()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // ... and only as its consumers.
    let body = json!({"pool_id": cfg, "consumer_id": "other", "ttl_seconds": 60});
    let (status, _, body) = api(d.admin, "POST", "/v1/leases/", Some(READONLY), Some(body)).await;
    assert_eq!(status, 403, "{body}");
    let body = json!({"pool_id": cfg, "consumer_id": "w", "ttl_seconds": 60});
    let (status, _, lease) = api(d.admin, "POST", "/v1/leases/", Some(READONLY), Some(body)).await;
    assert_eq!(status, 201, "{lease}");
    // Without reveal_credentials no password is shown (a direct upstream has none anyway).
    assert!(lease["proxy"]["password"].is_null());
    d.stop().await;
}

#[tokio::test]
async fn pools_routes_and_statuses() {
    let d = TestDaemon::start(&config("")).await;
    let (status, pool) = call(
        &d,
        "POST",
        "/v1/pools/",
        Some(json!({"name": "api-pool", "description": "d"})),
    )
    .await;
    assert_eq!(status, 201, "{pool}");
    // Stable id from the name: what the SDK caches stays valid if the pool comes back.
    assert_eq!(
        pool["id"],
        json!(pharox::model::stable_id("pool", "api-pool"))
    );
    assert_eq!(
        (pool["name"].as_str(), pool["description"].as_str()),
        (Some("api-pool"), Some("d"))
    );
    let id = pool["id"].as_str().unwrap().to_owned();
    let (status, _) = call(&d, "POST", "/v1/pools/", Some(json!({"name": "api-pool"}))).await;
    assert_eq!(status, 409);
    for bad in [
        json!({"name": ""}),
        json!({"name": "a b"}),
        json!({"nom": "x"}),
        json!({"name": 5}),
    ] {
        let (status, body) = call(&d, "POST", "/v1/pools/", Some(bad.clone())).await;
        assert_eq!(status, 422, "{bad}: {body}");
    }
    // Both spellings, no redirect; a bare array with the config pool and the new one.
    for path in ["/v1/pools/", "/v1/pools"] {
        let (status, list) = call(&d, "GET", path, None).await;
        assert_eq!(status, 200, "{path}");
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["api-pool", "cfg"]);
    }
    for path in [format!("/v1/pools/{id}"), format!("/v1/pools/{id}/")] {
        let (status, got) = call(&d, "GET", &path, None).await;
        assert_eq!(
            (status, got["id"].as_str()),
            (200, Some(id.as_str())),
            "{path}"
        );
    }
    for path in [
        "/v1/pools/0b9e4c2e-0000-4000-8000-000000000000",
        "/v1/pools/not-a-uuid",
        "/v1/nothing",
    ] {
        let (status, body) = call(&d, "GET", path, None).await;
        assert_eq!(status, 404, "{path}");
        assert!(body["detail"].is_string());
    }
    let (status, _, _) = api(d.admin, "PUT", "/v1/pools/", Some(KEY), None).await;
    assert_eq!(status, 405);
    // The config's pool cannot be deleted here; the API's can, once.
    let cfg = pharox::model::stable_id("pool", "cfg");
    assert_eq!(
        call(&d, "DELETE", &format!("/v1/pools/{cfg}"), None)
            .await
            .0,
        409
    );
    assert_eq!(
        call(&d, "DELETE", &format!("/v1/pools/{id}"), None).await.0,
        204
    );
    assert_eq!(
        call(&d, "DELETE", &format!("/v1/pools/{id}"), None).await.0,
        404
    );
    assert_eq!(
        call(&d, "GET", &format!("/v1/pools/{id}"), None).await.0,
        404
    );
    d.stop().await;
}

#[tokio::test]
async fn proxies_routes_and_statuses() {
    let up = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&config("")).await;
    let (pool_id, proxy_id) = pool_with(&d, "p1", &up, 2).await;
    let (status, list) = call(&d, "GET", &format!("/v1/pools/{pool_id}/proxies"), None).await;
    assert_eq!(status, 200);
    let p = &list.as_array().unwrap()[0];
    assert_eq!(p["id"].as_str(), Some(proxy_id.as_str()));
    assert_eq!(
        (p["country"].as_str(), p["status"].as_str()),
        (Some("AR"), Some("active"))
    );
    assert_eq!(
        (p["max_concurrency"].as_u64(), p["current_leases"].as_u64()),
        (Some(2), Some(0))
    );
    assert_eq!(p["username"].as_str(), Some("up"));
    assert!(
        !list.to_string().contains("p@ss"),
        "no password in proxy listings"
    );
    assert!(is_iso(p["checked_at"].as_str().unwrap()));
    let base = format!("/v1/pools/{pool_id}/proxies");
    for bad in [
        json!({"host": "127.0.0.1", "port": 0}),
        json!({"host": "127.0.0.1", "port": 8080, "protocol": "socks4"}),
        json!({"host": "a b", "port": 8080}),
        json!({"host": "127.0.0.1", "port": 8080, "username": "u"}),
        json!({"host": "127.0.0.1", "port": 8080, "latitude": 1.0}),
        json!({"host": "127.0.0.1", "port": 8080, "colour": "red"}),
        json!({"host": "127.0.0.1", "port": 8080, "max_concurrency": 0}),
    ] {
        let (status, body) = call(&d, "POST", &format!("{base}/"), Some(bad.clone())).await;
        assert_eq!(status, 422, "{bad}: {body}");
    }
    // PATCH: a ban takes the proxy out of rotation, active brings it back.
    let one = format!("{base}/{proxy_id}");
    let (status, p) = call(&d, "PATCH", &one, Some(json!({"status": "banned"}))).await;
    assert_eq!((status, p["status"].as_str()), (200, Some("banned")));
    assert_eq!(acquire(&d, &pool_id, "w", 60).await.0, 409);
    let (status, p) = call(
        &d,
        "PATCH",
        &one,
        Some(json!({"status": "active", "city": "Cordoba", "max_concurrency": 1})),
    )
    .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        (p["city"].as_str(), p["max_concurrency"].as_u64()),
        (Some("Cordoba"), Some(1))
    );
    let (status, lease) = acquire(&d, &pool_id, "w", 60).await;
    assert_eq!(status, 201, "{lease}");
    for (body, want) in [
        (json!({"status": "resting"}), 422),
        (json!({"port": 1}), 422),
    ] {
        assert_eq!(
            call(&d, "PATCH", &one, Some(body.clone())).await.0,
            want,
            "{body}"
        );
    }
    let other = pharox::model::stable_id("pool", "cfg");
    assert_eq!(
        call(
            &d,
            "PATCH",
            &format!("/v1/pools/{other}/proxies/{proxy_id}"),
            Some(json!({"status": "banned"}))
        )
        .await
        .0,
        404
    );
    // A config proxy: its status may change here, nothing else; it is never deleted here.
    let cfg_proxy = pharox::ProxyId::from("cfg-direct").uuid();
    let cfg_one = format!("/v1/pools/{other}/proxies/{cfg_proxy}");
    assert_eq!(
        call(&d, "PATCH", &cfg_one, Some(json!({"status": "slow"})))
            .await
            .0,
        200
    );
    assert_eq!(
        call(&d, "PATCH", &cfg_one, Some(json!({"city": "x"})))
            .await
            .0,
        409
    );
    assert_eq!(call(&d, "DELETE", &cfg_one, None).await.0, 409);
    // DELETE: gone from the listing and from rotation; its live lease drains.
    assert_eq!(call(&d, "DELETE", &one, None).await.0, 204);
    assert_eq!(call(&d, "DELETE", &one, None).await.0, 404);
    let (_, list) = call(&d, "GET", &format!("{base}/"), None).await;
    assert_eq!(list, json!([]));
    let lease_id = lease["id"].as_str().unwrap();
    let (status, released) = call(
        &d,
        "POST",
        &format!("/v1/leases/{lease_id}/release"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (status, released["status"].as_str()),
        (200, Some("released"))
    );
    d.stop().await;
}

#[tokio::test]
async fn leases_routes_statuses_and_shapes() {
    let up = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&config("")).await;
    let (pool_id, proxy_id) = pool_with(&d, "p1", &up, 1).await;
    let (status, lease) = acquire(&d, &pool_id, "w", 120).await;
    assert_eq!(status, 201, "{lease}");
    let id = lease["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 36);
    assert_eq!(lease["proxy_id"].as_str(), Some(proxy_id.as_str()));
    assert_eq!(lease["pool_id"].as_str(), Some(pool_id.as_str()));
    assert_eq!(
        lease["consumer_id"],
        json!(pharox::model::stable_id("consumer", "w"))
    );
    assert_eq!(lease["status"].as_str(), Some("active"));
    let (acquired, expires) = (
        lease["acquired_at"].as_str().unwrap(),
        lease["expires_at"].as_str().unwrap(),
    );
    assert!(is_iso(acquired) && is_iso(expires), "{acquired} {expires}");
    assert_eq!(
        lease["pharox_username"].as_str(),
        Some(format!("w-lease-{id}").as_str())
    );
    // This key may reveal the upstream: the URL carries its credentials, escaped.
    let addr = up.addr;
    assert_eq!(
        lease["proxy"]["url"].as_str(),
        Some(format!("http://up:p%40ss@{addr}").as_str())
    );
    // It is a lease like any other: in the operators' list, and it takes the only slot.
    let (_, listed) = admin(d.admin, "GET", "/api/v1/leases", None, "").await;
    assert!(listed.contains(&id), "{listed}");
    let (status, body) = acquire(&d, &pool_id, "w", 60).await;
    assert_eq!(status, 409, "{body}");
    let (status, got) = call(&d, "GET", &format!("/v1/leases/{id}"), None).await;
    assert_eq!((status, &got["expires_at"]), (200, &lease["expires_at"]));
    // Release: 200 released, again 200 (idempotent), and GET still reads it.
    for _ in 0..2 {
        let (status, r) = call(
            &d,
            "POST",
            &format!("/v1/leases/{id}/release"),
            Some(json!({})),
        )
        .await;
        assert_eq!(
            (status, r["status"].as_str()),
            (200, Some("released")),
            "{r}"
        );
        assert!(r["released_at"].is_string());
    }
    let (status, got) = call(&d, "GET", &format!("/v1/leases/{id}/"), None).await;
    assert_eq!((status, got["status"].as_str()), (200, Some("released")));
    assert_eq!(d.leased("p1").await, 0);
    // Unknown leases, and bodies the API refuses.
    let unknown = "0b9e4c2e-0000-4000-8000-000000000000";
    assert_eq!(
        call(&d, "GET", &format!("/v1/leases/{unknown}"), None)
            .await
            .0,
        404
    );
    assert_eq!(call(&d, "GET", "/v1/leases/nonexistent", None).await.0, 404);
    assert_eq!(
        call(
            &d,
            "POST",
            &format!("/v1/leases/{unknown}/release"),
            Some(json!({}))
        )
        .await
        .0,
        404
    );
    for (body, want) in [
        (json!({"pool_id": pool_id, "ttl_seconds": 0}), 422),
        (json!({"pool_id": pool_id, "ttl_seconds": 9_999_999}), 422),
        (json!({"pool_id": pool_id, "strategy": "fastest"}), 422),
        (
            json!({"pool_id": pool_id, "filters": {"colour": "red"}}),
            422,
        ),
        (
            json!({"pool_id": pool_id, "filters": {"latitude": 1.0}}),
            422,
        ),
        (json!({"pool_id": unknown}), 404),
        (json!({"pool_id": "x"}), 404),
        (
            json!({"pool_id": pool_id, "filters": {"country": "BR"}}),
            409,
        ),
    ] {
        let (status, r) = call(&d, "POST", "/v1/leases/", Some(body.clone())).await;
        assert_eq!(status, want, "{body}: {r}");
    }
    // Filters as the SDK sends them: lower-case country, empty children.
    let body = json!({"pool_id": pool_id, "consumer_id": "default", "ttl_seconds": 30, "strategy": "least_used",
        "filters": {"country": "ar", "any_of": [{}], "all_of": [{"asn": null}]}});
    let (status, l) = call(&d, "POST", "/v1/leases/", Some(body)).await;
    assert_eq!(status, 201, "{l}");
    assert_eq!(
        l["consumer_id"],
        json!(pharox::model::stable_id("consumer", "default"))
    );
    d.stop().await;
}

/// One cap for the API and the proxy port; `-lease-ID` rides exactly that lease.
#[tokio::test]
async fn api_leases_share_caps_and_carry_proxy_port_connections() {
    let origin = Origin::start().await;
    let up = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&config("")).await;
    let (pool_id, _) = pool_with(&d, "shared", &up, 1).await;
    let (status, lease) = acquire(&d, &pool_id, "w", 120).await;
    assert_eq!(status, 201);
    let id = lease["id"].as_str().unwrap().to_owned();
    // The proxy port sees the pool the API made, and its only slot is taken.
    let target = origin.addr.to_string();
    let (_, head) = connect(d.addr, &target, Some(&basic("w-pool-shared", "x")), "").await;
    assert_eq!(
        (status_of(&head), header(&head, "x-pharox-error")),
        (503, Some("pool_exhausted")),
        "{head}"
    );
    // CONNECT on the lease: no new acquire, the lease's own upstream.
    let user = format!("w-lease-{id}");
    let (mut tunnel, head) = connect(d.addr, &target, Some(&basic(&user, "x")), "").await;
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(header(&head, "x-pharox-lease-id"), Some(id.as_str()));
    let reply = get_over(&mut tunnel, &target, "/t").await;
    assert!(reply.ends_with("origin:/t"), "{reply}");
    assert_eq!(d.leased("shared").await, 1);
    // The 32-hex form works too, on plain HTTP; and SOCKS5.
    let simple = id.replace('-', "");
    let mut c = TcpStream::connect(d.addr).await.unwrap();
    let (head, body) = get_keep_alive(
        &mut c,
        &target,
        "/plain",
        &basic(&format!("w-lease-{simple}"), "x"),
    )
    .await;
    // The fake upstream answers plain requests itself, naming what it was asked for.
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(body, format!("proxied:http://{target}/plain"));
    assert_eq!(header(&head, "x-pharox-lease-id"), Some(id.as_str()));
    drop(c);
    let mut s = socks_connect(d.addr, &user, "x", &origin.addr).await;
    let reply = get_over(&mut s, &target, "/socks").await;
    assert!(reply.ends_with("origin:/socks"), "{reply}");
    assert!(
        up.requests()
            .iter()
            .all(|r| !r.contains("Proxy-Authorization: Basic dz")),
        "our client's credentials never go upstream"
    );
    // Another consumer's lease, an unknown one: 403 lease_forbidden.
    let (_, head) = connect(
        d.addr,
        &target,
        Some(&basic(&format!("other-lease-{id}"), "y")),
        "",
    )
    .await;
    assert_eq!(
        (status_of(&head), header(&head, "x-pharox-error")),
        (403, Some("lease_forbidden")),
        "{head}"
    );
    let (_, head) = connect(
        d.addr,
        &target,
        Some(&basic("w-lease-0b9e4c2e-0000-4000-8000-000000000000", "x")),
        "",
    )
    .await;
    assert_eq!(
        header(&head, "x-pharox-error"),
        Some("lease_forbidden"),
        "{head}"
    );
    let (_, head) = connect(
        d.addr,
        &target,
        Some(&basic(&format!("w-lease-{id}-pool-shared"), "x")),
        "",
    )
    .await;
    assert_eq!(
        header(&head, "x-pharox-error"),
        Some("bad_username"),
        "{head}"
    );
    // Released through the API: its open tunnel closes, and the username is refused with 410.
    let (status, _) = call(
        &d,
        "POST",
        &format!("/v1/leases/{id}/release"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest))
        .await
        .expect("tunnel closed");
    let (_, head) = connect(d.addr, &target, Some(&basic(&user, "x")), "").await;
    assert_eq!(
        (status_of(&head), header(&head, "x-pharox-error")),
        (410, Some("lease_expired")),
        "{head}"
    );
    // The slot is free for the proxy port again.
    let (_, head) = connect(d.addr, &target, Some(&basic("w-pool-shared", "x")), "").await;
    assert_eq!(status_of(&head), 200, "{head}");
    d.stop().await;
}

/// An API lease whose holder vanished expires at its TTL; a tunnel riding it closes with it.
#[tokio::test]
async fn an_expired_api_lease_ends_its_connections_and_frees_its_slot() {
    let origin = Origin::start().await;
    let up = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&config("")).await;
    let (pool_id, _) = pool_with(&d, "short", &up, 1).await;
    let (_, lease) = acquire(&d, &pool_id, "w", 1).await;
    let id = lease["id"].as_str().unwrap().to_owned();
    let target = origin.addr.to_string();
    let (mut tunnel, head) = connect(
        d.addr,
        &target,
        Some(&basic(&format!("w-lease-{id}"), "x")),
        "",
    )
    .await;
    assert_eq!(status_of(&head), 200, "{head}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest))
        .await
        .expect("tunnel closed at expiry");
    d.wait_leased("short", 0).await;
    let (status, got) = call(&d, "GET", &format!("/v1/leases/{id}"), None).await;
    assert_eq!(
        (status, got["status"].as_str()),
        (200, Some("released")),
        "{got}"
    );
    assert_eq!(acquire(&d, &pool_id, "w", 60).await.0, 201);
    d.stop().await;
}

/// An operator closing an API lease closes the connections that use it.
#[tokio::test]
async fn an_operator_closes_an_api_lease_and_its_connections() {
    let origin = Origin::start().await;
    let up = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&config("")).await;
    let (pool_id, _) = pool_with(&d, "op", &up, 1).await;
    let (_, lease) = acquire(&d, &pool_id, "w", 300).await;
    let id = lease["id"].as_str().unwrap().to_owned();
    let (mut tunnel, head) = connect(
        d.addr,
        &origin.addr.to_string(),
        Some(&basic(&format!("w-lease-{id}"), "x")),
        "",
    )
    .await;
    assert_eq!(status_of(&head), 200, "{head}");
    let (status, _) = admin(d.admin, "DELETE", &format!("/api/v1/leases/{id}"), None, "").await;
    assert_eq!(status, 200);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest))
        .await
        .expect("closed");
    let (_, got) = call(&d, "GET", &format!("/v1/leases/{id}"), None).await;
    assert_eq!(got["status"].as_str(), Some("released"));
    assert_eq!(d.leased("op").await, 0);
    d.stop().await;
}

/// A config reload never deletes what the API made.
#[tokio::test]
async fn a_reload_keeps_the_api_inventory() {
    let up = FakeProxy::start(Mode::Ok).await;
    let d = TestDaemon::start(&config("")).await;
    let (pool_id, _) = pool_with(&d, "kept", &up, 1).await;
    let cfg =
        pharox::config::Config::from_toml_str(&config(""), std::path::Path::new("."), &|_| None)
            .unwrap();
    pharox::reload::apply(&d.state, cfg).await.unwrap();
    let (status, list) = call(&d, "GET", &format!("/v1/pools/{pool_id}/proxies/"), None).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    d.stop().await;
}

fn status_of(head: &str) -> u16 {
    status(head)
}

/// SOCKS5 CONNECT with username/password to `target`; returns the open stream.
async fn socks_connect(
    daemon: std::net::SocketAddr,
    user: &str,
    pass: &str,
    target: &std::net::SocketAddr,
) -> TcpStream {
    let mut s = TcpStream::connect(daemon).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 2]);
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(pass.len() as u8);
    auth.extend_from_slice(pass.as_bytes());
    s.write_all(&auth).await.unwrap();
    let mut a = [0u8; 2];
    s.read_exact(&mut a).await.unwrap();
    assert_eq!(a, [1, 0], "SOCKS5 auth");
    let std::net::SocketAddr::V4(v4) = target else {
        panic!("v4")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r[1], 0, "SOCKS5 reply {r:?}");
    s
}
