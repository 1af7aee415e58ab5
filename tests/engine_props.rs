//! Property tests: the indexed in-memory storage against a naive model that scans every
//! proxy (selection, lease accounting, caps, draining), and algebraic laws of filters.
//! Lowering a leased proxy's cap keeps its leases; only new leases respect the new cap.

use std::time::{Duration, SystemTime};

use pharox::{
    AcquireRequest, Filter, InMemoryStorage, Lease, Pool, Proxy, ProxyId, ProxyProtocol,
    ProxyStatus, Selector, Storage,
};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Spec {
    country: Option<&'static str>,
    city: Option<&'static str>,
    asn: Option<u32>,
    cap: Option<u32>,
    status: ProxyStatus,
    checked: u64,
    latency_ms: Option<u64>,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::option::of(prop::sample::select(vec!["AR", "BR", "US"])),
        prop::option::of(prop::sample::select(vec!["north", "south"])),
        prop::option::of(1u32..3),
        prop::option::of(1u32..3),
        prop::sample::select(vec![
            ProxyStatus::Active,
            ProxyStatus::Active,
            ProxyStatus::Active,
            ProxyStatus::Inactive,
            ProxyStatus::Banned,
        ]),
        0u64..4,
        prop::option::of(prop::sample::select(vec![10u64, 20, 30])),
    )
        .prop_map(
            |(country, city, asn, cap, status, checked, latency_ms)| Spec {
                country,
                city,
                asn,
                cap,
                status,
                checked,
                latency_ms,
            },
        )
}

fn build(id: usize, s: &Spec) -> Proxy {
    let mut p = Proxy::new(
        format!("p{id:02}"),
        "pool",
        ProxyProtocol::Http,
        "10.0.0.1",
        1000 + id as u16,
    );
    p.meta.country = s.country.map(str::to_owned);
    p.meta.city = s.city.map(str::to_owned);
    p.meta.asn = s.asn;
    p.max_concurrency = s.cap;
    p.status = s.status;
    p.checked_at = SystemTime::UNIX_EPOCH + Duration::from_secs(s.checked);
    p.latency = s.latency_ms.map(Duration::from_millis);
    p
}

#[derive(Clone, Debug)]
enum FilterSpec {
    None,
    Country(&'static str),
    CountryCity(&'static str, &'static str),
    Asn(u32),
    /// Indexed part plus a residual clause.
    CountryNotCity(&'static str, &'static str),
    EvenPort,
}

impl FilterSpec {
    fn filter(&self) -> Option<Filter> {
        Some(match *self {
            FilterSpec::None => return None,
            FilterSpec::Country(c) => Filter::new().country(c),
            FilterSpec::CountryCity(c, t) => Filter::new().country(c).city(t),
            FilterSpec::Asn(a) => Filter::new().asn(a),
            FilterSpec::CountryNotCity(c, t) => {
                Filter::new().country(c).none_of([Filter::new().city(t)])
            }
            FilterSpec::EvenPort => Filter::new().predicate(|p| p.port % 2 == 0),
        })
    }
}

fn filter_spec() -> impl Strategy<Value = FilterSpec> {
    let country = prop::sample::select(vec!["AR", "BR", "US", "ar"]);
    let city = prop::sample::select(vec!["north", "south"]);
    prop_oneof![
        Just(FilterSpec::None),
        country.clone().prop_map(FilterSpec::Country),
        (country.clone(), city.clone()).prop_map(|(c, t)| FilterSpec::CountryCity(c, t)),
        (1u32..3).prop_map(FilterSpec::Asn),
        (country, city).prop_map(|(c, t)| FilterSpec::CountryNotCity(c, t)),
        Just(FilterSpec::EvenPort),
    ]
}

#[derive(Clone, Debug)]
enum Op {
    Acquire(Selector, FilterSpec),
    Release(usize),
    ReleaseTwice(usize),
    SetStatus(usize, ProxyStatus),
    Update(usize, Spec),
    Remove(usize),
    Readd(usize),
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    let selector = prop::sample::select(Selector::ALL.to_vec());
    prop_oneof![
        6 => (selector, filter_spec()).prop_map(|(s, f)| Op::Acquire(s, f)),
        4 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::ReleaseTwice),
        1 => (0..n, prop::sample::select(vec![ProxyStatus::Active, ProxyStatus::Banned])).prop_map(|(i, s)| Op::SetStatus(i, s)),
        1 => (0..n, spec()).prop_map(|(i, s)| Op::Update(i, s)),
        1 => (0..n).prop_map(Op::Remove),
        1 => (0..n).prop_map(Op::Readd),
    ]
}

/// The naive model: a list in inventory order, scanned on every acquire.
struct Model {
    /// (proxy, leases, draining), inventory order.
    items: Vec<(Proxy, u32, bool)>,
    rr_last: Option<ProxyId>,
}

impl Model {
    fn eligible(&self, f: Option<&Filter>) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| {
                let (p, leases, draining) = &self.items[i];
                !draining
                    && p.status == ProxyStatus::Active
                    && p.max_concurrency.is_none_or(|m| *leases < m)
                    && f.is_none_or(|f| f.matches(p))
            })
            .collect()
    }

    /// The deterministic choice, or `None` for random (any eligible is fine).
    fn choose(&self, sel: Selector, f: Option<&Filter>) -> Option<Option<ProxyId>> {
        let e = self.eligible(f);
        let id = |i: usize| self.items[i].0.id.clone();
        Some(match sel {
            Selector::FirstAvailable => e.first().map(|&i| id(i)),
            Selector::LeastUsed => e
                .iter()
                .min_by_key(|&&i| (self.items[i].1, self.items[i].0.checked_at, id(i)))
                .map(|&i| id(i)),
            Selector::LowestLatency => e
                .iter()
                .min_by_key(|&&i| {
                    let lat = self.items[i]
                        .0
                        .latency
                        .map_or(u64::MAX, |d| d.as_micros() as u64);
                    (lat, self.items[i].1, id(i))
                })
                .map(|&i| id(i)),
            Selector::RoundRobin => {
                let mut ids: Vec<ProxyId> = e.iter().map(|&i| id(i)).collect();
                ids.sort();
                let next = self
                    .rr_last
                    .as_ref()
                    .and_then(|l| ids.iter().find(|x| *x > l).cloned());
                next.or_else(|| ids.first().cloned())
            }
            Selector::Random => return None,
        })
    }

    fn index(&self, id: &ProxyId) -> Option<usize> {
        self.items.iter().position(|(p, _, _)| &p.id == id)
    }

    fn reap(&mut self, i: usize) {
        if self.items[i].2 && self.items[i].1 == 0 {
            self.items.remove(i);
        }
    }
}

async fn check_accounting(s: &InMemoryStorage, model: &Model, held: &[Lease]) {
    let infos = s.list_proxies("pool").await.unwrap();
    let got: Vec<(String, u32, bool)> = infos
        .iter()
        .map(|i| (i.proxy.id.to_string(), i.current_leases, i.draining))
        .collect();
    let want: Vec<(String, u32, bool)> = model
        .items
        .iter()
        .map(|(p, l, d)| (p.id.to_string(), *l, *d))
        .collect();
    assert_eq!(got, want);
    let stats = s.pool_stats("pool").await.unwrap().unwrap();
    assert_eq!(stats.total_leases, held.len() as u64);
    let listed = model.items.iter().filter(|x| !x.2);
    assert_eq!(stats.total as usize, listed.clone().count());
    assert_eq!(
        stats.active as usize,
        listed.filter(|x| x.0.status == ProxyStatus::Active).count()
    );
    assert_eq!(stats.available as usize, model.eligible(None).len());
    assert_eq!(
        stats.leased as usize,
        model.items.iter().filter(|x| x.1 > 0).count()
    );
}

async fn run(specs: Vec<Spec>, ops: Vec<Op>) {
    let s = InMemoryStorage::new();
    s.upsert_pool(Pool::new("pool")).await.unwrap();
    let mut model = Model {
        items: Vec::new(),
        rr_last: None,
    };
    for (i, sp) in specs.iter().enumerate() {
        let p = build(i, sp);
        s.upsert_proxy(p.clone()).await.unwrap();
        model.items.push((p, 0, false));
    }
    let now = SystemTime::now();
    let mut held: Vec<Lease> = Vec::new();
    for op in ops {
        match op {
            Op::Acquire(sel, fs) => {
                let f = fs.filter();
                let want = model.choose(sel, f.as_ref());
                let mut req = AcquireRequest::new("pool").selector(sel);
                if let Some(f) = f.clone() {
                    req = req.filter(f);
                }
                let got = s.acquire(&req, now).await.unwrap().lease;
                let got_id = got.as_ref().map(|l| l.proxy_id().clone());
                match want {
                    Some(want) => assert_eq!(got_id, want, "{sel} {fs:?}"),
                    None => {
                        let eligible: Vec<ProxyId> = model
                            .eligible(f.as_ref())
                            .iter()
                            .map(|&i| model.items[i].0.id.clone())
                            .collect();
                        match &got_id {
                            Some(id) => {
                                assert!(eligible.contains(id), "random chose ineligible {id}")
                            }
                            None => assert!(eligible.is_empty()),
                        }
                    }
                }
                if let Some(lease) = got {
                    let i = model.index(lease.proxy_id()).unwrap();
                    model.items[i].1 += 1;
                    let (p, leases, _) = &model.items[i];
                    assert!(
                        p.max_concurrency.is_none_or(|m| *leases <= m),
                        "cap exceeded: {p:?}"
                    );
                    if sel == Selector::RoundRobin {
                        model.rr_last = Some(lease.proxy_id().clone());
                    }
                    held.push(lease);
                }
            }
            Op::Release(k) | Op::ReleaseTwice(k) if !held.is_empty() => {
                let lease = held.remove(k % held.len());
                assert!(s.release(&lease, now).await.unwrap().is_some());
                if matches!(op, Op::ReleaseTwice(_)) {
                    assert!(s.release(&lease, now).await.unwrap().is_none());
                }
                let i = model.index(lease.proxy_id()).unwrap();
                model.items[i].1 -= 1;
                model.reap(i);
            }
            Op::Release(_) | Op::ReleaseTwice(_) => {}
            Op::SetStatus(i, st) if i < model.items.len() && !model.items[i].2 => {
                s.set_proxy_status(&model.items[i].0.id, st).await.unwrap();
                model.items[i].0.status = st;
            }
            Op::Update(i, sp) if i < model.items.len() => {
                let mut p = build(0, &sp);
                p.id = model.items[i].0.id.clone();
                p.port = model.items[i].0.port;
                s.upsert_proxy(p.clone()).await.unwrap();
                p.meta.country = p.meta.country.map(|c| c.to_ascii_uppercase());
                model.items[i].0 = p;
                model.items[i].2 = false;
            }
            Op::Remove(i) if i < model.items.len() && !model.items[i].2 => {
                assert!(s.remove_proxy(&model.items[i].0.id).await.unwrap());
                model.items[i].2 = true;
                model.reap(i);
            }
            Op::Readd(i) if i < specs.len() => {
                let p = build(i, &specs[i]);
                s.upsert_proxy(p.clone()).await.unwrap();
                match model.index(&p.id) {
                    Some(j) => {
                        model.items[j].0 = p;
                        model.items[j].2 = false;
                    }
                    None => model.items.push((p, 0, false)),
                }
            }
            _ => {}
        }
        check_accounting(&s, &model, &held).await;
    }
    for lease in held.drain(..) {
        assert!(s.release(&lease, now).await.unwrap().is_some());
    }
    assert_eq!(s.pool_stats("pool").await.unwrap().unwrap().total_leases, 0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn indexed_storage_matches_the_naive_model(
        specs in prop::collection::vec(spec(), 1..24),
        ops in prop::collection::vec(op(24), 1..80),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(run(specs, ops));
    }

    #[test]
    fn filter_combinators_obey_boolean_laws(s in spec(), a in filter_spec(), b in filter_spec()) {
        let p = build(3, &s);
        let fa = a.filter().unwrap_or_default();
        let fb = b.filter().unwrap_or_default();
        let (ma, mb) = (fa.matches(&p), fb.matches(&p));
        prop_assert_eq!(Filter::new().all_of([fa.clone(), fb.clone()]).matches(&p), ma && mb);
        prop_assert_eq!(Filter::new().any_of([fa.clone(), fb.clone()]).matches(&p), ma || mb);
        prop_assert_eq!(Filter::new().none_of([fa.clone(), fb.clone()]).matches(&p), !ma && !mb);
        prop_assert_eq!(Filter::new().any_of([fa.clone()]).none_of([fb]).matches(&p), ma && !mb);
        prop_assert!(Filter::new().matches(&p));
    }

    #[test]
    fn scalar_filters_match_exactly_the_equal_fields(s in spec(), c in "[A-Za-z]{2}", asn in 1u32..3) {
        let p = build(1, &s);
        let want_c = p.meta.country.as_deref().is_some_and(|pc| pc.eq_ignore_ascii_case(&c));
        prop_assert_eq!(Filter::new().country(c.clone()).matches(&p), want_c);
        prop_assert_eq!(Filter::new().asn(asn).matches(&p), p.meta.asn == Some(asn));
        prop_assert_eq!(Filter::new().country(c).asn(asn).matches(&p), want_c && p.meta.asn == Some(asn));
    }

    #[test]
    fn geo_radius_is_monotonic_and_symmetric(
        lat1 in -89.0f64..89.0, lon1 in -179.0f64..179.0,
        lat2 in -89.0f64..89.0, lon2 in -179.0f64..179.0,
    ) {
        let d = pharox::filter::haversine_km(lat1, lon1, lat2, lon2);
        let back = pharox::filter::haversine_km(lat2, lon2, lat1, lon1);
        prop_assert!((d - back).abs() < 1e-6);
        let mut p = build(0, &Spec { country: None, city: None, asn: None, cap: None,
            status: ProxyStatus::Active, checked: 0, latency_ms: None });
        p.meta.latitude = Some(lat2);
        p.meta.longitude = Some(lon2);
        prop_assert!(Filter::new().near(lat1, lon1, d + 1e-6).matches(&p));
        if d > 1e-3 {
            prop_assert!(!Filter::new().near(lat1, lon1, d * 0.999).matches(&p));
        }
    }
}
