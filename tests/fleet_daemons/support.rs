//! Daemons as real processes (`pharox serve` on a config file, JSON logs on stderr, the
//! ports taken from the `listening` line), their configs, clients of their proxy and admin
//! ports, SQL snapshots of the shared lease state, and Python pharox 0.11 workers.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::common::admin::{admin, metric};
use crate::common::daemon::{basic, connect, header, status};
pub use crate::pgsupport::{run_script as python, snapshot};

/// The variable that carries the database URL into the daemon (`storage.url_env`).
pub const URL_VAR: &str = "DB_URL_FOR_TEST";
/// The statement timeout of every daemon but the outage test's (the machine is shared).
pub const STATEMENT_MS: u64 = 5000;
/// No retry: an exhausted pool answers 503 at once (for polling).
pub const NO_RETRY: &str = "max_attempts = 1";

/// `pharox ARGS` with a clean environment: none of this process's `PHAROX_*` variables
/// (every one is a config override the daemon would apply or refuse), the database URL in
/// [`URL_VAR`], killed when dropped.
pub fn pharox(url: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pharox"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PHAROX_") {
            c.env_remove(k);
        }
    }
    c.env(URL_VAR, url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

/// One upstream of a pool: config id, address, cap.
pub type Up<'a> = (&'a str, SocketAddr, Option<u32>);

/// A `[[pools]]` entry; `retry` is the body of its `[pools.retry]` table.
pub fn pool(name: &str, selector: &str, lease_seconds: u64, retry: &str, ups: &[Up]) -> String {
    let mut s = format!(
        "[[pools]]\nname = \"{name}\"\nselector = \"{selector}\"\nlease_seconds = {lease_seconds}\n[pools.retry]\n{retry}\n"
    );
    for (id, addr, cap) in ups {
        s += &format!("[[pools.proxies]]\nid = \"{id}\"\nurl = \"http://{addr}\"\n");
        if let Some(cap) = cap {
            s += &format!("max_concurrency = {cap}\n");
        }
    }
    s
}

/// A fleet daemon's config: ports 0, quick drains, node `node` on the database of
/// [`URL_VAR`], consumer `w:x`, then `pools`. `storage_extra` goes in `[storage]`.
pub fn config(node: &str, statement_ms: u64, storage_extra: &str, pools: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[limits]
drain_timeout_secs = 2
[storage]
kind = "postgres"
url_env = "{URL_VAR}"
node_id = "{node}"
pool_size = 4
statement_timeout_ms = {statement_ms}
{storage_extra}
[[consumers]]
name = "w"
password = "x"
{pools}"#
    )
}

/// Writes `text` to a config file in a directory of its own.
pub fn config_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pharox.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A `pharox serve` process.
pub struct Node {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub pid: u32,
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// The addresses of a `listening` log line.
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["fields"]["message"] != "listening" {
        return None;
    }
    let addr = |k: &str| v["fields"][k].as_str()?.parse().ok();
    Some((addr("proxy")?, addr("admin")?))
}

impl Node {
    /// Starts a daemon; it must come up.
    pub async fn start(config: &str, url: &str) -> Node {
        match Self::spawn(config, url, "info").await {
            Ok(n) => n,
            Err((status, log)) => panic!("the daemon exited ({status}):\n{log}"),
        }
    }

    /// Starts a daemon with `RUST_LOG=rust_log`: the running process once it logged
    /// `listening`, or its exit status and whole stderr if it ended first.
    pub async fn spawn(
        config: &str,
        url: &str,
        rust_log: &str,
    ) -> Result<Node, (ExitStatus, String)> {
        let (dir, path) = config_file(config);
        let mut child = pharox(url)
            .env("RUST_LOG", rust_log)
            .args(["serve", "--log-format", "json", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let log: Arc<Mutex<String>> = Arc::default();
        let (tx, rx) = oneshot::channel();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let reader = tokio::spawn({
            let log = log.clone();
            async move {
                let mut tx = Some(tx);
                while let Ok(Some(line)) = lines.next_line().await {
                    {
                        let mut l = log.lock().unwrap();
                        l.push_str(&line);
                        l.push('\n');
                    }
                    if let Some(addrs) = listening(&line)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(addrs);
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok((proxy, admin))) => Ok(Node {
                proxy,
                admin,
                pid,
                child,
                log,
                reader: Some(reader),
                _dir: dir,
            }),
            // stderr closed without `listening`: the process ended.
            Ok(Err(_)) => {
                let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
                    .await
                    .expect("a daemon whose stderr closed exits")
                    .unwrap();
                let _ = reader.await;
                let log = log.lock().unwrap().clone();
                Err((status, log))
            }
            Err(_) => panic!("no `listening` line within 60 s:\n{}", log.lock().unwrap()),
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await.unwrap();
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
    }

    /// SIGTERM; waits (at most 60 s) for the exit and the end of its stderr.
    pub async fn terminate(&mut self) -> ExitStatus {
        signal(self.pid, "-TERM");
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the daemon did not stop on SIGTERM:\n{}", self.log()))
            .unwrap();
        if let Some(r) = self.reader.take() {
            let _ = r.await;
        }
        status
    }

    /// SIGTERM, which must end in exit code 0.
    pub async fn stop(mut self) {
        let status = self.terminate().await;
        assert_eq!(status.code(), Some(0), "exit status:\n{}", self.log());
    }

    /// The value of a metric series (`None` when absent).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric(&self.metrics().await, name, labels)
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        admin(self.admin, "GET", "/metrics", None, "").await.1
    }

    /// The status of `GET /readyz`.
    pub async fn readyz(&self) -> u16 {
        admin(self.admin, "GET", "/readyz", None, "").await.0
    }

    /// A CONNECT tunnel through this daemon in `pool` (see [`tunnel`]).
    pub async fn tunnel(&self, pool: &str) -> (TcpStream, String) {
        tunnel(self.proxy, pool).await
    }
}

/// Sends `sig` (`-TERM`, `-KILL`) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Opens a CONNECT tunnel through `proxy` in `pool` (the upstream fakes echo); returns the
/// stream and the reply head.
pub async fn tunnel(proxy: SocketAddr, pool: &str) -> (TcpStream, String) {
    let extra = format!("X-Pharox-Pool: {pool}\r\n");
    connect(proxy, "x.test:443", Some(&basic("w", "x")), &extra).await
}

/// The `X-Pharox-Error` code of a head.
pub fn error_code(head: &str) -> &str {
    header(head, "x-pharox-error").unwrap_or("")
}

/// The lease id of a successful reply.
pub fn lease_id(head: &str) -> String {
    header(head, "x-pharox-lease-id")
        .unwrap_or_else(|| panic!("no lease id: {head}"))
        .to_owned()
}

/// A 200 reply head, or a panic naming the head.
pub fn ok(head: &str) -> &str {
    assert_eq!(status(head), 200, "{head}");
    head
}

/// True when the tunnel still carries bytes both ways (the fakes echo).
pub async fn echoes(s: &mut TcpStream) -> bool {
    let io = async {
        s.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(&b == b"ping")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), io).await,
        Ok(Ok(true))
    )
}

/// Waits at most `within` for the peer to close `s`; true if it did.
pub async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let eof = async {
        let mut b = [0u8; 64];
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, eof).await.is_ok()
}

/// A lease row: (status, release_reason, holder).
pub async fn lease_row(
    sql: &tokio_postgres::Client,
    id: &str,
) -> Option<(String, Option<String>, Option<String>)> {
    sql.query_opt(
        "SELECT status::text, release_reason::text, holder FROM lease WHERE id::text = $1",
        &[&id],
    )
    .await
    .unwrap()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
}

/// Server sessions of node `node` (its pool and dedicated session).
pub async fn sessions_of(sql: &tokio_postgres::Client, node: &str) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
        &[&format!("pharox/{node}")],
    )
    .await
    .unwrap()
    .get(0)
}
