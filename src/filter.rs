//! The filter language: which proxies of a pool a lease may use.
//!
//! A [`Filter`] is an AND of its scalar fields (country, city, source, isp, asn), an optional
//! geo constraint, the boolean combinators `all_of` / `any_of` / `none_of`, and an optional
//! predicate closure. The scalar fields at the top level form the filter's [`IndexKey`]: the
//! in-memory storage keeps an index per key, so such filters cost no scan. Everything else is
//! checked candidate by candidate.

use std::fmt;
use std::sync::Arc;

use crate::model::{Proxy, ProxyMeta};

/// Mean Earth radius used by the geo filter, in kilometres.
pub const EARTH_RADIUS_KM: f64 = 6371.0;

/// Tolerance for a geo filter without a radius (coordinates must match to within it).
const COORD_EPSILON: f64 = 1e-6;

/// A custom check on a proxy (library only; cannot come from a config file or a username).
#[derive(Clone)]
pub struct Predicate(Arc<dyn Fn(&Proxy) -> bool + Send + Sync>);

impl Predicate {
    /// Wraps a closure.
    pub fn new(f: impl Fn(&Proxy) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    fn call(&self, proxy: &Proxy) -> bool {
        (self.0)(proxy)
    }
}

impl fmt::Debug for Predicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Predicate(..)")
    }
}

/// Constraints on the proxies a lease may use. The default filter matches every proxy.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Values to match: country (without regard to ASCII case), city, source, isp and asn
    /// exactly; `latitude` and `longitude` are the centre of the geo constraint.
    pub meta: ProxyMeta,
    /// Radius around the centre in km (inclusive). Without it, the coordinates must match.
    pub radius_km: Option<f64>,
    /// Every one of these must match.
    pub all_of: Vec<Filter>,
    /// At least one of these must match (ignored when empty).
    pub any_of: Vec<Filter>,
    /// None of these may match.
    pub none_of: Vec<Filter>,
    /// A custom check.
    pub predicate: Option<Predicate>,
}

/// Why a filter is invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FilterError {
    /// Latitude given without longitude, or the reverse.
    #[error("latitude and longitude must be given together")]
    HalfCoordinate,
    /// A radius without a centre.
    #[error("radius_km needs latitude and longitude")]
    RadiusWithoutCenter,
    /// A radius that is not a positive finite number.
    #[error("radius_km must be a positive number, got {0}")]
    BadRadius(f64),
    /// Latitude outside [-90, 90] or longitude outside [-180, 180].
    #[error("coordinates out of range: latitude {0}, longitude {1}")]
    BadCoordinate(f64, f64),
    /// An empty string where a value is required.
    #[error("{0} must not be empty")]
    Empty(&'static str),
}

impl Filter {
    /// A filter that matches every proxy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires a country (stored upper-case).
    pub fn country(mut self, country: impl Into<String>) -> Self {
        let mut c: String = country.into();
        c.make_ascii_uppercase();
        self.meta.country = Some(c);
        self
    }

    /// Requires a city.
    pub fn city(mut self, city: impl Into<String>) -> Self {
        self.meta.city = Some(city.into());
        self
    }

    /// Requires a source.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.meta.source = Some(source.into());
        self
    }

    /// Requires an ISP.
    pub fn isp(mut self, isp: impl Into<String>) -> Self {
        self.meta.isp = Some(isp.into());
        self
    }

    /// Requires an ASN.
    pub fn asn(mut self, asn: u32) -> Self {
        self.meta.asn = Some(asn);
        self
    }

    /// Requires a location within `radius_km` of (`latitude`, `longitude`), inclusive.
    pub fn near(mut self, latitude: f64, longitude: f64, radius_km: f64) -> Self {
        self.meta.latitude = Some(latitude);
        self.meta.longitude = Some(longitude);
        self.radius_km = Some(radius_km);
        self
    }

    /// Adds clauses that must all match.
    pub fn all_of(mut self, filters: impl IntoIterator<Item = Filter>) -> Self {
        self.all_of.extend(filters);
        self
    }

    /// Adds clauses of which at least one must match.
    pub fn any_of(mut self, filters: impl IntoIterator<Item = Filter>) -> Self {
        self.any_of.extend(filters);
        self
    }

    /// Adds clauses of which none may match.
    pub fn none_of(mut self, filters: impl IntoIterator<Item = Filter>) -> Self {
        self.none_of.extend(filters);
        self
    }

    /// Adds a custom check.
    pub fn predicate(mut self, f: impl Fn(&Proxy) -> bool + Send + Sync + 'static) -> Self {
        self.predicate = Some(Predicate::new(f));
        self
    }

    /// Checks the whole tree: coordinates come in pairs, a radius needs a centre and is
    /// positive, coordinates are in range, strings are not empty.
    pub fn validate(&self) -> Result<(), FilterError> {
        for (name, v) in self.meta.strings() {
            if v.as_deref() == Some("") {
                return Err(FilterError::Empty(name));
            }
        }
        match (self.meta.latitude, self.meta.longitude) {
            (Some(lat), Some(lon)) => {
                if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                    return Err(FilterError::BadCoordinate(lat, lon));
                }
            }
            (None, None) if self.radius_km.is_some() => {
                return Err(FilterError::RadiusWithoutCenter);
            }
            (None, None) => {}
            _ => return Err(FilterError::HalfCoordinate),
        }
        if let Some(r) = self.radius_km
            && !(r.is_finite() && r > 0.0)
        {
            return Err(FilterError::BadRadius(r));
        }
        self.children().try_for_each(Filter::validate)
    }

    fn children(&self) -> impl Iterator<Item = &Filter> {
        self.all_of.iter().chain(&self.any_of).chain(&self.none_of)
    }

    /// Does `proxy` satisfy the filter?
    pub fn matches(&self, proxy: &Proxy) -> bool {
        self.index_key().matches(proxy)
            && self.matches_geo(proxy)
            && self.predicate.as_ref().is_none_or(|p| p.call(proxy))
            && self.all_of.iter().all(|f| f.matches(proxy))
            && (self.any_of.is_empty() || self.any_of.iter().any(|f| f.matches(proxy)))
            && !self.none_of.iter().any(|f| f.matches(proxy))
    }

    fn matches_geo(&self, proxy: &Proxy) -> bool {
        let (Some(lat), Some(lon)) = (self.meta.latitude, self.meta.longitude) else {
            return true;
        };
        let (Some(plat), Some(plon)) = (proxy.meta.latitude, proxy.meta.longitude) else {
            return false;
        };
        match self.radius_km {
            Some(r) => haversine_km(lat, lon, plat, plon) <= r,
            None => (lat - plat).abs() <= COORD_EPSILON && (lon - plon).abs() <= COORD_EPSILON,
        }
    }

    /// The top-level scalar fields, which the storage can index.
    pub fn index_key(&self) -> IndexKey {
        let m = &self.meta;
        IndexKey {
            country: m.country.as_ref().map(|c| c.to_ascii_uppercase()),
            city: m.city.clone(),
            source: m.source.clone(),
            isp: m.isp.clone(),
            asn: m.asn,
        }
    }

    /// True if matching needs more than the [`IndexKey`] (geo, combinators, predicate).
    pub fn has_residual(&self) -> bool {
        self.meta.latitude.is_some()
            || self.predicate.is_some()
            || !self.all_of.is_empty()
            || !self.any_of.is_empty()
            || !self.none_of.is_empty()
    }

    /// True if any predicate appears anywhere in the tree.
    pub fn has_predicate(&self) -> bool {
        self.predicate.is_some() || self.children().any(Filter::has_predicate)
    }
}

/// The indexable part of a filter: equality on scalar fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IndexKey {
    /// Country code, upper-case.
    pub country: Option<String>,
    /// City.
    pub city: Option<String>,
    /// Source.
    pub source: Option<String>,
    /// ISP.
    pub isp: Option<String>,
    /// ASN.
    pub asn: Option<u32>,
}

impl IndexKey {
    /// True when the key constrains nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Does `proxy` have every field the key names?
    pub fn matches(&self, proxy: &Proxy) -> bool {
        fn eq(want: &Option<String>, have: &Option<String>) -> bool {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        }
        let m = &proxy.meta;
        self.country.as_ref().is_none_or(|w| {
            m.country
                .as_ref()
                .is_some_and(|c| c.eq_ignore_ascii_case(w))
        }) && eq(&self.city, &m.city)
            && eq(&self.source, &m.source)
            && eq(&self.isp, &m.isp)
            && self.asn.is_none_or(|a| m.asn == Some(a))
    }
}

/// Great-circle distance between two points in km (haversine, R = 6371 km).
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = (lat2 - lat1).to_radians();
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * a.sqrt().atan2((1.0 - a).sqrt())
}
