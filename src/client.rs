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

/// `holdfast cluster snapshot save FILE`: streams `GET /v1/cluster/snapshot` into
/// `FILE.part`, checks its length and checksum, then renames it to `file`.
pub async fn snapshot_save(api: &str, file: &std::path::Path) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let url = format!("{}/v1/cluster/snapshot", api.trim_end_matches('/'));
    // No overall timeout: a large state takes as long as it takes; a stalled stream
    // is cut by the read timeout instead.
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()?;
    let mut resp = http.get(&url).send().await.context("cannot reach the holdfast API")?;
    if !resp.status().is_success() {
        let status = resp.status();
        bail!("{status}: {}", resp.text().await.unwrap_or_default());
    }
    let part = file.with_extension("part");
    let mut out = tokio::fs::File::create(&part).await.with_context(|| format!("creating {}", part.display()))?;
    while let Some(chunk) = resp.chunk().await.context("snapshot download interrupted")? {
        out.write_all(&chunk).await?;
    }
    out.sync_all().await?;
    drop(out);
    let checked = part.clone();
    let header = tokio::task::spawn_blocking(move || {
        crate::backup::read_verified(std::fs::File::open(&checked)?, std::io::sink())
    })
    .await?;
    let header = match header {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            bail!("the downloaded snapshot is unusable: {e}");
        }
    };
    std::fs::rename(&part, file).with_context(|| format!("renaming into {}", file.display()))?;
    println!(
        "saved {}: state applied up to index {} by {}, {} bytes of database, sha256 {}",
        file.display(),
        header.last_applied,
        header.taken_by,
        header.db_bytes,
        header.db_sha256
    );
    Ok(())
}

/// `holdfast cluster snapshot restore FILE --data-dir DIR --node-id ID`: checks the
/// whole file first, then builds `DIR/manager` from it; nothing is written when any
/// check fails.
pub fn snapshot_restore(file: &std::path::Path, data_dir: &std::path::Path, node_id: &str) -> anyhow::Result<()> {
    let input = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let scratch = std::env::temp_dir().join(format!("holdfast-restore-{}.db", std::process::id()));
    let out = std::fs::File::create(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let header = crate::backup::read_verified(input, std::io::BufWriter::new(out));
    let restored = header.map_err(anyhow::Error::from).and_then(|h| {
        let cfg = holdfast_raft::Config::new(node_id, data_dir.join("manager"), "", "");
        holdfast_raft::restore_snapshot(&scratch, &cfg).map(|r| (h, r)).map_err(anyhow::Error::from)
    });
    let _ = std::fs::remove_file(&scratch);
    let (header, restored) = restored.with_context(|| format!("cannot restore {}", file.display()))?;
    println!(
        "restored {} (taken by {} at index {}, from members {:?}) into {}.\n\
         Start it with: holdfast agent --manager --node-id {node_id} --data-dir {} --api ... --cluster ...\n\
         It comes up as the only member of a new cluster; join further managers to it as usual.",
        file.display(),
        header.taken_by,
        restored.last_applied,
        restored.old_members,
        data_dir.join("manager").display(),
        data_dir.display()
    );
    Ok(())
}
