//! The in-container guard (`holdfast guard`): as a plain process (exit codes, signals,
//! the deadline, SIGKILL escalation), and inside real containers of images built here
//! FROM scratch: ENTRYPOINT only, CMD only, both, a shell-script ENTRYPOINT, and the bad
//! images that must be refused before anything starts.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{docker, eventually, eventually_blocking, holdfast_bin, require_docker, tar_of, RemoveImages};
use holdfast::guard::{boottime_ms, Deadline, FENCED_EXIT};
use holdfast::worker::runtime::docker::{DockerConfig, DockerRuntime};
use holdfast::worker::runtime::{labels, ContainerSpec, ContainerState, GuardSpec, Runtime, RuntimeError};

/// Writes a deadline `ms` from now, with a 2 s grace, into `file`.
fn write_deadline(file: &Path, ms: u64) {
    write_deadline_with_grace(file, ms, 2_000);
}

fn write_deadline_with_grace(file: &Path, ms: u64, grace_ms: u64) {
    std::fs::write(file, Deadline { at_boot_ms: boottime_ms() + ms, grace_ms }.text()).expect("deadline file");
}

/// Runs `holdfast guard --deadline-file F [extra] -- argv...` as a child, its stdout and
/// stderr going to `F.log`.
fn guard(file: &Path, extra: &[&str], argv: &[&str]) -> std::process::Child {
    let log = std::fs::File::create(file.with_extension("log")).expect("log file");
    Command::new(holdfast_bin())
        .arg("guard")
        .arg("--deadline-file")
        .arg(file)
        .args(extra)
        .arg("--")
        .args(argv)
        .env("HOLDFAST_LOG", "info")
        .stdout(Stdio::from(log.try_clone().expect("log file")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn the guard")
}

/// Polls the guard's log (next to `file`) until it contains `text`.
fn wait_log(file: &Path, text: &str) {
    eventually_blocking(Duration::from_secs(10), &format!("{text:?} in the guard's log"), || {
        let log = std::fs::read_to_string(file.with_extension("log")).unwrap_or_default();
        if log.contains(text) {
            Ok(())
        } else {
            Err(log)
        }
    })
}

/// Waits for `child` (started with the deadline `file`) with a deadline; returns its
/// code, its output and the time taken.
fn finish(file: &Path, mut child: std::process::Child, within: Duration) -> (i32, String, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let text = std::fs::read_to_string(file.with_extension("log")).unwrap_or_default();
            return (status.code().unwrap_or(-1), text, started.elapsed());
        }
        if started.elapsed() > within {
            let _ = child.kill();
            panic!("the guard did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_guard_passes_exit_codes_and_signals_through_and_fences_on_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deadline");
    let bin = holdfast_bin();
    let bin = bin.to_str().unwrap();
    let echo = [bin, "echo", "--listen", "127.0.0.1:0"];

    // The app's exit code passes through, and its output is the output.
    write_deadline(&file, 30_000);
    let child =
        guard(&file, &[], &[bin, "echo", "--listen", "127.0.0.1:0", "--exit-after", "200ms", "--exit-code", "7"]);
    let (code, out, _) = finish(&file, child, Duration::from_secs(10));
    assert_eq!(code, 7, "{out}");
    assert!(out.contains("echo listening"), "{out}");
    assert!(!out.contains("holdfast guard"), "the guard adds nothing to a normal run's logs: {out}");

    // SIGTERM to the guard reaches the app, which ends cleanly and promptly.
    let child = guard(&file, &[], &echo);
    wait_log(&file, "echo listening");
    let sent = Instant::now();
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    let (code, out, _) = finish(&file, child, Duration::from_secs(10));
    assert_eq!(code, 0, "{out}");
    assert!(sent.elapsed() < Duration::from_secs(2), "TERM took {:?}: {out}", sent.elapsed());
    assert!(out.contains("echo stopping"), "{out}");

    // A deadline that passes stops the app (TERM) and exits with the fence code.
    write_deadline(&file, 800);
    let (code, out, took) = finish(&file, guard(&file, &[], &echo), Duration::from_secs(10));
    assert_eq!(code, FENCED_EXIT, "{out}");
    assert!(out.contains("lease deadline passed"), "{out}");
    assert!(took >= Duration::from_millis(700) && took < Duration::from_millis(2_500), "{took:?}");

    // Moving the deadline keeps the app running past the first one.
    // (Margins are wide: other builds share this machine's two cores.)
    write_deadline(&file, 1_000);
    let child = guard(&file, &[], &echo);
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2_000) {
        write_deadline(&file, 1_000);
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, out, _) = finish(&file, child, Duration::from_secs(10));
    assert_eq!(code, FENCED_EXIT, "{out}");
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(2_500),
        "renewals kept the app up past its first deadline: {lived:?}: {out}"
    );

    // An app that ignores SIGTERM is killed after the grace.
    write_deadline_with_grace(&file, 500, 500);
    let child = guard(&file, &[], &["/bin/sh", "-c", "trap '' TERM; exec sleep 30"]);
    let (code, out, took) = finish(&file, child, Duration::from_secs(10));
    assert_eq!(code, FENCED_EXIT, "{out}");
    assert!(took < Duration::from_secs(3), "SIGKILL after the grace: {took:?}");

    // No deadline (or one already past): nothing starts at all.
    let absent = dir.path().join("absent");
    let (code, out, _) = finish(&absent, guard(&absent, &[], &echo), Duration::from_secs(5));
    assert_eq!(code, FENCED_EXIT, "{out}");
    assert!(!out.contains("echo listening"), "{out}");

    // A missing program is a shell-like 127; killed by a signal is 128 + signal.
    write_deadline(&file, 30_000);
    let (code, _, _) = finish(&file, guard(&file, &[], &["/nonexistent/app"]), Duration::from_secs(5));
    assert_eq!(code, 127);
    let (code, _, _) = finish(&file, guard(&file, &[], &["/bin/sh", "-c", "kill -KILL $$"]), Duration::from_secs(5));
    assert_eq!(code, 128 + 9);
}

/// Builds `tag` from a Dockerfile and files (path in context, source path).
fn build(images: &mut RemoveImages, tag: &str, dockerfile: &str, files: &[(&str, &Path)]) {
    let dir = tempfile::tempdir().unwrap();
    for (name, source) in files {
        let target = dir.path().join(name);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(source, &target).unwrap_or_else(|e| panic!("copy {}: {e}", source.display()));
    }
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
    let mut args = vec!["build", "-q", "-t", tag];
    let context = dir.path().to_str().unwrap().to_string();
    args.push(&context);
    images.0.push(tag.to_string());
    docker(&args);
}

/// Loads an image whose config says `arch` (the classic builder ignores `--platform` for
/// FROM scratch, and nothing can be pulled): a hand-made `docker save` archive with one
/// tiny layer. It is never run; only its metadata matters.
fn load_foreign_image(images: &mut RemoveImages, tag: &str, arch: &str) {
    use sha2::Digest;
    let layer = tar_of(&[("app", b"not a program")], 0o755);
    let diff_id = format!("sha256:{:x}", sha2::Sha256::digest(&layer));
    let config = serde_json::json!({
        "architecture": arch, "os": "linux",
        "config": {"Entrypoint": ["/app"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    })
    .to_string();
    let manifest =
        serde_json::json!([{"Config": "config.json", "RepoTags": [tag], "Layers": ["layer.tar"]}]).to_string();
    let archive = tar_of(
        &[("layer.tar", &layer), ("config.json", config.as_bytes()), ("manifest.json", manifest.as_bytes())],
        0o755,
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), archive).unwrap();
    images.0.push(tag.to_string());
    docker(&["load", "-q", "-i", file.path().to_str().unwrap()]);
    assert_eq!(docker(&["image", "inspect", "--format", "{{.Architecture}}", tag]), arch);
}

fn spec(name: &str, image: &str, command: &[&str], deadline_in_ms: u64) -> ContainerSpec {
    ContainerSpec {
        name: name.to_string(),
        image: image.to_string(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        ports: Vec::new(),
        cpu_millis: 0,
        memory_mb: 64,
        labels: BTreeMap::from([(labels::TASK.to_string(), name.to_string())]),
        guard: Some(GuardSpec { deadline: Deadline { at_boot_ms: boottime_ms() + deadline_in_ms, grace_ms: 2_000 } }),
    }
}

/// Removes the named containers when the test ends.
struct Containers(Vec<String>);

impl Drop for Containers {
    fn drop(&mut self) {
        for c in &self.0 {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
    }
}

/// Waits until the container exits; returns its exit code and how long that took.
async fn exit_of(rt: &DockerRuntime, id: &str, within: Duration) -> (i64, Duration) {
    let started = Instant::now();
    loop {
        if let Some(ContainerState::Exited { code }) = rt.inspect(id).await.expect("inspect").map(|i| i.state) {
            return (code, started.elapsed());
        }
        assert!(started.elapsed() < within, "container {id} still running after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_containers_run_any_entrypoint_shape_and_fence_on_their_deadline() {
    require_docker();
    let bin = holdfast_bin();
    let key = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let tag = |kind: &str| format!("holdfast-test/guard-{kind}:{key}");
    let mut images = RemoveImages(Vec::new());
    let app: &[(&str, &Path)] = &[("app", bin.as_path())];
    build(&mut images, &tag("entry"), "FROM scratch\nCOPY app /app\nENTRYPOINT [\"/app\", \"echo\"]\n", app);
    build(&mut images, &tag("cmd"), "FROM scratch\nCOPY app /app\nCMD [\"/app\", \"echo\"]\n", app);
    build(
        &mut images,
        &tag("both"),
        "FROM scratch\nCOPY app /app\nENTRYPOINT [\"/app\"]\nCMD [\"echo\", \"--exit-after\", \"300ms\", \"--exit-code\", \"4\"]\n",
        app,
    );
    build(&mut images, &tag("none"), "FROM scratch\nCOPY app /app\n", app);
    load_foreign_image(&mut images, &tag("arm"), "arm64");
    // A shell-script ENTRYPOINT: no shell image can be pulled here, so this one carries
    // the host's dash and the two libraries it links against.
    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), "#!/bin/sh\necho \"script entrypoint: $*\"\nexec /app \"$@\"\n").unwrap();
    // The build keeps the file's mode (the copy keeps the temp file's 0600).
    std::fs::set_permissions(script.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let shell_files: &[(&str, &Path)] = &[
        ("app", bin.as_path()),
        ("entry.sh", script.path()),
        ("sh", Path::new("/bin/dash")),
        ("libc.so.6", Path::new("/lib/x86_64-linux-gnu/libc.so.6")),
        ("ld.so", Path::new("/lib64/ld-linux-x86-64.so.2")),
    ];
    build(
        &mut images,
        &tag("shell"),
        "FROM scratch\nCOPY app /app\nCOPY sh /bin/sh\nCOPY libc.so.6 /lib/x86_64-linux-gnu/libc.so.6\n\
         COPY ld.so /lib64/ld-linux-x86-64.so.2\nCOPY entry.sh /entry.sh\nENTRYPOINT [\"/entry.sh\"]\nCMD [\"echo\"]\n",
        shell_files,
    );

    let rt = DockerRuntime::connect_with(DockerConfig { self_binary: bin.clone(), ..Default::default() })
        .await
        .expect("docker");
    let name = |kind: &str| format!("hf-test-guard-{kind}-{key}");
    let _containers = Containers(
        ["entry", "cmd", "both", "both-cmd", "shell", "none", "arm", "fence", "renew"]
            .iter()
            .map(|k| name(k))
            .collect(),
    );
    let listen = ["echo", "--listen", "0.0.0.0:7777"];

    // ENTRYPOINT only, with the task's command as its arguments: runs until stopped;
    // `docker stop` (SIGTERM to the guard) reaches the app, which ends well within its grace.
    let info =
        rt.create_and_start(&spec(&name("entry"), &tag("entry"), &["--listen", "0.0.0.0:7777"], 60_000)).await.unwrap();
    assert_eq!(info.state, ContainerState::Running);
    let logs_have = |id: String, text: &'static str| {
        let rt = &rt;
        async move {
            eventually(Duration::from_secs(10), &format!("{text:?} in the logs"), || async {
                let logs = rt.logs(&id, 100).await.unwrap_or_default();
                if logs.contains(text) {
                    Ok(logs)
                } else {
                    Err(logs)
                }
            })
            .await
        }
    };
    logs_have(info.id.clone(), "echo listening").await;
    let stop_started = Instant::now();
    rt.stop(&info.id, Duration::from_secs(10)).await.unwrap();
    let stop_took = stop_started.elapsed();
    let (code, _) = exit_of(&rt, &info.id, Duration::from_secs(5)).await;
    assert_eq!(code, 0, "SIGTERM reached the app, which exited cleanly");
    assert!(stop_took < Duration::from_secs(3), "stop took {stop_took:?} (grace 10 s)");
    let logs = logs_have(info.id.clone(), "echo stopping").await;
    assert!(!logs.contains("holdfast guard"), "the guard adds nothing to the logs: {logs}");

    // CMD only: the image's CMD is the app.
    let info = rt.create_and_start(&spec(&name("cmd"), &tag("cmd"), &[], 60_000)).await.unwrap();
    logs_have(info.id.clone(), "echo listening").await;
    rt.stop(&info.id, Duration::from_secs(10)).await.unwrap();

    // Both: the image's CMD's exit code passes through; a task command replaces CMD.
    let info = rt.create_and_start(&spec(&name("both"), &tag("both"), &[], 60_000)).await.unwrap();
    assert_eq!(exit_of(&rt, &info.id, Duration::from_secs(10)).await.0, 4);
    let command = ["echo", "--exit-after", "200ms", "--exit-code", "9"];
    let info = rt.create_and_start(&spec(&name("both-cmd"), &tag("both"), &command, 60_000)).await.unwrap();
    assert_eq!(exit_of(&rt, &info.id, Duration::from_secs(10)).await.0, 9);

    // A shell-script ENTRYPOINT runs through the image's own shell, CMD as its arguments.
    let info = rt.create_and_start(&spec(&name("shell"), &tag("shell"), &listen[..1], 60_000)).await.unwrap();
    let logs = logs_have(info.id.clone(), "echo listening").await;
    assert!(logs.contains("script entrypoint: echo"), "{logs}");
    rt.stop(&info.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(exit_of(&rt, &info.id, Duration::from_secs(5)).await.0, 0);

    // Bad images are refused before any container exists.
    for (kind, why) in [("none", "no ENTRYPOINT and no CMD"), ("arm", "is built for arm64")] {
        match rt.create_and_start(&spec(&name(kind), &tag(kind), &[], 60_000)).await {
            Err(RuntimeError::Rejected(reason)) => assert!(reason.contains(why), "{kind}: {reason}"),
            other => panic!("{kind}: expected a refusal, got {other:?}"),
        }
        assert!(rt.inspect(&name(kind)).await.unwrap().is_none(), "{kind}: nothing was created");
    }

    // The deadline passes: the guard stops the app and exits with the fence code.
    let info = rt.create_and_start(&spec(&name("fence"), &tag("entry"), &listen[1..], 1_500)).await.unwrap();
    let (code, took) = exit_of(&rt, &info.id, Duration::from_secs(10)).await;
    assert_eq!(code, i64::from(FENCED_EXIT));
    assert!(took < Duration::from_millis(3_000), "fenced {took:?} after start (deadline 1.5 s)");
    let logs = logs_have(info.id.clone(), "lease deadline passed").await;
    assert!(logs.contains("echo stopping"), "SIGTERM first: {logs}");

    // Renewals through the engine move the deadline; without them it passes.
    let info = rt.create_and_start(&spec(&name("renew"), &tag("entry"), &listen[1..], 2_000)).await.unwrap();
    let renewing = Instant::now();
    while renewing.elapsed() < Duration::from_secs(4) {
        rt.set_deadline(&info.id, Deadline { at_boot_ms: boottime_ms() + 2_000, grace_ms: 2_000 }).await.unwrap();
        assert_eq!(rt.inspect(&info.id).await.unwrap().map(|i| i.state), Some(ContainerState::Running));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (code, took) = exit_of(&rt, &info.id, Duration::from_secs(10)).await;
    assert_eq!(code, i64::from(FENCED_EXIT));
    assert!(took < Duration::from_secs(5), "{took:?}");

    // A fenced container starts again only with a fresh deadline.
    rt.set_deadline(&info.id, Deadline { at_boot_ms: boottime_ms() + 60_000, grace_ms: 2_000 }).await.unwrap();
    assert_eq!(rt.start(&info.id).await.unwrap().state, ContainerState::Running);
    rt.stop(&info.id, Duration::from_secs(10)).await.unwrap();
}
