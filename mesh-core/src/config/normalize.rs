//! What an HTTP connection manager does to a request before routing and RBAC see it:
//! `normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action` and
//! `common_http_protocol_options.headers_with_underscores_action`, with Envoy's semantics.
//!
//! Order, as in Envoy: escaped slashes first, then RFC 3986 normalization, then merging of
//! slashes. The query string is never touched. The request that goes on (to the router and
//! upstream, or to the application) carries the normalized path, so what RBAC checked is what
//! is served.

use std::borrow::Cow;

/// What to do with `%2F` / `%5C` in a path (`path_with_escaped_slashes_action`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Leave them (Envoy's default).
    #[default]
    Keep,
    /// Answer 400.
    Reject,
    /// Unescape them and answer a redirect to the unescaped path.
    UnescapeAndRedirect,
    /// Unescape them and go on.
    UnescapeAndForward,
}

/// What to do with a header whose name has an underscore (`headers_with_underscores_action`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnderscoreHeaders {
    /// Let them through (Envoy's default).
    #[default]
    Allow,
    /// Answer 400.
    Reject,
    /// Remove them.
    Drop,
}

/// The request policy of an HTTP connection manager.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestPolicy {
    /// `normalize_path`: RFC 3986 normalization (dot segments, percent-encoded unreserved
    /// characters, backslashes as slashes).
    pub normalize_path: bool,
    /// `merge_slashes`: `//` becomes `/`.
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action`.
    pub escaped_slashes: EscapedSlashes,
    /// `headers_with_underscores_action`.
    pub underscore_headers: UnderscoreHeaders,
    /// `upgrade_configs`: the HTTP/1.1 upgrade types allowed (lowercase, e.g. `websocket`).
    /// A request asking for another is refused with 403, as Envoy does; an allowed one is
    /// passed through, and the upgraded connection is the caller's.
    pub upgrades: Vec<String>,
}

/// Why a request is answered instead of going on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyAnswer {
    /// 400, with the reason.
    BadRequest(&'static str),
    /// A redirect (307) to this path and query.
    Redirect(String),
    /// 403, with the reason.
    Forbidden(&'static str),
}

impl RequestPolicy {
    /// Whether the policy changes nothing (the common case: nothing to do per request).
    pub fn is_noop(&self) -> bool {
        *self == Self::default()
    }

    /// Applies the policy to `req` in place.
    ///
    /// # Errors
    /// The answer the request gets instead of going on.
    pub fn apply<B>(&self, req: &mut http::Request<B>) -> Result<(), PolicyAnswer> {
        if let Some(upgrade) = req.headers().get(http::header::UPGRADE) {
            let allowed = upgrade.to_str().is_ok_and(|t| {
                self.upgrades
                    .iter()
                    .any(|u| u.eq_ignore_ascii_case(t.trim()))
            });
            if !allowed {
                return Err(PolicyAnswer::Forbidden(
                    "the upgrade type is not enabled by the listener's upgrade_configs",
                ));
            }
        }
        if self.is_noop() {
            return Ok(());
        }
        match self.underscore_headers {
            UnderscoreHeaders::Allow => {}
            UnderscoreHeaders::Reject => {
                if req.headers().keys().any(|k| k.as_str().contains('_')) {
                    return Err(PolicyAnswer::BadRequest("header name with an underscore"));
                }
            }
            UnderscoreHeaders::Drop => {
                let names: Vec<http::HeaderName> = req
                    .headers()
                    .keys()
                    .filter(|k| k.as_str().contains('_'))
                    .cloned()
                    .collect();
                for n in names {
                    req.headers_mut().remove(n);
                }
            }
        }
        let path = req.uri().path();
        let query = req.uri().query();
        let new = self.normalize(path)?;
        if new != path {
            let pq = match query {
                Some(q) => format!("{new}?{q}"),
                None => new.into_owned(),
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = Some(
                pq.parse()
                    .map_err(|_| PolicyAnswer::BadRequest("the normalized path is not valid"))?,
            );
            *req.uri_mut() =
                http::Uri::from_parts(parts).map_err(|_| PolicyAnswer::BadRequest("bad uri"))?;
        }
        Ok(())
    }

    /// The path as routing and RBAC should see it.
    ///
    /// # Errors
    /// A 400 for a path the policy rejects, or the redirect it asks for.
    pub fn normalize<'a>(&self, path: &'a str) -> Result<Cow<'a, str>, PolicyAnswer> {
        let mut out: Cow<'a, str> = Cow::Borrowed(path);
        let has_escaped_slash = || {
            let lower = path.to_ascii_lowercase();
            lower.contains("%2f") || lower.contains("%5c")
        };
        match self.escaped_slashes {
            EscapedSlashes::Keep => {}
            EscapedSlashes::Reject if has_escaped_slash() => {
                return Err(PolicyAnswer::BadRequest("escaped slash in the path"))
            }
            EscapedSlashes::Reject => {}
            EscapedSlashes::UnescapeAndRedirect | EscapedSlashes::UnescapeAndForward
                if has_escaped_slash() =>
            {
                out = Cow::Owned(unescape_slashes(path));
            }
            _ => {}
        }
        if self.normalize_path {
            out = Cow::Owned(normalize_rfc3986(&out));
        }
        if self.merge_slashes && out.contains("//") {
            let mut merged = String::with_capacity(out.len());
            for c in out.chars() {
                if !(c == '/' && merged.ends_with('/')) {
                    merged.push(c);
                }
            }
            out = Cow::Owned(merged);
        }
        if self.escaped_slashes == EscapedSlashes::UnescapeAndRedirect && out != path {
            return Err(PolicyAnswer::Redirect(out.into_owned()));
        }
        Ok(out)
    }
}

/// Bytes back to text: the input was UTF-8 and only ASCII sequences were replaced by ASCII,
/// so the result is UTF-8 too.
fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn unescape_slashes(path: &str) -> String {
    let mut out = Vec::with_capacity(path.len());
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            match (b[i + 1], b[i + 2].to_ascii_lowercase()) {
                (b'2', b'f') => {
                    out.push(b'/');
                    i += 3;
                    continue;
                }
                (b'5', b'c') => {
                    out.push(b'\\');
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        out.push(b[i]);
        i += 1;
    }
    text(out)
}

fn is_unreserved(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986 section 6.2.2: percent-encoded unreserved characters decoded, other escapes
/// upper-cased, backslashes as slashes, dot segments removed (section 5.2.4).
fn normalize_rfc3986(path: &str) -> String {
    let b = path.as_bytes();
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' && i + 2 < b.len() {
            let hex = |x: u8| (x as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let v = (h * 16 + l) as u8;
                if is_unreserved(v) {
                    decoded.push(v);
                } else {
                    decoded.extend([
                        b'%',
                        b[i + 1].to_ascii_uppercase(),
                        b[i + 2].to_ascii_uppercase(),
                    ]);
                }
                i += 3;
                continue;
            }
        }
        decoded.push(if c == b'\\' { b'/' } else { c });
        i += 1;
    }
    let decoded = text(decoded);
    // Remove dot segments.
    let mut segments: Vec<&str> = Vec::new();
    let trailing =
        decoded.ends_with("/.") || decoded.ends_with("/..") || decoded == "." || decoded == "..";
    for seg in decoded
        .split('/')
        .skip(usize::from(decoded.starts_with('/')))
    {
        match seg {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    out.push('/');
    out.push_str(&segments.join("/"));
    if trailing && !out.ends_with('/') {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> RequestPolicy {
        RequestPolicy {
            normalize_path: true,
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::UnescapeAndForward,
            underscore_headers: UnderscoreHeaders::Allow,
            upgrades: vec!["websocket".into()],
        }
    }

    #[test]
    fn upgrades_pass_only_when_enabled() {
        let up = |ty: &str| {
            http::Request::get("/chat")
                .header(http::header::CONNECTION, "upgrade")
                .header(http::header::UPGRADE, ty)
                .body(())
                .unwrap()
        };
        assert_eq!(all().apply(&mut up("WebSocket")), Ok(()));
        assert!(matches!(
            all().apply(&mut up("h2c")),
            Err(PolicyAnswer::Forbidden(_))
        ));
        assert!(matches!(
            RequestPolicy::default().apply(&mut up("websocket")),
            Err(PolicyAnswer::Forbidden(_))
        ));
        let mut plain = http::Request::get("/").body(()).unwrap();
        assert_eq!(RequestPolicy::default().apply(&mut plain), Ok(()));
    }

    #[test]
    fn paths_as_envoy_normalizes_them() {
        let p = all();
        for (input, want) in [
            ("/a/b", "/a/b"),
            ("/public/../admin", "/admin"),
            ("/./admin/./x", "/admin/x"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("//admin//x", "/admin/x"),
            ("/admin%2Fsecret", "/admin/secret"),
            ("/admin%5csecret", "/admin/secret"),
            ("/a\\b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a%20b%2a", "/a%20b%2A"),
            ("/..", "/"),
            // Raw non-ASCII text is kept as it is (only ASCII sequences are rewritten).
            ("/café/../thé%2F", "/th\u{e9}/"),
        ] {
            assert_eq!(p.normalize(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn each_option_alone() {
        let keep = RequestPolicy::default();
        assert_eq!(keep.normalize("/a/../b//c%2F").unwrap(), "/a/../b//c%2F");
        let merge = RequestPolicy {
            merge_slashes: true,
            ..Default::default()
        };
        assert_eq!(merge.normalize("/a//b").unwrap(), "/a/b");
        let reject = RequestPolicy {
            escaped_slashes: EscapedSlashes::Reject,
            ..Default::default()
        };
        assert!(matches!(
            reject.normalize("/a%2fb"),
            Err(PolicyAnswer::BadRequest(_))
        ));
        assert_eq!(reject.normalize("/a/b").unwrap(), "/a/b");
        let redirect = RequestPolicy {
            escaped_slashes: EscapedSlashes::UnescapeAndRedirect,
            ..Default::default()
        };
        assert_eq!(
            redirect.normalize("/a%2Fb"),
            Err(PolicyAnswer::Redirect("/a/b".into()))
        );
        assert_eq!(redirect.normalize("/a/b").unwrap(), "/a/b");
    }

    #[test]
    fn requests_keep_their_query_and_lose_underscore_headers() {
        let p = RequestPolicy {
            underscore_headers: UnderscoreHeaders::Drop,
            ..all()
        };
        let mut req = http::Request::get("http://svc/x/../y?a=%2F..")
            .header("x_user", "admin")
            .header("x-ok", "1")
            .body(())
            .unwrap();
        p.apply(&mut req).unwrap();
        assert_eq!(req.uri().path_and_query().unwrap().as_str(), "/y?a=%2F..");
        assert_eq!(req.uri().authority().unwrap().as_str(), "svc");
        assert!(req.headers().get("x_user").is_none());
        assert!(req.headers().get("x-ok").is_some());
        let reject = RequestPolicy {
            underscore_headers: UnderscoreHeaders::Reject,
            ..Default::default()
        };
        let mut req = http::Request::get("/")
            .header("x_user", "a")
            .body(())
            .unwrap();
        assert!(matches!(
            reject.apply(&mut req),
            Err(PolicyAnswer::BadRequest(_))
        ));
    }
}
