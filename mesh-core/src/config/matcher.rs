//! Matchers shared by routes, RBAC and TLS: strings, headers, query parameters, fractions.

use std::fmt;

use http::HeaderMap;

/// A compiled regular expression that must match the *whole* input (RE2 semantics of
/// `safe_regex` in xDS: a partial match does not count).
#[derive(Clone)]
pub struct Pattern {
    source: String,
    anchored: regex::Regex,
    unanchored: regex::Regex,
}

impl Pattern {
    /// Compiles `source` for whole-input matching.
    ///
    /// # Errors
    /// Returns the regex crate's message when `source` is not a valid expression.
    pub fn new(source: &str) -> Result<Self, String> {
        let anchored = regex::Regex::new(&format!("^(?:{source})$")).map_err(|e| e.to_string())?;
        let unanchored = regex::Regex::new(source).map_err(|e| e.to_string())?;
        Ok(Self {
            source: source.to_owned(),
            anchored,
            unanchored,
        })
    }

    /// The expression as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `input` matches.
    pub fn is_match(&self, input: &str) -> bool {
        self.anchored.is_match(input)
    }

    /// Replaces every match of the (unanchored) expression in `input` with `substitution`
    /// (`\1` style group references are supported, as Envoy's `regex_rewrite`).
    pub fn replace_all(&self, input: &str, substitution: &str) -> String {
        // Envoy substitutes with RE2 `\N` references; the regex crate uses `${N}`.
        let mut rewritten = String::with_capacity(substitution.len());
        let mut chars = substitution.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('\\', Some(d)) if d.is_ascii_digit() => {
                    rewritten.push_str("${");
                    rewritten.push(*d);
                    rewritten.push('}');
                    chars.next();
                }
                ('$', _) => rewritten.push_str("$$"),
                _ => rewritten.push(c),
            }
        }
        self.unanchored
            .replace_all(input, rewritten.as_str())
            .into_owned()
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// How a [`StringMatcher`] compares.
#[derive(Clone, Debug, PartialEq)]
pub enum StringMatch {
    /// The whole value equals this.
    Exact(String),
    /// The value starts with this.
    Prefix(String),
    /// The value ends with this.
    Suffix(String),
    /// The value contains this.
    Contains(String),
    /// The whole value matches this expression.
    Regex(Pattern),
}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Clone, Debug, PartialEq)]
pub struct StringMatcher {
    /// The comparison.
    pub kind: StringMatch,
    /// ASCII case-insensitive comparison (ignored for regex, as in Envoy).
    pub ignore_case: bool,
}

impl StringMatcher {
    /// An exact, case-sensitive matcher.
    pub fn exact(value: impl Into<String>) -> Self {
        Self {
            kind: StringMatch::Exact(value.into()),
            ignore_case: false,
        }
    }

    /// A case-sensitive prefix matcher.
    pub fn prefix(value: impl Into<String>) -> Self {
        Self {
            kind: StringMatch::Prefix(value.into()),
            ignore_case: false,
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        let ic = self.ignore_case;
        match &self.kind {
            StringMatch::Exact(s) if ic => value.eq_ignore_ascii_case(s),
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) if ic => value
                .get(..s.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(s)),
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) if ic => value
                .len()
                .checked_sub(s.len())
                .and_then(|start| value.get(start..))
                .is_some_and(|p| p.eq_ignore_ascii_case(s)),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Contains(s) if ic => {
                value.to_ascii_lowercase().contains(&s.to_ascii_lowercase())
            }
            StringMatch::Contains(s) => value.contains(s.as_str()),
            StringMatch::Regex(p) => p.is_match(value),
        }
    }
}

/// What a [`HeaderMatcher`] checks.
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderMatch {
    /// The value matches a string matcher.
    String(StringMatcher),
    /// The header is present (`true`) or absent (`false`).
    Present(bool),
    /// The value is an integer in `[start, end)`.
    Range {
        /// Inclusive start.
        start: i64,
        /// Exclusive end.
        end: i64,
    },
}

/// `envoy.config.route.v3.HeaderMatcher`.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderMatcher {
    /// Lower-case header name (pseudo-headers such as `:authority` and `:method` allowed).
    pub name: String,
    /// The check.
    pub kind: HeaderMatch,
    /// Invert the result.
    pub invert: bool,
    /// A missing header matches as if its value were empty.
    pub treat_missing_as_empty: bool,
}

impl HeaderMatcher {
    /// Whether `headers` (plus the request's `method` and `authority` for pseudo-headers)
    /// match. Several values of one header are joined with `,` as Envoy does.
    pub fn matches(&self, headers: &HeaderMap, method: &str, authority: &str) -> bool {
        let joined;
        let value: Option<&str> = match self.name.as_str() {
            ":method" => Some(method),
            ":authority" | "host" if !authority.is_empty() => Some(authority),
            name => {
                let mut values = headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => None,
                    (Some(v), None) => v.to_str().ok(),
                    (Some(first), Some(second)) => {
                        let mut all = vec![first, second];
                        all.extend(values);
                        joined = all
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect::<Vec<_>>()
                            .join(",");
                        Some(joined.as_str())
                    }
                }
            }
        };
        let value = match value {
            None if self.treat_missing_as_empty => Some(""),
            v => v,
        };
        let matched = match (&self.kind, value) {
            (HeaderMatch::Present(want), v) => v.is_some() == *want,
            (_, None) => return false, // Envoy: a missing header never matches, even inverted.
            (HeaderMatch::String(m), Some(v)) => m.matches(v),
            (HeaderMatch::Range { start, end }, Some(v)) => {
                v.parse::<i64>().is_ok_and(|n| (*start..*end).contains(&n))
            }
        };
        matched != self.invert
    }
}

/// `envoy.config.route.v3.QueryParameterMatcher`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryParamMatcher {
    /// Parameter name (exact, case-sensitive).
    pub name: String,
    /// `None`: the parameter is present; otherwise its value must match.
    pub value: Option<StringMatcher>,
}

impl QueryParamMatcher {
    /// Whether the raw query string (without `?`) matches.
    pub fn matches(&self, query: Option<&str>) -> bool {
        let Some(query) = query else {
            return false;
        };
        query.split('&').any(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            k == self.name && self.value.as_ref().is_none_or(|m| m.matches(v))
        })
    }
}

/// A probability with the resolution of xDS `FractionalPercent`, kept as parts per million.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fraction {
    per_million: u32,
}

impl Fraction {
    /// Always.
    pub const ALWAYS: Fraction = Fraction {
        per_million: 1_000_000,
    };

    /// From parts per million, capped at one million.
    pub fn per_million(value: u64) -> Self {
        Self {
            per_million: value.min(1_000_000) as u32,
        }
    }

    /// From a percentage (0..=100), capped.
    pub fn percent(value: f64) -> Self {
        Self::per_million((value.clamp(0.0, 100.0) * 10_000.0).round() as u64)
    }

    /// Parts per million.
    pub fn as_per_million(self) -> u32 {
        self.per_million
    }

    /// Whether a uniformly random `draw` (any `u64`) falls inside the fraction.
    pub fn hit(self, draw: u64) -> bool {
        (draw % 1_000_000) < u64::from(self.per_million)
    }
}

/// `regex_rewrite`: replace every match of `pattern` in the path with `substitution`.
#[derive(Clone, Debug, PartialEq)]
pub struct RegexRewrite {
    /// What to find.
    pub pattern: Pattern,
    /// What to put instead (`\1` group references allowed).
    pub substitution: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matchers() {
        let m = StringMatcher {
            kind: StringMatch::Prefix("/API".into()),
            ignore_case: true,
        };
        assert!(m.matches("/api/v1"));
        assert!(!m.matches("/ap"));
        let m = StringMatcher {
            kind: StringMatch::Suffix(".JSON".into()),
            ignore_case: true,
        };
        assert!(m.matches("a.json"));
        assert!(!m.matches("json"));
        let re = StringMatcher {
            kind: StringMatch::Regex(Pattern::new("/v1/.*").unwrap()),
            ignore_case: false,
        };
        assert!(re.matches("/v1/x"));
        assert!(!re.matches("/x/v1/x"), "regex must match the whole value");
        assert!(StringMatcher::exact("a").matches("a"));
        assert!(!StringMatcher::exact("a").matches("A"));
    }

    #[test]
    fn header_matchers() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "jason".parse().unwrap());
        h.append("x-multi", "a".parse().unwrap());
        h.append("x-multi", "b".parse().unwrap());
        h.insert("x-n", "42".parse().unwrap());
        let hm = |name: &str, kind, invert| HeaderMatcher {
            name: name.into(),
            kind,
            invert,
            treat_missing_as_empty: false,
        };
        assert!(hm(
            "x-user",
            HeaderMatch::String(StringMatcher::exact("jason")),
            false
        )
        .matches(&h, "GET", ""));
        assert!(!hm(
            "x-user",
            HeaderMatch::String(StringMatcher::exact("jason")),
            true
        )
        .matches(&h, "GET", ""));
        assert!(hm(
            "x-multi",
            HeaderMatch::String(StringMatcher::exact("a,b")),
            false
        )
        .matches(&h, "GET", ""));
        assert!(hm("x-n", HeaderMatch::Range { start: 40, end: 43 }, false).matches(&h, "GET", ""));
        assert!(!hm("x-n", HeaderMatch::Range { start: 40, end: 42 }, false).matches(&h, "GET", ""));
        assert!(hm("x-none", HeaderMatch::Present(false), false).matches(&h, "GET", ""));
        assert!(!hm(
            "x-none",
            HeaderMatch::String(StringMatcher::exact("")),
            true
        )
        .matches(&h, "GET", ""));
        assert!(hm(
            ":method",
            HeaderMatch::String(StringMatcher::exact("POST")),
            false
        )
        .matches(&h, "POST", ""));
    }

    #[test]
    fn query_and_fraction() {
        let q = QueryParamMatcher {
            name: "debug".into(),
            value: Some(StringMatcher::exact("1")),
        };
        assert!(q.matches(Some("a=b&debug=1")));
        assert!(!q.matches(Some("debug=2")));
        assert!(!q.matches(None));
        let present = QueryParamMatcher {
            name: "flag".into(),
            value: None,
        };
        assert!(present.matches(Some("flag")));
        let f = Fraction::percent(10.0);
        assert_eq!(f.as_per_million(), 100_000);
        let hits = (0..1_000_000u64).filter(|d| f.hit(*d)).count();
        assert_eq!(hits, 100_000);
        assert!(
            Pattern::new("/v1/(.*)")
                .unwrap()
                .replace_all("/v1/abc", "/v2/\\1")
                == "/v2/abc"
        );
    }
}
