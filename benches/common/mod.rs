//! Helpers shared by the benchmarks: free ports, child processes that die with the
//! bench, and the echo probe. Each bench includes this with `mod common;`.
#![allow(dead_code)]

use std::process::Child;
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A child process, SIGKILLed and reaped when dropped.
pub struct Killer(pub Child);

impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `d` in milliseconds.
pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Whether the echo server at `endpoint` (`host:port`) answers `ping` with `ping`
/// before `deadline`, asking every 5 ms (a bench measures to the millisecond).
pub async fn echo_answers(http: &reqwest::Client, endpoint: &str, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if let Ok(r) = http.post(format!("http://{endpoint}/")).body("ping").send().await {
            if r.status().is_success() && r.text().await.is_ok_and(|t| t == "ping") {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// The environment variable `name` parsed, or `default` when unset or unparsable
/// (the benches' `BENCH_*` knobs).
pub fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The median of `v` (the mean of the middle two for an even count; NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
