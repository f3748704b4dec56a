//! The CLI's HTTP client for `holdfast task|node|cluster|token`: authenticates with a
//! bearer token and prints the API's JSON.

use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{ApiAuth, TaskCommand, TokenCommand};

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

    async fn call(&self, req: reqwest::RequestBuilder) -> anyhow::Result<()> {
        let resp = req.send().await.with_context(|| format!("cannot reach the holdfast API at {}", self.base))?;
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

    /// GETs one API path and prints it.
    pub async fn get(&self, path: &str) -> anyhow::Result<()> {
        self.call(self.req(reqwest::Method::GET, path)).await
    }

    /// Runs a `holdfast task ...` command.
    pub async fn task(&self, cmd: TaskCommand) -> anyhow::Result<()> {
        use reqwest::Method;
        match cmd {
            TaskCommand::Submit { file, idempotency_key } => {
                let body = if file.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                    s
                } else {
                    std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
                };
                let mut req = self.req(Method::POST, "/v1/tasks").header("content-type", "application/json").body(body);
                if let Some(k) = idempotency_key {
                    req = req.header("Idempotency-Key", k);
                }
                self.call(req).await
            }
            TaskCommand::List => self.get("/v1/tasks").await,
            TaskCommand::Get { id } => self.get(&format!("/v1/tasks/{id}")).await,
            TaskCommand::Stop { id } => self.call(self.req(Method::DELETE, &format!("/v1/tasks/{id}"))).await,
            TaskCommand::Logs { id } => self.get(&format!("/v1/tasks/{id}/logs")).await,
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
        let resp = self
            .req(reqwest::Method::POST, "/v1/cluster/join-tokens")
            .json(&body)
            .send()
            .await
            .with_context(|| format!("cannot reach the holdfast API at {}", self.base))?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.context("unreadable API answer")?;
        if !status.is_success() {
            bail!("{status}: {v}");
        }
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
        let resp = self
            .req(Method::POST, "/v1/cluster/ca/rotate")
            .send()
            .await
            .with_context(|| format!("cannot reach the holdfast API at {}", self.base))?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await.context("unreadable API answer")?;
        if !status.is_success() {
            bail!("{status}: {v}");
        }
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
    pub async fn token(&self, cmd: TokenCommand) -> anyhow::Result<()> {
        use reqwest::Method;
        match cmd {
            TokenCommand::Create { role, name, ttl } => {
                let mut body = serde_json::json!({ "name": name, "role": role });
                if let Some(ttl) = ttl {
                    body["ttl_ms"] = serde_json::json!(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
                }
                self.call(self.req(Method::POST, "/v1/tokens").json(&body)).await
            }
            TokenCommand::List => self.get("/v1/tokens").await,
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
