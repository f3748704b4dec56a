//! The Docker runtime against the real engine on this machine and the real echo image.
//!
//! These tests need Docker and fail loudly without it (with or without `CI=true`): a
//! runtime test that silently passes without an engine cannot fail, so it proves nothing.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::eventually;
use holdfast::worker::runtime::docker::{is_static_elf, DockerConfig, DockerRuntime};
use holdfast::worker::runtime::{labels, ContainerInfo, ContainerSpec, ContainerState, PortMap, Runtime, RuntimeError};

/// The echo image the tests run.
const ECHO: &str = "holdfast/echo:latest";

/// Longest any condition in this file may take to come true.
const DEADLINE: Duration = Duration::from_secs(20);

/// Tests that use the echo image hold this for reading; the one that deletes the image
/// holds it for writing, so it never pulls the image from under a running test.
static ECHO_IMAGE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The static `holdfast` binary cargo built for these tests: our own `/proc/self/exe`
/// is the test harness, which has no `echo` subcommand.
fn holdfast_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_holdfast"))
}

async fn runtime_with(self_binary: PathBuf) -> DockerRuntime {
    let config = DockerConfig { self_binary, ..DockerConfig::default() };
    match DockerRuntime::connect_with(config).await {
        Ok(runtime) => runtime,
        Err(error) => {
            panic!("these tests need a Docker engine (CI={}): {error}", std::env::var("CI").unwrap_or_default())
        }
    }
}

async fn runtime() -> DockerRuntime {
    runtime_with(holdfast_binary()).await
}

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    format!("hf-test-{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// Removes the named containers when the test ends, passed or failed. It shells out to
/// the docker CLI because `Drop` cannot await and may run during a panic.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let result = std::process::Command::new("docker").args(["rm", "--force", "--volumes"]).args(&self.0).output();
        if let Err(error) = result {
            eprintln!("cleanup of {:?} failed: {error}", self.0);
        }
    }
}

/// An echo container spec publishing 7777 on a free host port, labelled for this test.
fn echo_spec(name: &str, command: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: ECHO.to_owned(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        env: BTreeMap::from([("RUST_LOG".to_owned(), "info".to_owned())]),
        ports: vec![PortMap { container: 7777, host: 0 }],
        cpu_millis: 500,
        memory_mb: 64,
        labels: BTreeMap::from([
            (labels::TASK.to_owned(), name.to_owned()),
            (labels::PLACEMENT.to_owned(), format!("{name}-p1")),
            (labels::FENCE.to_owned(), "7".to_owned()),
        ]),
        guard: None,
    }
}

async fn state_of(runtime: &DockerRuntime, id: &str) -> Option<ContainerState> {
    runtime.inspect(id).await.expect("inspect").map(|info| info.state)
}

#[tokio::test]
async fn ping_reports_root_dir_and_version() {
    let runtime = runtime().await;
    let info = runtime.ping().await.expect("ping");
    assert!(info.root_dir.starts_with('/'), "{info:?}");
    assert!(!info.version.is_empty(), "{info:?}");
}

#[tokio::test]
async fn echo_container_round_trip() {
    let _image = ECHO_IMAGE.read().await;
    let runtime = runtime().await;
    runtime.ensure_image(ECHO).await.expect("echo image");
    assert!(runtime.image_size(ECHO).await.expect("size").unwrap_or(0) > 1_000_000);
    let name = unique("echo");
    let _cleanup = Cleanup(vec![name.clone()]);

    let info = runtime.create_and_start(&echo_spec(&name, &[])).await.expect("create and start");
    assert_eq!(info.name, name);
    assert_eq!(info.state, ContainerState::Running);
    let host_port = match info.ports.as_slice() {
        [(7777, host)] if *host != 0 => *host,
        other => panic!("expected 7777 published on a host port, got {other:?}"),
    };

    // The image's own CMD (no command in the spec) listens on 7777.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("client");
    let url = format!("http://127.0.0.1:{host_port}/");
    let body = format!("hello from {name}");
    let echoed = eventually(DEADLINE, "the echo answer", || {
        let request = http.post(&url).body(body.clone());
        async move {
            let response = request.send().await.ok()?;
            (response.status() == 200).then_some(response.bytes().await.ok()?)
        }
    })
    .await;
    assert_eq!(echoed, body.as_bytes());

    let selector = vec![(labels::TASK.to_owned(), name.clone())];
    let listed = runtime.list(&selector).await.expect("list");
    let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, vec![info.id.as_str()]);
    assert_eq!(listed[0].labels[labels::FENCE], "7");
    assert_eq!(listed[0].labels[labels::PLACEMENT], format!("{name}-p1"));
    let other = vec![(labels::TASK.to_owned(), unique("absent"))];
    assert!(runtime.list(&other).await.expect("list").is_empty());

    let logs = runtime.logs(&info.id, 50).await.expect("logs");
    assert!(logs.contains("echo listening"), "logs: {logs:?}");

    runtime.stop(&info.id, Duration::from_secs(5)).await.expect("stop");
    // SIGTERM is a graceful stop for echo: exit code 0, not a kill's 137.
    assert_eq!(state_of(&runtime, &info.id).await, Some(ContainerState::Exited { code: 0 }));
    runtime.stop(&info.id, Duration::from_secs(5)).await.expect("stopping a stopped container is fine");
    runtime.remove(&info.id).await.expect("remove");
    assert_eq!(runtime.inspect(&info.id).await.expect("inspect"), None);
    assert!(runtime.list(&selector).await.expect("list").is_empty());
    runtime.remove(&info.id).await.expect("removing twice is fine");
    runtime.stop(&info.id, Duration::from_secs(1)).await.expect("stopping an absent container is fine");
    assert!(matches!(runtime.logs(&info.id, 10).await, Err(RuntimeError::NotFound(_))));
    assert!(matches!(runtime.start(&info.id).await, Err(RuntimeError::NotFound(_))));
}

#[tokio::test]
async fn exit_code_is_reported_and_start_restarts_the_same_container() {
    let _image = ECHO_IMAGE.read().await;
    let runtime = runtime().await;
    runtime.ensure_image(ECHO).await.expect("echo image");
    let name = unique("exit");
    let _cleanup = Cleanup(vec![name.clone()]);
    let command = ["echo", "--listen", "0.0.0.0:7777", "--exit-after", "1s", "--exit-code", "3"];
    let info = runtime.create_and_start(&echo_spec(&name, &command)).await.expect("create and start");
    let exited = |id: String| {
        let runtime = &runtime;
        async move {
            eventually(DEADLINE, "exit code 3", || {
                let id = id.clone();
                async move {
                    let state = state_of(runtime, &id).await?;
                    (state == ContainerState::Exited { code: 3 }).then_some(())
                }
            })
            .await
        }
    };
    exited(info.id.clone()).await;

    let again = runtime.start(&info.id).await.expect("start again");
    assert_eq!(again.id, info.id);
    assert_eq!(again.state, ContainerState::Running);
    exited(info.id.clone()).await;
}

#[tokio::test]
async fn unobtainable_image_is_image_unavailable_quickly() {
    let runtime = runtime().await;
    let started = Instant::now();
    let image = "nonexistent.invalid/nope:1";
    match runtime.ensure_image(image).await {
        Err(RuntimeError::ImageUnavailable { image: named, reason }) => {
            eprintln!("{image} unavailable: {reason}");
            assert_eq!(named, image);
            assert!(!reason.trim().is_empty());
        }
        other => panic!("expected ImageUnavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
    assert_eq!(runtime.image_size(image).await.expect("size"), None);
}

#[tokio::test]
async fn taken_host_port_is_rejected_and_leaves_no_container() {
    let _image = ECHO_IMAGE.read().await;
    let runtime = runtime().await;
    runtime.ensure_image(ECHO).await.expect("echo image");
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind a port");
    let port = taken.local_addr().expect("addr").port();
    let name = unique("port");
    let _cleanup = Cleanup(vec![name.clone()]);
    let mut spec = echo_spec(&name, &[]);
    spec.ports[0].host = port;

    match runtime.create_and_start(&spec).await {
        Err(RuntimeError::Rejected(message)) => {
            eprintln!("port {port} refused: {message}");
            assert!(message.contains(&port.to_string()), "{message}");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(runtime.inspect(&name).await.expect("inspect"), None);
    let selector = vec![(labels::TASK.to_owned(), name.clone())];
    assert!(runtime.list(&selector).await.expect("list").is_empty());
}

#[tokio::test]
async fn duplicate_name_is_rejected() {
    let _image = ECHO_IMAGE.read().await;
    let runtime = runtime().await;
    runtime.ensure_image(ECHO).await.expect("echo image");
    let name = unique("dup");
    let _cleanup = Cleanup(vec![name.clone()]);
    let mut spec = echo_spec(&name, &[]);
    spec.ports.clear();
    let first: ContainerInfo = runtime.create_and_start(&spec).await.expect("first");
    match runtime.create_and_start(&spec).await {
        Err(RuntimeError::Rejected(message)) => assert!(message.contains(&name), "{message}"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    // The refused duplicate must not have touched the original.
    assert_eq!(state_of(&runtime, &first.id).await, Some(ContainerState::Running));
}

#[test]
fn static_elf_check_on_real_binaries() {
    let holdfast = std::fs::read(holdfast_binary()).expect("read holdfast");
    assert!(is_static_elf(&holdfast), "the holdfast binary is static");
    let shell = std::fs::read("/bin/sh").expect("read /bin/sh");
    assert!(!is_static_elf(&shell), "/bin/sh needs the dynamic loader");
}

#[tokio::test]
async fn dynamic_binary_is_refused_with_a_fix() {
    let runtime = runtime_with(PathBuf::from("/bin/sh")).await;
    let image = format!("holdfast/echo:{}", unique("dynamic"));
    match runtime.ensure_image(&image).await {
        Err(RuntimeError::ImageUnavailable { image: named, reason }) => {
            assert_eq!(named, image);
            assert!(reason.contains("build-static.sh"), "{reason}");
        }
        other => panic!("expected ImageUnavailable, got {other:?}"),
    }
    assert_eq!(runtime.echo_builds(), 0);
}

#[tokio::test]
async fn concurrent_ensure_image_builds_once() {
    let _exclusive = ECHO_IMAGE.write().await;
    let removed = std::process::Command::new("docker")
        .args(["rmi", "--force", ECHO, &format!("holdfast/echo:{}", env!("CARGO_PKG_VERSION"))])
        .output()
        .expect("docker rmi");
    // rmi fails when the image is already absent, which is just as good.
    let runtime = Arc::new(runtime().await);
    assert_eq!(
        runtime.image_size(ECHO).await.expect("size"),
        None,
        "echo image still present after rmi: {}",
        String::from_utf8_lossy(&removed.stderr)
    );

    let started = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let runtime = Arc::clone(&runtime);
            tokio::spawn(async move { runtime.ensure_image(ECHO).await })
        })
        .collect();
    for call in calls {
        call.await.expect("task").expect("ensure_image");
    }
    eprintln!("echo image built in {:?}", started.elapsed());
    assert_eq!(runtime.echo_builds(), 1);
    assert!(runtime.image_size(ECHO).await.expect("size").is_some());
    let version_tag = format!("holdfast/echo:{}", env!("CARGO_PKG_VERSION"));
    assert!(runtime.image_size(&version_tag).await.expect("size").is_some());
}

#[tokio::test]
async fn an_echo_image_from_another_binary_is_rebuilt() {
    let _shared = ECHO_IMAGE.read().await;
    // A same-named image that this binary did not build (no or another digest label).
    let tag = format!("holdfast/echo:stale-{}", unique("t"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"not holdfast").unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPY f /f\nLABEL holdfast.binary.sha256=other\n")
        .unwrap();
    let built = std::process::Command::new("docker")
        .args(["build", "-q", "-t", &tag])
        .arg(dir.path())
        .output()
        .expect("docker build");
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let _cleanup = scopeguard_rmi(&tag);

    let runtime = runtime().await;
    runtime.ensure_image(&tag).await.expect("rebuilt");
    assert_eq!(runtime.echo_builds(), 1, "the stale image was trusted");
    let label = std::process::Command::new("docker")
        .args(["image", "inspect", "-f", "{{index .Config.Labels \"holdfast.binary.sha256\"}}", &tag])
        .output()
        .expect("inspect");
    let label = String::from_utf8_lossy(&label.stdout).trim().to_string();
    assert_eq!(label.len(), 64, "digest label missing: {label:?}");
    // Now current: no second build.
    runtime.ensure_image(&tag).await.expect("current");
    assert_eq!(runtime.echo_builds(), 1);
}

/// Removes an image tag when dropped.
fn scopeguard_rmi(tag: &str) -> impl Drop {
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = std::process::Command::new("docker").args(["rmi", "--force", &self.0]).output();
        }
    }
    Rmi(tag.to_string())
}
