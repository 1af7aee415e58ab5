//! Issue 10, item 10: a reload is all-or-nothing (an inventory error part-way leaves the
//! storage exactly as it was) and reloads are serialised (SIGHUP and the API at once end in
//! the storage matching the configuration in force).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::daemon::*;
use pharox::config::Config;
use pharox::proxy::ProxyState;
use pharox::reload;
use pharox::storage::Storage;

/// Pools and proxies as the storage has them: (pool, [(id, pool, max_concurrency, status,
/// draining)]).
async fn inventory(state: &ProxyState) -> Vec<(String, Vec<String>)> {
    let storage = state.manager.storage();
    let mut out = Vec::new();
    for (pool, _) in storage.list_pools().await.unwrap() {
        let proxies = storage
            .list_proxies(&pool.name)
            .await
            .unwrap()
            .into_iter()
            .map(|i| {
                format!(
                    "{} in {} cap {:?} {:?}{}",
                    i.proxy.id,
                    i.proxy.pool,
                    i.proxy.max_concurrency,
                    i.proxy.status,
                    if i.draining { " draining" } else { "" }
                )
            })
            .collect();
        out.push((pool.name.clone(), proxies));
    }
    out
}

fn pools_in_force(state: &ProxyState) -> Vec<String> {
    let rt = state.runtime.load();
    rt.config.pools.iter().map(|p| p.name.clone()).collect()
}

const BEFORE: &str = r#"
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
[[pools.proxies]]
url = "direct"
id = "a"
max_concurrency = 1
[[pools.proxies]]
url = "direct"
id = "b"
[[pools]]
name = "q"
[[pools.proxies]]
url = "direct"
id = "c"
"#;

/// Valid on its own, but proxy `c` moves from pool `q` to pool `p`, which the storage
/// refuses; a new pool, a changed cap and a removal come before that in the reload.
const MOVED: &str = r#"
[security]
allow_private_targets = true
[[consumers]]
name = "w"
password = "x"
[[pools]]
name = "p"
[[pools.proxies]]
url = "direct"
id = "a"
max_concurrency = 5
[[pools.proxies]]
url = "direct"
id = "c"
[[pools]]
name = "q"
[[pools.proxies]]
url = "direct"
id = "d"
[[pools]]
name = "new"
[[pools.proxies]]
url = "direct"
id = "n1"
"#;

/// Fails on the bug: the new pool was created and `a`'s cap changed before the move of `c`
/// failed, under the old runtime.
#[tokio::test]
async fn a_reload_that_fails_part_way_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pharox.toml");
    std::fs::write(&path, BEFORE).unwrap();
    let d = TestDaemon::start_file(&path).await;
    let before = inventory(&d.state).await;
    assert_eq!(before.len(), 2, "{before:?}");

    let moved = Config::from_toml_str(MOVED, Path::new("."), &|_| None).expect("valid on its own");
    let r = reload::apply(&d.state, moved).await;
    assert!(r.is_err(), "moving an id between pools is refused: {r:?}");
    assert_eq!(inventory(&d.state).await, before, "storage half-changed");
    assert_eq!(pools_in_force(&d.state), ["p", "q"]);

    // The same through the file, as SIGHUP and the API do it.
    std::fs::write(&path, MOVED).unwrap();
    assert!(reload::reload_from(&d.state, &path).await.is_err());
    assert_eq!(inventory(&d.state).await, before, "storage half-changed");
    assert_eq!(pools_in_force(&d.state), ["p", "q"]);

    // The old configuration still serves, with the old cap.
    let origin = Origin::start().await;
    let target = origin.addr.to_string();
    let (first, head) = connect(d.addr, &target, Some(&basic("w-pool-p", "x")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(header(&head, "x-pharox-proxy-id"), Some("a"));
    let (_, head) = connect(d.addr, &target, Some(&basic("w-pool-p", "x")), "").await;
    assert_eq!(
        header(&head, "x-pharox-proxy-id"),
        Some("b"),
        "a's cap is still 1"
    );
    drop(first);
    d.wait_leased("p", 0).await;
    d.stop().await;
}

fn many(pool_a: &str, extra_pool: &str, prefix: &str, n: usize) -> String {
    let mut s = String::from(
        "[security]\nallow_private_targets = true\n[[consumers]]\nname = \"w\"\npassword = \"x\"\n",
    );
    for pool in [pool_a, extra_pool] {
        s.push_str(&format!("[[pools]]\nname = \"{pool}\"\n"));
        for i in 0..n {
            s.push_str(&format!(
                "[[pools.proxies]]\nurl = \"direct\"\nid = \"{prefix}{pool}{i}\"\n"
            ));
        }
    }
    s
}

/// The storage's live (not draining) proxy ids per pool, and the configuration's.
async fn consistent(state: &ProxyState) -> Result<(), String> {
    let rt = state.runtime.load_full();
    let want: BTreeSet<(String, String)> = rt
        .config
        .pools
        .iter()
        .flat_map(|p| {
            p.proxies
                .iter()
                .map(move |x| (p.name.clone(), x.id.clone().unwrap_or_default()))
        })
        .collect();
    let storage = state.manager.storage();
    let mut have = BTreeSet::new();
    for (pool, _) in storage.list_pools().await.unwrap() {
        for i in storage.list_proxies(&pool.name).await.unwrap() {
            if !i.draining {
                have.insert((pool.name.clone(), i.proxy.id.to_string()));
            }
        }
    }
    if want == have {
        Ok(())
    } else {
        let missing: Vec<_> = want.difference(&have).take(5).collect();
        let extra: Vec<_> = have.difference(&want).take(5).collect();
        Err(format!("missing {missing:?}, not configured {extra:?}"))
    }
}

/// Fails on the bug: two reloads ran at once, each removing what the other had just added,
/// so the storage ended matching neither configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reloads_are_serialised() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.toml"), dir.path().join("b.toml"));
    std::fs::write(&a, many("p", "x", "a", 150)).unwrap();
    std::fs::write(&b, many("p", "y", "b", 150)).unwrap();
    let d = TestDaemon::start_file(&a).await;
    let state: Arc<ProxyState> = d.state.clone();
    let mut broken = Vec::new();
    for round in 0..40 {
        let (first, second) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let t1 = tokio::spawn({
            let (state, path) = (state.clone(), first.clone());
            async move { reload::reload_from(&state, &path).await.map(|_| ()) }
        });
        let t2 = tokio::spawn({
            let (state, path) = (state.clone(), second.clone());
            async move { reload::reload_from(&state, &path).await.map(|_| ()) }
        });
        let (r1, r2) = (t1.await.unwrap(), t2.await.unwrap());
        if let Err(e) = r1.and(r2) {
            broken.push(format!("round {round}: a reload failed: {e}"));
        }
        if let Err(e) = consistent(&state).await {
            broken.push(format!("round {round}: {e}"));
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
    d.stop().await;
}
