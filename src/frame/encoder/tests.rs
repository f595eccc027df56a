use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderValue};

use super::*;

#[test]
fn numbers_are_written_in_decimal_at_any_width() {
    for n in [
        0,
        9,
        10,
        27_431,
        u128::from(u64::MAX),
        u128::from(u64::MAX) + 1,
        u128::MAX,
    ] {
        let mut out = b"x".to_vec();
        push_u128(&mut out, n);
        assert_eq!(out, format!("x{n}").into_bytes());
    }
}

#[test]
fn frames_do_not_depend_on_a_previous_frame() {
    // The scratch buffer is reused: a long message then a short one.
    let mut ctx = FrameContext::new(FrameKind::Shutdown);
    let long = "m".repeat(10_000);
    ctx.message = &long;
    let first = Sse::new().encode(&ctx);
    assert!(first.data_ref().unwrap().len() > 10_000);
    ctx.message = "short";
    let second = NdJson::new().encode(&ctx);
    let line = second.data_ref().unwrap();
    let v: serde_json::Value = serde_json::from_slice(line).unwrap();
    assert_eq!(v["message"], "short");
    assert!(line.ends_with(b"}\n"));
}

#[test]
fn sse_shutdown_frame_is_exact() {
    let mut ctx = FrameContext::new(FrameKind::Shutdown);
    ctx.reason = Some("signal");
    ctx.retry = Duration::from_millis(27_431);
    ctx.timestamp = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let out = Sse::new().encode(&ctx);
    assert_eq!(
        out.data_ref().unwrap(),
        "event: shutdown\ndata: {\"type\":\"shutdown\",\"message\":\"Server is shutting down, please reconnect\",\"timestamp\":\"2023-11-14T22:13:20.000Z\",\"reconnect_delay\":30,\"reason\":\"signal\"}\nretry: 27431\n\n"
    );
    ctx.kind = FrameKind::ForcedShutdown;
    let forced = Sse::new().encode(&ctx);
    assert!(std::str::from_utf8(forced.data_ref().unwrap())
        .unwrap()
        .contains(",\"forced\":true}\n"));
}

#[test]
fn content_types() {
    let h = |ct: &'static str| {
        let mut m = HeaderMap::new();
        m.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        m
    };
    assert!(Sse::new().applies(&h("text/event-stream")));
    assert!(Sse::new().applies(&h("Text/Event-Stream; charset=utf-8")));
    assert!(!Sse::new().applies(&h("text/plain")));
    assert!(!Sse::new().applies(&HeaderMap::new()));
    assert!(NdJson::new().applies(&h("application/x-ndjson")));
    assert!(Grpc::new().applies(&h("application/grpc+proto")));
    assert!(!Grpc::new().applies(&h("application/grpc-web")));
    assert!(!Grpc::new().applies(&h("application/grpc-web+proto")));
    assert!(!Sse::new().applies(&h("text/event")));
    assert!(!Sse::new().applies(&h("")));
    // Leading whitespace is skipped; bytes outside visible ASCII after the type (allowed in
    // a header value) do not hide it.
    assert!(Sse::new().applies(&h(" \ttext/event-stream")));
    let mut m = HeaderMap::new();
    let v = HeaderValue::from_bytes(b"text/event-stream; x=\xe9").unwrap();
    m.insert(header::CONTENT_TYPE, v);
    assert!(Sse::new().applies(&m));
}

/// A spec-following SSE parser (CR, LF and CRLF end lines; a blank line dispatches).
fn parse_sse(text: &str) -> Vec<(String, String, Option<String>)> {
    let mut events = Vec::new();
    let (mut event, mut data, mut retry) = (String::new(), Vec::<String>::new(), None);
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    for line in normalized.split('\n') {
        if line.is_empty() {
            if !data.is_empty() || !event.is_empty() {
                events.push((std::mem::take(&mut event), data.join("\n"), retry.take()));
                data.clear();
            }
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = value.to_string(),
            "data" => data.push(value.to_string()),
            "retry" => retry = Some(value.to_string()),
            _ => {}
        }
    }
    events
}

proptest::proptest! {
    #[test]
    fn no_message_or_reason_can_forge_an_event(
        message in ".*",
        reason in "(\\PC|\r|\n|\u{0})*",
        kind in 0usize..5,
        retry_ms in 0u64..1_000_000,
    ) {
        let kinds = [
            FrameKind::Shutdown,
            FrameKind::ForcedShutdown,
            FrameKind::Timeout,
            FrameKind::Error,
            FrameKind::Unauthorized,
        ];
        let mut ctx = FrameContext::new(kinds[kind]);
        let message = format!("{message}\n\nevent: x\ndata: forged\r\n\r\n");
        ctx.message = &message;
        ctx.reason = Some(&reason);
        ctx.retry = Duration::from_millis(retry_ms);
        let out = Sse::new().encode(&ctx);
        let text = std::str::from_utf8(out.data_ref().unwrap()).unwrap();
        let events = parse_sse(text);
        proptest::prop_assert_eq!(events.len(), 1, "{:?}", text);
        let (event, data, retry) = &events[0];
        let expected = if kinds[kind].is_shutdown() { "shutdown" } else { "error" };
        proptest::prop_assert_eq!(event.as_str(), expected);
        let retry_text = retry_ms.to_string();
        proptest::prop_assert_eq!(retry.as_deref(), Some(retry_text.as_str()));
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        if kinds[kind].is_shutdown() {
            proptest::prop_assert_eq!(v["message"].as_str(), Some(message.as_str()));
            proptest::prop_assert_eq!(v["reason"].as_str(), Some(reason.as_str()));
        }
        // NDJSON: exactly one line whatever the message.
        let line = NdJson::new().encode(&ctx).into_parts().0.unwrap();
        proptest::prop_assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        proptest::prop_assert!(line.ends_with(b"\n"));
    }
}

#[test]
fn grpc_message_is_percent_encoded() {
    assert_eq!(grpc_percent_encode("a b%\n\u{e9}"), "a%20b%25%0A%C3%A9");
}
