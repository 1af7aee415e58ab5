//! Upstream URLs (`scheme://[user:pass@]host:port`, `direct`), `host:port` splitting,
//! `%`-decoding, `proxies_file` lines, and the default id of a configured upstream.

use std::path::PathBuf;

use super::{PoolConfig, ProxyConfig};
use crate::model::{ProxyProtocol, Secret};

/// An upstream URL, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// Scheme.
    pub protocol: ProxyProtocol,
    /// Host (empty for direct).
    pub host: String,
    /// Port (0 for direct).
    pub port: u16,
    /// User name, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Secret>,
}

/// Parses an upstream URL. Errors never include the password.
pub fn parse_upstream_url(url: &str) -> Result<UpstreamUrl, String> {
    if url == "direct" || url == "direct://" {
        return Ok(UpstreamUrl {
            protocol: ProxyProtocol::Direct,
            host: String::new(),
            port: 0,
            username: None,
            password: None,
        });
    }
    let (scheme, rest) = url.split_once("://").ok_or("expected scheme://host:port")?;
    let protocol: ProxyProtocol = scheme
        .parse()
        .map_err(|e: crate::model::UnknownName| e.to_string())?;
    if protocol == ProxyProtocol::Direct {
        return Err("`direct` takes no host".into());
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            let user = percent_decode(user).ok_or("bad %-escape in user name")?;
            let pass = percent_decode(pass).ok_or("bad %-escape in password")?;
            if user.is_empty() {
                return Err("empty user name".into());
            }
            (Some(user), Some(Secret::new(pass)))
        }
    };
    let (host, port) = split_host_port(hostport).ok_or("expected host:port")?;
    if host.is_empty() || port == 0 {
        return Err("expected host:port with a non-zero port".into());
    }
    Ok(UpstreamUrl {
        protocol,
        host,
        port,
        username,
        password,
    })
}

/// Splits `host:port` or `[v6]:port`; the host comes back without brackets.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h, p)
    };
    if host.is_empty() || host.contains(['/', ' ', '@']) {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

/// Decodes `%XX` escapes; `None` for a bad escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses one `proxies_file` line: `URL [key=value ...]`. Blank lines and `#` comments give
/// `None`.
pub fn parse_proxy_line(line: &str) -> Result<Option<ProxyConfig>, String> {
    let line = line.split_once(" #").map_or(line, |(l, _)| l).trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let mut words = line.split_whitespace();
    let mut p = ProxyConfig {
        url: words.next().unwrap_or_default().to_owned(),
        ..Default::default()
    };
    for word in words {
        let (k, v) = word
            .split_once('=')
            .ok_or_else(|| format!("`{word}`: expected key=value"))?;
        let num = |what: &str| format!("{k}: `{v}` is not {what}");
        match k {
            "id" => p.id = Some(v.to_owned()),
            "max_concurrency" => p.max_concurrency = Some(v.parse().map_err(|_| num("a count"))?),
            "country" => p.meta.country = Some(v.to_owned()),
            "city" => p.meta.city = Some(v.to_owned()),
            "source" => p.meta.source = Some(v.to_owned()),
            "isp" => p.meta.isp = Some(v.to_owned()),
            "asn" => p.meta.asn = Some(v.parse().map_err(|_| num("a number"))?),
            "latitude" => p.meta.latitude = Some(v.parse().map_err(|_| num("a number"))?),
            "longitude" => p.meta.longitude = Some(v.parse().map_err(|_| num("a number"))?),
            "bind" => p.bind = Some(v.parse().map_err(|_| num("an IP address"))?),
            "ca_file" => p.ca_file = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown key `{k}`")),
        }
    }
    Ok(Some(p))
}

/// The id of a configured upstream: its `id`, or `POOL/host:port` (`POOL/direct`).
pub fn proxy_id(pool: &PoolConfig, p: &ProxyConfig) -> Result<String, String> {
    let url = parse_upstream_url(&p.url)?;
    Ok(match (&p.id, url.protocol) {
        (Some(id), _) => id.clone(),
        (None, ProxyProtocol::Direct) => match p.bind {
            Some(ip) => format!("{}/direct@{ip}", pool.name),
            None => format!("{}/direct", pool.name),
        },
        (None, _) if url.host.contains(':') => format!("{}/[{}]:{}", pool.name, url.host, url.port),
        (None, _) => format!("{}/{}:{}", pool.name, url.host, url.port),
    })
}

/// A URL with its password replaced by `***` (`scheme://user:***@host/...`), for logs,
/// `pharox check` and error messages. A URL that does not parse comes back as `***`.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{masked}@{host}{}", mask_query(tail))
        }
        None => format!("{scheme}://{authority}{}", mask_query(tail)),
    }
}

/// Masks `password=` in a query string too (libpq URLs may carry it there).
fn mask_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_owned(),
        })
        .collect();
    format!("{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_masked() {
        for (url, want) in [
            (
                "postgres://u:s3cret@db:5432/x?sslmode=require",
                "postgres://u:***@db:5432/x?sslmode=require",
            ),
            ("postgres://u@db/x", "postgres://u@db/x"),
            (
                "postgres://db/x?user=u&password=s3cret",
                "postgres://db/x?user=u&password=***",
            ),
            ("postgres://u:p%40ss@db", "postgres://u:***@db"),
            ("not a url s3cret", "***"),
        ] {
            assert_eq!(mask_url(url), want);
            assert!(!mask_url(url).contains("s3cret"));
        }
    }
}
