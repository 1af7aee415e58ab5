//! A bulk tunnel when no descriptor is left for a splice pipe: the transfer goes on by
//! copying. (Its own test binary: it lowers the process's open-file limit.)
#![cfg(target_os = "linux")]

mod common;

use common::daemon::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SIZE: usize = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_tunnel_copies_when_no_pipe_can_be_opened() {
    let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = target.accept().await.unwrap();
        go_rx.await.unwrap();
        s.write_all(&vec![9u8; SIZE]).await.unwrap();
    });
    let d = TestDaemon::start(DIRECT_POOL).await;
    let (mut s, head) = connect(d.addr, &target_addr.to_string(), Some(&basic("w", "x")), "").await;
    assert_eq!(status(&head), 200, "{head}");
    // Every socket of the transfer is open: fill the gaps in the descriptor table, then cap
    // the limit just above the highest one, so that no descriptor can be created.
    let highest = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .max()
        .unwrap();
    let mut fillers = Vec::new();
    loop {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        fillers.push(f);
        if fd >= highest {
            break;
        }
    }
    let top = std::os::fd::AsRawFd::as_raw_fd(fillers.last().unwrap()) as u64;
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    rlimit::setrlimit(rlimit::Resource::NOFILE, top + 1, hard).unwrap();
    assert!(
        std::os::unix::net::UnixDatagram::pair().is_err(),
        "limit not in force"
    );
    go_tx.send(()).unwrap();
    let mut got = vec![0u8; SIZE];
    let read = tokio::time::timeout(std::time::Duration::from_secs(60), s.read_exact(&mut got))
        .await
        .expect("transfer stalled");
    rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).unwrap();
    drop(fillers);
    read.unwrap();
    assert!(got.iter().all(|b| *b == 9));
    drop(s);
    d.wait_leased("p", 0).await;
    d.stop().await;
}
