//! The web UI in a real browser: headless Chromium over WebDriver against a real
//! `holdfast dev` process running the echo task on the real Docker engine.
//! Screenshots of each view land in `target/ui-screenshots/` (artifacts, not compared).

mod browser;
mod common;

use std::path::Path;
use std::time::Duration;

use browser::Browser;
use common::{eventually, free_port, http, require_docker, NodeContainers, Proc};

const WAIT: Duration = Duration::from_secs(60);

/// Clicks the drain button of node card `card`, confirms, and waits (`what`) until
/// the card shows draining as `want`.
async fn toggle_drain(b: &Browser, card: &str, what: &str, want: bool) {
    b.click(&format!("{card} button.drain")).await;
    b.click("#confirm-yes").await;
    let js = format!("return document.querySelector({})?.dataset.draining === '{want}';", q(card));
    b.wait_js(WAIT, what, &js).await;
}

/// Opens `url`, waits for `js` to return something (`what`), and takes screenshot `shot`.
async fn visit(b: &Browser, url: &str, what: &str, js: &str, shot: &str) {
    b.client.goto(url).await.unwrap_or_else(|e| panic!("goto {url}: {e}"));
    b.wait_js(WAIT, what, js).await;
    b.screenshot(shot).await;
}

/// A `holdfast dev` on free ports with its own data dir; restartable in place.
struct Dev {
    api: String,
    cluster: String,
    node: String,
    data: std::path::PathBuf,
    log: std::path::PathBuf,
    proc: Option<Proc>,
}

impl Dev {
    async fn start(dir: &Path, node: &str) -> Dev {
        let mut d = Dev {
            api: format!("127.0.0.1:{}", free_port()),
            cluster: format!("127.0.0.1:{}", free_port()),
            node: node.to_string(),
            data: dir.join("data"),
            log: dir.join("dev.log"),
            proc: None,
        };
        d.up().await;
        d
    }

    async fn up(&mut self) {
        let data = self.data.to_string_lossy().to_string();
        let args =
            ["dev", "--api", &self.api, "--cluster", &self.cluster, "--node-id", &self.node, "--data-dir", &data];
        self.proc = Some(Proc::spawn(&args, &self.log, &[]));
        let url = self.url("/v1/nodes");
        let node = self.node.clone();
        eventually(WAIT, "the dev node to register as ready", || {
            // Read each time: a first start writes the token file a moment after it begins.
            let (url, token, node) = (url.clone(), self.token(), node.clone());
            async move {
                let v: serde_json::Value = http().get(&url).bearer_auth(&token).send().await.ok()?.json().await.ok()?;
                v["nodes"].as_array()?.iter().any(|n| n["id"] == node.as_str() && n["status"] == "ready").then_some(())
            }
        })
        .await;
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            assert!(p.terminate(Duration::from_secs(20)).is_some(), "dev did not stop on SIGTERM:\n{}", p.log_text());
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    /// The admin token `dev` writes once API tokens exist; any string before that (the
    /// API then ignores it).
    fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_else(|_| "ui-test-token".into())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn q(s: &str) -> String {
    serde_json::to_string(s).expect("json string")
}

/// The page has not reloaded since `mark_page` (a reload would drop the marker).
async fn same_page(b: &Browser) -> bool {
    b.js("return window.__uiTestMark === 1;").await == serde_json::json!(true)
}

async fn mark_page(b: &Browser) {
    b.js("window.__uiTestMark = 1; return null;").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_runs_the_echo_task_from_submit_to_stop_and_survives_a_manager_restart() {
    require_docker();
    let dir = tempfile::tempdir().expect("tempdir");
    let node = format!("ui-{}", std::process::id());
    let _cleanup = NodeContainers(node.clone());
    let mut dev = Dev::start(dir.path(), &node).await;
    let token = dev.token();

    // Served by the manager: versioned, cached, compressed, locked down.
    let page = http().get(dev.url("/")).send().await.expect("GET /");
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h["cache-control"], "no-cache");
    let csp = h["content-security-policy"].to_str().expect("csp");
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'") && !csp.contains("unsafe"));
    assert_eq!(h["x-content-type-options"], "nosniff");
    let html = page.text().await.expect("page");
    let script = html.split("src=\"").nth(1).and_then(|s| s.split('"').next()).expect("script src").to_string();
    assert!(script.starts_with("/ui/") && script.ends_with("/app.js"), "{script}");
    let js = http().get(dev.url(&script)).header("accept-encoding", "gzip").send().await.expect("GET app.js");
    assert_eq!(js.headers()["cache-control"], "public, max-age=31536000, immutable");
    assert_eq!(js.headers()["content-encoding"], "gzip");
    assert!(js.headers()["content-type"].to_str().expect("ct").starts_with("text/javascript"));

    let b = browser::open(1280, 1000).await;

    // Log in from the fragment URL: the token is kept for the tab and leaves the URL.
    b.load(&dev.url(&format!("/#token={token}"))).await;
    b.wait_js(WAIT, "the health verdict", "return document.querySelector('#health-status')?.textContent;").await;
    let url = b.client.current_url().await.expect("url");
    assert!(!url.as_str().contains("token"), "the token stayed in the URL: {url}");
    let kept = b.js("return sessionStorage.getItem('holdfast.token');").await;
    assert_eq!(kept, serde_json::json!(token));
    b.wait_js(
        WAIT,
        "the data plane to list the node",
        "return document.querySelector('#main').textContent.includes('Live placements');",
    )
    .await;
    b.screenshot("overview").await;
    mark_page(&b).await;

    // Drain the node and see it change, then end the drain so the task can be placed.
    b.client.goto(&dev.url("/#/nodes")).await.expect("goto nodes");
    let card = format!("#node-{node}");
    b.wait_js(WAIT, "the node card", &format!("return !!document.querySelector({});", q(&card))).await;
    mark_page(&b).await;
    b.screenshot("nodes").await;
    toggle_drain(&b, &card, "the node to show as draining", true).await;
    let nodes: serde_json::Value =
        http().get(dev.url("/v1/nodes")).bearer_auth(&token).send().await.expect("nodes").json().await.expect("json");
    assert_eq!(nodes["nodes"][0]["draining"], true, "the API agrees: {nodes}");
    b.screenshot("nodes-draining").await;
    toggle_drain(&b, &card, "the drain to end", false).await;
    assert!(same_page(&b).await, "the page reloaded");

    // An invalid spec shows the API's error at the named field.
    b.client.goto(&dev.url("/#/tasks/new")).await.expect("goto new");
    b.wait_js(WAIT, "the spec editor", "return document.querySelector('#spec')?.value.includes('holdfast/echo');")
        .await;
    b.js(r#"const a = document.querySelector('#spec'); const s = JSON.parse(a.value); s.resources.memory_mb = 0; a.value = JSON.stringify(s, null, 2); return null;"#).await;
    b.click("#submit-task").await;
    let field = b
        .wait_js(
            WAIT,
            "the field error",
            "const e = document.querySelector('#spec-error'); return e && !e.hidden && e.dataset.field;",
        )
        .await;
    assert_eq!(field, serde_json::json!("resources.memory_mb"));
    let msg = b.text("#spec-error").await;
    assert!(msg.contains("resources.memory_mb") && msg.contains("out of range"), "{msg}");
    let selected = b
        .js("const a = document.querySelector('#spec'); return a.value.slice(a.selectionStart, a.selectionEnd);")
        .await;
    assert_eq!(selected, serde_json::json!("\"memory_mb\""), "the editor selects the field");
    b.screenshot("submit-invalid").await;

    // Submit the echo task from the form; it reaches `running` without a reload.
    mark_page(&b).await;
    b.click("form.submit button[type=button]").await; // reset to the echo task
    b.click("#submit-task").await;
    let id = b
        .wait_js(
            WAIT,
            "the task page",
            "const m = location.hash.match(/^#\\/tasks\\/(t[0-9a-f]+)$/); return m && m[1];",
        )
        .await
        .as_str()
        .expect("task id")
        .to_string();
    b.wait_js(WAIT, "the task to run", "return document.querySelector('.task-state')?.textContent === 'running';")
        .await;
    assert!(same_page(&b).await, "the page reloaded");
    let endpoint = b
        .wait_js(WAIT, "an endpoint link", "return document.querySelector('#task-endpoints a')?.href;")
        .await
        .as_str()
        .expect("href")
        .to_string();
    b.wait_js(WAIT, "the history", "return document.querySelectorAll('#history li').length >= 2;").await;
    b.wait_js(WAIT, "the logs", "return document.querySelector('#logs')?.textContent.includes('listening');").await;
    b.screenshot("task-running").await;

    // Open its endpoint: the echo task answers what it is sent.
    let body = eventually(WAIT, "the endpoint to answer", || {
        let endpoint = endpoint.clone();
        async move {
            let r = http().post(&endpoint).body("hello from the ui test").send().await.ok()?;
            r.status().is_success().then_some(())?;
            r.text().await.ok()
        }
    })
    .await;
    assert!(body.contains("hello from the ui test"), "{body}");

    // The list, the events and the audit show it too.
    let row = format!("return document.querySelector('tr[data-id={}]')?.dataset.state;", q(&id));
    visit(&b, &dev.url("/#/tasks"), "the task row", &row, "tasks").await;
    b.client.goto(&dev.url("/#/events")).await.expect("goto events");
    b.screenshot("events").await;
    let audit = format!("return document.querySelector('#audit')?.textContent.includes({});", q(&id));
    visit(&b, &dev.url("/#/audit"), "the audit rows", &audit, "audit").await;
    let managers = format!("return document.querySelector('#main')?.textContent.includes({});", q(&node));
    visit(&b, &dev.url("/#/admin"), "the managers table", &managers, "admin").await;

    // Stop it from its page.
    b.client.goto(&dev.url(&format!("/#/tasks/{id}"))).await.expect("goto task");
    b.click("#stop-task").await;
    b.click("#confirm-yes").await;
    b.wait_js(WAIT, "the task to stop", "return document.querySelector('.task-state')?.textContent === 'stopped';")
        .await;
    b.wait_js(WAIT, "the stop in the history", "return document.querySelector('#history li[data-what=\"stopped\"]');")
        .await;
    b.screenshot("task-stopped").await;
    assert!(same_page(&b).await, "the page reloaded");

    // Readable at 360 px: nothing wider than the screen.
    b.client.set_window_size(360, 780).await.expect("resize");
    for (view, name) in [("/#/", "overview-360"), ("/#/tasks", "tasks-360"), ("/#/nodes", "nodes-360")] {
        b.client.goto(&dev.url(view)).await.expect("goto");
        b.wait_js(WAIT, "the view", "return document.querySelector('#main h1');").await;
        let wide = b.js("return document.documentElement.scrollWidth;").await.as_u64().expect("width");
        b.screenshot(name).await;
        assert!(wide <= 360, "{view} is {wide} px wide at 360 px");
    }
    b.client.set_window_size(1280, 1000).await.expect("resize");

    // The manager goes away: the banner says so; it returns: the banner goes and the
    // page catches up with what happened meanwhile.
    b.client.goto(&dev.url("/#/tasks")).await.expect("goto tasks");
    b.wait_js(WAIT, "the task list", "return document.querySelectorAll('#task-rows tr[data-id]').length >= 1;").await;
    mark_page(&b).await;
    dev.stop();
    b.wait_js(
        WAIT,
        "the outage banner",
        "const e = document.querySelector('#banner'); return !e.hidden && e.textContent.includes('Lost contact');",
    )
    .await;
    b.screenshot("banner").await;
    dev.up().await;
    b.wait_js(WAIT, "the banner to go", "return document.querySelector('#banner').hidden;").await;
    let spec = serde_json::json!({"name": "after-restart", "image": "holdfast/echo:latest",
        "constraints": {"labels": {"ui-test": "nowhere"}}});
    let r = http().post(dev.url("/v1/tasks")).bearer_auth(&token).json(&spec).send().await.expect("submit");
    assert_eq!(r.status(), 201, "{}", dev.log_text());
    let new_id = r.json::<serde_json::Value>().await.expect("json")["id"].as_str().expect("id").to_string();
    b.wait_js(
        WAIT,
        "the new task to appear live",
        &format!("return !!document.querySelector('tr[data-id={}]');", q(&new_id)),
    )
    .await;
    assert!(same_page(&b).await, "the page reloaded");
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_shows_the_login_message_not_a_blank_page() {
    require_docker();
    let dir = tempfile::tempdir().expect("tempdir");
    let node = format!("ui-login-{}", std::process::id());
    let _cleanup = NodeContainers(node.clone());
    let dev = Dev::start(dir.path(), &node).await;
    let b = browser::open(1024, 800).await;
    b.load(&dev.url("/#token=not-a-real-token")).await;
    let msg = b
        .wait_js(
            Duration::from_secs(20),
            "the login message",
            "const m = document.querySelector('#login-msg'); return m && m.classList.contains('error') && m.textContent;",
        )
        .await;
    let msg = msg.as_str().unwrap_or_default().to_string();
    assert!(msg.contains("refused") && msg.contains("401"), "{msg}");
    assert!(b.js("return !!document.querySelector('#token');").await == serde_json::json!(true), "no token field");
    b.screenshot("login-refused").await;
    b.close().await;
}
