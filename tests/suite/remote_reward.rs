//! `RemoteReward` against a fake reward server on loopback (std `TcpListener`, one thread per
//! connection) that speaks `docs/reward_protocol.md`: it decodes the base64 PNGs and scores
//! each image by its mean pixel value, so a passing round trip shows the images arrived intact
//! and in order. Also: batch splitting, retries after a transient 503, timeouts, malformed
//! replies, a wrong number of scores, error statuses and a server that is not running.

use crate::common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::fake_server::{FakeServer, Reply, mean_pixel_scores};
use flow_opd::reward::{RemoteReward, RemoteRewardConfig, Reward, RewardError, RewardInput};
use flow_opd::world::spec::Task;
use image::{Rgb, RgbImage};

/// Input `i`: a `w x 24` image whose pixels average to `(i * 10 + 5) / 255` exactly.
fn inputs(n: usize) -> Vec<RewardInput> {
    (0..n)
        .map(|i| {
            let level = (i * 10 + 5) as u8;
            let width = 16 + i as u32;
            let image = RgbImage::from_fn(width, 24, |x, _| if x % 2 == 0 { Rgb([level - 5, level, level + 5]) } else { Rgb([level + 5, level, level - 5]) });
            let input = RewardInput::new(image, format!("a sign that says \"prompt {i}\""));
            if i % 2 == 0 { input.with_task(Task::Text) } else { input }
        })
        .collect()
}

fn config(url: &str) -> RemoteRewardConfig {
    RemoteRewardConfig { timeout_secs: 5.0, retries: 0, backoff_ms: 10, max_backoff_ms: 100, ..RemoteRewardConfig::new(url, "mean_pixel") }
}

fn assert_mean_pixel_scores(scores: &[flow_opd::reward::RewardScore], n: usize) {
    assert_eq!(scores.len(), n);
    for (i, s) in scores.iter().enumerate() {
        let expected = (i * 10 + 5) as f32 / 255.0;
        assert!((s.value - expected).abs() < 1e-6, "score {i}: {} vs {expected}", s.value);
        assert_eq!(s.metric, (16 + i) as f32, "score {i}: metric is the image width");
    }
}

#[test]
fn scores_round_trip_with_images_prompts_and_tasks() {
    let server = FakeServer::start(|_, r| Reply::json(200, mean_pixel_scores(r)));
    let reward = RemoteReward::new(config(&server.url)).unwrap();
    assert_eq!(reward.name(), "mean_pixel");
    let batch = inputs(5);
    assert_mean_pixel_scores(&reward.score(&batch).unwrap(), 5);
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].method.as_str(), seen[0].path.as_str()), ("POST", "/score"));
    let body = &seen[0].body;
    assert_eq!(body["reward"], "mean_pixel");
    assert_eq!(body["prompts"][3], "a sign that says \"prompt 3\"");
    assert_eq!(body["metadata"][0], serde_json::json!({"task": "text"}));
    assert_eq!(body["metadata"][1], serde_json::json!({}));
    // An empty batch sends nothing.
    assert!(reward.score(&[]).unwrap().is_empty());
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn large_batches_are_split_in_order() {
    let server = FakeServer::start(|_, r| Reply::json(200, mean_pixel_scores(r)));
    let reward = RemoteReward::new(RemoteRewardConfig { max_batch_size: 3, ..config(&server.url) }).unwrap();
    assert_mean_pixel_scores(&reward.score(&inputs(8)).unwrap(), 8);
    let sizes: Vec<usize> = server.seen().iter().map(|s| s.body["images"].as_array().unwrap().len()).collect();
    assert_eq!(sizes, [3, 3, 2]);
    let first_prompts: Vec<String> = server.seen().iter().map(|s| s.body["prompts"][0].as_str().unwrap().to_string()).collect();
    assert_eq!(first_prompts, ["a sign that says \"prompt 0\"", "a sign that says \"prompt 3\"", "a sign that says \"prompt 6\""]);
}

#[test]
fn transient_503s_are_retried_with_backoff() {
    // The first two requests fail with 503 (the second asks for a 0.2 s Retry-After).
    let server = FakeServer::start(|n, r| match n {
        0 => Reply::json(503, serde_json::json!({"error": "model loading"})),
        1 => Reply { headers: vec![("Retry-After", "0.2".into())], ..Reply::json(503, serde_json::json!({"error": "busy"})) },
        _ => Reply::json(200, mean_pixel_scores(r)),
    });
    let reward =
        RemoteReward::new(RemoteRewardConfig { retries: 2, backoff_ms: 50, max_backoff_ms: 1000, ..config(&server.url) })
            .unwrap();
    let start = Instant::now();
    assert_mean_pixel_scores(&reward.score(&inputs(2)).unwrap(), 2);
    let elapsed = start.elapsed();
    assert_eq!(server.seen().len(), 3);
    assert!(elapsed >= Duration::from_millis(250), "waited {elapsed:?}: 50 ms backoff + 200 ms Retry-After");
    assert!(elapsed < Duration::from_millis(1000), "waited {elapsed:?}");

    // With fewer retries than failures the last 503 is reported with the server's message.
    let server = FakeServer::start(|_, _| Reply::json(503, serde_json::json!({"error": "model loading"})));
    let reward = RemoteReward::new(RemoteRewardConfig { retries: 1, ..config(&server.url) }).unwrap();
    let err = reward.score(&inputs(1)).unwrap_err();
    assert!(matches!(err, RewardError::RemoteStatus { status: 503, .. }), "{err:?}");
    assert!(err.to_string().contains("HTTP 503: model loading"), "{err}");
    assert_eq!(server.seen().len(), 2);
}

#[test]
fn client_errors_are_not_retried_and_quote_the_server() {
    let server = FakeServer::start(|_, _| {
        Reply::json(422, serde_json::json!({"error": "prompt has no quoted text", "index": 1}))
    });
    let reward = RemoteReward::new(RemoteRewardConfig { retries: 3, ..config(&server.url) }).unwrap();
    let err = reward.score(&inputs(2)).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RewardError::RemoteStatus { status: 422, .. }), "{err:?}");
    assert!(text.contains(&server.url) && text.contains("prompt has no quoted text (input 1 of the request)"), "{text}");
    assert_eq!(server.seen().len(), 1, "a 422 is final");
}

#[test]
fn a_sleeping_server_times_out() {
    let server = FakeServer::start(|_, r| {
        std::thread::sleep(Duration::from_secs(3));
        Reply::json(200, mean_pixel_scores(r))
    });
    let reward = RemoteReward::new(RemoteRewardConfig { timeout_secs: 0.3, retries: 1, ..config(&server.url) }).unwrap();
    let start = Instant::now();
    let err = reward.score(&inputs(1)).unwrap_err();
    let elapsed = start.elapsed();
    assert!(matches!(err, RewardError::RemoteTimeout { .. }), "{err:?}");
    assert!(err.to_string().contains("did not answer within 0.3 s"), "{err}");
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert_eq!(server.seen().len(), 2, "a timeout is retried");
}

#[test]
fn malformed_replies_are_reported_with_the_body() {
    for body in [r#"{"scores": [{"value": "high"}]}"#, "<html>oops</html>", r#"{"score": []}"#] {
        let reply = body.to_string();
        let server = FakeServer::start(move |_, _| Reply { status: 200, headers: vec![], body: reply.clone() });
        let reward = RemoteReward::new(RemoteRewardConfig { retries: 2, ..config(&server.url) }).unwrap();
        let err = reward.score(&inputs(1)).unwrap_err();
        assert!(matches!(err, RewardError::RemoteMalformed { .. }), "{err:?}");
        assert!(err.to_string().contains("malformed reply") && err.to_string().contains(body), "{err}");
        assert_eq!(server.seen().len(), 1, "a malformed reply is final");
    }
    // `metric` may be left out: it defaults to `value`.
    let server = FakeServer::start(|_, _| Reply::json(200, serde_json::json!({"scores": [{"value": 0.25}]})));
    let scores = RemoteReward::new(config(&server.url)).unwrap().score(&inputs(1)).unwrap();
    assert_eq!((scores[0].value, scores[0].metric), (0.25, 0.25));
}

#[test]
fn a_wrong_number_of_scores_is_an_error() {
    let server = FakeServer::start(|_, r| {
        let mut reply = mean_pixel_scores(r);
        reply["scores"].as_array_mut().unwrap().pop();
        Reply::json(200, reply)
    });
    let reward = RemoteReward::new(config(&server.url)).unwrap();
    let err = reward.score(&inputs(3)).unwrap_err();
    assert!(matches!(err, RewardError::RemoteCount { expected: 3, found: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("returned 2 scores for 3 images"), "{err}");
}

#[test]
fn a_server_that_is_not_running_is_named() {
    // A port that was free a moment ago: nothing listens there.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let reward = RemoteReward::new(RemoteRewardConfig { retries: 2, ..config(&url) }).unwrap();
    let start = Instant::now();
    let err = reward.score(&inputs(1)).unwrap_err();
    assert!(matches!(err, RewardError::RemoteUnreachable { attempts: 3, .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&format!("{url}/score")) && text.contains("not reachable after 3 attempt(s)"), "{text}");
    assert!(start.elapsed() >= Duration::from_millis(30), "backoff 10 + 20 ms between the attempts");
    assert!(reward.health().unwrap_err().to_string().contains("not reachable"));
}

#[test]
fn health_lists_the_reward() {
    let server = FakeServer::start(|_, r| {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/health"));
        Reply::json(200, serde_json::json!({"status": "ok", "rewards": ["mean_pixel", "other"], "max_batch_size": 16}))
    });
    let health = RemoteReward::new(config(&server.url)).unwrap().health().unwrap();
    assert_eq!(health.max_batch_size, Some(16));
    let wrong = RemoteReward::new(RemoteRewardConfig::new(server.url.clone(), "ocr")).unwrap();
    let err = wrong.health().unwrap_err().to_string();
    assert!(err.contains("not `ocr`"), "{err}");
}
