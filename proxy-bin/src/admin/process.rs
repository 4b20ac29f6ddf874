//! The process metrics Prometheus' client libraries export under `process_*`, read from
//! `/proc/self` and getrusage/getrlimit at scrape time.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static STARTED: OnceLock<SystemTime> = OnceLock::new();

/// Notes the process start (called first thing in `main`); returns it.
pub(crate) fn started() -> SystemTime {
    *STARTED.get_or_init(SystemTime::now)
}

/// One reading.
#[derive(Debug, Default)]
pub(crate) struct ProcessStats {
    pub(crate) open_fds: Option<i64>,
    pub(crate) max_fds: Option<i64>,
    pub(crate) resident_bytes: Option<i64>,
    pub(crate) virtual_bytes: Option<i64>,
    pub(crate) cpu_seconds: Option<f64>,
    pub(crate) start_time_seconds: i64,
}

/// Reads what the system offers; a value it does not offer is left out of `/metrics`.
pub(crate) fn read() -> ProcessStats {
    use nix::sys::resource::{getrlimit, getrusage, Resource, UsageWho};
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as i64);
    let max_fds = getrlimit(Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| i64::try_from(soft).unwrap_or(i64::MAX));
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |field: &str| -> Option<i64> {
        let line = status.lines().find(|l| l.starts_with(field))?;
        let n: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(n.saturating_mul(1024))
    };
    let cpu_seconds = getrusage(UsageWho::RUSAGE_SELF).ok().map(|u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    });
    let start_time_seconds = started()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    ProcessStats {
        open_fds,
        max_fds,
        resident_bytes: kib("VmRSS:"),
        virtual_bytes: kib("VmSize:"),
        cpu_seconds,
        start_time_seconds,
    }
}
