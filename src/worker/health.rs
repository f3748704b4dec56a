//! Task health probes: one tokio task per running placement that has a `health` spec,
//! probing every `interval_ms` with `timeout_ms`, returning a verdict after `failures`
//! consecutive failures. The agent starts and cancels the probers; `reconcile` only sees
//! their verdicts, so it stays pure.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::runtime::ContainerInfo;
use crate::model::spec::HealthSpec;

/// Where a probe goes: the container's IP on its network and the container port, or,
/// when the container has no IP (host networking, an engine that does not say), the
/// published host port on loopback.
pub fn target(spec: &HealthSpec, container: &ContainerInfo) -> Result<String, String> {
    let port = probe_port(spec);
    if let Some(ip) = container.ip.as_deref().filter(|ip| !ip.is_empty()) {
        // An IPv6 address needs brackets before the port.
        return Ok(if ip.contains(':') { format!("[{ip}]:{port}") } else { format!("{ip}:{port}") });
    }
    match container.ports.iter().find(|(c, h)| *c == port && *h != 0) {
        Some((_, host)) => Ok(format!("127.0.0.1:{host}")),
        None => Err(format!("container has no IP and port {port} is not published, so it cannot be probed")),
    }
}

fn probe_port(spec: &HealthSpec) -> u16 {
    match (&spec.http, &spec.tcp) {
        (Some(h), _) => h.port,
        (None, Some(t)) => t.port,
        // Validation forbids this; port 0 then fails every probe with a clear message.
        (None, None) => 0,
    }
}

/// One probe of `addr`; `Err` says what failed in the words of the final reason, e.g.
/// `GET /health on 172.17.0.5:7777: 500`.
pub async fn probe(client: &reqwest::Client, spec: &HealthSpec, addr: &str) -> Result<(), String> {
    let limit = Duration::from_millis(spec.timeout_ms);
    if let Some(http) = &spec.http {
        let what = format!("GET {} on {addr}", http.path);
        let url = format!("http://{addr}{}", http.path);
        return match client.get(&url).timeout(limit).send().await {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(format!("{what}: {}", resp.status().as_u16())),
            Err(e) if e.is_timeout() => Err(format!("{what}: no answer within {} ms", spec.timeout_ms)),
            Err(e) if e.is_connect() => Err(format!("{what}: cannot connect")),
            Err(e) => Err(format!("{what}: {e}")),
        };
    }
    let what = format!("TCP connect to {addr}");
    match tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {} ms", spec.timeout_ms)),
    }
}

/// Counts consecutive failures; pure, so the threshold rule is a table test.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tracker {
    /// Failures in a row so far.
    pub consecutive: u32,
}

impl Tracker {
    /// Takes one probe result; returns the verdict reason once `failures` in a row fail.
    pub fn observe(&mut self, result: Result<(), String>, failures: u32) -> Option<String> {
        match result {
            Ok(()) => {
                self.consecutive = 0;
                None
            }
            Err(last) => {
                self.consecutive += 1;
                (self.consecutive >= failures.max(1))
                    .then(|| format!("health check failed {} times: {last}", self.consecutive))
            }
        }
    }
}

/// Probes until the container is judged unhealthy and returns the reason. Runs until
/// then, so the caller cancels it (aborts the task) when the placement stops running.
/// `limit` bounds how many probes are in flight across the worker at once.
pub async fn watch(client: reqwest::Client, spec: HealthSpec, addr: String, limit: Arc<Semaphore>) -> String {
    let mut tracker = Tracker::default();
    let interval = Duration::from_millis(spec.interval_ms);
    loop {
        // The first probe waits one interval too: a process needs a moment to listen.
        tokio::time::sleep(interval).await;
        let result = match limit.clone().acquire_owned().await {
            Ok(_permit) => probe(&client, &spec, &addr).await,
            // The semaphore is never closed; if it were, probing is over.
            Err(_) => return "health probing stopped".into(),
        };
        if let Some(reason) = tracker.observe(result, spec.failures) {
            return reason;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::spec::{HttpProbe, TcpProbe};
    use crate::worker::runtime::ContainerState;

    fn spec(http: bool) -> HealthSpec {
        HealthSpec {
            http: http.then(|| HttpProbe { path: "/health".into(), port: 7777 }),
            tcp: (!http).then_some(TcpProbe { port: 7777 }),
            interval_ms: 100,
            timeout_ms: 100,
            failures: 2,
        }
    }

    fn container(ip: Option<&str>, ports: Vec<(u16, u16)>) -> ContainerInfo {
        ContainerInfo {
            id: "c".into(),
            name: "c".into(),
            labels: BTreeMap::new(),
            state: ContainerState::Running,
            ports,
            error: None,
            ip: ip.map(str::to_string),
        }
    }

    #[test]
    fn target_prefers_the_container_ip_then_the_published_port() {
        let check = |ip: Option<&str>, ports: Vec<(u16, u16)>, want: Result<&str, ()>| {
            let got = target(&spec(true), &container(ip, ports));
            match want {
                Ok(w) => assert_eq!(got.as_deref(), Ok(w)),
                Err(()) => assert!(got.is_err(), "{got:?}"),
            }
        };
        check(Some("172.17.0.5"), vec![(7777, 32768)], Ok("172.17.0.5:7777"));
        check(Some("fd00::5"), vec![], Ok("[fd00::5]:7777"));
        check(None, vec![(80, 8080), (7777, 32768)], Ok("127.0.0.1:32768"));
        check(Some(""), vec![(7777, 32768)], Ok("127.0.0.1:32768"));
        check(None, vec![(80, 8080)], Err(()));
        check(None, vec![(7777, 0)], Err(()));
    }

    #[test]
    fn tracker_needs_consecutive_failures() {
        // (results in order, failures threshold, index of the verdict or None)
        let table: [(&[bool], u32, Option<usize>); 5] = [
            (&[true, true, true], 2, None),
            (&[false, false], 2, Some(1)),
            (&[false, true, false, true, false], 2, None),
            (&[false, true, false, false], 2, Some(3)),
            (&[false], 1, Some(0)),
        ];
        for (results, failures, want) in table {
            let mut t = Tracker::default();
            let got = results.iter().position(|ok| {
                t.observe(if *ok { Ok(()) } else { Err("GET /health on a:1: 500".into()) }, failures).is_some()
            });
            assert_eq!(got, want, "{results:?} with failures {failures}");
        }
        let mut t = Tracker::default();
        t.observe(Err("x".into()), 3);
        t.observe(Err("x".into()), 3);
        assert_eq!(
            t.observe(Err("GET /health on a:1: 500".into()), 3).as_deref(),
            Some("health check failed 3 times: GET /health on a:1: 500")
        );
    }

    #[tokio::test]
    async fn probes_report_status_and_refusals() {
        let client = reqwest::Client::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let app = axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .route("/bad", axum::routing::get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "no") }));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        assert_eq!(probe(&client, &spec(true), &addr).await, Ok(()));
        let mut bad = spec(true);
        bad.http = Some(HttpProbe { path: "/bad".into(), port: 1 });
        assert_eq!(probe(&client, &bad, &addr).await, Err(format!("GET /bad on {addr}: 500")));
        assert_eq!(probe(&client, &spec(false), &addr).await, Ok(()));
        server.abort();
        // A port nobody listens on: refused, for both kinds.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let tcp = probe(&client, &spec(false), &closed).await.unwrap_err();
        assert!(tcp.starts_with(&format!("TCP connect to {closed}: ")), "{tcp}");
        let http = probe(&client, &spec(true), &closed).await.unwrap_err();
        assert_eq!(http, format!("GET /health on {closed}: cannot connect"));
    }
}
