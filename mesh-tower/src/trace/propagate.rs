//! Trace context on the wire: W3C Trace Context (`traceparent`, `tracestate`) and Zipkin B3
//! (single `b3` header and multi `X-B3-*` headers), parsed and written by hand so that every
//! byte a peer sends is checked here.

use std::str::FromStr;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

/// Which trace-context formats are read from requests and written to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Propagation {
    /// Formats accepted on requests (tried in order: W3C, B3 single, B3 multi).
    pub extract: Formats,
    /// Formats written to outgoing requests.
    pub inject: Formats,
}

impl Default for Propagation {
    /// Writes W3C; reads W3C, B3 single and B3 multi.
    fn default() -> Self {
        Self {
            extract: Formats::ALL,
            inject: Formats::W3C,
        }
    }
}

/// A set of trace-context formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Formats {
    /// W3C `traceparent` / `tracestate`.
    pub w3c: bool,
    /// B3 single header: `b3: {trace}-{span}-{sampled}`.
    pub b3_single: bool,
    /// B3 multiple headers: `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled`, `X-B3-Flags`.
    pub b3_multi: bool,
}

impl Formats {
    /// W3C only.
    pub const W3C: Formats = Formats {
        w3c: true,
        b3_single: false,
        b3_multi: false,
    };
    /// Every format.
    pub const ALL: Formats = Formats {
        w3c: true,
        b3_single: true,
        b3_multi: true,
    };
    /// None (propagation off).
    pub const NONE: Formats = Formats {
        w3c: false,
        b3_single: false,
        b3_multi: false,
    };
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The remote parent carried by `headers` in the first of `formats` present and valid.
pub fn extract(headers: &HeaderMap, formats: Formats) -> Option<SpanContext> {
    if formats.w3c {
        if let Some(sc) = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent)
        {
            let state = headers
                .get(TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| TraceState::from_str(v).ok())
                .unwrap_or_default();
            return Some(SpanContext::new(
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags(),
                true,
                state,
            ));
        }
    }
    if formats.b3_single {
        if let Some(sc) = headers
            .get(B3)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_b3_single)
        {
            return Some(sc);
        }
    }
    if formats.b3_multi {
        return parse_b3_multi(headers);
    }
    None
}

/// Writes `sc` into `headers` in each of `formats`, replacing what was there.
pub fn inject(sc: &SpanContext, headers: &mut HeaderMap, formats: Formats) {
    if !sc.is_valid() {
        return;
    }
    let sampled = sc.is_sampled();
    if formats.w3c {
        // `00-{32 hex}-{16 hex}-{2 hex}`, written without formatting machinery.
        let mut buf = [0u8; 55];
        buf[..3].copy_from_slice(b"00-");
        hex_into(&mut buf[3..35], &sc.trace_id().to_bytes());
        buf[35] = b'-';
        hex_into(&mut buf[36..52], &sc.span_id().to_bytes());
        buf[52] = b'-';
        buf[53] = b'0';
        buf[54] = if sampled { b'1' } else { b'0' };
        if let Ok(v) = HeaderValue::from_bytes(&buf) {
            headers.insert(TRACEPARENT, v);
        }
        let state = sc.trace_state().header();
        if state.is_empty() {
            headers.remove(TRACESTATE);
        } else {
            insert(headers, TRACESTATE, state);
        }
    }
    if formats.b3_single {
        let v = format!(
            "{}-{}-{}",
            sc.trace_id(),
            sc.span_id(),
            if sampled { '1' } else { '0' }
        );
        insert(headers, B3, v);
    }
    if formats.b3_multi {
        insert(headers, B3_TRACE, sc.trace_id().to_string());
        insert(headers, B3_SPAN, sc.span_id().to_string());
        insert(headers, B3_SAMPLED, if sampled { "1" } else { "0" }.into());
        headers.remove(B3_PARENT);
        headers.remove(B3_FLAGS);
    }
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: String) {
    // Correctness: the values are hex digits and dashes, or a tracestate that parsed.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(name, v);
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Lowercase hex digits only (W3C requires lowercase), at most 32 of them.
fn parse_hex(s: &str) -> Option<u128> {
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    let mut v: u128 = 0;
    for b in s.bytes() {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(d);
    }
    Some(v)
}

fn trace_id(s: &str) -> Option<TraceId> {
    // B3 allows 64-bit trace ids; they are the low half of a 128-bit one.
    if !(s.len() == 32 || s.len() == 16) {
        return None;
    }
    let v = parse_hex(s)?;
    (v != 0).then(|| TraceId::from_bytes(v.to_be_bytes()))
}

fn span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 {
        return None;
    }
    let v = u64::try_from(parse_hex(s)?).ok()?;
    (v != 0).then(|| SpanId::from_bytes(v.to_be_bytes()))
}

/// `version-traceid-spanid-flags` (W3C Trace Context level 1; later versions may append
/// fields, which are ignored; version `ff` is invalid).
pub fn parse_traceparent(v: &str) -> Option<SpanContext> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || !is_lower_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if trace.len() != 32 || flags.len() != 2 || !is_lower_hex(flags) {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace_id(trace)?,
        span_id(span)?,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    ))
}

/// `{trace}-{span}[-{sampled}[-{parent}]]`, where sampled is `1`, `0` or `d` (debug).
/// A lone `0` (do not sample, no ids) carries no parent.
pub fn parse_b3_single(v: &str) -> Option<SpanContext> {
    let mut parts = v.trim().split('-');
    let trace = trace_id(parts.next()?)?;
    let span = span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None | Some("1") | Some("d") => true,
        Some("0") => false,
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(remote(trace, span, sampled))
}

fn parse_b3_multi(headers: &HeaderMap) -> Option<SpanContext> {
    let get = |n: &HeaderName| headers.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let trace = trace_id(get(&B3_TRACE)?)?;
    let span = span_id(get(&B3_SPAN)?)?;
    let debug = get(&B3_FLAGS) == Some("1");
    let sampled = match get(&B3_SAMPLED) {
        None | Some("1") | Some("true") => true,
        Some("0") | Some("false") => debug,
        Some(_) => return None,
    };
    Some(remote(trace, span, sampled || debug))
}

fn remote(trace: TraceId, span: SpanId, sampled: bool) -> SpanContext {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(trace, span, flags, true, TraceState::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const S: &str = "00f067aa0ba902b7";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn w3c_round_trip_with_tracestate() {
        let h = headers(&[
            ("traceparent", &format!("00-{T}-{S}-01")),
            ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ]);
        let sc = extract(&h, Formats::ALL).unwrap();
        assert_eq!(sc.trace_id().to_string(), T);
        assert_eq!(sc.span_id().to_string(), S);
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().get("congo"), Some("t61rcWkgMzE"));
        let mut out = HeaderMap::new();
        inject(&sc, &mut out, Formats::W3C);
        assert_eq!(out["traceparent"], format!("00-{T}-{S}-01").as_str());
        assert_eq!(out["tracestate"], "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7");
    }

    #[test]
    fn w3c_rejects_what_the_spec_rejects() {
        for bad in [
            format!("ff-{T}-{S}-01"),
            format!("00-{}-{S}-01", "0".repeat(32)),
            format!("00-{T}-{}-01", "0".repeat(16)),
            format!("00-{}-{S}-01", T.to_uppercase()),
            format!("00-{T}-{S}-01-extra"),
            format!("00-{T}-{S}"),
            format!("00-{T}-{S}-1"),
            format!("0-{T}-{S}-01"),
            "00--".into(),
            String::new(),
        ] {
            assert!(parse_traceparent(&bad).is_none(), "{bad}");
        }
        // A later version may append fields.
        assert!(parse_traceparent(&format!("01-{T}-{S}-01-what-ever")).is_some());
        // Unsampled.
        assert!(!parse_traceparent(&format!("00-{T}-{S}-00"))
            .unwrap()
            .is_sampled());
    }

    #[test]
    fn b3_single_and_multi() {
        let sc = parse_b3_single(&format!("{T}-{S}-1-{S}")).unwrap();
        assert_eq!(sc.trace_id().to_string(), T);
        assert!(sc.is_sampled());
        assert!(!parse_b3_single(&format!("{T}-{S}-0")).unwrap().is_sampled());
        assert!(parse_b3_single(&format!("{T}-{S}-d")).unwrap().is_sampled());
        // 64-bit trace ids are widened.
        let short = parse_b3_single(&format!("a3ce929d0e0e4736-{S}")).unwrap();
        assert_eq!(
            short.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        for bad in ["0", "", &format!("{T}-{S}-x"), &format!("{T}-{S}-1-{S}-1")] {
            assert!(parse_b3_single(bad).is_none(), "{bad}");
        }
        let h = headers(&[
            ("x-b3-traceid", T),
            ("x-b3-spanid", S),
            ("x-b3-sampled", "0"),
        ]);
        let sc = extract(&h, Formats::ALL).unwrap();
        assert_eq!(sc.span_id().to_string(), S);
        assert!(!sc.is_sampled());
        let h = headers(&[("x-b3-traceid", T), ("x-b3-spanid", S), ("x-b3-flags", "1")]);
        assert!(extract(&h, Formats::ALL).unwrap().is_sampled());
        // Formats not enabled are not read.
        assert!(extract(&h, Formats::W3C).is_none());
    }

    #[test]
    fn w3c_wins_over_b3_and_injection_writes_each_format() {
        let other = "11111111111111111111111111111111";
        let h = headers(&[
            ("traceparent", &format!("00-{T}-{S}-01")),
            ("b3", &format!("{other}-{S}-1")),
        ]);
        assert_eq!(extract(&h, Formats::ALL).unwrap().trace_id().to_string(), T);
        let sc = extract(&h, Formats::ALL).unwrap();
        let mut out = headers(&[("x-b3-parentspanid", S)]);
        inject(&sc, &mut out, Formats::ALL);
        assert_eq!(out["b3"], format!("{T}-{S}-1").as_str());
        assert_eq!(out["x-b3-traceid"], T);
        assert_eq!(out["x-b3-sampled"], "1");
        assert!(out.get("x-b3-parentspanid").is_none());
    }
}
