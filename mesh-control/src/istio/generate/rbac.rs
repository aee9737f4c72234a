//! RBAC: AuthorizationPolicies compiled as Istio compiles them, into the server listener's
//! RBAC filters.

use super::common::*;
use crate::istio::Doc;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::config::route::v3 as rpb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use std::collections::BTreeMap;

impl Ctx<'_> {
    /// Istio's compilation of AuthorizationPolicies with `action` for a workload.
    pub(super) fn rbac(
        &mut self,
        action: &str,
        ns: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<rbac::Rbac> {
        let config = self.index.config;
        let applies = |ap: &&Doc<crate::istio::AuthorizationPolicySpec>| {
            ap.spec.action.as_deref().unwrap_or("ALLOW") == action
                && (ap.meta.ns() == ns || ap.meta.ns() == "istio-system")
                && ap
                    .spec
                    .selector
                    .as_ref()
                    .is_none_or(|s| s.labels().iter().all(|(k, v)| labels.get(k) == Some(v)))
        };
        let policies: Vec<&Doc<crate::istio::AuthorizationPolicySpec>> = config
            .authorization_policies
            .iter()
            .filter(applies)
            .collect();
        if policies.is_empty() {
            return None;
        }
        let mut out = std::collections::HashMap::new();
        for ap in policies {
            for (i, rule) in ap.spec.rules.iter().enumerate() {
                let principals = if rule.from.is_empty() {
                    vec![any_principal()]
                } else {
                    vec![or_ids(
                        rule.from.iter().map(|f| self.source(&f.source)).collect(),
                    )]
                };
                let permissions = if rule.to.is_empty() {
                    vec![any_permission()]
                } else {
                    vec![or_rules(
                        rule.to.iter().map(|t| operation(&t.operation)).collect(),
                    )]
                };
                out.insert(
                    format!("ns[{}]-policy[{}]-rule[{i}]", ap.meta.ns(), ap.meta.name),
                    rbac::Policy {
                        permissions,
                        principals,
                        ..Default::default()
                    },
                );
            }
        }
        Some(rbac::Rbac {
            action: if action == "DENY" {
                rbac::rbac::Action::Deny
            } else {
                rbac::rbac::Action::Allow
            } as i32,
            policies: out,
            ..Default::default()
        })
    }

    pub(super) fn source(&self, s: &crate::istio::Source) -> rbac::Principal {
        let mut ands = Vec::new();
        if !s.principals.is_empty() {
            ands.push(or_ids(
                s.principals
                    .iter()
                    .map(|p| {
                        if p == "*" {
                            return authenticated(None);
                        }
                        authenticated(Some(istio_string(&format!("spiffe://{p}"))))
                    })
                    .collect(),
            ));
        }
        if !s.namespaces.is_empty() {
            ands.push(or_ids(
                s.namespaces
                    .iter()
                    .map(|n| {
                        authenticated(Some(matcher::StringMatcher {
                            match_pattern: Some(matcher::string_matcher::MatchPattern::SafeRegex(
                                matcher::RegexMatcher {
                                    regex: format!("spiffe://[^/]+/ns/{}/.*", regex_escape(n)),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }))
                    })
                    .collect(),
            ));
        }
        match ands.len() {
            0 => any_principal(),
            1 => ands.pop().expect("one element"),
            _ => rbac::Principal {
                identifier: Some(rbac::principal::Identifier::AndIds(rbac::principal::Set {
                    ids: ands,
                })),
            },
        }
    }
}

pub(super) fn any_principal() -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Any(true)),
    }
}

pub(super) fn any_permission() -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::Any(true)),
    }
}

pub(super) fn authenticated(m: Option<matcher::StringMatcher>) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::Authenticated(
            rbac::principal::Authenticated { principal_name: m },
        )),
    }
}

pub(super) fn or_ids(ids: Vec<rbac::Principal>) -> rbac::Principal {
    rbac::Principal {
        identifier: Some(rbac::principal::Identifier::OrIds(rbac::principal::Set {
            ids,
        })),
    }
}

pub(super) fn or_rules(rules: Vec<rbac::Permission>) -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::OrRules(rbac::permission::Set {
            rules,
        })),
    }
}

pub(super) fn and_rules(rules: Vec<rbac::Permission>) -> rbac::Permission {
    rbac::Permission {
        rule: Some(rbac::permission::Rule::AndRules(rbac::permission::Set {
            rules,
        })),
    }
}

/// Istio's string forms: `*` any, `x*` prefix, `*x` suffix, else exact.
pub(super) fn istio_string(s: &str) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern as P;
    let pattern = if s == "*" {
        P::SafeRegex(matcher::RegexMatcher {
            regex: ".*".into(),
            ..Default::default()
        })
    } else if let Some(p) = s.strip_suffix('*') {
        P::Prefix(p.into())
    } else if let Some(p) = s.strip_prefix('*') {
        P::Suffix(p.into())
    } else {
        P::Exact(s.into())
    };
    matcher::StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

pub(super) fn operation(op: &crate::istio::Operation) -> rbac::Permission {
    let mut ands = Vec::new();
    if !op.paths.is_empty() {
        ands.push(or_rules(
            op.paths
                .iter()
                .map(|p| rbac::Permission {
                    rule: Some(rbac::permission::Rule::UrlPath(matcher::PathMatcher {
                        rule: Some(matcher::path_matcher::Rule::Path(istio_string(p))),
                    })),
                })
                .collect(),
        ));
    }
    if !op.methods.is_empty() {
        ands.push(or_rules(
            op.methods
                .iter()
                .map(|m| rbac::Permission {
                    rule: Some(rbac::permission::Rule::Header(rpb::HeaderMatcher {
                        name: ":method".into(),
                        header_match_specifier: Some(
                            rpb::header_matcher::HeaderMatchSpecifier::StringMatch(exact(m)),
                        ),
                        ..Default::default()
                    })),
                })
                .collect(),
        ));
    }
    match ands.len() {
        0 => any_permission(),
        1 => ands.pop().expect("one element"),
        _ => and_rules(ands),
    }
}

pub(super) fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
