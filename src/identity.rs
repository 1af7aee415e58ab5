//! Who is asking and for what: credentials, the username grammar, `X-Pharox-*` headers.
//!
//! The username is `CONSUMER(-KEY-VALUE)*`, e.g. `worker-1-pool-latam-country-ar`. The
//! consumer is every segment before the first segment that is a key; then keys and values
//! alternate, one segment each, except that a `pool` value may span several segments when
//! they join to a configured pool name (`pool-latam-residential`). Headers override username
//! parameters; `X-Pharox-Consumer` counts only where auth is not required.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::error::ProxyError;
use crate::filter::Filter;
use crate::model::{DEFAULT_CONSUMER_NAME, LeaseId, ProxyMeta, Secret};

pub use crate::config::USERNAME_KEYS;

/// Identity headers. All `X-Pharox-*` headers are removed before forwarding.
pub mod headers {
    /// Pool override.
    pub const POOL: &str = "x-pharox-pool";
    /// Country override.
    pub const COUNTRY: &str = "x-pharox-country";
    /// City override.
    pub const CITY: &str = "x-pharox-city";
    /// Source override.
    pub const SOURCE: &str = "x-pharox-source";
    /// Session override.
    pub const SESSION: &str = "x-pharox-session";
    /// Consumer, honoured only where auth is not required.
    pub const CONSUMER: &str = "x-pharox-consumer";
}

/// What a username asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsernameParams {
    /// Consumer name.
    pub consumer: String,
    /// `pool`
    pub pool: Option<String>,
    /// `country` (upper-cased), `city`, `source`, `isp`, `asn`.
    pub meta: ProxyMeta,
    /// `session`
    pub session: Option<String>,
    /// `ttl` (session seconds)
    pub ttl: Option<u64>,
    /// `lease`: use this lease (taken through the lease API) instead of taking one.
    pub lease: Option<LeaseId>,
}

/// Longest username accepted, in bytes (the SOCKS5 limit: RFC 1929 carries it in 255 bytes).
pub const MAX_USERNAME: usize = 255;

/// Parses a username. `is_pool` tells configured pool names (for dashed pool values); a pool
/// value spans at most `max_pool_segments` segments. Linear in the username's length.
pub fn parse_username(
    user: &str,
    is_pool: &dyn Fn(&str) -> bool,
    max_pool_segments: usize,
) -> Result<UsernameParams, ProxyError> {
    let bad = |m: String| Err(ProxyError::BadUsername(m));
    if user.len() > MAX_USERNAME {
        return bad(format!("longer than {MAX_USERNAME} bytes"));
    }
    // Segments as slices of `user`: `seg(i..j)` is segments i..j joined by their dashes. On
    // the stack for usual user names (a heap allocation each otherwise, on every new client
    // connection).
    let segs: SmallVec<[&str; 16]> = user.split('-').collect();
    let offsets: SmallVec<[usize; 16]> = segs
        .iter()
        .scan(0, |at, s| {
            let start = *at;
            *at += s.len() + 1;
            Some(start)
        })
        .collect();
    let seg = |i: usize, j: usize| &user[offsets[i]..offsets[j - 1] + segs[j - 1].len()];
    let first_key = segs
        .iter()
        .position(|s| USERNAME_KEYS.contains(s))
        .unwrap_or(segs.len());
    if first_key == 0 {
        return bad("the user name must start with the consumer name".into());
    }
    if segs[..first_key].iter().any(|s| s.is_empty()) {
        return bad("empty segment in the consumer name".into());
    }
    let mut p = UsernameParams {
        consumer: seg(0, first_key).to_owned(),
        ..Default::default()
    };
    let mut i = first_key;
    while i < segs.len() {
        let key = segs[i];
        if !USERNAME_KEYS.contains(&key) {
            return bad(format!("unknown key `{key}`"));
        }
        if key == "lease" {
            // The rest of the username: a UUID has dashes of its own.
            if i != first_key {
                return bad("`lease` goes alone after the consumer name".into());
            }
            if i + 1 >= segs.len() {
                return bad("key `lease` has no value".into());
            }
            let value = seg(i + 1, segs.len());
            p.lease = Some(value.parse().map_err(|_| {
                ProxyError::BadUsername(format!("lease `{value}` is not a lease id (a UUID)"))
            })?);
            break;
        }
        let mut end = i + 2;
        if key == "pool" {
            // Longest run of segments (up to the longest pool name's) naming a pool.
            let longest = (i + 1 + max_pool_segments.max(1)).min(segs.len());
            if let Some(e) = (i + 2..=longest).rev().find(|&e| is_pool(seg(i + 1, e))) {
                end = e;
            }
        }
        if end > segs.len() || segs[i + 1..end].iter().any(|s| s.is_empty()) {
            return bad(format!("key `{key}` has no value"));
        }
        set_param(&mut p, key, seg(i + 1, end).to_owned())?;
        i = end;
    }
    Ok(p)
}

fn set_param(p: &mut UsernameParams, key: &str, value: String) -> Result<(), ProxyError> {
    let dup = |k: &str| ProxyError::BadUsername(format!("key `{k}` given twice"));
    let slot = match key {
        "pool" => &mut p.pool,
        "country" => &mut p.meta.country,
        "city" => &mut p.meta.city,
        "source" => &mut p.meta.source,
        "isp" => &mut p.meta.isp,
        "session" => &mut p.session,
        "asn" => {
            let v = value
                .parse()
                .map_err(|_| ProxyError::BadUsername(format!("asn `{value}` is not a number")))?;
            return p.meta.asn.replace(v).map_or(Ok(()), |_| Err(dup(key)));
        }
        "ttl" => {
            let v = value.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
                ProxyError::BadUsername(format!("ttl `{value}` is not a positive number"))
            })?;
            return p.ttl.replace(v).map_or(Ok(()), |_| Err(dup(key)));
        }
        _ => unreachable!("keys are checked by the caller"),
    };
    let value = if key == "country" {
        value.to_ascii_uppercase()
    } else {
        value
    };
    slot.replace(value).map_or(Ok(()), |_| Err(dup(key)))
}

/// A configured consumer, as identity needs it.
#[derive(Debug, Clone)]
struct ConsumerEntry {
    name: Arc<str>,
    password: Option<Secret>,
    pools: Vec<Arc<str>>,
    default_pool: Option<Arc<str>>,
}

/// The resolved identity of a request.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The consumer.
    pub consumer: Arc<str>,
    /// The pool to lease from.
    pub pool: Arc<str>,
    /// Constraints from the username and headers.
    pub filter: Option<Arc<Filter>>,
    /// Sticky session id, if any.
    pub session: Option<String>,
    /// Requested session TTL in seconds, if any.
    pub ttl: Option<u64>,
    /// A lease of the lease API to use (`-lease-ID`): no new acquire, exactly that lease.
    /// `pool` is empty then: the lease's own pool applies.
    pub lease: Option<LeaseId>,
}

/// Everything needed to authenticate and identify requests; built from the config.
#[derive(Debug, Clone)]
pub struct Authenticator {
    required: bool,
    // Consumers come from the config file alone, so a fast hash is safe: a client's names
    // are looked up, never inserted. Pools also come from the storage, where the lease API,
    // Python workers and other daemons add names: the default (keyed) hash.
    consumers: HashMap<String, ConsumerEntry, FxBuildHasher>,
    pools: HashMap<String, Arc<str>>,
    /// Segments of the longest pool name (`a-b-c` has 3).
    pool_segments: usize,
    default_pool: Option<Arc<str>>,
}

/// Looks up a request header by lower-case name.
pub type HeaderLookup<'a> = &'a dyn Fn(&str) -> Option<&'a [u8]>;

impl Authenticator {
    /// Builds the tables from a validated config, plus `discovered` pools (in the storage,
    /// not in the config: usable by consumers allowed every pool).
    pub fn new(config: &Config, discovered: &[Arc<str>]) -> Self {
        let pools: HashMap<String, Arc<str>> = config
            .pools
            .iter()
            .map(|p| Arc::from(p.name.as_str()))
            .chain(discovered.iter().cloned())
            .map(|p| (p.to_string(), p))
            .collect();
        let consumers = config
            .consumers
            .iter()
            .map(|c| {
                let entry = ConsumerEntry {
                    name: Arc::from(c.name.as_str()),
                    password: c.password.clone(),
                    pools: c.pools.iter().map(|p| pools[p].clone()).collect(),
                    default_pool: c.default_pool.as_ref().map(|p| pools[p].clone()),
                };
                (c.name.clone(), entry)
            })
            .collect();
        let pool_segments = pools
            .keys()
            .map(|p| p.split('-').count())
            .max()
            .unwrap_or(1);
        Self {
            required: config.auth.required,
            consumers,
            default_pool: config.global_default_pool().map(|p| pools[p].clone()),
            pools,
            pool_segments,
        }
    }

    /// Authenticates and identifies a request from its `Proxy-Authorization` value and its
    /// headers.
    pub fn identify(
        &self,
        authorization: Option<&[u8]>,
        header: HeaderLookup<'_>,
    ) -> Result<Identity, ProxyError> {
        let mut buf = Decoded::new();
        let credentials = authorization
            .map(|a| decode_basic_into(a, &mut buf))
            .transpose()?;
        self.identify_credentials(credentials, header)
    }

    /// Whether credentials are required.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Authenticates and identifies from a user name and password (already decoded, as
    /// SOCKS5 carries them) and the request's headers.
    pub fn identify_credentials(
        &self,
        credentials: Option<(&str, &str)>,
        header: HeaderLookup<'_>,
    ) -> Result<Identity, ProxyError> {
        let (consumer, params) = match credentials {
            Some((user, password)) => {
                let params =
                    parse_username(user, &|p| self.pools.contains_key(p), self.pool_segments)?;
                let consumer = self.authenticate(&params.consumer, password)?;
                (consumer, params)
            }
            None if self.required => return Err(ProxyError::AuthRequired),
            None => {
                let name = header_str(header, headers::CONSUMER)?.unwrap_or(DEFAULT_CONSUMER_NAME);
                let consumer = self.authenticate_open(name)?;
                (
                    consumer,
                    UsernameParams {
                        consumer: name.to_owned(),
                        ..Default::default()
                    },
                )
            }
        };
        self.resolve(consumer, params, header)
    }

    /// Checks a consumer's password (constant time in the password's content).
    fn authenticate(
        &self,
        name: &str,
        password: &str,
    ) -> Result<(Arc<str>, Option<&ConsumerEntry>), ProxyError> {
        match self.consumers.get(name) {
            Some(entry) => {
                let ok = match &entry.password {
                    Some(want) => bool::from(want.expose().as_bytes().ct_eq(password.as_bytes())),
                    None => !self.required,
                };
                if ok {
                    Ok((entry.name.clone(), Some(entry)))
                } else {
                    Err(ProxyError::AuthFailed)
                }
            }
            None if !self.required && name == DEFAULT_CONSUMER_NAME => Ok((Arc::from(name), None)),
            None => Err(ProxyError::AuthFailed),
        }
    }

    /// Without credentials (auth not required): a configured consumer without a password,
    /// or `default`.
    fn authenticate_open(
        &self,
        name: &str,
    ) -> Result<(Arc<str>, Option<&ConsumerEntry>), ProxyError> {
        match self.consumers.get(name) {
            Some(entry) if entry.password.is_none() => Ok((entry.name.clone(), Some(entry))),
            Some(_) => Err(ProxyError::AuthRequired),
            None if name == DEFAULT_CONSUMER_NAME => Ok((Arc::from(name), None)),
            None => Err(ProxyError::AuthFailed),
        }
    }

    fn resolve(
        &self,
        (consumer, entry): (Arc<str>, Option<&ConsumerEntry>),
        mut params: UsernameParams,
        header: HeaderLookup<'_>,
    ) -> Result<Identity, ProxyError> {
        if let Some(v) = header_str(header, headers::POOL)? {
            params.pool = Some(v.to_owned());
        }
        if let Some(v) = header_str(header, headers::COUNTRY)? {
            params.meta.country = Some(v.to_ascii_uppercase());
        }
        if let Some(v) = header_str(header, headers::CITY)? {
            params.meta.city = Some(v.to_owned());
        }
        if let Some(v) = header_str(header, headers::SOURCE)? {
            params.meta.source = Some(v.to_owned());
        }
        if let Some(v) = header_str(header, headers::SESSION)? {
            params.session = Some(v.to_owned());
        }
        if let Some(id) = &params.session
            && (id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c)))
        {
            return Err(ProxyError::BadUsername(
                "a session id is 1-64 of A-Z a-z 0-9 _ . : -".into(),
            ));
        }
        if params.ttl.is_some() && params.session.is_none() {
            return Err(ProxyError::BadUsername("ttl needs a session".into()));
        }
        if let Some(lease) = params.lease {
            if params.pool.is_some()
                || params.session.is_some()
                || params.meta != ProxyMeta::default()
            {
                return Err(ProxyError::BadUsername(
                    "a lease goes without pool, session or filter parameters".into(),
                ));
            }
            return Ok(Identity {
                consumer,
                pool: Arc::from(""),
                filter: None,
                session: None,
                ttl: None,
                lease: Some(lease),
            });
        }
        let pool = match &params.pool {
            Some(name) => self
                .pools
                .get(name)
                .cloned()
                .ok_or_else(|| ProxyError::UnknownPool(name.clone()))?,
            None => entry
                .and_then(|e| e.default_pool.clone())
                .or_else(|| self.default_pool.clone())
                .ok_or_else(|| {
                    ProxyError::BadRequest("no pool named and no default pool".into())
                })?,
        };
        if let Some(e) = entry
            && !e.pools.is_empty()
            && !e.pools.contains(&pool)
        {
            return Err(ProxyError::PoolForbidden(pool.to_string()));
        }
        let filter = Filter {
            meta: params.meta,
            ..Filter::default()
        };
        let filter = (!filter.index_key().is_empty()).then(|| Arc::new(filter));
        Ok(Identity {
            consumer,
            pool,
            filter,
            session: params.session,
            ttl: params.ttl,
            lease: None,
        })
    }

    /// Whether `consumer` may use `pool` (a consumer without a list may use every pool).
    pub fn allows(&self, consumer: &str, pool: &str) -> bool {
        match self.consumers.get(consumer) {
            Some(e) => e.pools.is_empty() || e.pools.iter().any(|p| &**p == pool),
            None => true,
        }
    }
}

/// A header's value as text; empty values count as absent, non-UTF-8 is a bad request.
fn header_str<'a>(header: HeaderLookup<'a>, name: &str) -> Result<Option<&'a str>, ProxyError> {
    match header(name) {
        None => Ok(None),
        Some(v) => {
            let s = std::str::from_utf8(v)
                .map_err(|_| ProxyError::BadRequest(format!("{name} is not valid text")))?
                .trim();
            Ok((!s.is_empty()).then_some(s))
        }
    }
}

/// Decodes `Basic base64(user:password)`.
pub fn decode_basic(value: &[u8]) -> Result<(String, String), ProxyError> {
    let mut buf = Decoded::new();
    decode_basic_into(value, &mut buf).map(|(u, p)| (u.to_owned(), p.to_owned()))
}

/// Room for decoded credentials; typical ones fit without a heap allocation.
type Decoded = smallvec::SmallVec<[u8; 256]>;

/// [`decode_basic`] into `buf`, borrowing the user and password from it.
fn decode_basic_into<'b>(
    value: &[u8],
    buf: &'b mut Decoded,
) -> Result<(&'b str, &'b str), ProxyError> {
    let bad = || ProxyError::AuthFailed;
    let value = std::str::from_utf8(value).map_err(|_| bad())?.trim();
    let (scheme, token) = value.split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad());
    }
    let token = token.trim();
    buf.resize(base64::decoded_len_estimate(token.len()), 0);
    let n = base64::engine::general_purpose::STANDARD
        .decode_slice(token, buf)
        .map_err(|_| bad())?;
    buf.truncate(n);
    let text = std::str::from_utf8(buf).map_err(|_| bad())?;
    text.split_once(':').ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(user: &str) -> Result<UsernameParams, ProxyError> {
        parse_username(
            user,
            &|p| ["latam", "latam-residential", "eu"].contains(&p),
            2,
        )
    }

    #[test]
    fn username_grammar_table() {
        let ok = |user: &str, consumer: &str, pool: Option<&str>, country: Option<&str>| {
            let p = parse(user).unwrap_or_else(|e| panic!("{user}: {e}"));
            assert_eq!(
                (
                    p.consumer.as_str(),
                    p.pool.as_deref(),
                    p.meta.country.as_deref()
                ),
                (consumer, pool, country),
                "{user}"
            );
            p
        };
        ok("worker", "worker", None, None);
        ok("worker-1", "worker-1", None, None);
        ok("team-a-worker-7", "team-a-worker-7", None, None);
        ok("worker-1-pool-latam", "worker-1", Some("latam"), None);
        ok(
            "worker-1-pool-latam-country-ar",
            "worker-1",
            Some("latam"),
            Some("AR"),
        );
        ok(
            "worker-1-country-AR-pool-latam",
            "worker-1",
            Some("latam"),
            Some("AR"),
        );
        ok(
            "worker-1-pool-latam-residential-country-br",
            "worker-1",
            Some("latam-residential"),
            Some("BR"),
        );
        ok("worker-1-pool-unknown", "worker-1", Some("unknown"), None);
        let p = ok(
            "w-city-Cordoba-source-vendor-isp-Telecom-asn-7303-session-abc-ttl-60",
            "w",
            None,
            None,
        );
        assert_eq!(
            (
                p.meta.city.as_deref(),
                p.meta.source.as_deref(),
                p.meta.isp.as_deref(),
                p.meta.asn,
                p.session.as_deref(),
                p.ttl
            ),
            (
                Some("Cordoba"),
                Some("vendor"),
                Some("Telecom"),
                Some(7303),
                Some("abc"),
                Some(60)
            )
        );
    }

    #[test]
    fn username_grammar_errors() {
        for (user, why) in [
            ("pool-latam", "start with the consumer"),
            ("worker-1-pool", "`pool` has no value"),
            ("worker-1-pool-latam-colour-red", "unknown key `colour`"),
            ("worker-1-asn-abc", "not a number"),
            ("worker-1-ttl-0", "positive"),
            ("worker-1-country-ar-country-br", "given twice"),
            ("worker--1", "empty segment"),
            ("worker-1-city-", "`city` has no value"),
        ] {
            let err = parse(user).expect_err(user).to_string();
            assert!(err.contains(why), "{user}: {err}");
            assert_eq!(parse(user).unwrap_err().code(), "bad_username", "{user}");
        }
        let long = format!("w-session-{}", "a".repeat(MAX_USERNAME));
        assert!(
            parse(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
        assert!(parse(&"-".repeat(MAX_USERNAME)).is_err());
        // `pool-unknown-x`: the value is one segment, then `x` is in key position.
        assert!(
            parse("worker-1-pool-unknown-x")
                .unwrap_err()
                .to_string()
                .contains("unknown key `x`")
        );
    }

    #[test]
    fn basic_credentials() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("worker-1-pool-eu:p:a:ss");
        let (u, p) = decode_basic(format!("Basic {b64}").as_bytes()).unwrap();
        assert_eq!((u.as_str(), p.as_str()), ("worker-1-pool-eu", "p:a:ss"));
        assert_eq!(
            decode_basic(format!("basic  {b64}").as_bytes()).unwrap().0,
            "worker-1-pool-eu"
        );
        // Longer than the inline decode buffer.
        let long = "x".repeat(1000);
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("w:{long}"));
        let (u, p) = decode_basic(format!("Basic {b64}").as_bytes()).unwrap();
        assert_eq!((u.as_str(), p.as_str()), ("w", long.as_str()));
        // Not UTF-8 once decoded.
        let b64 = base64::engine::general_purpose::STANDARD.encode([b'w', b':', 0xff, 0xfe]);
        assert!(decode_basic(format!("Basic {b64}").as_bytes()).is_err());
        for bad in ["Bearer x", "Basic !!!", "Basic", ""] {
            assert_eq!(
                decode_basic(bad.as_bytes()).unwrap_err(),
                ProxyError::AuthFailed,
                "{bad}"
            );
        }
    }
}
