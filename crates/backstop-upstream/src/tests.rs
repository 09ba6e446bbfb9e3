use std::time::Duration;

use backstop_adapter::{Backend, BackendError, ChatChunk, FailureKind, Request};
use backstop_testkit::{echo_text, MockReply, MockUpstream, SseStep};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::*;

fn chat(stream: bool) -> Request {
    let body = json!({"model": "gpt-4o-mini", "stream": stream,
                      "messages": [{"role": "user", "content": "hello there"}]});
    Request::parse_chat(body.to_string().as_bytes()).unwrap()
}

fn upstream(mock: &MockUpstream) -> Upstream {
    let mut cfg = UpstreamConfig::new("mock", mock.url());
    cfg.api_keys = vec!["sk-test".into()];
    cfg.first_byte_timeout = Duration::from_millis(300);
    cfg.idle_timeout = Duration::from_millis(300);
    Upstream::new(cfg).unwrap()
}

async fn collect(up: &Upstream, req: &Request) -> (Vec<ChatChunk>, Option<BackendError>) {
    let reply = up.stream(req).await.unwrap();
    let mut chunks = Vec::new();
    let mut body = reply.body;
    while let Some(item) = body.next().await {
        match item {
            Ok(c) => chunks.push(c),
            Err(e) => return (chunks, Some(e)),
        }
    }
    (chunks, None)
}

fn text_of(chunks: &[ChatChunk]) -> String {
    chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.delta.content.clone())
        .collect()
}

fn completion(text: &str) -> serde_json::Value {
    json!({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": text}}]})
}

#[tokio::test]
async fn completes_and_passes_rate_limit_headers_and_auth() {
    let mock = MockUpstream::start().await.unwrap();
    mock.push([MockReply::Json {
        status: 200,
        body: completion("hi"),
        headers: vec![
            ("x-ratelimit-remaining-requests".into(), "99".into()),
            ("x-request-id".into(), "req_1".into()),
            ("server".into(), "hidden".into()),
        ],
    }]);
    let up = upstream(&mock);
    let reply = up.complete(&chat(false)).await.unwrap();
    assert_eq!(
        reply.body.choices[0]
            .message
            .content
            .as_ref()
            .unwrap()
            .to_text(),
        "hi"
    );
    assert!(reply
        .headers
        .contains(&("x-ratelimit-remaining-requests".into(), "99".into())));
    assert!(reply.headers.iter().all(|(k, _)| k != "server"));
    let seen = &mock.requests()[0];
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.headers["authorization"], "Bearer sk-test");
    assert_eq!(seen.body["stream"], json!(false));
}

#[tokio::test]
async fn upstream_error_bodies_and_statuses_pass_through() {
    let mock = MockUpstream::start().await.unwrap();
    mock.push([MockReply::Json {
        status: 429,
        body: json!({"error": {"message": "Rate limit reached", "type": "requests",
                               "param": null, "code": "rate_limit_exceeded"}}),
        headers: vec![("retry-after".into(), "2".into())],
    }]);
    let err = upstream(&mock).complete(&chat(false)).await.unwrap_err();
    assert_eq!(err.kind, FailureKind::RateLimited);
    assert_eq!(err.http_status(), 429);
    assert_eq!(err.to_body()["error"]["code"], "rate_limit_exceeded");
    assert!(err.headers.contains(&("retry-after".into(), "2".into())));
}

#[tokio::test]
async fn non_json_answers_become_clean_502s() {
    let mock = MockUpstream::start().await.unwrap();
    let html = |status| MockReply::Raw {
        status,
        content_type: Some("text/html".into()),
        body: Bytes::from_static(b"<html><body>502 Bad Gateway</body></html>"),
    };
    mock.push([
        html(503),
        html(200),
        MockReply::Raw {
            status: 200,
            content_type: Some("application/json".into()),
            body: Bytes::from_static(b"{\"id\": \"x\", \"choi"),
        },
        MockReply::Json {
            status: 200,
            body: json!({"error": {"message": "overloaded", "type": "server_error"}}),
            headers: vec![],
        },
    ]);
    let up = upstream(&mock);
    let e = up.complete(&chat(false)).await.unwrap_err();
    assert_eq!((e.kind, e.http_status()), (FailureKind::ServerError, 502));
    assert!(e.message.contains("text/html"), "{e:?}");
    assert!(!e.to_body().to_string().contains("<html>"));
    let e = up.complete(&chat(false)).await.unwrap_err();
    assert_eq!((e.kind, e.http_status()), (FailureKind::BadResponse, 502));
    let e = up.complete(&chat(false)).await.unwrap_err();
    assert_eq!((e.kind, e.http_status()), (FailureKind::BadResponse, 502));
    let e = up.complete(&chat(false)).await.unwrap_err();
    assert_eq!((e.kind, e.http_status()), (FailureKind::StreamError, 502));
    assert_eq!(e.to_body()["error"]["message"], "overloaded");
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let mock = MockUpstream::start().await.unwrap();
    mock.push([MockReply::Json {
        status: 307,
        body: json!({}),
        headers: vec![("location".into(), "/v1/elsewhere".into())],
    }]);
    let e = upstream(&mock).complete(&chat(false)).await.unwrap_err();
    assert_eq!(e.http_status(), 502);
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test]
async fn deadlines_classify_hangs_and_refusals() {
    let mock = MockUpstream::start().await.unwrap();
    mock.push([MockReply::Hang]);
    let e = upstream(&mock).complete(&chat(false)).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::FirstByteTimeout);

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let up = Upstream::new(UpstreamConfig::new("gone", format!("http://{closed}/v1"))).unwrap();
    let e = up.complete(&chat(false)).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Connect);
    assert!(e.kind.retryable() && e.kind.trips_breaker());
}

#[tokio::test]
async fn streams_decode_into_chunks() {
    let mock = MockUpstream::start().await.unwrap();
    let up = upstream(&mock);
    let req = chat(true);
    let (chunks, err) = collect(&up, &req).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        text_of(&chunks),
        echo_text(&json!({"messages": [{"content": "hello there"}]}))
    );
    assert_eq!(
        chunks.last().unwrap().choices[0].finish_reason.as_deref(),
        Some("stop")
    );
    assert_eq!(mock.requests()[0].headers["accept"], "text/event-stream");
}

fn data(text: &str) -> SseStep {
    SseStep::Data(
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
        .to_string(),
    )
}

fn finish() -> SseStep {
    SseStep::Data(
        json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        .to_string(),
    )
}

async fn stream_outcome(steps: Vec<SseStep>) -> (String, Option<FailureKind>) {
    let mock = MockUpstream::start().await.unwrap();
    mock.push([MockReply::Sse {
        status: 200,
        headers: vec![],
        steps,
    }]);
    let (chunks, err) = collect(&upstream(&mock), &chat(true)).await;
    (text_of(&chunks), err.map(|e| e.kind))
}

#[tokio::test]
async fn broken_streams_end_in_classified_errors() {
    let cut = stream_outcome(vec![data("Hel"), data("lo"), SseStep::Cut]).await;
    assert_eq!(cut, ("Hello".into(), Some(FailureKind::StreamBroken)));

    let ended = stream_outcome(vec![data("Hel")]).await;
    assert_eq!(ended, ("Hel".into(), Some(FailureKind::StreamBroken)));

    let stalled = stream_outcome(vec![
        data("a"),
        SseStep::Sleep(Duration::from_secs(5)),
        data("b"),
    ])
    .await;
    assert_eq!(stalled, ("a".into(), Some(FailureKind::StreamStalled)));

    let malformed = stream_outcome(vec![data("a"), SseStep::Data("{\"id\": tru".into())]).await;
    assert_eq!(malformed, ("a".into(), Some(FailureKind::BadResponse)));

    let error_event = stream_outcome(vec![
        data("a"),
        SseStep::Data(
            json!({"error": {"message": "server overloaded", "type": "server_error"}}).to_string(),
        ),
        data("never"),
    ])
    .await;
    assert_eq!(error_event, ("a".into(), Some(FailureKind::StreamError)));
}

#[tokio::test]
async fn a_finished_stream_without_done_ends_cleanly_and_done_stops_reading() {
    let no_done = stream_outcome(vec![data("ok"), finish()]).await;
    assert_eq!(no_done, ("ok".into(), None));
    // Nor does one whose upstream keeps the body open without `[DONE]`: it is
    // closed shortly after the finish reason, not failed as stalled.
    let held_open = stream_outcome(vec![
        data("ok"),
        finish(),
        SseStep::Sleep(Duration::from_secs(20)),
    ])
    .await;
    assert_eq!(held_open, ("ok".into(), None));
    // After [DONE] nothing more is read, even if the server keeps the body open.
    let done = stream_outcome(vec![
        data("ok"),
        finish(),
        SseStep::Data("[DONE]".into()),
        SseStep::Sleep(Duration::from_secs(5)),
    ])
    .await;
    assert_eq!(done, ("ok".into(), None));
}

#[tokio::test]
async fn legacy_requests_use_the_legacy_endpoint_and_map_back() {
    let mock = MockUpstream::start().await.unwrap();
    let mut cfg = UpstreamConfig::new("mock", mock.url());
    cfg.model = Some("renamed".into());
    let up = Upstream::new(cfg).unwrap();
    let req = Request::parse_legacy(br#"{"model":"m","prompt":"Say hi","echo":true}"#).unwrap();
    let reply = up.complete(&req).await.unwrap();
    assert_eq!(
        reply.body.choices[0]
            .message
            .content
            .as_ref()
            .unwrap()
            .to_text(),
        "You said: Say hi"
    );
    let seen = &mock.requests()[0];
    assert_eq!(seen.path, "/v1/completions");
    assert_eq!(seen.body["prompt"], "Say hi");
    assert_eq!(seen.body["echo"], true);
    assert_eq!(seen.body["model"], "renamed");
    assert!(seen.body.get("messages").is_none());

    let req = Request::parse_legacy(br#"{"model":"m","prompt":"Say hi","stream":true}"#).unwrap();
    let (chunks, err) = collect(&up, &req).await;
    assert!(err.is_none());
    assert_eq!(text_of(&chunks), "You said: Say hi");
}

#[tokio::test]
async fn a_json_answer_to_a_stream_request_is_replayed_as_chunks() {
    let mock = MockUpstream::start().await.unwrap();
    mock.push([MockReply::Json {
        status: 200,
        body: completion("whole"),
        headers: vec![],
    }]);
    let (chunks, err) = collect(&upstream(&mock), &chat(true)).await;
    assert!(err.is_none());
    assert_eq!(text_of(&chunks), "whole");
}

#[tokio::test]
async fn models_are_listed() {
    let mock = MockUpstream::start().await.unwrap();
    let models = upstream(&mock).models().await.unwrap();
    assert_eq!(models[0].id, "mock-model");
}

#[test]
fn a_missing_or_bad_ca_bundle_is_a_named_startup_error() {
    let mut cfg = UpstreamConfig::new("tls", "https://127.0.0.1:1/v1");
    cfg.ca_bundle = Some("/nonexistent/ca.pem".into());
    let e = Upstream::new(cfg.clone()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad-ca.pem");
    std::fs::write(
        &path,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    cfg.ca_bundle = Some(path);
    assert!(matches!(Upstream::new(cfg), Err(UpstreamError::Client(_))));
}

#[tokio::test]
async fn tls_upstreams_are_trusted_through_an_extra_ca_bundle_and_speak_http2() {
    let (mock, ca_pem) = MockUpstream::start_tls().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, ca_pem).unwrap();

    // Without the bundle the mock's private CA is unknown: a connect failure.
    let plain = Upstream::new(UpstreamConfig::new("tls", mock.url())).unwrap();
    let e = plain.complete(&chat(false)).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Connect, "{e:?}");
    assert!(mock.requests().is_empty());

    for http2 in [false, true] {
        let mut cfg = UpstreamConfig::new("tls", mock.url());
        cfg.ca_bundle = Some(path.clone());
        cfg.http2 = http2;
        let up = Upstream::new(cfg).unwrap();
        let (chunks, err) = collect(&up, &chat(true)).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!(text_of(&chunks), "You said: hello there");
        let version = mock.requests().last().unwrap().version;
        let expected = if http2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(version, expected);
    }
}

#[test]
fn prompt_tokens_follow_openais_chat_accounting() {
    let req = Request::parse_chat(
        br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#,
    )
    .unwrap();
    // 3 to prime the reply, 3 for the message, 1 for "user", 2 for "hello world".
    assert_eq!(tokens::prompt_tokens(&req, "gpt-4o"), 9);
    assert_eq!(tokens::prompt_tokens(&req, "gpt-3.5-turbo"), 9);
    let legacy =
        Request::parse_legacy(br#"{"model":"gpt-3.5-turbo-instruct","prompt":"hello world"}"#)
            .unwrap();
    assert_eq!(tokens::prompt_tokens(&legacy, "gpt-3.5-turbo-instruct"), 2);
}

#[tokio::test]
async fn a_prompt_over_the_context_window_is_not_sent_and_max_tokens_is_clamped() {
    let mock = MockUpstream::start().await.unwrap();
    let mut cfg = UpstreamConfig::new("small", mock.url());
    cfg.context_window = Some(40);
    let up = Upstream::new(cfg).unwrap();
    let long = "word ".repeat(60);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": long}]});
    let e = up
        .complete(&Request::parse_chat(body.to_string().as_bytes()).unwrap())
        .await
        .unwrap_err();
    assert!(e.is_context_length_exceeded(), "{e:?}");
    assert!(e.message.contains("tokens over"), "{}", e.message);
    assert!(mock.requests().is_empty(), "never sent");

    let body = json!({"model": "gpt-4o", "max_tokens": 1000,
                      "messages": [{"role": "user", "content": "hello world"}]});
    up.complete(&Request::parse_chat(body.to_string().as_bytes()).unwrap())
        .await
        .unwrap();
    assert_eq!(mock.requests()[0].body["max_tokens"], 40 - 9);
}

#[tokio::test]
async fn a_spent_rate_limit_or_a_429_holds_the_target_back_without_sending() {
    let mock = MockUpstream::start().await.unwrap();
    let mut cfg = UpstreamConfig::new("limited", mock.url());
    cfg.requests_per_minute = Some(2);
    let up = Upstream::new(cfg).unwrap();
    up.complete(&chat(false)).await.unwrap();
    up.complete(&chat(false)).await.unwrap();
    let e = up.complete(&chat(false)).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Throttled);
    assert!(e.headers.iter().any(|(k, _)| k == "retry-after-ms"));
    assert_eq!(mock.requests().len(), 2);

    let mock = MockUpstream::start().await.unwrap();
    mock.push([MockReply::Json {
        status: 429,
        body: json!({"error": {"message": "slow down", "type": "requests", "param": null, "code": null}}),
        headers: vec![("retry-after".into(), "30".into())],
    }]);
    let up = upstream(&mock);
    assert_eq!(
        up.complete(&chat(false)).await.unwrap_err().kind,
        FailureKind::RateLimited
    );
    assert_eq!(
        up.complete(&chat(false)).await.unwrap_err().kind,
        FailureKind::Throttled
    );
    assert_eq!(mock.requests().len(), 1, "persistent 429s are not hammered");
}

#[tokio::test]
async fn a_prefill_is_counted_as_answer_in_usage_and_comes_out_of_max_tokens() {
    let mock = MockUpstream::start().await.unwrap();
    let up = upstream(&mock);
    let usage = |u: Option<&backstop_adapter::Usage>| {
        let u = u.unwrap();
        (u.prompt_tokens, u.completion_tokens, u.total_tokens)
    };
    // "Hello there" is two tokens in gpt-4o-mini's encoding.
    for stream in [false, true] {
        let body = json!({"model": "gpt-4o-mini", "stream": stream, "max_tokens": 10,
                          "stream_options": {"include_usage": true},
                          "messages": [{"role": "user", "content": "hi"}]});
        let plain = Request::parse_chat(body.to_string().as_bytes()).unwrap();
        let mut continued = plain.clone();
        continued.prefill = Some("Hello there".into());
        let mut seen = Vec::new();
        for req in [&plain, &continued] {
            seen.push(if stream {
                let (chunks, err) = collect(&up, req).await;
                assert!(err.is_none());
                usage(chunks.iter().find_map(|c| c.usage.as_ref()))
            } else {
                usage(up.complete(req).await.unwrap().body.usage.as_ref())
            });
        }
        let sent: Vec<_> = mock
            .requests()
            .iter()
            .map(|r| r.body["max_tokens"].clone())
            .collect();
        assert_eq!(sent[sent.len() - 2..], [json!(10), json!(8)]);
        // The echo's usage (words of the request and of the answer), with
        // the prefill's two tokens moved from prompt to completion.
        let (p, c, t) = seen[1];
        // The target takes no prefill: it got the continuation prompt.
        let echo = |req: &Request| {
            let sent = req.as_continuation();
            let sent = sent.upstream_body(&Outgoing::AS_SENT).unwrap();
            let sent: Value = serde_json::from_slice(&sent).unwrap();
            let answer = echo_text(&sent);
            (
                sent.to_string().split_whitespace().count() as u64,
                answer.split_whitespace().count() as u64,
            )
        };
        let (ep, ec) = echo(&continued);
        assert_eq!((p, c, t), (ep - 2, ec + 2, ep + ec));
    }
}

fn decoded(bounds: decode::StreamBounds, input: &str) -> Vec<Result<String, FailureKind>> {
    let mut d = decode::ChunkDecoder::new(backstop_adapter::Wire::Chat, bounds);
    let mut out = Vec::new();
    if let Err(e) = d.feed(input.as_bytes()) {
        out.push(Err(e.kind));
    }
    while let Some(item) = d.next_chunk() {
        out.push(
            item.map(|c| {
                c.choices
                    .iter()
                    .map(|ch| {
                        let text = ch.delta.content.clone().unwrap_or_default();
                        match &ch.finish_reason {
                            Some(r) => format!("{text}|{r}"),
                            None => text,
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(",")
                    + if c.usage.is_some() { "+usage" } else { "" }
            })
            .map_err(|e| e.kind),
        );
    }
    out
}

fn bounds(max_tokens: Option<u64>) -> decode::StreamBounds {
    decode::StreamBounds {
        choices: 1,
        max_tokens,
        model: "gpt-4o-mini".into(),
        max_event_bytes: 4096,
    }
}

fn sse_chunk(index: u64, text: &str, finish: Option<&str>) -> String {
    let chunk = json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": index, "delta": {"content": text}, "finish_reason": finish}]});
    format!("data: {chunk}\n\n")
}

#[test]
fn the_decoder_holds_a_stream_to_max_tokens_and_keeps_the_usage() {
    let mut input: String = (0..50)
        .map(|i| sse_chunk(0, &format!(" w{i}"), None))
        .collect();
    input.push_str(&sse_chunk(0, "", Some("stop")));
    input.push_str(&format!(
        "data: {}\n\ndata: [DONE]\n\n",
        json!({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
               "usage": {"prompt_tokens": 1, "completion_tokens": 100, "total_tokens": 101}})
    ));
    let out = decoded(bounds(Some(5)), &input);
    let said: Vec<_> = out.iter().map(|r| r.clone().unwrap()).collect();
    // Each " wN" is two tokens: two whole pieces, then one token of the third.
    assert_eq!(said, [" w0", " w1", " w|length", "+usage"], "{said:?}");
    // Without a cap, all of it.
    assert_eq!(decoded(bounds(None), &input).len(), 52);
}

#[test]
fn the_decoder_refuses_a_choice_index_past_n_and_an_oversized_event() {
    let out = decoded(bounds(None), &sse_chunk(4_000_000_000, "hi", None));
    assert_eq!(out, [Err(FailureKind::BadResponse)]);
    let huge = format!("data: {}\n\n", "a".repeat(5000));
    assert_eq!(
        decoded(bounds(None), &huge),
        [Err(FailureKind::BadResponse)]
    );
}

#[tokio::test]
async fn a_whole_answer_past_max_tokens_is_cut_there() {
    let mock = MockUpstream::start().await.unwrap();
    let up = upstream(&mock);
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 3,
                      "messages": [{"role": "user", "content": "one two three four five six"}]});
    let req = Request::parse_chat(body.to_string().as_bytes()).unwrap();
    let reply = up.complete(&req).await.unwrap();
    let choice = &reply.body.choices[0];
    let text = choice.message.content.as_ref().unwrap().to_text();
    assert_eq!(tokens::text_tokens(&text, "gpt-4o-mini"), 3, "{text}");
    assert_eq!(choice.finish_reason.as_deref(), Some("length"));
}

#[test]
fn a_huge_text_costs_only_its_start_to_cap() {
    let huge = "a".repeat(4 << 20);
    let cut = tokens::first_tokens(&huge, "gpt-4o-mini", 5);
    assert!(!cut.is_empty() && cut.len() < 5 * 256, "{}", cut.len());
    assert_eq!(tokens::text_tokens(&cut, "gpt-4o-mini"), 5);
    assert!(tokens::tokens_up_to(&huge, "gpt-4o-mini", 5) > 5);
    assert_eq!(tokens::tokens_up_to("Hello there", "gpt-4o-mini", 5), 2);
    assert_eq!(
        tokens::first_tokens("Hello there", "gpt-4o-mini", 5),
        "Hello there"
    );
}

#[tokio::test]
async fn a_refused_key_comes_back_once_its_time_out_is_over() {
    let mock = MockUpstream::start().await.unwrap();
    let mut cfg = UpstreamConfig::new("mock", mock.url());
    cfg.api_keys = vec!["sk-a".into(), "sk-b".into()];
    let up = Upstream::new(cfg).unwrap();
    mock.push([MockReply::error(
        401,
        "invalid_request_error",
        "Incorrect API key provided.",
    )]);
    up.complete(&chat(false)).await.unwrap();
    assert_eq!(up.keys_in_use(), [false, true]);
    // KEY_OUT later: the moment it was out until has passed.
    *up.keys[0].out_until.lock().unwrap() = Some(Instant::now());
    assert_eq!(up.keys_in_use(), [true, true]);
    for _ in 0..4 {
        up.complete(&chat(false)).await.unwrap();
    }
    let keys: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_string())
        .collect();
    assert_eq!(keys[..2], ["Bearer sk-a", "Bearer sk-b"]);
    assert!(keys[2..].contains(&"Bearer sk-a".to_string()), "{keys:?}");
    assert!(keys[2..].contains(&"Bearer sk-b".to_string()), "{keys:?}");
}
