//! Plain HTTP (absolute-form requests, `GET http://host/path`) with keep-alive, relayed by
//! pharox's own HTTP/1 code ([`http1`](super::http1)): heads are parsed strictly and rebuilt
//! from their validated parts, bodies pass through byte for byte by their framing.
//!
//! A connection leases one upstream at its first request and keeps it for every request after
//! (a request with another identity swaps the lease); the lease is released when the
//! connection ends. Per request:
//!
//! - the head is read within `limits.max_head_bytes` and `limits.head_timeout_ms` (the wait
//!   for the first byte of a later request is the idle timeout), its identity checked, and
//!   the head rewritten for the upstream (absolute form with the upstream's credentials for
//!   an HTTP proxy, origin form for `direct` and SOCKS5; `Host` from the URI; hop-by-hop,
//!   `Proxy-Authorization` and `X-Pharox-*` removed);
//! - the request body goes to the upstream (after a `100 Continue`, or after a second without
//!   an answer, for `Expect: 100-continue`), then the response head is awaited for at most
//!   `limits.response_timeout_ms` (504 `upstream_timeout`), interim responses are relayed, and
//!   the response goes to the client stamped with `X-Pharox-Proxy-Id` / `X-Pharox-Lease-Id`;
//!   a body that stalls for the idle timeout is cut (with a reset, so it never looks
//!   complete);
//! - a request that reached no upstream's answer is sent again once on a fresh connection, if
//!   it has no body: on the same upstream when its kept-alive connection had closed, on
//!   another when the upstream failed (it refused, closed a new connection, timed out, or
//!   answered 407: our credentials for it are wrong), counting the failure against it;
//! - every error is answered with its code (SPEC §4) and closes the connection.
//!
//! A `101 Switching Protocols` turns the connection into a tunnel through the same lease; a
//! CONNECT on the connection becomes a tunnel with a lease of its own.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::{Span, warn};

use super::connect::client_gone;
use super::deadline::Deadline;
use super::exchange::{
    Failed, ReadFail, Stop, Switch, Upstream, no_answer, read_response, relay_response, send_body,
    stop, via_proxy, write_interim,
};
use super::head::{HeadError, read_request};
use super::held::LeaseUse;
use super::http1::{
    AbsoluteUri, BodyFraming, Fields, HeaderLines, Kind, RequestHead, RequestRewrite,
    ResponseRewrite, Scheme, TargetForm,
};
use super::splice::{HALF_CLOSE_GRACE, Transferred};
use super::upstream::{DialError, basic_auth};
use super::woken::Woken;
use super::{DialMode, ProxyState, Runtime, finish, identify, log_error, record_identity};
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::model::ProxyId;
use crate::target::{Host, Target};

/// How long an `Expect: 100-continue` request waits for the upstream's answer before its
/// body is sent anyway (as clients do).
const EXPECT_WAIT: Duration = Duration::from_secs(1);
/// Sends of one request at most (the first and the resends).
const MAX_SENDS: usize = 3;

/// Serves the rest of a connection whose first request head has been read (`buf`: what the
/// client sent after it).
pub async fn serve(
    state: Arc<ProxyState>,
    rt: Arc<Runtime>,
    mut client: TcpStream,
    head: RequestHead,
    buf: BytesMut,
) {
    let started = Instant::now();
    Span::current().record("kind", "http");
    let mut relay = Relay {
        state: &state,
        rt: &rt,
        client: &mut client,
        cbuf: buf,
        lease: None,
        known: None,
        target: None,
        drained: Woken::new(state.drain.clone().cancelled_owned()),
        out: BytesMut::new(),
        deadline: Deadline::default(),
        spare_request: Fields::new(),
        spare_response: Fields::new(),
        bytes: Transferred::default(),
    };
    let end = relay.run(head).await;
    let pool = relay
        .lease
        .as_ref()
        .map(|l| l.lease.held().lease().pool_name.clone());
    let bytes = relay.bytes;
    let cbuf = std::mem::take(&mut relay.cbuf);
    drop(relay);
    match end {
        End::Done(outcome) => finish(&state, "http", pool.as_deref(), outcome, bytes, started),
        End::Connect(head) => {
            finish(&state, "http", pool.as_deref(), "ok", bytes, started);
            // A CONNECT after plain requests: their lease went back with the relay, and the
            // connection becomes a tunnel with a lease of its own.
            Box::pin(super::connect::handle(state, rt, client, head, cbuf)).await;
        }
    }
}

/// How a relayed connection ended.
enum End {
    /// Closed; the metric outcome.
    Done(&'static str),
    /// A CONNECT came: the connection becomes a tunnel.
    Connect(RequestHead),
}

/// The connection's lease and what comes with it.
struct Leased {
    /// The identity the lease was taken for.
    key: Arc<str>,
    lease: LeaseUse,
    /// Header lines every response of this lease carries.
    stamp: HeaderLines,
    /// `Proxy-Authorization` for the upstream (an HTTP proxy with credentials), or nothing.
    auth: HeaderLines,
    upstream: Option<Upstream>,
    /// Resolves when the lease is lost; waited on by every request of the lease, so it stays
    /// registered with the lease's token instead of registering anew for each request.
    /// Taken out while a request runs.
    lost: Option<Woken<WaitForCancellationFutureOwned>>,
}

impl Drop for Leased {
    fn drop(&mut self) {
        // The upstream connection closes before the lease is given back: the next holder of
        // the slot must never find this connection still open (max_concurrency).
        self.upstream = None;
    }
}

impl Leased {
    /// `lines`: the lease's stamp and the upstream's credentials ([`lease_lines`]).
    fn new(key: Arc<str>, lease: LeaseUse, (stamp, auth): (HeaderLines, HeaderLines)) -> Self {
        Self {
            stamp,
            auth,
            lost: Some(Woken::new(lease.cancelled().clone().cancelled_owned())),
            key,
            lease,
            upstream: None,
        }
    }
}

/// A lease's stamp and its upstream's `Proxy-Authorization`, checked once as header lines;
/// one that cannot be (a stored id with a control byte) fails the request.
fn lease_lines(lease: &LeaseUse) -> Result<(HeaderLines, HeaderLines), ProxyError> {
    let bad = |e| ProxyError::upstream(format!("{}: {e}", lease.proxy().id));
    let mut stamp = HeaderLines::new();
    for (name, value) in lease.stamp() {
        stamp.push(name.as_bytes(), value.as_bytes()).map_err(bad)?;
    }
    let mut auth = HeaderLines::new();
    if via_proxy(lease.proxy().protocol)
        && let Some(credentials) = basic_auth(lease.proxy())
    {
        auth.push(b"Proxy-Authorization", credentials.as_bytes())
            .map_err(bad)?;
    }
    Ok((stamp, auth))
}

/// An identity already authenticated on this connection: a request with the same
/// `Proxy-Authorization` and `X-Pharox-*` headers has the same identity (the runtime is the
/// connection's snapshot), so keep-alive requests skip decoding and the password check.
struct Known {
    auth: Option<Vec<u8>>,
    pharox: Vec<(Vec<u8>, Vec<u8>)>,
    /// Shared with each request's exchange: one count, not a copy of its names.
    id: Arc<Identity>,
    key: Arc<str>,
}

impl Known {
    fn matches(&self, head: &RequestHead) -> bool {
        self.auth.as_deref() == head.field(Kind::ProxyAuthorization)
            && self
                .pharox
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .eq(pharox_headers(head))
    }
}

/// The relay's buffer for outgoing heads, emptied; one that grew past [`KEPT_SCRATCH`] (a
/// large head, or a body sent with its head) is let go rather than held while idle.
fn scratch(out: &mut BytesMut) -> &mut BytesMut {
    if out.capacity() > KEPT_SCRATCH {
        *out = BytesMut::new();
    }
    out.clear();
    out
}

/// Largest head buffer a keep-alive connection keeps between requests.
const KEPT_SCRATCH: usize = 8 * 1024;

/// Resolves when the lease of `waiting` is lost; never without one.
async fn lost(waiting: Option<&mut Woken<WaitForCancellationFutureOwned>>) {
    match waiting {
        Some(w) => w.await,
        None => std::future::pending().await,
    }
}

/// The `X-Pharox-*` headers of a request, in order.
fn pharox_headers(head: &RequestHead) -> impl Iterator<Item = (&[u8], &[u8])> {
    let any = head.has_pharox_headers();
    head.fields()
        .take_while(move |_| any)
        .filter(|(kind, name, _)| *kind == Kind::Pharox && name.len() > 9)
        .map(|(_, name, value)| (name, value))
}

/// The target of an authority as a request sent it.
struct KnownTarget {
    authority: String,
    target: Target,
}

/// One client connection being relayed.
struct Relay<'a> {
    state: &'a Arc<ProxyState>,
    rt: &'a Runtime,
    client: &'a mut TcpStream,
    /// Bytes read from the client past the current head.
    cbuf: BytesMut,
    lease: Option<Leased>,
    known: Option<Known>,
    /// The last request's target.
    target: Option<Arc<KnownTarget>>,
    /// The timer of the connection's waits.
    deadline: Deadline,
    /// Header lists of the last request and response, for the next ones.
    spare_request: Fields,
    spare_response: Fields,
    /// Where outgoing heads are written (kept from one request to the next).
    out: BytesMut,
    /// Resolves when the daemon drains (registered once for the connection).
    drained: Woken<WaitForCancellationFutureOwned>,
    /// tx: bytes from the client; rx: bytes to it.
    bytes: Transferred,
}

impl Relay<'_> {
    async fn run(&mut self, first: RequestHead) -> End {
        let mut head = first;
        loop {
            if head.method_is("CONNECT") {
                return End::Connect(head);
            }
            self.bytes.tx += head.raw().len() as u64;
            let exchanged = self.exchange(&head).await;
            // The head goes before the next read: its bytes are the read buffer's, which the
            // read can then reuse in place, and its header list serves the next head.
            self.spare_request = head.into_fields();
            match exchanged {
                Ok(true) => {}
                Ok(false) => return End::Done("ok"),
                Err(Stop::Quiet(outcome)) => return End::Done(outcome),
                Err(Stop::Answer(e)) => return End::Done(self.answer(&e).await),
            }
            head = match self.next_request().await {
                Ok(Some(h)) => h,
                Ok(None) => return End::Done("ok"),
                Err(Stop::Quiet(outcome)) => return End::Done(outcome),
                Err(Stop::Answer(e)) => return End::Done(self.answer(&e).await),
            };
        }
    }

    /// Waits for the next request of a keep-alive connection; `None` when the client closes,
    /// stays idle, or the daemon drains.
    async fn next_request(&mut self) -> Result<Option<RequestHead>, Stop> {
        let limits = self.rt.limits();
        let lost = lost(self.lease.as_mut().and_then(|l| l.lost.as_mut()));
        let read = read_request(
            &mut *self.client,
            &mut self.cbuf,
            limits.max_head_bytes,
            &mut self.deadline,
            limits.idle_timeout(),
            limits.head_timeout(),
            &mut self.spare_request,
        );
        // The read first: a request already here is served without polling the other two
        // (the exchange checks the lease again before sending it).
        tokio::select! {
            biased;
            r = read => match r {
                Ok(head) => Ok(head),
                Err(HeadError::Closed | HeadError::Io(_)) => Ok(None),
                Err(HeadError::Bad(e)) => Err(Stop::Answer(e)),
            },
            () = &mut self.drained => Ok(None),
            () = lost => Err(Stop::Quiet("closed_by_proxy")),
        }
    }

    /// Writes an error answer (which closes the connection); returns its code.
    async fn answer(&mut self, e: &ProxyError) -> &'static str {
        log_error(e);
        let text = e.to_http();
        self.bytes.rx += text.len() as u64;
        let _ = self.client.write_all(text.as_bytes()).await;
        super::close_gracefully(self.client).await;
        e.code()
    }

    /// The request's identity: the connection's known one if the request carries the same
    /// credentials and identity headers, else authenticated afresh (and remembered).
    fn identity(&mut self, head: &RequestHead) -> Result<(Arc<Identity>, Arc<str>), ProxyError> {
        if let Some(k) = &self.known
            && k.matches(head)
        {
            return Ok((k.id.clone(), k.key.clone()));
        }
        let id = Arc::new(identify(&self.rt.auth, head)?);
        let key: Arc<str> = Arc::from(format!(
            "{}\n{}\n{:?}\n{:?}",
            id.consumer,
            id.pool,
            id.filter.as_ref().map(|f| f.index_key()),
            id.session
        ));
        self.known = Some(Known {
            auth: head.field(Kind::ProxyAuthorization).map(<[u8]>::to_vec),
            pharox: pharox_headers(head)
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect(),
            id: id.clone(),
            key: key.clone(),
        });
        Ok((id, key))
    }

    /// One request and its response. True when the connection stays open for another.
    async fn exchange(&mut self, head: &RequestHead) -> Result<bool, Stop> {
        let known = self.target.as_deref().map(|t| t.authority.as_str());
        let uri = head.absolute_uri_known(known).map_err(ProxyError::from)?;
        if uri.scheme == Scheme::Https {
            return Err(Stop::Answer(ProxyError::BadRequest(
                "only http:// URLs are forwarded; use CONNECT for https".into(),
            )));
        }
        // Keep-alive requests mostly go to the authority of the one before: its target is
        // reused rather than parsed again.
        let target = match &self.target {
            Some(t) if t.authority == uri.authority => t.clone(),
            _ => {
                let target = Arc::new(KnownTarget {
                    authority: uri.authority.to_owned(),
                    target: Target::new(Host::parse(uri.host)?, uri.port)?,
                });
                self.target = Some(target.clone());
                target
            }
        };
        let target = &target.target;
        let (id, key) = self.identity(head)?;
        if self.lease.as_ref().is_some_and(|l| l.key != key) {
            self.lease = None; // another identity: give the lease back
        }
        let resendable = head.framing() == BodyFraming::None;
        let mut failed: Vec<ProxyId> = Vec::new();
        let mut last: Option<ProxyError> = None;
        for send in 1..=MAX_SENDS {
            match self.ensure_upstream(&id, &key, target, &mut failed).await {
                Ok(()) => {}
                // Every upstream left was tried: the answer is what the last one did.
                Err(Stop::Answer(ProxyError::PoolExhausted { .. })) if last.is_some() => {
                    return Err(Stop::Answer(last.take().expect("checked")));
                }
                Err(stop) => return Err(stop),
            }
            let mut waiting = self.leased().lost.take();
            let sent = tokio::select! {
                biased;
                () = lost(waiting.as_mut()) => return Err(Stop::Quiet("closed_by_proxy")),
                r = self.send(head, &uri) => r,
            };
            self.leased().lost = waiting;
            match sent {
                Ok(keep) => return Ok(keep),
                Err(Failed::Stop(stop)) => return Err(stop),
                Err(Failed::Retry { error, fault }) => {
                    let leased = self.leased();
                    leased.upstream = None;
                    if fault {
                        let proxy = leased.lease.proxy().id.clone();
                        self.upstream_failed(&id, &proxy, &error).await;
                        failed.push(proxy);
                        self.lease = None;
                    }
                    if !resendable || send == MAX_SENDS {
                        return Err(Stop::Answer(error));
                    }
                    last = Some(error);
                }
            }
        }
        unreachable!("the last send returns")
    }

    fn leased(&mut self) -> &mut Leased {
        self.lease
            .as_mut()
            .expect("a lease is held once an upstream is open")
    }

    /// Counts an upstream's failure to answer.
    async fn upstream_failed(&self, id: &Identity, proxy: &ProxyId, error: &ProxyError) {
        warn!(%proxy, pool = %id.pool, error = %error, "upstream failed a plain-HTTP request");
        let reason = match error {
            ProxyError::UpstreamTimeout(_) => "timeout",
            _ => "refused",
        };
        self.state.metrics.upstream_failure(&id.pool, reason);
        if let Some(pool) = self.rt.pools.get(&id.pool) {
            self.state.record_failure(proxy, &pool.health).await;
        }
    }

    /// Makes sure the connection has a lease and an open upstream connection for `target`:
    /// reuses them if possible, re-dials through the same lease, and otherwise gives the
    /// lease back (counting the failure) and takes another.
    async fn ensure_upstream(
        &mut self,
        id: &Identity,
        key: &Arc<str>,
        target: &Target,
        failed: &mut Vec<ProxyId>,
    ) -> Result<(), Stop> {
        if let Some(l) = &mut self.lease {
            if l.upstream
                .as_ref()
                .is_some_and(|u| u.bound.as_ref().is_none_or(|b| b == target))
            {
                return Ok(());
            }
            l.upstream = None;
            let proxy = l.lease.proxy().clone();
            // Dials and leases are boxed (here and below): their state would otherwise size
            // the connection's future for its whole life, idle keep-alive time included.
            match Box::pin(self.state.dial(self.rt, &proxy, target, DialMode::Forward)).await {
                Ok((io, early)) => {
                    l.upstream = Some(Upstream::new(io, early, &proxy.protocol, target));
                    return Ok(());
                }
                Err(e @ (DialError::Denied(_) | DialError::Local(_))) => {
                    return Err(Stop::Answer(
                        e.into_proxy_error(proxy.id.to_string(), false),
                    ));
                }
                Err(e) => {
                    warn!(proxy = %proxy.id, error = %e, "upstream of a keep-alive connection failed");
                    self.state.metrics.upstream_failure(&id.pool, e.reason());
                    if e.is_upstream_fault(proxy.protocol)
                        && let Some(pool) = self.rt.pools.get(&id.pool)
                    {
                        self.state.record_failure(&proxy.id, &pool.health).await;
                    }
                    failed.push(proxy.id.clone());
                    self.lease = None;
                }
            }
        }
        let (lease, io, early) =
            Box::pin(
                self.state
                    .lease_and_dial(self.rt, id, target, DialMode::Forward, failed),
            )
            .await?;
        record_identity(id, target, Some(&lease.proxy().id));
        let protocol = lease.proxy().protocol;
        let lines = match lease_lines(&lease) {
            Ok(lines) => lines,
            Err(e) => {
                // The fresh upstream connection closes before the lease goes back.
                drop(io);
                drop(lease);
                return Err(e.into());
            }
        };
        let mut leased = Leased::new(key.clone(), lease, lines);
        leased.upstream = Some(Upstream::new(io, early, &protocol, target));
        self.lease = Some(leased);
        Ok(())
    }

    /// Sends the request on the current upstream connection and relays the answer.
    async fn send(&mut self, head: &RequestHead, uri: &AbsoluteUri<'_>) -> Result<bool, Failed> {
        let limits = self.rt.limits();
        let idle = limits.idle_timeout();
        let Leased {
            lease,
            stamp,
            auth,
            upstream,
            ..
        } = self.lease.as_mut().expect("ensured");
        let up = upstream.as_mut().expect("ensured");
        let rewrite = RequestRewrite {
            form: match up.bound {
                None => TargetForm::Absolute,
                Some(_) => TargetForm::Origin,
            },
            keep_alive: head.keep_alive(),
            added: auth,
        };
        let out = scratch(&mut self.out);
        rewrite
            .write(head, uri, out)
            .map_err(|e| stop(ProxyError::BadRequest(format!("request head: {e}"))))?;
        let stale = up.used;
        if let Err(e) = up.io.write_all(out).await {
            return Err(no_answer(stale, format!("sending the request: {e}")));
        }
        // The body: at once, or once the upstream agreed to it.
        let framing = head.framing();
        let mut body_sent = framing == BodyFraming::None;
        if !body_sent && !head.expect_continue() {
            send_body(
                &mut *self.client,
                &mut self.cbuf,
                up,
                framing,
                idle,
                &mut self.bytes,
            )
            .await?;
            body_sent = true;
        }
        let head_request = head.method_is("HEAD");
        let via_proxy = up.bound.is_none();
        let mut client_done = false;
        let resp = loop {
            let wait = if body_sent {
                limits.response_timeout()
            } else {
                EXPECT_WAIT
            };
            // A client that half-closes after its request still gets the answer, if it comes
            // within the grace a half-closed tunnel gets; one that left holds its lease no
            // longer than that.
            let deadline = &mut self.deadline;
            deadline.set_after(Some(wait));
            let read = loop {
                tokio::select! {
                    biased;
                    r = read_response(up, head_request, deadline, &mut self.spare_response) => break r,
                    () = client_gone(self.client), if !client_done => {
                        client_done = true;
                        let grace = Instant::now() + HALF_CLOSE_GRACE;
                        deadline.set(deadline.at().map(|at| at.min(grace)));
                    }
                }
            };
            if client_done && matches!(read, Err(ReadFail::Timeout)) {
                return Err(Failed::Stop(Stop::Quiet("client_closed")));
            }
            let resp = match read {
                Ok(r) => r,
                Err(ReadFail::Timeout) if !body_sent => {
                    send_body(
                        &mut *self.client,
                        &mut self.cbuf,
                        up,
                        framing,
                        idle,
                        &mut self.bytes,
                    )
                    .await?;
                    body_sent = true;
                    continue;
                }
                Err(ReadFail::Timeout) => {
                    return Err(Failed::Retry {
                        error: ProxyError::UpstreamTimeout(format!(
                            "{}: no response within {:?}",
                            lease.proxy().id,
                            wait
                        )),
                        fault: true,
                    });
                }
                Err(ReadFail::Closed) => {
                    return Err(no_answer(stale, "closed without answering".into()));
                }
                Err(ReadFail::Bad(why)) => {
                    return Err(Failed::Retry {
                        error: ProxyError::upstream(format!("{}: {why}", lease.proxy().id)),
                        fault: true,
                    });
                }
            };
            if via_proxy && resp.code() == 407 {
                return Err(Failed::Retry {
                    error: ProxyError::upstream(format!(
                        "{}: rejected our credentials (407)",
                        lease.proxy().id
                    )),
                    fault: true,
                });
            }
            if resp.is_interim() && !resp.is_switching_protocols() {
                if head.version() == 1 {
                    write_interim(&mut *self.client, &resp, &mut self.bytes).await?;
                }
                if resp.code() == 100 && !body_sent {
                    send_body(
                        &mut *self.client,
                        &mut self.cbuf,
                        up,
                        framing,
                        idle,
                        &mut self.bytes,
                    )
                    .await?;
                    body_sent = true;
                }
                continue;
            }
            break resp;
        };
        // A final answer before the body: the client may still send it; this connection
        // cannot carry another request.
        let early_final = !body_sent;
        up.used = true;
        if resp.is_switching_protocols() {
            let up = upstream.take().expect("open");
            let cancel = lease.cancelled().clone();
            let mut to = Switch {
                client: &mut *self.client,
                cbuf: &mut self.cbuf,
                bytes: &mut self.bytes,
            };
            return to.switch(resp, up, stamp, &cancel, limits).await;
        }
        let keep_client = head.keep_alive()
            && !early_final
            && !client_done
            && resp.framing() != BodyFraming::UntilClose
            && !self.state.drain.is_cancelled();
        let keep_upstream = resp.keep_alive() && head.keep_alive() && !early_final;
        relay_response(
            &mut *self.client,
            up,
            scratch(&mut self.out),
            &resp,
            &ResponseRewrite {
                keep_alive: keep_client,
                stamp,
            },
            idle,
            &mut self.bytes,
        )
        .await?;
        self.spare_response = resp.into_fields();
        if !keep_upstream {
            *upstream = None;
        }
        Ok(keep_client)
    }
}
