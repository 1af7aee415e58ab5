//! Bulk transfers through CONNECT tunnels: large enough that each direction leaves the
//! read/write copy for the zero-copy path (on Linux), checked byte for byte, with half-close,
//! byte counters and the lease released at the end. Each runs with `limits.zero_copy` on and
//! off (the copy path alone), inside a time bound so that a stalled or spinning pump fails
//! instead of hanging.

mod common;

use common::daemon::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// 8 MiB: far more than one 64 KiB buffer, so every direction turns bulk.
const SIZE: usize = 8 << 20;

/// Generous bound for one transfer on a loaded machine (it takes milliseconds).
const BOUND: std::time::Duration = std::time::Duration::from_secs(60);

fn config(zero_copy: bool) -> String {
    format!("[limits]\nzero_copy = {zero_copy}\n{DIRECT_POOL}")
}

/// Runs `case` with zero-copy on, then off.
async fn both_ways<F, Fut>(case: F)
where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for zero_copy in [true, false] {
        tokio::time::timeout(BOUND, case(zero_copy))
            .await
            .unwrap_or_else(|_| panic!("transfer stalled (zero_copy = {zero_copy})"));
    }
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(pattern).collect()
}

/// Reads until EOF, checking every byte against the pattern; returns how many came.
async fn read_checked(s: &mut (impl AsyncReadExt + Unpin)) -> usize {
    let mut buf = vec![0u8; 256 * 1024];
    let mut at = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return at;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(at + k), "byte {} differs", at + k);
        }
        at += n;
    }
}

async fn bytes_metric(d: &TestDaemon, direction: &str) -> u64 {
    let text = common::admin::admin(d.admin, "GET", "/metrics", None, "")
        .await
        .1;
    let line = format!("pharox_bytes_total{{pool=\"p\",direction=\"{direction}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in {text}"))
}

/// Upload, half-close, then download: the target reads the whole upload to EOF (passed on
/// through the tunnel), answers with its own bulk, and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_upload_then_download_with_half_close() {
    both_ways(upload_then_download).await;
}

async fn upload_then_download(zero_copy: bool) {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut s, _) = target.accept().await.unwrap();
        let got = read_checked(&mut s).await;
        s.write_all(&payload(SIZE)).await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    let d = TestDaemon::start(&config(zero_copy)).await;
    let (s, head) = connect(d.addr, &target_addr.to_string(), Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    let (mut r, mut w) = s.into_split();
    w.write_all(&payload(SIZE)).await.unwrap();
    w.shutdown().await.unwrap();
    assert_eq!(read_checked(&mut r).await, SIZE, "download");
    assert_eq!(server.await.unwrap(), SIZE, "upload");
    drop((r, w));
    d.wait_leased("p", 0).await;
    assert_eq!(bytes_metric(&d, "tx").await, SIZE as u64);
    assert_eq!(bytes_metric(&d, "rx").await, SIZE as u64);
    d.stop().await;
}

/// Both directions at full speed at once: the target echoes, the client writes and reads
/// concurrently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_echo_both_directions_at_once() {
    both_ways(echo_both_directions).await;
}

async fn echo_both_directions(zero_copy: bool) {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = target.accept().await.unwrap();
        let (mut r, mut w) = s.into_split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let d = TestDaemon::start(&config(zero_copy)).await;
    let (s, head) = connect(d.addr, &target_addr.to_string(), Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let data = payload(SIZE);
        for chunk in data.chunks(100_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        w
    });
    assert_eq!(read_checked(&mut r).await, SIZE);
    let w = writer.await.unwrap();
    drop((r, w));
    d.wait_leased("p", 0).await;
    d.stop().await;
}

/// A bulk transfer cut by the target (it closes mid-download): the client sees EOF, the lease
/// is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_download_cut_by_the_target_releases_the_lease() {
    both_ways(download_cut_by_the_target).await;
}

async fn download_cut_by_the_target(zero_copy: bool) {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = target.accept().await.unwrap();
        s.write_all(&payload(SIZE / 2)).await.unwrap();
        drop(s);
    });
    let d = TestDaemon::start(&config(zero_copy)).await;
    let (mut s, head) = connect(d.addr, &target_addr.to_string(), Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    assert_eq!(read_checked(&mut s).await, SIZE / 2);
    drop(s);
    d.wait_leased("p", 0).await;
    d.stop().await;
}
