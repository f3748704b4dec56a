//! Measures the node with sysinfo (the only file that imports it), and the worker's
//! admission rule: does a placement fit what is free here right now.

use std::path::Path;

use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

use super::ledger::Held;
use crate::model::spec::Resources;
use crate::model::sync::NodeResources;
use crate::model::{Desired, Observed};

const MIB: u64 = 1024 * 1024;

/// Measures CPUs, load, memory, and the filesystem holding `disk_path` (Docker's data
/// root when it exists here, else the worker's data dir). Blocking: call from
/// `spawn_blocking`.
pub fn measure(disk_path: &Path, engine_ok: bool) -> NodeResources {
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()).with_cpu(CpuRefreshKind::nothing()),
    );
    let cpus = sys.cpus().len().max(1) as u32;
    // List mounts without their sizes, then size only the one that holds the path: a
    // Docker host has a mount per container (fuse-overlayfs here), and sizing them all
    // took seconds, on every placement's admission check.
    let mut disks = Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing());
    let path = std::fs::canonicalize(disk_path).unwrap_or_else(|_| disk_path.to_path_buf());
    // The filesystem holding a path is the mount point that is its longest prefix.
    let disk = disks
        .list_mut()
        .iter_mut()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len());
    let disk = disk.map(|d| {
        d.refresh_specifics(DiskRefreshKind::nothing().with_storage());
        &*d
    });
    let mib = MIB;
    NodeResources {
        cpus,
        cpu_millis: u64::from(cpus) * 1000,
        load1: System::load_average().one,
        memory_total_mb: sys.total_memory() / mib,
        memory_free_mb: sys.available_memory() / mib,
        disk_total_mb: disk.map_or(0, |d| d.total_space() / mib),
        disk_free_mb: disk.map_or(0, |d| d.available_space() / mib),
        engine_ok,
    }
}

/// Memory and disk (MiB) that other placements of this worker hold but that a fresh
/// measurement does not show yet. `simulated` (a `resources_override` worker, whose
/// numbers never move by themselves) counts every live placement, as if each used its
/// reservation; a measured worker counts only those being started (admitted, not yet
/// running), so a burst of creates cannot all be admitted against the same free memory.
pub fn committed(held: &[Held], except: Option<&str>, simulated: bool) -> (u64, u64) {
    held.iter()
        .filter(|h| Some(h.id.as_str()) != except && h.desired == Desired::Run)
        .filter(|h| match h.status.observed {
            Observed::Pulling | Observed::Starting => true,
            Observed::Running | Observed::Restarting => simulated,
            Observed::Pending | Observed::Exited | Observed::Failed | Observed::Stopped => false,
        })
        .fold((0, 0), |(m, d), h| {
            (m.saturating_add(h.spec.resources.memory_mb), d.saturating_add(h.spec.resources.disk_mb))
        })
}

/// The worker's admission rule, checked before it pulls or starts a placement: the
/// memory and the disk (scratch plus the image still to fetch) it asks for must fit
/// what is free. `free` is already net of [`committed`]. A total of 0 means that
/// resource could not be measured; it is then not held against the task. CPU is not
/// checked: it is compressible, and the scheduler's reservations bound it.
///
/// The refusal starts with `admission refused:` and names the resource, the need and
/// what is free, so the manager and the operator can tell it from a start failure.
pub fn admit(node: &str, need: &Resources, image_bytes: u64, free: &NodeResources) -> Result<(), String> {
    if free.memory_total_mb > 0 && need.memory_mb > free.memory_free_mb {
        return Err(format!(
            "admission refused: memory {} MB > free {} MB on node {node}",
            need.memory_mb, free.memory_free_mb
        ));
    }
    let image_mb = image_bytes.div_ceil(MIB);
    let disk = need.disk_mb.saturating_add(image_mb);
    if free.disk_total_mb > 0 && disk > free.disk_free_mb {
        let parts =
            if image_mb > 0 { format!(" ({} MB scratch + {image_mb} MB image)", need.disk_mb) } else { String::new() };
        return Err(format!("admission refused: disk {disk} MB{parts} > free {} MB on node {node}", free.disk_free_mb));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PlacementStatus, TaskSpec};

    fn free(memory_free_mb: u64, disk_free_mb: u64) -> NodeResources {
        NodeResources {
            cpus: 2,
            cpu_millis: 2000,
            memory_total_mb: 8192,
            memory_free_mb,
            disk_total_mb: 100_000,
            disk_free_mb,
            ..Default::default()
        }
    }

    #[test]
    fn admission_arithmetic() {
        let need = |memory_mb, disk_mb| Resources { cpu_millis: 100, memory_mb, disk_mb };
        let unmeasured = NodeResources::default();
        // (need, image bytes to fetch, free, expected)
        let table: Vec<(Resources, u64, NodeResources, Result<(), &str>)> = vec![
            (need(64, 0), 0, free(1200, 500), Ok(())),
            (need(1200, 0), 0, free(1200, 500), Ok(())),
            (need(4096, 0), 0, free(1200, 500), Err("admission refused: memory 4096 MB > free 1200 MB on node w1")),
            (need(64, 500), 0, free(1200, 500), Ok(())),
            (need(64, 501), 0, free(1200, 500), Err("admission refused: disk 501 MB > free 500 MB on node w1")),
            // The image still to fetch counts, rounded up to whole MiB.
            (need(64, 450), 50 * MIB, free(1200, 500), Ok(())),
            (
                need(64, 450),
                50 * MIB + 1,
                free(1200, 500),
                Err("admission refused: disk 501 MB (450 MB scratch + 51 MB image) > free 500 MB on node w1"),
            ),
            // Memory is checked first when both miss.
            (need(4096, 999), 0, free(1200, 500), Err("admission refused: memory 4096 MB > free 1200 MB on node w1")),
            // Nothing measured (totals 0): nothing held against the task.
            (need(4096, 999), 0, unmeasured, Ok(())),
        ];
        for (i, (need, image, free, want)) in table.into_iter().enumerate() {
            assert_eq!(admit("w1", &need, image, &free), want.map_err(str::to_string), "row {i}");
        }
    }

    #[test]
    fn committed_counts_what_a_measurement_cannot_see() {
        let h = |id: &str, observed: Observed, desired: Desired| Held {
            id: id.into(),
            task_id: id.into(),
            fence: 1,
            desired,
            spec: TaskSpec::from_json(br#"{"image":"i","resources":{"memory_mb":100,"disk_mb":10}}"#).unwrap(),
            status: PlacementStatus::new(observed),
            next_start_ms: None,
            suspended: false,
        };
        let held = vec![
            h("starting", Observed::Starting, Desired::Run),
            h("pulling", Observed::Pulling, Desired::Run),
            h("running", Observed::Running, Desired::Run),
            h("restarting", Observed::Restarting, Desired::Run),
            h("pending", Observed::Pending, Desired::Run),
            h("failed", Observed::Failed, Desired::Run),
            h("stopping", Observed::Running, Desired::Stop),
        ];
        assert_eq!(committed(&held, None, false), (200, 20));
        assert_eq!(committed(&held, Some("starting"), false), (100, 10));
        assert_eq!(committed(&held, None, true), (400, 40));
        assert_eq!(committed(&held, Some("running"), true), (300, 30));
    }

    #[test]
    fn measures_this_machine() {
        let r = super::measure(std::path::Path::new("/"), true);
        assert!(r.cpus >= 1);
        assert!(r.memory_total_mb > 0 && r.memory_free_mb <= r.memory_total_mb);
        assert!(r.disk_total_mb > 0 && r.disk_free_mb <= r.disk_total_mb, "{r:?}");
    }
}
