//! gRPC-native answers for the responses the layers make themselves.
//!
//! A gRPC client reads a call's outcome from `grpc-status`, not from the HTTP status: an HTTP
//! `429`, `503` or `504` reaches it only as a code it has to guess (tonic maps all three to
//! UNAVAILABLE, which a retry policy retries at once). So every answer the stack makes itself
//! to a gRPC request is a "Trailers-Only" response — HTTP `200`, `content-type:
//! application/grpc`, `grpc-status`, a percent-encoded `grpc-message`, and, where a retry
//! makes sense later, `grpc-retry-pushback-ms` — all in the one HEADERS frame that ends the
//! stream:
//!
//! | answer | HTTP | gRPC |
//! |---|---|---|
//! | drain rejection ([`RejectLayer`](crate::reject::RejectLayer)) | `503` | `UNAVAILABLE` (14), pushback = reconnect delay |
//! | per-key limit ([`TrackLayer`](crate::track::TrackLayer)) | `429` | `RESOURCE_EXHAUSTED` (8), pushback = `retry_after` |
//! | store failure, fail-closed | `503` | `UNAVAILABLE` (14), pushback = `retry_after` |
//! | circuit open ([`GuardLayer`](crate::guard::GuardLayer)) | `503` | `UNAVAILABLE` (14), pushback = rest of the cool-down |
//! | response timeout | `504` | `DEADLINE_EXCEEDED` (4); the request's own `grpc-timeout` applies when shorter |
//!
//! gRPC-Web (`application/grpc-web…`) is left to HTTP handling: its clients read statuses
//! from the body and map HTTP statuses themselves.

use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Response};

/// `RESOURCE_EXHAUSTED`.
pub(crate) const RESOURCE_EXHAUSTED: u16 = 8;
/// `UNAVAILABLE`.
pub(crate) const UNAVAILABLE: u16 = 14;
/// `DEADLINE_EXCEEDED`.
pub(crate) const DEADLINE_EXCEEDED: u16 = 4;

/// The content type of the answers.
pub(crate) const CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// A gRPC request over HTTP/2 (`application/grpc`, `application/grpc+proto`, …), not gRPC-Web.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/grpc") && !v.starts_with(b"application/grpc-web")
    })
}

/// A Trailers-Only answer: `code`, `message` (percent-encoded here) and, if given, the delay
/// after which a retry may go; its body is for the caller to add.
pub(crate) fn trailers_only(code: u16, message: &str, pushback: Option<Duration>) -> Response<()> {
    let mut res = Response::new(());
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, CONTENT_TYPE);
    h.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::try_from(crate::frame::grpc_percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    if let Some(d) = pushback {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        h.insert("grpc-retry-pushback-ms", HeaderValue::from(ms));
    }
    res
}

/// The request's `grpc-timeout` (`<at most 8 digits><H|M|S|m|u|n>`), if any and valid.
pub(crate) fn timeout_of(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(k: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(k, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn grpc_timeout_is_parsed_as_the_spec_writes_it() {
        let t = |v| timeout_of(&headers("grpc-timeout", v));
        assert_eq!(t("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(t("3M"), Some(Duration::from_secs(180)));
        assert_eq!(t("10S"), Some(Duration::from_secs(10)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "123456789S", "1.5S", "10", "10s", "-1S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(timeout_of(&HeaderMap::new()), None);
    }

    #[test]
    fn only_grpc_over_http2_is_grpc() {
        let g = |v| is_grpc(&headers("content-type", v));
        assert!(g("application/grpc"));
        assert!(g("application/grpc+proto"));
        assert!(g("application/grpc+json"));
        assert!(!g("application/grpc-web"));
        assert!(!g("application/grpc-web-text+proto"));
        assert!(!g("application/json"));
    }

    #[test]
    fn a_trailers_only_answer_carries_everything_in_its_headers() {
        let res = trailers_only(
            RESOURCE_EXHAUSTED,
            "too many streams",
            Some(Duration::from_secs(2)),
        );
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "application/grpc");
        assert_eq!(res.headers()["grpc-status"], "8");
        assert_eq!(res.headers()["grpc-message"], "too%20many%20streams");
        assert_eq!(res.headers()["grpc-retry-pushback-ms"], "2000");
    }
}
