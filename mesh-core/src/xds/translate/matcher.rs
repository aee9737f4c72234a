//! Matchers: strings, regexes, headers, query parameters, CIDR ranges.

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::r#type::matcher::v3 as pb;

use super::{err, At, FieldError};
use crate::config::{
    CidrRange, HeaderMatch, HeaderMatcher, Pattern, QueryParamMatcher, StringMatch, StringMatcher,
};

pub(crate) fn regex(m: &pb::RegexMatcher) -> Result<Pattern, FieldError> {
    Pattern::new(&m.regex)
        .map_err(|e| FieldError::new(format!("invalid regex {:?}: {e}", m.regex)))
        .at("regex")
}

pub(crate) fn string_matcher(m: &pb::StringMatcher) -> Result<StringMatcher, FieldError> {
    use pb::string_matcher::MatchPattern as P;
    let kind = match &m.match_pattern {
        Some(P::Exact(s)) => StringMatch::Exact(s.clone()),
        Some(P::Prefix(s)) if s.is_empty() => return err("prefix must not be empty").at("prefix"),
        Some(P::Prefix(s)) => StringMatch::Prefix(s.clone()),
        Some(P::Suffix(s)) if s.is_empty() => return err("suffix must not be empty").at("suffix"),
        Some(P::Suffix(s)) => StringMatch::Suffix(s.clone()),
        Some(P::Contains(s)) if s.is_empty() => {
            return err("contains must not be empty").at("contains")
        }
        Some(P::Contains(s)) => StringMatch::Contains(s.clone()),
        Some(P::SafeRegex(r)) => StringMatch::Regex(regex(r).at("safe_regex")?),
        Some(P::Custom(c)) => {
            return err(format!(
                "custom string matcher {:?} is not supported",
                c.name
            ))
            .at("custom")
        }
        None => return err("one of exact, prefix, suffix, contains or safe_regex is required"),
    };
    Ok(StringMatcher {
        kind,
        ignore_case: m.ignore_case,
    })
}

pub(crate) fn header_matcher(m: &route::HeaderMatcher) -> Result<HeaderMatcher, FieldError> {
    use route::header_matcher::HeaderMatchSpecifier as S;
    if m.name.is_empty() {
        return err("header name is empty").at("name");
    }
    let name = m.name.to_ascii_lowercase();
    #[allow(deprecated)]
    let kind = match &m.header_match_specifier {
        Some(S::ExactMatch(s)) => HeaderMatch::String(StringMatcher::exact(s.clone())),
        Some(S::SafeRegexMatch(r)) => HeaderMatch::String(StringMatcher {
            kind: StringMatch::Regex(regex(r).at("safe_regex_match")?),
            ignore_case: false,
        }),
        Some(S::RangeMatch(r)) => {
            if r.start > r.end {
                return err(format!("range start {} is after end {}", r.start, r.end))
                    .at("range_match");
            }
            HeaderMatch::Range {
                start: r.start,
                end: r.end,
            }
        }
        Some(S::PresentMatch(p)) => HeaderMatch::Present(*p),
        Some(S::PrefixMatch(s)) => HeaderMatch::String(StringMatcher::prefix(s.clone())),
        Some(S::SuffixMatch(s)) => HeaderMatch::String(StringMatcher {
            kind: StringMatch::Suffix(s.clone()),
            ignore_case: false,
        }),
        Some(S::ContainsMatch(s)) => HeaderMatch::String(StringMatcher {
            kind: StringMatch::Contains(s.clone()),
            ignore_case: false,
        }),
        Some(S::StringMatch(s)) => HeaderMatch::String(string_matcher(s).at("string_match")?),
        // Envoy: no specifier means "the header is present".
        None => HeaderMatch::Present(true),
    };
    Ok(HeaderMatcher {
        name,
        kind,
        invert: m.invert_match,
        treat_missing_as_empty: m.treat_missing_header_as_empty,
    })
}

pub(crate) fn query_matcher(
    m: &route::QueryParameterMatcher,
) -> Result<QueryParamMatcher, FieldError> {
    use route::query_parameter_matcher::QueryParameterMatchSpecifier as S;
    if m.name.is_empty() {
        return err("query parameter name is empty").at("name");
    }
    let value = match &m.query_parameter_match_specifier {
        Some(S::StringMatch(s)) => Some(string_matcher(s).at("string_match")?),
        Some(S::PresentMatch(true)) | None => None,
        Some(S::PresentMatch(false)) => {
            return err("present_match: false is not supported (it would never match)")
                .at("present_match")
        }
    };
    Ok(QueryParamMatcher {
        name: m.name.clone(),
        value,
    })
}

pub(crate) fn cidr(c: &core::CidrRange) -> Result<CidrRange, FieldError> {
    let address: std::net::IpAddr = c
        .address_prefix
        .parse()
        .map_err(|_| FieldError::new(format!("{:?} is not an IP address", c.address_prefix)))
        .at("address_prefix")?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix_len = c.prefix_len.map(|v| v.value).unwrap_or(max);
    if prefix_len > max {
        return err(format!("prefix_len {prefix_len} is over {max}")).at("prefix_len");
    }
    Ok(CidrRange {
        address,
        prefix_len: prefix_len as u8,
    })
}
