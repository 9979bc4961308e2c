//! A reward computed by a server over HTTP: the client side of `docs/reward_protocol.md`.
//!
//! The paper's rewards (GenEval's detector, an OCR model, PickScore, DeQA) are large Python
//! models; they run as servers (`tools/reward_servers/`) and [`RemoteReward`] scores a batch by
//! `POST {url}/score` with the images as base64 PNGs:
//!
//! ```text
//! { "reward": "ocr", "images": ["iVBORw0KGgo..."], "prompts": ["a sign that says \"hi\""],
//!   "metadata": [{"task": "text"}] }
//! -> 200 { "scores": [{"value": 0.8, "metric": 0.8}] }
//! ```
//!
//! Batches larger than `max_batch_size` are split into consecutive requests and the scores
//! concatenated in order. Connection failures, timeouts and HTTP 429 / 502 / 503 / 504 are
//! retried `retries` times with exponential backoff (`backoff_ms * 2^attempt`, capped at
//! `max_backoff_ms`, or the server's `Retry-After` when it sends one); any other non-200
//! status, a malformed reply or a wrong number of scores fails at once with the server's
//! error message.

use std::io::Cursor;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{Reward, RewardError, RewardInput, RewardScore};

/// Longest piece of a server's error body quoted in an error message.
const MAX_QUOTED_BODY: usize = 2000;

/// Where and how to reach a reward server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteRewardConfig {
    /// Base URL of the server, e.g. `http://127.0.0.1:8100` (`/score` and `/health` are
    /// appended). `https://` needs the crate's `remote-tls` feature.
    pub url: String,
    /// The reward's name: sent as `"reward"` (one server may host several) and reported by
    /// [`Reward::name`].
    pub name: String,
    /// Limit for one request, connection to last byte of the reply, in seconds.
    #[serde(default = "defaults::timeout_secs")]
    pub timeout_secs: f64,
    /// Extra attempts after a connection failure, a timeout or HTTP 429 / 502 / 503 / 504.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// Wait before the first retry, in milliseconds; doubled for each further one.
    #[serde(default = "defaults::backoff_ms")]
    pub backoff_ms: u64,
    /// Longest wait between two attempts, in milliseconds (also caps `Retry-After`).
    #[serde(default = "defaults::max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Most images per request; larger batches are split.
    #[serde(default = "defaults::max_batch_size")]
    pub max_batch_size: usize,
}

mod defaults {
    pub fn timeout_secs() -> f64 {
        120.0
    }
    pub fn retries() -> u32 {
        3
    }
    pub fn backoff_ms() -> u64 {
        500
    }
    pub fn max_backoff_ms() -> u64 {
        10_000
    }
    pub fn max_batch_size() -> usize {
        32
    }
}

impl RemoteRewardConfig {
    /// A config with the default timeout (120 s), retries (3, from 0.5 s) and batch size (32).
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            name: name.into(),
            timeout_secs: defaults::timeout_secs(),
            retries: defaults::retries(),
            backoff_ms: defaults::backoff_ms(),
            max_backoff_ms: defaults::max_backoff_ms(),
            max_batch_size: defaults::max_batch_size(),
        }
    }

    /// Checks the settings (scheme, name, timeout, batch size) without contacting the server.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("`url` must start with http:// or https://, got {:?}", self.url));
        }
        if self.name.is_empty() {
            return Err("`name` is empty".into());
        }
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return Err(format!("`timeout_secs` must be positive, got {}", self.timeout_secs));
        }
        if self.max_batch_size == 0 {
            return Err("`max_batch_size` must be at least 1".into());
        }
        Ok(())
    }
}

/// One request body of `POST /score`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScoreRequest {
    pub reward: String,
    /// Base64 (standard alphabet, padded) PNG files, 8-bit RGB.
    pub images: Vec<String>,
    pub prompts: Vec<String>,
    /// One object per image: `{"task": "text"}` when the task is known, else `{}`.
    pub metadata: Vec<serde_json::Map<String, serde_json::Value>>,
}

/// The reply to `POST /score`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScoreResponse {
    pub scores: Vec<ScoreEntry>,
}

/// One score of a reply; `metric` defaults to `value` when the server leaves it out.
#[derive(Debug, Serialize, Deserialize)]
pub struct ScoreEntry {
    pub value: f32,
    #[serde(default)]
    pub metric: Option<f32>,
}

/// The reply to `GET /health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// `"ok"` when the server is ready to score.
    pub status: String,
    /// The reward names the server scores.
    #[serde(default)]
    pub rewards: Vec<String>,
    /// The largest batch the server takes, if it has a limit.
    #[serde(default)]
    pub max_batch_size: Option<usize>,
}

/// A [`Reward`] scored by a server speaking `docs/reward_protocol.md`.
#[derive(Debug)]
pub struct RemoteReward {
    config: RemoteRewardConfig,
    agent: ureq::Agent,
}

/// What one attempt ended with, before deciding whether to retry.
enum AttemptError {
    /// Worth another attempt: connection refused or reset, timeout, 429 / 502 / 503 / 504.
    Transient { error: RewardError, retry_after: Option<Duration> },
    /// Final.
    Fatal(RewardError),
}

impl RemoteReward {
    /// A client for the server at `config.url`. Nothing is contacted until the first
    /// [`score`](Reward::score) or [`health`](RemoteReward::health).
    pub fn new(config: RemoteRewardConfig) -> Result<Self, RewardError> {
        config
            .validate()
            .map_err(|message| RewardError::RemoteConfig { reward: config.name.clone(), message })?;
        let timeout = Duration::from_secs_f64(config.timeout_secs);
        let agent = ureq::AgentBuilder::new().timeout(timeout).timeout_connect(timeout).build();
        Ok(Self { config, agent })
    }

    pub fn config(&self) -> &RemoteRewardConfig {
        &self.config
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}/{path}", self.config.url.trim_end_matches('/'))
    }

    /// `GET /health`: the server's status, checked to be `"ok"` and to list this reward.
    /// Call it at start-up to fail before the first training step rather than during it.
    pub fn health(&self) -> Result<Health, RewardError> {
        let url = self.endpoint("health");
        let body = self.with_retries(&url, || self.attempt(&url, None))?;
        let health: Health = serde_json::from_str(&body).map_err(|e| self.malformed(&url, format!("{e}"), &body))?;
        if health.status != "ok" {
            return Err(self.malformed(&url, format!("status is {:?}, not \"ok\"", health.status), &body));
        }
        if !health.rewards.is_empty() && !health.rewards.iter().any(|r| r == &self.config.name) {
            return Err(RewardError::RemoteStatus {
                reward: self.config.name.clone(),
                url,
                status: 404,
                message: format!("the server scores {:?}, not `{}`", health.rewards, self.config.name),
            });
        }
        Ok(health)
    }

    /// The JSON body for one chunk of the batch; `offset` is the chunk's position in the batch
    /// (for error messages).
    fn request_body(&self, chunk: &[RewardInput], offset: usize) -> Result<String, RewardError> {
        let images = chunk
            .iter()
            .enumerate()
            .map(|(i, input)| {
                encode_png(&input.image).map_err(|message| RewardError::Encode {
                    reward: self.config.name.clone(),
                    index: offset + i,
                    message,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = chunk
            .iter()
            .map(|input| {
                let mut m = serde_json::Map::new();
                if let Some(task) = input.task {
                    m.insert("task".into(), serde_json::Value::String(task.name().into()));
                }
                m
            })
            .collect();
        let request = ScoreRequest {
            reward: self.config.name.clone(),
            images,
            prompts: chunk.iter().map(|input| input.prompt.clone()).collect(),
            metadata,
        };
        Ok(serde_json::to_string(&request).expect("a score request serialises"))
    }

    /// Scores one chunk (at most `max_batch_size` inputs).
    fn score_chunk(&self, chunk: &[RewardInput], offset: usize) -> Result<Vec<RewardScore>, RewardError> {
        let url = self.endpoint("score");
        let body = self.request_body(chunk, offset)?;
        let reply = self.with_retries(&url, || self.attempt(&url, Some(&body)))?;
        let parsed: ScoreResponse =
            serde_json::from_str(&reply).map_err(|e| self.malformed(&url, not_json(&e, &reply), &reply))?;
        if parsed.scores.len() != chunk.len() {
            return Err(RewardError::RemoteCount {
                reward: self.config.name.clone(),
                url,
                expected: chunk.len(),
                found: parsed.scores.len(),
            });
        }
        parsed
            .scores
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let metric = s.metric.unwrap_or(s.value);
                if s.value.is_finite() && metric.is_finite() {
                    Ok(RewardScore { value: s.value, metric })
                } else {
                    Err(self.malformed(&url, format!("score {} is not finite ({}, {metric})", offset + i, s.value), &reply))
                }
            })
            .collect()
    }

    /// Runs `attempt` up to `1 + retries` times, sleeping between transient failures.
    fn with_retries(&self, url: &str, attempt: impl Fn() -> Result<String, AttemptError>) -> Result<String, RewardError> {
        let attempts = self.config.retries + 1;
        for n in 0..attempts {
            match attempt() {
                Ok(body) => return Ok(body),
                Err(AttemptError::Fatal(error)) => return Err(error),
                Err(AttemptError::Transient { error, retry_after }) => {
                    if n + 1 == attempts {
                        return Err(with_attempts(error, attempts));
                    }
                    let backoff = self.config.backoff_ms.saturating_mul(1u64 << n.min(20));
                    let wait = retry_after.unwrap_or(Duration::from_millis(backoff));
                    let wait = wait.min(Duration::from_millis(self.config.max_backoff_ms));
                    tracing::warn!(reward = %self.config.name, %url, attempt = n + 1, "{error}; retrying in {wait:?}");
                    std::thread::sleep(wait);
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// One HTTP exchange: `POST` the body if there is one, else `GET`. Returns the 200 body.
    fn attempt(&self, url: &str, body: Option<&str>) -> Result<String, AttemptError> {
        let request = match body {
            Some(_) => self.agent.post(url).set("Content-Type", "application/json"),
            None => self.agent.get(url),
        };
        let result = match body {
            Some(body) => request.send_string(body),
            None => request.call(),
        };
        match result {
            Ok(response) => response.into_string().map_err(|e| self.io_error(url, e)),
            Err(ureq::Error::Status(status, response)) => {
                let retry_after =
                    response.header("Retry-After").and_then(|v| v.trim().parse::<f64>().ok()).map(Duration::from_secs_f64);
                let text = response.into_string().unwrap_or_default();
                let error = RewardError::RemoteStatus {
                    reward: self.config.name.clone(),
                    url: url.to_string(),
                    status,
                    message: server_message(&text),
                };
                if matches!(status, 429 | 502 | 503 | 504) {
                    Err(AttemptError::Transient { error, retry_after })
                } else {
                    Err(AttemptError::Fatal(error))
                }
            }
            Err(ureq::Error::Transport(transport)) => Err(self.transport_error(url, transport)),
        }
    }

    fn transport_error(&self, url: &str, transport: ureq::Transport) -> AttemptError {
        use ureq::ErrorKind;
        let reward = self.config.name.clone();
        if is_timeout(&transport) {
            return AttemptError::Transient {
                error: RewardError::RemoteTimeout { reward, url: url.into(), timeout_secs: self.config.timeout_secs },
                retry_after: None,
            };
        }
        let message = transport.to_string();
        match transport.kind() {
            ErrorKind::ConnectionFailed | ErrorKind::Dns | ErrorKind::Io => AttemptError::Transient {
                error: RewardError::RemoteUnreachable { reward, url: url.into(), message, attempts: 1 },
                retry_after: None,
            },
            _ => AttemptError::Fatal(RewardError::RemoteUnreachable { reward, url: url.into(), message, attempts: 1 }),
        }
    }

    fn io_error(&self, url: &str, error: std::io::Error) -> AttemptError {
        let reward = self.config.name.clone();
        let error = if matches!(error.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
            RewardError::RemoteTimeout { reward, url: url.into(), timeout_secs: self.config.timeout_secs }
        } else {
            RewardError::RemoteUnreachable {
                reward,
                url: url.into(),
                message: format!("the connection broke while reading the reply: {error}"),
                attempts: 1,
            }
        };
        AttemptError::Transient { error, retry_after: None }
    }

    fn malformed(&self, url: &str, problem: String, body: &str) -> RewardError {
        RewardError::RemoteMalformed {
            reward: self.config.name.clone(),
            url: url.to_string(),
            problem,
            body: truncate(body),
        }
    }
}

/// What is wrong with a reply that is not JSON; a score written as `NaN` or `Infinity` (what
/// Python's `json.dumps` writes for non-finite floats) is named as such.
fn not_json(error: &serde_json::Error, body: &str) -> String {
    match ["NaN", "Infinity"].into_iter().find(|word| body.contains(word)) {
        Some(word) => format!("a score is {word}, which is neither finite nor JSON ({error})"),
        None => error.to_string(),
    }
}

impl Reward for RemoteReward {
    fn name(&self) -> &str {
        &self.config.name
    }

    /// Scores the batch in chunks of at most `max_batch_size`, in order.
    fn score(&self, batch: &[RewardInput]) -> Result<Vec<RewardScore>, RewardError> {
        let mut scores = Vec::with_capacity(batch.len());
        for (i, chunk) in batch.chunks(self.config.max_batch_size).enumerate() {
            scores.extend(self.score_chunk(chunk, i * self.config.max_batch_size)?);
        }
        Ok(scores)
    }
}

/// The image as a base64 PNG (standard alphabet, padded).
pub fn encode_png(image: &image::RgbImage) -> Result<String, String> {
    let mut png = Vec::new();
    image.write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png).map_err(|e| e.to_string())?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// Whether a transport error is a timeout (ureq reports them as I/O errors of kind
/// `TimedOut`, or `WouldBlock` on some platforms).
fn is_timeout(transport: &ureq::Transport) -> bool {
    let mut source = std::error::Error::source(transport);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
        {
            return true;
        }
        source = error.source();
    }
    transport.to_string().contains("timed out")
}

/// The `"error"` field of a JSON error body, or the body itself (truncated).
fn server_message(body: &str) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| {
        let error = v.get("error")?.as_str()?.to_string();
        Some(match v.get("index").and_then(|i| i.as_u64()) {
            Some(index) => format!("{error} (input {index} of the request)"),
            None => error,
        })
    });
    match from_json {
        Some(message) => message,
        None if body.trim().is_empty() => "(empty body)".into(),
        None => truncate(body),
    }
}

fn truncate(body: &str) -> String {
    if body.len() <= MAX_QUOTED_BODY {
        return body.to_string();
    }
    let mut end = MAX_QUOTED_BODY;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &body[..end], body.len())
}

/// The final error of a transient failure, with the number of attempts made.
fn with_attempts(error: RewardError, attempts: u32) -> RewardError {
    match error {
        RewardError::RemoteUnreachable { reward, url, message, .. } => {
            RewardError::RemoteUnreachable { reward, url, message, attempts }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_quoted_by_their_message() {
        assert_eq!(server_message(r#"{"error": "no quoted text in prompt", "index": 2}"#), "no quoted text in prompt (input 2 of the request)");
        assert_eq!(server_message("Bad Gateway"), "Bad Gateway");
        assert_eq!(server_message(""), "(empty body)");
        let long = "x".repeat(5000);
        assert!(server_message(&long).ends_with("... (5000 bytes)"));
    }

    #[test]
    fn configs_are_checked() {
        let err = RemoteReward::new(RemoteRewardConfig::new("localhost:8000", "ocr")).unwrap_err().to_string();
        assert!(err.contains("reward `ocr`") && err.contains("http://"), "{err}");
        let mut config = RemoteRewardConfig::new("http://127.0.0.1:1", "ocr");
        config.max_batch_size = 0;
        assert!(RemoteReward::new(config).unwrap_err().to_string().contains("max_batch_size"));
        let parsed: RemoteRewardConfig = toml::from_str("url = \"http://h:1\"\nname = \"pickscore\"\nretries = 1").unwrap();
        assert_eq!((parsed.retries, parsed.max_batch_size, parsed.timeout_secs), (1, 32, 120.0));
        assert!(toml::from_str::<RemoteRewardConfig>("url = \"http://h:1\"\nname = \"x\"\nretry = 1").is_err());
    }
}
