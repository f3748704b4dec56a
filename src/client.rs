//! The CLI's HTTP client for `holdfast task|node|cluster`: prints the API's JSON.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::TaskCommand;

async fn call(req: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let resp = req.timeout(Duration::from_secs(30)).send().await.context("cannot reach the holdfast API")?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let pretty = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if status.is_success() {
        println!("{pretty}");
        Ok(())
    } else {
        bail!("{status}: {pretty}")
    }
}

/// Runs a `holdfast task ...` command against `api`.
pub async fn task(api: &str, cmd: TaskCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let api = api.trim_end_matches('/');
    match cmd {
        TaskCommand::Submit { file, idempotency_key } => {
            let body = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let mut req = http.post(format!("{api}/v1/tasks")).header("content-type", "application/json").body(body);
            if let Some(k) = idempotency_key {
                req = req.header("Idempotency-Key", k);
            }
            call(req).await
        }
        TaskCommand::List => call(http.get(format!("{api}/v1/tasks"))).await,
        TaskCommand::Get { id } => call(http.get(format!("{api}/v1/tasks/{id}"))).await,
        TaskCommand::Stop { id } => call(http.delete(format!("{api}/v1/tasks/{id}"))).await,
        TaskCommand::Logs { id } => call(http.get(format!("{api}/v1/tasks/{id}/logs"))).await,
    }
}

/// GETs one API path and prints it.
pub async fn get(api: &str, path: &str) -> anyhow::Result<()> {
    call(reqwest::Client::new().get(format!("{}{path}", api.trim_end_matches('/')))).await
}

/// `holdfast token join`: prints the role's join token from `data_dir`, or with
/// `rotate` makes a new one through the API (and updates the file when it exists).
pub async fn join_token(cmd: crate::cli::TokenCommand) -> anyhow::Result<()> {
    let crate::cli::TokenCommand::Join { role, rotate, ttl, uses, data_dir, api_url } = cmd;
    let path = data_dir.join(format!("join-{role}.token"));
    if !rotate {
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (run this on the first manager, or pass --data-dir; --rotate makes a new token)",
                path.display()
            )
        })?;
        println!("{}", text.trim());
        return Ok(());
    }
    let body = serde_json::json!({
        "role": role, "ttl_ms": ttl.map(|t| t.as_millis() as u64), "uses": uses,
    });
    let url = format!("{}/v1/cluster/join-tokens", api_url.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .post(url)
        .json(&body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .context("cannot reach the holdfast API")?;
    let status = resp.status();
    let v: serde_json::Value = resp.json().await.context("unreadable API answer")?;
    if !status.is_success() {
        bail!("{status}: {v}");
    }
    let token = v["token"].as_str().context("no token in the answer")?.to_string();
    if path.exists() {
        crate::net::identity::write_private(&path, &format!("{token}\n"))?;
        eprintln!("wrote {}", path.display());
    }
    println!("{token}");
    Ok(())
}
