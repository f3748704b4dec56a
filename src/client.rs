//! The CLI's HTTP client for `holdfast task|node|cluster|token`: authenticates with a
//! bearer token and prints the API's answer as a table (the default) or its JSON
//! (`-o json`). A refusal leaves as an [`ApiFailure`], whose status picks the exit code
//! ([`ApiFailure::exit_code`], README "CLI").

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::cli::{ApiAuth, NodeCommand, Output, TaskCommand, TokenCommand};

/// The API answered with an error status.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiFailure {
    /// HTTP status.
    pub status: u16,
    /// The error's message (or the body when it is not the error shape).
    pub message: String,
}

impl ApiFailure {
    /// 3 for 404, 4 for 503 (retry later), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self.status {
            404 => crate::cli::EXIT_NOT_FOUND,
            503 => crate::cli::EXIT_RETRYABLE,
            _ => crate::cli::EXIT_ERROR,
        }
    }
}

/// The exit code of a client command's error: an API refusal by its status, an
/// unreachable API as retryable, anything else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if let Some(f) = e.downcast_ref::<ApiFailure>() {
        return f.exit_code();
    }
    if e.chain().any(|c| c.downcast_ref::<reqwest::Error>().is_some_and(|r| r.is_connect() || r.is_timeout())) {
        return crate::cli::EXIT_RETRYABLE;
    }
    crate::cli::EXIT_ERROR
}

mod images;

/// An authenticated API client: base URL, HTTP client and bearer token.
pub struct Api {
    base: String,
    http: reqwest::Client,
    token: String,
    /// The local data dir (`--data-dir`), where join token files live.
    data_dir: std::path::PathBuf,
}

impl Api {
    /// Finds the token (`--token`, `HOLDFAST_API_TOKEN`, `<data-dir>/admin.token`) and,
    /// for an https URL, the CA(s) to trust (see [`ca_file_for`]).
    pub fn new(base: &str, auth: &ApiAuth) -> anyhow::Result<Api> {
        let token = match auth.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => t.to_string(),
            None => {
                let path = auth.data_dir.join(crate::manager::api::auth::ADMIN_TOKEN_FILE);
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no API token: pass --token, set HOLDFAST_API_TOKEN, or point --data-dir at a data \
                         directory holding admin.token (tried {})",
                        path.display()
                    )
                })?;
                text.trim().to_string()
            }
        };
        let mut builder =
            reqwest::Client::builder().timeout(Duration::from_secs(30)).connect_timeout(Duration::from_secs(5));
        if base.starts_with("https://") {
            for cert in trusted_cas(auth)? {
                builder = builder.add_root_certificate(cert);
            }
            builder = builder.tls_built_in_root_certs(false);
        }
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            http: builder.build()?,
            token,
            data_dir: auth.data_dir.clone(),
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    /// Sends `req`; the JSON body of a success (text as a JSON string), or an
    /// [`ApiFailure`].
    async fn fetch(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req.send().await.with_context(|| format!("cannot reach the holdfast API at {}", self.base))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let json = serde_json::from_str::<Value>(&text).ok();
        if status.is_success() {
            return Ok(json.unwrap_or(Value::String(text)));
        }
        let message = json
            .as_ref()
            .and_then(|v| {
                let e = &v["error"];
                let msg = e["message"].as_str()?;
                Some(match e["field"].as_str().filter(|f| !f.is_empty()) {
                    Some(f) => format!("{msg} (field {f})"),
                    None => msg.to_string(),
                })
            })
            .unwrap_or(text);
        Err(ApiFailure { status: status.as_u16(), message }.into())
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> anyhow::Result<()> {
        print_json(&self.fetch(req).await?);
        Ok(())
    }

    /// GETs one API path and prints its JSON.
    pub async fn get(&self, path: &str) -> anyhow::Result<()> {
        self.call(self.req(reqwest::Method::GET, path)).await
    }

    /// Every item of a paged list (`key` of each page), following `next` until the end
    /// or `limit` items.
    async fn all_pages(&self, first: &str, key: &str, limit: Option<usize>) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut path = first.to_string();
        loop {
            let page = self.fetch(self.req(reqwest::Method::GET, &path)).await?;
            items.extend(page[key].as_array().cloned().unwrap_or_default());
            if limit.is_some_and(|l| items.len() >= l) {
                items.truncate(limit.unwrap_or(usize::MAX));
                return Ok(items);
            }
            match page["next"].as_str() {
                Some(n) => {
                    let sep = if first.contains('?') { '&' } else { '?' };
                    path = format!("{first}{sep}after={}", crate::manager::api::encode_query(n));
                }
                None => return Ok(items),
            }
        }
    }

    /// Runs a `holdfast node ...` command (the list when `cmd` is `None`).
    pub async fn node(&self, cmd: Option<NodeCommand>, output: Output) -> anyhow::Result<()> {
        use reqwest::Method;
        let v = match cmd.unwrap_or(NodeCommand::List) {
            NodeCommand::List => {
                let nodes = self.all_pages("/v1/nodes", "nodes", None).await?;
                return emit(output, &Value::Array(nodes.clone()), || node_table(&nodes));
            }
            NodeCommand::Get { id } => self.fetch(self.req(Method::GET, &format!("/v1/nodes/{id}"))).await?,
            NodeCommand::Drain { id, off, deadline } => {
                let mut body = serde_json::json!({ "enable": !off });
                if let Some(d) = deadline {
                    body["deadline_ms"] = serde_json::json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                }
                self.fetch(self.req(Method::POST, &format!("/v1/nodes/{id}/drain")).json(&body)).await?
            }
            NodeCommand::Eligibility { id, off, .. } => {
                let body = serde_json::json!({ "eligible": !off });
                self.fetch(self.req(Method::POST, &format!("/v1/nodes/{id}/eligibility")).json(&body)).await?
            }
            NodeCommand::Remove { id } => self.fetch(self.req(Method::DELETE, &format!("/v1/nodes/{id}"))).await?,
        };
        emit(output, &v, || fields_table(&v))
    }

    /// `holdfast cluster` (status) and `holdfast cluster members`.
    pub async fn cluster(&self, members: bool, output: Output) -> anyhow::Result<()> {
        let v = self.fetch(self.req(reqwest::Method::GET, "/v1/cluster")).await?;
        if members {
            let m = v["members"].clone();
            return emit(output, &m, || members_table(&v));
        }
        emit(output, &v, || cluster_table(&v))
    }

    /// Runs a `holdfast task ...` command.
    pub async fn task(&self, cmd: TaskCommand, output: Output) -> anyhow::Result<()> {
        use reqwest::Method;
        match cmd {
            TaskCommand::Submit { file, idempotency_key } => {
                let text = if file.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                    s
                } else {
                    std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
                };
                let toml = file.extension().is_some_and(|e| e == "toml");
                let body = spec_body(&text, toml)?;
                let mut req = self.req(Method::POST, "/v1/tasks").header("content-type", "application/json").body(body);
                if let Some(k) = idempotency_key {
                    req = req.header("Idempotency-Key", k);
                }
                let v = self.fetch(req).await?;
                emit(output, &v, || format!("{}\n", v["id"].as_str().unwrap_or_default()))
            }
            TaskCommand::List { state, node, name, limit } => {
                let mut q = vec![format!("limit={}", limit.unwrap_or(500).clamp(1, 500))];
                for (k, v) in [("state", state), ("node", node), ("name", name)] {
                    if let Some(v) = v {
                        q.push(format!("{k}={}", crate::manager::api::encode_query(&v)));
                    }
                }
                let tasks = self.all_pages(&format!("/v1/tasks?{}", q.join("&")), "tasks", limit).await?;
                emit(output, &Value::Array(tasks.clone()), || task_table(&tasks))
            }
            TaskCommand::Get { id } => {
                let v = self.fetch(self.req(Method::GET, &format!("/v1/tasks/{id}"))).await?;
                emit(output, &v, || task_detail(&v))
            }
            TaskCommand::Stop { id } => {
                let v = self.fetch(self.req(Method::DELETE, &format!("/v1/tasks/{id}"))).await?;
                emit(output, &v, || format!("{id} stopping\n"))
            }
            TaskCommand::Logs { id, tail, follow: false } => {
                let v = self.fetch(self.req(Method::GET, &format!("/v1/tasks/{id}/logs?tail={tail}"))).await?;
                match v {
                    Value::String(text) => print!("{text}"),
                    other => print_json(&other),
                }
                Ok(())
            }
            TaskCommand::Logs { id, tail, follow: true } => self.follow_logs(&id, tail).await,
        }
    }

    /// `task logs -f`: asks the API for the lines after the last one printed, once a
    /// second; the API answers each line once (by the engine's timestamps), so nothing
    /// repeats. Ends with the error when the logs can no longer be read.
    async fn follow_logs(&self, id: &str, tail: usize) -> anyhow::Result<()> {
        use std::io::Write;
        let mut cursor = String::new();
        loop {
            let path = format!("/v1/tasks/{id}/logs?tail={tail}&after={}", crate::manager::api::encode_query(&cursor));
            let v = self.fetch(self.req(reqwest::Method::GET, &path)).await?;
            let mut out = std::io::stdout().lock();
            for line in v["lines"].as_array().into_iter().flatten() {
                writeln!(out, "{}", line.as_str().unwrap_or_default())?;
            }
            out.flush()?;
            drop(out);
            if let Some(c) = v["cursor"].as_str() {
                cursor = c.to_string();
            }
            // A poll interval, not a wait for a condition: the API holds no stream open.
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// `holdfast token join --role R --rotate`: makes a new join token through the API
    /// (older ones of the role stop working) and updates `join-<role>.token` in the
    /// data dir when that file exists.
    async fn rotate_join_token(
        &self,
        role: crate::net::pki::Role,
        ttl: Option<Duration>,
        uses: Option<u64>,
    ) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "role": role, "ttl_ms": ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)), "uses": uses,
        });
        // Through `fetch`, so a refusal exits like every client command's (README "CLI").
        let v = self.fetch(self.req(reqwest::Method::POST, "/v1/cluster/join-tokens").json(&body)).await?;
        let token = v["token"].as_str().context("no token in the answer")?.to_string();
        let path = self.data_dir.join(format!("join-{role}.token"));
        if path.exists() {
            crate::net::identity::write_private(&path, &format!("{token}\n"))?;
            eprintln!("wrote {}", path.display());
        }
        println!("{token}");
        Ok(())
    }

    /// Runs a `holdfast cluster ca ...` command: status, rotate, or finish a rotation.
    /// A rotation's new join tokens are written to `join-<role>.token` in the data dir
    /// when those files exist (the first manager's data dir).
    pub async fn ca(&self, cmd: Option<crate::cli::CaCommand>) -> anyhow::Result<()> {
        use reqwest::Method;
        let (finish, force) = match cmd {
            None => return self.get("/v1/cluster/ca").await,
            Some(crate::cli::CaCommand::Rotate { finish, force }) => (finish, force),
        };
        if finish {
            let body = serde_json::json!({ "force": force });
            return self.call(self.req(Method::POST, "/v1/cluster/ca/finish").json(&body)).await;
        }
        let v = self.fetch(self.req(Method::POST, "/v1/cluster/ca/rotate")).await?;
        for role in ["worker", "manager"] {
            let path = self.data_dir.join(format!("join-{role}.token"));
            if let (Some(token), true) = (v["join_tokens"][role].as_str(), path.exists()) {
                crate::net::identity::write_private(&path, &format!("{token}\n"))?;
                eprintln!("wrote {}", path.display());
            }
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        Ok(())
    }

    /// Runs a `holdfast token ...` command.
    pub async fn token(&self, cmd: TokenCommand, output: Output) -> anyhow::Result<()> {
        use reqwest::Method;
        match cmd {
            TokenCommand::Create { role, name, ttl } => {
                let mut body = serde_json::json!({ "name": name, "role": role });
                if let Some(ttl) = ttl {
                    body["ttl_ms"] = serde_json::json!(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                }
                self.call(self.req(Method::POST, "/v1/tokens").json(&body)).await
            }
            TokenCommand::List => {
                let v = self.fetch(self.req(Method::GET, "/v1/tokens")).await?;
                emit(output, &v, || token_table(&v))
            }
            TokenCommand::Revoke { id } => self.call(self.req(Method::DELETE, &format!("/v1/tokens/{id}"))).await,
            TokenCommand::Join { role, ttl, uses, .. } => self.rotate_join_token(role, ttl, uses).await,
        }
    }

    /// `holdfast cluster snapshot save FILE`: streams `GET /v1/cluster/snapshot` into
    /// `FILE.part`, checks its length and checksum, then renames it to `file`.
    pub async fn snapshot_save(&self, file: &std::path::Path) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        // A large state takes longer than the usual 30 s request timeout.
        let req = self.req(reqwest::Method::GET, "/v1/cluster/snapshot").timeout(Duration::from_secs(3600));
        let mut resp = req.send().await.with_context(|| format!("cannot reach the holdfast API at {}", self.base))?;
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
}

/// The CA file an https client trusts: `--ca-file`, else the cluster CA a node keeps
/// in `<data-dir>/tls/ca.pem`, else `<data-dir>/ca.pem` (a copy an operator put there).
/// `None` when none of them exists.
pub fn ca_file_for(auth: &ApiAuth) -> Option<std::path::PathBuf> {
    if let Some(f) = &auth.ca_file {
        return Some(f.clone());
    }
    [auth.data_dir.join("tls").join("ca.pem"), auth.data_dir.join("ca.pem")].into_iter().find(|p| p.exists())
}

/// Every certificate of the CA file (during a CA rotation a node's `ca.pem` holds both
/// the new and the old CA), with an error naming `--ca-file` when there is none.
fn trusted_cas(auth: &ApiAuth) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let Some(path) = ca_file_for(auth) else {
        bail!(
            "an https API URL needs the cluster CA to verify the server: pass --ca-file FILE (or \
             HOLDFAST_CA_FILE), or point --data-dir at a node's data directory (tried {} and {})",
            auth.data_dir.join("tls").join("ca.pem").display(),
            auth.data_dir.join("ca.pem").display()
        );
    };
    let pem = std::fs::read(&path).with_context(|| format!("reading the CA file {} (--ca-file)", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("{} (--ca-file) is not a PEM certificate", path.display()))?;
    if certs.is_empty() {
        bail!("{} (--ca-file) holds no PEM certificate", path.display());
    }
    Ok(certs)
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
        holdfast_raft::restore_snapshot(&scratch, &data_dir.join("manager"), node_id)
            .map(|r| (h, r))
            .map_err(anyhow::Error::from)
    });
    let _ = std::fs::remove_file(&scratch);
    let (header, restored) = restored.with_context(|| format!("cannot restore {}", file.display()))?;
    seed_identity(data_dir, node_id).context("the state is restored, but the manager's certificate is not")?;
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

/// `holdfast token join --role R`: prints the role's join token from the data dir of
/// the first manager (no API call, no API token needed).
pub fn print_join_token(data_dir: &std::path::Path, role: crate::net::pki::Role) -> anyhow::Result<()> {
    let path = data_dir.join(format!("join-{role}.token"));
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (run this on the first manager, or pass --data-dir; --rotate makes a new token)",
            path.display()
        )
    })?;
    println!("{}", text.trim());
    Ok(())
}

/// Gives a restored manager the identity a first manager has: the cluster CA from the
/// restored state (`trust_ca`) and a manager certificate it signs, in `<data_dir>/tls`.
/// Workers and managers that trust that CA then accept the restored manager unchanged.
fn seed_identity(data_dir: &std::path::Path, node_id: &str) -> anyhow::Result<()> {
    use crate::net::{identity::write_private, pki};
    let state = data_dir.join("manager").join("state.db");
    let conn = rusqlite::Connection::open_with_flags(&state, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let ca: Option<(String, String)> = rusqlite::OptionalExtension::optional(conn.query_row(
        "SELECT cert_pem, key_pem FROM trust_ca WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    ))?;
    let Some((cert_pem, key_pem)) = ca else {
        bail!("the snapshot holds no cluster CA (taken before the cluster had one?)");
    };
    let ca = pki::Ca { cert_pem, key_pem };
    let (cert, key) = ca.issue(node_id, pki::Role::Manager, pki::DEFAULT_LEAF_LIFETIME)?;
    let tls = data_dir.join("tls");
    write_private(&tls.join("ca.key"), &ca.key_pem)?;
    write_private(&tls.join("ca.pem"), &ca.cert_pem)?;
    write_private(&tls.join("node.key"), &key)?;
    write_private(&tls.join("node.pem"), &cert)?;
    Ok(())
}

/// Prints `v` as indented JSON.
fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

/// Prints `v` as JSON or the table `table` renders.
fn emit(output: Output, v: &Value, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    match output {
        Output::Json => print_json(v),
        Output::Table => print!("{}", table()),
    }
    Ok(())
}

/// The JSON body of a spec file: JSON as it is; TOML (when `toml`, or when the text
/// is not JSON) converted to JSON. The API checks the spec itself.
pub fn spec_body(text: &str, toml: bool) -> anyhow::Result<String> {
    if !toml {
        if let Ok(v) = serde_json::from_str::<Value>(text) {
            return Ok(v.to_string());
        }
    }
    let v: toml::Value =
        toml::from_str(text).map_err(|e| anyhow::anyhow!("the spec is neither JSON nor TOML: {}", e.message()))?;
    Ok(serde_json::to_string(&v)?)
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == last {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Text of a JSON scalar; `-` for null or absent.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// One row per element of the JSON array `list` (no rows when it is not an array).
fn rows_of(list: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    list.as_array().map(|items| items.iter().map(row).collect()).unwrap_or_default()
}

/// The cells of `v`'s fields `keys`, in that order.
fn cells(v: &Value, keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| cell(&v[*k])).collect()
}

/// FIELD/VALUE rows: each label beside the cell of its value.
fn field_rows(fields: &[(&str, &Value)]) -> Vec<Vec<String>> {
    fields.iter().map(|(label, v)| vec![label.to_string(), cell(v)]).collect()
}

/// `holdfast task list`.
pub fn task_table(tasks: &[Value]) -> String {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let current = t["placements"].as_array().and_then(|p| p.iter().find(|p| p["current"] == true));
            vec![
                cell(&t["id"]),
                cell(&t["name"]),
                cell(&t["state"]),
                current.map_or("-".into(), |p| cell(&p["node"])),
                cell(&t["spec"]["image"]),
                cell(&t["restarts"]),
                cell(&t["endpoints"]),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATE", "NODE", "IMAGE", "RESTARTS", "ENDPOINTS"], &rows)
}

/// `holdfast task get`.
pub fn task_detail(t: &Value) -> String {
    let mut out = table(
        &["FIELD", "VALUE"],
        &field_rows(&[
            ("id", &t["id"]),
            ("name", &t["name"]),
            ("state", &t["state"]),
            ("desired", &t["desired"]),
            ("image", &t["spec"]["image"]),
            ("reason", &t["reason"]),
            ("exit code", &t["exit_code"]),
            ("restarts", &t["restarts"]),
            ("endpoints", &t["endpoints"]),
        ]),
    );
    let rows = rows_of(&t["placements"], |p| {
        let mut row = cells(p, &["id", "node", "fence", "desired", "observed"]);
        row.push(if p["current"] == true { "yes".into() } else { "-".into() });
        row
    });
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&table(&["PLACEMENT", "NODE", "FENCE", "DESIRED", "OBSERVED", "CURRENT"], &rows));
    }
    out
}

/// `holdfast node list`.
pub fn node_table(nodes: &[Value]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let flags = match (n["draining"] == true, n["eligible"] == false) {
                (true, _) => "draining",
                (false, true) => "ineligible",
                _ => "-",
            };
            vec![
                cell(&n["id"]),
                cell(&n["status"]),
                flags.into(),
                cell(&n["address"]),
                format!("{}/{}", cell(&n["reserved"]["cpu_millis"]), cell(&n["capacity"]["cpu_millis"])),
                format!("{}/{}", cell(&n["reserved"]["memory_mb"]), cell(&n["capacity"]["memory_mb"])),
                cell(&n["placements"]),
            ]
        })
        .collect();
    table(&["NAME", "STATUS", "SCHEDULING", "ADDRESS", "CPU (m)", "MEMORY (MiB)", "PLACEMENTS"], &rows)
}

/// A JSON object as FIELD/VALUE rows (nested values as compact JSON).
pub fn fields_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = match v.as_object() {
        Some(o) => o
            .iter()
            .filter(|(_, v)| !matches!(v, Value::Array(a) if a.len() > 8))
            .map(|(k, v)| vec![k.clone(), if v.is_object() { v.to_string() } else { cell(v) }])
            .collect(),
        None => vec![vec!["value".into(), cell(v)]],
    };
    table(&["FIELD", "VALUE"], &rows)
}

/// `holdfast cluster`.
pub fn cluster_table(v: &Value) -> String {
    let mut rows = field_rows(&[
        ("this manager", &v["id"]),
        ("role", &v["role"]),
        ("leader", &v["leader"]["id"]),
        ("term", &v["term"]),
        ("commit index", &v["commit_index"]),
        ("last applied", &v["last_applied"]),
    ]);
    rows.push(vec!["members".into(), v["members"].as_array().map_or(0, Vec::len).to_string()]);
    let mut out = table(&["FIELD", "VALUE"], &rows);
    out.push('\n');
    out.push_str(&members_table(v));
    out
}

/// `holdfast cluster members`.
pub fn members_table(v: &Value) -> String {
    let leader = v["leader"]["id"].as_str().unwrap_or_default();
    let rows = rows_of(&v["members"], |m| {
        let role = if m["id"] == leader { "leader".into() } else { cell(&m["role"]) };
        let mut row = vec![cell(&m["id"]), role];
        row.extend(cells(m, &["api", "cluster", "version", "last_applied"]));
        row
    });
    table(&["NAME", "ROLE", "API", "CLUSTER", "VERSION", "APPLIED"], &rows)
}

/// `holdfast token list`.
pub fn token_table(v: &Value) -> String {
    let rows = rows_of(&v["tokens"], |t| cells(t, &["id", "name", "role", "created_by", "expires_ms"]));
    table(&["ID", "NAME", "ROLE", "CREATED BY", "EXPIRES (ms)"], &rows)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn task_list_renders_a_fixed_table() {
        let tasks = vec![
            json!({"id": "t1", "name": "web", "state": "running", "spec": {"image": "holdfast/echo:latest"},
                   "restarts": 2, "endpoints": ["10.0.0.1:32768"],
                   "placements": [{"node": "old", "current": false}, {"node": "edge-1", "current": true}]}),
            json!({"id": "t22", "name": "batch-job", "state": "pending", "spec": {"image": "busybox"},
                   "restarts": 0, "endpoints": [], "placements": []}),
        ];
        assert_eq!(
            task_table(&tasks),
            "\
ID   NAME       STATE    NODE    IMAGE                 RESTARTS  ENDPOINTS
t1   web        running  edge-1  holdfast/echo:latest  2         10.0.0.1:32768
t22  batch-job  pending  -       busybox               0         -
"
        );
        assert_eq!(task_table(&[]), "ID  NAME  STATE  NODE  IMAGE  RESTARTS  ENDPOINTS\n");
    }

    #[test]
    fn node_list_and_members_render_fixed_tables() {
        let nodes = vec![json!({"id": "edge-1", "status": "ready", "draining": true, "eligible": true,
            "address": "10.0.0.1", "capacity": {"cpu_millis": 4000, "memory_mb": 8192},
            "reserved": {"cpu_millis": 100, "memory_mb": 64}, "placements": 1})];
        assert_eq!(
            node_table(&nodes),
            "\
NAME    STATUS  SCHEDULING  ADDRESS   CPU (m)   MEMORY (MiB)  PLACEMENTS
edge-1  ready   draining    10.0.0.1  100/4000  64/8192       1
"
        );
        let cluster = json!({"id": "m1", "role": "Leader", "leader": {"id": "m1"}, "term": 3, "commit_index": 40,
            "last_applied": 40, "members": [
                {"id": "m1", "role": "voter", "api": "127.0.0.1:7700", "cluster": "127.0.0.1:7701", "version": "0.1.0", "last_applied": 40},
                {"id": "m2", "role": "learner", "api": "127.0.0.1:7710", "cluster": "127.0.0.1:7711", "version": null, "last_applied": 38}]});
        assert_eq!(
            members_table(&cluster),
            "\
NAME  ROLE     API             CLUSTER         VERSION  APPLIED
m1    leader   127.0.0.1:7700  127.0.0.1:7701  0.1.0    40
m2    learner  127.0.0.1:7710  127.0.0.1:7711  -        38
"
        );
        assert!(cluster_table(&cluster).starts_with("FIELD         VALUE\nthis manager  m1\nrole          Leader\n"));
    }

    #[test]
    fn specs_come_from_json_or_toml() {
        assert_eq!(spec_body(r#"{"image":"busybox"}"#, false).unwrap(), r#"{"image":"busybox"}"#);
        let toml = "name = \"web\"\nimage = \"busybox\"\n[resources]\nmemory_mb = 64\n";
        let v: Value = serde_json::from_str(&spec_body(toml, true).unwrap()).unwrap();
        assert_eq!(v, json!({"name": "web", "image": "busybox", "resources": {"memory_mb": 64}}));
        // Not JSON: read as TOML, and an error says both were tried.
        assert_eq!(spec_body("image = \"x\"", false).unwrap(), r#"{"image":"x"}"#);
        assert!(spec_body("{ nope", false).unwrap_err().to_string().contains("neither JSON nor TOML"));
    }

    #[test]
    fn api_failures_pick_the_exit_code() {
        let code = |status| exit_code(&anyhow::Error::from(ApiFailure { status, message: String::new() }));
        assert_eq!((code(404), code(503), code(400), code(409)), (3, 4, 1, 1));
        assert_eq!(exit_code(&anyhow::anyhow!("other")), 1);
    }

    /// Answers every request on a local port with `503` and an error body.
    async fn unavailable_api() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                // Read the whole request (headers, then Content-Length bytes) first.
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf).await {
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                    let Some(end) = text.find("\r\n\r\n") else {
                        if n == 0 {
                            break;
                        }
                        continue;
                    };
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if n == 0 || got.len() >= end + 4 + len {
                        break;
                    }
                }
                let body = r#"{"error":{"code":"unavailable","message":"no leader"}}"#;
                let answer = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    /// Regression: rotating a join token or the CA read the answer themselves and
    /// failed with exit code 1 on any refusal; like every client command they now exit
    /// 4 on a 503 (README "CLI").
    #[tokio::test]
    async fn rotations_exit_like_every_client_command_on_a_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let auth = ApiAuth { token: Some("t".into()), data_dir: dir.path().to_path_buf(), ca_file: None };
        let api = Api::new(&unavailable_api().await, &auth).unwrap();
        let e = api.rotate_join_token(crate::net::pki::Role::Worker, None, None).await.unwrap_err();
        assert_eq!(exit_code(&e), crate::cli::EXIT_RETRYABLE, "{e:#}");
        let rotate = crate::cli::CaCommand::Rotate { finish: false, force: false };
        let e = api.ca(Some(rotate)).await.unwrap_err();
        assert_eq!(exit_code(&e), crate::cli::EXIT_RETRYABLE, "{e:#}");
        assert!(e.to_string().contains("no leader"), "{e:#}");
    }
}
