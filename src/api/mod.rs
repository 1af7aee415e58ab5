//! The lease API (SPEC §7): the HTTP API that `pharox-sdk`'s remote mode speaks
//! (`PharoxSDK.remote(base_url, api_key)`), served under `/v1/` on the admin listener, for
//! clients that cannot send their traffic through the proxy port. It runs on the daemon's own
//! storage (memory or PostgreSQL): a lease taken here is a lease like any other.
//!
//! - Off unless `[[api.keys]]` are configured: then every `/v1/` route answers 404.
//! - `X-API-Key` is checked first on every known route, in constant time (401 otherwise);
//!   keys are never logged. A key may be limited to some consumer names, may manage the
//!   inventory or not, and may see upstream credentials in lease answers or not.
//! - Both spellings of every route (with and without one trailing `/`) are served, never
//!   redirected: the SDK treats a redirect as success.
//! - Errors are `{"detail": "..."}`; ids are UUIDs (a path id that is not one is a 404);
//!   times are `YYYY-MM-DDTHH:MM:SS.ffffff+00:00`.
//!
//! `inventory.rs` has the pool and proxy routes, `leases.rs` the lease routes and the record
//! of API leases, `json.rs` the shapes the SDK parses.

mod inventory;
mod json;
mod leases;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::config::ApiKeyConfig;
use crate::proxy::ProxyState;
use crate::storage::LeaseError;

pub use leases::ApiLeases;

/// Largest request body read.
const MAX_BODY: usize = 64 * 1024;

type Resp = Response<Full<Bytes>>;

/// An error answer: status and `detail`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: String,
}

impl ApiError {
    fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: detail.into(),
        }
    }

    fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not Found")
    }

    fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }
}

impl From<LeaseError> for ApiError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::UnknownPool(p) => {
                Self::new(StatusCode::NOT_FOUND, format!("unknown pool `{p}`"))
            }
            LeaseError::UnknownProxy(p) => {
                Self::new(StatusCode::NOT_FOUND, format!("unknown proxy `{p}`"))
            }
            LeaseError::Backend(e) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("storage_unavailable: {e}"),
            ),
            other => Self::invalid(other.to_string()),
        }
    }
}

type ApiResult = Result<(StatusCode, Option<Value>), ApiError>;

fn answer(status: StatusCode, body: Option<Value>) -> Resp {
    let mut b = Response::builder().status(status);
    let bytes = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    b.body(Full::new(bytes)).expect("static parts are valid")
}

fn error(e: ApiError) -> Resp {
    let mut resp = answer(e.status, Some(json!({ "detail": e.detail })));
    if e.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            "www-authenticate",
            hyper::header::HeaderValue::from_static("ApiKey"),
        );
    }
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert("retry-after", hyper::header::HeaderValue::from_static("1"));
    }
    resp
}

/// One request to the API, with the key that authenticated it.
pub(crate) struct Call<'a> {
    state: &'a Arc<ProxyState>,
    key: &'a ApiKeyConfig,
    body: Bytes,
}

impl Call<'_> {
    /// The body as `T` (422 when it does not parse, or has unknown fields).
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        let body: &[u8] = if self.body.is_empty() {
            b"{}"
        } else {
            &self.body
        };
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("body: {e}")))
    }

    fn must_manage(&self) -> Result<(), ApiError> {
        if self.key.manage {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this API key may not manage pools and proxies",
            ))
        }
    }
}

/// The routes, as (method, path pattern); `*` is one id segment.
const ROUTES: &[(&[&str], &[Method])] = &[
    (&["pools"], &[Method::GET, Method::POST]),
    (&["pools", "*"], &[Method::GET, Method::DELETE]),
    (&["pools", "*", "proxies"], &[Method::GET, Method::POST]),
    (
        &["pools", "*", "proxies", "*"],
        &[Method::PATCH, Method::DELETE],
    ),
    (&["leases"], &[Method::POST]),
    (&["leases", "*"], &[Method::GET]),
    (&["leases", "*", "release"], &[Method::POST]),
];

/// Serves `/v1/…`.
pub async fn route(state: &Arc<ProxyState>, req: Request<Incoming>) -> Resp {
    let rt = state.runtime.load_full();
    let keys = &rt.config.api.keys;
    if keys.is_empty() {
        return error(ApiError::not_found());
    }
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/v1/").unwrap_or("");
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let segs: Vec<&str> = rest.split('/').collect();
    let Some((_, methods)) = ROUTES.iter().find(|(pattern, _)| {
        pattern.len() == segs.len() && pattern.iter().zip(&segs).all(|(p, s)| *p == "*" || p == s)
    }) else {
        return error(ApiError::not_found());
    };
    let Some(key) = authenticate(keys, &req) else {
        return error(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid or missing API key",
        ));
    };
    if !methods.contains(req.method()) {
        let allow: Vec<&str> = methods.iter().map(Method::as_str).collect();
        let mut resp = error(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
        ));
        if let Ok(v) = hyper::header::HeaderValue::from_str(&allow.join(", ")) {
            resp.headers_mut().insert("allow", v);
        }
        return resp;
    }
    let method = req.method().clone();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(ApiError::invalid(format!("body: {e}"))),
    };
    let call = Call { state, key, body };
    let result = dispatch(&call, &method, &segs).await;
    state.metrics.api_request(route_name(&segs), result.is_ok());
    match result {
        Ok((status, body)) => answer(status, body),
        Err(e) => error(e),
    }
}

async fn dispatch(call: &Call<'_>, method: &Method, segs: &[&str]) -> ApiResult {
    match (method.clone(), segs) {
        (Method::GET, ["pools"]) => inventory::list_pools(call).await,
        (Method::POST, ["pools"]) => inventory::create_pool(call).await,
        (Method::GET, ["pools", id]) => inventory::get_pool(call, uuid(id)?).await,
        (Method::DELETE, ["pools", id]) => inventory::delete_pool(call, uuid(id)?).await,
        (Method::GET, ["pools", id, "proxies"]) => inventory::list_proxies(call, uuid(id)?).await,
        (Method::POST, ["pools", id, "proxies"]) => inventory::create_proxy(call, uuid(id)?).await,
        (Method::PATCH, ["pools", id, "proxies", pid]) => {
            inventory::update_proxy(call, uuid(id)?, uuid(pid)?).await
        }
        (Method::DELETE, ["pools", id, "proxies", pid]) => {
            inventory::delete_proxy(call, uuid(id)?, uuid(pid)?).await
        }
        (Method::POST, ["leases"]) => leases::acquire(call).await,
        (Method::GET, ["leases", id]) => leases::get(call, uuid(id)?).await,
        (Method::POST, ["leases", id, "release"]) => leases::release(call, uuid(id)?).await,
        _ => Err(ApiError::not_found()),
    }
}

/// A bounded label for metrics.
fn route_name(segs: &[&str]) -> &'static str {
    match segs {
        ["pools"] | ["pools", _] => "pools",
        ["pools", _, "proxies", ..] => "proxies",
        ["leases"] | ["leases", _] | ["leases", _, _] => "leases",
        _ => "other",
    }
}

/// A path id: a UUID, or 404 (an id that cannot exist is simply not found).
fn uuid(s: &str) -> Result<Uuid, ApiError> {
    match s.len() {
        36 | 32 => Uuid::try_parse(s).map_err(|_| ApiError::not_found()),
        _ => Err(ApiError::not_found()),
    }
}

/// The configured key matching `X-API-Key`, compared in constant time against every key.
fn authenticate<'k>(keys: &'k [ApiKeyConfig], req: &Request<Incoming>) -> Option<&'k ApiKeyConfig> {
    let given = req.headers().get("x-api-key")?.as_bytes();
    if given.is_empty() {
        return None;
    }
    let mut found = None;
    for k in keys {
        let Some(want) = &k.key else { continue };
        if bool::from(want.expose().as_bytes().ct_eq(given)) {
            found = Some(k);
        }
    }
    found
}
