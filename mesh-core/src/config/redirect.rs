//! Redirect routes (`RedirectAction`): the new URL built by Envoy's rules.

use super::matcher::RegexRewrite;

/// A redirect route (`RedirectAction`), with Envoy's rules for building the new URL.
#[derive(Clone, Debug, PartialEq)]
pub struct Redirect {
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    /// New scheme (`https_redirect` or `scheme_redirect`).
    pub scheme: Option<String>,
    /// New host (`host_redirect`); the port is handled separately.
    pub host: Option<String>,
    /// New port (`port_redirect`).
    pub port: Option<u16>,
    /// What becomes of the path.
    pub path: RedirectPath,
    /// Drop the query string (`strip_query`).
    pub strip_query: bool,
}

/// The path of a redirect's target.
#[derive(Clone, Debug, PartialEq)]
pub enum RedirectPath {
    /// The request's path.
    Keep,
    /// `path_redirect`: this path (a `?query` in it replaces the request's query).
    Replace(String),
    /// `prefix_rewrite`: the route's matched prefix replaced by this.
    Prefix(String),
    /// `regex_rewrite` over the path.
    Regex(RegexRewrite),
}

impl Redirect {
    /// The `location` for a request with this scheme, authority and path (with its query);
    /// `matched_prefix` is the route's prefix, for `prefix_rewrite`.
    pub fn location(
        &self,
        scheme: &str,
        authority: &str,
        path_and_query: &str,
        matched_prefix: Option<&str>,
    ) -> String {
        let (req_host, req_port) = split_port(authority);
        let new_scheme = self.scheme.as_deref().unwrap_or(scheme);
        let host = self.host.as_deref().unwrap_or(req_host);
        let (host, host_port) = split_port(host);
        let port = match (self.port, host_port.or(req_port)) {
            (Some(p), _) => Some(p),
            // Changing the scheme drops the old scheme's default port (Envoy does the same).
            (None, Some(p)) if self.scheme.is_some() && default_port(scheme) == Some(p) => None,
            (None, p) => p,
        };
        let port = port.filter(|p| default_port(new_scheme) != Some(*p));
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        let (new_path, new_query): (std::borrow::Cow<'_, str>, Option<&str>) = match &self.path {
            RedirectPath::Keep => (path.into(), query),
            RedirectPath::Replace(p) => match p.split_once('?') {
                Some((p, q)) => (p.to_owned().into(), Some(q)),
                None => (p.clone().into(), query),
            },
            RedirectPath::Prefix(to) => {
                let rest = matched_prefix
                    .and_then(|pre| path.get(pre.len()..).filter(|_| path.starts_with(pre)))
                    .unwrap_or(path);
                let rewritten = if matched_prefix.is_some() {
                    format!("{to}{rest}")
                } else {
                    path.to_owned()
                };
                (rewritten.into(), query)
            }
            RedirectPath::Regex(r) => (r.pattern.replace_all(path, &r.substitution).into(), query),
        };
        let mut out = format!("{new_scheme}://{host}");
        if let Some(p) = port {
            out.push_str(&format!(":{p}"));
        }
        out.push_str(&new_path);
        if let Some(q) = new_query.filter(|q| !self.strip_query && !q.is_empty()) {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// `host:port` into host and port (IPv6 literals in brackets keep their colons).
fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        // A bare IPv6 address: its colons are not a port.
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (authority, None),
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        None => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Pattern;

    fn redirect(f: impl FnOnce(&mut Redirect)) -> Redirect {
        let mut r = Redirect {
            status: 301,
            scheme: None,
            host: None,
            port: None,
            path: RedirectPath::Keep,
            strip_query: false,
        };
        f(&mut r);
        r
    }

    /// Envoy's rules for the new URL (RouteEntryImplBase::newUri).
    #[test]
    fn location_follows_envoy() {
        let r = redirect(|r| r.scheme = Some("https".into()));
        assert_eq!(
            r.location("http", "example.com:80", "/a?b=1", None),
            "https://example.com/a?b=1",
            "https_redirect drops the old scheme's default port"
        );
        assert_eq!(
            r.location("http", "example.com:8080", "/a", None),
            "https://example.com:8080/a",
            "a non-default port is kept"
        );
        let r = redirect(|r| {
            r.host = Some("new.example.com".into());
            r.port = Some(8443);
            r.path = RedirectPath::Replace("/new?x=y".into());
        });
        assert_eq!(
            r.location("http", "old:9000", "/old?q=1", None),
            "http://new.example.com:8443/new?x=y",
            "path_redirect with a query replaces the query"
        );
        let r = redirect(|r| {
            r.path = RedirectPath::Prefix("/v2/".into());
            r.strip_query = true;
        });
        assert_eq!(
            r.location("http", "h", "/v1/items/7?debug=1", Some("/v1/")),
            "http://h/v2/items/7",
            "prefix_rewrite swaps the matched prefix; strip_query drops the query"
        );
        let r = redirect(|r| {
            r.path = RedirectPath::Regex(RegexRewrite {
                pattern: Pattern::new("^/service/([^/]+)(/.*)$").unwrap(),
                substitution: "\\2/instance/\\1".into(),
            })
        });
        assert_eq!(
            r.location("http", "h", "/service/foo/v1/api", None),
            "http://h/v1/api/instance/foo"
        );
        let r = redirect(|r| r.port = Some(80));
        assert_eq!(
            r.location("http", "[::1]:8080", "/", None),
            "http://[::1]/",
            "the default port of the scheme is not written"
        );
    }
}
