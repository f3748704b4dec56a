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
