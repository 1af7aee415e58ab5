//! What an operator of a fleet meets: a lease released by hand in SQL (as Python pharox
//! releases) closes the tunnel that held it; the database password shows up nowhere (logs,
//! `pharox check`, the admin and lease APIs, `/metrics`); `pharox check --connect` exits 0
//! only when a daemon could start on the database, naming the problem otherwise.

use std::time::Duration;

use crate::common::admin::{admin, api};
use crate::common::hostile::{Behaviour, Upstream};
use crate::pgsupport::{TestDb, eventually};
use crate::support::*;

/// `pharox check --config FILE [--connect]` with the database URL `url` in [`URL_VAR`]:
/// exit code, stdout, stderr.
async fn check(url: &str, config_text: &str, connect: bool) -> (Option<i32>, String, String) {
    let (_dir, path) = config_file(config_text);
    let mut c = pharox(url);
    c.arg("check").arg("--config").arg(&path);
    if connect {
        c.arg("--connect");
    }
    let out = tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .expect("pharox check ends")
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A URL to 127.0.0.1 on a port where nothing listens (bound, then freed).
fn unreachable_url(user_info: &str) -> (String, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (
        format!("postgres://{user_info}@127.0.0.1:{port}/pharox?connect_timeout=5"),
        port,
    )
}

/// The URL with a password in its user info (the test server trusts local connections, so
/// an added one is accepted and ignored), and that password. A URL that has one keeps it.
fn with_password(url: &str) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (user_info, host) = rest.split_once('@').expect("a URL with a user");
    match user_info.split_once(':') {
        Some((_, pw)) => (url.to_owned(), pw.to_owned()),
        None => {
            let pw = "opsPw9Kd27xq";
            (format!("{scheme}://{user_info}:{pw}@{host}"), pw.to_owned())
        }
    }
}

/// Two tunnels on one upstream of cap 2 (`lease_seconds = 4`: renewed every 2 s). One of the
/// leases is released by hand in SQL, lease row and counter, as Python pharox's
/// `release_lease` does: the daemon finds it lost at its next renewal and closes that tunnel
/// only; the slot is not given back twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_released_by_hand_in_sql_closes_its_tunnel() {
    let Some(db) = TestDb::new("fleet_hand_release").await else {
        return;
    };
    let up = Upstream::start(Behaviour::Ok, None);
    let pools = pool(
        "hand",
        "first_available",
        4,
        NO_RETRY,
        &[("h-1", up.addr, Some(2))],
    );
    let node = Node::start(&config("hand-a", STATEMENT_MS, "", &pools), &db.url).await;
    let sql = db.sql().await;
    let (mut gone, head) = node.tunnel("hand").await;
    let released = lease_id(ok(&head));
    let (mut kept, head) = node.tunnel("hand").await;
    let kept_id = lease_id(ok(&head));
    assert!(echoes(&mut gone).await && echoes(&mut kept).await);
    assert_eq!(node.metric("pharox_leases_lost_total", &[]).await, None);

    let changed = sql
        .execute(
            "WITH l AS (UPDATE lease SET status = 'released', released_at = now()
                        WHERE id::text = $1 AND status = 'active' RETURNING proxy_id)
             UPDATE proxy SET current_leases = greatest(current_leases - 1, 0)
             FROM l WHERE proxy.id = l.proxy_id",
            &[&released],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1, "the lease was live and is released by hand");
    assert!(
        closed_within(&mut gone, Duration::from_secs(20)).await,
        "the tunnel of the released lease is closed"
    );
    let lost = eventually(Duration::from_secs(10), || async {
        node.metric("pharox_leases_lost_total", &[("pool", "hand")])
            .await
    })
    .await;
    assert_eq!(lost, Some(1.0));
    assert!(echoes(&mut kept).await, "the other tunnel goes on");
    assert!(node.log().contains("lease lost"), "{}", node.log());
    // Python's release leaves no reason; the daemon's own (idempotent) release changed nothing.
    assert_eq!(
        lease_row(&sql, &released).await.unwrap(),
        ("released".into(), None, Some("hand-a".into()))
    );
    // The freed slot is leasable once, and the counter matches the rows.
    let (mut again, head) = node.tunnel("hand").await;
    ok(&head);
    assert!(echoes(&mut again).await);
    assert_eq!(snapshot(&sql).await, (0, 0, 2, 2));
    assert_eq!(lease_row(&sql, &kept_id).await.unwrap().0, "active");
    assert_eq!(
        node.metric("pharox_leases_lost_total", &[("pool", "hand")])
            .await,
        Some(1.0),
        "only the released lease was lost"
    );
    assert_eq!(up.max_open(), 2);
    drop((kept, again));
    node.stop().await;
    assert_eq!(snapshot(&sql).await, (0, 0, 0, 0));
}

/// A daemon (debug logs) on a URL with a password, driven through its proxy port, admin API,
/// lease API and a reload; `pharox check` with and without `--connect`, with the URL in the
/// environment or in the file, reachable or not; a daemon that cannot reach its database.
/// The URL shows up masked (`:***@`); the password nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_password_is_never_shown() {
    let Some(db) = TestDb::new("fleet_password").await else {
        return;
    };
    let (url, pw) = with_password(&db.url);
    let up = Upstream::start(Behaviour::Ok, None);
    let api_key = "ops-api-key-0123456789";
    let pools = format!(
        "[[api.keys]]\nname = \"ops\"\nkey = \"{api_key}\"\nconsumers = []\nmanage = true\n{}",
        pool(
            "sec",
            "first_available",
            30,
            NO_RETRY,
            &[("s-1", up.addr, Some(2))]
        )
    );
    let cfg = config("secret-a", STATEMENT_MS, "", &pools);
    let node = match Node::spawn(&cfg, &url, "debug").await {
        Ok(n) => n,
        Err((status, log)) => panic!("the daemon exited ({status}):\n{log}"),
    };
    let mut shown = Vec::new();
    let (mut s, head) = node.tunnel("sec").await;
    ok(&head);
    assert!(echoes(&mut s).await);
    shown.push(head);
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/pools",
        "/api/v1/pools/sec",
        "/api/v1/leases",
        "/api/v1/sessions",
    ] {
        let (code, body) = admin(node.admin, "GET", path, None, "").await;
        assert_eq!(code, 200, "{path}: {body}");
        shown.push(body);
    }
    let (code, body) = admin(node.admin, "POST", "/api/v1/reload", None, "").await;
    assert_eq!(code, 200, "{body}");
    shown.push(body);
    let (code, head, pools_json) = api(node.admin, "GET", "/v1/pools/", Some(api_key), None).await;
    assert_eq!(code, 200, "{head}");
    let pool_id = pools_json
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "sec"))
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .expect("the config pool is listed");
    let body = serde_json::json!({"pool_id": pool_id, "consumer_id": "ops", "ttl_seconds": 30});
    let (code, head, lease) =
        api(node.admin, "POST", "/v1/leases/", Some(api_key), Some(body)).await;
    assert_eq!(code, 201, "{head}");
    let lease_id = lease["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/leases/{lease_id}/release");
    let (code, _, released) = api(node.admin, "POST", &path, Some(api_key), None).await;
    assert_eq!(code, 200);
    shown.extend([
        pools_json.to_string(),
        lease.to_string(),
        released.to_string(),
    ]);
    drop(s);

    // `check` on the running daemon's database: its own node id is held (exit 1), another
    // one is free (exit 0); the URL in the environment, then in the file.
    let (code, out, err) = check(&url, &cfg, true).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("node id `secret-a` is held by a live daemon"),
        "{err}"
    );
    shown.extend([out, err]);
    let other = config("secret-b", STATEMENT_MS, "", &pools);
    let (code, out, err) = check(&url, &other, true).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(":***@"), "the URL is shown masked: {out}");
    shown.extend([out, err]);
    let inline = other.replace(
        &format!("url_env = \"{URL_VAR}\""),
        &format!("url = \"{url}\""),
    );
    assert!(inline.contains(&pw));
    let (code, out, err) = check("", &inline, false).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(":***@"), "{out}");
    shown.extend([out, err]);
    // Unreachable, with the same password.
    let (dead, _) = unreachable_url(&format!("postgres:{pw}"));
    let (code, out, err) = check(&dead, &other, true).await;
    assert_eq!(code, Some(1), "{out}{err}");
    shown.extend([out, err]);
    let dead_node = Node::spawn(
        &config("secret-c", STATEMENT_MS, "", &pools),
        &dead,
        "debug",
    )
    .await;
    match dead_node {
        Ok(n) => panic!("a daemon started on an unreachable database:\n{}", n.log()),
        Err((status, log)) => {
            assert!(!status.success(), "{status}");
            assert!(
                log.contains(":***@"),
                "the error names the masked URL: {log}"
            );
            shown.push(log);
        }
    }

    let metrics = node.metrics().await;
    let mut node = node;
    let exit = node.terminate().await;
    let log = node.log();
    assert_eq!(exit.code(), Some(0), "{log}");
    assert!(log.contains(":***@"), "the log names the masked URL");
    shown.extend([metrics, log]);
    for text in &shown {
        assert!(!text.contains(&pw), "the password is shown:\n{text}");
    }
}

/// `pharox check --connect`: 0 on a database a daemon can use; non-zero, naming the problem,
/// when the server cannot be reached, when the node id is held by a live daemon, and when
/// the schema is incomplete and `migrate = false`. Without `--connect` nothing is dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_connect_exit_codes() {
    let Some(db) = TestDb::new("fleet_check").await else {
        return;
    };
    let Some(fresh) = TestDb::new("fleet_check_empty").await else {
        return;
    };
    let up = Upstream::start(Behaviour::Ok, None);
    let pools = pool(
        "chk",
        "first_available",
        30,
        NO_RETRY,
        &[("k-1", up.addr, None)],
    );

    // A fresh database: tables missing, which `migrate = true` (the default) will create.
    let (code, out, err) = check(
        &fresh.url,
        &config("check-a", STATEMENT_MS, "", &pools),
        true,
    )
    .await;
    println!("fresh database:\n{out}{err}");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("schema: missing"), "{out}");
    assert!(out.contains("node id check-a: free"), "{out}");
    // The same without `migrate`: a daemon could not start there.
    let no_migrate = config("check-a", STATEMENT_MS, "migrate = false", &pools);
    let (code, out, err) = check(&fresh.url, &no_migrate, true).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("the schema is incomplete and storage.migrate is false"),
        "{err}"
    );

    // A database a daemon migrated; while that daemon lives its node id is taken.
    let node = Node::start(&config("check-live", STATEMENT_MS, "", &pools), &db.url).await;
    let (code, out, err) = check(&db.url, &config("check-b", STATEMENT_MS, "", &pools), true).await;
    println!("migrated database:\n{out}{err}");
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("schema: complete"), "{out}");
    let (code, out, err) = check(
        &db.url,
        &config("check-live", STATEMENT_MS, "", &pools),
        true,
    )
    .await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("node id `check-live` is held by a live daemon"),
        "{err}"
    );
    node.stop().await;
    let freed = eventually(Duration::from_secs(20), || async {
        let (code, _, _) = check(
            &db.url,
            &config("check-live", STATEMENT_MS, "", &pools),
            true,
        )
        .await;
        (code == Some(0)).then_some(())
    })
    .await;
    assert!(
        freed.is_some(),
        "the node id is free once its daemon stopped"
    );

    // Nothing listens there.
    let (dead, port) = unreachable_url("postgres");
    let dead_cfg = config("check-a", STATEMENT_MS, "", &pools);
    let (code, out, err) = check(&dead, &dead_cfg, true).await;
    println!("unreachable:\n{out}{err}");
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(code.is_some(), "an exit, not a signal");
    assert!(
        err.contains("cannot connect to") && err.contains(&format!("127.0.0.1:{port}")),
        "the message names the problem and the server: {err}"
    );
    let (code, out, err) = check(&dead, &dead_cfg, false).await;
    assert_eq!(
        code,
        Some(0),
        "without --connect the config alone is checked: {out}{err}"
    );
}
