//! The admin listener: probes, metrics and the operations API, on its own port so that
//! probes and scrapes never need proxy credentials.
//!
//! - `GET /healthz` (the process is up), `GET /readyz` (the proxy port accepts), `GET /metrics`
//!   (Prometheus text) — open.
//! - `/api/v1/…` — JSON, behind `Authorization: Bearer TOKEN` when `admin.token` is set:
//!   `GET pools`, `GET pools/{name}`, `GET leases`, `DELETE leases/{id}`,
//!   `PUT proxies/{id}/status`, `POST reload`, `GET sessions`,
//!   `DELETE sessions/{consumer}/{pool}/{id}`. Errors are `{"error": "..."}`.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::model::{LeaseId, ProxyId, ProxyInfo, ProxyStatus, unix_seconds};
use crate::proxy::ProxyState;
use crate::reload;
use crate::storage::Storage;

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// Admin-side state.
#[derive(Debug, Default)]
pub struct AdminState {
    /// Set while the proxy listener accepts connections.
    pub ready: AtomicBool,
    /// The file `POST /api/v1/reload` and SIGHUP re-read.
    pub config_path: Option<PathBuf>,
}

impl AdminState {
    /// Not ready yet; reloads read `config_path`.
    pub fn new(config_path: Option<PathBuf>) -> Self {
        Self {
            ready: AtomicBool::new(false),
            config_path,
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Resp {
    let mut text = body.to_string();
    text.push('\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("static parts are valid")
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Resp {
    reply(status, json!({ "error": message.to_string() }))
}

/// Serves the admin listener until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    admin: Arc<AdminState>,
    state: Arc<ProxyState>,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let (admin, state2, stop) = (admin.clone(), state.clone(), stop.clone());
        state.background.spawn(async move {
            let state = state2;
            let service = service_fn(move |req| {
                let (admin, state) = (admin.clone(), state.clone());
                async move { Ok::<_, Infallible>(route(&admin, &state, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "admin connection error") },
                () = stop.cancelled() => {}
            }
        });
    }
}

async fn route(admin: &AdminState, state: &Arc<ProxyState>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(admin, state),
        (&Method::GET, "/metrics") => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(state.metrics.render())))
            .expect("static parts are valid"),
        (_, p) if p.starts_with("/v1/") || p == "/v1" => crate::api::route(state, req).await,
        (_, p) if p.starts_with("/api/v1/") => {
            if authorized(state, &req) {
                api(admin, state, req, &path["/api/v1/".len()..]).await
            } else {
                let mut resp = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
                resp.headers_mut().insert(
                    "www-authenticate",
                    hyper::header::HeaderValue::from_static("Bearer"),
                );
                resp
            }
        }
        (_, "/healthz" | "/readyz" | "/metrics") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Ready: the proxy port accepts connections and the lease storage answers.
fn readyz(admin: &AdminState, state: &ProxyState) -> Resp {
    let storage = state.manager.storage();
    let (status, why) = match (admin.ready.load(Ordering::Acquire), storage.is_up()) {
        (true, true) => (StatusCode::OK, "ready"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable"),
    };
    reply(status, json!({"status": why, "storage": storage.kind()}))
}

/// Checks `Authorization: Bearer` against `admin.token` (constant time), if one is set.
fn authorized(state: &ProxyState, req: &Request<Incoming>) -> bool {
    let rt = state.runtime.load();
    let Some(token) = rt.config.admin.token.as_ref().filter(|t| !t.is_empty()) else {
        return true;
    };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(given.as_bytes().ct_eq(token.expose().as_bytes()))
}

async fn api(
    admin: &AdminState,
    state: &Arc<ProxyState>,
    req: Request<Incoming>,
    rest: &str,
) -> Resp {
    let segments: Vec<&str> = rest.split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["pools"]) => pools(state).await,
        (Method::GET, ["pools", name]) => pool(state, &decode(name)).await,
        (Method::GET, ["leases"]) => leases(state).await,
        (Method::DELETE, ["leases", id]) => match id.parse::<LeaseId>() {
            Ok(id) => match state.close_lease(id).await {
                Ok(true) => reply(StatusCode::OK, json!({"released": id.to_string()})),
                Ok(false) => error(StatusCode::NOT_FOUND, format!("no live lease {id}")),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
            },
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        },
        (Method::PUT, ["proxies", .., "status"]) if segments.len() >= 3 => {
            let id = decode(&segments[1..segments.len() - 1].join("/"));
            set_status(state, ProxyId::new(id), req).await
        }
        (Method::POST, ["reload"]) => reload(admin, state).await,
        (Method::GET, ["sessions"]) => sessions(state).await,
        (Method::DELETE, ["sessions", consumer, pool, id]) => {
            let key = (decode(consumer).into(), decode(pool).into(), decode(id));
            if state.rotate_session(&key) {
                reply(StatusCode::OK, json!({"rotated": key.2}))
            } else {
                error(StatusCode::NOT_FOUND, "no such session")
            }
        }
        (_, ["pools" | "leases" | "reload" | "sessions", ..] | ["proxies", ..]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

fn decode(s: &str) -> String {
    crate::config::percent_decode(s).unwrap_or_else(|| s.to_owned())
}

fn stats_json(s: &crate::model::PoolStats) -> Value {
    json!({
        "total": s.total, "active": s.active, "available": s.available,
        "leased": s.leased, "total_leases": s.total_leases,
    })
}

async fn pools(state: &ProxyState) -> Resp {
    let rt = state.runtime.load();
    match state.manager.storage().list_pools().await {
        Ok(list) => {
            let items: Vec<Value> = list
                .iter()
                .map(|(p, s)| {
                    let selector = rt.pools.get(p.name.as_str()).map(|r| r.selector.as_str());
                    json!({"name": p.name, "selector": selector, "stats": stats_json(s)})
                })
                .collect();
            reply(StatusCode::OK, json!({ "pools": items }))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn proxy_json(state: &ProxyState, info: &ProxyInfo) -> Value {
    let p = &info.proxy;
    let url = match (&p.credentials, p.protocol) {
        (_, crate::model::ProxyProtocol::Direct) => "direct".to_owned(),
        (Some(c), proto) => format!("{proto}://{}:***@{}", c.username, p.authority()),
        (None, proto) => format!("{proto}://{}", p.authority()),
    };
    let mut v = json!({
        "id": p.id, "url": url, "protocol": p.protocol, "status": p.status,
        "current_leases": info.current_leases, "max_concurrency": p.max_concurrency,
        "draining": info.draining,
        "consecutive_failures": state.failures.get(&p.id).map(|f| *f).unwrap_or(0),
        "latency_ms": p.latency.map(|l| l.as_secs_f64() * 1000.0),
        "checked_at": unix_seconds(p.checked_at),
        "rest_until": p.rest_until.map(unix_seconds),
    });
    if let (Value::Object(o), Ok(Value::Object(meta))) = (&mut v, serde_json::to_value(&p.meta)) {
        o.extend(meta);
    }
    v
}

async fn pool(state: &ProxyState, name: &str) -> Resp {
    let storage = state.manager.storage();
    let (Ok(Some(stats)), Ok(proxies)) = (
        storage.pool_stats(name).await,
        storage.list_proxies(name).await,
    ) else {
        return error(StatusCode::NOT_FOUND, format!("no pool `{name}`"));
    };
    let rt = state.runtime.load();
    let selector = rt.pools.get(name).map(|r| r.selector.as_str());
    let proxies: Vec<Value> = proxies.iter().map(|i| proxy_json(state, i)).collect();
    reply(
        StatusCode::OK,
        json!({"name": name, "selector": selector, "stats": stats_json(&stats), "proxies": proxies}),
    )
}

async fn leases(state: &ProxyState) -> Resp {
    match state.manager.storage().list_leases(None).await {
        Ok(list) => {
            let items: Vec<Value> = list
                .iter()
                .map(|l| {
                    json!({
                        "id": l.id, "proxy_id": l.proxy_id(), "pool": l.pool_name, "consumer": l.consumer_name,
                        "holder": l.holder,
                        "acquired_at": unix_seconds(l.acquired_at),
                        "expires_at": unix_seconds(l.expires_at),
                    })
                })
                .collect();
            reply(StatusCode::OK, json!({ "leases": items }))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn sessions(state: &ProxyState) -> Resp {
    let mut items = Vec::new();
    for s in state.sessions.list() {
        let (open, idle) = s.usage();
        let lease = s.state.lock().await;
        let (consumer, pool, id) = s.key();
        items.push(json!({
            "consumer": consumer, "pool": pool, "id": id,
            "proxy_id": lease.current.as_ref().map(|h| h.proxy().id.clone()),
            "open_connections": open, "idle_seconds": idle.as_secs_f64(), "ttl_seconds": s.ttl().as_secs(),
        }));
    }
    reply(StatusCode::OK, json!({ "sessions": items }))
}

async fn set_status(state: &ProxyState, id: ProxyId, req: Request<Incoming>) -> Resp {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let status: ProxyStatus = match serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
    {
        Some(s) => match s.parse() {
            Ok(st) => st,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        },
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                r#"expected {"status": "active|inactive|slow|banned"}"#,
            );
        }
    };
    match state.manager.storage().set_proxy_status(&id, status).await {
        Ok(previous) => {
            if status == ProxyStatus::Active {
                state.failures.remove(&id);
            }
            reply(
                StatusCode::OK,
                json!({"id": id, "previous": previous, "status": status}),
            )
        }
        Err(crate::storage::LeaseError::UnknownProxy(_)) => {
            error(StatusCode::NOT_FOUND, format!("no proxy `{id}`"))
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn reload(admin: &AdminState, state: &ProxyState) -> Resp {
    let Some(path) = &admin.config_path else {
        return error(
            StatusCode::CONFLICT,
            "the daemon was not started from a config file",
        );
    };
    match reload::reload_from(state, path).await {
        Ok(report) => reply(StatusCode::OK, json!({"result": "ok", "report": report})),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}
