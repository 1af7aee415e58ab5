//! Reaching a target through one leased upstream: TCP (optionally TLS) to an HTTP proxy and
//! its CONNECT handshake, SOCKS5 with username/password, or a direct connection from this
//! host; each within the connect timeout. Also the destination policy for `direct`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
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

use crate::model::{Credentials, Proxy, ProxyProtocol};

/// Largest CONNECT reply head accepted from an upstream.
const MAX_REPLY_HEAD: usize = 16 * 1024;

/// Where a client wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or IP literal (no brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Target {
    /// `host:port`, bracketing IPv6 literals.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Per-upstream settings that the lease engine's model does not carry.
#[derive(Clone, Default)]
pub struct UpstreamExtra {
    /// `direct`: local address to connect from.
    pub bind: Option<IpAddr>,
    /// `https`: the TLS client for this proxy.
    pub tls: Option<TlsConnector>,
}

/// Why an upstream could not give a connection to the target.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The connect timeout passed.
    #[error("timed out")]
    Timeout,
    /// Connection refused, reset, TLS failure...
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The upstream answered but refused the target.
    #[error("{0}")]
    Refused(String),
    /// The destination is forbidden by policy (not the upstream's fault).
    #[error("{0}")]
    Denied(String),
}

impl DialError {
    /// Bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            DialError::Timeout => "timeout",
            DialError::Io(_) => "io",
            DialError::Refused(_) => "refused",
            DialError::Denied(_) => "denied",
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

/// What the destination policy needs to know.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Let `direct` reach loopback and link-local addresses.
    pub allow_private: bool,
    /// The daemon's own listeners (tunnels to them would loop).
    pub own: Vec<SocketAddr>,
}

impl Policy {
    /// Refuses a resolved address that is one of our listeners, or (for `direct`) private.
    pub fn check(&self, addr: SocketAddr, direct: bool) -> Result<(), DialError> {
        if self.is_own(addr) {
            return Err(DialError::Denied(format!(
                "{addr} is this proxy's own listener"
            )));
        }
        if direct && !self.allow_private && is_private(addr.ip()) {
            return Err(DialError::Denied(format!(
                "{} is a loopback or link-local address",
                addr.ip()
            )));
        }
        Ok(())
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip()
                    || (own.ip().is_unspecified()
                        && (addr.ip().is_loopback() || addr.ip() == own.ip())))
        })
    }

    /// Checks an IP-literal target before anything is leased.
    pub fn check_literal(&self, target: &Target) -> Result<(), DialError> {
        match target.host.parse::<IpAddr>() {
            Ok(ip) if self.is_own(SocketAddr::new(ip, target.port)) => Err(DialError::Denied(
                format!("{} is this proxy's own listener", target.authority()),
            )),
            _ => Ok(()),
        }
    }
}

/// Loopback, link-local, or unspecified.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| is_private(IpAddr::V4(v4)))
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
    within(timeout, open_inner(proxy, extra, target, policy)).await
}

/// Runs a dial step within `timeout`.
async fn within<T>(
    timeout: Duration,
    step: impl Future<Output = Result<T, DialError>>,
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
            let tcp = TcpStream::connect((proxy.host.as_str(), proxy.port)).await?;
            tcp.set_nodelay(true)?;
            Ok((
                UpstreamIo::Tcp(socks5_connect(tcp, proxy, target).await?),
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
            let io = within(timeout, connect_proxy(proxy, extra)).await?;
            Ok((io, Bytes::new()))
        }
        _ => open_tunnel(proxy, extra, target, policy, timeout).await,
    }
}

/// TCP (and TLS for `https`) to the proxy itself.
pub async fn connect_proxy(proxy: &Proxy, extra: &UpstreamExtra) -> Result<UpstreamIo, DialError> {
    let tcp = TcpStream::connect((proxy.host.as_str(), proxy.port)).await?;
    tcp.set_nodelay(true)?;
    match (&extra.tls, proxy.protocol) {
        (Some(tls), ProxyProtocol::Https) => {
            let name = ServerName::try_from(proxy.host.clone())
                .map_err(|e| DialError::Io(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            Ok(UpstreamIo::Tls(Box::new(tls.connect(name, tcp).await?)))
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
    let authority = target.authority();
    let mut req = String::with_capacity(2 * authority.len() + 96);
    for part in [
        "CONNECT ",
        &authority,
        " HTTP/1.1\r\nHost: ",
        &authority,
        "\r\n",
    ] {
        req.push_str(part);
    }
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
            return Err(DialError::Refused("closed before answering CONNECT".into()));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let code = resp.code.unwrap_or(0);
                if !(200..300).contains(&code) {
                    return Err(DialError::Refused(format!("CONNECT answered {code}")));
                }
                return Ok(buf.split_off(len).freeze());
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_REPLY_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(DialError::Refused("CONNECT reply too large".into()));
            }
            Err(e) => return Err(DialError::Refused(format!("malformed CONNECT reply: {e}"))),
        }
    }
}

async fn socks5_connect(
    tcp: TcpStream,
    proxy: &Proxy,
    target: &Target,
) -> Result<TcpStream, DialError> {
    match (proxy.protocol, target.host.parse::<IpAddr>()) {
        (_, Ok(ip)) => socks5_handshake(tcp, proxy, SocketAddr::new(ip, target.port)).await,
        (ProxyProtocol::Socks5h, Err(_)) => {
            socks5_handshake(tcp, proxy, (target.host.as_str(), target.port)).await
        }
        (_, Err(_)) => {
            let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
                .await?
                .next()
                .ok_or_else(|| DialError::Refused(format!("{} does not resolve", target.host)))?;
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
    stream.map(Socks5Stream::into_inner).map_err(|e| match e {
        tokio_socks::Error::Io(io) => DialError::Io(io),
        other => DialError::Refused(format!("SOCKS5: {other}")),
    })
}

/// Connects from this host, checking every resolved address against the policy.
async fn connect_direct(
    target: &Target,
    bind: Option<IpAddr>,
    policy: &Policy,
) -> Result<TcpStream, DialError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await?
        .collect();
    let mut last = DialError::Refused(format!("{} does not resolve", target.host));
    for addr in addrs {
        policy.check(addr, true)?;
        if bind.is_some_and(|b| b.is_ipv4() != addr.is_ipv4()) {
            continue;
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = bind {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        match socket.connect(addr).await {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = DialError::Io(e),
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
