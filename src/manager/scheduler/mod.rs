//! Pure placement: feasibility, scoring and a `Plan`. No I/O, no tokio, no SQLite:
//! `plan(view, work)` is a function of its arguments, so it is table-testable and the
//! leader's plan applier re-checks its output against fresher state.

use std::collections::BTreeMap;

use crate::manager::state::PlannedPlacement;
use crate::model::spec::{Constraints, Resources};

/// One node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// Ready and eligible for new placements.
    pub eligible: bool,
    /// Why it is not eligible (status), for reasons.
    pub status: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Total CPU, millicores.
    pub cpu_millis: u64,
    /// Total memory, MiB.
    pub memory_mb: u64,
    /// Total disk, MiB.
    pub disk_mb: u64,
    /// Reserved CPU by live placements.
    pub reserved_cpu_millis: u64,
    /// Reserved memory.
    pub reserved_memory_mb: u64,
    /// Reserved disk.
    pub reserved_disk_mb: u64,
    /// Free memory measured by the worker (sysinfo), when reported.
    pub measured_free_memory_mb: Option<u64>,
    /// Free disk measured by the worker, when reported.
    pub measured_free_disk_mb: Option<u64>,
    /// Ids of the images the node's engine holds, as it last reported them; an image
    /// not among them counts against the node's disk when a task needs it.
    pub images: std::sync::Arc<std::collections::HashSet<String>>,
}

/// A catalogued image a task needs (README "Images without a registry").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageNeed {
    /// Image id (config digest).
    pub id: String,
    /// Its size, MiB (rounded up).
    pub size_mb: u64,
}

impl NodeView {
    fn free_cpu(&self) -> u64 {
        self.cpu_millis.saturating_sub(self.reserved_cpu_millis)
    }
    fn free_memory(&self) -> u64 {
        let by_reservation = self.memory_mb.saturating_sub(self.reserved_memory_mb);
        self.measured_free_memory_mb.map_or(by_reservation, |m| m.min(by_reservation))
    }
    fn free_disk(&self) -> u64 {
        let by_reservation = self.disk_mb.saturating_sub(self.reserved_disk_mb);
        self.measured_free_disk_mb.map_or(by_reservation, |m| m.min(by_reservation))
    }
}

/// How to choose among feasible nodes (a cluster setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fill the fullest node that fits first (keeps whole nodes free for big tasks).
    #[default]
    Binpack,
    /// Prefer the emptiest node (spreads load and failure impact).
    Spread,
}

/// The cluster at the time of planning.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterView {
    /// Every registered node.
    pub nodes: Vec<NodeView>,
    /// Scoring strategy.
    pub strategy: Strategy,
}

/// A task waiting for a node.
#[derive(Clone, Debug, PartialEq)]
pub struct Pending {
    /// Task id.
    pub task_id: String,
    /// Requested resources.
    pub resources: Resources,
    /// Constraints.
    pub constraints: Constraints,
    /// Placement this one replaces, carried into the plan.
    pub replaces: Option<String>,
    /// Nodes to use only when no other node fits (where the task failed before).
    pub avoid: Vec<String>,
    /// The task's image when the managers' catalogue holds it; a node that lacks it
    /// must also have room for it.
    pub image: Option<ImageNeed>,
}

/// Disk a placement needs on `node`: the task's own, plus its image when the node
/// does not hold it.
fn disk_need(node: &NodeView, want: &Pending) -> u64 {
    let image = want.image.as_ref().filter(|i| !node.images.contains(&i.id)).map_or(0, |i| i.size_mb);
    want.resources.disk_mb.saturating_add(image)
}

/// The scheduler's output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Placements to commit.
    pub placements: Vec<PlannedPlacement>,
    /// Tasks left pending, with the reason.
    pub unplaced: Vec<(String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Miss {
    NotReady,
    Label,
    Cpu,
    Memory,
    Disk,
}

fn check(node: &NodeView, want: &Pending) -> Result<(), Miss> {
    if !node.eligible {
        return Err(Miss::NotReady);
    }
    if want.constraints.labels.iter().any(|(k, v)| node.labels.get(k) != Some(v)) {
        return Err(Miss::Label);
    }
    let r = &want.resources;
    if r.cpu_millis > node.free_cpu() {
        return Err(Miss::Cpu);
    }
    if r.memory_mb > node.free_memory() {
        return Err(Miss::Memory);
    }
    if disk_need(node, want) > node.free_disk() {
        return Err(Miss::Disk);
    }
    Ok(())
}

/// Utilization after placement (mean of CPU and memory); binpack maximizes it, spread
/// minimizes it.
fn score(node: &NodeView, r: &Resources, strategy: Strategy) -> f64 {
    let cpu = (node.reserved_cpu_millis + r.cpu_millis) as f64 / node.cpu_millis.max(1) as f64;
    let mem = (node.reserved_memory_mb + r.memory_mb) as f64 / node.memory_mb.max(1) as f64;
    let used = (cpu + mem) / 2.0;
    match strategy {
        Strategy::Binpack => used,
        Strategy::Spread => -used,
    }
}

fn explain(nodes: &Nodes<'_>, want: &Pending, misses: &BTreeMap<Miss, usize>) -> String {
    if nodes.len() == 0 {
        return "no worker nodes registered".into();
    }
    let r = &want.resources;
    let largest = |f: fn(&NodeView) -> u64| {
        (0..nodes.len()).map(|i| nodes.get(i)).filter(|n| n.eligible).map(f).max().unwrap_or(0)
    };
    let parts: Vec<String> = misses
        .iter()
        .map(|(miss, count)| {
            let what = match miss {
                Miss::NotReady => "not ready".to_string(),
                Miss::Label => {
                    let wanted: Vec<String> = want.constraints.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("label {}", wanted.join(","))
                }
                Miss::Cpu => {
                    format!("cpu {} millis > largest free {} millis", r.cpu_millis, largest(NodeView::free_cpu))
                }
                Miss::Memory => {
                    format!("memory {} MB > largest free {} MB", r.memory_mb, largest(NodeView::free_memory))
                }
                Miss::Disk => match &want.image {
                    Some(i) => format!(
                        "disk {} MB + image {} MB > largest free {} MB",
                        r.disk_mb,
                        i.size_mb,
                        largest(NodeView::free_disk)
                    ),
                    None => format!("disk {} MB > largest free {} MB", r.disk_mb, largest(NodeView::free_disk)),
                },
            };
            if misses.len() == 1 && *count == nodes.len() {
                what
            } else {
                format!("{count} node{}: {what}", if *count == 1 { "" } else { "s" })
            }
        })
        .collect();
    format!("no node fits: {}", parts.join("; "))
}

/// Feasible nodes scored per task before choosing. Like Nomad's limit iterator this
/// bounds the cost of a placement on a large cluster: scanning stops once this many
/// feasible nodes were seen (starting at an offset derived from the task id, so tasks
/// spread their scans), so the cost grows with how many nodes must be rejected, not
/// with the cluster size. On clusters up to this size every node is scored.
pub const MAX_CANDIDATES: usize = 64;

fn start_offset(task_id: &str, n: usize) -> usize {
    if n <= MAX_CANDIDATES {
        return 0;
    }
    (holdfast_raft::fnv1a(task_id.as_bytes()) % n as u64) as usize
}

/// The view's nodes plus what this plan has placed on them so far. Copy-on-write, so a
/// plan over a large cluster copies only the nodes it uses, not all of them.
struct Nodes<'a> {
    base: &'a [NodeView],
    changed: std::collections::HashMap<usize, NodeView>,
}

impl<'a> Nodes<'a> {
    fn len(&self) -> usize {
        self.base.len()
    }
    fn get(&self, i: usize) -> &NodeView {
        self.changed.get(&i).unwrap_or(&self.base[i])
    }
    fn get_mut(&mut self, i: usize) -> &mut NodeView {
        let base = self.base;
        self.changed.entry(i).or_insert_with(|| base[i].clone())
    }
}

/// Places as much of `work` as fits, in order, accounting for what this plan already
/// placed. Deterministic: ties go to the lexically smallest node name.
pub fn plan(view: &ClusterView, work: &[Pending]) -> Plan {
    let mut nodes = Nodes { base: &view.nodes, changed: Default::default() };
    let mut out = Plan::default();
    let n = nodes.len();
    for want in work {
        let mut misses: BTreeMap<Miss, usize> = BTreeMap::new();
        // Ranked by (not avoided, score, then smallest name): an avoided node is used
        // only when nothing else fits.
        let mut best: Option<(usize, bool, f64)> = None;
        let mut feasible = 0usize;
        let offset = start_offset(&want.task_id, n);
        for i in (offset..n).chain(0..offset) {
            if feasible >= MAX_CANDIDATES {
                break;
            }
            let node = nodes.get(i);
            match check(node, want) {
                Err(m) => *misses.entry(m).or_default() += 1,
                Ok(()) => {
                    feasible += 1;
                    let s = score(node, &want.resources, view.strategy);
                    let preferred = !want.avoid.contains(&node.name);
                    let better = match best {
                        None => true,
                        Some((j, bp, bs)) => {
                            (preferred && !bp)
                                || (preferred == bp && (s > bs || (s == bs && node.name < nodes.get(j).name)))
                        }
                    };
                    if better {
                        best = Some((i, preferred, s));
                    }
                }
            }
        }
        match best {
            Some((i, _, _)) => {
                let n = nodes.get_mut(i);
                let disk = disk_need(n, want);
                n.reserved_cpu_millis += want.resources.cpu_millis;
                n.reserved_memory_mb += want.resources.memory_mb;
                n.reserved_disk_mb += disk;
                if let Some(m) = n.measured_free_memory_mb.as_mut() {
                    *m = m.saturating_sub(want.resources.memory_mb);
                }
                if let Some(d) = n.measured_free_disk_mb.as_mut() {
                    *d = d.saturating_sub(disk);
                }
                if let Some(img) = &want.image {
                    // Counted once: the next task with this image finds it here.
                    if !n.images.contains(&img.id) {
                        std::sync::Arc::make_mut(&mut n.images).insert(img.id.clone());
                    }
                }
                out.placements.push(PlannedPlacement {
                    task_id: want.task_id.clone(),
                    node: n.name.clone(),
                    replaces: want.replaces.clone(),
                });
            }
            None => out.unplaced.push((want.task_id.clone(), explain(&nodes, want, &misses))),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cpu: u64, mem: u64) -> NodeView {
        NodeView {
            name: name.into(),
            eligible: true,
            status: "ready".into(),
            labels: BTreeMap::new(),
            cpu_millis: cpu,
            memory_mb: mem,
            disk_mb: 100_000,
            reserved_cpu_millis: 0,
            reserved_memory_mb: 0,
            reserved_disk_mb: 0,
            measured_free_memory_mb: None,
            measured_free_disk_mb: None,
            images: Default::default(),
        }
    }

    fn task(id: &str, cpu: u64, mem: u64) -> Pending {
        Pending {
            task_id: id.into(),
            resources: Resources { cpu_millis: cpu, memory_mb: mem, disk_mb: 0 },
            constraints: Constraints::default(),
            replaces: None,
            avoid: Vec::new(),
            image: None,
        }
    }

    fn placed(p: &Plan) -> Vec<(&str, &str)> {
        p.placements.iter().map(|x| (x.task_id.as_str(), x.node.as_str())).collect()
    }

    #[test]
    fn binpack_fills_one_node_first_and_never_overcommits() {
        let view = ClusterView { nodes: vec![node("b", 1000, 1000), node("a", 1000, 1000)], ..Default::default() };
        let work: Vec<Pending> = (0..5).map(|i| task(&format!("t{i}"), 400, 100)).collect();
        let p = plan(&view, &work);
        assert_eq!(placed(&p), vec![("t0", "a"), ("t1", "a"), ("t2", "b"), ("t3", "b")]);
        assert_eq!(p.unplaced.len(), 1);
        assert_eq!(p.unplaced[0].0, "t4");
        assert!(p.unplaced[0].1.contains("cpu 400 millis > largest free 200 millis"), "{}", p.unplaced[0].1);
    }

    #[test]
    fn reasons_name_each_check() {
        let mut small = node("small", 4000, 23000);
        small.measured_free_memory_mb = Some(23000);
        let view = ClusterView { nodes: vec![small], ..Default::default() };
        let p = plan(&view, &[task("big", 100, 999_999)]);
        assert_eq!(p.unplaced[0].1, "no node fits: memory 999999 MB > largest free 23000 MB");

        let mut labelled = node("z", 1000, 1000);
        labelled.labels.insert("zone".into(), "a".into());
        let mut down = node("d", 1000, 1000);
        down.eligible = false;
        let view = ClusterView { nodes: vec![labelled, down], ..Default::default() };
        let mut t = task("t", 100, 10);
        t.constraints.labels.insert("zone".into(), "b".into());
        let p = plan(&view, &[t]);
        assert_eq!(p.unplaced[0].1, "no node fits: 1 node: not ready; 1 node: label zone=b");

        let p = plan(&ClusterView::default(), &[task("t", 1, 1)]);
        assert_eq!(p.unplaced[0].1, "no worker nodes registered");
    }

    #[test]
    fn spread_balances_and_ties_break_by_name() {
        let view = ClusterView {
            nodes: vec![node("c", 1000, 1000), node("a", 1000, 1000), node("b", 1000, 1000)],
            strategy: Strategy::Spread,
        };
        let work: Vec<Pending> = (0..6).map(|i| task(&format!("t{i}"), 100, 100)).collect();
        let p = plan(&view, &work);
        assert_eq!(placed(&p), vec![("t0", "a"), ("t1", "b"), ("t2", "c"), ("t3", "a"), ("t4", "b"), ("t5", "c")]);
    }

    #[test]
    fn avoided_nodes_are_a_last_resort() {
        let view = ClusterView { nodes: vec![node("a", 1000, 1000), node("b", 1000, 1000)], ..Default::default() };
        let mut t = task("t", 100, 100);
        t.avoid = vec!["a".into()];
        t.replaces = Some("old".into());
        let p = plan(&view, std::slice::from_ref(&t));
        assert_eq!(placed(&p), vec![("t", "b")]);
        assert_eq!(p.placements[0].replaces.as_deref(), Some("old"));
        t.avoid = vec!["a".into(), "b".into()];
        assert_eq!(placed(&plan(&view, &[t])), vec![("t", "a")]);
    }

    #[test]
    fn large_clusters_score_a_bounded_sample_and_still_never_overcommit() {
        let nodes: Vec<NodeView> = (0..1000).map(|i| node(&format!("n{i:04}"), 1000, 1000)).collect();
        let view = ClusterView { nodes, ..Default::default() };
        let work: Vec<Pending> = (0..3000).map(|i| task(&format!("t{i}"), 300, 300)).collect();
        let p = plan(&view, &work);
        // 3 fit per node: exactly 3000 placements, none on a full node.
        assert_eq!(p.placements.len(), 3000);
        let mut per_node = std::collections::HashMap::new();
        for pl in &p.placements {
            *per_node.entry(pl.node.clone()).or_insert(0) += 1;
        }
        assert!(per_node.values().all(|&c| c <= 3), "overcommitted");
    }

    #[test]
    fn measured_free_memory_limits_placement() {
        let mut n = node("a", 1000, 1000);
        n.measured_free_memory_mb = Some(150);
        let p =
            plan(&ClusterView { nodes: vec![n], ..Default::default() }, &[task("t1", 10, 100), task("t2", 10, 100)]);
        assert_eq!(placed(&p), vec![("t1", "a")]);
        assert_eq!(p.unplaced[0].0, "t2");
    }

    #[test]
    fn a_catalogued_image_counts_against_the_disk_of_nodes_that_lack_it() {
        let mut has = node("has", 4_000, 8_000);
        has.disk_mb = 300;
        has.images = std::sync::Arc::new(["sha256:app".to_string()].into_iter().collect());
        let mut lacks = node("lacks", 8_000, 16_000);
        lacks.disk_mb = 300;
        let view = ClusterView { nodes: vec![lacks.clone(), has], strategy: Strategy::Spread };
        let mut t = task("t1", 100, 100);
        t.resources.disk_mb = 100;
        t.image = Some(ImageNeed { id: "sha256:app".into(), size_mb: 250 });
        // Spread would prefer the emptier node, but only the node holding the image has room.
        let p = plan(&view, &[t.clone()]);
        assert_eq!(p.placements[0].node, "has", "{p:?}");
        // With no node holding it, the reason names the image.
        let view = ClusterView { nodes: vec![lacks], strategy: Strategy::Spread };
        let p = plan(&view, &[t.clone(), t]);
        assert!(p.unplaced[0].1.contains("image 250 MB"), "{p:?}");
        // Without the image the task fits.
        let mut small = task("t2", 100, 100);
        small.resources.disk_mb = 100;
        assert_eq!(plan(&view, &[small]).placements.len(), 1);
    }
}
