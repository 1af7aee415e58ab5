//! Reaching a target through one leased upstream: TCP (optionally TLS) to an HTTP proxy and
//! its CONNECT handshake, SOCKS5 with username/password, or a direct connection from this
//! host; each within the connect timeout. Also the destination policy for `direct`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::error::{ProxyError, UpstreamFault};
use crate::model::{Credentials, Proxy, ProxyProtocol};
use crate::target::{Denied, Host, Policy, Target};

/// Largest CONNECT reply head accepted from an upstream.
const MAX_REPLY_HEAD: usize = 16 * 1024;

/// Per-upstream settings that the lease engine's model does not carry.
#[derive(Clone, Default)]
pub struct UpstreamExtra {
    /// `direct`: local address to connect from.
    pub bind: Option<IpAddr>,
    /// `https`: the TLS client for this proxy.
    pub tls: Option<TlsConnector>,
}

/// Why an upstream could not give a connection to the target. Typed until the one place
/// that answers the client ([`DialError::into_proxy_error`]).
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The connect timeout passed.
    #[error("timed out")]
    Timeout,
    /// The TCP connection to the upstream (or, for `direct`, the target) failed.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The connection broke during the handshake.
    #[error("{0}")]
    Io(io::Error),
    /// The TLS handshake with an `https` proxy failed.
    #[error("TLS: {0}")]
    Tls(io::Error),
    /// The upstream answered CONNECT with a non-2xx status.
    #[error("CONNECT answered {0}")]
    Rejected(u16),
    /// The upstream refused our credentials for it (407, SOCKS5 auth failure).
    #[error("rejected our credentials")]
    AuthRejected,
    /// The upstream could not reach the target, or the target's name does not resolve.
    #[error("{0}")]
    Unreachable(String),
    /// The upstream answered something that is not its protocol.
    #[error("{0}")]
    Protocol(String),
    /// The destination is forbidden by policy (not the upstream's fault).
    #[error("{0}")]
    Denied(#[from] Denied),
    /// This host ran out of a resource (descriptors, buffers, local ports): not the
    /// upstream's fault.
    #[error("{0}")]
    Local(io::Error),
}

/// Errors that mean this host ran out of something, not that the peer failed.
fn is_local(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL (no local port or bind address).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12 | 99))
}

impl From<io::Error> for DialError {
    fn from(e: io::Error) -> Self {
        if is_local(&e) {
            DialError::Local(e)
        } else {
            DialError::Io(e)
        }
    }
}

impl DialError {
    fn connect(e: io::Error) -> Self {
        if is_local(&e) {
            DialError::Local(e)
        } else {
            DialError::Connect(e)
        }
    }

    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::Timeout => "timeout",
            DialError::Connect(_) => "connect",
            DialError::Io(_) => "io",
            DialError::Tls(_) => "tls",
            DialError::Rejected(_) => "refused",
            DialError::AuthRejected => "auth",
            DialError::Unreachable(_) => "unreachable",
            DialError::Protocol(_) => "protocol",
            DialError::Denied(_) => "denied",
            DialError::Local(_) => "local",
        }
    }

    /// True when the upstream proxy is to blame (counted against its health, and another
    /// upstream is tried). Policy refusals and local shortages are not its fault; nor, for a
    /// `direct` upstream, is a target that refuses or cannot be reached.
    pub fn is_upstream_fault(&self, protocol: ProxyProtocol) -> bool {
        match self {
            DialError::Denied(_) | DialError::Local(_) => false,
            _ => protocol != ProxyProtocol::Direct,
        }
    }

    /// The answer for a client when every upstream tried failed like this (`all_timeouts`:
    /// every one of them timed out). `detail` names the upstreams and their errors.
    pub fn into_proxy_error(self, detail: String, all_timeouts: bool) -> ProxyError {
        match self {
            DialError::Denied(d) => ProxyError::DestinationDenied(d.to_string()),
            DialError::Local(e) => ProxyError::ResourceExhausted(e.to_string()),
            _ if all_timeouts => ProxyError::UpstreamTimeout(detail),
            DialError::Unreachable(_) => ProxyError::UpstreamFailed {
                fault: UpstreamFault::Unreachable,
                detail,
            },
            _ => ProxyError::upstream(detail),
        }
    }
}

/// A connection to the target through an upstream.
pub enum UpstreamIo {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS to an `https` proxy.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens a byte stream to `target` through `proxy`, within `timeout`. For HTTP proxies the
/// CONNECT handshake is complete when this returns; bytes the proxy sent after its reply come
/// back too.
pub async fn open_tunnel(
    proxy: &Proxy,
    extra: &UpstreamExtra,
    target: &Target,
    policy: &Policy,
    timeout: Duration,
) -> Result<(UpstreamIo, Bytes), DialError> {
    within(timeout, pin!(open_inner(proxy, extra, target, policy))).await
}

/// Runs a dial step within `timeout`. The step is pinned by the caller: taken by value, it
/// would be stored twice (as the argument and inside the timeout), and every connection
/// being opened would carry the copy.
async fn within<T, F: Future<Output = Result<T, DialError>>>(
    timeout: Duration,
    step: Pin<&mut F>,
) -> Result<T, DialError> {
    tokio::time::timeout(timeout, step)
        .await
        .map_err(|_| DialError::Timeout)?
}

async fn open_inner(
    proxy: &Proxy,
    extra: &UpstreamExtra,
    target: &Target,
    policy: &Policy,
) -> Result<(UpstreamIo, Bytes), DialError> {
    match proxy.protocol {
        ProxyProtocol::Direct => Ok((
            UpstreamIo::Tcp(connect_direct(target, extra.bind, policy).await?),
            Bytes::new(),
        )),
        ProxyProtocol::Http | ProxyProtocol::Https => {
            let mut io = connect_proxy(proxy, extra).await?;
            let rest = http_connect(&mut io, proxy, target).await?;
            Ok((io, rest))
        }
        ProxyProtocol::Socks5 | ProxyProtocol::Socks5h => {
            let tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
                .await
                .map_err(DialError::connect)?;
            tcp.set_nodelay(true)?;
            Ok((
                // Boxed, as the TLS handshake: its state would size every dial's future.
                UpstreamIo::Tcp(Box::pin(socks5_connect(tcp, proxy, target)).await?),
                Bytes::new(),
            ))
        }
    }
}

/// A connection for plain HTTP requests to `target`: to the proxy itself for HTTP(S)
/// upstreams (requests go in absolute form), a tunnel to the target otherwise.
pub async fn open_forward(
    proxy: &Proxy,
    extra: &UpstreamExtra,
    target: &Target,
    policy: &Policy,
    timeout: Duration,
) -> Result<(UpstreamIo, Bytes), DialError> {
    match proxy.protocol {
        ProxyProtocol::Http | ProxyProtocol::Https => {
            let io = within(timeout, pin!(connect_proxy(proxy, extra))).await?;
            Ok((io, Bytes::new()))
        }
        _ => open_tunnel(proxy, extra, target, policy, timeout).await,
    }
}

/// TCP (and TLS for `https`) to the proxy itself.
pub async fn connect_proxy(proxy: &Proxy, extra: &UpstreamExtra) -> Result<UpstreamIo, DialError> {
    let tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(DialError::connect)?;
    tcp.set_nodelay(true)?;
    match (&extra.tls, proxy.protocol) {
        (Some(tls), ProxyProtocol::Https) => {
            let name = ServerName::try_from(proxy.host.clone())
                .map_err(|e| DialError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            // Boxed: the handshake's state is large, and only `https` upstreams need it.
            let tls = Box::pin(tls.connect(name, tcp)).await.map_err(|e| {
                if is_local(&e) {
                    DialError::Local(e)
                } else {
                    DialError::Tls(e)
                }
            })?;
            Ok(UpstreamIo::Tls(Box::new(tls)))
        }
        _ => Ok(UpstreamIo::Tcp(tcp)),
    }
}

/// `Proxy-Authorization` value for a proxy's credentials.
pub fn basic_auth(proxy: &Proxy) -> Option<String> {
    proxy.credentials.as_ref().map(|c| {
        let mut value = String::new();
        push_basic_auth(c, &mut value);
        value
    })
}

/// Appends `Basic base64(user:password)` to `out`.
fn push_basic_auth(c: &Credentials, out: &mut String) {
    let raw = [c.username.as_bytes(), b":", c.password.expose().as_bytes()].concat();
    out.push_str("Basic ");
    base64::engine::general_purpose::STANDARD.encode_string(raw, out);
}

/// Sends CONNECT and reads the reply; any 2xx is success.
async fn http_connect(
    io: &mut UpstreamIo,
    proxy: &Proxy,
    target: &Target,
) -> Result<Bytes, DialError> {
    let mut req = String::with_capacity(160);
    req.push_str("CONNECT ");
    let start = req.len();
    target.push_authority(&mut req);
    let authority = start..req.len();
    req.push_str(" HTTP/1.1\r\nHost: ");
    req.extend_from_within(authority);
    req.push_str("\r\n");
    if let Some(c) = &proxy.credentials {
        req.push_str("Proxy-Authorization: ");
        push_basic_auth(c, &mut req);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(DialError::Protocol(
                "closed before answering CONNECT".into(),
            ));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                return match resp.code.unwrap_or(0) {
                    200..=299 => Ok(buf.split_off(len).freeze()),
                    407 => Err(DialError::AuthRejected),
                    code => Err(DialError::Rejected(code)),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REPLY_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(DialError::Protocol("CONNECT reply too large".into()));
            }
            Err(e) => return Err(DialError::Protocol(format!("malformed CONNECT reply: {e}"))),
        }
    }
}

async fn socks5_connect(
    tcp: TcpStream,
    proxy: &Proxy,
    target: &Target,
) -> Result<TcpStream, DialError> {
    match (proxy.protocol, &target.host) {
        (_, Host::Ip(ip)) => socks5_handshake(tcp, proxy, SocketAddr::new(*ip, target.port)).await,
        (ProxyProtocol::Socks5h, Host::Name(name)) => {
            socks5_handshake(tcp, proxy, (name.as_str(), target.port)).await
        }
        (_, Host::Name(name)) => {
            let addr = resolve(name, target.port)
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| DialError::Unreachable(format!("{name} does not resolve")))?;
            socks5_handshake(tcp, proxy, addr).await
        }
    }
}

async fn socks5_handshake<'a>(
    tcp: TcpStream,
    proxy: &Proxy,
    addr: impl tokio_socks::IntoTargetAddr<'a>,
) -> Result<TcpStream, DialError> {
    use tokio_socks::tcp::Socks5Stream;
    let stream = match &proxy.credentials {
        Some(c) => {
            Socks5Stream::connect_with_password_and_socket(
                tcp,
                addr,
                &c.username,
                c.password.expose(),
            )
            .await
        }
        None => Socks5Stream::connect_with_socket(tcp, addr).await,
    };
    stream.map(Socks5Stream::into_inner).map_err(|e| {
        use tokio_socks::Error as E;
        match e {
            E::Io(io) => DialError::from(io),
            E::PasswordAuthFailure(_) | E::NoAcceptableAuthMethods => DialError::AuthRejected,
            E::HostUnreachable | E::NetworkUnreachable | E::TtlExpired => {
                DialError::Unreachable(format!("SOCKS5: {e}"))
            }
            E::ConnectionRefused => DialError::Rejected(502),
            other => DialError::Protocol(format!("SOCKS5: {other}")),
        }
    })
}

/// Resolves a name (a failure to resolve is the target's fault, not a local one).
async fn resolve(name: &str, port: u16) -> Result<Vec<SocketAddr>, DialError> {
    match tokio::net::lookup_host((name, port)).await {
        Ok(addrs) => Ok(addrs.collect()),
        Err(e) if is_local(&e) => Err(DialError::Local(e)),
        Err(e) => Err(DialError::Unreachable(format!(
            "{name} does not resolve: {e}"
        ))),
    }
}

/// Connects from this host, judging every address dialled (after resolution) and the
/// connection made against the policy.
async fn connect_direct(
    target: &Target,
    bind: Option<IpAddr>,
    policy: &Policy,
) -> Result<TcpStream, DialError> {
    let addrs = match &target.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, target.port)],
        Host::Name(name) => resolve(name, target.port).await?,
    };
    let mut last = DialError::Unreachable(format!("{} does not resolve", target.host));
    for addr in addrs {
        policy.check(addr, true)?;
        if bind.is_some_and(|b| b.is_ipv4() != addr.is_ipv4()) {
            continue;
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(DialError::connect)?;
        if let Some(ip) = bind {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(DialError::connect)?;
        }
        match socket.connect(addr).await {
            Ok(s) => {
                policy.check_connected(s.local_addr()?, s.peer_addr()?, true)?;
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = DialError::connect(e),
        }
    }
    Err(last)
}

/// Builds a TLS client trusting the system roots plus the PEM certificates in `ca_file`.
pub fn tls_connector(ca_file: Option<&std::path::Path>) -> Result<TlsConnector, String> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto::ring};
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let certs =
            CertificateDer::pem_file_iter(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::socks_reply;

    fn os(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    /// Every dial error, as the client sees it once every upstream failed like it: HTTP
    /// status, `X-Pharox-Error` code, SOCKS5 reply; and whether the upstream is blamed.
    #[test]
    fn dial_errors_map_to_one_answer_each() {
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let cases: Vec<(DialError, u16, &str, u8, bool)> = vec![
            (
                DialError::Timeout,
                502,
                "upstream_failed",
                socks_reply::REFUSED,
                true,
            ),
            (
                DialError::connect(refused()),
                502,
                "upstream_failed",
                socks_reply::REFUSED,
                true,
            ),
            (
                DialError::from(refused()),
                502,
                "upstream_failed",
                socks_reply::REFUSED,
                true,
            ),
            (
                DialError::Tls(refused()),
                502,
                "upstream_failed",
                socks_reply::REFUSED,
                true,
            ),
            (
                DialError::Rejected(403),
                502,
                "upstream_failed",
                socks_reply::REFUSED,
                true,
            ),
            (
                DialError::AuthRejected,
                502,
                "upstream_failed",
                socks_reply::REFUSED,
                true,
            ),
            (
                DialError::Unreachable("x.test does not resolve".into()),
                502,
                "upstream_failed",
                socks_reply::HOST_UNREACHABLE,
                true,
            ),
            (
                DialError::Protocol("junk".into()),
                502,
                "upstream_failed",
                socks_reply::REFUSED,
                true,
            ),
            (
                DialError::Denied(Denied::Private("127.0.0.1".parse().unwrap())),
                403,
                "destination_denied",
                socks_reply::NOT_ALLOWED,
                false,
            ),
        ];
        for (e, status, code, reply, fault) in cases {
            let label = e.reason();
            assert_eq!(e.is_upstream_fault(ProxyProtocol::Http), fault, "{label}");
            let p = e.into_proxy_error("p1: failed".into(), false);
            assert_eq!((p.status(), p.code()), (status, code), "{label}");
            assert_eq!(p.socks_reply(), reply, "{label}");
        }
        let timeout = DialError::Timeout.into_proxy_error("p1".into(), true);
        assert_eq!(
            (timeout.status(), timeout.code()),
            (504, "upstream_timeout")
        );
        assert_eq!(timeout.socks_reply(), socks_reply::TTL_EXPIRED);
    }

    /// This host's shortages are never the upstream's fault, whichever call hit them.
    #[test]
    fn local_shortages_blame_no_upstream() {
        for code in [24, 23, 105, 12, 99] {
            for e in [DialError::from(os(code)), DialError::connect(os(code))] {
                assert_eq!(e.reason(), "local");
                assert!(!e.is_upstream_fault(ProxyProtocol::Http));
                let p = e.into_proxy_error("p1".into(), false);
                assert_eq!((p.status(), p.code()), (503, "resource_exhausted"));
                assert_eq!(p.socks_reply(), socks_reply::GENERAL);
            }
        }
        // A direct upstream is not blamed for a target that refuses.
        let refused = DialError::connect(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert!(!refused.is_upstream_fault(ProxyProtocol::Direct));
    }
}
