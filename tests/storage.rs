//! Storage failures on a real, small file system (a tmpfs mounted for the test): a
//! full disk is a clear 507 that heals itself when space returns, with nothing lost;
//! a storage error Raft cannot survive ends the process (non-zero, naming the file and
//! the cause) and `/health/live` fails; a restart after space returns keeps every
//! acknowledged write.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// A tmpfs of `mb` MiB mounted on a temp dir; unmounted when dropped.
struct SmallDisk {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mb: u64) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("disk");
        std::fs::create_dir(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs", mnt.to_str().unwrap()])
            .status();
        assert!(
            matches!(ok, Ok(s) if s.success()),
            "these tests mount a small tmpfs and need root (CAP_SYS_ADMIN); run them as root"
        );
        SmallDisk { mnt, _dir: dir }
    }

    /// Fills the disk with a ballast file until `leave` bytes are free (0: until the
    /// file system refuses more).
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.mnt.join("ballast");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xA5u8; 1 << 20];
        loop {
            let free = free_bytes(&self.mnt);
            if free <= leave {
                break;
            }
            let n = ((free - leave) as usize).min(chunk.len());
            if f.write_all(&chunk[..n]).is_err() {
                break; // full
            }
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn free_bytes(p: &Path) -> u64 {
    let out = std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse().ok()).unwrap()
}

/// The bootstrap manager `m1` with its data dir on the small disk and its log off it.
fn start(disk: &SmallDisk, extra: &[&str]) -> (Node, String) {
    let mut m = Node::new(disk._dir.path(), "m1").with_data(disk.mnt.join("data"));
    m.bootstrap(extra);
    let api = m.url("");
    (m, api)
}

async fn submit(client: &reqwest::Client, api: &str, name: &str) -> (u16, Value) {
    let body = format!(r#"{{"image":"holdfast/echo:latest","name":"{name}"}}"#);
    match client.post(format!("{api}/v1/tasks")).body(body).send().await {
        Ok(r) => (r.status().as_u16(), r.json().await.unwrap_or(Value::Null)),
        Err(e) => (0, Value::String(e.to_string())),
    }
}

async fn task_names(client: &reqwest::Client, api: &str) -> Option<Vec<String>> {
    let v = get_json(client, &format!("{api}/v1/tasks")).await?;
    let mut names: Vec<String> =
        v["tasks"].as_array()?.iter().filter_map(|t| t["name"].as_str().map(String::from)).collect();
    names.sort();
    Some(names)
}

#[tokio::test]
async fn a_full_disk_is_a_clear_507_nothing_is_lost_and_writes_resume_with_space() {
    let disk = SmallDisk::mount(96);
    let data = disk.mnt.join("data");
    let (mut m, api) = start(&disk, &[]);
    let client = api_client(&data).await;
    let (s, b) = submit(&client, &api, "before").await;
    assert_eq!(s, 201, "{b}");

    // Below the 64 MiB reserve: refused before SQLite sees it.
    let ballast = disk.fill(32 << 20);
    let (s, b) = submit(&client, &api, "while-full").await;
    assert_eq!(s, 507, "{b}");
    assert_eq!(b["error"]["code"], "insufficient_storage", "{b}");
    let msg = b["error"]["message"].as_str().unwrap();
    assert!(msg.contains(data.to_str().unwrap()) && msg.contains("reserve"), "{msg}");
    // Reads still answer, with exactly what was acknowledged.
    assert_eq!(task_names(&client, &api).await.unwrap(), vec!["before"]);
    assert!(m.proc().child.try_wait().unwrap().is_none(), "a full disk must not kill the manager");

    // Space returns: writes resume by themselves, no restart.
    std::fs::remove_file(&ballast).unwrap();
    let (s, b) = submit(&client, &api, "after").await;
    assert_eq!(s, 201, "{b}");
    assert_eq!(task_names(&client, &api).await.unwrap(), vec!["after", "before"]);
    let proc = m.proc();
    assert!(proc.terminate(Duration::from_secs(15)).is_some_and(|s| s.success()), "{}", proc.log_text());
}

#[tokio::test]
async fn a_fatal_storage_error_ends_the_process_and_the_live_probe_fails() {
    let disk = SmallDisk::mount(48);
    let data = disk.mnt.join("data");
    // Reserve off: the write reaches SQLite on a disk with no space left at all.
    let (mut m, api) = start(&disk, &["--min-free-mb", "0"]);
    let client = api_client(&data).await;
    let (s, b) = submit(&client, &api, "before").await;
    assert_eq!(s, 201, "{b}");
    let live = format!("{api}/health/live");
    assert_eq!(http().get(&live).send().await.unwrap().status().as_u16(), 200);

    let ballast = disk.fill(0);
    // Keep writing until the log append fails (SQLite may still have a little room).
    let mut refused = None;
    for i in 0..200 {
        let (s, b) = submit(&client, &api, &format!("fill{i}")).await;
        if s != 201 {
            refused = Some((s, b));
            break;
        }
    }
    let (s, b) = refused.expect("a write on a full disk must not succeed forever");
    assert!(s == 0 || s >= 500, "{s}: {b}");

    // The live probe fails (503, or nothing listens any more) and the process exits
    // non-zero within seconds, saying which file and why.
    eventually(Duration::from_secs(10), "live probe fails", || {
        let live = live.clone();
        async move {
            match http().get(&live).timeout(Duration::from_secs(2)).send().await {
                Ok(r) if r.status().is_success() => None,
                _ => Some(()),
            }
        }
    })
    .await;
    let status = eventually(Duration::from_secs(15), "the process exits", || {
        let s = m.proc().child.try_wait().ok().flatten();
        async move { s }
    })
    .await;
    assert!(!status.success(), "exit status {status}");
    let text = m.log();
    assert!(text.contains("fatal storage error"), "{text}");
    assert!(text.contains(".db") && text.contains("full"), "names the file and the cause: {text}");
    eprintln!("{}", text.lines().rfind(|l| l.contains("fatal storage error")).unwrap_or_default());

    // Space returns; systemd would restart it: everything acknowledged is there.
    std::fs::remove_file(&ballast).unwrap();
    m.bootstrap(&["--min-free-mb", "0"]);
    let names = eventually(Duration::from_secs(30), "restarted manager answers", || {
        let (client, api) = (client.clone(), api.clone());
        async move { task_names(&client, &api).await }
    })
    .await;
    assert!(names.contains(&"before".to_string()), "{names:?}");
    let (s, b) = submit(&client, &api, "after-restart").await;
    assert_eq!(s, 201, "{b}");
    m.kill();
}
