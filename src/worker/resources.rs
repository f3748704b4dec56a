//! Measures the node with sysinfo; the only file that imports it.

use std::path::Path;

use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

use crate::model::sync::NodeResources;

/// Measures CPUs, load, memory, and the filesystem holding `disk_path` (Docker's data
/// root when it exists here, else the worker's data dir). Blocking: call from
/// `spawn_blocking`.
pub fn measure(disk_path: &Path, engine_ok: bool) -> NodeResources {
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()).with_cpu(CpuRefreshKind::nothing()),
    );
    let cpus = sys.cpus().len().max(1) as u32;
    let disks = Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing().with_storage());
    let path = std::fs::canonicalize(disk_path).unwrap_or_else(|_| disk_path.to_path_buf());
    // The filesystem holding a path is the mount point that is its longest prefix.
    let disk = disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len());
    let mib = 1024 * 1024;
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

#[cfg(test)]
mod tests {
    #[test]
    fn measures_this_machine() {
        let r = super::measure(std::path::Path::new("/"), true);
        assert!(r.cpus >= 1);
        assert!(r.memory_total_mb > 0 && r.memory_free_mb <= r.memory_total_mb);
        assert!(r.disk_total_mb > 0 && r.disk_free_mb <= r.disk_total_mb, "{r:?}");
    }
}
