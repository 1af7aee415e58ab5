//! Plain HTTP (absolute-form requests) with keep-alive, served by hyper. The connection leases
//! one upstream at its first request and keeps it for every request after (a request with a
//! different identity swaps the lease); the lease is released when the connection ends. A
//! CONNECT later on the same connection becomes a tunnel with a lease of its own.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHORIZATION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug};

use super::head::{Head, Rewind};
use super::headers::{strip_hop_by_hop, strip_identity};
use super::held::LeaseUse;
use super::splice::Transferred;
use super::splice::splice;
use super::target::{Host, Target};
use super::tunnel::outcome;
use super::upstream;
use super::{DialMode, ProxyState, Runtime, finish, log_error, record_identity};
use crate::error::ProxyError;
use crate::identity::Identity;
use crate::model::{ProxyId, ProxyProtocol};

type Body = BoxBody<Bytes, hyper::Error>;

/// What one client connection holds between requests.
#[derive(Default)]
struct ConnLease {
    /// The identity the lease was taken for: (consumer, pool, filter key).
    key: Option<Arc<str>>,
    held: Option<LeaseUse>,
    /// The open upstream connection and the target it is bound to (`None`: an HTTP proxy,
    /// which takes requests for any target).
    sender: Option<(Option<Target>, SendRequest<Body>)>,
    /// The pool of the lease, for metrics.
    pool: Option<Arc<str>>,
    /// The code of the last refused request, for metrics.
    last_error: Option<&'static str>,
    /// Headers every response of this lease carries (`X-Pharox-Proxy-Id`, ...).
    stamp: Vec<(HeaderName, HeaderValue)>,
    /// `Proxy-Authorization` for the leased upstream, if it is an HTTP proxy with credentials.
    upstream_auth: Option<HeaderValue>,
    /// The last identity that authenticated on this connection, and what it came from.
    known: Option<Known>,
}

/// An identity already authenticated on this connection: a request with the same
/// `Proxy-Authorization` and `X-Pharox-*` headers has the same identity (the runtime is the
/// connection's snapshot), so keep-alive requests skip decoding and the password check.
struct Known {
    auth: Option<HeaderValue>,
    pharox: Vec<(HeaderName, HeaderValue)>,
    id: Identity,
    key: Arc<str>,
}

impl ConnLease {
    /// Takes `held` for this connection: the response stamp and upstream credentials are
    /// computed once per lease.
    fn take(&mut self, held: LeaseUse, key: Arc<str>, pool: Arc<str>) {
        self.stamp = stamp(&held);
        self.upstream_auth = upstream::basic_auth(held.proxy()).and_then(|a| {
            let mut v = HeaderValue::from_str(&a).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        self.held = Some(held);
        self.key = Some(key);
        self.pool = Some(pool);
    }

    /// Gives the lease (and the upstream connection) back, keeping the known identity.
    fn clear(&mut self) {
        let known = self.known.take();
        *self = ConnLease::default();
        self.known = known;
    }
}

/// The `X-Pharox-*` headers of a request, in order.
fn pharox_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("x-pharox-"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Counts the bytes a client connection reads and writes.
struct Metered<T> {
    inner: T,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves the rest of a connection whose first head has been read.
pub async fn serve(state: Arc<ProxyState>, rt: Arc<Runtime>, stream: TcpStream, head: Head) {
    let started = Instant::now();
    Span::current().record("kind", "http");
    let mut prefix = head.raw.to_vec();
    prefix.extend_from_slice(&head.rest);
    let (read, written) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let metered = Metered {
        inner: Rewind::new(Bytes::from(prefix), stream),
        read: read.clone(),
        written: written.clone(),
    };
    let conn_lease = Arc::new(Mutex::new(ConnLease::default()));
    // Cancelled at hard shutdown, or when an operator closes this connection's lease.
    let cancel = CancellationToken::new();
    let service = service_fn({
        let (state, rt, conn_lease, cancel) = (
            state.clone(),
            rt.clone(),
            conn_lease.clone(),
            cancel.clone(),
        );
        move |req| {
            let (state, rt, conn_lease, cancel) = (
                state.clone(),
                rt.clone(),
                conn_lease.clone(),
                cancel.clone(),
            );
            async move { Ok::<_, Infallible>(handle(state, rt, conn_lease, cancel, req).await) }
        }
    });
    let limits = rt.limits();
    // The hyper connection owns the in-flight request's future, which holds `conn_lease`:
    // it must be dropped (here, at the end of this block) before the lease is looked at, or a
    // client leaving mid-request would leave this task waiting on its own lock.
    let mut outcome = {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.head_timeout())
            .max_buf_size(limits.max_head_bytes.max(8192))
            .preserve_header_case(true)
            .title_case_headers(true)
            .serve_connection(TokioIo::new(metered), service)
            .with_upgrades();
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            tokio::select! {
                biased;
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(error = %e, "client connection ended with an error");
                        break "error";
                    }
                    break "ok";
                }
                () = state.drain.cancelled(), if !draining => {
                    // Finish the request in flight, then close.
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                () = cancel.cancelled() => break "closed_by_proxy",
            }
        }
    };
    let mut lease = conn_lease.lock().await;
    let pool = lease.pool.clone();
    if outcome == "ok" && pool.is_none() {
        outcome = lease.last_error.unwrap_or("ok");
    }
    *lease = ConnLease::default();
    drop(lease);
    let bytes = Transferred {
        tx: read.load(Ordering::Relaxed),
        rx: written.load(Ordering::Relaxed),
    };
    cancel.cancel(); // ends the lease watcher, if one runs
    finish(&state, "http", pool.as_deref(), outcome, bytes, started);
}

async fn handle(
    state: Arc<ProxyState>,
    rt: Arc<Runtime>,
    conn: Arc<Mutex<ConnLease>>,
    cancel: CancellationToken,
    req: Request<Incoming>,
) -> Response<Body> {
    let result = if req.method() == Method::CONNECT {
        tunnel(&state, &rt, req).await
    } else {
        forward(&state, &rt, &conn, cancel, req).await
    };
    result.unwrap_or_else(|e| {
        if let Ok(mut c) = conn.try_lock() {
            c.last_error = Some(e.code());
        }
        log_error(&e);
        error_response(&e)
    })
}

/// The request's identity: the connection's known one if the request carries the same
/// credentials and identity headers, else authenticated afresh (and remembered).
fn known_identity(
    rt: &Runtime,
    conn: &mut ConnLease,
    req: &Request<Incoming>,
) -> Result<(Identity, Arc<str>), ProxyError> {
    let auth = req.headers().get(PROXY_AUTHORIZATION);
    let pharox = pharox_headers(req.headers());
    if let Some(k) = &conn.known
        && k.auth.as_ref() == auth
        && k.pharox == pharox
    {
        return Ok((k.id.clone(), k.key.clone()));
    }
    let id = identify(rt, req)?;
    let key: Arc<str> = Arc::from(format!(
        "{}\n{}\n{:?}\n{:?}",
        id.consumer,
        id.pool,
        id.filter.as_ref().map(|f| f.index_key()),
        id.session
    ));
    conn.known = Some(Known {
        auth: auth.cloned(),
        pharox,
        id: id.clone(),
        key: key.clone(),
    });
    Ok((id, key))
}

fn identify(rt: &Runtime, req: &Request<Incoming>) -> Result<Identity, ProxyError> {
    let headers = req.headers();
    let lookup = |name: &str| headers.get(name).map(HeaderValue::as_bytes);
    rt.auth.identify(
        headers.get(PROXY_AUTHORIZATION).map(HeaderValue::as_bytes),
        &lookup,
    )
}

/// CONNECT on a connection already served by hyper: lease and dial, answer 200, then splice
/// the upgraded connection in a task that owns the lease.
async fn tunnel(
    state: &Arc<ProxyState>,
    rt: &Runtime,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let started = Instant::now();
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let target = Target::parse_authority(&authority)?;
    let id = identify(rt, &req)?;
    let (held, mut upstream, early) = state
        .lease_and_dial(rt, &id, &target, DialMode::Tunnel, &[])
        .await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let response = success(Response::new(empty()), &held);
    let (state2, idle) = (state.clone(), rt.limits().idle_timeout());
    let span = tracing::info_span!("tunnel", consumer = %id.consumer, pool = %id.pool, proxy = %held.proxy().id, target = %target.authority());
    state.tracker.spawn(
        async move {
            let state = state2;
            let spliced = async {
                let mut client = TokioIo::new(on_upgrade.await.ok()?);
                if !early.is_empty() {
                    tokio::io::AsyncWriteExt::write_all(&mut client, &early)
                        .await
                        .ok()?;
                }
                Some(splice(&mut client, &mut upstream, idle, held.cancelled()).await)
            }
            .await;
            drop(held);
            let (how, bytes) = match spliced {
                Some((end, bytes)) => (outcome(end), bytes),
                None => ("client_closed", Transferred::default()),
            };
            finish(&state, "connect", Some(&id.pool), how, bytes, started);
        }
        .instrument(span),
    );
    Ok(response)
}

async fn forward(
    state: &Arc<ProxyState>,
    rt: &Runtime,
    conn: &Mutex<ConnLease>,
    cancel: CancellationToken,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("http") {
        return Err(ProxyError::BadRequest(
            "only http:// URLs are forwarded; use CONNECT for https".into(),
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| ProxyError::BadRequest("URL without a host".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let target = Target::new(Host::parse(&host)?, uri.port_u16().unwrap_or(80))?;
    let mut guard = conn.lock().await;
    let conn = &mut *guard;
    let (id, key) = known_identity(rt, conn, &req)?;
    if conn.key.as_deref() != Some(&*key) {
        conn.clear(); // releases a lease taken for another identity
    }
    // A keep-alive upstream connection can close just as a request goes out. A request that
    // was never sent, or a bodiless idempotent one, is sent again once, on a fresh connection
    // (failing over if need be).
    let replay = replayable(&req);
    let mut req = req.map(|b| b.boxed());
    let mut resp = None;
    let mut failed: Vec<ProxyId> = Vec::new();
    for attempt in 0..3 {
        let fresh = ensure_sender(
            state,
            rt,
            conn,
            &cancel,
            &id,
            key.clone(),
            &target,
            &mut failed,
        )
        .await?;
        let held = conn
            .held
            .as_ref()
            .expect("a lease is held once a sender exists");
        prepare_request(&mut req, &uri, &target, held, conn.upstream_auth.as_ref())?;
        let (_, sender) = conn.sender.as_mut().expect("sender set above");
        let sent = match sender.ready().await {
            Ok(()) => sender.try_send_request(req).await,
            Err(e) => {
                return Err(ProxyError::upstream(format!("upstream connection: {e}")));
            }
        };
        let mut e = match sent {
            Ok(r) => {
                resp = Some(r);
                break;
            }
            Err(e) => e,
        };
        req = match (e.take_message(), &replay) {
            (Some(unsent), _) if attempt < 2 => unsent,
            (None, Some(parts)) if attempt < 2 => rebuild(parts),
            _ => {
                return Err(ProxyError::upstream(format!(
                    "upstream request: {}",
                    e.error()
                )));
            }
        };
        conn.sender = None;
        if fresh {
            // A connection just made failed at once: the upstream is at fault; try another.
            let proxy = conn.held.as_ref().map(|h| h.proxy().id.clone());
            if let (Some(proxy), Some(pool)) = (proxy, rt.pools.get(&id.pool)) {
                tracing::warn!(%proxy, error = %e.error(), "upstream closed a new connection");
                state.metrics.upstream_failure(&id.pool, "refused");
                state.record_failure(&proxy, &pool.health).await;
                failed.push(proxy);
            }
            conn.clear();
        }
    }
    let mut resp = resp.ok_or_else(|| ProxyError::upstream("upstream connection closed"))?;
    strip_hop_by_hop(resp.headers_mut());
    // Our side of the connection speaks HTTP/1.1 whatever the origin spoke (an HTTP/1.0
    // origin must not close the client's keep-alive connection and its lease).
    *resp.version_mut() = hyper::Version::HTTP_11;
    let h = resp.headers_mut();
    for (k, v) in &conn.stamp {
        h.insert(k, v.clone());
    }
    Ok(resp.map(|b| b.boxed()))
}

/// The parts of a bodiless idempotent request, to send it again.
fn replayable(req: &Request<Incoming>) -> Option<(Method, Uri, HeaderMap)> {
    use hyper::body::Body as _;
    let idempotent = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    (idempotent && req.body().is_end_stream()).then(|| {
        (
            req.method().clone(),
            req.uri().clone(),
            req.headers().clone(),
        )
    })
}

fn rebuild((method, uri, headers): &(Method, Uri, HeaderMap)) -> Request<Body> {
    let mut req = Request::new(empty());
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.headers_mut() = headers.clone();
    req
}

/// Makes sure the connection has a lease and an open upstream connection for `target`:
/// reuses them if possible, re-dials through the same lease if its upstream still answers,
/// and otherwise gives the lease back (counting the failure) and takes another. True when
/// the upstream connection is new.
#[allow(clippy::too_many_arguments)]
async fn ensure_sender(
    state: &Arc<ProxyState>,
    rt: &Runtime,
    conn: &mut ConnLease,
    cancel: &CancellationToken,
    id: &Identity,
    key: Arc<str>,
    target: &Target,
    failed: &mut Vec<ProxyId>,
) -> Result<bool, ProxyError> {
    let reusable = conn.sender.as_ref().is_some_and(|(bound, sender)| {
        !sender.is_closed() && bound.as_ref().is_none_or(|b| b == target)
    });
    if reusable {
        return Ok(false);
    }
    conn.sender = None;
    let mut reused = None;
    if let Some(held) = &conn.held {
        let extra = rt.extras.get(&held.proxy().id).cloned().unwrap_or_default();
        let timeout = rt.limits().connect_timeout();
        match upstream::open_forward(held.proxy(), &extra, target, &rt.policy, timeout).await {
            Ok((io, _)) => reused = Some(io),
            Err(upstream::DialError::Denied(d)) => {
                return Err(ProxyError::DestinationDenied(d.to_string()));
            }
            Err(e) => {
                tracing::warn!(proxy = %held.proxy().id, error = %e, "upstream of a keep-alive connection failed");
                state.metrics.upstream_failure(&id.pool, e.reason());
                if let Some(pool) = rt.pools.get(&id.pool) {
                    state.record_failure(&held.proxy().id, &pool.health).await;
                }
                failed.push(held.proxy().id.clone());
                conn.clear();
            }
        }
    }
    let io = match reused {
        Some(io) => io,
        None => {
            let (held, io, _) = state
                .lease_and_dial(rt, id, target, DialMode::Forward, failed)
                .await?;
            record_identity(id, target, Some(&held.proxy().id));
            // An operator closing this lease closes the whole client connection.
            let (lease_cancel, conn_cancel) = (held.cancelled().clone(), cancel.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = lease_cancel.cancelled() => conn_cancel.cancel(),
                    () = conn_cancel.cancelled() => {}
                }
            });
            conn.take(held, key, id.pool.clone());
            io
        }
    };
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(true)
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| ProxyError::upstream(format!("HTTP handshake: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream HTTP connection ended");
        }
    });
    let via_proxy = conn
        .held
        .as_ref()
        .is_some_and(|h| is_http_proxy(h.proxy().protocol));
    conn.sender = Some(((!via_proxy).then(|| target.clone()), sender));
    Ok(true)
}

/// Rewrites a client request for the leased upstream: headers cleaned, the URI in absolute
/// form for an HTTP proxy (with its credentials) or origin form otherwise, `Host` set.
fn prepare_request(
    req: &mut Request<Body>,
    uri: &Uri,
    target: &Target,
    held: &LeaseUse,
    upstream_auth: Option<&HeaderValue>,
) -> Result<(), ProxyError> {
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    strip_identity(headers);
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_else(|| target.authority());
    if !headers.contains_key(HOST) {
        let host = HeaderValue::from_str(&authority)
            .map_err(|_| ProxyError::BadRequest("bad host".into()))?;
        headers.insert(HOST, host);
    }
    *req.version_mut() = hyper::Version::HTTP_11;
    let proxy = held.proxy();
    if is_http_proxy(proxy.protocol) {
        if let Some(auth) = upstream_auth {
            req.headers_mut().insert(PROXY_AUTHORIZATION, auth.clone());
        }
        *req.uri_mut() = uri.clone();
    } else {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        *req.uri_mut() = path
            .parse()
            .map_err(|_| ProxyError::BadRequest("bad path".into()))?;
    }
    Ok(())
}

fn is_http_proxy(p: ProxyProtocol) -> bool {
    matches!(p, ProxyProtocol::Http | ProxyProtocol::Https)
}

/// The headers that tell a client which upstream and lease served it.
fn stamp(held: &LeaseUse) -> Vec<(HeaderName, HeaderValue)> {
    held.stamp()
        .into_iter()
        .filter_map(|(k, v)| {
            Some((
                HeaderName::from_bytes(k.as_bytes()).ok()?,
                HeaderValue::from_str(&v).ok()?,
            ))
        })
        .collect()
}

fn success(mut resp: Response<Body>, held: &LeaseUse) -> Response<Body> {
    let h = resp.headers_mut();
    for (k, v) in stamp(held) {
        h.insert(k, v);
    }
    resp
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// The error table as a hyper response.
pub fn error_response(e: &ProxyError) -> Response<Body> {
    let mut builder = Response::builder()
        .status(e.status())
        .header("x-pharox-error", e.code())
        .header("content-type", "text/plain; charset=utf-8");
    for (k, v) in e.extra_headers() {
        builder = builder.header(k, v);
    }
    builder
        .body(
            Full::new(Bytes::from(e.body()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static parts are valid")
}
