//! The admin listener: `GET /healthz` (the process is up) and `GET /readyz` (the proxy port
//! accepts connections). Kept off the proxy port so probes never need proxy credentials.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Shared admin state.
#[derive(Debug, Default)]
pub struct AdminState {
    /// Set once the proxy listener accepts connections.
    pub ready: AtomicBool,
}

fn json(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{body}\n"))))
        .expect("static parts are valid")
}

fn route(state: &AdminState, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#),
        (&Method::GET, "/readyz") if state.ready.load(Ordering::Acquire) => {
            json(StatusCode::OK, r#"{"status":"ready"}"#)
        }
        (&Method::GET, "/readyz") => {
            json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"starting"}"#)
        }
        (_, "/healthz" | "/readyz") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"error":"method not allowed"}"#,
        ),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#),
    }
}

/// Serves the admin API until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
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
            () = shutdown.cancelled() => return,
        };
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tracker.spawn(async move {
            let service = service_fn(move |req| {
                let resp = route(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "admin connection error") },
                () = shutdown.cancelled() => {}
            }
        });
    }
}
