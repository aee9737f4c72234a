//! The RBAC HTTP filter (`envoy.extensions.filters.http.rbac.v3.RBAC`).

use envoy_types::pb::envoy::config::rbac::v3 as pb;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as RbacFilter;

use super::matcher::{cidr, header_matcher, string_matcher};
use super::{err, At, FieldError};
use crate::config::{Permission, Principal, RbacAction, RbacConfig, RbacPolicy, RbacRules};

pub(crate) fn rbac_filter(f: &RbacFilter) -> Result<RbacConfig, FieldError> {
    if f.matcher.is_some() || f.shadow_matcher.is_some() {
        return err("matcher-based RBAC is not supported; use rules").at("matcher");
    }
    Ok(RbacConfig {
        rules: f.rules.as_ref().map(rules).transpose().at("rules")?,
        shadow_rules: f
            .shadow_rules
            .as_ref()
            .map(rules)
            .transpose()
            .at("shadow_rules")?,
    })
}

fn rules(r: &pb::Rbac) -> Result<RbacRules, FieldError> {
    let action = match r.action {
        0 => RbacAction::Allow,
        1 => RbacAction::Deny,
        2 => RbacAction::Log,
        other => return err(format!("unknown action {other}")).at("action"),
    };
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let policies = names
        .into_iter()
        .map(|name| {
            let p = &r.policies[name];
            policy(name, p).at_key("policies", name)
        })
        .collect::<Result<_, _>>()?;
    Ok(RbacRules { action, policies })
}

fn policy(name: &str, p: &pb::Policy) -> Result<RbacPolicy, FieldError> {
    if p.condition.is_some() || p.checked_condition.is_some() {
        return err("CEL conditions are not supported").at("condition");
    }
    Ok(RbacPolicy {
        name: name.to_owned(),
        permissions: p
            .permissions
            .iter()
            .enumerate()
            .map(|(i, x)| permission(x).at_index("permissions", i))
            .collect::<Result<_, _>>()?,
        principals: p
            .principals
            .iter()
            .enumerate()
            .map(|(i, x)| principal(x).at_index("principals", i))
            .collect::<Result<_, _>>()?,
    })
}

fn permission(p: &pb::Permission) -> Result<Permission, FieldError> {
    use pb::permission::Rule as R;
    let list = |s: &pb::permission::Set, field| {
        s.rules
            .iter()
            .enumerate()
            .map(|(i, x)| permission(x).at_index("rules", i))
            .collect::<Result<Vec<_>, _>>()
            .at(field)
    };
    Ok(match &p.rule {
        Some(R::AndRules(s)) => Permission::And(list(s, "and_rules")?),
        Some(R::OrRules(s)) => Permission::Or(list(s, "or_rules")?),
        Some(R::Any(_)) => Permission::Any,
        Some(R::Header(h)) => Permission::Header(header_matcher(h).at("header")?),
        Some(R::UrlPath(pm)) => match &pm.rule {
            Some(envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule::Path(s)) => {
                Permission::Path(string_matcher(s).at("path").at("url_path")?)
            }
            None => return err("path is required").at("url_path"),
        },
        Some(R::DestinationIp(c)) => Permission::DestinationIp(cidr(c).at("destination_ip")?),
        Some(R::DestinationPort(port)) => Permission::DestinationPort(
            u16::try_from(*port)
                .map_err(|_| FieldError::new(format!("{port} is not a port")))
                .at("destination_port")?,
        ),
        Some(R::NotRule(inner)) => Permission::Not(Box::new(permission(inner).at("not_rule")?)),
        Some(R::RequestedServerName(s)) => {
            Permission::RequestedServerName(string_matcher(s).at("requested_server_name")?)
        }
        Some(_) => return err(
            "this permission rule is not supported (metadata, matcher, port range, uri template)",
        ),
        None => return err("a rule is required"),
    })
}

#[allow(deprecated)] // source_ip is deprecated in favour of direct_remote_ip; both are honoured.
fn principal(p: &pb::Principal) -> Result<Principal, FieldError> {
    use pb::principal::Identifier as I;
    let list = |s: &pb::principal::Set, field| {
        s.ids
            .iter()
            .enumerate()
            .map(|(i, x)| principal(x).at_index("ids", i))
            .collect::<Result<Vec<_>, _>>()
            .at(field)
    };
    Ok(match &p.identifier {
        Some(I::AndIds(s)) => Principal::And(list(s, "and_ids")?),
        Some(I::OrIds(s)) => Principal::Or(list(s, "or_ids")?),
        Some(I::Any(_)) => Principal::Any,
        Some(I::Authenticated(a)) => Principal::Authenticated(
            a.principal_name
                .as_ref()
                .map(string_matcher)
                .transpose()
                .at("principal_name")
                .at("authenticated")?,
        ),
        Some(I::SourceIp(c)) => Principal::SourceIp(cidr(c).at("source_ip")?),
        Some(I::DirectRemoteIp(c)) => Principal::DirectRemoteIp(cidr(c).at("direct_remote_ip")?),
        Some(I::RemoteIp(c)) => Principal::RemoteIp(cidr(c).at("remote_ip")?),
        Some(I::Header(h)) => Principal::Header(header_matcher(h).at("header")?),
        Some(I::UrlPath(pm)) => match &pm.rule {
            Some(envoy_types::pb::envoy::r#type::matcher::v3::path_matcher::Rule::Path(s)) => {
                Principal::Path(string_matcher(s).at("path").at("url_path")?)
            }
            None => return err("path is required").at("url_path"),
        },
        Some(I::NotId(inner)) => Principal::Not(Box::new(principal(inner).at("not_id")?)),
        Some(_) => return err("this principal is not supported (metadata, filter state, custom)"),
        None => return err("an identifier is required"),
    })
}
