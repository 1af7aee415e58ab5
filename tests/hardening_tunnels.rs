//! Issue 10, item 15: a tunnel cut by a reset on the far side reaches the client as a
//! reset, never as a clean end of stream (a cut transfer must not look complete). Through a
//! `direct` upstream (copy and splice), SOCKS5, and an HTTP upstream that resets.

mod common;

use std::io::ErrorKind;
use std::time::Duration;

use common::daemon::*;
use common::hostile::*;

const N: usize = 300_000;

fn direct(zero_copy: bool) -> String {
    format!("[limits]\nzero_copy = {zero_copy}\n{DIRECT_POOL}")
}

fn assert_reset(end: &Exchange, what: &str) {
    assert!(end.bytes.len() <= N, "{what}: more bytes than sent");
    assert_eq!(
        end.error,
        Some(ErrorKind::ConnectionReset),
        "{what}: {} bytes, then {}",
        end.bytes.len(),
        match end.error {
            None => "a clean end of stream".to_owned(),
            Some(k) => format!("{k:?}"),
        }
    );
}

/// Fails on the bug: the client got 196 608 of 300 000 bytes and then a FIN.
#[tokio::test]
async fn a_reset_behind_a_direct_tunnel_reaches_the_client() {
    let target = reset_after(N).await;
    for zero_copy in [true, false] {
        let d = TestDaemon::start(&direct(zero_copy)).await;
        let (mut s, head) = connect(d.addr, &target.to_string(), Some(&basic("w", "x")), "").await;
        assert_eq!(status(&head), 200, "{head}");
        let end = read_all(&mut s, Duration::from_secs(60)).await;
        assert_reset(&end, &format!("CONNECT, zero_copy = {zero_copy}"));
        d.wait_leased("p", 0).await;
        d.stop().await;
    }
}

/// Fails on the bug: as above, through SOCKS5.
#[tokio::test]
async fn a_reset_behind_a_socks5_tunnel_reaches_the_client() {
    let target = reset_after(N).await;
    for zero_copy in [true, false] {
        let d = TestDaemon::start(&direct(zero_copy)).await;
        let (code, mut s) = socks_connect(
            d.addr,
            "w",
            "x",
            &socks_request(1, &[127, 0, 0, 1], target.port()),
        )
        .await;
        assert_eq!(code, Some(0));
        let end = read_all(&mut s, Duration::from_secs(60)).await;
        assert_reset(&end, &format!("SOCKS5, zero_copy = {zero_copy}"));
        d.wait_leased("p", 0).await;
        d.stop().await;
    }
}

/// Fails on the bug: an HTTP upstream resetting mid-tunnel looked like a clean close.
#[tokio::test]
async fn an_upstream_proxy_resetting_mid_tunnel_reaches_the_client() {
    let up = Upstream::start(Behaviour::ResetMidTunnel(N), None);
    let cfg = format!(
        "[[consumers]]\nname = \"w\"\npassword = \"x\"\n[[pools]]\nname = \"p\"\n[[pools.proxies]]\nurl = \"http://{}\"\n",
        up.addr
    );
    let d = TestDaemon::start(&cfg).await;
    let (mut s, head) = connect(d.addr, "example.test:443", Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    let end = read_all(&mut s, Duration::from_secs(60)).await;
    assert_reset(&end, "through an HTTP upstream");
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// The control: a target that closes cleanly after its bytes gives a clean end of stream
/// with every byte (so the tests above can tell the two apart).
#[tokio::test]
async fn a_clean_close_stays_clean() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                tokio::io::AsyncWriteExt::write_all(&mut s, &vec![b'c'; N])
                    .await
                    .unwrap();
            });
        }
    });
    for zero_copy in [true, false] {
        let d = TestDaemon::start(&direct(zero_copy)).await;
        let (mut s, head) = connect(d.addr, &target.to_string(), Some(&basic("w", "x")), "").await;
        assert_eq!(status(&head), 200, "{head}");
        let end = read_all(&mut s, Duration::from_secs(60)).await;
        assert_eq!(
            (end.bytes.len(), end.error),
            (N, None),
            "zero_copy = {zero_copy}"
        );
        drop(s);
        d.wait_leased("p", 0).await;
        d.stop().await;
    }
}
