//! The absolute-form request target of a proxy request (`http://authority/path?query`),
//! parsed strictly: visible ASCII, no fragment, no user information, and a host that is an IP
//! literal or a DNS name of letters, digits and hyphens, never something a URL library or
//! `getaddrinfo` might read as an address in another notation.

use std::borrow::Cow;
use std::net::Ipv6Addr;

use super::is_vchar;
use crate::error::ProxyError;
use crate::target::Host;

/// Why a request target is not a usable absolute URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// Not `scheme://authority...`.
    #[error("not an absolute URI")]
    NotAbsolute,
    /// A scheme other than http and https.
    #[error("unsupported scheme")]
    UnsupportedScheme,
    /// A byte that is not visible ASCII.
    #[error("invalid character in the URI")]
    Character,
    /// A fragment (`#`), which a request never carries.
    #[error("fragment in the URI")]
    Fragment,
    /// Credentials (`user@`) in the authority.
    #[error("user information in the URI")]
    UserInfo,
    /// No host.
    #[error("empty host")]
    EmptyHost,
    /// A host that is neither an IP literal nor a DNS name of letters, digits and hyphens.
    #[error("invalid host")]
    InvalidHost,
    /// A port that is empty, 0, over 65535 or not digits.
    #[error("invalid port")]
    InvalidPort,
}

impl From<UriError> for ProxyError {
    fn from(e: UriError) -> Self {
        ProxyError::BadRequest(e.to_string())
    }
}

/// The scheme of an absolute URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http`.
    Http,
    /// `https` (for the caller to refuse: those go through CONNECT).
    Https,
}

impl Scheme {
    /// 80 or 443.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// An absolute-form request target (`http://authority/path?query`), checked strictly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbsoluteUri<'a> {
    /// The scheme.
    pub scheme: Scheme,
    /// `host[:port]` as sent (the value for `Host`).
    pub authority: &'a str,
    /// The host to connect to: a DNS name, an IPv4 literal, or an IPv6 literal without its
    /// brackets.
    pub host: &'a str,
    /// The port, explicit or the scheme's default.
    pub port: u16,
    /// Path and query as sent (possibly empty; see [`AbsoluteUri::origin_form`]).
    pub path_and_query: &'a str,
    uri: &'a str,
}

impl<'a> AbsoluteUri<'a> {
    /// Parses `uri`: a scheme, `://`, an authority without user information, then an optional
    /// path and query; visible ASCII only, no fragment.
    pub fn parse(uri: &'a str) -> Result<Self, UriError> {
        if !uri.bytes().all(is_vchar) {
            return Err(UriError::Character);
        }
        Self::parse_visible(uri, None)
    }

    /// [`AbsoluteUri::parse`] for a `uri` already known to be visible ASCII (a parsed request
    /// line's target); an authority equal to `known` (one that parsed before) is not checked
    /// again.
    ///
    /// Targets are parsed on every request, and nearly all of them start `http://` with a
    /// short authority: that case scans the authority once, byte by byte (cheaper than a
    /// vectorised search's set-up for a score of bytes), and only the path and query with
    /// `memchr`. Any other scheme goes to [`AbsoluteUri::parse_general`], which the property
    /// tests hold it to.
    pub(crate) fn parse_visible(uri: &'a str, known: Option<&str>) -> Result<Self, UriError> {
        let Some((scheme, rest)) = http_prefix(uri) else {
            return Self::parse_general(uri, known);
        };
        let mut end = rest.len();
        let (mut colon, mut user, mut fragment) = (None, false, false);
        for (i, b) in rest.bytes().enumerate() {
            match b {
                b'/' | b'?' => {
                    end = i;
                    break;
                }
                b':' => {
                    colon.get_or_insert(i);
                }
                b'@' => user = true,
                b'#' => fragment = true,
                _ => {}
            }
        }
        let (authority, path_and_query) = rest.split_at(end);
        if fragment || memchr::memchr(b'#', path_and_query.as_bytes()).is_some() {
            return Err(UriError::Fragment);
        }
        if user {
            return Err(UriError::UserInfo);
        }
        Self::assemble(uri, scheme, (authority, colon), path_and_query, known)
    }

    /// [`AbsoluteUri::parse_visible`] for any scheme.
    fn parse_general(uri: &'a str, known: Option<&str>) -> Result<Self, UriError> {
        let bytes = uri.as_bytes();
        if memchr::memchr(b'#', bytes).is_some() {
            return Err(UriError::Fragment);
        }
        let colon = memchr::memchr(b':', bytes).ok_or(UriError::NotAbsolute)?;
        let (scheme, rest) = (&uri[..colon], &uri[colon + 1..]);
        let rest = rest.strip_prefix("//").ok_or(UriError::NotAbsolute)?;
        let scheme = parse_scheme(scheme)?;
        let end = memchr::memchr2(b'/', b'?', rest.as_bytes()).unwrap_or(rest.len());
        let (authority, path_and_query) = rest.split_at(end);
        if memchr::memchr(b'@', authority.as_bytes()).is_some() {
            return Err(UriError::UserInfo);
        }
        let colon = memchr::memchr(b':', authority.as_bytes());
        Self::assemble(uri, scheme, (authority, colon), path_and_query, known)
    }

    /// The URI from its parts, its authority's host and port checked (`colon`: where the
    /// authority's first `:` is).
    fn assemble(
        uri: &'a str,
        scheme: Scheme,
        (authority, colon): (&'a str, Option<usize>),
        path_and_query: &'a str,
        known: Option<&str>,
    ) -> Result<Self, UriError> {
        let (host, port) = host_port(authority, colon, known == Some(authority))?;
        Ok(AbsoluteUri {
            port: port.unwrap_or(scheme.default_port()),
            scheme,
            authority,
            host,
            path_and_query,
            uri,
        })
    }

    /// The whole URI (the absolute-form target).
    pub fn as_str(&self) -> &'a str {
        self.uri
    }

    /// The origin-form target: path and query, `/` if the path is empty.
    pub fn origin_form(&self) -> Cow<'a, str> {
        match self.path_and_query.as_bytes().first() {
            None => Cow::Borrowed("/"),
            Some(b'?') => Cow::Owned(format!("/{}", self.path_and_query)),
            Some(_) => Cow::Borrowed(self.path_and_query),
        }
    }
}

/// `http://` or `https://` (in any case) and what follows it.
fn http_prefix(uri: &str) -> Option<(Scheme, &str)> {
    let b = uri.as_bytes();
    if b.len() < 7 || !b[..4].eq_ignore_ascii_case(b"http") {
        return None;
    }
    if &b[4..7] == b"://" {
        return Some((Scheme::Http, &uri[7..]));
    }
    if b.len() >= 8 && b[4] | 0x20 == b's' && &b[5..8] == b"://" {
        return Some((Scheme::Https, &uri[8..]));
    }
    None
}

fn parse_scheme(scheme: &str) -> Result<Scheme, UriError> {
    let alpha = scheme.starts_with(|c: char| c.is_ascii_alphabetic());
    if !alpha
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        Err(UriError::NotAbsolute)
    } else if scheme.eq_ignore_ascii_case("http") {
        Ok(Scheme::Http)
    } else if scheme.eq_ignore_ascii_case("https") {
        Ok(Scheme::Https)
    } else {
        Err(UriError::UnsupportedScheme)
    }
}

/// `host[:port]`, the host an IP literal (IPv6 in brackets) or a DNS name (not checked again
/// when `known`); `colon` is where the first `:` of `authority` is.
fn host_port(
    authority: &str,
    colon: Option<usize>,
    known: bool,
) -> Result<(&str, Option<u16>), UriError> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or(UriError::InvalidHost)?;
            host.parse::<Ipv6Addr>()
                .map_err(|_| UriError::InvalidHost)?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or(UriError::InvalidHost)?),
                ),
            }
        }
        None => {
            let (host, port) = match colon {
                Some(colon) => (&authority[..colon], Some(&authority[colon + 1..])),
                None => (authority, None),
            };
            if !known {
                check_host(host)?;
            }
            (host, port)
        }
    };
    Ok((host, port.map(parse_port).transpose()?))
}

/// An IP literal or a DNS name of LDH labels: the one host validator of the daemon
/// ([`Host::parse`](crate::target::Host::parse)).
fn check_host(host: &str) -> Result<(), UriError> {
    if host.is_empty() {
        return Err(UriError::EmptyHost);
    }
    Host::parse(host)
        .map(drop)
        .map_err(|_| UriError::InvalidHost)
}

fn parse_port(port: &str) -> Result<u16, UriError> {
    crate::target::parse_port(port).ok_or(UriError::InvalidPort)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_absolute_uris() {
        let cases: &[(&str, Scheme, &str, &str, u16, &str, &str)] = &[
            (
                "http://example.com",
                Scheme::Http,
                "example.com",
                "example.com",
                80,
                "",
                "/",
            ),
            (
                "http://example.com/a/b?c=d",
                Scheme::Http,
                "example.com",
                "example.com",
                80,
                "/a/b?c=d",
                "/a/b?c=d",
            ),
            (
                "HTTP://Example.COM:8080?x",
                Scheme::Http,
                "Example.COM:8080",
                "Example.COM",
                8080,
                "?x",
                "/?x",
            ),
            (
                "http://127.0.0.1:1/",
                Scheme::Http,
                "127.0.0.1:1",
                "127.0.0.1",
                1,
                "/",
                "/",
            ),
            (
                "http://[::1]:8080/p",
                Scheme::Http,
                "[::1]:8080",
                "::1",
                8080,
                "/p",
                "/p",
            ),
            (
                "http://[2001:db8::1]/",
                Scheme::Http,
                "[2001:db8::1]",
                "2001:db8::1",
                80,
                "/",
                "/",
            ),
            (
                "https://a.b:65535/",
                Scheme::Https,
                "a.b:65535",
                "a.b",
                65535,
                "/",
                "/",
            ),
            ("https://a.b", Scheme::Https, "a.b", "a.b", 443, "", "/"),
            (
                "http://xn--bcher-kva.example/%20",
                Scheme::Http,
                "xn--bcher-kva.example",
                "xn--bcher-kva.example",
                80,
                "/%20",
                "/%20",
            ),
            (
                "http://a-b.c1/?q=http://x@y",
                Scheme::Http,
                "a-b.c1",
                "a-b.c1",
                80,
                "/?q=http://x@y",
                "/?q=http://x@y",
            ),
        ];
        for (s, scheme, authority, host, port, pq, origin) in cases {
            let u = AbsoluteUri::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(
                (u.scheme, u.authority, u.host, u.port, u.path_and_query),
                (*scheme, *authority, *host, *port, *pq),
                "{s}"
            );
            assert_eq!((u.origin_form().as_ref(), u.as_str()), (*origin, *s));
        }
        let long_label = format!("http://{}.com/", "a".repeat(64));
        let long_name = format!("http://{}com/", "abcdefghi.".repeat(26));
        let refused: &[(&str, UriError)] = &[
            ("/path", UriError::NotAbsolute),
            ("example.com/x", UriError::NotAbsolute),
            ("http:/x", UriError::NotAbsolute),
            ("1http://a/", UriError::NotAbsolute),
            ("ftp://a/", UriError::UnsupportedScheme),
            ("ws://a/", UriError::UnsupportedScheme),
            ("http://a/#f", UriError::Fragment),
            ("http://a#f", UriError::Fragment),
            ("http://a/ b", UriError::Character),
            ("http://a/\u{e9}", UriError::Character),
            ("http://user@a/", UriError::UserInfo),
            ("http://user:pw@a:80/", UriError::UserInfo),
            ("http:///x", UriError::EmptyHost),
            ("http://:80/", UriError::EmptyHost),
            ("http://?x", UriError::EmptyHost),
            ("http://a..b/", UriError::InvalidHost),
            ("http://-a/", UriError::InvalidHost),
            ("http://a_b/", UriError::InvalidHost),
            ("http://%61/", UriError::InvalidHost),
            ("http://[::1/", UriError::InvalidHost),
            ("http://[::1]x/", UriError::InvalidHost),
            ("http://[1.2.3.4]/", UriError::InvalidHost),
            ("http://[fe80::1%25eth0]/", UriError::InvalidHost),
            ("http://[]/", UriError::InvalidHost),
            ("http://127.1/", UriError::InvalidHost),
            ("http://0x7f.1/", UriError::InvalidHost),
            ("http://a.0x7f/", UriError::InvalidHost),
            ("http://1.2.3.4.5/", UriError::InvalidHost),
            ("http://256.1.1.1/", UriError::InvalidHost),
            ("http://01.2.3.4/", UriError::InvalidHost),
            ("http://123/", UriError::InvalidHost),
            (&long_label, UriError::InvalidHost),
            (&long_name, UriError::InvalidHost),
            ("http://a:0/", UriError::InvalidPort),
            ("http://a:65536/", UriError::InvalidPort),
            ("http://a:/", UriError::InvalidPort),
            ("http://a:8a/", UriError::InvalidPort),
            ("http://a:+80/", UriError::InvalidPort),
            ("http://a:000080/", UriError::InvalidPort),
            ("http://a:1:2/", UriError::InvalidPort),
            ("http://[::1]:0/", UriError::InvalidPort),
        ];
        for (s, want) in refused {
            assert_eq!(AbsoluteUri::parse(s), Err(*want), "{s}");
        }
        assert_eq!(ProxyError::from(UriError::UserInfo).status(), 400);
    }

    proptest::proptest! {
        /// The `http(s)://` fast path answers exactly what the general parser does, for
        /// targets built from the bytes that steer either of them.
        #[test]
        fn http_targets_parse_as_the_general_parser_does(
            scheme in "(?i)(https?|ftp|h)(://|:/|:)?",
            authority in "[a-z0-9.:@#\\[\\]-]{0,24}",
            rest in "([/?#][ -~]{0,16})?",
            known in proptest::bool::ANY,
        ) {
            let uri = format!("{scheme}{authority}{rest}");
            let known = known.then_some(authority.as_str());
            proptest::prop_assert_eq!(
                AbsoluteUri::parse_visible(&uri, known),
                AbsoluteUri::parse_general(&uri, known),
                "{}", uri
            );
        }
    }
}
