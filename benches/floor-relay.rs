//! The least an HTTP-aware forward proxy on tokio does per unit of work, as a floor to compare
//! pharox's CPU with (benches/README.md, "Runs 22–24"). Not part of the daemon.
//!
//! Per client connection it connects to the next upstream proxy (round robin) and then, per
//! request: reads the request head until `httparse` has parsed it, writes it to the upstream
//! unchanged, reads the response head the same way, and writes it and its `Content-Length`
//! body back. A `CONNECT` is forwarded the same way and, once its `2xx` reply is back, the
//! connection becomes a byte splice (`copy_bidirectional`). No identity, no lease, no header
//! edits, no limit but a head's size: the client must carry the upstream's credentials, as
//! it does through HAProxy in TCP mode. Any other framing (chunked, close-delimited) ends the
//! connection.
//!
//! ```sh
//! cargo build --release --example floor-relay
//! taskset -c 0 target/release/examples/floor-relay 127.0.0.1:18207 127.0.0.2:18100 127.0.0.3:18100
//! ```

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest head read before the connection is dropped.
const MAX_HEAD: usize = 16 * 1024;
const HEADERS: usize = 32;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = || std::io::Error::other("usage: floor-relay LISTEN UPSTREAM...");
    let listen: SocketAddr = args
        .next()
        .ok_or_else(usage)?
        .parse()
        .map_err(|_| usage())?;
    let upstreams: Vec<SocketAddr> = args
        .map(|a| a.parse().map_err(|_| usage()))
        .collect::<Result<_, _>>()?;
    if upstreams.is_empty() {
        return Err(usage());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = TcpListener::bind(listen).await?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => Ok(()),
                r = serve(listener, upstreams) => r,
            }
        })
}

async fn serve(listener: TcpListener, upstreams: Vec<SocketAddr>) -> std::io::Result<()> {
    for next in 0.. {
        let (client, _) = listener.accept().await?;
        let upstream = upstreams[next % upstreams.len()];
        tokio::spawn(async move {
            let _ = relay(client, upstream).await;
        });
    }
    Ok(())
}

async fn relay(mut client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let mut up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let mut from_client = BytesMut::with_capacity(4096);
    let mut from_up = BytesMut::with_capacity(4096);
    loop {
        let Some(req) = read_head(&mut client, &mut from_client, true).await? else {
            return Ok(());
        };
        forward(&mut client, &mut from_client, &mut up, req.len, req.body).await?;
        let Some(res) = read_head(&mut up, &mut from_up, false).await? else {
            return Ok(());
        };
        let status_ok = from_up.starts_with(b"HTTP/1.1 2") || from_up.starts_with(b"HTTP/1.0 2");
        let body = if req.connect { Some(0) } else { res.body };
        forward(&mut up, &mut from_up, &mut client, res.len, body).await?;
        if req.connect {
            if !status_ok {
                return Ok(());
            }
            // Bytes either side sent early go first.
            client.write_all(&from_up).await?;
            up.write_all(&from_client).await?;
            tokio::io::copy_bidirectional(&mut client, &mut up).await?;
            return Ok(());
        }
    }
}

/// A parsed head: its length, whether it was a CONNECT, and its body's length (`None` for
/// framing other than `Content-Length`).
struct Head {
    len: usize,
    connect: bool,
    body: Option<u64>,
}

/// Reads until `buf` starts with a whole head and parses it once. `None` when the peer closed
/// before a head began.
async fn read_head(
    io: &mut TcpStream,
    buf: &mut BytesMut,
    request: bool,
) -> std::io::Result<Option<Head>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; HEADERS];
        let parsed = if request {
            let mut req = httparse::Request::new(&mut headers);
            req.parse(buf).map(|s| match s {
                httparse::Status::Complete(len) => Some(Head {
                    len,
                    connect: req.method == Some("CONNECT"),
                    body: body_length(req.headers),
                }),
                httparse::Status::Partial => None,
            })
        } else {
            let mut res = httparse::Response::new(&mut headers);
            res.parse(buf).map(|s| match s {
                httparse::Status::Complete(len) => Some(Head {
                    len,
                    connect: false,
                    body: body_length(res.headers),
                }),
                httparse::Status::Partial => None,
            })
        };
        match parsed {
            Ok(Some(head)) => return Ok(Some(head)),
            Ok(None) if buf.len() < MAX_HEAD => {}
            _ => return Err(std::io::Error::other("bad or oversized head")),
        }
        if io.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
    }
}

/// The `Content-Length` of a head's fields (0 when there is none); `None` for any other
/// framing.
fn body_length(fields: &[httparse::Header<'_>]) -> Option<u64> {
    let mut length = 0;
    for h in fields {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None;
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
        }
    }
    Some(length)
}

/// Writes the head and `body` bytes from `buf` (reading more from `from` as needed) to `to`.
async fn forward(
    from: &mut TcpStream,
    buf: &mut BytesMut,
    to: &mut TcpStream,
    head: usize,
    body: Option<u64>,
) -> std::io::Result<()> {
    let Some(body) = body else {
        return Err(std::io::Error::other("framing other than Content-Length"));
    };
    let mut left = head as u64 + body;
    loop {
        let n = left.min(buf.len() as u64) as usize;
        to.write_all(&buf[..n]).await?;
        buf.advance(n);
        left -= n as u64;
        if left == 0 {
            return Ok(());
        }
        if from.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that answers each request with `ok`, and a CONNECT with 200 and then an
    /// echo; it records each request it saw, head and body.
    async fn upstream(listener: TcpListener, seen: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) {
        let (mut io, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::new();
        while let Some(head) = read_head(&mut io, &mut buf, true).await.unwrap() {
            let whole = head.len + head.body.expect("Content-Length framing") as usize;
            while buf.len() < whole {
                assert_ne!(io.read_buf(&mut buf).await.unwrap(), 0, "body cut short");
            }
            seen.send(buf.split_to(whole).to_vec()).unwrap();
            if head.connect {
                io.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let (mut r, mut w) = io.split();
                w.write_all(&buf).await.unwrap();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                return;
            }
            io.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
        }
    }

    async fn start() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(upstream(up, tx));
        let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = relay.local_addr().unwrap();
        tokio::spawn(serve(relay, vec![up_addr]));
        (addr, rx)
    }

    /// `n` bytes, or a failure (not a hang) when they do not come.
    async fn read_exactly(io: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut out = vec![0; n];
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(10), io.read_exact(&mut out));
        read.await.expect("answered in time").unwrap();
        out
    }

    #[tokio::test]
    async fn forwards_keep_alive_requests_unchanged() {
        let (addr, mut seen) = start().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let get = b"GET http://a/ HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic eDp5\r\n\r\n";
        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        for _ in 0..2 {
            client.write_all(get).await.unwrap();
            assert_eq!(read_exactly(&mut client, answer.len()).await, answer);
            assert_eq!(seen.recv().await.unwrap(), get);
        }
        let post = b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n";
        client
            .write_all(&[&post[..], b"abc"].concat())
            .await
            .unwrap();
        assert_eq!(read_exactly(&mut client, answer.len()).await, answer);
        assert_eq!(seen.recv().await.unwrap(), [&post[..], b"abc"].concat());
        // The body did not leak into the next request.
        client.write_all(get).await.unwrap();
        assert_eq!(read_exactly(&mut client, answer.len()).await, answer);
        assert_eq!(seen.recv().await.unwrap(), get);
    }

    #[tokio::test]
    async fn splices_a_tunnel_after_its_reply() {
        let (addr, mut seen) = start().await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let connect = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        client.write_all(connect).await.unwrap();
        let reply = b"HTTP/1.1 200 Connection established\r\n\r\n";
        assert_eq!(read_exactly(&mut client, reply.len()).await, reply);
        assert_eq!(seen.recv().await.unwrap(), connect);
        client.write_all(b"ECHO").await.unwrap();
        assert_eq!(read_exactly(&mut client, 4).await, b"ECHO");
    }
}
