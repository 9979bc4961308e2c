//! A fake reward server on loopback (std `TcpListener`, one thread per connection) that
//! speaks `docs/reward_protocol.md`, for the remote-reward client and trainer tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;

/// A request as the fake server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub body: serde_json::Value,
}

/// What the fake server answers: status, extra headers, body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self { status, headers: vec![], body: body.to_string() }
    }
}

pub struct FakeServer {
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeServer {
    /// Serves `handler(request number, request)` on a free loopback port.
    pub fn start(handler: impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(handler);
        let count = Arc::new(AtomicUsize::new(0));
        let server_seen = seen.clone();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let server_down = down.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if server_down.load(Ordering::SeqCst) {
                    // A server that has stopped: the connection closes without a reply.
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let (handler, seen, count) = (handler.clone(), server_seen.clone(), count.clone());
                std::thread::spawn(move || serve(stream, &*handler, &seen, &count));
            }
        });
        Self { url, seen, down }
    }

    /// Stops answering (every connection is closed at once) or starts again.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, handler: &dyn Fn(usize, &Seen) -> Reply, seen: &Mutex<Vec<Seen>>, count: &AtomicUsize) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).unwrap();
    let body = if body.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&body).unwrap() };
    let request = Seen { method, path, body };
    let n = count.fetch_add(1, Ordering::SeqCst);
    seen.lock().unwrap().push(request.clone());
    let reply = handler(n, &request);
    let mut head = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut stream = stream;
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(reply.body.as_bytes());
}

/// The fake reward: mean of all pixel values / 255 (value) and the image width (metric), read
/// from the decoded PNGs.
pub fn mean_pixel_scores(request: &Seen) -> serde_json::Value {
    let images = request.body["images"].as_array().unwrap();
    let scores: Vec<_> = images
        .iter()
        .map(|b64| {
            let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
            let image = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().to_rgb8();
            let mean = image.as_raw().iter().map(|&v| v as f64).sum::<f64>() / image.as_raw().len() as f64 / 255.0;
            serde_json::json!({"value": mean, "metric": image.width()})
        })
        .collect();
    serde_json::json!({ "scores": scores })
}

