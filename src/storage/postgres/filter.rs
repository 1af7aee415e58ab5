//! Filter → SQL: the `WHERE` fragment (replacing `TRUE /*FILTER*/` in the acquire
//! statements) and its bound parameters. A port of the SQL lab's reference generator
//! (`tools/pharox_sql.py filter_sql`, verified there against 400 random filter trees), with
//! the same text, so the same prepared statements.
//!
//! Rules (statements.sql, FILTERS): the fields that are set, ANDed in this order: country
//! (`upper(p.country) = $k`, the value upper-cased), city, source, isp (exact), asn (`int8`,
//! so a u32 above `i32::MAX` matches nothing instead of failing), geo (haversine with the
//! radius, inclusive; without it both coordinates within 1e-6), then `all_of`, `any_of`
//! (`TRUE` when empty or when a child is empty), `none_of` (NULL-safe:
//! `NOT coalesce(… OR …, false)`; `FALSE` when a child is empty). A dropped child binds no
//! parameter (the numbers its siblings took are given back). Predicates cannot be sent to
//! the database: [`LeaseError::Unsupported`].

use tokio_postgres::types::ToSql;

use crate::filter::Filter;
use crate::storage::LeaseError;

/// One bound filter value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Param {
    Text(String),
    Int8(i64),
    Float8(f64),
}

impl Param {
    /// The value as a statement parameter.
    pub fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::Text(s) => s,
            Param::Int8(i) => i,
            Param::Float8(f) => f,
        }
    }
}

/// A generated fragment and its parameters (numbered from the `start` given).
#[derive(Debug, PartialEq)]
pub(crate) struct FilterSql {
    pub sql: String,
    pub params: Vec<Param>,
}

/// The fragment for `filter` with parameters numbered from `$start`; `TRUE` for none.
pub(crate) fn filter_sql(filter: Option<&Filter>, start: usize) -> Result<FilterSql, LeaseError> {
    let Some(f) = filter else {
        return Ok(FilterSql {
            sql: "TRUE".into(),
            params: Vec::new(),
        });
    };
    if f.has_predicate() {
        return Err(LeaseError::Unsupported(
            "predicate filters are library-only: the postgres storage cannot evaluate a closure",
        ));
    }
    let mut g = Gen {
        start,
        params: Vec::new(),
    };
    let sql = g.frag(f).unwrap_or_else(|| "TRUE".into());
    Ok(FilterSql {
        sql,
        params: g.params,
    })
}

struct Gen {
    start: usize,
    params: Vec<Param>,
}

impl Gen {
    /// Binds a value: `$n::cast`.
    fn bind(&mut self, value: Param, cast: &str) -> String {
        self.params.push(value);
        format!("${}::{cast}", self.start + self.params.len() - 1)
    }

    /// The fragment of one filter; `None` when it constrains nothing.
    fn frag(&mut self, f: &Filter) -> Option<String> {
        let mut parts = Vec::new();
        self.scalars(f, &mut parts);
        self.geo(f, &mut parts);
        for c in &f.all_of {
            if let Some(s) = self.frag(c) {
                parts.push(format!("({s})"));
            }
        }
        if !f.any_of.is_empty()
            && let Some(subs) = self.children(&f.any_of)
        {
            parts.push(format!("({})", subs));
        }
        if !f.none_of.is_empty() {
            match self.children(&f.none_of) {
                Some(subs) => parts.push(format!("NOT coalesce({subs}, false)")),
                None => parts.push("FALSE".into()),
            }
        }
        (!parts.is_empty()).then(|| parts.join(" AND "))
    }

    fn scalars(&mut self, f: &Filter, parts: &mut Vec<String>) {
        let m = &f.meta;
        if let Some(c) = &m.country {
            let v = self.bind(Param::Text(c.to_ascii_uppercase()), "text");
            parts.push(format!("upper(p.country) = {v}"));
        }
        for (column, value) in [("city", &m.city), ("source", &m.source), ("isp", &m.isp)] {
            if let Some(value) = value {
                let v = self.bind(Param::Text(value.clone()), "text");
                parts.push(format!("p.{column} = {v}"));
            }
        }
        if let Some(asn) = m.asn {
            let v = self.bind(Param::Int8(i64::from(asn)), "int8");
            parts.push(format!("p.asn = {v}"));
        }
    }

    fn geo(&mut self, f: &Filter, parts: &mut Vec<String>) {
        let (Some(lat), Some(lon)) = (f.meta.latitude, f.meta.longitude) else {
            return;
        };
        let a = self.bind(Param::Float8(lat), "float8");
        let b = self.bind(Param::Float8(lon), "float8");
        match f.radius_km {
            Some(r) => {
                let r = self.bind(Param::Float8(r), "float8");
                let h = format!(
                    "(power(sin(radians(p.latitude - {a}) / 2), 2) + cos(radians({a})) * \
                     cos(radians(p.latitude)) * power(sin(radians(p.longitude - {b}) / 2), 2))"
                );
                parts.push(format!(
                    "(p.latitude IS NOT NULL AND p.longitude IS NOT NULL AND \
                     12742.0::float8 * atan2(sqrt({h}), sqrt(1 - {h})) <= {r})"
                ));
            }
            None => parts.push(format!(
                "(abs(p.latitude - {a}) <= 1e-6 AND abs(p.longitude - {b}) <= 1e-6)"
            )),
        }
    }

    /// `(c1) OR (c2) …`, or `None` (and no parameter kept) when a child is empty.
    fn children(&mut self, children: &[Filter]) -> Option<String> {
        let mark = self.params.len();
        let subs: Vec<Option<String>> = children.iter().map(|c| self.frag(c)).collect();
        if subs.iter().any(Option::is_none) {
            self.params.truncate(mark);
            return None;
        }
        let subs: Vec<String> = subs
            .into_iter()
            .flatten()
            .map(|s| format!("({s})"))
            .collect();
        Some(subs.join(" OR "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProxyMeta;

    fn generate(f: &Filter) -> FilterSql {
        filter_sql(Some(f), 10).unwrap()
    }

    #[test]
    fn the_labs_examples() {
        let g = generate(&Filter::new().country("ar").city("Cordoba"));
        assert_eq!(g.sql, "upper(p.country) = $10::text AND p.city = $11::text");
        assert_eq!(
            g.params,
            [Param::Text("AR".into()), Param::Text("Cordoba".into())]
        );

        let g = generate(&Filter::new().near(-31.4, -64.18, 50.0));
        let h = "(power(sin(radians(p.latitude - $10::float8) / 2), 2) + cos(radians($10::float8)) * \
                 cos(radians(p.latitude)) * power(sin(radians(p.longitude - $11::float8) / 2), 2))";
        assert_eq!(
            g.sql,
            format!(
                "(p.latitude IS NOT NULL AND p.longitude IS NOT NULL AND 12742.0::float8 * \
                 atan2(sqrt({h}), sqrt(1 - {h})) <= $12::float8)"
            )
        );
        assert_eq!(g.params.len(), 3);

        let exact = Filter {
            meta: ProxyMeta {
                latitude: Some(-23.55),
                longitude: Some(-46.63),
                ..Default::default()
            },
            ..Filter::new()
        };
        assert_eq!(
            generate(&exact).sql,
            "(abs(p.latitude - $10::float8) <= 1e-6 AND abs(p.longitude - $11::float8) <= 1e-6)"
        );

        let g = generate(
            &Filter::new()
                .source("prov-a")
                .any_of([Filter::new().country("BR"), Filter::new().asn(7303)]),
        );
        assert_eq!(
            g.sql,
            "p.source = $10::text AND ((upper(p.country) = $11::text) OR (p.asn = $12::int8))"
        );
        assert_eq!(g.params[2], Param::Int8(7303));

        let g = generate(
            &Filter::new()
                .none_of([Filter::new().city("Rosario"), Filter::new().isp("bad-isp")])
                .any_of([]),
        );
        assert_eq!(
            g.sql,
            "NOT coalesce((p.city = $10::text) OR (p.isp = $11::text), false)"
        );
    }

    #[test]
    fn empty_children_bind_nothing() {
        let g = generate(
            &Filter::new()
                .any_of([Filter::new().city("x"), Filter::new()])
                .country("ar"),
        );
        assert_eq!(g.sql, "upper(p.country) = $10::text");
        assert_eq!(g.params.len(), 1);
        let g = generate(&Filter::new().none_of([Filter::new().city("x"), Filter::new()]));
        assert_eq!((g.sql.as_str(), g.params.len()), ("FALSE", 0));
        assert_eq!(generate(&Filter::new()).sql, "TRUE");
        let g = generate(&Filter::new().all_of([Filter::new(), Filter::new().asn(1)]));
        assert_eq!(g.sql, "(p.asn = $10::int8)");
        assert_eq!(filter_sql(None, 10).unwrap().sql, "TRUE");
    }

    #[test]
    fn predicates_are_refused_anywhere_in_the_tree() {
        let f = Filter::new().any_of([Filter::new().predicate(|_| true)]);
        assert!(matches!(
            filter_sql(Some(&f), 10),
            Err(LeaseError::Unsupported(_))
        ));
    }
}
