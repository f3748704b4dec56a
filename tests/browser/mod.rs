//! Headless Chromium over WebDriver for the web UI tests and bench: starts Debian's
//! `chromedriver` on a free port (killed on drop) and opens a fantoccini session on it.
//! Plain HTTP to a loopback driver, so fantoccini needs no TLS stack.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};

/// A running chromedriver and one browser session on it.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    /// This session's own Chromium profile; it names the session's processes.
    profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // A test that panicked never closed its session, and Chromium outlives its
        // driver: end exactly the processes started with this session's profile.
        let marker = self.profile.path().display().to_string();
        for pid in pids_mentioning(&marker) {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
    }
}

/// Processes with an argument that contains `needle` (from /proc).
fn pids_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let needle = needle.as_bytes();
        cmdline.split(|b| *b == 0).any(|a| a.windows(needle.len()).any(|w| w == needle)).then_some(pid)
    })
    .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

fn which(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Starts chromedriver and a headless Chromium of `width`×`height`. Panics with how to
/// install them when they are missing: these tests never pass by skipping.
pub async fn open(width: u32, height: u32) -> Browser {
    let driver_bin = which(&["chromedriver"]).expect(
        "the web UI tests need chromedriver and chromium: apt-get install -y chromium chromium-driver (.ci/run does)",
    );
    let port = free_port();
    let driver = Command::new(driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chromedriver");
    let profile = tempfile::tempdir().expect("profile dir");
    let mut chrome = serde_json::json!({
        "args": [
            format!("--user-data-dir={}", profile.path().display()),
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-extensions", "--no-first-run", "--disable-background-networking",
            format!("--window-size={width},{height}"),
        ],
    });
    if let Some(bin) = which(&["chromium", "chromium-browser", "google-chrome"]) {
        chrome["binary"] = serde_json::json!(bin);
    }
    let mut caps = Capabilities::new();
    caps.insert("goog:chromeOptions".into(), chrome);
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url).await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no WebDriver session on {url}: {e}"),
        }
    };
    Browser { client, driver, profile }
}

impl Browser {
    /// Runs `js` (a function body; `arguments` are none) and returns its value.
    pub async fn js(&self, js: &str) -> serde_json::Value {
        self.client.execute(js, vec![]).await.unwrap_or_else(|e| panic!("script failed: {e}\n{js}"))
    }

    /// Polls `js` until it returns a truthy value, or panics naming `what` and the page text.
    pub async fn wait_js(&self, within: Duration, what: &str, js: &str) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.client.execute(js, vec![]).await.unwrap_or(serde_json::Value::Null);
            let truthy = match &v {
                serde_json::Value::Null => false,
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::String(s) => !s.is_empty(),
                serde_json::Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let text = self.text("body").await;
                panic!("timed out after {within:?} waiting for {what}; the page says:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Loads `url` as a new document and waits for the UI's `<main>`. Chromium aborts a
    /// load with ERR_NETWORK_CHANGED when Docker adds or removes an interface (other
    /// tests start containers all the time), so such a load is tried again.
    pub async fn load(&self, url: &str) {
        let mut last = String::new();
        for attempt in 0..10u64 {
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            self.client.goto("about:blank").await.expect("about:blank");
            self.client.goto(url).await.unwrap_or_else(|e| panic!("goto {url}: {e}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let state = self
                    .client
                    .execute(
                        "if (document.getElementById('main')) return 'ok';
                         if (location.href.startsWith('chrome-error:') || document.body?.textContent.includes('ERR_')) return 'error';
                         return '';",
                        vec![],
                    )
                    .await
                    .unwrap_or(serde_json::Value::Null);
                match state.as_str() {
                    Some("ok") => return,
                    Some("error") => break,
                    _ if Instant::now() > deadline => break,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            last = self.text("body").await;
        }
        panic!("could not load {url}; the page says:\n{last}");
    }

    /// Text of the first element matching `css` (empty when there is none).
    pub async fn text(&self, css: &str) -> String {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// Clicks the first element matching `css`, waiting up to 10 s for it to appear.
    pub async fn click(&self, css: &str) {
        let sel = serde_json::to_string(css).expect("selector");
        self.wait_js(Duration::from_secs(10), css, &format!("return !!document.querySelector({sel});")).await;
        // Live views redraw as events arrive; an element found a moment ago may have been
        // replaced by its redrawn twin, so find it again (a few times) before clicking.
        let mut last = String::new();
        for _ in 0..5 {
            let el = self.client.find(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}"));
            match el.click().await {
                Ok(()) => return,
                Err(e) => last = e.to_string(),
            }
            if !last.contains("stale") {
                break;
            }
        }
        panic!("click {css}: {last}");
    }

    /// Saves a PNG of the viewport under `target/ui-screenshots/`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let png = self.client.screenshot().await.expect("screenshot");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// Ends the session (the driver dies on drop).
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}
