//! Multi-host fault tests: holdfast managers and workers as containers on their own
//! Docker network, cut apart while they run real tasks (README "When the managers are
//! out of reach", ARCHITECTURE.md "Invariants").
//!
//! Each test builds its own cluster (random names and subnet, so tests run in parallel
//! and reruns never collide) and prints a `FIGURES` line with what it measured; run
//! with `--nocapture` to see them. Timers are the product defaults (lease 30 s,
//! heartbeat TTL 5 s); tasks choose small `offline.lost_after_ms` values.

#[path = "multihost/cluster.rs"]
mod cluster;
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster::{inspect, task_containers, Cluster, EchoProbe, Node, Sampler};
use common::{eventually, http};
use serde_json::{json, Value};

/// How long every manager stays down in the outage scenario (the issue asks for two
/// minutes: four lease lengths, so the workers run well past their authority).
const MANAGER_OUTAGE: Duration = Duration::from_secs(120);
/// The outage during which a worker restarts and statuses are buffered: long enough
/// for the crash loop to play out around a worker restart.
const BUFFERED_OUTAGE: Duration = Duration::from_secs(40);
/// Bound on a fresh task reaching `running` (the first placement on a worker builds
/// the echo image from its binary).
const FIRST_RUN: Duration = Duration::from_secs(90);
/// Bound on statuses converging once the fault is healed.
const CONVERGE: Duration = Duration::from_secs(90);

fn echo_service(offline: Option<Value>) -> Value {
    let mut spec = json!({"image": "holdfast/echo:latest", "ports": [{"container": 7777}]});
    if let Some(o) = offline {
        spec["offline"] = o;
    }
    spec
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The task's current placement (the highest fence).
fn current(t: &Value) -> &Value {
    t["placements"].as_array().and_then(|ps| ps.iter().find(|p| p["current"] == true)).unwrap_or(&Value::Null)
}

/// A placement by fence.
fn by_fence(t: &Value, fence: u64) -> &Value {
    t["placements"].as_array().and_then(|ps| ps.iter().find(|p| p["fence"] == fence)).unwrap_or(&Value::Null)
}

fn str_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The `what` of a placement's events, in order.
fn events(p: &Value) -> Vec<String> {
    p["events"].as_array().map(|es| es.iter().map(|e| str_of(&e["what"])).collect()).unwrap_or_default()
}

fn count(p: &Value, what: &str) -> usize {
    events(p).iter().filter(|w| *w == what).count()
}

/// Waits until the echo endpoint answers a POST with its body.
async fn echo_answers(endpoint: &str) {
    eventually(Duration::from_secs(20), "the echo endpoint to answer", || async {
        let r = http().post(format!("http://{endpoint}/")).body("hello").send().await.map_err(|e| e.to_string())?;
        let text = r.text().await.map_err(|e| e.to_string())?;
        (text == "hello").then_some(()).ok_or(format!("answered {text:?}"))
    })
    .await
}

/// Running container ids of a task, by the engine.
async fn running_containers(task: &str) -> Vec<String> {
    let mut out = Vec::new();
    for id in task_containers(task).await.into_keys() {
        if inspect(&id).await.is_some_and(|s| s.status == "running") {
            out.push(id);
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_gone_work_goes_on() {
    let c = Cluster::start(3, 2).await;
    let svc = c.submit(echo_service(None)).await;
    let batch = c
        .submit(json!({"image": "holdfast/echo:latest", "kind": "batch",
                       "command": ["echo", "--listen", "0.0.0.0:7777", "--exit-after", "20s"]}))
        .await;
    let s = c.wait_state(&svc, "running", FIRST_RUN).await;
    let b = c.wait_state(&batch, "running", FIRST_RUN).await;
    let endpoint = str_of(&s["endpoints"][0]);
    let (svc_cid, batch_cid) = (str_of(&current(&s)["container_id"]), str_of(&current(&b)["container_id"]));
    echo_answers(&endpoint).await;

    let sampler = Sampler::start(&svc).await;
    let probe = EchoProbe::start(&endpoint, Duration::from_millis(250));
    c.all_managers(|m| c.stop(m)).await;
    let down = Instant::now();
    assert!(
        inspect(&batch_cid).await.is_some_and(|s| s.status == "running"),
        "the batch task must still run when the outage begins, or the scenario proves nothing"
    );

    let exited = eventually(MANAGER_OUTAGE, "the batch container to exit during the outage", || async {
        let st = inspect(&batch_cid).await.ok_or("batch container gone")?;
        (st.status == "exited").then_some(st.clone()).ok_or(format!("{st:?}"))
    })
    .await;
    let batch_exit_after = down.elapsed();
    assert_eq!(exited.exit_code, 0, "batch container exit code");
    // The outage lasts its full length on purpose: the claim is about what keeps
    // happening meanwhile, not about a condition to wait for.
    tokio::time::sleep_until((down + MANAGER_OUTAGE).into()).await;
    for m in &c.managers {
        let st = inspect(&m.container).await.map(|s| s.status);
        assert_eq!(st.as_deref(), Some("exited"), "manager {} stayed down through the outage", m.id);
    }
    let outage_end = Instant::now();

    c.all_managers(|m| c.start_node(m)).await;
    let back = Instant::now();
    let (s, b) = eventually(CONVERGE, "statuses to converge after the managers return", || async {
        let s = c.task(&svc).await.ok_or("no manager answers")?;
        let b = c.task(&batch).await.ok_or("no manager answers")?;
        let ready = c.workers_ready().await;
        if s["state"] == "running" && b["state"] == "completed" && ready {
            Ok((s, b))
        } else {
            let nodes = c.get_from_leader("/v1/nodes").await.unwrap_or_default();
            Err(format!("service {}, batch {}, workers ready {ready}; nodes {nodes}", s["state"], b["state"]))
        }
    })
    .await;
    let converged = back.elapsed();
    let probes = probe.finish().await;
    let samples = sampler.finish().await;

    assert_eq!(current(&s)["container_id"], json!(svc_cid), "the service kept its container: {s:#}");
    assert_eq!(s["placements"].as_array().map(Vec::len), Some(1), "no replacement: {s:#}");
    assert_eq!(s["restarts"], 0, "{s:#}");
    assert_eq!(b["exit_code"], 0, "{b:#}");
    assert_eq!(current(&b)["container_id"], json!(batch_cid), "{b:#}");
    assert_eq!(b["placements"].as_array().map(Vec::len), Some(1), "the batch ran once: {b:#}");

    let in_outage = |at: Instant| at >= down && at <= outage_end;
    let outage_probes: Vec<_> = probes.iter().filter(|(at, _)| in_outage(*at)).collect();
    let outage_failed: Vec<_> = outage_probes.iter().filter(|(_, r)| r.is_err()).collect();
    let all_failed = probes.iter().filter(|(_, r)| r.is_err()).count();
    let polls = samples.count_between(down, outage_end);
    let (min, max) = (samples.min_between(down, outage_end), samples.max_between(down, outage_end));
    eprintln!(
        "FIGURES managers_gone_work_goes_on: outage {:?}; tasks kept running 2/2 (service: {min}..={max} copies in \
         {polls} polls, {} poll errors; batch exited 0 after {:.1?} of outage); echo answers failed {}/{} during the \
         outage, {all_failed}/{} overall; managers back to converged {:.1?}",
        outage_end - down,
        samples.failed_polls,
        batch_exit_after,
        outage_failed.len(),
        outage_probes.len(),
        probes.len(),
        converged,
    );
    assert!(outage_probes.len() > 100, "too few probes to judge: {}", outage_probes.len());
    let failed_at: Vec<_> = outage_failed.iter().map(|(at, r)| (at.duration_since(down), r)).take(5).collect();
    assert!(
        outage_failed.is_empty(),
        "echo failed during the outage (time since the outage began, error): {failed_at:?}"
    );
    assert_eq!(all_failed, 0, "echo failed while managers came back");
    assert_eq!((min, max), (1, 1), "exactly one service copy ran throughout the outage");
    assert_eq!(samples.max_running(), 1);
}

/// What a partition test measured.
struct Partition {
    /// Cut → node marked disconnected.
    disconnected_after: Duration,
    /// Cut → replacement running.
    replaced_after: Duration,
    /// Node marked disconnected → replacement placed, by the manager's clock.
    placed_after_silent_ms: u64,
    /// Reconnect → one copy, manager agrees.
    converged_after: Duration,
    /// Most copies running while cut off (polls, and engine events).
    max_while_cut: (usize, usize),
    /// Most copies running after convergence.
    max_after: usize,
    /// Cut → the old copy seen running for the last time.
    old_last_running: Option<Duration>,
    /// Replacement first seen running minus old copy last seen running (positive =
    /// a gap without a copy, negative = an overlap).
    handover_ms: Option<i128>,
    /// How the old copy ended, by the engine's record and its guard's deadline.
    old_stop: String,
    /// Times the engine started the old container after the cut (`start` events).
    old_started_after_cut: usize,
    /// What the engine, the old copy and the cut-off worker said (bounded), to tell a
    /// failure's cause.
    forensics: String,
}

/// The evidence of a partition test, relative to the cut: enough to tell a copy that
/// really ran too long (or ran again) from an engine slow to report its exit.
struct Forensics {
    /// The cut, Unix ms.
    cut_ms: u64,
    /// The cut, `CLOCK_BOOTTIME` ms (the guard's clock).
    cut_boot_ms: u64,
    /// Cut → reconnect.
    healed_after: Duration,
    /// Old container and its engine record just before the heal.
    old: (String, Option<cluster::EngineRecord>),
    /// New container and its engine record at the end.
    new: (String, Option<cluster::EngineRecord>),
    /// The old copy's guard deadline file just before the heal.
    old_deadline: Option<String>,
    /// The old copy's output since shortly before the cut (the guard says when it fences).
    old_log: String,
    /// Engine events of both containers.
    events: String,
    /// The cut-off worker.
    worker: String,
    /// Its log since shortly before the cut.
    worker_log: String,
}

impl Forensics {
    /// `t` (Unix ms) as signed ms after the cut.
    fn rel(&self, ms: Option<u64>) -> String {
        ms.map_or("-".to_string(), |t| format!("{:+}", t as i128 - self.cut_ms as i128))
    }

    /// The guard deadline file, with its instant as ms after the cut.
    fn deadline(&self) -> String {
        match &self.old_deadline {
            None => "unreadable".to_string(),
            Some(line) => {
                let at = line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok());
                let rel = at.map_or("?".into(), |a| format!("{:+}", a as i128 - self.cut_boot_ms as i128));
                format!("{line:?} = {rel} ms after the cut")
            }
        }
    }

    /// One line: how the old copy ended (ms after the cut).
    fn summary(&self) -> String {
        match &self.old.1 {
            None => "gone before the heal".to_string(),
            Some(r) => format!(
                "{} before the heal, exit {}, finished {} ms after the cut by the engine; guard deadline {}",
                r.status,
                r.exit_code,
                self.rel(r.finished_ms),
                self.deadline()
            ),
        }
    }
}

/// Consecutive log lines that say the same thing (the two leading timestamps aside)
/// as one line with a count.
fn collapse_repeats<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    let body = |l: &'a str| l.splitn(3, ' ').nth(2).unwrap_or(l);
    let mut out: Vec<(String, &'a str, usize)> = Vec::new();
    for l in lines {
        match out.last_mut() {
            Some((_, b, n)) if *b == body(l) => *n += 1,
            _ => out.push((l.to_string(), body(l), 1)),
        }
    }
    out.into_iter().map(|(l, _, n)| if n > 1 { format!("{l} (x{n})") } else { l }).collect()
}

impl std::fmt::Display for Forensics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rel = |ms: Option<u64>| self.rel(ms);
        let rec = |r: &Option<cluster::EngineRecord>| match r {
            None => "gone".to_string(),
            Some(r) => format!(
                "{} (exit {}), created {} ms, last started {} ms, last finished {} ms",
                r.status,
                r.exit_code,
                rel(r.created_ms),
                rel(r.started_ms),
                rel(r.finished_ms)
            ),
        };
        let deadline = self.deadline();
        let keep =
            ["WARN", "ERROR", "lease", "suspend", "resum", "fence", "guard", "deadline", "stop", "start", "engine"];
        let worker = collapse_repeats(self.worker_log.lines().filter(|l| keep.iter().any(|k| l.contains(k))));
        writeln!(f, "evidence (times in ms after the cut; reconnected after {:.1?}):", self.healed_after)?;
        writeln!(f, "  old {}: before the heal {}", self.old.0, rec(&self.old.1))?;
        writeln!(f, "  old guard deadline: {deadline}")?;
        writeln!(f, "  old copy's output:\n{}", cluster::bounded_lines(self.old_log.lines(), 12, 200))?;
        writeln!(f, "  new {}: {}", self.new.0, rec(&self.new.1))?;
        writeln!(f, "  engine events:\n{}", self.events)?;
        write!(
            f,
            "  cut-off worker {}'s log:\n{}",
            self.worker,
            cluster::bounded_lines(worker.iter().map(String::as_str), 40, 240)
        )
    }
}

/// Runs an echo service with `offline`, cuts its worker off the network, waits for the
/// replacement on the other worker, reconnects, and waits for exactly one copy.
/// Returns the cluster too, so assertions run while it stands (its logs are printed
/// if one fails).
async fn partition_and_heal(
    offline: Value,
    replace_within: Duration,
    label: &str,
) -> (Cluster, Partition, cluster::Samples) {
    let c = Cluster::start(3, 2).await;
    let id = c.submit(echo_service(Some(offline))).await;
    let t = c.wait_state(&id, "running", FIRST_RUN).await;
    let old = current(&t).clone();
    let (old_fence, old_cid) = (old["fence"].as_u64().unwrap(), str_of(&old["container_id"]));
    let cut: Node = c.worker(old["node"].as_str().unwrap()).clone();
    let other = c.workers.iter().find(|w| w.id != cut.id).unwrap().clone();

    let sampler = Sampler::start(&id).await;
    // A few polls of the steady state before the cut.
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.disconnect(&cut).await;
    let cut_at = Instant::now();
    // The same instant on the clocks the engine (wall) and the guard (boot) keep.
    let (cut_ms, cut_boot_ms) = (wall_ms(), holdfast::guard::boottime_ms());
    eventually(Duration::from_secs(30), "the cut-off node to be marked disconnected", || async {
        let st = c.node_status(&cut.id).await.ok_or("no manager answers")?;
        (st == "disconnected").then_some(()).ok_or(st)
    })
    .await;
    let disconnected_after = cut_at.elapsed();
    let t = c
        .wait_task(&id, replace_within, "to run a replacement on the other worker", |t| {
            let p = current(t);
            p["fence"].as_u64() > Some(old_fence) && p["node"] == other.id.as_str() && p["observed"] == "running"
        })
        .await;
    let replaced_after = cut_at.elapsed();
    let new = current(&t).clone();
    let new_cid = str_of(&new["container_id"]);
    // How long the manager let the silent node hold the task before placing a
    // replacement, by its own clock: from the committed `disconnected` to the new
    // placement's creation.
    let node = c.get(&format!("/v1/nodes/{}", cut.id)).await.expect("node view");
    let silent_since = node["events"]
        .as_array()
        .and_then(|es| es.iter().rev().find(|e| e["what"] == "disconnected"))
        .and_then(|e| e["at_ms"].as_u64())
        .unwrap_or_else(|| panic!("no disconnected event for {}: {node:#}", cut.id));
    let placed_after_silent_ms = new["created_ms"].as_u64().unwrap().saturating_sub(silent_since);
    let old_seen = by_fence(&t, old_fence);
    let old_view_while_cut = format!("desired {} observed {}", old_seen["desired"], old_seen["observed"]);
    let cut_off_for = cut_at.elapsed();
    // Let the poller see the state the partition settled in before healing it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What the engine and the old copy itself say, before the heal removes the old
    // container (read for the report only; the assertions use the samples).
    let old_before_heal = cluster::engine_record(&old_cid).await;
    let old_deadline = cluster::deadline_file(&old_cid).await;
    let old_log = cluster::logs_since(&old_cid, cut_ms / 1_000 - 5).await;
    c.connect(&cut).await;
    let healed = Instant::now();
    let new_fence = new["fence"].as_u64().unwrap();
    eventually(CONVERGE, "exactly one copy after the reconnect", || async {
        let running = running_containers(&id).await;
        if running != vec![new_cid.clone()] {
            return Err(format!("running {running:?}, want only {new_cid}"));
        }
        if let Some(st) = inspect(&old_cid).await {
            return Err(format!("old container still exists: {st:?}"));
        }
        let t = c.task(&id).await.ok_or("no manager answers")?;
        let (oldp, cur) = (by_fence(&t, old_fence), current(&t));
        let ok = t["state"] == "running"
            && cur["fence"] == new_fence
            && oldp["desired"] == "stop"
            && oldp["observed"] == "stopped"
            && count(oldp, "replaced") == 1
            && c.workers_ready().await;
        ok.then_some(()).ok_or(format!("task {t:#}"))
    })
    .await;
    let converged_after = healed.elapsed();
    let converged_at = Instant::now();
    // A second of polls after convergence shows the one copy stays one.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = sampler.finish().await;
    let new_record = cluster::engine_record(&new_cid).await;
    let worker_log = cluster::logs_since(&cut.container, cut_ms / 1_000 - 2).await;
    let evidence = Forensics {
        cut_ms,
        cut_boot_ms,
        healed_after: healed - cut_at,
        old: (old_cid.clone(), old_before_heal),
        new: (new_cid.clone(), new_record),
        old_deadline,
        old_log,
        events: samples.events_of(&[("old", old_cid.as_str()), ("new", new_cid.as_str())], cut_ms, 40),
        worker: cut.id.clone(),
        worker_log,
    };
    let (old_stop, forensics) = (evidence.summary(), evidence.to_string());
    let cut_window = (cut_at, cut_at + cut_off_for);
    let last_old =
        samples.samples.iter().filter(|s| s.running.iter().any(|r| r.container == old_cid)).map(|s| s.at).max();
    let first_new =
        samples.samples.iter().filter(|s| s.running.iter().any(|r| r.container == new_cid)).map(|s| s.at).min();
    let handover_ms = match (last_old, first_new) {
        (Some(o), Some(n)) if n >= o => Some((n - o).as_millis() as i128),
        (Some(o), Some(n)) => Some(-((o - n).as_millis() as i128)),
        _ => None,
    };
    let p = Partition {
        disconnected_after,
        replaced_after,
        placed_after_silent_ms,
        converged_after,
        max_while_cut: (samples.max_between(cut_window.0, healed), samples.max_running_by_events()),
        max_after: samples.max_between(converged_at, Instant::now()),
        old_last_running: last_old.map(|o| o.saturating_duration_since(cut_at)),
        handover_ms,
        old_started_after_cut: samples
            .events
            .iter()
            .filter(|(ns, action, id)| *id == old_cid && action == "start" && *ns / 1_000_000 >= cut_ms)
            .count(),
        old_stop,
        forensics,
    };
    eprintln!(
        "FIGURES {label}: disconnected after {:.1?}, replacement placed {} ms after the node was marked \
         disconnected and running {:.1?} after the cut (old fence {old_fence} on {}, new fence {new_fence} on {}); \
         old placement while cut off: {old_view_while_cut}; copies while cut off: max {} by polls, {} by \
         engine events over the whole test; old copy last seen running {:.1?} after the cut; handover {:?} ms \
         (negative = overlap); reconnect to converged {:.1?}; copies after converge: {}; distinct copies seen \
         {}; {} polls, {} poll errors",
        p.disconnected_after,
        p.placed_after_silent_ms,
        p.replaced_after,
        cut.id,
        other.id,
        p.max_while_cut.0,
        p.max_while_cut.1,
        p.old_last_running,
        p.handover_ms,
        p.converged_after,
        p.max_after,
        samples.copies().len(),
        samples.samples.len(),
        samples.failed_polls,
    );
    (c, p, samples)
}

/// A manager cut off by a real partition (`docker network disconnect`) runs out of its
/// leader's lease and asks the others for a pre-vote, which they refuse while their
/// leader lives: it never takes a new term, so when it is connected again the leader
/// stays and nobody's term moves (ARCHITECTURE.md, "Decisions").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_cut_off_and_back_does_not_unseat_the_leader() {
    let c = Cluster::start(3, 0).await;
    let before = eventually(Duration::from_secs(30), "a leader known to every manager", || async {
        let mut seen = Vec::new();
        for i in 0..c.managers.len() {
            let v = c.get_at(i, "/v1/cluster").await.ok_or(format!("m{} did not answer", i + 1))?;
            seen.push((str_of(&v["leader"]["id"]), v["term"].as_u64().unwrap_or(0)));
        }
        let agreed = seen.iter().all(|s| *s == seen[0] && !s.0.is_empty());
        agreed.then(|| seen[0].clone()).ok_or(format!("{seen:?}"))
    })
    .await;
    let (leader, term) = before;
    let cut = c.managers.iter().position(|m| m.id != leader).expect("a follower");
    c.disconnect(&c.managers[cut]).await;
    let cut_at = Instant::now();

    // Well past the lease (0.45 s) and several pre-vote rounds (0.3–0.45 s each): a
    // member without the pre-vote takes a new term within about a second.
    while cut_at.elapsed() < Duration::from_secs(5) {
        for i in (0..c.managers.len()).filter(|i| *i != cut) {
            if let Some(v) = c.get_at(i, "/v1/cluster").await {
                assert_eq!(v["term"].as_u64(), Some(term), "m{} changed term while m{} was cut off", i + 1, cut + 1);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = c.submit(json!({"image": "holdfast/echo:latest", "name": "while-cut"})).await;

    let cut_for = cut_at.elapsed();
    c.connect(&c.managers[cut]).await;
    // Back: it catches up with the same leader, in the same term, and sees the task.
    eventually(Duration::from_secs(30), "the cut-off manager to catch up", || async {
        let v = c.get_at(cut, "/v1/cluster").await.ok_or("no answer")?;
        let lv = c.get_from_leader("/v1/cluster").await.ok_or("no leader answer")?;
        let caught_up =
            v["last_applied"].as_u64() >= lv["commit_index"].as_u64() && str_of(&v["leader"]["id"]) == leader;
        caught_up.then_some(()).ok_or(format!("cut-off: {v}"))
    })
    .await;
    for i in 0..c.managers.len() {
        let v = c.get_at(i, "/v1/cluster").await.expect("answer");
        assert_eq!((str_of(&v["leader"]["id"]), v["term"].as_u64()), (leader.clone(), Some(term)), "m{}", i + 1);
    }
    assert!(c.get_at(cut, &format!("/v1/tasks/{id}")).await.is_some(), "the task written meanwhile reached it");
    println!("FIGURES pre-vote: m{} cut off for {cut_for:.1?}; leader {leader} and term {term} unchanged", cut + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_worker_keeps_its_copy_replacement_runs_reconnect_converges() {
    let (_cluster, p, samples) = partition_and_heal(
        json!({"mode": "keep", "lost_after_ms": 3000, "replace": true}),
        Duration::from_secs(60),
        "keep_partition",
    )
    .await;
    // By design of `keep`: the cut-off copy keeps serving while the replacement runs.
    assert!(p.placed_after_silent_ms >= 3_000, "replaced before lost_after_ms: {}", p.placed_after_silent_ms);
    assert_eq!(p.max_while_cut.0, 2, "mode keep: both copies run while cut off");
    assert_eq!(p.max_after, 1, "exactly one copy after converging");
    assert!(samples.max_running() <= 2, "never more than the two known copies");
    assert!(p.handover_ms.is_some_and(|h| h < 0), "the old copy ran on after the replacement started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_task_never_overlaps() {
    // The manager waits lease (30 s) + heartbeat TTL (5 s) after the node goes silent
    // before replacing an exclusive task; the worker stops it when its lease ends.
    let (_cluster, p, samples) = partition_and_heal(
        json!({"mode": "exclusive", "lost_after_ms": 3000, "replace": true}),
        Duration::from_secs(90),
        "exclusive_partition",
    )
    .await;
    eprintln!("FIGURES exclusive_partition, old copy: {}", p.old_stop);
    // Lease 30 s + heartbeat TTL 5 s (ManagerSettings defaults): never earlier.
    assert!(p.placed_after_silent_ms >= 35_000, "exclusive replaced too early: {}", p.placed_after_silent_ms);
    assert_eq!(
        samples.max_running(),
        1,
        "exclusive: two copies overlapped (old copy last seen running {:?} after the cut, replacement running {:?} \
         after it; handover {:?} ms)\n{}",
        p.old_last_running,
        p.replaced_after,
        p.handover_ms,
        p.forensics,
    );
    assert!(
        samples.max_running_by_events() <= 1,
        "exclusive: engine events show two copies running at once\n{}",
        p.forensics
    );
    // Replaced while cut off, the old copy never had authority again: it must never be
    // started again, however briefly (a start shorter than a poll is still a copy).
    assert_eq!(p.old_started_after_cut, 0, "exclusive: the replaced copy was started again\n{}", p.forensics);
    assert_eq!(p.max_after, 1);
}

/// The worker's container is paused (`docker pause`: the process freezes, its engine
/// socket stays open) while its `exclusive` task runs on the host engine: only the guard
/// inside the task's container can stop it before the manager places a replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_worker_exclusive_task_is_fenced_by_its_guard() {
    let c = Cluster::start(1, 2).await;
    let id = c.submit(echo_service(Some(json!({"mode": "exclusive", "lost_after_ms": 1000})))).await;
    let t = c.wait_state(&id, "running", FIRST_RUN).await;
    let old = current(&t).clone();
    let (old_fence, old_cid) = (old["fence"].as_u64().unwrap(), str_of(&old["container_id"]));
    let paused: Node = c.worker(old["node"].as_str().unwrap()).clone();
    let other = c.workers.iter().find(|w| w.id != paused.id).unwrap().clone();

    let sampler = Sampler::start(&id).await;
    c.pause(&paused).await;
    let paused_at = Instant::now();
    let fenced_after = eventually(Duration::from_secs(60), "the guard to stop the old copy", || async {
        let st = inspect(&old_cid).await.ok_or_else(|| "old container gone".to_string())?;
        (st.status == "exited").then(|| (paused_at.elapsed(), st.exit_code)).ok_or(st.status)
    })
    .await;
    let t = c
        .wait_task(&id, Duration::from_secs(90), "to run a replacement on the other worker", |t| {
            let p = current(t);
            p["fence"].as_u64() > Some(old_fence) && p["node"] == other.id.as_str() && p["observed"] == "running"
        })
        .await;
    let replaced_after = paused_at.elapsed();
    let new_cid = str_of(&current(&t)["container_id"]);
    let samples = sampler.finish().await;
    c.unpause(&paused).await;
    let story = "fenced: lease expired while the worker was not running";
    eventually(CONVERGE, "the fence in the history and the old container removed", || async {
        let t = c.task(&id).await.ok_or("no manager answers")?;
        let oldp = by_fence(&t, old_fence);
        let told = oldp["events"].as_array().is_some_and(|es| es.iter().any(|e| e["detail"] == story));
        let gone = inspect(&old_cid).await.is_none();
        (told && gone && t["state"] == "running").then_some(()).ok_or(format!("task {t:#}"))
    })
    .await;
    eprintln!(
        "FIGURES paused_worker_exclusive: guard stopped the old copy {:.1?} after the pause (exit {}), replacement \
         running {replaced_after:.1?} after it; copies: max {} by polls, {} by events; {} polls",
        fenced_after.0,
        fenced_after.1,
        samples.max_running(),
        samples.max_running_by_events(),
        samples.samples.len(),
    );
    assert_eq!(fenced_after.1, 213, "the guard's fence code");
    assert_eq!(samples.max_running(), 1, "never two copies (polls): {:?}", samples.copies());
    assert!(samples.max_running_by_events() <= 1, "never two copies (engine events)");
    let at = |action: &str, cid: &str| samples.events.iter().find(|(_, a, c)| a == action && c == cid).map(|e| e.0);
    assert!(at("die", &old_cid) < at("start", &new_cid) && at("die", &old_cid).is_some(), "{:?}", samples.events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_restart_and_buffered_statuses_during_outage() {
    let c = Cluster::start(3, 2).await;
    let svc = c.submit(echo_service(None)).await;
    let batch = c
        .submit(json!({"image": "holdfast/echo:latest", "kind": "batch",
                       "command": ["echo", "--listen", "0.0.0.0:7777", "--exit-after", "15s"]}))
        .await;
    c.wait_state(&svc, "running", FIRST_RUN).await;
    c.wait_state(&batch, "running", FIRST_RUN).await;
    // Each run lasts 4 s: room to pause every manager between the first `running` and
    // the first crash, so the restarts and the final failure happen in the outage.
    let crash = c
        .submit(json!({"image": "holdfast/echo:latest",
                       "command": ["echo", "--listen", "0.0.0.0:7777", "--exit-after", "4s", "--exit-code", "1"],
                       "restart": {"policy": "on-failure", "max_attempts": 2, "delay_ms": 200},
                       "reschedule": {"attempts": 0}}))
        .await;
    c.wait_state(&crash, "running", FIRST_RUN).await;
    let sampler = Sampler::start(&svc).await;
    c.all_managers(|m| c.pause(m)).await;
    let (down, down_ms) = (Instant::now(), wall_ms());

    let tasks = [svc.clone(), batch.clone(), crash.clone()];
    let mut before = BTreeMap::new();
    for t in &tasks {
        before.insert(t.clone(), task_containers(t).await);
    }
    let batch_cid = before[&batch].keys().next().cloned().expect("batch container");
    assert!(inspect(&batch_cid).await.is_some_and(|s| s.status == "running"), "batch must still run at the pause");
    // Restart every worker holding one of the tasks, while no manager can be reached.
    let hosts: std::collections::BTreeSet<String> = before.values().flat_map(|m| m.values().cloned()).collect();
    let restart_started = Instant::now();
    for h in &hosts {
        c.restart(c.worker(h)).await;
    }
    let restart_took = restart_started.elapsed();
    eventually(BUFFERED_OUTAGE, "the batch container to exit 0 during the outage", || async {
        let st = inspect(&batch_cid).await.ok_or("batch container gone")?;
        (st.status == "exited" && st.exit_code == 0).then_some(()).ok_or(format!("{st:?}"))
    })
    .await;
    // And once more the hard way (SIGKILL, no drain): the outbox already holds the
    // batch's exit, which must still arrive exactly once.
    for h in &hosts {
        let w = c.worker(h);
        cluster::docker_ok(&["kill", &w.container]).await;
        c.start_node(w).await;
    }
    tokio::time::sleep_until((down + BUFFERED_OUTAGE).into()).await;
    // Adopted, not duplicated: every task has exactly the containers it had.
    for t in &tasks {
        assert_eq!(task_containers(t).await, before[t], "task {t}: containers changed across the worker restart");
    }
    let up_ms = wall_ms();
    c.all_managers(|m| c.unpause(m)).await;
    let back = Instant::now();

    let views = eventually(CONVERGE, "statuses to converge after the outage", || async {
        let mut views = Vec::new();
        for t in &tasks {
            views.push(c.task(t).await.ok_or("no manager answers")?);
        }
        let states: Vec<&Value> = views.iter().map(|v| &v["state"]).collect();
        let ready = c.workers_ready().await;
        if states == [&json!("running"), &json!("completed"), &json!("failed")] && ready {
            Ok(views)
        } else {
            Err(format!("states {states:?}, workers ready {ready}"))
        }
    })
    .await;
    let converged = back.elapsed();
    let samples = sampler.finish().await;
    let (s, b, k) = (&views[0], &views[1], &views[2]);
    for t in &tasks {
        assert_eq!(task_containers(t).await, before[t], "task {t}: containers changed after the outage");
    }
    eprintln!(
        "FIGURES worker_restart_and_buffered_statuses: outage {:?} (paused); worker restart of {hosts:?} took \
         {restart_took:.1?} (then killed and started once more); containers kept ids: {}; service copies \
         {}..={} during outage; managers back to converged {converged:.1?}; crash events {:?}; batch events {:?}; \
         service events {:?}",
        BUFFERED_OUTAGE,
        tasks.len(),
        samples.min_between(down, back),
        samples.max_running(),
        events(current(k)),
        events(current(b)),
        events(current(s)),
    );

    assert_eq!(current(s)["container_id"], json!(before[&svc].keys().next()), "{s:#}");
    assert_eq!(s["restarts"], 0, "{s:#}");
    assert_eq!((samples.min_between(down, back), samples.max_running()), (1, 1), "one service copy throughout");
    assert_eq!(b["exit_code"], 0, "{b:#}");
    assert_eq!((k["restarts"].as_u64(), k["exit_code"].as_i64()), (Some(2), Some(1)), "{k:#}");
    for t in [s, b, k] {
        assert_eq!(t["placements"].as_array().map(Vec::len), Some(1), "one placement each: {t:#}");
        let p = current(t);
        let evs = events(p);
        for pair in evs.windows(2) {
            assert_ne!(pair[0], pair[1], "an event recorded twice in a row: {evs:?}\n{t:#}");
        }
        for bad in ["stale-report", "invalid-report"] {
            assert_eq!(count(p, bad), 0, "{bad} in {evs:?}");
        }
    }
    // Each observed transition exactly once; the crash loop's happened in the outage.
    assert_eq!(count(current(s), "running"), 1, "service: {:?}", events(current(s)));
    assert_eq!((count(current(b), "running"), count(current(b), "exited")), (1, 1), "batch: {:?}", events(current(b)));
    let kp = current(k);
    assert_eq!(
        (count(kp, "running"), count(kp, "restarting"), count(kp, "failed")),
        (3, 2, 1),
        "crash loop: {:?}",
        events(kp)
    );
    let during = |what: &str| {
        kp["events"].as_array().unwrap().iter().filter(|e| e["what"] == what).all(|e| {
            let at = e["at_ms"].as_u64().unwrap_or(0);
            at >= down_ms && at <= up_ms
        })
    };
    assert!(during("restarting") && during("failed"), "crash loop outside the outage window: {kp:#}");
}
