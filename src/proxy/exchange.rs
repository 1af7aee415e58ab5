//! One plain-HTTP exchange on an upstream connection, the I/O half of the relay in
//! `forward.rs`: sending a request body, reading a response head within its time, relaying
//! interim and final responses (in one write when the body is already here), and switching
//! protocols (`101`) into a tunnel. Faults are told apart by side: the client's end the
//! connection, the upstream's may let the request go again elsewhere.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::deadline::Deadline;
use super::http1::{
    BodyError, BodyFraming, ChunkedDecoder, Fields, HeaderLines, ResponseHead, ResponseRewrite,
    copy_body, take_response_reusing,
};
use super::splice::{SpliceEnd, Transferred, splice_upstream};
use super::tunnel;
use super::upstream::UpstreamIo;
use crate::error::ProxyError;
use crate::model::ProxyProtocol;
use crate::target::Target;

/// Largest response head accepted from an upstream.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Why an exchange stopped the connection.
pub(super) enum Stop {
    /// Answer the client with this error, then close.
    Answer(ProxyError),
    /// Close without a word (the client left, or a response was cut); the metric outcome.
    Quiet(&'static str),
}

impl From<ProxyError> for Stop {
    fn from(e: ProxyError) -> Self {
        Stop::Answer(e)
    }
}

/// Why one send of a request got no answer to relay.
pub(super) enum Failed {
    /// Nothing reached the client and nothing of the request is lost: it may be sent again.
    /// `fault`: the upstream is to blame (count it, try another).
    Retry { error: ProxyError, fault: bool },
    /// The connection cannot go on.
    Stop(Stop),
}

/// An open connection to the upstream (or, for `direct` and SOCKS5, to the target).
pub(super) struct Upstream {
    pub(super) io: UpstreamIo,
    /// Bytes read from it past the last response.
    pub(super) buf: BytesMut,
    /// The target it reaches (`None`: an HTTP proxy, which takes requests for any target).
    pub(super) bound: Option<Target>,
    /// True once it carried a response (a kept-alive connection may close before the next).
    pub(super) used: bool,
}

/// The client side of a connection switching protocols.
pub(super) struct Switch<'a> {
    pub(super) client: &'a mut TcpStream,
    pub(super) cbuf: &'a mut BytesMut,
    pub(super) bytes: &'a mut Transferred,
}

impl Switch<'_> {
    /// Relays a `101 Switching Protocols` and splices the connection with the upstream.
    pub(super) async fn switch(
        &mut self,
        resp: ResponseHead,
        mut up: Upstream,
        stamp: &HeaderLines,
        cancel: &tokio_util::sync::CancellationToken,
        limits: &crate::config::LimitsConfig,
    ) -> Result<bool, Failed> {
        let mut out = BytesMut::new();
        let rewrite = ResponseRewrite {
            keep_alive: false,
            stamp,
        };
        rewrite
            .write(&resp, &mut out)
            .map_err(|e| stop(ProxyError::upstream(format!("{e}"))))?;
        out.extend_from_slice(&up.buf);
        let sent = self.client.write_all(&out).await.is_ok()
            && (self.cbuf.is_empty() || up.io.write_all(self.cbuf).await.is_ok());
        if !sent {
            return Err(Failed::Stop(Stop::Quiet("client_closed")));
        }
        self.bytes.rx += out.len() as u64;
        self.cbuf.clear();
        let (end, moved) = splice_upstream(self.client, &mut up.io, limits, cancel).await;
        // Closed here, before the caller gives the lease back (max_concurrency).
        drop(up);
        self.bytes.tx += moved.tx;
        self.bytes.rx += moved.rx;
        if end == SpliceEnd::Error {
            reset(self.client);
        }
        Err(Failed::Stop(Stop::Quiet(tunnel::outcome(end))))
    }
}

impl Upstream {
    pub(super) fn new(
        io: UpstreamIo,
        early: bytes::Bytes,
        protocol: &ProxyProtocol,
        target: &Target,
    ) -> Self {
        Self {
            io,
            buf: BytesMut::from(&early[..]),
            bound: (!via_proxy(*protocol)).then(|| target.clone()),
            used: false,
        }
    }
}

/// HTTP and HTTPS upstreams take absolute-form requests for any target; the others give a
/// connection to one target.
pub(super) fn via_proxy(p: ProxyProtocol) -> bool {
    matches!(p, ProxyProtocol::Http | ProxyProtocol::Https)
}

pub(super) fn stop(e: ProxyError) -> Failed {
    Failed::Stop(Stop::Answer(e))
}

/// No answer came: on a reused connection the upstream most likely closed it while idle (send
/// again on a fresh one, no fault); on a fresh one the upstream is to blame.
pub(super) fn no_answer(stale: bool, why: String) -> Failed {
    Failed::Retry {
        error: ProxyError::upstream(why),
        fault: !stale,
    }
}

/// Sends the request body to the upstream. A client that breaks its body's framing gets 400;
/// one that leaves or stalls ends the connection.
pub(super) async fn send_body(
    client: &mut TcpStream,
    cbuf: &mut BytesMut,
    up: &mut Upstream,
    framing: BodyFraming,
    idle: Option<Duration>,
    bytes: &mut Transferred,
) -> Result<(), Failed> {
    match copy_body(client, cbuf, &mut up.io, framing, idle).await {
        Ok(n) => {
            bytes.tx += n;
            Ok(())
        }
        Err(BodyError::Malformed(e)) => Err(stop(e.into())),
        Err(BodyError::Idle) => Err(stop(ProxyError::BadRequest("request body stalled".into()))),
        Err(BodyError::Source(_) | BodyError::Truncated) => {
            Err(Failed::Stop(Stop::Quiet("client_closed")))
        }
        Err(BodyError::Sink(e)) => Err(stop(ProxyError::upstream(format!(
            "sending the request body: {e}"
        )))),
    }
}

/// Why no response head came.
pub(super) enum ReadFail {
    Timeout,
    /// The upstream closed before sending a byte.
    Closed,
    Bad(String),
}

/// Reads a response head before `deadline` ends (its header list made in `spare`).
pub(super) async fn read_response(
    up: &mut Upstream,
    head_request: bool,
    deadline: &mut Deadline,
    spare: &mut Fields,
) -> Result<ResponseHead, ReadFail> {
    let read = async {
        loop {
            // Before the first read the buffer is mostly empty: nothing to parse.
            if !up.buf.is_empty() {
                match take_response_reusing(&mut up.buf, MAX_RESPONSE_HEAD, head_request, spare) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(e) => return Err(ReadFail::Bad(format!("malformed response: {e}"))),
                }
            }
            up.buf.reserve(16 * 1024);
            match up.io.read_buf(&mut up.buf).await {
                Ok(0) if up.buf.is_empty() => return Err(ReadFail::Closed),
                Ok(0) => return Err(ReadFail::Bad("response head cut short".into())),
                Ok(_) => {}
                Err(_) if up.buf.is_empty() => return Err(ReadFail::Closed),
                Err(e) => return Err(ReadFail::Bad(format!("reading the response: {e}"))),
            }
        }
    };
    tokio::select! {
        biased;
        r = read => r,
        () = deadline.elapsed() => Err(ReadFail::Timeout),
    }
}

/// Relays an interim (1xx) response to an HTTP/1.1 client.
pub(super) async fn write_interim(
    client: &mut TcpStream,
    resp: &ResponseHead,
    bytes: &mut Transferred,
) -> Result<(), Failed> {
    let mut out = BytesMut::new();
    ResponseRewrite {
        keep_alive: true,
        stamp: &HeaderLines::new(),
    }
    .write(resp, &mut out)
    .map_err(|e| stop(ProxyError::upstream(format!("interim response: {e}"))))?;
    bytes.rx += out.len() as u64;
    client
        .write_all(&out)
        .await
        .map_err(|_| Failed::Stop(Stop::Quiet("client_closed")))
}

/// Writes the response head and its body to the client: in one write when the whole body is
/// already here, else the head then the body as it comes. A body cut or stalled on the
/// upstream's side ends the client connection with a reset. `out`: an empty buffer to write
/// the head in.
pub(super) async fn relay_response(
    client: &mut TcpStream,
    up: &mut Upstream,
    out: &mut BytesMut,
    resp: &ResponseHead,
    rewrite: &ResponseRewrite<'_>,
    idle: Option<Duration>,
    bytes: &mut Transferred,
) -> Result<(), Failed> {
    rewrite
        .write(resp, out)
        .map_err(|e| stop(ProxyError::upstream(format!("response head: {e}"))))?;
    let framing = resp.framing();
    let whole = whole_body(&up.buf, framing);
    if let Some(n) = whole {
        out.extend_from_slice(&up.buf[..n]);
        up.buf.advance(n);
    }
    bytes.rx += out.len() as u64;
    if client.write_all(out).await.is_err() {
        return Err(Failed::Stop(Stop::Quiet("client_closed")));
    }
    if whole.is_some() {
        return Ok(());
    }
    match copy_body(&mut up.io, &mut up.buf, client, framing, idle).await {
        Ok(n) => {
            bytes.rx += n;
            Ok(())
        }
        Err(BodyError::Sink(_)) => Err(Failed::Stop(Stop::Quiet("client_closed"))),
        Err(e) => {
            debug!(error = %e, "response body cut");
            reset(client);
            Err(Failed::Stop(Stop::Quiet(match e {
                BodyError::Idle => "idle",
                _ => "upstream_failed",
            })))
        }
    }
}

/// How many bytes of `buf` make the whole body, if all of it is there.
pub(super) fn whole_body(buf: &[u8], framing: BodyFraming) -> Option<usize> {
    match framing {
        BodyFraming::None => Some(0),
        BodyFraming::Length(n) => usize::try_from(n).ok().filter(|n| *n <= buf.len()),
        BodyFraming::Chunked => {
            let progress = ChunkedDecoder::new().feed(buf).ok()?;
            progress.done.then_some(progress.consumed)
        }
        BodyFraming::UntilClose => None,
    }
}

/// Makes the next close of `client` a reset (a cut transfer must not look complete).
pub(super) fn reset(client: &TcpStream) {
    let _ = socket2::SockRef::from(client).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_bodies_are_found_in_the_buffer() {
        assert_eq!(whole_body(b"abc", BodyFraming::None), Some(0));
        assert_eq!(whole_body(b"abcdef", BodyFraming::Length(3)), Some(3));
        assert_eq!(whole_body(b"ab", BodyFraming::Length(3)), None);
        assert_eq!(
            whole_body(b"3\r\nabc\r\n0\r\n\r\nGET", BodyFraming::Chunked),
            Some(13)
        );
        assert_eq!(whole_body(b"3\r\nabc\r\n", BodyFraming::Chunked), None);
        assert_eq!(whole_body(b"x\r\n", BodyFraming::Chunked), None);
        assert_eq!(whole_body(b"abc", BodyFraming::UntilClose), None);
    }
}
