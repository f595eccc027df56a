//! The reject layer's unit tests.

use bytes::Bytes;
use http_body::Body as _;
use http_body_util::{BodyExt, Empty};
use tower::ServiceExt;

use std::time::Duration;

use http::request::Parts;
use http::{header, Request, Response, StatusCode, Version};
use tower_layer::Layer;

use super::layer::probe_paths;
use super::response::accepts_event_stream;
use super::*;
use crate::{DrainController, DrainReason};

fn parts(method: &str, accept: &[&str], version: Version) -> Parts {
    let mut b = Request::builder()
        .method(method)
        .uri("/events")
        .version(version);
    for a in accept {
        b = b.header(header::ACCEPT, *a);
    }
    b.body(()).unwrap().into_parts().0
}

#[test]
fn grpc_web_gets_the_http_answer_and_grpc_the_trailers_only_one() {
    let mut r = Default503::new(Duration::from_secs(2));
    let req = |ct: &str| {
        Request::post("/demo.Svc/Call")
            .header(header::CONTENT_TYPE, ct)
            .body(())
            .unwrap()
            .into_parts()
            .0
    };
    // gRPC-Web gets a plain 503 (no gRPC status, no content type); gRPC a trailers-only 14.
    for (ct, web) in [
        ("application/grpc-web", true),
        ("application/grpc-web+proto", true),
        ("application/grpc-web-text", true),
        ("application/grpc", false),
        ("application/grpc+proto", false),
        ("application/grpc+json", false),
    ] {
        let res: Response<String> = r.response(&req(ct));
        let headers = res.headers();
        if web {
            assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{ct}");
            assert_eq!(headers[header::RETRY_AFTER], "2", "{ct}");
            assert!(headers.get("grpc-status").is_none(), "{ct}");
            assert!(headers.get(header::CONTENT_TYPE).is_none(), "{ct}");
        } else {
            assert_eq!(res.status(), StatusCode::OK, "{ct}");
            assert_eq!(headers["grpc-status"], "14", "{ct}");
        }
    }
}

#[test]
fn probes_and_grpc_health_are_exempt_by_default() {
    let exempt = |path: &str| probe_paths(&Request::post(path).body(()).unwrap().into_parts().0);
    assert!(exempt("/readyz"));
    assert!(exempt("/grpc.health.v1.Health/Check"));
    assert!(exempt("/grpc.health.v1.Health/Watch"));
    assert!(!exempt("/grpc.health.v1.HealthX/Check"));
    assert!(!exempt("/demo.Ticker/Watch"));
}

#[test]
fn only_a_get_that_names_event_stream_accepts_it() {
    let yes = |m, a: &[&str]| accepts_event_stream(&parts(m, a, Version::HTTP_11));
    assert!(yes("GET", &["text/event-stream"]));
    assert!(yes("GET", &["Text/Event-Stream; charset=utf-8"]));
    assert!(yes("GET", &["application/json, text/event-stream;q=0.9"]));
    assert!(yes("GET", &["application/json", "text/event-stream"]));
    assert!(!yes("GET", &["*/*"]));
    assert!(!yes("GET", &["text/*"]));
    assert!(!yes("GET", &[]));
    assert!(!yes("POST", &["text/event-stream"]));
    assert!(!yes("GET", &["text/event-streams"]));
}

#[tokio::test(start_paused = true)]
async fn sse_retry_answers_200_with_one_frame() {
    let drain = DrainController::configured(|b| b.reconnect_delay(Duration::from_secs(3)));
    let svc = RejectLayer::new(drain.watch())
        .sse_retry()
        .layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
        }));
    drain.drain(DrainReason::Manual);
    drain.closing().await;

    for (version, close) in [(Version::HTTP_11, true), (Version::HTTP_2, false)] {
        let req = Request::get("/events")
            .version(version)
            .header("accept", "text/event-stream")
            .body(())
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        assert_eq!(res.headers()["cache-control"], "no-store");
        assert_eq!(res.headers().contains_key("connection"), close);
        let body = res.into_body();
        let len = body.size_hint().exact().unwrap();
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len() as u64, len);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with("event: shutdown\ndata: {\"type\":\"shutdown\""));
        assert!(text.contains("\"reason\":\"manual\""), "{text}");
        assert_eq!(text.matches("\n\n").count(), 1, "one event: {text}");
        let retry: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("retry: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((2400..=3600).contains(&retry), "{retry}");
    }
    // A gRPC request still gets the gRPC-shaped answer, with the drain message.
    let grpc = Request::post("/demo.Ticker/Watch")
        .header("content-type", "application/grpc")
        .header("accept", "text/event-stream")
        .body(())
        .unwrap();
    let res = svc.oneshot(grpc).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "14");
    assert_eq!(
        res.headers()["grpc-message"],
        "Server%20is%20shutting%20down,%20please%20reconnect"
    );
    assert!(res.body().is_end_stream());
}
